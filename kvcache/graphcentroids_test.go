package kvcache_test

import (
	"context"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/ollama/ollama/ml"
	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/paging"
	"github.com/kvrecall/kvrecall/runtime"
	"github.com/kvrecall/kvrecall/squeezed"
)

// centroidRecorder is a squeezed selector that also records the centroid
// scores the cache computes in the graph (by the upto of the pass that
// scored them) and the selection each pass used.
type centroidRecorder struct {
	paging.Selector
	cs     paging.CentroidScored
	scores map[int][]float32
	last   paging.Selection
}

func (r *centroidRecorder) UseGraphScores() bool { return r.cs.UseGraphScores() }
func (r *centroidRecorder) GraphScores(layer, batch, upto int) bool {
	return r.cs.GraphScores(layer, batch, upto)
}
func (r *centroidRecorder) Centroids(layer int) ([]float32, int, uint64) {
	return r.cs.Centroids(layer)
}

// TokenOrder forwards squeezed's cluster order (paging.TokenOrdered), so
// that the steps stage runs of the document's ordered copy, the default.
func (r *centroidRecorder) TokenOrder(layer, group int) (order, blocks []int32) {
	return r.Selector.(paging.TokenOrdered).TokenOrder(layer, group)
}

func (r *centroidRecorder) Scored(layer int, s []float32, upto int) {
	r.scores[upto] = slices.Clone(s)
	r.cs.Scored(layer, s, upto)
}

func (r *centroidRecorder) Select(layer int, s paging.Summaries, q *paging.Queries, upto int) paging.Selection {
	r.last = r.Selector.Select(layer, s, q, upto)
	return r.last
}

// Decode steps under squeezed score the centroids in the graph (no host
// round trip of queries, no graph split): on the CPU backend the scores
// equal the host's products of each query head with its KV head's
// centroid rows, and every step attends to exactly the tokens the host
// lookup (paging.HostScores) chooses for the previous step's query at
// this step's position (the first decode step: the question's), in budget
// and threshold mode, with KV heads as separate token-granular groups.
// The step's attention matches float64 attention over those tokens.
func TestGraphCentroidsMatchHostLookup(t *testing.T) {
	m, err := runtime.Open(context.Background(), testmodels.Random(t, "llama", "tiny", foundry.F32, 4, false), runtime.Options{Threads: 2, ContextLength: 256})
	require.NoError(t, err)
	defer m.Close()
	b := m.Backend()
	for _, tc := range []struct {
		name           string
		prompt, budget int
		thresh         bool
	}{
		{"budget mode", 900, 12 * tPage, false},
		{"threshold mode", 900, 12 * tPage, true},
		{"small budget", 600, 6 * tPage, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const steps, window = 20, 32
			r := rand.New(rand.NewPCG(11, uint64(tc.prompt)))
			n := tc.prompt
			allK, allV := randoms(r, n*tKV*tDim), randoms(r, n*tKV*tDim)
			// Keys with topics, so that clusters differ by more than
			// rounding: each token leans towards one of 24 directions.
			dirs := randoms(r, 24*tKV*tDim)
			for i := 0; i < n; i++ {
				c := r.IntN(24)
				for j := 0; j < tKV*tDim; j++ {
					allK[i*tKV*tDim+j] = 0.4*allK[i*tKV*tDim+j] + 2*dirs[c*tKV*tDim+j]
				}
			}
			keys := func(l, g, n int, dst []float32) []float32 {
				dst = dst[:0]
				for i := 0; i < n; i++ {
					for j := 0; j < tDim; j++ {
						// Clustered as cached: f16.
						dst = append(dst, float32(f16(allK[(i*tKV+g)*tDim+j])))
					}
				}
				return dst
			}
			ix, err := squeezed.Build(keys, 1, tKV, tDim, n, squeezed.Options{Seed: 3, Window: window})
			require.NoError(t, err)
			ix.Threshold = 5e-3
			cfg := func(host bool) paging.Config {
				return paging.Config{PageSize: tPage, Budget: tc.budget, Sinks: tPage, Window: 2 * tPage, Layers: 1, KVHeads: tKV,
					Options: map[string]any{squeezed.OptionKey: squeezed.Use{Index: ix, Threshold: tc.thresh}, paging.HostScores: host}}
			}
			inner, err := paging.New("squeezed", cfg(false))
			require.NoError(t, err)
			sel := &centroidRecorder{Selector: inner, cs: inner.(paging.CentroidScored), scores: map[int][]float32{}}
			host, err := paging.New("squeezed", cfg(true))
			require.NoError(t, err)

			capacity := n + steps + 1
			c, err := kvcache.NewPaged(kvcache.Options{Layout: tLayout, Heads: tHeads, Selector: sel, Capacity: capacity, MaxBatch: n})
			require.NoError(t, err)
			defer c.Close()
			c.Init(b, ml.DTypeF16, 1, capacity, n)
			question := randoms(r, n*tHeads*tDim)
			passQueries(t, b, c, 0, question, allK, allV)
			require.Empty(t, sel.scores, "the question is looked up on the host")
			qrows := func(q []float32) [][]float32 {
				var rows [][]float32
				for i := 0; i < len(q)/(tHeads*tDim); i++ {
					rows = append(rows, q[i*tHeads*tDim:(i+1)*tHeads*tDim])
				}
				return rows
			}
			prev := qrows(question)
			rows, k, _ := sel.Centroids(0)
			G := tHeads / tKV
			for step := 0; step < steps; step++ {
				pos := n + step
				q := randoms(r, tHeads*tDim)
				kk, vv := randoms(r, tKV*tDim), randoms(r, tKV*tDim)
				allK, allV = append(allK, kk...), append(allV, vv...)
				out := passQueries(t, b, c, pos, q, kk, vv)
				require.False(t, c.NeedQueries(0), "a decode step must not split the graph")
				// This step attended to what the host lookup chooses for
				// the previous step's queries.
				want := host.Select(0, nil, &paging.Queries{Q: prev, Heads: tHeads}, pos+1)
				require.Equal(t, want.Tokens, sel.last.Tokens, "step %d: tokens", step)
				require.Equal(t, want.Groups, sel.last.Groups, "step %d: pages", step)
				toks := sel.last.Tokens
				ref := referenceAt(q, allK, allV, pos, func(g, p int) bool {
					_, ok := slices.BinarySearch(toks[g], int32(p))
					return ok || p == pos
				})[0]
				worst := 0.0
				for j := range out {
					worst = math.Max(worst, math.Abs(float64(out[j])-ref[j]))
				}
				require.Less(t, worst, 2e-3, "step %d: attention over the selected tokens", step)
				// The scores the graph computed for this step's query.
				got, ok := sel.scores[pos+1]
				require.True(t, ok, "step %d computed no centroid scores in the graph", step)
				require.Len(t, got, tHeads*k)
				scale := 0.0
				wantS := make([]float64, len(got))
				for h := 0; h < tHeads; h++ {
					g := h / G
					for j := 0; j < k; j++ {
						dot := 0.0
						for i := 0; i < tDim; i++ {
							dot += float64(q[h*tDim+i]) * float64(rows[(g*k+j)*tDim+i])
						}
						wantS[h*k+j], scale = dot, math.Max(scale, math.Abs(dot))
					}
				}
				for i := range got {
					require.InDelta(t, wantS[i], got[i], 1e-5*scale, "step %d score %d", step, i)
				}
				prev = [][]float32{q}
			}
			if kvcache.TokenStaging {
				st := c.Stats()
				require.Positive(t, st.StagedFromCopy+st.InPlaceRows, "the steps read runs of the cluster-ordered copy (staged, or in place: InPlaceRuns)")
				require.Equal(t, int64(ix.Clustered*tKV*tDim*2*2), st.OrderedBytes, "one copy of the clustered keys and values per KV head")
				require.Zero(t, st.TokenUploads, "no token pools")
			}
			require.Equal(t, int64(tLayout.Layers*tDim*k*tKV*4), c.Stats().SummaryBytes,
				"the centroid tensors, f32 [headDim, k, kvHeads] per layer, are counted")
		})
	}
}
