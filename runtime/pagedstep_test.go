package runtime_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/paging"
	"github.com/kvrecall/kvrecall/runtime"
)

// pagedStepMethods are the methods the kept paged step graph is checked
// with: 16-token pages, a 128-token budget (8 pages) over a 600-token
// document, so that selections churn and pages open every 16 steps.
var pagedStepMethods = []struct {
	name string
	opts runtime.PolicyOptions
}{
	{"dense", runtime.PolicyOptions{Policy: "dense"}},
	{"window", runtime.PolicyOptions{Policy: "window", Budget: 128, Sinks: 16, Window: 32}},
	{"retro", runtime.PolicyOptions{Policy: "retro", Budget: 128, Sinks: 16, Window: 32}},
	{"quest", runtime.PolicyOptions{Policy: "quest", Budget: 128, Sinks: 16, Window: 32}},
	{"quest-no-hysteresis", runtime.PolicyOptions{Policy: "quest", Budget: 128, Sinks: 16, Window: 32,
		Extra: map[string]any{paging.KeepLogits: 0.0}}},
	// probe's window of queries is at least its 256-token block.
	{"probe", runtime.PolicyOptions{Policy: "probe", Budget: 384, Sinks: 16, Window: 256}},
	{"retro+heads", runtime.PolicyOptions{Policy: "retro+heads", Budget: 128, Sinks: 16, Window: 32}},
}

// pagedStepModel opens the tiny random model with 16-token pages and a
// "half" head profile (for +heads), and ingests a 600-token document.
func pagedStepModel(t *testing.T, capacity int) (*runtime.Model, *runtime.Document, []int32) {
	t.Helper()
	path := testmodels.Random(t, "llama", "tiny", foundry.F32, 3, false)
	ctx := context.Background()
	m, err := runtime.Open(ctx, path, runtime.Options{Threads: 1, ContextLength: capacity, BatchSize: 64, PageSize: 16, DataDir: t.TempDir()})
	require.NoError(t, err)
	t.Cleanup(m.Close)
	require.NoError(t, runtime.ApplyHeadProfile(m, "half"))
	vocab := m.Config().Vocab
	toks := make([]int32, capacity)
	for i := range toks {
		toks[i] = int32((i*7919+13)%(vocab-3) + 3)
	}
	doc, err := m.IngestTokens(ctx, "doc", toks[:600], nil)
	require.NoError(t, err)
	return m, doc, toks
}

// pagedDocSession opens a session of doc under opts that keeps its step
// graph (keep) or builds one per step.
func pagedDocSession(t *testing.T, m *runtime.Model, doc *runtime.Document, opts runtime.PolicyOptions, keep bool) *runtime.Session {
	t.Helper()
	old := runtime.SetPagedStepGraphs(keep)
	defer runtime.SetPagedStepGraphs(old)
	s, err := m.DocumentSession(doc, opts)
	require.NoError(t, err)
	return s
}

// A kept paged step graph gives the logits and page selections of a graph
// built for every step, bit for bit, for every method: over steps that
// open new pages, cross quest's 16-row padding of its bound (38 pages at
// the question, 50 at the end), follow a truncation and a question batch,
// and with another session's larger graph computed between two steps
// (it moves the shared compute buffer under the kept graph's intermediate
// tensors). The cache's invariants hold after every step, and the graph
// is kept: far fewer builds than steps.
func TestPagedStepGraphMatchesFreshGraph(t *testing.T) {
	ctx := context.Background()
	m, doc, toks := pagedStepModel(t, 1000)
	for _, tc := range pagedStepMethods {
		t.Run(tc.name, func(t *testing.T) {
			kept := pagedDocSession(t, m, doc, tc.opts, true)
			defer kept.Close()
			fresh := pagedDocSession(t, m, doc, tc.opts, false)
			defer fresh.Close()
			require.Equal(t, -1, runtime.PagedStepBuilds(fresh), "no kept graph when turned off")
			other, err := m.NewSessionWith(runtime.DenseCache)
			require.NoError(t, err)
			defer other.Close()
			kc, fc := kept.Cache().(*kvcache.Paged), fresh.Cache().(*kvcache.Paged)
			layers := m.Config().Layers
			steps := 0
			same := func(what string, tokens []int32) {
				t.Helper()
				requireSameLogits(t, ctx, what, kept, fresh, tokens, false)
				for l := range layers {
					require.Equal(t, fc.Selected(l), kc.Selected(l), "%s at %d: layer %d's pages", what, kept.Len(), l)
				}
				require.NoError(t, kc.CheckInvariants(), what)
				require.NoError(t, fc.CheckInvariants(), what)
				if len(tokens) == 1 {
					steps++
				}
			}
			same("question", toks[600:608])
			for i := 608; i < 700; i++ {
				if i == 650 {
					_, err := other.Eval(ctx, toks[:400], false, nil)
					require.NoError(t, err)
				}
				same("step", toks[i:i+1])
			}
			require.NoError(t, kept.Truncate(680))
			require.NoError(t, fresh.Truncate(680))
			for i := 680; i < 720; i++ {
				same("step after truncating to 680", toks[i:i+1])
			}
			same("question batch between steps", toks[720:726])
			for i := 726; i < 800; i++ {
				same("step after a question batch", toks[i:i+1])
			}
			builds := runtime.PagedStepBuilds(kept)
			t.Logf("%d steps, %d graphs built", steps, builds)
			require.True(t, runtime.PagedStepKept(kept))
			require.Positive(t, builds)
			require.Less(t, builds, steps/3, "the step graph is built again far more often than its shape changes")
		})
	}
}

// Sessions that start empty (no document) take one-token steps from
// position 0, before any page is full and before a selection is smaller
// than the sequence: the kept graph matches graphs built for every step
// there too, and after a prefill.
func TestPagedStepGraphFromEmpty(t *testing.T) {
	ctx := context.Background()
	m, _, toks := pagedStepModel(t, 800)
	for _, tc := range pagedStepMethods {
		if tc.name == "probe" {
			continue // probe needs a document's representatives
		}
		t.Run(tc.name, func(t *testing.T) {
			newSession := func(keep bool) *runtime.Session {
				old := runtime.SetPagedStepGraphs(keep)
				defer runtime.SetPagedStepGraphs(old)
				s, err := m.NewSessionWith(runtime.PagedCache(tc.opts))
				require.NoError(t, err)
				return s
			}
			kept, fresh := newSession(true), newSession(false)
			defer kept.Close()
			defer fresh.Close()
			for i := 0; i < 40; i++ {
				requireSameLogits(t, ctx, fmt.Sprintf("step %d from empty", i), kept, fresh, toks[i:i+1], false)
			}
			requireSameLogits(t, ctx, "prefill", kept, fresh, toks[40:200], false)
			for i := 200; i < 300; i++ {
				requireSameLogits(t, ctx, fmt.Sprintf("step %d", i), kept, fresh, toks[i:i+1], false)
			}
			require.NoError(t, kept.Cache().(*kvcache.Paged).CheckInvariants())
			require.Positive(t, runtime.PagedStepBuilds(kept))
			require.Less(t, runtime.PagedStepBuilds(kept), 70, "140 steps")
		})
	}
}

// A paged step graph that reads a tensor outside host memory (a
// multi-backend scheduler would split it) is not kept: the session builds
// each step's graph, with the same logits, and stops trying.
func TestPagedStepGraphFallsBackOffHost(t *testing.T) {
	ctx := context.Background()
	m, doc, toks := pagedStepModel(t, 800)
	opts := runtime.PolicyOptions{Policy: "quest", Budget: 128, Sinks: 16, Window: 32}
	fresh := pagedDocSession(t, m, doc, opts, false)
	defer fresh.Close()
	off := pagedDocSession(t, m, doc, opts, true)
	defer off.Close()
	require.True(t, runtime.PagedStepKept(off), "kept graphs are the default")
	old := runtime.SetStepGraphHostOnly(false)
	defer runtime.SetStepGraphHostOnly(old)
	requireSameLogits(t, ctx, "question", off, fresh, toks[600:608], false)
	for i := 608; i < 640; i++ {
		requireSameLogits(t, ctx, fmt.Sprintf("step %d", i), off, fresh, toks[i:i+1], false)
	}
	require.False(t, runtime.PagedStepKept(off), "a graph not all in host memory: no kept graphs")
	require.Zero(t, runtime.PagedStepBuilds(off), "no kept graph was built")
	require.NoError(t, off.Cache().(*kvcache.Paged).CheckInvariants())
}

// A kept build that fails for another reason than memory off the host
// falls back to graphs built for every step (the same logits, nothing
// kept), and a kept step that fails after writing its inputs loses only
// that step: the session builds a new graph and goes on with the logits
// of graphs built for every step.
func TestPagedStepGraphFailures(t *testing.T) {
	ctx := context.Background()
	m, doc, toks := pagedStepModel(t, 800)
	opts := runtime.PolicyOptions{Policy: "quest", Budget: 128, Sinks: 16, Window: 32}
	injected := errors.New("injected")
	t.Run("build", func(t *testing.T) {
		fresh := pagedDocSession(t, m, doc, opts, false)
		defer fresh.Close()
		kept := pagedDocSession(t, m, doc, opts, true)
		defer kept.Close()
		old := runtime.SetPagedStepFault(func(stage string) error {
			if stage == "build" {
				return injected
			}
			return nil
		})
		defer runtime.SetPagedStepFault(old)
		requireSameLogits(t, ctx, "question", kept, fresh, toks[600:608], false)
		for i := 608; i < 640; i++ {
			requireSameLogits(t, ctx, fmt.Sprintf("step %d", i), kept, fresh, toks[i:i+1], false)
		}
		require.False(t, runtime.PagedStepKept(kept), "a failed build: no kept graphs")
		require.Zero(t, runtime.PagedStepBuilds(kept))
		require.NoError(t, kept.Cache().(*kvcache.Paged).CheckInvariants())
	})
	t.Run("step", func(t *testing.T) {
		fresh := pagedDocSession(t, m, doc, opts, false)
		defer fresh.Close()
		kept := pagedDocSession(t, m, doc, opts, true)
		defer kept.Close()
		requireSameLogits(t, ctx, "question", kept, fresh, toks[600:608], false)
		for i := 608; i < 616; i++ {
			requireSameLogits(t, ctx, fmt.Sprintf("step %d", i), kept, fresh, toks[i:i+1], false)
		}
		builds := runtime.PagedStepBuilds(kept)
		require.Positive(t, builds)
		old := runtime.SetPagedStepFault(func(stage string) error {
			if stage == "step" {
				return injected
			}
			return nil
		})
		_, err := kept.Eval(ctx, toks[616:617], false, nil)
		runtime.SetPagedStepFault(old)
		require.ErrorIs(t, err, injected)
		require.Equal(t, 616, kept.Len(), "the failed step is not in the session")
		require.NoError(t, kept.Cache().(*kvcache.Paged).CheckInvariants())
		for i := 616; i < 640; i++ {
			requireSameLogits(t, ctx, fmt.Sprintf("step %d", i), kept, fresh, toks[i:i+1], false)
		}
		require.True(t, runtime.PagedStepKept(kept), "a failed step does not stop keeping graphs")
		require.Greater(t, runtime.PagedStepBuilds(kept), builds, "the failed step's graph was closed and built again")
		require.NoError(t, kept.Cache().(*kvcache.Paged).CheckInvariants())
	})
}

// Steps the kept path declines (box rows and page uploads copied in the
// graph: HostBounds, HostUploads off) run fresh graphs that write the
// same pools and box tensors; when the kept path is allowed again the
// kept graph, still valid for its key, is reused with what they wrote.
func TestPagedStepGraphAfterDeclinedSteps(t *testing.T) {
	ctx := context.Background()
	m, doc, toks := pagedStepModel(t, 800)
	for _, flag := range []struct {
		name string
		v    *bool
	}{{"HostBounds", &kvcache.HostBounds}, {"HostUploads", &kvcache.HostUploads}} {
		t.Run(flag.name, func(t *testing.T) {
			opts := runtime.PolicyOptions{Policy: "quest", Budget: 128, Sinks: 16, Window: 32, Extra: map[string]any{paging.KeepLogits: 0.0}}
			fresh := pagedDocSession(t, m, doc, opts, false)
			defer fresh.Close()
			kept := pagedDocSession(t, m, doc, opts, true)
			defer kept.Close()
			requireSameLogits(t, ctx, "question", kept, fresh, toks[600:608], false)
			defer func(old bool) { *flag.v = old }(*flag.v)
			for i := 608; i < 680; i++ {
				// 20 steps kept, 20 declined, then kept again.
				*flag.v = i < 628 || i >= 648
				requireSameLogits(t, ctx, fmt.Sprintf("step %d (%s %v)", i, flag.name, *flag.v), kept, fresh, toks[i:i+1], false)
				require.NoError(t, kept.Cache().(*kvcache.Paged).CheckInvariants(), "step %d", i)
			}
			require.True(t, runtime.PagedStepKept(kept))
			require.Positive(t, runtime.PagedStepBuilds(kept))
		})
	}
}

// Sessions of several methods decoding at once each keep their own step
// graph: their logits are those of the same steps taken one session after
// the other with graphs built for every step. Run under -race as well.
func TestPagedStepGraphConcurrent(t *testing.T) {
	ctx := context.Background()
	m, doc, toks := pagedStepModel(t, 1000)
	methods := []runtime.PolicyOptions{pagedStepMethods[1].opts, pagedStepMethods[2].opts, pagedStepMethods[3].opts, pagedStepMethods[6].opts}
	const steps = 150
	run := func(s *runtime.Session, k int, builds *int) ([][]float32, error) {
		defer s.Close()
		// Each session its own question and steps.
		q := make([]int32, 8+steps)
		for i := range q {
			q[i] = toks[600+(i*(k+3))%380]
		}
		if _, err := s.Eval(ctx, q[:8], false, nil); err != nil {
			return nil, err
		}
		var out [][]float32
		for i := 8; i < len(q); i++ {
			rows, err := s.Eval(ctx, q[i:i+1], false, nil)
			if err != nil {
				return nil, err
			}
			out = append(out, rows[0])
		}
		if err := s.Cache().(*kvcache.Paged).CheckInvariants(); err != nil {
			return nil, err
		}
		*builds = runtime.PagedStepBuilds(s)
		return out, nil
	}
	want := make([][][]float32, len(methods))
	for k, o := range methods {
		var err error
		var b int
		want[k], err = run(pagedDocSession(t, m, doc, o, false), k, &b)
		require.NoError(t, err)
	}
	got := make([][][]float32, len(methods))
	errs := make([]error, len(methods))
	builds := make([]int, len(methods))
	var wg sync.WaitGroup
	for k, o := range methods {
		s := pagedDocSession(t, m, doc, o, true) // made here: the setting is not for goroutines to change
		wg.Add(1)
		go func() {
			defer wg.Done()
			got[k], errs[k] = run(s, k, &builds[k])
		}()
	}
	wg.Wait()
	for k := range got {
		require.NoError(t, errs[k], "session %d", k)
		require.Len(t, got[k], steps)
		require.Positive(t, builds[k], "session %d kept no graph", k)
		for i := range want[k] {
			require.Equal(t, want[k][i], got[k][i], "session %d (%s), step %d: logits differ", k, methods[k].Policy, i)
		}
	}
}

// Models whose windowed layers the paged cache limits itself (gemma3:
// windowed groups, slideMask) and whose scores it caps (gemma2: the
// soft-capped attention) keep their step graph too, bit for bit with
// graphs built for every step. quest on gemma3 scores each step's queries
// on the host (the sliding-window wrapper does not score in the graph):
// every step splits, so none is kept, and the steps built for the pass
// give the same logits.
func TestPagedStepGraphWindowedModels(t *testing.T) {
	ctx := context.Background()
	for _, c := range []struct {
		name, arch, preset string
		seed               uint64
		policy             runtime.PolicyOptions
		kept               bool // the steps take the kept graph
	}{
		{"gemma3 retro", "gemma3", "gemma3-tiny", 9, runtime.PolicyOptions{Policy: "retro", Budget: 128, Sinks: 16, Window: 32}, true},
		{"gemma3 quest (splits: not kept)", "gemma3", "gemma3-tiny", 9, runtime.PolicyOptions{Policy: "quest", Budget: 128, Sinks: 16, Window: 32}, false},
		{"gemma2 retro (soft-capped)", "gemma2", "gemma2-tiny", 8, runtime.PolicyOptions{Policy: "retro", Budget: 128, Sinks: 16, Window: 32}, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := testmodels.Random(t, c.arch, c.preset, foundry.F32, c.seed, false)
			m, err := runtime.Open(ctx, path, runtime.Options{Threads: 1, ContextLength: 600, BatchSize: 96, PageSize: 16, DataDir: t.TempDir()})
			require.NoError(t, err)
			defer m.Close()
			require.True(t, m.Config().SlidingWindow > 0 || m.Config().AttnSoftcap > 0, "the model needs windowed layers or capped scores")
			newSession := func(keep bool) *runtime.Session {
				old := runtime.SetPagedStepGraphs(keep)
				defer runtime.SetPagedStepGraphs(old)
				s, err := m.NewSessionWith(runtime.PagedCache(c.policy))
				require.NoError(t, err)
				return s
			}
			kept, fresh := newSession(true), newSession(false)
			defer kept.Close()
			defer fresh.Close()
			toks := make([]int32, 500)
			for i := range toks {
				toks[i] = int32(3 + (i*131)%500)
			}
			requireSameLogits(t, ctx, "prompt", kept, fresh, toks[:300], false)
			for i := 300; i < 450; i++ {
				requireSameLogits(t, ctx, fmt.Sprintf("step %d", i), kept, fresh, toks[i:i+1], false)
			}
			require.NoError(t, kept.Cache().(*kvcache.Paged).CheckInvariants())
			builds := runtime.PagedStepBuilds(kept)
			t.Logf("150 steps, %d graphs built", builds)
			require.True(t, runtime.PagedStepKept(kept))
			if !c.kept {
				require.Zero(t, builds, "a split step cannot be kept")
				return
			}
			require.Positive(t, builds)
			require.Less(t, builds, 50)
		})
	}
}
