package paging

import (
	"cmp"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"
)

// randomFake fills every page's box with random centers and radii.
func randomFake(pages, kvh, hd int, seed uint64) *boxFake {
	r := rand.New(rand.NewPCG(seed, 1))
	f := &boxFake{fake: newFake(pages, kvh, hd)}
	f.radius = make([][][]float32, pages)
	for p := 0; p < pages; p++ {
		f.radius[p] = make([][]float32, kvh)
		for g := 0; g < kvh; g++ {
			f.radius[p][g] = make([]float32, hd)
			for i := 0; i < hd; i++ {
				f.keys[p][g][i] = float32(r.NormFloat64())
				f.radius[p][g][i] = float32(r.Float64())
			}
		}
	}
	return f
}

// boxFake has boxes with a radius.
type boxFake struct {
	*fake
	radius [][][]float32
}

func (f *boxFake) Box(p, g int) ([]float32, []float32) { return f.keys[p][g], f.radius[p][g] }

func randomQueries(tokens, heads, hd int, seed uint64) *Queries {
	r := rand.New(rand.NewPCG(seed, 2))
	q := &Queries{Heads: heads}
	for t := 0; t < tokens; t++ {
		row := make([]float32, heads*hd)
		for i := range row {
			row[i] = float32(r.NormFloat64())
		}
		q.Q = append(q.Q, row)
	}
	return q
}

// packedFake adds PackedBoxes to boxFake.
type packedFake struct{ *boxFake }

func (f packedFake) PackedBoxes(g int) []float32 {
	var out []float32
	for p := 0; p < f.pages; p++ {
		c, r := f.Box(p, g)
		out = append(out, c...)
		out = append(out, r...)
	}
	return out
}

// The packed path computes the same bounds (up to summation order) and
// picks the same pages.
func TestQuestPackedBoxesMatchPerPageScores(t *testing.T) {
	for _, c := range []struct {
		name                      string
		pages, kvh, hd, heads, tk int
	}{
		{"tiny shape, one token", 300, 2, 32, 8, 1},
		{"1b shape, question", 600, 8, 64, 32, 5},
		{"MHA, partial last chunk", 257, 4, 16, 4, 2},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := randomFake(c.pages, c.kvh, c.hd, 7)
			q := randomQueries(c.tk, c.heads, c.hd, 7)
			n := c.pages + 2 // pages beyond the store score -Inf on both paths
			want := scorePages(f, q, n, boundScore)
			got := scoreBoxes(packedFake{f}, q, n)
			require.Len(t, got, len(want))
			for tk := range want {
				for p := range want[tk] {
					require.InDelta(t, want[tk][p], got[tk][p], 1e-4*(1+math.Abs(float64(want[tk][p]))), "token %d page %d", tk, p)
				}
			}
			pol, err := New("quest", Config{PageSize: 64, Budget: 2048})
			require.NoError(t, err)
			upto := c.pages * 64
			require.Equal(t, pol.Select(2, f, q, upto), pol.Select(2, packedFake{f}, q, upto))
		})
	}
}

// rank's bounded heap gives the prefix of a full stable sort: with many
// ties, with scores that grow or shrink with the page (every page beats
// the kept ones, or none does), and with -Inf and skipped pages.
func TestRankIsPrefixOfFullOrder(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 3))
	for _, c := range []struct {
		name  string
		score func(p int) float32
	}{
		{"many ties", func(int) float32 { return float32(r.IntN(40)) }},
		{"distinct", func(int) float32 { return float32(r.NormFloat64()) }},
		{"ascending", func(p int) float32 { return float32(p) }},
		{"descending", func(p int) float32 { return -float32(p) }},
		{"ascending in steps", func(p int) float32 { return float32(p / 7) }},
	} {
		scores := make([]float32, 500)
		for i := range scores {
			scores[i] = c.score(i)
		}
		scores[17] = float32(math.Inf(-1))
		skip := make([]bool, len(scores))
		skip[3], skip[250], skip[499] = true, true, true
		full := make([]int, 0, len(scores))
		for p := range scores {
			if !skip[p] {
				full = append(full, p)
			}
		}
		slices.SortStableFunc(full, func(a, b int) int { return cmp.Compare(scores[b], scores[a]) })
		for _, k := range []int{0, 1, 7, 64, 497, 498, 1000} {
			t.Run(fmt.Sprintf("%s/k=%d", c.name, k), func(t *testing.T) {
				got := rank(scores, skip, k)
				require.Equal(t, full[:min(k, len(full))], got)
			})
		}
	}
}

// A rankScratch reused across calls (the lagged rule keeps one for all
// layers and steps) selects what a fresh one selects: its mask, heap,
// order and bound buffers hold the last call's data, for more or fewer
// pages and a larger or smaller k, and a returned selection must not
// change when the scratch is used again.
func TestRankScratchReuseSelectsAsFresh(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 7))
	var sx rankScratch
	var held [][]int // earlier selections, with copies of what they were
	var want [][]int
	for i, c := range []struct{ pages, free, neighbors int }{
		{1025, 20, 0}, {64, 10, 1}, {2000, 40, 0}, {1025, 20, 0}, {300, 0, 0}, {40, 60, 2}, {1025, 25, 1},
	} {
		t.Run(fmt.Sprintf("%d/pages=%d,free=%d", i, c.pages, c.free), func(t *testing.T) {
			adj := sx.floats(c.pages)
			for p := range adj {
				adj[p] = float32(r.IntN(50)) // ties, as hysteresis makes
			}
			adj[c.pages/2] = float32(math.Inf(-1))
			scores := slices.Clone(adj)
			req := []int{0, 1, c.pages - 2, c.pages - 1}
			got := sx.topPages(req, adj, c.free, c.neighbors)
			require.Equal(t, topPages(req, scores, c.free, c.neighbors), got)
			require.Equal(t, rank(scores, make([]bool, c.pages), 2*c.free), sx.rank(adj, make([]bool, c.pages), 2*c.free))
			held, want = append(held, got), append(want, slices.Clone(got))
			for j := range held {
				require.Equal(t, want[j], held[j], "selection %d changed when the scratch was reused", j)
			}
		})
	}
}

// BenchmarkQuestSelect: one layer's decode-step selection of the tiny preset
// (8 query / 2 KV heads, head dim 32) at a 2048-token budget, scoring page by
// page and from boxes packed once (as the cache's layer views serve them
// between writes).
//
//	go test -run XXX -bench QuestSelect ./paging
func BenchmarkQuestSelect(b *testing.B) {
	for _, ctx := range []int{16384, 65536} {
		f := randomFake(ctx/64, 2, 32, 1)
		packed := make([][]float32, 2)
		for g := range packed {
			packed[g] = packedFake{f}.PackedBoxes(g)
		}
		for _, c := range []struct {
			name string
			s    Summaries
		}{{"per-page", f}, {"packed", cachedPacked{f, packed}}} {
			b.Run(fmt.Sprintf("context=%d/%s", ctx, c.name), func(b *testing.B) {
				q := randomQueries(1, 8, 32, 1)
				p, err := New("quest", Config{PageSize: 64, Budget: 2048})
				if err != nil {
					b.Fatal(err)
				}
				b.ReportAllocs()
				for b.Loop() {
					p.Select(1, c.s, q, ctx)
				}
			})
		}
	}
}

// cachedPacked serves boxes packed once, like the cache's layer views do
// between writes.
type cachedPacked struct {
	*boxFake
	boxes [][]float32
}

func (c cachedPacked) PackedBoxes(g int) []float32 { return c.boxes[g] }

// BenchmarkLaggedSelect: one layer's decode-step selection from bounds
// computed in the graph (GraphScored: Scored, then Select without
// queries), the tiny preset's 2048-token budget, with the default
// hysteresis. "random" bounds are independent per page; "ascending" ones
// grow with the page, each page beating the ones before it (the bounded
// heap's worst case).
//
//	go test -run XXX -bench LaggedSelect ./paging
func BenchmarkLaggedSelect(b *testing.B) {
	for _, ctx := range []int{16384, 65536} {
		pages := ctx / 64
		r := rand.New(rand.NewPCG(5, 6))
		for _, order := range []string{"random", "ascending"} {
			bounds := make([]float32, pages)
			for p := range bounds {
				bounds[p] = float32(r.NormFloat64() * 30)
				if order == "ascending" {
					bounds[p] = float32(p)
				}
			}
			b.Run(fmt.Sprintf("context=%d/%s", ctx, order), func(b *testing.B) {
				p, err := New("quest", Config{PageSize: 64, Budget: 2048})
				if err != nil {
					b.Fatal(err)
				}
				if !p.(GraphScored).UseGraphScores() {
					b.Fatal("quest took no graph scores")
				}
				s := newFake(pages, 2, 32)
				b.ReportAllocs()
				for b.Loop() {
					p.(GraphScored).Scored(1, bounds, ctx)
					p.Select(1, s, nil, ctx)
				}
			})
		}
	}
}
