package runtime_test

import (
	"context"
	"fmt"
	"sync"
	"testing"

	ollamakv "github.com/ollama/ollama/kvcache"
	"github.com/ollama/ollama/model/input"
	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/runtime"
)

// DenseCache's own cache (models without sliding windows) must give the
// logits of ollama's causal cache bit for bit: the same cells, padding,
// mask values and kernels. Exercised: prefill over several batches, one-token
// steps (the persistent mask row), a truncation followed by one-token steps
// (the row must close the dropped cells again) and a multi-token batch
// after decoding (the in-graph mask), then steps past 256 cells (the kept
// step graph rebuilt for more cells), with f16 and f32 keys and values and
// with flash attention (f16 mask, unpermuted values).
func TestDenseCacheMatchesOllamaCausal(t *testing.T) {
	path := testmodels.Random(t, "llama", "tiny", foundry.F32, 3, false)
	cases := []struct {
		name  string
		kv    string
		flash bool
	}{
		{"f16-kv", "f16", false},
		{"f32-kv", "f32", false},
		{"flash-attention", "f16", true},
	}
	const capacity, batch = 300, 64
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ctx := context.Background()
			m, err := runtime.Open(ctx, path, runtime.Options{Threads: 1, KVType: c.kv, FlashAttention: c.flash,
				ContextLength: capacity, BatchSize: batch, DataDir: t.TempDir()})
			require.NoError(t, err)
			defer m.Close()
			ours, err := m.NewSessionWith(runtime.DenseCache)
			require.NoError(t, err)
			defer ours.Close()
			_, isCausal := ours.Cache().(*ollamakv.Causal)
			require.False(t, isCausal, "DenseCache should not be ollama's causal cache on a model without windows")
			theirs, err := m.NewSessionWith(func(m *runtime.Model) (ollamakv.Cache, error) {
				c := ollamakv.NewCausalCache(m.Arch().Shift)
				c.Init(m.Backend(), m.KVType(), 1, capacity, batch)
				return c, nil
			})
			require.NoError(t, err)
			defer theirs.Close()

			vocab := m.Config().Vocab
			toks := make([]int32, capacity)
			for i := range toks {
				toks[i] = int32((i*7919+13)%(vocab-3) + 3)
			}
			same := func(step string, tokens []int32, all bool) {
				t.Helper()
				requireSameLogits(t, ctx, step, ours, theirs, tokens, all)
			}
			same("prefill of 150 tokens in batches of 64", toks[:150], true)
			for i := 150; i < 170; i++ {
				same("one-token step", toks[i:i+1], false)
			}
			require.NoError(t, ours.Truncate(100))
			require.NoError(t, theirs.Truncate(100))
			for i := 100; i < 120; i++ {
				same("one-token step after truncating to 100", toks[i:i+1], false)
			}
			same("a 37-token batch after decoding", toks[120:157], true)
			same("one-token step after the batch", toks[157:158], false)
			// Steps across 256 cells: the kept step graph (densestep.go)
			// is rebuilt for 512 attended cells.
			for i := 158; i < 262; i++ {
				same("one-token step", toks[i:i+1], false)
			}
			require.Equal(t, 262, ours.Len())
		})
	}
}

// The cache holds one sequence appended in order: a batch at another
// position, of another sequence, or past the capacity is an error naming
// what is wrong, and only a suffix can be removed.
func TestDenseCacheRefusesOutOfOrder(t *testing.T) {
	path := testmodels.Random(t, "llama", "tiny", foundry.F32, 3, false)
	m, err := runtime.Open(context.Background(), path, runtime.Options{Threads: 1, ContextLength: 256, DataDir: t.TempDir()})
	require.NoError(t, err)
	defer m.Close()
	c, err := runtime.DenseCache(m)
	require.NoError(t, err)
	defer c.Close()
	ctx := m.Backend().NewContext()
	defer ctx.Close()
	for _, tc := range []struct {
		name      string
		positions []int32
		seqs      []int
		want      string
	}{
		{"gap", []int32{5}, []int{0}, "position 5, the next cell is 0"},
		{"unordered", []int32{0, 2}, []int{0, 0}, "token 1 of the batch has position 2"},
		{"other sequence", []int32{0}, []int{1}, "sequence 1"},
		{"past capacity", make([]int32, 300), make([]int, 300), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.name == "past capacity" {
				for i := range tc.positions {
					tc.positions[i] = int32(i)
				}
			}
			err := c.StartForward(ctx, input.Batch{Positions: tc.positions, Sequences: tc.seqs}, false)
			require.Error(t, err)
			if tc.want != "" {
				require.ErrorContains(t, err, tc.want)
			} else {
				require.ErrorIs(t, err, ollamakv.ErrKvCacheFull)
			}
		})
	}
	require.NoError(t, c.StartForward(ctx, input.Batch{Positions: []int32{0, 1, 2}, Sequences: []int{0, 0, 0}}, false))
	require.ErrorContains(t, c.Remove(0, 0, 1), "only a suffix")
	require.NoError(t, c.Remove(0, 1, 1<<31-1))
	require.NoError(t, c.StartForward(ctx, input.Batch{Positions: []int32{1}, Sequences: []int{0}}, false), "position 1 follows the removal")
}

// A dense prefill reserves the compute buffer for its largest batch before
// the first (reserve.go, reserveDense), so that ggml's scheduler does not
// free and reallocate it batch after batch: each reallocation is fresh
// memory to fault in, which made the dense prefill 0.47x llama.cpp's at 8k
// on the tiny preset (docs/performance.md, "Dense prefill"). The buffer
// the reserve reported must be the buffer the prefill ends with (it did
// not grow), for prompts whose last batch is full, short, or the only
// one, with one logits row or every row, and for a second prefill that
// continues the first (it reserves again, for its own last batch). Without
// the reserve nothing is reported and the buffer grows with every batch.
// That the logits do not change is TestDenseCacheMatchesOllamaCausal's.
func TestDensePrefillReservesOnce(t *testing.T) {
	path := testmodels.Random(t, "llama", "tiny", foundry.F32, 3, false)
	ctx := context.Background()
	const batch = 96
	for _, tc := range []struct {
		name  string
		parts []int // tokens of each Eval
		all   bool
	}{
		{"full last batch", []int{384}, false},
		{"short last batch", []int{300}, false},
		{"one batch", []int{70}, false},
		{"every row's logits", []int{300}, true},
		{"a second prefill continues the first", []int{200, 250}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := runtime.Open(ctx, path, runtime.Options{Threads: 1, ContextLength: 512, BatchSize: batch, DataDir: t.TempDir()})
			require.NoError(t, err)
			defer m.Close()
			s, err := m.NewSessionWith(runtime.DenseCache)
			require.NoError(t, err)
			defer s.Close()
			require.Zero(t, graphBytes(m), "nothing reserved before the prefill")
			vocab := m.Config().Vocab
			var prev uint64
			for i, n := range tc.parts {
				toks := make([]int32, n)
				for j := range toks {
					toks[j] = int32(3 + (j*131+i)%(vocab-3))
				}
				rows, err := s.Eval(ctx, toks, tc.all, nil)
				require.NoError(t, err)
				if tc.all {
					require.Len(t, rows, n)
				}
				reserved := graphBytes(m)
				require.Positive(t, reserved, "prefill %d reserved no compute buffer", i)
				require.Equal(t, reserved, computeBuffer(m), "the compute buffer grew during prefill %d: the reserve was too small", i)
				if i > 0 {
					require.Greater(t, reserved, prev, "prefill %d attends to more cells than the first and should have reserved more", i)
				}
				prev = reserved
			}
			// Decoding after the prefill fits the same buffer.
			_, err = s.Eval(ctx, []int32{5}, false, nil)
			require.NoError(t, err)
			require.Equal(t, prev, computeBuffer(m), "a decode step grew the compute buffer")
		})
	}
}

// A one-token step on DenseCache's own cache computes a graph kept across
// steps (densestep.go): built once per run of steps that attend to the
// same cells (256 on ggml), its token, position and mask cell written
// before each compute. Its logits must equal those of a graph built for
// every step, bit for bit, for steps before and after a prefill, after a
// truncation (the same graph, fewer cells open) and across 256 cells (a
// new graph), with another session's larger graph computed between two
// steps (it may move the shared compute buffer under the kept graph's
// intermediate tensors). And the graph must be kept: one build per run of
// 256 cells, not one per step.
func TestDenseStepGraphMatchesFreshGraph(t *testing.T) {
	path := testmodels.Random(t, "llama", "tiny", foundry.F32, 3, false)
	for _, flash := range []bool{false, true} {
		t.Run(map[bool]string{false: "plain", true: "flash-attention"}[flash], func(t *testing.T) {
			ctx := context.Background()
			const capacity = 600
			m, err := runtime.Open(ctx, path, runtime.Options{Threads: 1, ContextLength: capacity, BatchSize: 64,
				FlashAttention: flash, DataDir: t.TempDir()})
			require.NoError(t, err)
			defer m.Close()
			newSession := func(keep bool) *runtime.Session { return denseSession(t, m, keep) }
			kept, fresh, other := newSession(true), newSession(false), newSession(false)
			defer kept.Close()
			defer fresh.Close()
			defer other.Close()
			vocab := m.Config().Vocab
			toks := make([]int32, capacity)
			for i := range toks {
				toks[i] = int32((i*7919+13)%(vocab-3) + 3)
			}
			same := func(step string, tokens []int32) {
				t.Helper()
				requireSameLogits(t, ctx, step, kept, fresh, tokens, false)
			}
			for i := 0; i < 10; i++ {
				same("one-token step from an empty cache", toks[i:i+1])
			}
			same("a prefill after steps", toks[10:200])
			for i := 200; i < 230; i++ {
				same("one-token step", toks[i:i+1])
			}
			require.Equal(t, 1, runtime.DenseStepBuilds(kept), "40 steps within 256 cells: one graph")
			require.Equal(t, 0, runtime.DenseStepBuilds(fresh), "no kept graph when turned off")
			require.NoError(t, kept.Truncate(150))
			require.NoError(t, fresh.Truncate(150))
			for i := 150; i < 300; i++ {
				if i == 270 {
					// Another session's larger graph between two steps.
					_, err := other.Eval(ctx, toks[:500], false, nil)
					require.NoError(t, err)
				}
				same("one-token step after truncating to 150", toks[i:i+1])
			}
			require.Equal(t, 2, runtime.DenseStepBuilds(kept), "steps to 300 cells: a second graph for 512 cells")
		})
	}
}

// A step graph that reads a tensor outside host memory (a scheduler with
// a GPU backend would split it and rewrite its sources into copies that
// its reset frees) is not kept: the cache falls back to a graph built for
// every step, with the same logits, and stops trying.
func TestDenseStepGraphFallsBackOffHost(t *testing.T) {
	path := testmodels.Random(t, "llama", "tiny", foundry.F32, 3, false)
	ctx := context.Background()
	m, err := runtime.Open(ctx, path, runtime.Options{Threads: 1, ContextLength: 300, BatchSize: 64, DataDir: t.TempDir()})
	require.NoError(t, err)
	defer m.Close()
	fresh := denseSession(t, m, false)
	defer fresh.Close()
	off, err := m.NewSessionWith(runtime.DenseCache)
	require.NoError(t, err)
	defer off.Close()
	require.True(t, runtime.DenseStepKept(off), "kept graphs are the default")

	old := runtime.SetStepGraphHostOnly(false)
	defer runtime.SetStepGraphHostOnly(old)
	vocab := m.Config().Vocab
	for i := 0; i < 20; i++ {
		tok := []int32{int32((i*7919+13)%(vocab-3) + 3)}
		want, err := fresh.Eval(ctx, tok, false, nil)
		require.NoError(t, err)
		got, err := off.Eval(ctx, tok, false, nil)
		require.NoError(t, err, "step %d", i)
		require.Equal(t, want, got, "step %d: logits differ", i)
	}
	require.False(t, runtime.DenseStepKept(off), "a graph not all in host memory: no kept graphs")
	require.Equal(t, 0, runtime.DenseStepBuilds(off), "no kept graph was built")
}

// Sessions decoding at once each keep their own step graph, and ggml's
// scheduler (shared, one graph at a time) places each graph's tensors
// anew at every compute: concurrent steps must give the logits of the same
// steps taken one session after the other with graphs built for every
// step. Run under -race as well (make test).
func TestDenseStepGraphConcurrent(t *testing.T) {
	path := testmodels.Random(t, "llama", "tiny", foundry.F32, 3, false)
	ctx := context.Background()
	const sessions, prompt, steps = 3, 100, 200 // steps cross 256 cells: each session rebuilds once
	m, err := runtime.Open(ctx, path, runtime.Options{Threads: 1, ContextLength: prompt + steps, BatchSize: 64, DataDir: t.TempDir()})
	require.NoError(t, err)
	defer m.Close()
	vocab := m.Config().Vocab
	tokens := func(k int) []int32 { // session k's prompt and steps
		toks := make([]int32, prompt+steps)
		for i := range toks {
			toks[i] = int32((i*7919+k*104729+13)%(vocab-3) + 3)
		}
		return toks
	}
	newSession := func(keep bool) *runtime.Session { return denseSession(t, m, keep) }
	run := func(k int, s *runtime.Session, keep bool) ([][]float32, error) {
		defer s.Close()
		toks := tokens(k)
		if _, err := s.Eval(ctx, toks[:prompt], false, nil); err != nil {
			return nil, err
		}
		var out [][]float32
		for i := prompt; i < prompt+steps; i++ {
			rows, err := s.Eval(ctx, toks[i:i+1], false, nil)
			if err != nil {
				return nil, err
			}
			out = append(out, rows[0])
		}
		if got := runtime.DenseStepBuilds(s); keep && got != 2 {
			return nil, fmt.Errorf("session %d built %d step graphs, want 2 (cells 256 and 512)", k, got)
		}
		return out, nil
	}
	want := make([][][]float32, sessions)
	for k := range want {
		want[k], err = run(k, newSession(false), false)
		require.NoError(t, err)
	}
	got := make([][][]float32, sessions)
	errs := make([]error, sessions)
	var wg sync.WaitGroup
	for k := range got {
		s := newSession(true) // made here: the setting is not for goroutines to change
		wg.Add(1)
		go func() {
			defer wg.Done()
			got[k], errs[k] = run(k, s, true)
		}()
	}
	wg.Wait()
	for k := range got {
		require.NoError(t, errs[k], "session %d", k)
		require.Len(t, got[k], steps)
		for i := range want[k] {
			require.Equal(t, want[k][i], got[k][i], "session %d, step %d: logits differ", k, i)
		}
	}
}

// requireSameLogits evaluates tokens in both sessions and requires their
// logits bit for bit equal.
func requireSameLogits(t *testing.T, ctx context.Context, step string, got, want *runtime.Session, tokens []int32, all bool) {
	t.Helper()
	g, err := got.Eval(ctx, tokens, all, nil)
	require.NoError(t, err, step)
	w, err := want.Eval(ctx, tokens, all, nil)
	require.NoError(t, err, step)
	require.Len(t, g, len(w), step)
	for i := range w {
		require.Equal(t, w[i], g[i], "%s: logits row %d differ", step, i)
	}
}

// denseSession opens a DenseCache session of m that keeps its step graph
// (keep) or builds one per step.
func denseSession(t *testing.T, m *runtime.Model, keep bool) *runtime.Session {
	t.Helper()
	old := runtime.SetDenseStepGraphs(keep)
	defer runtime.SetDenseStepGraphs(old)
	s, err := m.NewSessionWith(runtime.DenseCache)
	require.NoError(t, err)
	return s
}
