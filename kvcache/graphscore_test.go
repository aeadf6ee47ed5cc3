package kvcache_test

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/model/input"
	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/paging"
	"github.com/kvrecall/kvrecall/runtime"
)

// boundsRecorder is a quest selector that also records the page bounds the
// cache computes in the graph, by the upto of the pass that scored them.
type boundsRecorder struct {
	paging.Selector
	gs     paging.GraphScored
	scores map[int][]float32
}

func (r *boundsRecorder) UseGraphScores() bool { return r.gs.UseGraphScores() }
func (r *boundsRecorder) GraphScores(layer, batch, upto int) bool {
	return r.gs.GraphScores(layer, batch, upto)
}
func (r *boundsRecorder) Scored(layer int, s []float32, upto int) {
	r.scores[upto] = slices.Clone(s)
	r.gs.Scored(layer, s, upto)
}

// passQueries is pass for a cache whose selector may need the queries on
// the host first (a question under quest): they are handed over as the
// split graph of arch.Model.Run would.
func passQueries(t *testing.T, b ml.Backend, c *kvcache.Paged, pos0 int, q, k, v []float32) []float32 {
	t.Helper()
	n := len(q) / (tHeads * tDim)
	ctx := b.NewContext()
	defer ctx.Close()
	positions := make([]int32, n)
	for i := range positions {
		positions[i] = int32(pos0 + i)
	}
	require.NoError(t, c.StartForward(ctx, input.Batch{Positions: positions, Sequences: make([]int, n)}, false))
	c.SetLayer(0)
	if c.NeedQueries(0) {
		rows := make([][]float32, n)
		for i := range rows {
			rows[i] = q[i*tHeads*tDim : (i+1)*tHeads*tDim]
		}
		require.NoError(t, c.SetQueries(0, rows))
	}
	out := c.Attention(ctx, 0, ctx.Input().FromFloats(q, tDim, tHeads, n),
		ctx.Input().FromFloats(k, tDim, tKV, n), ctx.Input().FromFloats(v, tDim, tKV, n), 1/math.Sqrt(tDim))
	res := ctx.Input().Empty(ml.DTypeF32, tDim, tHeads, n)
	ts := append([]ml.Tensor{out.Copy(ctx, res), res}, c.Outputs(ctx)...)
	ctx.Forward(ts...).Compute(ts...)
	require.NoError(t, c.Computed(ctx))
	require.NoError(t, c.CheckInvariants())
	return res.Floats()
}

// Decode steps under quest compute Quest's bounds in the graph (no host
// round trip of queries): on the CPU backend they equal the host scorer's
// (paging.QuestBounds) on the same summaries and query, the best pages
// are the same, the step's attention is unchanged (against float64
// attention over its pages), and the next step selects sinks, window and
// the best pages by them (KeepLogits 0). Decode steps grow the box tensor past its
// first size and cross page boundaries (incremental box uploads).
func TestGraphBoundsMatchHostScorer(t *testing.T) {
	m, err := runtime.Open(context.Background(), testmodels.Random(t, "llama", "tiny", foundry.F32, 4, false), runtime.Options{Threads: 2, ContextLength: 256})
	require.NoError(t, err)
	defer m.Close()
	b := m.Backend()
	for _, tc := range []struct {
		name          string
		prompt, steps int
		next          bool // also plan each next step, then roll it back (Remove: a new store epoch)
	}{
		{"short document", 600, 24, true},
		{"box tensor grows", 1020, 40, true}, // 64 pages of room at first, 66 at the end
		// Plain decoding: the store only appends, so each upload looks at
		// the pages from the last one on (Store.epoch); every page it
		// skips must still hold its latest summary.
		{"decode without rollbacks", 600, 70, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const budget = 8 * tPage // sinks (1 page) + window (2–3 pages) + 4–5 scored
			cfg := paging.Config{PageSize: tPage, Budget: budget, Sinks: tPage, Window: 2 * tPage,
				Options: map[string]any{paging.KeepLogits: 0.0}}
			inner, err := paging.New("quest", cfg)
			require.NoError(t, err)
			sel := &boundsRecorder{Selector: inner, gs: inner.(paging.GraphScored), scores: map[int][]float32{}}
			capacity := tc.prompt + tc.steps + 1
			c, err := kvcache.NewPaged(kvcache.Options{Layout: tLayout, Heads: tHeads, Selector: sel, Capacity: capacity, MaxBatch: tc.prompt})
			require.NoError(t, err)
			defer c.Close()
			c.Init(b, ml.DTypeF16, 1, capacity, tc.prompt)

			r := rand.New(rand.NewPCG(3, 4))
			keys := func(pos0, n int) []float32 { return pageOffsetKeys(r, pos0, n) }
			n := tc.prompt
			allK, allV := keys(0, n), randoms(r, n*tKV*tDim)
			passQueries(t, b, c, 0, randoms(r, n*tHeads*tDim), allK, allV)
			require.Empty(t, sel.scores, "the question is scored on the host")

			checked := 0
			for step := 0; step < tc.steps; step++ {
				pos := tc.prompt + step
				q := randoms(r, tHeads*tDim)
				// The host scorer on the summaries the graph's boxes hold
				// (before this step's key is written).
				pages := paging.PagesOf(pos+1, tPage)
				want := paging.QuestBounds(c.Store().Summaries(0), &paging.Queries{Q: [][]float32{q}, Heads: tHeads}, pages)[0]
				k, v := keys(pos, 1), randoms(r, tKV*tDim)
				allK, allV = append(allK, k...), append(allV, v...)
				out := passQueries(t, b, c, pos, q, k, v)
				// Scoring in the graph leaves the attention of the step
				// alone (its queries included): float64 attention over the
				// pages it selected.
				attended := c.Selected(0)
				ref := reference(q, allK, allV, pos, func(_, page int) bool { return slices.Contains(attended, page) })[0]
				worst := 0.0
				for j := range out {
					worst = math.Max(worst, math.Abs(float64(out[j])-ref[j]))
				}
				require.Less(t, worst, 2e-3, "step %d: attention over pages %v", step, attended)
				got, ok := sel.scores[pos+1]
				require.True(t, ok, "step %d computed no bounds in the graph", step)
				require.Len(t, got, pages)
				done := pos / tPage // pages with no token of this step: the same summaries on both sides
				scale := 0.0
				for p := 0; p < done; p++ {
					scale = math.Max(scale, math.Abs(float64(want[p])))
				}
				for p := 0; p < done; p++ {
					require.InDelta(t, want[p], got[p], 1e-5*scale, "step %d page %d", step, p)
				}
				// The same best pages (the bounds differ by rounding only).
				req, free := cfg.Required(pos + 1)
				best := func(s []float32) []int {
					var ps []int
					for p := 0; p < done; p++ {
						if !slices.Contains(req, p) {
							ps = append(ps, p)
						}
					}
					slices.SortStableFunc(ps, func(a, b int) int {
						switch {
						case s[a] > s[b]:
							return -1
						case s[a] < s[b]:
							return 1
						}
						return 0
					})
					return ps[:free]
				}
				require.ElementsMatch(t, best(want), best(got), "step %d", step)
				if !tc.next {
					checked++
					continue
				}

				// The next step attends to sinks, window and the best pages
				// by these bounds.
				ctx := b.NewContext()
				require.NoError(t, c.StartForward(ctx, input.Batch{Positions: []int32{int32(pos + 1)}, Sequences: []int{0}}, false))
				require.False(t, c.NeedQueries(0), "a decode step must not split the graph")
				nreq, nfree := cfg.Required(pos + 2)
				wantSel := slices.Clone(nreq)
				for _, p := range best(got) {
					if len(wantSel) < len(nreq)+nfree && !slices.Contains(wantSel, p) {
						wantSel = append(wantSel, p)
					}
				}
				slices.Sort(wantSel)
				if done == pages-1 && nfree == free && slices.Equal(nreq, req) {
					require.Equal(t, wantSel, c.Selected(0), "step %d", step)
					checked++
				}
				require.NoError(t, c.Remove(0, int32(pos+1), math.MaxInt32))
				ctx.Close()
			}
			require.Positive(t, checked)
		})
	}
}

// The CPU backend's faster quest step (box rows written into host memory,
// HostBounds; the mul_mat's rows padded to a multiple of 16, so that ggml
// takes tinyBLAS at any page count) selects the same pages as the step
// before it (box rows copied in the graph, the mul_mat over exactly the
// pages) at every decode step, with and without hysteresis: the same
// bounds bit for bit where the page count is a multiple of 4 (both took
// tinyBLAS, which sums each dot product in the same order whatever its
// tile), else within rounding (the old path summed them with ggml's
// vec_dot), and the same attention outputs.
func TestQuestFastPathSelectsSamePages(t *testing.T) {
	m, err := runtime.Open(context.Background(), testmodels.Random(t, "llama", "tiny", foundry.F32, 4, false), runtime.Options{Threads: 2, ContextLength: 256})
	require.NoError(t, err)
	defer m.Close()
	b := m.Backend()
	type result struct {
		sels       [][]int
		bounds     map[int][]float32
		outs       [][]float32
		hostWrites time.Duration // Stats.HostWrites after the steps
		staged     int64         // Stats.DeviceStaged after the steps
	}
	run := func(t *testing.T, keep float64, prompt, steps int, host bool, rowMultiple int) result {
		defer func(h bool, m int) { kvcache.HostBounds, kvcache.BoxRowMultiple = h, m }(kvcache.HostBounds, kvcache.BoxRowMultiple)
		kvcache.HostBounds, kvcache.BoxRowMultiple = host, rowMultiple
		cfg := paging.Config{PageSize: tPage, Budget: 8 * tPage, Sinks: tPage, Window: 2 * tPage,
			Options: map[string]any{paging.KeepLogits: keep}}
		inner, err := paging.New("quest", cfg)
		require.NoError(t, err)
		sel := &boundsRecorder{Selector: inner, gs: inner.(paging.GraphScored), scores: map[int][]float32{}}
		capacity := prompt + steps + 1
		c, err := kvcache.NewPaged(kvcache.Options{Layout: tLayout, Heads: tHeads, Selector: sel, Capacity: capacity, MaxBatch: prompt})
		require.NoError(t, err)
		defer c.Close()
		c.Init(b, ml.DTypeF16, 1, capacity, prompt)
		r := rand.New(rand.NewPCG(11, 12))
		keys := func(pos0, n int) []float32 { return pageOffsetKeys(r, pos0, n) }
		passQueries(t, b, c, 0, randoms(r, prompt*tHeads*tDim), keys(0, prompt), randoms(r, prompt*tKV*tDim))
		res := result{bounds: sel.scores}
		for step := 0; step < steps; step++ {
			pos := prompt + step
			out := passQueries(t, b, c, pos, randoms(r, tHeads*tDim), keys(pos, 1), randoms(r, tKV*tDim))
			res.sels = append(res.sels, slices.Clone(c.Selected(0)))
			res.outs = append(res.outs, out)
		}
		res.hostWrites, res.staged = c.Stats().HostWrites, c.Stats().DeviceStaged
		// The box tensors: f32 [2·headDim, rows, kvHeads] per layer,
		// with room for every page and at most doubled headroom.
		perRow := int64(2*tDim*tKV*4) * int64(tLayout.Layers)
		pages := int64((capacity + tPage - 1) / tPage)
		sum := c.Stats().SummaryBytes
		require.Zero(t, sum%perRow)
		require.GreaterOrEqual(t, sum, perRow*pages, "room for every page's box")
		require.LessOrEqual(t, sum, perRow*(max(64, 2*pages)+int64(rowMultiple)))
		return res
	}
	for _, tc := range []struct {
		name          string
		keep          float64
		prompt, steps int
	}{
		{"default hysteresis", paging.DefaultKeepLogits, 600, 160},
		{"no hysteresis", 0, 600, 160},
		{"box tensor grows", 0, 1000, 60}, // 63 pages at the question, 67 at the end
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := run(t, tc.keep, tc.prompt, tc.steps, false, 1)
			after := run(t, tc.keep, tc.prompt, tc.steps, true, 16)
			require.Equal(t, before.sels, after.sels)
			require.Equal(t, before.outs, after.outs)
			// The box rows (and pool uploads) written on the host are timed.
			require.Positive(t, after.hostWrites)
			require.Len(t, after.bounds, tc.steps)
			exact, churn := 0, 0
			for step := range tc.steps {
				upto := tc.prompt + step + 1
				want, got := before.bounds[upto], after.bounds[upto]
				require.Len(t, got, len(want), "step %d", step)
				if len(want)%4 == 0 {
					require.Equal(t, want, got, "step %d: %d pages", step, len(want))
					exact++
					continue
				}
				scale := 0.0
				for _, v := range want {
					scale = math.Max(scale, math.Abs(float64(v)))
				}
				for p := range want {
					require.InDelta(t, want[p], got[p], 1e-6*scale, "step %d page %d", step, p)
				}
				if step > 0 && !slices.Equal(after.sels[step], after.sels[step-1]) {
					churn++
				}
			}
			require.Positive(t, exact, "no step had a page count that is a multiple of 4")
			if tc.keep == 0 {
				require.Positive(t, churn, "the selection never changed: the check proves little")
			}
		})
	}
	// A GPU layer's path, run on the CPU backend: pages uploaded through
	// the pools' staging tensors (DeviceUploads) and box rows copied in
	// the graph (HostBounds off). The same bounds bit for bit, the same
	// selections and outputs as the host path.
	t.Run("device path", func(t *testing.T) {
		defer func(u, d bool) { kvcache.HostUploads, kvcache.DeviceUploads = u, d }(kvcache.HostUploads, kvcache.DeviceUploads)
		kvcache.HostUploads, kvcache.DeviceUploads = true, true
		host := run(t, 0, 600, 60, true, 16)
		kvcache.HostUploads = false
		dev := run(t, 0, 600, 60, false, 16)
		require.Zero(t, host.staged)
		require.Positive(t, dev.staged, "decode steps upload the pages they newly select through staging")
		require.Equal(t, host.bounds, dev.bounds)
		require.Equal(t, host.sels, dev.sels)
		require.Equal(t, host.outs, dev.outs)
	})
	t.Run("no host writes timed when nothing is written on the host", func(t *testing.T) {
		defer func(u bool) { kvcache.HostUploads = u }(kvcache.HostUploads)
		kvcache.HostUploads = false
		res := run(t, paging.DefaultKeepLogits, 600, 20, false, 1)
		require.Zero(t, res.hostWrites)
	})
}

// BenchmarkQuestScores times one layer's in-graph bounds (the ops a quest
// decode step adds to its graph: |q|, concat, one mul_mat, the maximum
// over heads, the read-back copy) on the CPU backend, 1 thread, for the
// tiny preset's shape (8 query heads, 2 KV heads, headDim 32) against a
// graph that only copies q out (the fixed cost of a graph), three ways:
// "unpadded" (mul_mat over the pages, as before), "padded" (mul_mat rows
// rounded up to 16, so that ggml uses tinyBLAS whatever the page count:
// what the cache does) and "host-max" (padded, the [rows, heads] bounds
// read back, the maximum over heads left to the host: not taken, it was
// slower).
//
//	go test ./kvcache -run XXX -bench QuestScores
func BenchmarkQuestScores(b *testing.B) {
	m, err := runtime.Open(context.Background(), testmodels.Random(b, "llama", "tiny", foundry.F32, 4, false), runtime.Options{Threads: 1, ContextLength: 256})
	require.NoError(b, err)
	defer m.Close()
	be := m.Backend()
	const heads, kvh, hd = 8, 2, 32
	for _, pages := range []int{128, 512, 1024, 1025, 2048} {
		bctx := be.NewContextSize(1).Layer(0)
		capacity := (pages + 15) / 16 * 16
		boxes := bctx.Zeros(ml.DTypeF32, 2*hd, capacity, kvh)
		r := rand.New(rand.NewPCG(1, 2))
		q := randoms(r, heads*hd)
		for _, mode := range []string{"none", "unpadded", "padded", "host-max"} {
			b.Run(fmt.Sprintf("pages=%d/%s", pages, mode), func(b *testing.B) {
				for range b.N {
					ctx := be.NewContext()
					qt := ctx.Input().FromFloats(q, hd, heads, 1)
					var out ml.Tensor
					switch mode {
					case "none":
						out = ctx.Input().Empty(ml.DTypeF32, hd, heads, 1)
						ctx.Forward(qt.Copy(ctx, out))
					case "unpadded", "padded":
						rows := pages
						if mode == "padded" {
							rows = capacity
						}
						s := kvcache.MaxHeadsGraph(ctx, kvcache.QuestHeadScores(ctx, boxes, qt, rows), pages)
						out = ctx.Input().Empty(ml.DTypeF32, pages)
						ctx.Forward(s.Copy(ctx, out))
					case "host-max":
						s := kvcache.QuestHeadScores(ctx, boxes, qt, capacity)
						out = ctx.Input().Empty(ml.DTypeF32, capacity, heads)
						ctx.Forward(s.Copy(ctx, out))
					}
					ctx.Compute(out)
					f := out.Floats()
					if mode == "host-max" { // the maximum over heads, row by row
						for h := 1; h < heads; h++ {
							for p, v := range f[h*capacity : h*capacity+pages] {
								f[p] = max(f[p], v)
							}
						}
					}
					ctx.Close()
				}
			})
		}
		bctx.Close()
	}
}

// pageOffsetKeys is n random keys [tDim, tKV, n] from position pos0 on,
// each page's shifted by its own offset, so that pages' bounds differ by
// more than rounding.
func pageOffsetKeys(r *rand.Rand, pos0, n int) []float32 {
	k := randoms(r, n*tKV*tDim)
	for i := 0; i < n; i++ {
		off := float32(((pos0+i)/tPage*37)%11) / 4
		for j := 0; j < tKV*tDim; j++ {
			k[i*tKV*tDim+j] += off
		}
	}
	return k
}
