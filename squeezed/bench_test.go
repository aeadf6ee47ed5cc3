package squeezed

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

// synthHead builds the index of an n-token document without clustering
// its keys (k-means over 256k keys takes minutes, and lookup is what is
// measured): K = 5% of n fine centroids of n/K tokens each, drawn from
// the same two-level topic mixture as topicKeys (√K themes), then the
// hierarchy over them as Build makes it.
func synthHead(tb testing.TB, n, d int, structured bool) *Head {
	k := n / 20
	c := topicKeys(uint64(n), k, d, k/4)
	if !structured {
		c = randomKeys(uint64(n), k, d)
	}
	h := &Head{D: d, Centroids: c, Sizes: make([]int32, k)}
	for j := range h.Sizes {
		h.Sizes[j] = int32(n / k)
	}
	ratio := max(1, int(math.Sqrt(float64(k))))
	if err := h.buildHierarchy((k+ratio-1)/ratio, KMeansOptions{Seed: 1, MaxIter: 10}); err != nil {
		tb.Fatal(err)
	}
	return h
}

// BenchmarkLookup: one query head's lookup of the clusters that fill a
// 2048-token budget, flat (every centroid) and hierarchical (coarse
// centroids, then the members of the coarse clusters whose bound can
// still beat the budget's cut-off), at 16k, 64k and 256k keys of
// dimension 128. Queries are keys of the document (a topic plus noise).
// "topics" centroids come from the two-level mixture; "random" ones are
// isotropic Gaussian, where no bound prunes (the hierarchy's worst case).
// scored/op counts the centroids scored per lookup.
func BenchmarkLookup(b *testing.B) {
	const d = 128
	for _, kind := range []string{"topics", "random"} {
		for _, n := range []int{16 << 10, 64 << 10, 256 << 10} {
			benchLookup(b, kind, n, d)
		}
	}
}

func benchLookup(b *testing.B, kind string, n, d int) {
	{
		h := synthHead(b, n, d, kind == "topics")
		rng := rand.New(rand.NewPCG(9, 9))
		qs := make([][]float32, 64)
		for i := range qs {
			j := rng.IntN(h.K())
			qs[i] = make([]float32, d)
			for t := range qs[i] {
				qs[i][t] = h.Centroids[j*d+t] + float32(0.1*rng.NormFloat64())
			}
		}
		var sc Scratch
		out := make([]int32, 0, 4096)
		b.Run(fmt.Sprintf("%s/flat/%dk", kind, n>>10), func(b *testing.B) {
			sc.Scored = 0
			for i := 0; i < b.N; i++ {
				out = h.FlatTop(qs[i%len(qs)], 2048, &sc, out[:0])
			}
			b.ReportMetric(float64(sc.Scored)/float64(b.N), "scored/op")
		})
		b.Run(fmt.Sprintf("%s/hier/%dk", kind, n>>10), func(b *testing.B) {
			sc.Scored = 0
			for i := 0; i < b.N; i++ {
				out = h.Top(qs[i%len(qs)], 2048, &sc, out[:0])
			}
			b.ReportMetric(float64(sc.Scored)/float64(b.N), "scored/op")
		})
	}
}
