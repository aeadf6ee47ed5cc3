package kvcache_test

import (
	"context"
	"math"
	"math/rand/v2"
	"slices"
	"sync"
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

// orderedTokenSelector is a funcTokenSelector with a token order per
// group (paging.TokenOrdered) and row runs in its selections, as squeezed
// gives them: pick returns a group's tokens and its runs of the order.
type orderedTokenSelector struct {
	c      paging.Config
	groups []paging.Group
	order  [][]int32
	blocks []int32 // nil: the cache's fixed blocks
	pick   func(group, upto int) (toks, rows []int32)
	// queried, if set, makes the selector need the queries (as squeezed
	// does) and records each Select's, one row per token, copied.
	queried *[][][]float32
}

func (s *orderedTokenSelector) Name() string              { return "ordered-tokens" }
func (s *orderedTokenSelector) Config() paging.Config     { return s.c }
func (s *orderedTokenSelector) Groups(int) []paging.Group { return s.groups }
func (s *orderedTokenSelector) NeedQueries(_, _ int) bool { return s.queried != nil }
func (s *orderedTokenSelector) TokenOrder(_ int, group int) ([]int32, []int32) {
	return s.order[group], s.blocks
}
func (s *orderedTokenSelector) Select(_ int, _ paging.Summaries, q *paging.Queries, upto int) paging.Selection {
	if s.queried != nil {
		if q == nil {
			panic("ordered-tokens: no queries, and the selector needs them")
		}
		var rows [][]float32
		for _, r := range q.Q {
			rows = append(rows, slices.Clone(r))
		}
		*s.queried = append(*s.queried, rows)
	}
	var out paging.Selection
	for g := range s.groups {
		toks, rows := s.pick(g, upto)
		var pages []int
		for _, t := range toks {
			if p := int(t) / tPage; len(pages) == 0 || pages[len(pages)-1] != p {
				pages = append(pages, p)
			}
		}
		out.Groups = append(out.Groups, pages)
		out.Tokens = append(out.Tokens, toks)
		out.Rows = append(out.Rows, rows)
	}
	return out
}

// stepScoredSelector is orderedTokenSelector with centroids scored in the
// graph (paging.StepScored): it records each Select's Queries.Scores
// (copied; nil when none came) and selects as the ordered selector does.
type stepScoredSelector struct {
	*orderedTokenSelector
	cents  []float32 // [tKV][tCents][tDim]
	scored *[][]float32
}

const tCents = 7

var _ paging.StepScored = (*stepScoredSelector)(nil)

func (s *stepScoredSelector) UseGraphScores() bool                   { return false }
func (s *stepScoredSelector) GraphScores(_, _, _ int) bool           { return false }
func (s *stepScoredSelector) Scored(int, []float32, int)             {}
func (s *stepScoredSelector) StepScores(int) bool                    { return true }
func (s *stepScoredSelector) Centroids(int) ([]float32, int, uint64) { return s.cents, tCents, 1 }
func (s *stepScoredSelector) Select(layer int, sum paging.Summaries, q *paging.Queries, upto int) paging.Selection {
	var sc []float32
	if q != nil && q.Scores != nil {
		sc = slices.Clone(q.Scores)
	}
	*s.scored = append(*s.scored, sc)
	return s.orderedTokenSelector.Select(layer, sum, q, upto)
}

// randomOrders returns n random permutations of [0, tOrder), the token
// orders of n groups, from seed.
func randomOrders(n int, seed uint64) [][]int32 {
	orders := make([][]int32, n)
	for g := range orders {
		orders[g] = make([]int32, tOrder)
		for i, p := range rand.New(rand.NewPCG(seed, uint64(g))).Perm(tOrder) {
			orders[g][i] = int32(p)
		}
	}
	return orders
}

// tOrder is the ordered selector's order length: positions [0, tOrder)
// are "clustered" in blocks of tBlock rows.
const tOrder, tBlock = 160, 8

// tBlocks are the ordered selector's blocks, tBlock rows each but for a
// few of other sizes (an empty one, a long one, and rows 152..160 as
// blocks of 1, 3 and 4 rows), where it gives them. The cache's copy is
// token-major whatever the blocks (every run is contiguous): a selector
// with and without them must give the same results.
var tBlocks = []int32{0, 8, 16, 16, 24, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128, 136, 144, 152, 153, 156, 160}

// orderedPick returns a group's choice at upto under a random order
// (orders[g], a permutation of [0, tOrder)): before the order is written,
// random tokens and no rows; after, three random blocks of tBlock rows
// (sometimes rows 56..72: one run across two blocks), sometimes rows 152
// and 153..156 (short runs: 1, 3 or 4 rows), the "sinks" 0..3 (each a
// single row of the order) and random tokens past the order. The rows
// are marked, then read back as maximal runs; every run, of any length,
// is read from the ordered copy.
func orderedPick(orders [][]int32) func(g, upto int) ([]int32, []int32) {
	rowOf := make([][]int32, len(orders))
	for g, o := range orders {
		rowOf[g] = make([]int32, len(o))
		for r, p := range o {
			rowOf[g][p] = int32(r)
		}
	}
	return func(g, upto int) ([]int32, []int32) {
		r := rand.New(rand.NewPCG(uint64(upto), uint64(g)+10))
		var toks []int32
		if upto < tOrder+1 {
			for range 24 {
				toks = append(toks, int32(r.IntN(upto)))
			}
			slices.Sort(toks)
			return slices.Compact(toks), nil
		}
		marked := make([]bool, tOrder)
		for range 3 {
			b := r.IntN(tOrder / tBlock)
			for x := b * tBlock; x < (b+1)*tBlock; x++ {
				marked[x] = true
			}
		}
		if upto%3 == 0 { // two neighbours: a run across a block edge (rows 56..72)
			for x := 56; x < 72; x++ {
				marked[x] = true
			}
		}
		// Short whole blocks (under tBlocks): row 152 alone, rows
		// 153..156 alone, or both, one run of 4 rows.
		if upto%2 == 0 {
			marked[152] = true
		}
		if upto%5 == 0 {
			for x := 153; x < 156; x++ {
				marked[x] = true
			}
		}
		for t := range 4 {
			marked[rowOf[g][t]] = true
		}
		rows := []int32{}
		for x := 0; x < tOrder; x++ {
			if !marked[x] {
				continue
			}
			if n := len(rows); n > 0 && rows[n-1] == int32(x) {
				rows[n-1]++
			} else {
				rows = append(rows, int32(x), int32(x+1))
			}
			toks = append(toks, orders[g][x])
		}
		for range 8 {
			toks = append(toks, int32(tOrder+r.IntN(upto-tOrder)))
		}
		slices.Sort(toks)
		return slices.Compact(toks), rows
	}
}

// Token-granular groups (paging.Group.Tokens) on the CPU backend: each
// pass attends to a new set of earlier tokens per group (head groups of
// two KV heads), over passes of 1-80 tokens and a cut back into what was
// attended, continued with other keys and values. Every path matches
// float64 attention over exactly the listed positions:
//
//   - token pools too small for the prompt (evicted tokens come back),
//     with uploads as host copies, copy runs and one set_rows scatter
//     (TokenStaging off);
//   - staged groups (TokenStaging, the default on the CPU), every token
//     from the host pages (a selector without an order);
//   - staged groups reading runs of a cluster-ordered copy (a
//     paging.TokenOrdered selector with Rows), whose copy is made once
//     the order's positions are written, dropped by the cut below it and
//     made again from the new keys: copied into the staging buffer
//     (InPlaceRuns off, and every batch), or, on one-token passes,
//     attended in place by kvr_attn (InPlaceRuns, the default).
//
// The invariants (checkStaged: cells equal to the pages, rows valid, the
// copy equal to the pages) hold after every pass; staged and pooled
// outputs agree pass by pass.
func TestTokenPoolsMatchFloat64Reference(t *testing.T) {
	m, err := runtime.Open(context.Background(), testmodels.Random(t, "llama", "tiny", foundry.F32, 4, false), runtime.Options{Threads: 2, ContextLength: 512})
	require.NoError(t, err)
	defer m.Close()
	b := m.Backend()
	groups := []paging.Group{{KVHeads: []int{0, 2}, Budget: 32, Tokens: true}, {KVHeads: []int{1, 3}, Budget: 32, Tokens: true}}
	cfg := paging.Config{PageSize: tPage, Sinks: 4, Window: 4}
	plain := func(g, upto int) ([]int32, []int32) {
		r := rand.New(rand.NewPCG(uint64(upto), uint64(g)))
		var out []int32
		for range 24 {
			out = append(out, int32(r.IntN(upto)))
		}
		slices.Sort(out)
		return slices.Compact(out), nil
	}
	orders := randomOrders(len(groups), 5)
	ordered := orderedPick(orders)
	outs := map[string][][][]float32{} // mode -> pass -> the pass's attention output
	for _, mode := range []struct {
		name    string
		runs    int  // kvcache.MaxUploadRuns
		host    bool // kvcache.HostUploads
		staging bool // kvcache.TokenStaging
		ordered bool // the selector has a token order and lists rows
		blocks  bool // ... and gives its blocks (tBlocks: an empty one, a long one, blocks of 1, 3 and 4 rows)
		inplace bool // kvcache.InPlaceRuns: one-token passes read the copy's runs in place
		split   bool // passes split as arch.Model.Run splits them: Put's graph computed first, attention in a second graph without k and v
		queried bool // the selector needs the queries: passes run as arch.Model.Run runs them (hookedPass), one-token passes select in the graph
		scored  bool // ... with their centroid scores computed in the graph (paging.StepScored)
		graphIn bool // kvcache.DeviceUploads off: token pools outside host memory take graph inputs
	}{
		{"pools, host copies", kvcache.MaxUploadRuns, true, false, false, false, false, false, false, false, false},
		// Host copies off: token uploads through the pools' staging tensors
		// (DeviceUploads, as a GPU layer's), or as graph inputs.
		{"pools, device staging", kvcache.MaxUploadRuns, false, false, false, false, false, false, false, false, false},
		{"pools, copy runs", kvcache.MaxUploadRuns, false, false, false, false, false, false, false, false, true},
		{"pools, set_rows scatter", 0, false, false, false, false, false, false, false, false, false},
		{"staged from pages", kvcache.MaxUploadRuns, true, true, false, false, false, false, false, false, false},
		{"pools, ordered selector", kvcache.MaxUploadRuns, true, false, true, false, false, false, false, false, false},
		{"staged from the ordered copy", kvcache.MaxUploadRuns, true, true, true, false, false, false, false, false, false},
		{"staged from the ordered copy, selector blocks", kvcache.MaxUploadRuns, true, true, true, true, false, false, false, false, false},
		{"in place from the ordered copy, selector blocks", kvcache.MaxUploadRuns, true, true, true, true, true, false, false, false, false},
		{"in place from the ordered copy", kvcache.MaxUploadRuns, true, true, true, false, true, false, false, false, false},
		// The layer op takes the batch's token from the pages here.
		{"in place from the ordered copy, split passes", kvcache.MaxUploadRuns, true, true, true, true, true, true, false, false, false},
		{"staged from pages, split passes", kvcache.MaxUploadRuns, true, true, false, false, true, true, false, false, false},
		// One-token passes select inside the graph (selectgraph.go), the
		// question's passes split with the queries on the host.
		{"in place from the ordered copy, selected in the graph", kvcache.MaxUploadRuns, true, true, true, true, true, false, true, false, false},
		{"in place from the ordered copy, selected and scored in the graph", kvcache.MaxUploadRuns, true, true, true, true, true, false, true, true, false},
	} {
		t.Run(mode.name, func(t *testing.T) {
			defer func(old int, h, s, ip, d bool) {
				kvcache.MaxUploadRuns, kvcache.HostUploads, kvcache.TokenStaging, kvcache.InPlaceRuns, kvcache.DeviceUploads = old, h, s, ip, d
			}(kvcache.MaxUploadRuns, kvcache.HostUploads, kvcache.TokenStaging, kvcache.InPlaceRuns, kvcache.DeviceUploads)
			kvcache.MaxUploadRuns, kvcache.HostUploads, kvcache.TokenStaging, kvcache.InPlaceRuns = mode.runs, mode.host, mode.staging, mode.inplace
			kvcache.DeviceUploads = !mode.graphIn
			pick := plain
			var sel paging.Selector = &funcTokenSelector{c: cfg, groups: groups, tok: func(g, upto int) []int32 { toks, _ := plain(g, upto); return toks }}
			var queried [][][]float32
			var scored [][]float32
			cents := randoms(rand.New(rand.NewPCG(41, 42)), tKV*tCents*tDim)
			if mode.ordered {
				pick = ordered
				os := &orderedTokenSelector{c: cfg, groups: groups, order: orders, pick: ordered}
				if mode.queried {
					os.queried = &queried
				}
				if mode.blocks {
					os.blocks = tBlocks // whole short blocks come from the copy, too
				}
				sel = os
				if mode.scored {
					sel = &stepScoredSelector{orderedTokenSelector: os, cents: cents, scored: &scored}
				}
			}
			c, err := kvcache.NewPaged(kvcache.Options{Layout: tLayout, Heads: tHeads, Selector: sel, Capacity: 512, MaxBatch: 96})
			require.NoError(t, err)
			defer c.Close()
			c.Init(b, ml.DTypeF16, 1, 512, 96)
			r := rand.New(rand.NewPCG(31, 32))
			batches := []int{80, 80, 80, 1, 1, 3, 1, 1}
			total := 0
			for _, n := range batches {
				total += n
			}
			q := randoms(r, total*tHeads*tDim)
			k := randoms(r, total*tKV*tDim)
			v := randoms(r, total*tKV*tDim)
			split := func(x []float32, per, from, to int) []float32 { return x[from*per : to*per] }
			// step runs the pass of tokens [pos0, pos0+n) (queries qs) and
			// checks it against float64 attention over k and v.
			step := func(pos0, n int, qs, k, v []float32, what string) {
				end := pos0 + n
				run := pass
				if mode.split {
					run = splitPass
				}
				if mode.queried {
					run = hookedPass
				}
				asked := len(queried)
				got := run(t, b, c, pos0, qs, split(k, tKV*tDim, pos0, end), split(v, tKV*tDim, pos0, end))
				if mode.queried {
					// Selected once, from this pass's queries: on the
					// host (split) or, one token, in the graph.
					require.Len(t, queried, asked+1, "%s: tokens %d..%d selected once", what, pos0, end)
					require.Len(t, queried[asked], n)
					for i := range n {
						require.Equal(t, qs[i*tHeads*tDim:(i+1)*tHeads*tDim], queried[asked][i], "%s: the queries the selector got, token %d", what, pos0+i)
					}
				}
				if mode.scored {
					// One-token passes got their own queries' products
					// with their KV heads' centroids; a question got none.
					require.Len(t, scored, asked+1)
					if n > 1 {
						require.Nil(t, scored[asked], "%s: tokens %d..%d: a question is scored on the host", what, pos0, end)
					} else {
						require.Len(t, scored[asked], tHeads*tCents, "%s: token %d", what, pos0)
						G := tHeads / tKV
						for h := range tHeads {
							for j := range tCents {
								var want float64
								for d := range tDim {
									want += float64(qs[h*tDim+d]) * float64(cents[((h/G)*tCents+j)*tDim+d])
								}
								require.InDelta(t, want, scored[asked][h*tCents+j], 1e-4, "%s: token %d, head %d, centroid %d", what, pos0, h, j)
							}
						}
					}
				}
				want := referenceAt(qs, k, v, pos0, func(g, p int) bool {
					toks, _ := pick(g%2, end)
					return p >= pos0 || slices.Contains(toks, int32(p))
				})
				worst := 0.0
				for i := range got {
					for j := range got[i] {
						worst = math.Max(worst, math.Abs(float64(got[i][j])-want[i][j]))
					}
				}
				require.Less(t, worst, 2e-3, "%s: tokens %d..%d", what, pos0, end)
				require.NoError(t, c.CheckInvariants())
				outs[mode.name] = append(outs[mode.name], got)
			}
			pos0 := 0
			for _, n := range batches {
				step(pos0, n, split(q, tHeads*tDim, pos0, pos0+n), k, v, "first pass")
				pos0 += n
			}
			fromCopy := c.Stats().StagedFromCopy
			// Cut into what was attended (and into the order's positions)
			// and continue with other keys and values from there: every
			// path must forget the dropped tokens, and the ordered copy,
			// made of the old keys, must not be read again.
			const cut = 150
			require.NoError(t, c.Remove(0, cut, math.MaxInt32))
			require.Zero(t, c.Stats().OrderedBytes, "the cut dropped the copy of positions it changes")
			more := []int{1, 5, 14, 1, 3}
			extra := 0
			for _, n := range more {
				extra += n
			}
			k = append(slices.Clone(k[:cut*tKV*tDim]), randoms(r, extra*tKV*tDim)...)
			v = append(slices.Clone(v[:cut*tKV*tDim]), randoms(r, extra*tKV*tDim)...)
			q2 := randoms(r, extra*tHeads*tDim)
			pos0 = cut
			for _, n := range more {
				step(pos0, n, split(q2, tHeads*tDim, pos0-cut, pos0-cut+n), k, v, "after the cut")
				pos0 += n
			}
			st := c.Stats()
			t.Logf("%d tokens uploaded, %d bytes; resident %d bytes; staged %d from the copy, %d from pages; ordered copies %d bytes",
				st.TokenUploads, st.UploadedBytes, st.ResidentBytes, st.StagedFromCopy, st.StagedFromPages, st.OrderedBytes)
			require.Positive(t, st.ResidentBytes, "a pool or a staging buffer per group")
			if mode.scored {
				require.Positive(t, st.StepScored)
				require.Equal(t, st.GraphSelections, st.StepScored, "every selection in the graph was scored there")
			} else {
				require.Zero(t, st.StepScored)
			}
			if mode.staging {
				require.Zero(t, st.TokenUploads, "staged: nothing uploaded")
				require.Positive(t, st.StagedFromPages)
				if mode.inplace && mode.ordered {
					require.Positive(t, st.InPlaceRows, "one-token passes read runs in place")
				} else {
					require.Zero(t, st.InPlaceRows)
				}
				if mode.ordered {
					require.Positive(t, fromCopy, "runs read from the copy before the cut")
					require.Greater(t, st.StagedFromCopy, fromCopy, "and from the copy made again after it")
					require.Equal(t, int64(len(groups)*tOrder*2*tDim*2*2), st.OrderedBytes, "one copy per group: its heads' keys and values, f16, token-major")
				} else {
					require.Zero(t, st.StagedFromCopy)
					require.Zero(t, st.OrderedBytes)
				}
				return
			}
			require.Zero(t, st.OrderedBytes+st.StagedFromCopy+st.StagedFromPages, "pools read no copy")
			require.Positive(t, st.TokenUploads, "evicted tokens came back")
			if !mode.host && !mode.graphIn && mode.runs > 0 {
				require.Positive(t, st.DeviceStagedTokens, "token uploads through the staging tensors")
				require.LessOrEqual(t, st.DeviceStagedTokens, st.TokenUploads)
			} else {
				require.Zero(t, st.DeviceStagedTokens)
			}
			require.Zero(t, st.Uploads, "no page was uploaded")
			require.Equal(t, st.TokenUploads*2*tDim*2*2, st.UploadedBytes)
		})
	}
	// Staged against pooled, pass by pass: the same f16 keys and values,
	// the same positions, summed in another cell order.
	for _, pair := range [][2]string{{"pools, host copies", "pools, device staging"}, {"pools, host copies", "pools, copy runs"}, {"pools, host copies", "staged from pages"}, {"pools, host copies", "staged from pages, split passes"}, {"pools, ordered selector", "in place from the ordered copy, split passes"}, {"pools, ordered selector", "staged from the ordered copy"}, {"pools, ordered selector", "staged from the ordered copy, selector blocks"},
		{"pools, ordered selector", "in place from the ordered copy, selector blocks"}, {"pools, ordered selector", "in place from the ordered copy"},
		{"pools, ordered selector", "in place from the ordered copy, selected in the graph"},
		{"pools, ordered selector", "in place from the ordered copy, selected and scored in the graph"}} {
		t.Run(pair[1]+" vs "+pair[0], func(t *testing.T) {
			pools, staged := outs[pair[0]], outs[pair[1]]
			require.NotEmpty(t, pools, "compares the %q subtest's outputs: run it too", pair[0])
			require.NotEmpty(t, staged, "compares the %q subtest's outputs: run it too", pair[1])
			require.Len(t, staged, len(pools))
			worst := 0.0
			for p := range pools {
				for i := range pools[p] {
					for j := range pools[p][i] {
						worst = math.Max(worst, math.Abs(float64(pools[p][i][j]-staged[p][i][j])))
					}
				}
			}
			t.Logf("max |staged - pools| over %d passes: %.2g", len(pools), worst)
			require.Less(t, worst, 1e-3)
		})
	}
}

// Two sessions forked from one document share its cluster-ordered copy:
// both make it at once at their first step (one copy is built), both
// decode correctly against float64 attention (each with its own
// continuation), and the copy is document memory (the same bytes in both
// sessions' Stats and in the document's store), not resident.
func TestStagedForksShareOrderedCopy(t *testing.T) {
	m, err := runtime.Open(context.Background(), testmodels.Random(t, "llama", "tiny", foundry.F32, 4, false), runtime.Options{Threads: 2, ContextLength: 512})
	require.NoError(t, err)
	defer m.Close()
	b := m.Backend()
	defer func(s bool) { kvcache.TokenStaging = s }(kvcache.TokenStaging)
	kvcache.TokenStaging = true
	groups := []paging.Group{{KVHeads: []int{0, 2}, Budget: 32, Tokens: true}, {KVHeads: []int{1, 3}, Budget: 32, Tokens: true}}
	cfg := paging.Config{PageSize: tPage, Sinks: 4, Window: 4}
	orders := randomOrders(len(groups), 6)
	pick := orderedPick(orders)
	// Rows read from the ordered copy: staged (batches) or attended in
	// place (one-token passes, InPlaceRuns).
	fromCopy := func(c *kvcache.Paged) int64 { st := c.Stats(); return st.StagedFromCopy + st.InPlaceRows }
	const docLen = 192
	r := rand.New(rand.NewPCG(41, 42))
	split := func(x []float32, per, from, to int) []float32 { return x[from*per : to*per] }
	dq, dk, dv := randoms(r, docLen*tHeads*tDim), randoms(r, docLen*tKV*tDim), randoms(r, docLen*tKV*tDim)
	writer, err := kvcache.NewPaged(kvcache.Options{Layout: tLayout, Heads: tHeads, Capacity: 512, MaxBatch: 96,
		Selector: &fixedSelector{c: cfg, groups: []paging.Group{{}}, pages: [][]int{nil}}})
	require.NoError(t, err)
	defer writer.Close()
	writer.Init(b, ml.DTypeF16, 1, 512, 96)
	for pos0 := 0; pos0 < docLen; pos0 += 96 {
		pass(t, b, writer, pos0, split(dq, tHeads*tDim, pos0, pos0+96), split(dk, tKV*tDim, pos0, pos0+96), split(dv, tKV*tDim, pos0, pos0+96))
	}
	doc := writer.Store()

	type session struct {
		c       *kvcache.Paged
		q, k, v []float32 // the session's queries from docLen on; keys and values from 0
	}
	batches := []int{1, 1, 4, 1}
	extra := 0
	for _, n := range batches {
		extra += n
	}
	var ss []*session
	for range 2 {
		c, err := kvcache.NewPaged(kvcache.Options{Layout: tLayout, Heads: tHeads, Capacity: 512, MaxBatch: 96, Prefix: doc,
			Selector: &orderedTokenSelector{c: cfg, groups: groups, order: orders, blocks: tBlocks, pick: pick}})
		require.NoError(t, err)
		defer c.Close()
		c.Init(b, ml.DTypeF16, 1, 512, 96)
		// One token more than the batches: the last pass below.
		ss = append(ss, &session{c: c, q: randoms(r, (extra+1)*tHeads*tDim),
			k: append(slices.Clone(dk), randoms(r, (extra+1)*tKV*tDim)...), v: append(slices.Clone(dv), randoms(r, (extra+1)*tKV*tDim)...)})
	}
	check := func(s *session, pos0, n int, got [][]float32) {
		end := pos0 + n
		want := referenceAt(split(s.q, tHeads*tDim, pos0-docLen, end-docLen), s.k, s.v, pos0, func(g, p int) bool {
			toks, _ := pick(g%2, end)
			return p >= pos0 || slices.Contains(toks, int32(p))
		})
		worst := 0.0
		for i := range got {
			for j := range got[i] {
				worst = math.Max(worst, math.Abs(float64(got[i][j])-want[i][j]))
			}
		}
		require.Less(t, worst, 2e-3, "tokens %d..%d", pos0, end)
	}
	// The first step of both sessions: StartForward chooses the tokens
	// and makes the ordered copy, at once in both; the graphs are then
	// built and computed one after the other (one backend).
	ctxs := make([]ml.Context, len(ss))
	errs := make([]error, len(ss))
	var wg sync.WaitGroup
	for i, s := range ss {
		ctxs[i] = b.NewContext()
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = s.c.StartForward(ctxs[i], input.Batch{Positions: []int32{docLen}, Sequences: []int{0}}, false)
		}()
	}
	wg.Wait()
	for i, s := range ss {
		require.NoError(t, errs[i])
		got := finishPass(t, ctxs[i], s.c, split(s.q, tHeads*tDim, 0, 1), split(s.k, tKV*tDim, docLen, docLen+1), split(s.v, tKV*tDim, docLen, docLen+1))
		ctxs[i].Close()
		check(s, docLen, 1, got)
	}
	pos0 := docLen + batches[0]
	for _, n := range batches[1:] {
		for _, s := range ss {
			got := pass(t, b, s.c, pos0, split(s.q, tHeads*tDim, pos0-docLen, pos0-docLen+n), split(s.k, tKV*tDim, pos0, pos0+n), split(s.v, tKV*tDim, pos0, pos0+n))
			check(s, pos0, n, got)
		}
		pos0 += n
	}
	copyBytes := int64(len(groups) * tOrder * 2 * tDim * 2 * 2)
	require.Equal(t, copyBytes, doc.OrderedBytes(), "one copy per group, held by the document")
	for i, s := range ss {
		st := s.c.Stats()
		require.Equal(t, copyBytes, st.OrderedBytes, "session %d reports the document's copy", i)
		require.Positive(t, st.StagedFromCopy, "session %d staged runs of the copy (its batch of 4)", i)
		if kvcache.InPlaceRuns {
			require.Positive(t, st.InPlaceRows, "session %d attended runs of the copy in place", i)
		}
		require.Zero(t, st.TokenUploads)
		slots := 32/tPage + 1 + 3 // the budget's pages, the largest batch's, slack (slotsFor)
		require.Equal(t, int64(len(groups)*slots*tPage*2*tDim*2*2), st.ResidentBytes, "session %d holds its staging buffers only", i)
	}

	// refPass runs a one-token pass of s at p with query q and key and
	// value s.k, s.v at p, and compares it with float64 attention.
	refPass := func(s *session, p int, q []float32) {
		t.Helper()
		got := pass(t, b, s.c, p, q, split(s.k, tKV*tDim, p, p+1), split(s.v, tKV*tDim, p, p+1))
		want := referenceAt(q, s.k, s.v, p, func(g, x int) bool {
			toks, _ := pick(g%2, p+1)
			return x >= p || slices.Contains(toks, int32(x))
		})
		for i := range got {
			for j := range got[i] {
				require.InDelta(t, want[i][j], float64(got[i][j]), 2e-3, "pass at %d", p)
			}
		}
	}
	// A cut of the document's last token (an empty prompt runs it
	// again), above the copy's positions, keeps the shared copy; the
	// invariants hold right after the cut.
	s, other := ss[0], ss[1]
	before := fromCopy(s.c)
	require.NoError(t, s.c.Remove(0, docLen-1, math.MaxInt32))
	require.NoError(t, s.c.CheckInvariants(), "right after the cut")
	refPass(s, docLen-1, split(dq, tHeads*tDim, docLen-1, docLen))
	st := s.c.Stats()
	require.Equal(t, copyBytes, st.OrderedBytes, "still the document's copy")
	require.Greater(t, fromCopy(s.c), before, "runs read from the shared copy")
	require.Equal(t, copyBytes, doc.OrderedBytes(), "no second copy")

	// A cut into the ordered positions detaches that session (its
	// tokens there may change): it stages from its own pages, while the
	// document keeps its copy and the other session reads it.
	cut := tOrder - 8
	require.NoError(t, s.c.Remove(0, int32(cut), math.MaxInt32))
	require.NoError(t, s.c.CheckInvariants(), "right after the cut")
	copy(s.k[cut*tKV*tDim:], randoms(r, tKV*tDim)) // other keys and values at cut
	copy(s.v[cut*tKV*tDim:], randoms(r, tKV*tDim))
	refPass(s, cut, split(dq, tHeads*tDim, cut, cut+1))
	require.Zero(t, s.c.Stats().OrderedBytes, "detached: no share of the document's copy")
	before = fromCopy(other.c)
	got := pass(t, b, other.c, pos0, split(other.q, tHeads*tDim, pos0-docLen, pos0+1-docLen), split(other.k, tKV*tDim, pos0, pos0+1), split(other.v, tKV*tDim, pos0, pos0+1))
	check(other, pos0, 1, got)
	require.Greater(t, fromCopy(other.c), before, "the other session still reads the copy")
	require.Equal(t, copyBytes, doc.OrderedBytes())
}

// finishPass is pass after StartForward: builds and computes the layer's
// attention in ctx and returns the output [batch][heads*dim].
func finishPass(t *testing.T, ctx ml.Context, c *kvcache.Paged, q, k, v []float32) [][]float32 {
	t.Helper()
	n := len(q) / (tHeads * tDim)
	require.NoError(t, c.CheckInvariants())
	c.SetLayer(0)
	qt := ctx.Input().FromFloats(q, tDim, tHeads, n)
	kt := ctx.Input().FromFloats(k, tDim, tKV, n)
	vt := ctx.Input().FromFloats(v, tDim, tKV, n)
	out := c.Attention(ctx, 0, qt, kt, vt, 1/math.Sqrt(tDim))
	res := ctx.Input().Empty(ml.DTypeF32, tDim, tHeads, n)
	ts := append([]ml.Tensor{out.Copy(ctx, res), res}, c.Outputs(ctx)...)
	ctx.Forward(ts...).Compute(ts...)
	require.NoError(t, c.Computed(ctx))
	require.NoError(t, c.CheckInvariants())
	flat := res.Floats()
	rows := make([][]float32, n)
	for i := range rows {
		rows[i] = flat[i*tHeads*tDim : (i+1)*tHeads*tDim]
	}
	return rows
}

// hookedPass runs a pass as arch.Model.Run does: split, with the queries
// handed to SetQueries between the graphs, if the cache needs them on the
// host (NeedQueries); else one graph (whose selection, if the selector
// needs queries, is made inside it: selectgraph.go). Returns the output
// [batch][heads*dim].
func hookedPass(t *testing.T, b ml.Backend, c *kvcache.Paged, pos0 int, q, k, v []float32) [][]float32 {
	t.Helper()
	n := len(q) / (tHeads * tDim)
	ctx := startPass(t, b, c, pos0, n)
	split := c.NeedQueries(0)
	require.Equal(t, n > 1 || !kvcache.SelectInGraph, split, "only passes of several tokens split (%d tokens)", n)
	if !split {
		defer ctx.Close()
		return finishPass(t, ctx, c, q, k, v)
	}
	return finishSplit(t, b, ctx, c, q, k, v, true)
}

// splitPass is pass split as arch.Model.Run splits a layer whose selector
// needs the queries: a first graph puts the batch's keys and values
// (Put) and is computed (they reach the host pages), then a second graph
// attends without them (k and v nil). Returns the output [batch][heads*dim].
func splitPass(t *testing.T, b ml.Backend, c *kvcache.Paged, pos0 int, q, k, v []float32) [][]float32 {
	t.Helper()
	return finishSplit(t, b, startPass(t, b, c, pos0, len(q)/(tHeads*tDim)), c, q, k, v, false)
}

// startPass starts a pass of n tokens at pos0 in a new context.
func startPass(t *testing.T, b ml.Backend, c *kvcache.Paged, pos0, n int) ml.Context {
	t.Helper()
	ctx := b.NewContext()
	positions := make([]int32, n)
	for i := range positions {
		positions[i] = int32(pos0 + i)
	}
	require.NoError(t, c.StartForward(ctx, input.Batch{Positions: positions, Sequences: make([]int, n)}, false))
	require.NoError(t, c.CheckInvariants())
	return ctx
}

// finishSplit computes a started pass split in two graphs (closing ctx,
// the first): Put's, then (with the queries handed to SetQueries first,
// if setQueries) the attention without k and v. Returns the output
// [batch][heads*dim].
func finishSplit(t *testing.T, b ml.Backend, ctx ml.Context, c *kvcache.Paged, q, k, v []float32, setQueries bool) [][]float32 {
	t.Helper()
	n := len(q) / (tHeads * tDim)
	c.SetLayer(0)
	c.Put(ctx, ctx.Input().FromFloats(k, tDim, tKV, n), ctx.Input().FromFloats(v, tDim, tKV, n))
	outs := c.Outputs(ctx)
	ctx.Forward(outs...).Compute(outs...)
	require.NoError(t, c.Computed(ctx))
	ctx.Close()
	rows := make([][]float32, n)
	if setQueries {
		for i := range rows {
			rows[i] = q[i*tHeads*tDim : (i+1)*tHeads*tDim]
		}
		require.NoError(t, c.SetQueries(0, rows))
	}
	ctx = b.NewContext()
	defer ctx.Close()
	out := c.Attention(ctx, 0, ctx.Input().FromFloats(q, tDim, tHeads, n), nil, nil, 1/math.Sqrt(tDim))
	res := ctx.Input().Empty(ml.DTypeF32, tDim, tHeads, n)
	ts := append([]ml.Tensor{out.Copy(ctx, res), res}, c.Outputs(ctx)...)
	ctx.Forward(ts...).Compute(ts...)
	require.NoError(t, c.Computed(ctx))
	require.NoError(t, c.CheckInvariants())
	flat := res.Floats()
	for i := range rows {
		rows[i] = flat[i*tHeads*tDim : (i+1)*tHeads*tDim]
	}
	return rows
}
