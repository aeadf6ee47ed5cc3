package kvcache_test

import (
	"context"
	"math"
	"math/rand/v2"
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
// queries, keys and values for first+extra tokens.
func deviceSession(t *testing.T, first, extra int, pages []int) (ml.Backend, *kvcache.Paged, [3][]float32) {
	t.Helper()
	m, err := runtime.Open(context.Background(), testmodels.Random(t, "llama", "tiny", foundry.F32, 4, false), runtime.Options{Threads: 2, ContextLength: 256})
	require.NoError(t, err)
	t.Cleanup(func() { m.Close() })
	b := m.Backend()
	h, d, sp := kvcache.HostUploads, kvcache.DeviceUploads, kvcache.DeviceStagePages
	t.Cleanup(func() { kvcache.HostUploads, kvcache.DeviceUploads, kvcache.DeviceStagePages = h, d, sp })
	kvcache.HostUploads, kvcache.DeviceUploads, kvcache.DeviceStagePages = false, true, 8

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

	c, err := kvcache.NewPaged(kvcache.Options{Layout: tLayout, Heads: tHeads, Capacity: 256, MaxBatch: 96,
		Selector: &fixedSelector{c: cfg, groups: []paging.Group{{Budget: 48}}, pages: [][]int{pages}}, Prefix: writer.Store()})
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
	b, fresh, qkv := deviceSession(t, first, 1, []int{0, 2, 4})
	q, k, v := qkv[0][first*tHeads*tDim:], qkv[1][first*tKV*tDim:], qkv[2][first*tKV*tDim:]
	want := pass(t, b, fresh, first, q, k, v)
	for _, tc := range []struct {
		name    string
		outputs bool // call Outputs before computing, as arch.Model.Run does
		dropped bool // the graph is built, then closed without computing
		graphIn bool // DeviceUploads off: graph inputs
	}{{"outputs called", true, false, false}, {"outputs skipped", false, false, false},
		{"graph dropped", false, true, false}, {"graph dropped, graph inputs", false, true, true}} {
		t.Run(tc.name, func(t *testing.T) {
			b, c, _ := deviceSession(t, first, 1, []int{0, 2, 4})
			kvcache.DeviceUploads = !tc.graphIn // deviceSession restores it
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
			if tc.dropped { // (closed when the test returns)
				st := c.Stats()
				require.Equal(t, int64(4), st.Uploads)
				if tc.graphIn {
					require.Zero(t, st.DeviceStaged)
				} else {
					require.Equal(t, int64(4), st.DeviceStaged)
				}
				require.Equal(t, want, pass(t, b, c, first, q, k, v), "the pass again attends as one that never failed")
				require.Equal(t, int64(8), c.Stats().Uploads, "its four pages uploaded again")
				return
			}
			ctx.Forward(ts...).Compute(ts...)
			st := c.Stats()
			require.Equal(t, int64(4), st.Uploads, "the three selected pages and the batch's page (its first rows are the document's)")
			require.Equal(t, st.Uploads, st.DeviceStaged, "all through staging")
			err := c.Computed(ctx)
			require.NoError(t, c.CheckInvariants(), "nothing in flight, no pool row the host lacks")
			if tc.outputs {
				require.NoError(t, err)
				require.Equal(t, want[0], res.Floats())
				require.Equal(t, first+1, c.Store().Len())
				return
			}
			require.ErrorContains(t, err, "before Outputs waited for its device uploads")
			require.NotEqual(t, want[0], res.Floats(), "the graph read staging before the copies")
			require.Equal(t, first, c.Store().Len(), "the failed pass stored nothing")
			require.Equal(t, want, pass(t, b, c, first, q, k, v), "the pass again attends as one that never failed")
			require.Equal(t, int64(8), c.Stats().Uploads, "its four pages uploaded again")
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
