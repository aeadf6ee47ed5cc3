package squeezed

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"
)

// blobs returns n points of dimension d around k random centres (spread
// 1) with Gaussian noise of deviation sigma.
func blobs(seed uint64, n, d, k int, sigma float64) []float32 {
	rng := rand.New(rand.NewPCG(seed, 7))
	centres := make([]float32, k*d)
	for i := range centres {
		centres[i] = float32(rng.NormFloat64())
	}
	x := make([]float32, n*d)
	for i := 0; i < n; i++ {
		c := rng.IntN(k)
		for t := 0; t < d; t++ {
			x[i*d+t] = centres[c*d+t] + float32(sigma*rng.NormFloat64())
		}
	}
	return x
}

// optimum is the least inertia of any partition of x's n points into k
// non-empty clusters, by enumerating every assignment (k^n).
func optimum(x []float32, d, k int) float64 {
	n := len(x) / d
	assign := make([]int, n)
	best := math.Inf(1)
	sum := make([]float64, k*d)
	cnt := make([]int, k)
	for {
		clear(sum)
		clear(cnt)
		for i, a := range assign {
			cnt[a]++
			for t := 0; t < d; t++ {
				sum[a*d+t] += float64(x[i*d+t])
			}
		}
		ok := true
		for _, c := range cnt {
			ok = ok && c > 0
		}
		if ok {
			var in float64
			for i, a := range assign {
				for t := 0; t < d; t++ {
					v := float64(x[i*d+t]) - sum[a*d+t]/float64(cnt[a])
					in += v * v
				}
			}
			best = min(best, in)
		}
		i := 0
		for ; i < n; i++ {
			assign[i]++
			if assign[i] < k {
				break
			}
			assign[i] = 0
		}
		if i == n {
			return best
		}
	}
}

// k-means++ then Lloyd, best of 20-50 restarts, lands within 3% of the
// exhaustive optimum on small overlapping data (a single start can stop in
// a local minimum on such tiny sets: 9 points in 4 clusters needs ~50).
func TestKMeansNearOptimum(t *testing.T) {
	for _, tc := range []struct {
		n, d, k  int
		sigma    float64
		restarts int
		within   float64
	}{
		{10, 2, 3, 0.6, 20, 0.03},
		{11, 3, 3, 0.8, 20, 0.03},
		{9, 4, 4, 0.5, 50, 0.03},
		{12, 2, 2, 0.8, 20, 0.03},
	} {
		for seed := uint64(1); seed <= 4; seed++ {
			t.Run(fmt.Sprintf("n%d_d%d_k%d/seed%d", tc.n, tc.d, tc.k, seed), func(t *testing.T) {
				x := blobs(seed, tc.n, tc.d, tc.k, tc.sigma)
				opt := optimum(x, tc.d, tc.k)
				r, err := KMeans(x, tc.d, KMeansOptions{K: tc.k, Restarts: tc.restarts, Seed: seed})
				require.NoError(t, err)
				require.LessOrEqual(t, r.Inertia, opt*(1+tc.within)+1e-6, "optimum %.5f", opt)
				require.GreaterOrEqual(t, r.Inertia, opt*(1-1e-5)-1e-6, "below the optimum: the inertia is miscomputed")
			})
		}
	}
}

// On well-separated blobs a single start finds the true clusters: every
// point with its blob-mates, inertia near n·d·σ².
func TestKMeansSeparatedBlobs(t *testing.T) {
	const n, d, k, sigma = 600, 16, 8, 0.02
	x := blobs(3, n, d, k, sigma)
	r, err := KMeans(x, d, KMeansOptions{K: k, Seed: 9, Restarts: 3})
	require.NoError(t, err)
	require.Less(t, r.Inertia, 1.5*n*d*sigma*sigma)
	var total int32
	for _, s := range r.Sizes {
		require.Positive(t, s)
		total += s
	}
	require.EqualValues(t, n, total)
}

func TestKMeansDeterministic(t *testing.T) {
	x := blobs(5, 500, 8, 20, 0.5)
	a, err := KMeans(x, 8, KMeansOptions{K: 25, Seed: 42})
	require.NoError(t, err)
	b, err := KMeans(x, 8, KMeansOptions{K: 25, Seed: 42})
	require.NoError(t, err)
	require.Equal(t, a, b)
	c, err := KMeans(x, 8, KMeansOptions{K: 25, Seed: 43})
	require.NoError(t, err)
	require.NotEqual(t, a.Assign, c.Assign, "another seed, another start")
}

// Duplicated points leave Lloyd with empty clusters unless they are
// refilled (ties go to the first centroid): every cluster ends with a
// point, sizes sum to n, no centroid is NaN.
func TestKMeansEmptyClusters(t *testing.T) {
	for _, tc := range []struct {
		name     string
		x        []float32
		k        int
		nonEmpty int
		inertia  float64
	}{
		{"distinct_equals_k", []float32{0, 0, 0, 0, 0, 0, 5, 5, 5, 5, -5, 5}, 3, 3, 0},
		{"duplicates_refilled", []float32{1, 1, 1, 1, 1, 1, 1, 1, 2, 2}, 3, 3, 0},
		{"one_cluster", []float32{1, 2, 3, 4, 5, 6}, 1, 1, 16},
		{"k_equals_n", []float32{0, 1, 2, 3, 4, 5, 6, 7}, 4, 4, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := KMeans(tc.x, 2, KMeansOptions{K: tc.k, Seed: 1})
			require.NoError(t, err)
			nonEmpty := 0
			var total int32
			for j, s := range r.Sizes {
				total += s
				if s > 0 {
					nonEmpty++
				}
				for _, v := range r.Centroids[j*2 : j*2+2] {
					require.False(t, math.IsNaN(float64(v)))
				}
			}
			require.EqualValues(t, len(tc.x)/2, total)
			require.Equal(t, tc.nonEmpty, nonEmpty)
			require.InDelta(t, tc.inertia, r.Inertia, 1e-6)
		})
	}
	// More clusters than blobs: Lloyd empties some along the way, and each
	// is refilled with the farthest point.
	x := blobs(11, 200, 4, 10, 0.05)
	r, err := KMeans(x, 4, KMeansOptions{K: 10, Seed: 2, MaxIter: 50})
	require.NoError(t, err)
	for _, s := range r.Sizes {
		require.Positive(t, s)
	}
}

func TestKMeansBadInput(t *testing.T) {
	for _, tc := range []struct {
		name string
		x    []float32
		d    int
		o    KMeansOptions
		want string
	}{
		{"k_zero", []float32{1, 2}, 1, KMeansOptions{}, "K = 0"},
		{"k_too_big", []float32{1, 2}, 1, KMeansOptions{K: 3}, "K = 3 clusters for 2 points"},
		{"ragged", []float32{1, 2, 3}, 2, KMeansOptions{K: 1}, "dimension 2"},
		{"negative", []float32{1, 2}, 1, KMeansOptions{K: 1, MaxIter: -1}, "MaxIter -1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := KMeans(tc.x, tc.d, tc.o)
			require.ErrorContains(t, err, tc.want)
		})
	}
}

// A sampled fit (k-means++ and Lloyd on a quarter of the points, then one
// or more Lloyd iterations over every point, from its nearest fitted
// centroid) lands within a few % of plain
// k-means' inertia over every point, on structured keys like a document's
// (topics within themes) and on blobs; it is deterministic for a seed,
// leaves no cluster empty, and a sample of every point is plain k-means.
func TestKMeansSampled(t *testing.T) {
	for _, tc := range []struct {
		name     string
		x        []float32
		d, k     int
		fullIter int
		within   float64
	}{
		{"topics", topicKeys(3, 8000, 32, 60), 32, 400, 1, 0.05},
		{"topics, 3 full iterations", topicKeys(3, 8000, 32, 60), 32, 400, 3, 0.03},
		{"blobs", blobs(4, 6000, 16, 100, 0.3), 16, 300, 1, 0.05},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := len(tc.x) / tc.d
			full, err := KMeans(tc.x, tc.d, KMeansOptions{K: tc.k, Seed: 5})
			require.NoError(t, err)
			o := KMeansOptions{K: tc.k, Seed: 5, Sample: n / 4, FullIter: tc.fullIter}
			s, err := KMeans(tc.x, tc.d, o)
			require.NoError(t, err)
			t.Logf("inertia plain %.2f (%d iterations), sampled %.2f (%+.2f%%, %d iterations)", full.Inertia, full.Iters, s.Inertia, 100*(s.Inertia/full.Inertia-1), s.Iters)
			require.LessOrEqual(t, s.Inertia, full.Inertia*(1+tc.within))
			again, err := KMeans(tc.x, tc.d, o)
			require.NoError(t, err)
			require.Equal(t, s, again, "deterministic for a seed")
			var total int32
			for _, sz := range s.Sizes {
				require.Positive(t, sz)
				total += sz
			}
			require.EqualValues(t, n, total)
			// The assignment is each point's nearest final centroid up to the
			// last means update: recompute the inertia from it.
			var in float64
			for i, a := range s.Assign {
				in += float64(sqdist(tc.x[i*tc.d:(i+1)*tc.d], s.Centroids[int(a)*tc.d:int(a+1)*tc.d]))
			}
			require.InDelta(t, in, s.Inertia, 1e-6*in)
		})
	}
	x := blobs(6, 500, 8, 20, 0.5)
	plain, err := KMeans(x, 8, KMeansOptions{K: 25, Seed: 42})
	require.NoError(t, err)
	whole, err := KMeans(x, 8, KMeansOptions{K: 25, Seed: 42, Sample: 500})
	require.NoError(t, err)
	require.Equal(t, plain, whole, "a sample of every point is plain k-means")
}

func TestSampleSize(t *testing.T) {
	for _, c := range []struct{ n, k, want int }{
		{1000, 50, 1000},     // small: every point
		{16284, 814, 2048},   // 16k: the minimum (an eighth is 2036)
		{65436, 3272, 8180},  // 64k: an eighth
		{20000, 4000, 8000},  // many clusters: 2 points each
		{100000, 100, 12500}, // few clusters: an eighth
		{3000, 2000, 3000},   // 2 per cluster exceeds the points
	} {
		require.Equal(t, c.want, sampleSize(c.n, c.k, DefaultSample), "n %d, k %d", c.n, c.k)
	}
}
