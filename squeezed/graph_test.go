package squeezed

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/paging"
)

// Decode steps scored in the graph (paging.CentroidScored) choose what the
// host lookup chooses for the same query, one step late: the scores are
// computed here as the cache's mul_mat computes them (every query head
// against its KV head's rows of Centroids, [heads][k]), handed over with
// Scored, and the next step's Select (no queries) must list exactly the
// tokens and pages that the host path's Select lists for that query at
// the next step's position, in budget mode and in threshold mode (log Z
// from the coarse rows' scores). The first decode step after a question
// keeps the question's clusters. The kvcache side (the same scores from
// ggml on the CPU backend) is TestGraphCentroidsMatchHostLookup.
func TestGraphScoresMatchHostLookup(t *testing.T) {
	const d, kvHeads, tokens, P = 16, 2, 4000, 16
	keys := func(l, g, n int, dst []float32) []float32 { return topicKeys(uint64(5+3*l+g), n, d, 40) }
	ix, err := Build(keys, 2, kvHeads, d, tokens, Options{Seed: 2, Window: 100})
	require.NoError(t, err)
	ix.Threshold = 2e-4 // a few dozen clusters pass for a query near a centroid
	for _, tc := range []struct {
		name   string
		heads  int
		budget int
		thresh bool
	}{
		{"budget mode, GQA 2", 4, 1024, false},
		{"budget mode, GQA 4", 8, 512, false},
		{"threshold mode", 4, 1024, true},
		{"budget all but spent", 4, 64 + 64 + 120, false}, // sinks + window + a few clusters
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := func(host bool) paging.Config {
				return paging.Config{PageSize: P, Budget: tc.budget, Sinks: 64, Window: 64, DenseLayers: 1, Layers: 2, KVHeads: kvHeads,
					Options: map[string]any{OptionKey: Use{Index: ix, Threshold: tc.thresh}, paging.HostScores: host}}
			}
			gsel, err := paging.New("squeezed", cfg(false))
			require.NoError(t, err)
			hsel, err := paging.New("squeezed", cfg(true))
			require.NoError(t, err)
			gs := gsel.(paging.CentroidScored)
			require.True(t, gs.UseGraphScores())
			require.False(t, hsel.(paging.GraphScored).UseGraphScores(), "HostScores keeps the host lookup")
			require.True(t, gsel.NeedQueries(1, 5), "a question is looked up on the host")
			require.False(t, gsel.NeedQueries(1, 1), "a decode step needs no queries on the host")
			require.True(t, hsel.NeedQueries(1, 1))
			require.False(t, gsel.NeedQueries(0, 1), "dense layer")
			require.False(t, gs.GraphScores(0, 1, tokens), "dense layer")
			require.False(t, gs.GraphScores(1, 5, tokens), "a question")

			rng := rand.New(rand.NewPCG(7, uint64(tc.heads)))
			// Queries near the centroid of a random token's cluster.
			query := func() []float32 {
				q := make([]float32, tc.heads*d)
				G := tc.heads / kvHeads
				for h := 0; h < tc.heads; h++ {
					hd := ix.Heads[1][h/G]
					j := int(hd.Assign[rng.IntN(len(hd.Assign))])
					for i := 0; i < d; i++ {
						q[h*d+i] = hd.Centroids[j*d+i] + float32(0.3*rng.NormFloat64())
					}
				}
				return q
			}
			// The question (3 tokens) is looked up on the host by both.
			upto := tokens + 3
			question := [][]float32{query(), query(), query()}
			want := hsel.Select(1, nil, &paging.Queries{Q: question, Heads: tc.heads}, upto)
			require.Equal(t, want, gsel.Select(1, nil, &paging.Queries{Q: question, Heads: tc.heads}, upto))
			// The first decode step has no scores yet: the question's
			// clusters, at its own position.
			upto++
			require.Equal(t, hsel.Select(1, nil, &paging.Queries{Q: question, Heads: tc.heads}, upto), gsel.Select(1, nil, nil, upto))

			rows, k, version := gs.Centroids(1)
			require.Len(t, rows, kvHeads*k*d)
			// k is a multiple of centRowAlign (ggml's fast matmul path),
			// and the rows past a head's own are zero.
			require.Zero(t, k%centRowAlign, "k = %d", k)
			require.GreaterOrEqual(t, k, maxOwn(ix.Heads[1]))
			require.Less(t, k-maxOwn(ix.Heads[1]), centRowAlign, "no more padding than the alignment needs")
			for g, h := range ix.Heads[1] {
				own := h.K() + len(h.Radius)
				for _, v := range rows[(g*k+own)*d : (g+1)*k*d] {
					require.Zero(t, v, "head %d's padding", g)
				}
			}
			_, _, v2 := gs.Centroids(1)
			require.Equal(t, version, v2, "the same rows keep their version")
			checked := 0
			for step := 0; step < 12; step++ {
				q := query()
				if !gs.GraphScores(1, 1, upto) {
					break // the tail has the whole budget: nothing to score
				}
				// What the graph computes: scores[h·k + r] = q_h · rows[g·k + r].
				scores := make([]float32, tc.heads*k)
				G := tc.heads / kvHeads
				for h := 0; h < tc.heads; h++ {
					g := h / G
					matVec(scores[h*k:(h+1)*k], rows[g*k*d:(g+1)*k*d], q[h*d:(h+1)*d])
				}
				gs.Scored(1, scores, upto)
				upto++
				got := gsel.Select(1, nil, nil, upto)
				want := hsel.Select(1, nil, &paging.Queries{Q: [][]float32{q}, Heads: tc.heads}, upto)
				require.Equal(t, want.Groups, got.Groups, "step %d: pages", step)
				require.Equal(t, want.Tokens, got.Tokens, "step %d: tokens", step)
				for g := range got.Tokens {
					require.LessOrEqual(t, len(got.Tokens[g]), tc.budget)
				}
				checked++
			}
			require.Positive(t, checked)
		})
	}
}

// TopScores (the ranking of scores computed in the graph) gives fill's
// answer over every cluster (FlatTop's rule), whatever the budget, the
// cluster sizes and ties among the scores (quantised scores), including
// budgets larger than the estimate it starts from and than the document.
func TestTopScoresMatchesFill(t *testing.T) {
	for _, tc := range []struct {
		name       string
		k, maxSize int
		levels     int // scores quantised to this many values (0: continuous)
		budgets    []int
		skewed     bool
	}{
		{"continuous", 800, 40, 0, []int{1, 100, 1700, 20000}, false},
		{"ties", 800, 40, 7, []int{1, 100, 1700}, false},
		{"skewed sizes", 3000, 200, 0, []int{50, 2048, 9000}, true},
		{"few clusters", 5, 10, 3, []int{1, 4, 100}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(tc.k), 1))
			h := &Head{Sizes: make([]int32, tc.k)}
			total := 0
			for j := range h.Sizes {
				sz := 1 + rng.IntN(tc.maxSize)
				if tc.skewed && j%10 != 0 {
					sz = 1 + rng.IntN(3) // most clusters tiny, a few huge: the mean misleads the estimate
				}
				h.Sizes[j] = int32(sz)
				total += sz
			}
			h.Assign = make([]int32, total)
			for trial := 0; trial < 20; trial++ {
				score := make([]float32, tc.k)
				for j := range score {
					score[j] = float32(rng.NormFloat64())
					if tc.levels > 0 {
						score[j] = float32(rng.IntN(tc.levels))
					}
				}
				for _, budget := range tc.budgets {
					var sc Scratch
					cand := make([]int32, tc.k)
					for j := range cand {
						cand[j] = int32(j)
					}
					want := h.fill(score, cand, budget, nil)
					got := h.TopScores(score, budget, &sc, nil)
					require.Equal(t, want, got, "trial %d budget %d", trial, budget)
				}
			}
		})
	}
}

// KeepKey's hysteresis keeps the clusters the last decode step took while
// other clusters do not score that much higher: with a margin no score
// reaches, consecutive steps attend to nearly the same cluster tokens
// (only what the shrinking budget no longer fits changes), where the
// paper's rule (0) follows each step's queries.
func TestKeepHoldsClusters(t *testing.T) {
	const d, heads, kvHeads, tokens, P = 16, 4, 2, 4000, 16
	keys := func(l, g, n int, dst []float32) []float32 { return topicKeys(uint64(9+g), n, d, 40) }
	ix, err := Build(keys, 1, kvHeads, d, tokens, Options{Seed: 4, Window: 100})
	require.NoError(t, err)
	overlap := map[float64]float64{}
	for _, keep := range []float64{0, 1e9} {
		t.Run(fmt.Sprint("keep=", keep), func(t *testing.T) {
			c := paging.Config{PageSize: P, Budget: 1024, Sinks: 64, Window: 64, Layers: 1, KVHeads: kvHeads,
				Options: map[string]any{OptionKey: ix, KeepKey: keep, paging.HostScores: false}}
			sel, err := paging.New("squeezed", c)
			require.NoError(t, err)
			gs := sel.(paging.CentroidScored)
			require.True(t, gs.UseGraphScores())
			rows, k, _ := gs.Centroids(0)
			rng := rand.New(rand.NewPCG(3, 3))
			upto := tokens + 1
			sel.Select(0, nil, &paging.Queries{Q: [][]float32{randQuery(rng, heads*d)}, Heads: heads}, upto)
			var prev [][]int32
			same, all := 0, 0
			for step := 0; step < 10; step++ {
				q := randQuery(rng, heads*d)
				scores := make([]float32, heads*k)
				for h := 0; h < heads; h++ {
					g := h / (heads / kvHeads)
					matVec(scores[h*k:(h+1)*k], rows[g*k*d:(g+1)*k*d], q[h*d:(h+1)*d])
				}
				gs.Scored(0, scores, upto)
				upto++
				s := sel.Select(0, nil, nil, upto)
				// The cluster tokens: below the clustered end, past the sinks.
				cur := make([][]int32, kvHeads)
				for g, toks := range s.Tokens {
					for _, tk := range toks {
						if tk >= 64 && int(tk) < ix.Clustered {
							cur[g] = append(cur[g], tk)
						}
					}
					require.Greater(t, len(cur[g]), 500, "clusters fill the budget")
					if prev != nil {
						for _, tk := range cur[g] {
							if slices.Contains(prev[g], tk) {
								same++
							}
							all++
						}
					}
				}
				prev = cur
			}
			overlap[keep] = float64(same) / float64(all)
		})
	}
	require.Greater(t, overlap[1e9], 0.9, "held clusters stay")
	require.Less(t, overlap[0], overlap[1e9]-0.2, "without the hysteresis the clusters follow the queries")
}

func randQuery(rng *rand.Rand, n int) []float32 {
	q := make([]float32, n)
	for i := range q {
		q[i] = float32(rng.NormFloat64())
	}
	return q
}

// Both modes keep the host lookup unless paging.HostScores is set to
// false (one step late lost needles).
func TestGraphScoresDefaults(t *testing.T) {
	ix, err := Build(func(l, g, n int, dst []float32) []float32 { return topicKeys(1, n, 8, 4) }, 1, 1, 8, 400, Options{})
	require.NoError(t, err)
	ix.Threshold = 1e-3
	for _, tc := range []struct {
		name  string
		use   Use
		extra map[string]any
		want  bool
	}{
		{"budget", Use{Index: ix}, nil, false},
		{"budget, host scores off", Use{Index: ix}, map[string]any{paging.HostScores: false}, true},
		{"budget, host scores", Use{Index: ix}, map[string]any{paging.HostScores: true}, false},
		{"threshold", Use{Index: ix, Threshold: true}, nil, false},
		{"threshold, host scores off", Use{Index: ix, Threshold: true}, map[string]any{paging.HostScores: false}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := map[string]any{OptionKey: tc.use}
			for k, v := range tc.extra {
				o[k] = v
			}
			sel, err := paging.New("squeezed", paging.Config{PageSize: 16, Budget: 1024, Options: o})
			require.NoError(t, err)
			require.Equal(t, tc.want, sel.(paging.GraphScored).UseGraphScores())
			require.Equal(t, !tc.want, sel.NeedQueries(0, 1))
		})
	}
}

// A one-token pass ranked from its own centroid scores computed in the
// graph (paging.StepScored, Queries.Scores) selects what the host lookup
// of the same query selects, at the same position: no lag. The scores are
// computed here as the cache's mul_mat computes them ([heads][k] against
// Centroids' rows). The kvcache side (ggml's scores, in the graph) is
// TestTokenPoolsMatchFloat64Reference's "scored in the graph" mode.
func TestStepScoresMatchHostLookup(t *testing.T) {
	const d, kvHeads, tokens, P = 16, 2, 4000, 16
	keys := func(l, g, n int, dst []float32) []float32 { return topicKeys(uint64(5+3*l+g), n, d, 40) }
	ix, err := Build(keys, 2, kvHeads, d, tokens, Options{Seed: 2, Window: 100})
	require.NoError(t, err)
	ix.Threshold = 2e-4
	for _, tc := range []struct {
		name     string
		heads    int
		budget   int
		thresh   bool
		rowsOnly bool
	}{
		{"budget mode, GQA 2", 4, 1024, false, false},
		{"budget mode, GQA 4", 8, 512, false, false},
		{"budget mode, rows only", 4, 1024, false, true},
		{"threshold mode", 4, 1024, true, false},
		{"budget all but spent", 4, 64 + 64 + 120, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := func(step bool) paging.Config {
				return paging.Config{PageSize: P, Budget: tc.budget, Sinks: 64, Window: 64, DenseLayers: 1, Layers: 2, KVHeads: kvHeads,
					Options: map[string]any{OptionKey: Use{Index: ix, Threshold: tc.thresh}, paging.StepScoresKey: step}}
			}
			ssel, err := paging.New("squeezed", cfg(true))
			require.NoError(t, err)
			hsel, err := paging.New("squeezed", cfg(false))
			require.NoError(t, err)
			ss := ssel.(paging.StepScored)
			require.True(t, ss.StepScores(1))
			require.False(t, ss.StepScores(0), "dense layer")
			require.False(t, hsel.(paging.StepScored).StepScores(1), "StepScoresKey false")
			require.True(t, ssel.NeedQueries(1, 1), "the queries still come to the selection")

			rows, k, _ := ss.Centroids(1)
			G := tc.heads / kvHeads
			rng := rand.New(rand.NewPCG(9, uint64(tc.heads)))
			query := func() []float32 {
				q := make([]float32, tc.heads*d)
				for h := 0; h < tc.heads; h++ {
					hd := ix.Heads[1][h/G]
					j := int(hd.Assign[rng.IntN(len(hd.Assign))])
					for i := 0; i < d; i++ {
						q[h*d+i] = hd.Centroids[j*d+i] + float32(0.3*rng.NormFloat64())
					}
				}
				return q
			}
			scoresOf := func(q []float32) []float32 {
				scores := make([]float32, tc.heads*k)
				for h := 0; h < tc.heads; h++ {
					g := h / G
					matVec(scores[h*k:(h+1)*k], rows[g*k*d:(g+1)*k*d], q[h*d:(h+1)*d])
				}
				return scores
			}
			upto := tokens + 3
			for step := 0; step < 12; step++ {
				q := query()
				want := hsel.Select(1, nil, &paging.Queries{Q: [][]float32{q}, Heads: tc.heads, RowsSuffice: tc.rowsOnly}, upto)
				got := ssel.Select(1, nil, &paging.Queries{Q: [][]float32{q}, Heads: tc.heads, RowsSuffice: tc.rowsOnly, Scores: scoresOf(q)}, upto)
				require.Equal(t, want, got, "step %d", step)
				// The scores decide, not the queries: another query's
				// scores select what its host lookup selects.
				if q2 := query(); step%4 == 1 {
					want := hsel.Select(1, nil, &paging.Queries{Q: [][]float32{q2}, Heads: tc.heads, RowsSuffice: tc.rowsOnly}, upto)
					got := ssel.Select(1, nil, &paging.Queries{Q: [][]float32{q}, Heads: tc.heads, RowsSuffice: tc.rowsOnly, Scores: scoresOf(q2)}, upto)
					require.Equal(t, want, got, "step %d, another query's scores", step)
					if tc.budget > 64+64+120 {
						require.NotEqual(t, hsel.Select(1, nil, &paging.Queries{Q: [][]float32{q}, Heads: tc.heads, RowsSuffice: tc.rowsOnly}, upto), got, "step %d: the two queries select alike", step)
					}
				}
				// A question (several tokens) is looked up on the host,
				// whatever scores come with it.
				if step == 0 {
					qs := [][]float32{q, q}
					require.Equal(t, hsel.Select(1, nil, &paging.Queries{Q: qs, Heads: tc.heads}, upto),
						ssel.Select(1, nil, &paging.Queries{Q: qs, Heads: tc.heads, Scores: scoresOf(query())}, upto))
				}
				upto++
			}
			require.Panics(t, func() {
				ssel.Select(1, nil, &paging.Queries{Q: [][]float32{make([]float32, tc.heads*d)}, Heads: tc.heads, Scores: make([]float32, k)}, upto)
			}, "scores of the wrong length are the cache's bug")
		})
	}
}

// With lagged graph scores (UseGraphScores), decode steps take those, not
// their own.
func TestStepScoresOffWhenLagged(t *testing.T) {
	const d, kvHeads, tokens = 16, 2, 2000
	keys := func(l, g, n int, dst []float32) []float32 { return topicKeys(uint64(11+l+g), n, d, 20) }
	ix, err := Build(keys, 2, kvHeads, d, tokens, Options{Seed: 1, Window: 50})
	require.NoError(t, err)
	sel, err := paging.New("squeezed", paging.Config{PageSize: 16, Budget: 512, DenseLayers: 1, Layers: 2, KVHeads: kvHeads,
		Options: map[string]any{OptionKey: ix, paging.HostScores: false}})
	require.NoError(t, err)
	ss := sel.(paging.StepScored)
	require.True(t, ss.StepScores(1))
	require.True(t, ss.UseGraphScores())
	require.False(t, ss.StepScores(1))
}

// maxOwn is the most centroid rows (fine and coarse) of any of heads.
func maxOwn(heads []*Head) int {
	m := 0
	for _, h := range heads {
		m = max(m, h.K()+len(h.Radius))
	}
	return m
}
