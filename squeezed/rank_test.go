package squeezed

import (
	"math"
	"math/rand/v2"
	"sort"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/paging"
)

// TopRanked gives fill's (FlatTop's) answer: the sampled cuts change what
// is sorted, never the order or the prefix. Cases where the first cut is
// too high on purpose (the best clusters small, so many more are needed
// than the mean size suggests), ties across cuts (quantised scores),
// zeros of both signs, budgets past the whole document, heads too small
// for the sample (TopScores).
func TestTopRankedMatchesFill(t *testing.T) {
	for _, tc := range []struct {
		name       string
		k, maxSize int
		levels     int // scores quantised to this many values (0: continuous)
		budgets    []int
		smallBest  bool // the best-scoring clusters are the smallest
		zeros      bool
	}{
		{"continuous", 3272, 40, 0, []int{1, 100, 1948, 2048, 9000, 200000}, false, false},
		{"ties", 3272, 40, 9, []int{1, 100, 1948, 5000}, false, false},
		{"ties, fine", 5000, 40, 300, []int{1948, 5000}, false, false},
		{"best clusters small", 3272, 40, 0, []int{500, 1948, 2048}, true, false},
		{"signed zeros", 2000, 30, 3, []int{100, 1948}, false, true},
		{"below the sample (TopScores)", 800, 40, 0, []int{1, 1700}, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(tc.k), 7))
			h := &Head{Sizes: make([]int32, tc.k)}
			total := 0
			for j := range h.Sizes {
				h.Sizes[j] = int32(1 + rng.IntN(tc.maxSize))
				total += int(h.Sizes[j])
			}
			h.Assign = make([]int32, total)
			fallbacks := 0
			for trial := 0; trial < 20; trial++ {
				score := make([]float32, tc.k)
				for j := range score {
					score[j] = float32(rng.NormFloat64())
					if tc.levels > 0 {
						score[j] = float32(rng.IntN(tc.levels)) - float32(tc.levels/2)
					}
					if tc.zeros && score[j] == 0 && j%2 == 0 {
						score[j] = float32(math.Copysign(0, -1))
					}
					if tc.smallBest && score[j] > 1 {
						h.Sizes[j] = 1
					}
				}
				for _, budget := range tc.budgets {
					var sc Scratch
					cand := make([]int32, tc.k)
					for j := range cand {
						cand[j] = int32(j)
					}
					want := h.fill(score, cand, budget, nil)
					got := h.TopRanked(score, budget, &sc, []int32{-1})
					require.Equal(t, int32(-1), got[0], "TopRanked must append to out")
					require.Equal(t, want, got[1:], "trial %d budget %d", trial, budget)
					if mean := max(1, total/tc.k); len(want) > (budget/mean+1)*5/4+16 {
						fallbacks++ // the first cut could not hold the answer: later bands were used
					}
				}
			}
			if tc.smallBest {
				require.Positive(t, fallbacks, "the case meant to need bands below the first cut never did")
			}
		})
	}
}

// Transposed.Scores equals one dot product per query head and centroid
// (within f32 rounding of another summation order), for block counts of
// one, several and a partial last block.
func TestTransposedScores(t *testing.T) {
	for _, tc := range []struct {
		name    string
		k, d, g int
	}{
		{"one block", 100, 32, 4},
		{"partial last block", 3272, 32, 4},
		{"headDim 128, GQA 2", 1000, 128, 2},
		{"one query head", 777, 64, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(tc.k), uint64(tc.d)))
			h := &Head{D: tc.d, Centroids: make([]float32, tc.k*tc.d), Sizes: make([]int32, tc.k)}
			for i := range h.Centroids {
				h.Centroids[i] = float32(rng.NormFloat64())
			}
			q := make([]float32, tc.g*tc.d)
			for i := range q {
				q[i] = float32(rng.NormFloat64())
			}
			tr := h.Transpose(tc.g)
			dst := make([]float32, tc.g*tc.k)
			tr.Scores(dst, q, nil)
			for hd := range tc.g {
				for j := range tc.k {
					var want float64
					for i := range tc.d {
						want += float64(q[hd*tc.d+i]) * float64(h.Centroids[j*tc.d+i])
					}
					require.InDelta(t, want, dst[hd*tc.k+j], 1e-4*math.Sqrt(float64(tc.d)), "head %d centroid %d", hd, j)
				}
			}
		})
	}
}

// The default host lookup in budget mode probes each head's hierarchy and
// scores a head whose coarse bounds do not prune flat (Transposed, then
// TopRanked): its selections equal those of the hierarchical lookup
// (Head.Top for every query head) step by step, on random keys (where the
// flat path is taken, which the test checks) and on topic keys (where the
// hierarchy prunes and stays), for single-token steps and a two-token
// question.
func TestFlatLookupMatchesHierarchy(t *testing.T) {
	const d, heads, kvHeads, tokens, P = 32, 8, 2, 24000, 64
	for _, tc := range []struct {
		name     string
		keys     func(l, g, n int, dst []float32) []float32
		wantFlat bool
	}{
		{"random keys", func(l, g, n int, dst []float32) []float32 { return randomKeys(uint64(5+g), n, d) }, true},
		{"topic keys", func(l, g, n int, dst []float32) []float32 { return topicKeys(uint64(5+g), n, d, 400) }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ix, err := Build(tc.keys, 1, kvHeads, d, tokens, Options{Seed: 3, Window: 100})
			require.NoError(t, err)
			require.GreaterOrEqual(t, ix.Heads[0][0].K(), 4*rankSample, "K large enough for TopRanked's sampled cuts")
			c := paging.Config{PageSize: P, Budget: 2048, Sinks: 16, Window: 64, Layers: 1, KVHeads: kvHeads,
				Options: map[string]any{OptionKey: ix}}
			a, err := paging.New("squeezed", c)
			require.NoError(t, err)
			b, err := paging.New("squeezed", c)
			require.NoError(t, err)
			hier := b.(*selector)
			for g := range kvHeads {
				hier.flatHead(0, g)
				hier.probed[0][g][0] = probeLookups // decided: hierarchical
			}
			rng := rand.New(rand.NewPCG(11, 12))
			query := func() []float32 {
				q := make([]float32, heads*d)
				for i := range q {
					q[i] = float32(rng.NormFloat64())
				}
				if !tc.wantFlat { // near a key of the document: the hierarchy's case
					for h := range heads {
						j := rng.IntN(tokens - 200)
						copy(q[h*d:(h+1)*d], tc.keys(0, h/(heads/kvHeads), tokens, nil)[j*d:(j+1)*d])
					}
				}
				return q
			}
			for step := 0; step < 24; step++ {
				qs := [][]float32{query()}
				if step == 0 {
					qs = append(qs, query()) // a two-token question
				}
				upto := tokens + step
				want := b.Select(0, nil, &paging.Queries{Q: qs, Heads: heads}, upto)
				got := a.Select(0, nil, &paging.Queries{Q: qs, Heads: heads}, upto)
				require.Equal(t, want.Tokens, got.Tokens, "step %d", step)
				require.Equal(t, want.Groups, got.Groups, "step %d", step)
			}
			for g := range kvHeads {
				tr := a.(*selector).flatTr[0][g]
				require.Equal(t, tc.wantFlat, tr != nil, "KV head %d scored flat", g)
				if tr != nil {
					require.Same(t, ix.Heads[0][g].Flat(heads/kvHeads), tr, "the layout is the index's, shared by sessions")
				}
			}
		})
	}
}

// Head.Flat makes one layout per head and GQA size, shared by concurrent
// callers, and keeps the Head plain data (a copy of the index compares
// equal to the original after Flat was used on it).
func TestFlatShared(t *testing.T) {
	h := &Head{D: 8, Centroids: make([]float32, 40*8), Sizes: make([]int32, 40)}
	clone := &Head{D: 8, Centroids: make([]float32, 40*8), Sizes: make([]int32, 40)}
	got := make([]*Transposed, 8)
	done := make(chan int)
	for i := range got {
		go func() { got[i] = h.Flat(4); done <- i }()
	}
	for range got {
		<-done
	}
	for i := range got {
		require.Same(t, got[0], got[i], "caller %d", i)
	}
	require.NotSame(t, got[0], h.Flat(2), "another GQA size, another layout")
	require.Equal(t, clone, h, "Flat leaves the Head unchanged")
}

// A NaN score in TopRanked's sample must not empty the answer (a NaN cut
// passes no score): it gives TopScores' answer, which ranks without a
// sampled cut, after what out already held.
func TestTopRankedNaNInSample(t *testing.T) {
	const k = 3272
	rng := rand.New(rand.NewPCG(5, 11))
	h := &Head{Sizes: make([]int32, k)}
	total := 0
	for j := range h.Sizes {
		h.Sizes[j] = int32(1 + rng.IntN(40))
		total += int(h.Sizes[j])
	}
	h.Assign = make([]int32, total)
	stride := k / rankSample
	for _, tc := range []struct {
		name string
		nans []int // clusters whose score is NaN
	}{
		{"one sampled", []int{7 * stride}},
		{"many sampled", []int{0, stride, 2 * stride, 100 * stride, 255 * stride}},
		{"sampled and not", []int{3 * stride, 3*stride + 1, 17}},
		{"half the sample", sampled(stride, 2)},
		{"the whole sample", sampled(stride, 1)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			score := make([]float32, k)
			for j := range score {
				score[j] = float32(rng.NormFloat64())
			}
			for _, j := range tc.nans {
				score[j] = float32(math.NaN())
			}
			for _, budget := range []int{100, 2048} {
				var sc, sc2 Scratch
				got := h.TopRanked(score, budget, &sc, []int32{-1})
				want := h.TopScores(score, budget, &sc2, []int32{-1})
				require.Equal(t, int32(-1), got[0])
				require.Greater(t, len(got), 1, "budget %d: no cluster chosen", budget)
				require.Equal(t, want, got, "budget %d", budget)
				tok := 0
				for _, j := range got[1:] {
					tok += int(h.Sizes[j])
				}
				require.GreaterOrEqual(t, tok, budget, "budget %d: the chosen clusters do not fill it", budget)
			}
		})
	}
}

// sampled lists every every-th cluster TopRanked samples (stride apart).
func sampled(stride, every int) []int {
	var js []int
	for i := 0; i < rankSample; i += every {
		js = append(js, i*stride)
	}
	return js
}

// rankReference is the answer TopRanked must give, written the plain
// way: every cluster sorted by score, best first (−0 and +0 equal, as
// float comparison has them), ties by the lower cluster (a stable sort
// of the clusters in order), then taken while the tokens taken fall
// short of budget. No NaN in score.
func rankReference(score []float32, sizes []int32, budget int) []int32 {
	order := make([]int32, len(score))
	for j := range order {
		order[j] = int32(j)
	}
	sort.SliceStable(order, func(a, b int) bool { return score[order[a]] > score[order[b]] })
	out := []int32{}
	tok := 0
	for _, j := range order {
		if tok >= budget {
			break
		}
		out = append(out, j)
		tok += int(sizes[j])
	}
	return out
}

// TopRanked equals the plain reference over many random heads and score
// lists: K above and below the sampled path's 1024 (down to 0) and not a
// multiple of the mask's 64-cluster words, empty clusters, scores
// continuous, tied (a few levels, so bands and radix digits tie), of both
// zero signs, with +Inf and/or −Inf (both: vek32.Sum is NaN, the old
// ranking's path), a few huge outliers (a sample whose bisection bounds
// are far apart), scores within 1e-5 of each other but one (radix digits
// too coarse to order them), all equal, the best clusters small (more
// bands); budgets from below one cluster to past every token. The old
// ranking (topRankedSampled) is checked against the same reference: the
// answer did not change.
func TestTopRankedProperty(t *testing.T) {
	kinds := []string{"continuous", "levels", "zeros", "+inf", "-inf", "both inf", "outliers", "near-equal, one far", "equal", "small best"}
	for _, kind := range kinds {
		t.Run(kind, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(len(kind)), 99))
			var sc Scratch // shared across cases: buffers grown by one size serve the next
			for trial := 0; trial < 40; trial++ {
				k := []int{1023, 1024, 1031, 2000, 3272, 4096, 6007, 0, 1, 5}[trial%10]
				h := &Head{Sizes: make([]int32, k)}
				total := 0
				for j := range h.Sizes {
					h.Sizes[j] = int32(rng.IntN(41)) // 0: an empty cluster
					total += int(h.Sizes[j])
				}
				h.Assign = make([]int32, total)
				score := make([]float32, k)
				scale := float32(math.Exp(rng.NormFloat64() * 3)) // |q| varies
				for j := range score {
					score[j] = scale * float32(rng.NormFloat64())
					switch kind {
					case "levels":
						score[j] = float32(rng.IntN(5+trial)) - 3
					case "zeros":
						score[j] = float32(rng.IntN(3) - 1)
						if score[j] == 0 && rng.IntN(2) == 0 {
							score[j] = float32(math.Copysign(0, -1))
						}
					case "+inf", "-inf", "both inf":
						if rng.IntN(50) == 0 {
							sign := 1
							if kind == "-inf" || kind == "both inf" && rng.IntN(2) == 0 {
								sign = -1
							}
							score[j] = float32(math.Inf(sign))
						}
					case "outliers":
						if rng.IntN(400) == 0 {
							score[j] = 1e30 * float32(rng.NormFloat64())
						}
					case "near-equal, one far": // radixSortHi's digits coarse: its insertion pass hands over to slices.Sort
						score[j] = 1 + 1e-5*float32(rng.NormFloat64())
						if j == 5 {
							score[j] = 1e30
						}
					case "equal":
						score[j] = 0.5
					case "small best":
						if score[j] > scale {
							h.Sizes[j] = 1
						}
					}
				}
				if kind == "small best" {
					total = 0
					for _, s := range h.Sizes {
						total += int(s)
					}
				}
				for _, budget := range []int{-1, 0, 1, 7, 500, 2048, 9000, total, total + 1} {
					want := rankReference(score, h.Sizes, budget)
					got := h.TopRanked(score, budget, &sc, []int32{-1})
					require.Equal(t, int32(-1), got[0], "TopRanked must append to out")
					require.Equal(t, want, got[1:], "trial %d K %d budget %d", trial, k, budget)
					old := h.topRankedSampled(score, budget, &sc, []int32{})
					require.Equal(t, want, old, "the old ranking: trial %d K %d budget %d", trial, k, budget)
				}
			}
		})
	}
}

// With NaN scores, TopRanked's answer is the old ranking's
// (topRankedSampled), whatever the NaNs' places: sampled or not, many,
// beside infinities, every score.
func TestTopRankedNaNAsBefore(t *testing.T) {
	const k = 3272
	rng := rand.New(rand.NewPCG(8, 8))
	h := &Head{Sizes: make([]int32, k)}
	total := 0
	for j := range h.Sizes {
		h.Sizes[j] = int32(1 + rng.IntN(40))
		total += int(h.Sizes[j])
	}
	h.Assign = make([]int32, total)
	for _, tc := range []struct {
		name string
		rate int // one score in rate is NaN
		inf  bool
	}{
		{"rare", 1000, false},
		{"one in ten", 10, false},
		{"with infinities", 50, true},
		{"all", 1, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for trial := 0; trial < 10; trial++ {
				score := make([]float32, k)
				for j := range score {
					score[j] = float32(rng.NormFloat64())
					if tc.inf && rng.IntN(30) == 0 {
						score[j] = float32(math.Inf(1 - 2*rng.IntN(2)))
					}
				}
				score[rng.IntN(k)] = float32(math.NaN()) // at least one
				for j := range score {
					if rng.IntN(tc.rate) == 0 {
						score[j] = float32(math.NaN())
					}
				}
				for _, budget := range []int{1, 2048, total + 1} {
					var sc, sc2 Scratch
					want := h.topRankedSampled(score, budget, &sc2, nil)
					got := h.TopRanked(score, budget, &sc, nil)
					require.Equal(t, want, got, "trial %d budget %d", trial, budget)
				}
			}
		})
	}
}

// A warm Scratch ranks without allocating.
func TestTopRankedAllocs(t *testing.T) {
	const k = 3272
	rng := rand.New(rand.NewPCG(4, 4))
	h := &Head{Sizes: make([]int32, k)}
	total := 0
	for j := range h.Sizes {
		h.Sizes[j] = int32(1 + rng.IntN(40))
		total += int(h.Sizes[j])
	}
	h.Assign = make([]int32, total)
	score := make([]float32, k)
	for j := range score {
		score[j] = float32(rng.NormFloat64())
	}
	var sc Scratch
	out := make([]int32, 0, k)
	out = h.TopRanked(score, total, &sc, out[:0]) // grows every buffer: one band of all K
	allocs := testing.AllocsPerRun(50, func() {
		for _, b := range []int{1, 2048, 20000} {
			out = h.TopRanked(score, b, &sc, out[:0])
		}
	})
	require.Zero(t, allocs)
}
