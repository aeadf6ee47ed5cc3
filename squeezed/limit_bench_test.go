package squeezed

import (
	"math/rand/v2"
	"os"
	"slices"
	"testing"

	"github.com/viterin/vek/vek32"
)

// BenchmarkStepLimit measures, on one core, what squeezed's selection and
// gather must cost per decode step at the very least, against what the
// default path does now, on the clusters of a stored document
// ($KVRECALL_BENCH_CLUSTERS: its .kvs file, tiny preset: 4 layers × 2 KV
// heads × headDim 32, 65536 tokens; a copy of `bench speed --data-dir`'s
// document). One op is one decode step: 4 layers × 2 KV heads × 4 query
// heads (GQA 4), budget 2048, random queries (the tiny preset's weights
// are random, and its keys have no structure for the hierarchy to prune).
//
//	KVRECALL_BENCH_CLUSTERS=/tmp/sq64/llama-tiny-f16/speed-hyper-all-65536/pages-ca0cf8b2f72aded3.kvs \
//	    go test ./squeezed -run XXX -bench StepLimit -benchtime 300x
//
// Parts:
//   - centroids-stream: one pass reading every centroid of the step (f32),
//     the memory floor of any exact scoring;
//   - score-batched: scoring every centroid for the KV head's 4 query heads
//     at once (blocked transposed centroids, one read of them);
//   - top: today's default lookup (Head.Top per query head, hierarchical);
//   - batched-topscores: score-batched, then TopScores per query head;
//   - batched-rank: score-batched, then TopRanked per head;
//   - batched-rank-sampled: the same with TopRanked's former ranking
//     (topRankedSampled: quickselected cuts, scalar filter, comparison
//     sort; the same answer), run beside it so that the machine's drift
//     cancels in the ratio;
//   - gather-*: reading each selected token's key and value row (128 bytes
//     f16 per KV head) from a 64k-token mirror of 16 MiB per layer, 2048
//     sorted random positions per KV head (other ones at each step), into
//     a staging buffer: plain, after touching every row first (the misses
//     overlap), and the floor's read of 2048 consecutive tokens (as many
//     bytes). The centroids, by contrast, are read at every step and stay
//     cached here (3.3 MiB); cold, they would cost their bytes at memory
//     bandwidth.
//
// The stored document's shape: the tiny preset at 64k, decoded with GQA
// 4 and a 2048-token budget.
const benchLayers, benchKVHeads, benchD, benchTokens, benchG, benchBudget = 4, 2, 32, 65536, 4, 2048

// storedClusters reads $KVRECALL_BENCH_CLUSTERS, a stored 64k tiny-preset
// clusters file (a copy of bench speed --data-dir's), or skips b.
func storedClusters(b *testing.B) *Index {
	path := os.Getenv("KVRECALL_BENCH_CLUSTERS")
	if path == "" {
		b.Skip("set KVRECALL_BENCH_CLUSTERS to a stored 64k tiny-preset clusters file (a copy)")
	}
	ix, err := ReadFile(path, benchLayers, benchKVHeads, benchD, benchTokens)
	if err != nil {
		b.Fatal(err)
	}
	return ix
}

func BenchmarkStepLimit(b *testing.B) {
	const layers, kvHeads, d, tokens, G, budget = benchLayers, benchKVHeads, benchD, benchTokens, benchG, benchBudget
	ix := storedClusters(b)
	rng := rand.New(rand.NewPCG(1, 2))
	qs := make([][]float32, 64) // per step: [G·d] queries of one KV head, reused across heads
	for i := range qs {
		qs[i] = make([]float32, G*d)
		for t := range qs[i] {
			qs[i][t] = float32(rng.NormFloat64())
		}
	}
	type head struct {
		h  *Head
		ct *Transposed
	}
	var hs []head
	for l := range layers {
		for g := range kvHeads {
			h := ix.Heads[l][g]
			hs = append(hs, head{h, h.Transpose(G)})
		}
	}
	b.Logf("K per head %d (coarse %d), d %d", hs[0].h.K(), len(hs[0].h.Radius), d)
	var sc Scratch
	out := make([]int32, 0, 8192)
	scores := make([]float32, G*hs[0].h.K()+64)
	var tmp []float32
	b.Run("centroids-stream", func(b *testing.B) {
		var s float32
		for range b.N {
			for _, x := range hs {
				s += vek32.Sum(x.h.Centroids)
			}
		}
		_ = s
	})
	b.Run("score-batched", func(b *testing.B) {
		for i := range b.N {
			for _, x := range hs {
				tmp = x.ct.Scores(scores, qs[i%len(qs)], tmp)
			}
		}
	})
	b.Run("top", func(b *testing.B) {
		for i := range b.N {
			for _, x := range hs {
				for j := range G {
					out = x.h.Top(qs[i%len(qs)][j*d:(j+1)*d], budget, &sc, out[:0])
				}
			}
		}
	})
	b.Run("batched-topscores", func(b *testing.B) {
		for i := range b.N {
			for _, x := range hs {
				k := x.h.K()
				tmp = x.ct.Scores(scores, qs[i%len(qs)], tmp)
				for j := range G {
					out = x.h.TopScores(scores[j*k:(j+1)*k], budget, &sc, out[:0])
				}
			}
		}
	})
	b.Run("batched-rank", func(b *testing.B) {
		for i := range b.N {
			for _, x := range hs {
				k := x.h.K()
				tmp = x.ct.Scores(scores, qs[i%len(qs)], tmp)
				for j := range G {
					out = x.h.TopRanked(scores[j*k:(j+1)*k], budget, &sc, out[:0])
				}
			}
		}
	})
	b.Run("batched-rank-sampled", func(b *testing.B) {
		for i := range b.N {
			for _, x := range hs {
				k := x.h.K()
				tmp = x.ct.Scores(scores, qs[i%len(qs)], tmp)
				for j := range G {
					out = x.h.topRankedSampled(scores[j*k:(j+1)*k], budget, &sc, out[:0])
				}
			}
		}
	})
	// The gather: a layer's mirror is [tokens][kvHeads][2·d] f16 (K then V).
	row := 2 * d // uint16 per token and KV head
	arena := make([][]uint16, layers)
	for l := range arena {
		arena[l] = make([]uint16, tokens*kvHeads*row)
		for i := range arena[l] {
			arena[l][i] = uint16(i)
		}
	}
	// Each step draws other positions (the paper's selection changes ~86%
	// of a KV head's tokens per step on this preset): 32 sets, cycled, so
	// the rows a step reads are not still cached from the step before.
	const sets = 32
	pos := make([][][]int32, sets)
	for s := range pos {
		pos[s] = make([][]int32, layers*kvHeads)
		for i := range pos[s] {
			p := rng.Perm(tokens)[:budget]
			pos[s][i] = make([]int32, budget)
			for j, t := range p {
				pos[s][i][j] = int32(t)
			}
			slices.Sort(pos[s][i])
		}
	}
	stage := make([]uint16, budget*row)
	gather := func(touch bool) func(b *testing.B) {
		return func(b *testing.B) {
			var sink uint16
			for i := range b.N {
				for l := range layers {
					a := arena[l]
					for g := range kvHeads {
						ps := pos[i%sets][l*kvHeads+g]
						if touch {
							for _, t := range ps {
								o := (int(t)*kvHeads + g) * row
								sink += a[o] + a[o+row-1]
							}
						}
						for j, t := range ps {
							o := (int(t)*kvHeads + g) * row
							copy(stage[j*row:(j+1)*row], a[o:o+row])
						}
					}
				}
			}
			_ = sink
		}
	}
	b.Run("gather-plain", gather(false))
	b.Run("gather-touched", gather(true))
	b.Run("read-consecutive", func(b *testing.B) {
		for i := range b.N {
			for l := range layers {
				at := (i * 4096 % (tokens - budget)) * kvHeads * row
				copy(stage, arena[l][at:at+budget*row]) // one KV head's worth of bytes, twice below
				copy(stage, arena[l][at+budget*row:at+2*budget*row])
			}
		}
	})
}
