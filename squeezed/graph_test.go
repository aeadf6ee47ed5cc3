package squeezed

import (
	"math/rand/v2"
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
