package kvcache_test

import (
	"context"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/model/input"
	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/paging"
	"github.com/kvrecall/kvrecall/runtime"
)

// deviceSession opens the tiny random llama and returns a document of
// first tokens and a session over it that reads pages through device
// staging (the CPU backend's pools with HostUploads off), with its random
// queries, keys and values for first+extra tokens. The session attends to
// pages (a page pool), or with tokens set to those tokens (a token pool:
// TokenStaging off, as on a GPU layer).
func deviceSession(t *testing.T, first, extra int, pages []int, tokens ...int32) (ml.Backend, *kvcache.Paged, [3][]float32) {
	t.Helper()
	m, err := runtime.Open(context.Background(), testmodels.Random(t, "llama", "tiny", foundry.F32, 4, false), runtime.Options{Threads: 2, ContextLength: 256})
	require.NoError(t, err)
	t.Cleanup(func() { m.Close() })
	b := m.Backend()
	h, d, sp, ts := kvcache.HostUploads, kvcache.DeviceUploads, kvcache.DeviceStagePages, kvcache.TokenStaging
	t.Cleanup(func() {
		kvcache.HostUploads, kvcache.DeviceUploads, kvcache.DeviceStagePages, kvcache.TokenStaging = h, d, sp, ts
	})
	kvcache.HostUploads, kvcache.DeviceUploads, kvcache.DeviceStagePages, kvcache.TokenStaging = false, true, 8, false

	r := rand.New(rand.NewPCG(7, 8))
	total := first + extra
	qkv := [3][]float32{randoms(r, total*tHeads*tDim), randoms(r, total*tKV*tDim), randoms(r, total*tKV*tDim)}
	cfg := paging.Config{PageSize: tPage, Sinks: 4, Window: 4}
	writer, err := kvcache.NewPaged(kvcache.Options{Layout: tLayout, Heads: tHeads, Capacity: 256, MaxBatch: 96,
		Selector: &fixedSelector{c: cfg, groups: []paging.Group{{}}, pages: [][]int{nil}}})
	require.NoError(t, err)
	t.Cleanup(writer.Close)
	writer.Init(b, ml.DTypeF16, 1, 256, 96)
	pass(t, b, writer, 0, qkv[0][:first*tHeads*tDim], qkv[1][:first*tKV*tDim], qkv[2][:first*tKV*tDim])

	var sel paging.Selector = &fixedSelector{c: cfg, groups: []paging.Group{{Budget: 48}}, pages: [][]int{pages}}
	if len(tokens) > 0 {
		sel = &funcTokenSelector{c: cfg, groups: []paging.Group{{Budget: 48, Tokens: true}},
			tok: func(_, upto int) []int32 {
				out := slices.Clone(tokens)
				for p := int32(first); p < int32(upto); p++ {
					out = append(out, p) // the question's own tokens
				}
				return out
			}}
	}
	c, err := kvcache.NewPaged(kvcache.Options{Layout: tLayout, Heads: tHeads, Capacity: 256, MaxBatch: 96,
		Selector: sel, Prefix: writer.Store()})
	require.NoError(t, err)
	t.Cleanup(c.Close)
	c.Init(b, ml.DTypeF16, 1, 256, 96)
	return b, c, qkv
}

// A graph that reads staging tensors must not compute while the copies
// into them may be in flight: Outputs waits for them, and Computed fails
// a pass whose graph computed before anything waited. The package's tests
// make the copies only at the wait (export_test.go), as an asynchronous
// device may: the failed pass attended stale rows. It keeps nothing, the
// slots it filled from staging are uploaded again, and the same position
// passed again attends as in a session that never failed. So does a pass
// whose graph was built and dropped, never computed, with its uploads
// staged or as graph inputs.
func TestDeviceUploadsWaitBeforeCompute(t *testing.T) {
	const first = 85
	tokens := []int32{0, 1, 2, 3, 20, 21, 22, 40, 41, 42, 43, 44, 60, 61, 62, 63, 64, 65, 66, 67}
	for _, tc := range []struct {
		name     string
		outputs  bool // call Outputs before computing, as arch.Model.Run does
		compute  bool // compute the graph (else it is built and dropped, or its compute panicked)
		graphIn  bool // DeviceUploads off: graph inputs
		tokenSel bool // a token pool (squeezed's groups on a GPU layer)
	}{
		{"outputs called", true, true, false, false},
		{"outputs skipped", false, true, false, false},
		{"outputs skipped, token pool", false, true, false, true},
		{"graph dropped", false, false, false, false},
		{"graph dropped, graph inputs", false, false, true, false},
		{"graph dropped, token pool", false, false, false, true},
		{"compute panicked after Outputs", true, false, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var toks []int32
			if tc.tokenSel {
				toks = tokens
			}
			b, fresh, qkv := deviceSession(t, first, 1, []int{0, 2, 4}, toks...)
			q, k, v := qkv[0][first*tHeads*tDim:], qkv[1][first*tKV*tDim:], qkv[2][first*tKV*tDim:]
			want := pass(t, b, fresh, first, q, k, v)
			b, c, _ := deviceSession(t, first, 1, []int{0, 2, 4}, toks...)
			kvcache.DeviceUploads = !tc.graphIn // deviceSession restores it
			uploaded := func() (all, staged int64) {
				st := c.Stats()
				return st.Uploads + st.TokenUploads, st.DeviceStaged + st.DeviceStagedTokens
			}
			ctx := b.NewContext()
			defer ctx.Close()
			require.NoError(t, c.StartForward(ctx, input.Batch{Positions: []int32{first}, Sequences: []int{0}}, false))
			c.SetLayer(0)
			out := c.Attention(ctx, 0, ctx.Input().FromFloats(q, tDim, tHeads, 1), ctx.Input().FromFloats(k, tDim, tKV, 1),
				ctx.Input().FromFloats(v, tDim, tKV, 1), 1/math.Sqrt(tDim))
			res := ctx.Input().Empty(ml.DTypeF32, tDim, tHeads, 1)
			ts := []ml.Tensor{out.Copy(ctx, res), res}
			if tc.outputs {
				ts = append(ts, c.Outputs(ctx)...)
			}
			n, staged := uploaded()
			switch {
			case tc.tokenSel:
				require.Equal(t, int64(len(tokens)), n, "the listed tokens of the document")
			default:
				require.Equal(t, int64(4), n, "the three selected pages and the batch's page (its first rows are the document's)")
			}
			if tc.graphIn {
				require.Zero(t, staged)
			} else {
				require.Equal(t, n, staged, "all through staging")
			}
			again := func() {
				require.Equal(t, want, pass(t, b, c, first, q, k, v), "the pass again attends as one that never failed")
				all, _ := uploaded()
				require.Equal(t, 2*n, all, "what it uploaded, uploaded again")
			}
			if !tc.compute { // (ctx is closed when the test returns)
				again()
				return
			}
			ctx.Forward(ts...).Compute(ts...)
			err := c.Computed(ctx)
			require.NoError(t, c.CheckInvariants(), "nothing in flight, no pool row the host lacks, no listed token freed")
			if tc.outputs {
				require.NoError(t, err)
				require.Equal(t, want[0], res.Floats())
				require.Equal(t, first+1, c.Store().Len())
				return
			}
			require.ErrorContains(t, err, "before Outputs waited for its device uploads")
			require.NotEqual(t, want[0], res.Floats(), "the graph read staging before the copies")
			require.Equal(t, first, c.Store().Len(), "the failed pass stored nothing")
			again()
		})
	}
}

// The pools, their staging tensors and quest's key boxes (the summaries
// scored in the graph) are made in contexts bound to their layer
// (ml.Context.Layer), so they live where the layer's weights do: a GPU
// layer's in GPU memory, where the graph's scoring and attention ops then
// run. ollama's backend adds each such tensor to its device's per-layer
// cache memory; on the CPU backend that is the CPU's entry, and it grows by
// exactly those bytes (and nothing lands in the other layers' entries).
func TestPoolsAndStagingInTheirLayersMemory(t *testing.T) {
	check := func(t *testing.T, b ml.Backend, run func() kvcache.Stats) {
		bm, ok := b.(interface{ BackendMemory() ml.BackendMemory })
		require.True(t, ok, "ollama's ggml backend reports its memory")
		before := append([]uint64(nil), bm.BackendMemory().CPU.Cache...)
		st := run()
		require.Positive(t, st.DeviceStaged)
		require.Positive(t, st.StagingBytes)
		after := bm.BackendMemory().CPU.Cache
		require.Len(t, after, len(before))
		for l := range after {
			want := uint64(0)
			if l == 0 { // tLayout has one layer
				want = uint64(st.ResidentBytes + st.StagingBytes + st.SummaryBytes)
			}
			require.Equal(t, want, after[l]-before[l], "layer %d's cache memory", l)
		}
	}
	t.Run("pools and staging", func(t *testing.T) {
		b, c, qkv := deviceSession(t, 85, 1, []int{0, 2, 4})
		check(t, b, func() kvcache.Stats {
			pass(t, b, c, 85, qkv[0][85*tHeads*tDim:], qkv[1][85*tKV*tDim:], qkv[2][85*tKV*tDim:])
			st := c.Stats()
			require.Equal(t, int64(4), st.DeviceStaged, "the three selected pages and the batch's page")
			require.Zero(t, st.SummaryBytes)
			return st
		})
	})
	t.Run("quest: pools, staging and key boxes", func(t *testing.T) {
		b, _, _ := deviceSession(t, 16, 0, nil)
		defer func(h bool) { kvcache.HostBounds = h }(kvcache.HostBounds)
		kvcache.HostBounds = false
		inner, err := paging.New("quest", paging.Config{PageSize: tPage, Budget: 8 * tPage, Sinks: tPage, Window: 2 * tPage,
			Options: map[string]any{paging.KeepLogits: 0.0}})
		require.NoError(t, err)
		// The prompt in batches of 32: pools of the budget's pages plus a
		// few, so that decode steps upload the pages they newly select.
		const prompt, steps, batch = 320, 30, 32
		c, err := kvcache.NewPaged(kvcache.Options{Layout: tLayout, Heads: tHeads, Selector: inner, Capacity: prompt + steps, MaxBatch: batch})
		require.NoError(t, err)
		defer c.Close()
		r := rand.New(rand.NewPCG(5, 6))
		check(t, b, func() kvcache.Stats {
			c.Init(b, ml.DTypeF16, 1, prompt+steps, batch)
			for pos := 0; pos < prompt; pos += batch {
				passQueries(t, b, c, pos, randoms(r, batch*tHeads*tDim), pageOffsetKeys(r, pos, batch), randoms(r, batch*tKV*tDim))
			}
			for pos := prompt; pos < prompt+steps; pos++ {
				passQueries(t, b, c, pos, randoms(r, tHeads*tDim), pageOffsetKeys(r, pos, 1), randoms(r, tKV*tDim))
			}
			st := c.Stats()
			require.Positive(t, st.SummaryBytes)
			return st
		})
	})
}

// quest's key boxes outside host memory (HostBounds off, as on a GPU
// layer) get their changed rows copied in the graph. A decode step whose
// graph is built and dropped had marked those rows uploaded: the next
// pass uploads the box tensor again, so every later bound equals a
// session's that never dropped a graph (without that, the last page's
// box stays one token behind).
func TestDroppedGraphReuploadsKeyBoxes(t *testing.T) {
	b, _, _ := deviceSession(t, 16, 0, nil)
	defer func(h bool) { kvcache.HostBounds = h }(kvcache.HostBounds)
	kvcache.HostBounds = false
	const prompt, steps, batch, drop = 320, 12, 32, 4
	run := func(dropAt int) map[int][]float32 {
		inner, err := paging.New("quest", paging.Config{PageSize: tPage, Budget: 8 * tPage, Sinks: tPage, Window: 2 * tPage,
			Options: map[string]any{paging.KeepLogits: 0.0}})
		require.NoError(t, err)
		sel := &boundsRecorder{Selector: inner, gs: inner.(paging.GraphScored), scores: map[int][]float32{}}
		c, err := kvcache.NewPaged(kvcache.Options{Layout: tLayout, Heads: tHeads, Selector: sel, Capacity: prompt + steps, MaxBatch: batch})
		require.NoError(t, err)
		defer c.Close()
		c.Init(b, ml.DTypeF16, 1, prompt+steps, batch)
		r := rand.New(rand.NewPCG(5, 6))
		for pos := 0; pos < prompt; pos += batch {
			passQueries(t, b, c, pos, randoms(r, batch*tHeads*tDim), pageOffsetKeys(r, pos, batch), randoms(r, batch*tKV*tDim))
		}
		for i := 0; i < steps; i++ {
			pos := prompt + i
			q, k, v := randoms(r, tHeads*tDim), pageOffsetKeys(r, pos, 1), randoms(r, tKV*tDim)
			if i == dropAt {
				ctx := b.NewContext()
				require.NoError(t, c.StartForward(ctx, input.Batch{Positions: []int32{int32(pos)}, Sequences: []int{0}}, false))
				require.False(t, c.NeedQueries(0), "a decode step scores in the graph")
				c.SetLayer(0)
				c.Attention(ctx, 0, ctx.Input().FromFloats(q, tDim, tHeads, 1), ctx.Input().FromFloats(k, tDim, tKV, 1),
					ctx.Input().FromFloats(v, tDim, tKV, 1), 1/math.Sqrt(tDim))
				ctx.Close() // built, never computed
			}
			passQueries(t, b, c, pos, q, k, v)
		}
		return sel.scores
	}
	want, got := run(-1), run(drop)
	require.Len(t, got, len(want))
	require.Equal(t, want, got)
}

// A graph reads a pool's staging tensors when it computes, so they take
// one upload per graph: a second in the same graph is refused (it takes
// graph inputs), the next graph's is granted.
func TestStagingOncePerGraph(t *testing.T) {
	b, c, qkv := deviceSession(t, 85, 1, []int{0, 2, 4})
	pass(t, b, c, 85, qkv[0][85*tHeads*tDim:], qkv[1][85*tKV*tDim:], qkv[2][85*tKV*tDim:])
	ctx := b.NewContext()
	defer ctx.Close()
	first, second, next := c.StageTwice(ctx)
	require.True(t, first)
	require.False(t, second, "the same graph")
	require.True(t, next, "the next graph")
}
