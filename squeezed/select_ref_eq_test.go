package squeezed

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/paging"
)

// synthIndex is an index of a tokens-token document (window tokens left
// unclustered) without k-means over keys: k random centroids (isotropic:
// no coarse bound prunes, so budget mode goes flat after its probing
// lookups), each token assigned to a random cluster, some clusters left
// empty (their blocks of rows are empty), then the hierarchy as Build
// makes it.
func synthIndex(tb testing.TB, seed uint64, layers, kvHeads, d, tokens, window, k int) *Index {
	n := tokens - window
	ix := &Index{Layers: layers, KVHeads: kvHeads, HeadDim: d, Tokens: tokens, Clustered: n, Heads: make([][]*Head, layers)}
	rng := rand.New(rand.NewPCG(seed, 5))
	for l := range ix.Heads {
		ix.Heads[l] = make([]*Head, kvHeads)
		for g := range ix.Heads[l] {
			h := &Head{D: d, Centroids: randomKeys(seed+uint64(l*kvHeads+g), k, d), Sizes: make([]int32, k), Assign: make([]int32, n)}
			for t := range h.Assign {
				j := rng.IntN(k)
				if j%13 == 5 {
					j-- // clusters 5, 18, 31, ... stay empty
				}
				h.Assign[t] = int32(j)
				h.Sizes[j]++
			}
			if err := h.buildHierarchy(max(1, k/32), KMeansOptions{Seed: seed, MaxIter: 5}); err != nil {
				tb.Fatal(err)
			}
			h.index()
			require.NoError(tb, h.check(tokens))
			ix.Heads[l][g] = h
		}
	}
	return ix
}

// Select's rework (the taken clusters' tokens and rows listed without
// bitmaps over the document's positions and rows) lists exactly what
// the reference (select_ref_test.go, the code before it) lists: the same
// pages, tokens and runs of rows, nil where it gave nil, for the same
// calls, over a sequence of steps: a question (several query tokens),
// then decode steps as the answer grows; in budget mode (flat after the
// probing lookups on random centroids, hierarchical on topic keys),
// threshold mode, with a hysteresis (keep), with the decode steps' scores
// from the graph (lagged, and the first step after a question, which
// reuses its lists); page sizes a power of two or not; sinks and windows
// small and large (a tail reaching back into the clustered tokens by up
// to the window);
// budgets from nearly all tail to larger than the document.
//
// And the rows-only form (paging.Queries.RowsSuffice, a third selector
// given the same queries) answers the same choice: the same Rows, Tokens
// the full list's suffix at or past the order's end, Groups that suffix's
// pages, RowsOnly set; the graph-scored steps (no queries) keep the full
// form.
func TestSelectMatchesReference(t *testing.T) {
	const d, kvHeads, layers = 16, 2, 2
	random := synthIndex(t, 1, layers, kvHeads, d, 30000, 100, 1500)
	topicIx, err := Build(func(l, g, n int, dst []float32) []float32 { return topicKeys(uint64(11+3*l+g), n, d, 40) },
		layers, kvHeads, d, 4000, Options{Seed: 4, Window: 100})
	require.NoError(t, err)
	for _, ix := range []*Index{random, topicIx} {
		ix.Threshold = 2e-4
	}
	type tc struct {
		name          string
		ix            *Index
		heads         int
		P             int
		budget        int
		sinks, window int
		thresh, graph bool
		keep          float64
		uptos         []int // the question's position (≥ the document's tokens, as a session's are), then decode steps from each
	}
	var cases []tc
	for _, ixc := range []struct {
		name string
		ix   *Index
	}{{"random", random}, {"topics", topicIx}} {
		T := ixc.ix.Tokens
		for _, c := range []tc{
			{name: "budget", heads: 8, P: 64, budget: 2048, uptos: []int{T + 16}},
			{name: "budget P16 GQA2", heads: 4, P: 16, budget: 1024, sinks: 16, window: 64, uptos: []int{T + 3, T + 200}},
			{name: "budget P24", heads: 8, P: 24, budget: 700, sinks: 5, window: 40, uptos: []int{T + 1}},
			{name: "window past the clustered end", heads: 8, P: 32, budget: 4096, sinks: 64, window: 1500, uptos: []int{T + 10}},
			{name: "at the document end", heads: 8, P: 16, budget: 1024, sinks: 64, window: 64, uptos: []int{T}},
			{name: "budget all but spent", heads: 8, P: 16, budget: 64 + 256 + 40, uptos: []int{T + 8}},
			{name: "budget over the document", heads: 8, P: 64, budget: 64 * 1024, uptos: []int{T + 2}},
			{name: "threshold", heads: 8, P: 64, budget: 2048, thresh: true, uptos: []int{T + 16}},
			{name: "keep", heads: 8, P: 64, budget: 2048, keep: 2, uptos: []int{T + 16}},
			{name: "graph", heads: 8, P: 64, budget: 2048, graph: true, uptos: []int{T + 16}},
			{name: "graph keep", heads: 8, P: 16, budget: 1024, graph: true, keep: 1, uptos: []int{T + 5}},
			{name: "graph threshold", heads: 4, P: 64, budget: 2048, graph: true, thresh: true, uptos: []int{T + 16}},
		} {
			c.name, c.ix = ixc.name+"/"+c.name, ixc.ix
			cases = append(cases, c)
		}
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := paging.Config{PageSize: c.P, Budget: c.budget, Sinks: c.sinks, Window: c.window, Layers: layers, KVHeads: kvHeads,
				Options: map[string]any{OptionKey: Use{Index: c.ix, Threshold: c.thresh}, paging.HostScores: !c.graph, KeepKey: c.keep}}
			mk := func() *selector {
				s, err := paging.New("squeezed", cfg)
				require.NoError(t, err)
				return s.(*selector)
			}
			cur, ref, ro := mk(), &refSelector{selector: mk()}, mk()
			require.Equal(t, c.graph, cur.UseGraphScores())
			require.Equal(t, c.graph, ref.UseGraphScores())
			require.Equal(t, c.graph, ro.UseGraphScores())
			rng := rand.New(rand.NewPCG(uint64(len(c.name)), uint64(c.budget)))
			query := func() []float32 {
				q := make([]float32, c.heads*d)
				G := c.heads / kvHeads
				for h := 0; h < c.heads; h++ {
					// Near a random token's cluster (topics), or random.
					hd := c.ix.Heads[1][h/G]
					j := int(hd.Assign[rng.IntN(len(hd.Assign))])
					for i := 0; i < d; i++ {
						q[h*d+i] = float32(rng.NormFloat64())
						if c.ix == topicIx {
							q[h*d+i] = hd.Centroids[j*d+i] + 0.3*q[h*d+i]
						}
					}
				}
				return q
			}
			same := func(what string, layer int, qs *paging.Queries, upto int) {
				t.Helper()
				want := ref.Select(layer, nil, qs, upto)
				got := cur.Select(layer, nil, qs, upto)
				require.Equal(t, want, got, "%s: layer %d at %d", what, layer, upto)
				var roq *paging.Queries
				if qs != nil {
					roq = &paging.Queries{Q: qs.Q, Heads: qs.Heads, RowsSuffice: true}
				}
				short := ro.Select(layer, nil, roq, upto)
				if qs == nil || got.Rows == nil {
					require.Equal(t, got, short, "%s: layer %d at %d: the full form without queries or rows", what, layer, upto)
				} else {
					require.True(t, short.RowsOnly, "%s: layer %d at %d: rows-only when they suffice", what, layer, upto)
					require.Equal(t, got.Rows, short.Rows, "%s: layer %d at %d: the rows", what, layer, upto)
					for g := range got.Tokens {
						n := len(c.ix.Heads[layer][g].tokens) // the order's end
						full := got.Tokens[g]
						suffix := full[countBelow32(full, n):]
						require.Equal(t, suffix, short.Tokens[g], "%s: layer %d group %d at %d: the loose tokens", what, layer, g, upto)
						require.NotNil(t, short.Tokens[g], "a token-granular group lists tokens")
						var pages []int
						for _, tk := range suffix {
							if p := int(tk) / c.P; len(pages) == 0 || pages[len(pages)-1] != p {
								pages = append(pages, p)
							}
						}
						require.Equal(t, len(pages), len(short.Groups[g]), "%s: layer %d group %d: the loose tokens' pages", what, layer, g)
						if len(pages) > 0 {
							require.Equal(t, pages, short.Groups[g], "%s: layer %d group %d: the loose tokens' pages", what, layer, g)
						}
					}
				}
				if c.budget < upto {
					for g := range got.Tokens {
						require.LessOrEqual(t, len(got.Tokens[g]), c.budget)
					}
				}
			}
			steps := 0
			for _, upto := range c.uptos {
				question := &paging.Queries{Q: [][]float32{query(), query(), query()}, Heads: c.heads}
				for l := range layers {
					same("question", l, question, upto)
				}
				for step := range 14 {
					upto++
					for l := range layers {
						if !c.graph {
							same(fmt.Sprint("step ", step), l, &paging.Queries{Q: [][]float32{query()}, Heads: c.heads}, upto)
							continue
						}
						if step > 0 && cur.GraphScores(l, 1, upto-1) {
							// The scores the graph computed in the last step:
							// scores[h·k + r] = q_h · rows[g·k + r].
							rows, k, _ := cur.Centroids(l)
							refRows, refK, _ := ref.Centroids(l)
							ro.Centroids(l) // the graph's rows, as the cache reads them
							require.Equal(t, rows, refRows)
							require.Equal(t, k, refK)
							q := query()
							scores := make([]float32, c.heads*k)
							G := c.heads / kvHeads
							for h := 0; h < c.heads; h++ {
								g := h / G
								matVec(scores[h*k:(h+1)*k], rows[g*k*d:(g+1)*k*d], q[h*d:(h+1)*d])
							}
							cur.Scored(l, scores, upto-1)
							ref.Scored(l, scores, upto-1)
							ro.Scored(l, scores, upto-1)
						}
						same(fmt.Sprint("graph step ", step), l, nil, upto)
					}
					steps++
				}
			}
			require.Positive(t, steps)
			if !c.thresh && !c.graph && c.ix == random && c.heads == 8 {
				require.NotNil(t, cur.flatHead(1, 0), "random centroids are scored flat after the probing lookups")
			}
		})
	}
}

// Transposed.Scores (score4AVX2 where vek runs its AVX2 kernel) gives
// the scores vek32.MatMul_Into gave, bit for bit, whatever K (AVX-512
// tiles of 32 columns and AVX2 ones of 16 and 8 after them; blocks
// with a partial last one, K below one tile of 8 or 16), the GQA size
// (4 and 8 through the kernel, 2 and 3 through vek) and headDim, with
// zeros, signed zeros and values of very different magnitudes in the
// queries and centroids (where a different summation order or a
// separate rounding of each product would show).
func TestScoresMatchVek(t *testing.T) {
	for _, tc := range []struct{ k, g, d int }{
		{1, 4, 32}, {2, 4, 32}, {40, 4, 32}, {104, 4, 32}, {777, 4, 32}, {7, 4, 32}, {8, 4, 32}, {9, 4, 32}, {17, 4, 32}, {24, 4, 32},
		{3272, 4, 32}, {1601, 8, 16}, {800, 4, 128}, {100, 4, 1}, {50, 2, 32}, {41, 3, 8},
	} {
		t.Run(fmt.Sprintf("K%d G%d d%d", tc.k, tc.g, tc.d), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(tc.k), uint64(tc.g*tc.d)))
			val := func() float32 {
				switch r := rng.IntN(20); {
				case r == 0:
					return 0
				case r == 1:
					return float32(math.Copysign(0, -1))
				case r == 2:
					return float32(rng.NormFloat64() * 1e6)
				case r == 3:
					return float32(rng.NormFloat64() * 1e-6)
				}
				return float32(rng.NormFloat64())
			}
			h := &Head{D: tc.d, Centroids: make([]float32, tc.k*tc.d), Sizes: make([]int32, tc.k)}
			for i := range h.Centroids {
				h.Centroids[i] = val()
			}
			tr := h.Transpose(tc.g)
			var tmp []float32
			for range 4 {
				q := make([]float32, tc.g*tc.d)
				for i := range q {
					q[i] = val()
				}
				want := make([]float32, tc.g*tc.k)
				oldTranspose(h, tc.g).Scores(want, q, nil)
				got := make([]float32, tc.g*tc.k)
				tmp = tr.Scores(got, q, tmp)
				for i := range want {
					if math.Float32bits(want[i]) != math.Float32bits(got[i]) {
						t.Fatalf("score %d (head %d, centroid %d): %g (%08x), vek %g (%08x)", i, i/tc.k, i%tc.k,
							got[i], math.Float32bits(got[i]), want[i], math.Float32bits(want[i]))
					}
				}
			}
		})
	}
}

// radixSort32 sorts non-negative keys of any width (1 to 4 passes, an
// odd number of passes ending in the other buffer), duplicates kept.
func TestRadixSort32(t *testing.T) {
	rng := rand.New(rand.NewPCG(8, 8))
	for _, width := range []int{0, 1, 8, 9, 16, 17, 24, 31} {
		for _, n := range []int{0, 1, 2, 33, 1700} {
			t.Run(fmt.Sprintf("width %d, %d keys", width, n), func(t *testing.T) {
				keys := make([]int32, n)
				for i := range keys {
					keys[i] = int32(rng.Uint32() & (1<<width - 1))
					if i > 0 && i%7 == 0 {
						keys[i] = keys[i-1] // duplicates
					}
				}
				want := slices.Sorted(slices.Values(keys))
				var tmp []int32
				var hist [4][256]uint32
				require.True(t, slices.Equal(want, radixSort32(keys, &tmp, width, &hist)))
			})
		}
	}
}

// rowRuns gives the reference's runs (a bitmap over the head's rows)
// also where Select's bounds never lead: a tail reaching back past the
// clustered positions tailRows keeps (each tail row then found by a
// binary search and sorted), and fewer sinks than Config.Sinks (a
// sequence shorter than them).
func TestRowRunsFallbacks(t *testing.T) {
	const d, kvHeads, layers = 16, 2, 2
	ix := synthIndex(t, 3, layers, kvHeads, d, 6000, 100, 300)
	c := paging.Config{PageSize: 64, Budget: 2048, Layers: layers, KVHeads: kvHeads, Options: map[string]any{OptionKey: ix}}
	sel, err := paging.New("squeezed", c)
	require.NoError(t, err)
	s := sel.(*selector)
	h := ix.Heads[1][1]
	nA := len(h.Assign)
	rng := rand.New(rand.NewPCG(3, 3))
	for _, tc := range []struct{ sinks, tail, upto int }{
		{64, nA - 256, ix.Tokens + 5},      // the tail's rows from tailRows
		{64, nA - 256 - 70, ix.Tokens + 5}, // 70 tail tokens before tailRows' base
		{64, 64, ix.Tokens},                // every position in the tail
		{10, nA - 30, ix.Tokens + 1},       // 10 of the 64 sinks
		{0, nA + 3, ix.Tokens + 9},         // no sinks, an unclustered tail
	} {
		t.Run(fmt.Sprint(tc), func(t *testing.T) {
			s.taken = s.taken[:0]
			for range 40 {
				s.taken = append(s.taken, int32(rng.IntN(h.K())))
			}
			slices.Sort(s.taken)
			s.taken = slices.Compact(s.taken)
			var m rowMarks
			m.reset(nA)
			for _, j := range s.taken {
				m.cluster(h, j)
			}
			sr, _ := s.sinkRows(1, 1, h)
			for t := 0; t < tc.sinks && t < len(sr); t++ {
				m.mark(sr[t])
			}
			for t := tc.tail; t < tc.upto; t++ {
				m.token(h, int32(t))
			}
			require.Equal(t, m.appendRuns(nil), s.rowRuns(1, 1, h, tc.sinks, tc.tail, tc.upto, nil))
		})
	}
}

// countBelow32 is the number of ascending toks below n.
func countBelow32(toks []int32, n int) int {
	i, _ := slices.BinarySearch(toks, int32(n))
	return i
}
