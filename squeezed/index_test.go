package squeezed

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"
)

// randomKeys returns n keys of dimension d, Gaussian (no structure).
func randomKeys(seed uint64, n, d int) []float32 {
	rng := rand.New(rand.NewPCG(seed, 1))
	x := make([]float32, n*d)
	for i := range x {
		x[i] = float32(rng.NormFloat64())
	}
	return x
}

// topicKeys returns n keys of dimension d drawn from a two-level mixture:
// √topics themes, each with topics/√topics topics near it, each key near
// its topic. Documents are like this: keys of one subject resemble each
// other, subjects group into themes.
func topicKeys(seed uint64, n, d, topics int) []float32 {
	rng := rand.New(rand.NewPCG(seed, 2))
	themes := max(1, int(math.Sqrt(float64(topics))))
	vec := func(scale float64, base []float32) []float32 {
		v := make([]float32, d)
		for i := range v {
			v[i] = float32(scale * rng.NormFloat64())
			if base != nil {
				v[i] += base[i]
			}
		}
		return v
	}
	th := make([][]float32, themes)
	for i := range th {
		th[i] = vec(1, nil)
	}
	tp := make([][]float32, topics)
	for i := range tp {
		tp[i] = vec(0.3, th[i%themes])
	}
	x := make([]float32, 0, n*d)
	for i := 0; i < n; i++ {
		x = append(x, vec(0.1, tp[rng.IntN(topics)])...)
	}
	return x
}

func headOf(t testing.TB, keys []float32, d, k int) *Head {
	h, err := cluster(keys, d, k, max(1, int(math.Sqrt(float64(k)))), KMeansOptions{Seed: 1, MaxIter: 10})
	require.NoError(t, err)
	require.NoError(t, h.check(len(keys)/d))
	return h
}

// The hierarchy's bound admits every coarse cluster holding a centroid
// above the threshold, so it returns exactly the flat scan's clusters, on
// unstructured and on structured keys, at thresholds from loose to tight;
// and its top-budget lookup exactly the flat one's.
func TestHierarchyMatchesFlat(t *testing.T) {
	const d = 32
	for _, data := range []struct {
		name string
		keys []float32
	}{
		{"random", randomKeys(1, 3000, d)},
		{"topics", topicKeys(2, 3000, d, 64)},
	} {
		h := headOf(t, data.keys, d, 150)
		rng := rand.New(rand.NewPCG(3, 3))
		var sc Scratch
		for i := 0; i < 20; i++ {
			q := make([]float32, d)
			for j := range q {
				q[j] = float32(rng.NormFloat64())
			}
			scores := make([]float32, h.K())
			matVec(scores, h.Centroids, q)
			sorted := slices.Clone(scores)
			slices.Sort(sorted)
			for _, frac := range []float64{0.5, 0.9, 0.99} {
				tau := sorted[int(frac*float64(len(sorted)))]
				t.Run(fmt.Sprintf("%s/q%d/above%.2f", data.name, i, frac), func(t *testing.T) {
					flat := h.FlatAbove(q, tau, &sc, nil)
					require.NotEmpty(t, flat)
					require.Equal(t, flat, h.Above(q, tau, &sc, nil))
				})
			}
			for _, budget := range []int{1, 256, 2048} {
				t.Run(fmt.Sprintf("%s/q%d/top%d", data.name, i, budget), func(t *testing.T) {
					flat := h.FlatTop(q, budget, &sc, nil)
					require.NotEmpty(t, flat)
					require.Equal(t, flat, h.Top(q, budget, &sc, nil))
				})
			}
		}
	}
}

// Every fine cluster sits under exactly one coarse cluster, within its
// radius; the coarse centroid is the mean of every key under it.
func TestHierarchyShape(t *testing.T) {
	const d = 16
	keys := topicKeys(4, 2000, d, 30)
	h := headOf(t, keys, d, 100)
	require.Len(t, h.Members, 100)
	for p := 0; p+1 < len(h.Offsets); p++ {
		mean := make([]float64, d)
		var n int
		for _, j := range h.Members[h.Offsets[p]:h.Offsets[p+1]] {
			c := h.Centroids[int(j)*d : int(j+1)*d]
			require.LessOrEqual(t, math.Sqrt(float64(sqdist(c, h.Coarse[p*d:(p+1)*d]))), float64(h.Radius[p]))
			for _, tok := range h.Tokens(int(j)) {
				n++
				for i := 0; i < d; i++ {
					mean[i] += float64(keys[int(tok)*d+i])
				}
			}
		}
		for i := 0; i < d; i++ {
			require.InDelta(t, mean[i]/float64(n), h.Coarse[p*d+i], 1e-4)
		}
	}
}

// Centroids are means of the raw keys, while clusters follow directions:
// keys at the same direction and different norms share a cluster.
func TestClusterNormalisedKeys(t *testing.T) {
	keys := []float32{1, 0, 10, 0, 0, 1, 0, 3}
	h := headOf(t, keys, 2, 2)
	require.Equal(t, h.Assign[0], h.Assign[1])
	require.Equal(t, h.Assign[2], h.Assign[3])
	require.NotEqual(t, h.Assign[0], h.Assign[2])
	a := int(h.Assign[0])
	require.Equal(t, []float32{5.5, 0}, h.Centroids[a*2:a*2+2])
}

// S_j sums to one over the keys (Σ N_j S_j = 1), and the calibrated
// threshold is the quantile of every S_j.
func TestSharesAndCalibration(t *testing.T) {
	const d, heads, kvHeads, layers = 8, 4, 2, 2
	keys := func(l, g, n int, dst []float32) []float32 {
		return topicKeys(uint64(10*l+g), n, d, 8)
	}
	ix, err := Build(keys, layers, kvHeads, d, 500, Options{Window: 20, Seed: 1})
	require.NoError(t, err)
	require.Equal(t, 480, ix.Clustered)
	require.Equal(t, 24, ix.Heads[0][0].K())
	q := randomKeys(5, heads, d)
	s := ix.Heads[1][1].Shares(q[:d], nil)
	var total float64
	for j, v := range s {
		total += float64(v) * float64(ix.Heads[1][1].Sizes[j])
	}
	require.InDelta(t, 1, total, 1e-4)

	qs := make([][][]float32, layers)
	for l := range qs {
		for t := 0; t < 20; t++ {
			qs[l] = append(qs[l], randomKeys(uint64(100+t+l), heads, d))
		}
	}
	require.NoError(t, ix.Calibrate(qs, heads))
	var all []float32
	for l := range qs {
		for _, q := range qs[l] {
			for h := 0; h < heads; h++ {
				all = append(all, ix.Heads[l][h/2].Shares(q[h*d:(h+1)*d], nil)...)
			}
		}
	}
	below := 0
	for _, v := range all {
		if v < ix.Threshold {
			below++
		}
	}
	require.InDelta(t, 0.9, float64(below)/float64(len(all)), 0.01)
	require.ErrorContains(t, ix.Calibrate(qs[:1], heads), "for 1 layers")
}

func TestBuildDeterministic(t *testing.T) {
	keys := func(l, g, n int, dst []float32) []float32 { return topicKeys(uint64(l*7+g), n, 16, 12) }
	a, err := Build(keys, 3, 2, 16, 1200, Options{Seed: 5, Workers: 4})
	require.NoError(t, err)
	b, err := Build(keys, 3, 2, 16, 1200, Options{Seed: 5, Workers: 1})
	require.NoError(t, err)
	require.Equal(t, a, b)
	_, err = Build(keys, 1, 1, 16, 50, Options{})
	require.ErrorContains(t, err, "observation window")
	_, err = Build(keys, 1, 1, 16, 500, Options{Quantile: 1.5})
	require.ErrorContains(t, err, "quantile 1.5")
}

// nth is the element a sort would put at i, on random data, with ties and
// on sorted and reversed input.
func TestNth(t *testing.T) {
	rng := rand.New(rand.NewPCG(4, 5))
	for _, tc := range []struct {
		name string
		x    func(n int) []float32
	}{
		{"random", func(n int) []float32 {
			x := make([]float32, n)
			for i := range x {
				x[i] = float32(rng.NormFloat64())
			}
			return x
		}},
		{"few values", func(n int) []float32 {
			x := make([]float32, n)
			for i := range x {
				x[i] = float32(rng.IntN(3))
			}
			return x
		}},
		{"sorted", func(n int) []float32 {
			x := make([]float32, n)
			for i := range x {
				x[i] = float32(i)
			}
			return x
		}},
		{"reversed", func(n int) []float32 {
			x := make([]float32, n)
			for i := range x {
				x[i] = float32(n - i)
			}
			return x
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, n := range []int{1, 2, 3, 10, 1000} {
				x := tc.x(n)
				sorted := slices.Clone(x)
				slices.Sort(sorted)
				for _, i := range []int{0, n / 3, n / 2, n * 9 / 10, n - 1} {
					require.Equal(t, sorted[i], nth(slices.Clone(x), i), "n %d, index %d", n, i)
				}
			}
		})
	}
}
