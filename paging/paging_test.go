package paging

import (
	"slices"
	"testing"

	"github.com/stretchr/testify/require"
)

// fake summaries: every page holds keys equal to one vector per KV head.
type fake struct {
	pages, pageLen, kvh, hd int
	keys                    [][][]float32 // [page][kvHead][hd]
}

func (f *fake) Pages() int                          { return f.pages }
func (f *fake) Len(p int) int                       { return f.pageLen }
func (f *fake) KVHeads() int                        { return f.kvh }
func (f *fake) HeadDim() int                        { return f.hd }
func (f *fake) Mean(p, g int) []float32             { return f.keys[p][g] }
func (f *fake) Min(p, g int) []float32              { return f.keys[p][g] }
func (f *fake) Max(p, g int) []float32              { return f.keys[p][g] }
func (f *fake) Reps(p, g int) [][]float32           { return [][]float32{f.keys[p][g]} }
func (f *fake) Box(p, g int) ([]float32, []float32) { return f.keys[p][g], make([]float32, f.hd) }
func newFake(pages, kvh, hd int) *fake {
	f := &fake{pages: pages, pageLen: 64, kvh: kvh, hd: hd}
	for p := 0; p < pages; p++ {
		var heads [][]float32
		for g := 0; g < kvh; g++ {
			heads = append(heads, make([]float32, hd))
		}
		f.keys = append(f.keys, heads)
	}
	return f
}

func TestRequiredPages(t *testing.T) {
	cases := []struct {
		name                  string
		sinks, window, budget int
		upto                  int
		want                  []int
		free                  int
	}{
		{"short sequence is all required", 64, 256, 1024, 200, []int{0, 1, 2, 3}, 12},
		{"sinks and window", 64, 256, 1024, 64 * 20, []int{0, 16, 17, 18, 19}, 11},
		{"partial last page", 64, 256, 1024, 64*20 + 10, []int{0, 16, 17, 18, 19, 20}, 10},
		{"no budget", 64, 128, 0, 64 * 10, []int{0, 8, 9}, 7},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := Config{PageSize: 64, Sinks: c.sinks, Window: c.window, Budget: c.budget}
			req, free := b.Required(c.upto)
			require.Equal(t, c.want, req)
			require.Equal(t, c.free, free)
		})
	}
}

func TestPoliciesSelect(t *testing.T) {
	const pages, kvh, hd = 40, 2, 4
	f := newFake(pages, kvh, hd)
	// Page 7 (KV head 1) and page 22 (KV head 0) match the query strongly.
	f.keys[7][1] = []float32{5, 0, 0, 0}
	f.keys[22][0] = []float32{0, 4, 0, 0}
	f.keys[30][0] = []float32{-9, 0, 0, 0} // anti-aligned: must not be chosen
	q := &Queries{Heads: 4, Q: [][]float32{{0, 1, 0, 0 /*h0*/, 0, 0, 0, 0 /*h1*/, 1, 0, 0, 0 /*h2*/, 0, 0, 0, 0 /*h3*/}}}
	upto := pages * 64
	cfg := Config{PageSize: 64, Budget: 64 * 9, Sinks: 64, Window: 128, Neighbors: -1}
	window := []int{0, 38, 39}
	cases := []struct {
		policy string
		want   []int
	}{
		{"dense", AllPages(pages)},
		{"window", []int{0, 33, 34, 35, 36, 37, 38, 39}},
		{"quest", []int{0, 7, 22, 38, 39}},
		{"retro", []int{0, 7, 22, 38, 39}},
	}
	for _, c := range cases {
		t.Run(c.policy, func(t *testing.T) {
			p, err := New(c.policy, cfg)
			require.NoError(t, err)
			got := p.Select(3, f, q, upto).Union()
			for _, w := range c.want {
				require.Contains(t, got, w)
			}
			if c.policy != "dense" {
				require.NotContains(t, got, 30)
			}
			require.True(t, slices.IsSorted(got))
			require.LessOrEqual(t, len(got), max(cfg.Budget/64, pages*boolInt(c.policy == "dense")))
			if c.policy == "quest" || c.policy == "retro" {
				// A fresh selector without queries keeps only sinks and window.
				fresh, err := New(c.policy, cfg)
				require.NoError(t, err)
				require.Equal(t, window, fresh.Select(3, f, nil, upto).Union())
			}
			if c.policy == "retro" {
				// Decode steps after the question keep what it retrieved,
				// in that layer only, while the window moves on.
				next := p.Select(3, f, nil, upto+64).Union()
				require.Subset(t, next, []int{0, 7, 22, 39, 40})
				require.NotContains(t, next, 38)
				require.Equal(t, window, p.Select(4, f, nil, upto).Union())
			}
		})
	}
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

func TestDenseLayersAndNeighbors(t *testing.T) {
	f := newFake(30, 1, 2)
	f.keys[10][0] = []float32{1, 0}
	q := &Queries{Heads: 1, Q: [][]float32{{1, 0}}}
	p, err := New("retro", Config{PageSize: 64, Budget: 64 * 8, Sinks: 64, Window: 128, DenseLayers: 2, Neighbors: 2})
	require.NoError(t, err)
	require.Len(t, p.Select(1, f, q, 30*64).Union(), 30, "dense layer")
	got := p.Select(2, f, q, 30*64).Union()
	require.Subset(t, got, []int{10, 11, 12}, "retrieved page and its two neighbours")
}

func TestNewRejectsBadConfig(t *testing.T) {
	_, err := New("quest", Config{PageSize: 64, Budget: 100})
	require.ErrorContains(t, err, "budget 100 is less than")
	_, err = New("nope", Config{PageSize: 64})
	require.ErrorContains(t, err, "unknown method")
	_, err = New("dense", Config{})
	require.ErrorContains(t, err, "page size")
	RegisterModifier("twice-test", func(inner Selector, _ Config) (Selector, error) { return inner, nil })
	_, _, err = Parse("retro+twice-test+twice-test")
	require.ErrorContains(t, err, `modifier "twice-test" is given twice`)
}

// A question's common words must not crowd out the one token that matches:
// its best page is chosen even when other tokens score higher everywhere.
func TestRoundRobinServesEveryToken(t *testing.T) {
	scores := [][]float32{
		{9, 9, 9, 9, 9, 9, 1, 9}, // a question word: loose, high everywhere
		{0, 0, 0, 0, 0, 0, 5, 0}, // the key token: only page 6 matches
	}
	got := roundRobin([]int{0}, scores, 2, 0)
	require.Equal(t, []int{0, 1, 6}, got)
	require.Equal(t, []int{0, 6, 7}, roundRobin([]int{0}, scores, 2, 1), "with a neighbour")
}
