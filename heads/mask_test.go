package heads

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/paging"
)

// summaries with nothing in them: the tests below only look at positions.
type noSummaries struct{ pages int }

func (s noSummaries) Pages() int              { return s.pages }
func (s noSummaries) Len(int) int             { return 64 }
func (s noSummaries) KVHeads() int            { return 4 }
func (s noSummaries) HeadDim() int            { return 2 }
func (s noSummaries) Mean(int, int) []float32 { return make([]float32, 2) }
func (s noSummaries) Min(int, int) []float32  { return make([]float32, 2) }
func (s noSummaries) Max(int, int) []float32  { return make([]float32, 2) }
func (s noSummaries) Box(int, int) ([]float32, []float32) {
	return make([]float32, 2), make([]float32, 2)
}
func (s noSummaries) Reps(int, int) [][]float32 { return nil }

func TestMaskedGroupsAndSelections(t *testing.T) {
	// Layer 0: heads 1 and 3 stream; layer 1: all stream; layer 2: none.
	mask := Mask{{false, true, false, true}, {true, true, true, true}, {false, false, false, false}}
	cfg := paging.Config{PageSize: 64, Budget: 1024, Sinks: 64, Window: 128, Layers: 3, KVHeads: 4, Options: map[string]any{OptionKey: mask}}
	const upto = 64 * 100
	stream := []int{0, 98, 99}
	cases := []struct {
		spec     string
		layer    int
		groups   []paging.Group
		needQ    bool
		checkSel func(t *testing.T, sel paging.Selection)
	}{
		{"window+heads", 0, []paging.Group{
			{KVHeads: []int{0, 2}, Budget: 1024, Class: "retrieval"},
			{KVHeads: []int{1, 3}, Budget: 64 + 128, Class: "streaming"},
		}, false, func(t *testing.T, sel paging.Selection) {
			require.Len(t, sel.Groups, 2)
			require.Len(t, sel.Groups[0], 15, "window keeps its budget: sinks and 896 recent tokens")
			require.Equal(t, stream, sel.Groups[1])
		}},
		{"retro+heads", 1, []paging.Group{{Budget: 64 + 128, Class: "streaming"}}, false, func(t *testing.T, sel paging.Selection) {
			require.Equal(t, paging.One(stream), sel)
		}},
		{"quest+heads", 2, []paging.Group{{Budget: 1024, Class: "all"}}, true, nil},
		{"dense+heads", 0, []paging.Group{
			{KVHeads: []int{0, 2}, Budget: 1024, Class: "retrieval"},
			{KVHeads: []int{1, 3}, Budget: 64 + 128, Class: "streaming"},
		}, false, func(t *testing.T, sel paging.Selection) {
			require.Len(t, sel.Groups[0], 100, "dense: every page")
		}},
	}
	for _, c := range cases {
		t.Run(c.spec, func(t *testing.T) {
			cfg := cfg
			if c.spec == "dense+heads" {
				cfg.Budget = 0
				c.groups[0].Budget = 0
			}
			s, err := paging.New(c.spec, cfg)
			require.NoError(t, err)
			require.Equal(t, c.spec, s.Name())
			require.Equal(t, c.groups, s.Groups(c.layer))
			require.Equal(t, c.needQ, s.NeedQueries(c.layer, 8))
			if c.checkSel != nil {
				c.checkSel(t, s.Select(c.layer, noSummaries{100}, nil, upto))
			}
		})
	}
}

func TestMaskedRefusals(t *testing.T) {
	cfg := paging.Config{PageSize: 64, Budget: 1024, Layers: 2, KVHeads: 2}
	_, err := paging.New("retro+heads", cfg)
	require.ErrorContains(t, err, "no head profile")
	cfg.Options = map[string]any{OptionKey: Mask{}}
	cfg.Layers = 0
	_, err = paging.New("retro+heads", cfg)
	require.ErrorContains(t, err, "shape is unknown")
	_, err = paging.New("retro+nope", cfg)
	require.ErrorContains(t, err, "unknown modifier")
	require.ErrorContains(t, err, "+heads", "the error lists the registered modifiers")
}

func TestFromQueryHeads(t *testing.T) {
	m, err := FromQueryHeads(2, 4, 2, []Head{{1, 0}, {1, 1}})
	require.NoError(t, err)
	require.Equal(t, Mask{{true, true}, {false, true}}, m)
	s, r := m.Count(2, 2)
	require.Equal(t, [2]int{3, 1}, [2]int{s, r})
	_, err = FromQueryHeads(2, 4, 2, []Head{{2, 0}})
	require.ErrorContains(t, err, "outside the model")
}

// perHead is a method with a group per KV head and token selections (as
// squeezed has, with token-granular pools): group g attends to page g and
// its first token; told that the rows suffice (paging.Queries.RowsSuffice),
// it answers in the rows-only form: row g of its order, no tokens.
type perHead struct{ c paging.Config }

func (p perHead) Name() string              { return "perhead" }
func (p perHead) Config() paging.Config     { return p.c }
func (p perHead) NeedQueries(_, _ int) bool { return true }
func (p perHead) Groups(int) []paging.Group {
	var gs []paging.Group
	for g := 0; g < p.c.KVHeads; g++ {
		gs = append(gs, paging.Group{KVHeads: []int{g}, Budget: 512, Class: "all", Tokens: true})
	}
	return gs
}
func (p perHead) Select(_ int, _ paging.Summaries, q *paging.Queries, _ int) paging.Selection {
	var s paging.Selection
	for g := 0; g < p.c.KVHeads; g++ {
		if q != nil && q.RowsSuffice {
			s.Groups, s.Tokens = append(s.Groups, []int{}), append(s.Tokens, []int32{})
			s.Rows, s.RowsOnly = append(s.Rows, []int32{int32(g), int32(g + 1)}), true
			continue
		}
		s.Groups = append(s.Groups, []int{g})
		s.Tokens = append(s.Tokens, []int32{int32(g * p.c.PageSize)})
	}
	return s
}

func init() {
	paging.Register("perhead", func(c paging.Config) (paging.Selector, error) { return perHead{c}, nil })
}

// With an inner method that has a group per KV head, the retrieval heads
// keep their groups (token-granular ones stay so), selections and token
// lists, and the streaming heads form one streaming group (of pages). A
// rows-only answer stays one: the retrieval groups keep their rows and
// (loose) tokens, the streaming group its pages.
func TestMaskedPerHeadInner(t *testing.T) {
	mask := Mask{{false, true, false, true}}
	cfg := paging.Config{PageSize: 64, Budget: 1024, Sinks: 64, Window: 128, Layers: 1, KVHeads: 4, Options: map[string]any{OptionKey: mask}}
	s, err := paging.New("perhead+heads", cfg)
	require.NoError(t, err)
	require.Equal(t, []paging.Group{
		{KVHeads: []int{0}, Budget: 512, Class: "retrieval", Tokens: true},
		{KVHeads: []int{2}, Budget: 512, Class: "retrieval", Tokens: true},
		{KVHeads: []int{1, 3}, Budget: 64 + 128, Class: "streaming"},
	}, s.Groups(0))
	sel := s.Select(0, noSummaries{100}, nil, 64*100)
	require.Equal(t, [][]int{{0}, {2}, {0, 98, 99}}, sel.Groups)
	require.Equal(t, [][]int32{{0}, {128}, nil}, sel.Tokens)
	require.False(t, sel.RowsOnly)
	ro := s.Select(0, noSummaries{100}, &paging.Queries{RowsSuffice: true}, 64*100)
	require.True(t, ro.RowsOnly, "the inner method's rows-only form is passed on")
	require.Equal(t, [][]int32{{0, 1}, {2, 3}, nil}, ro.Rows)
	require.Equal(t, [][]int32{{}, {}, nil}, ro.Tokens)
	require.Equal(t, [][]int{{}, {}, {0, 98, 99}}, ro.Groups)
}
