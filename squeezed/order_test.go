package squeezed

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/paging"
)

// The selection's Rows are its clustered Tokens as runs of the head's
// cluster order: expanded through TokenOrder they give exactly the listed
// positions below Clustered, the rest of Tokens is a suffix, and the runs
// are sorted, disjoint, non-empty and within the order. Checked for a
// tail past the clustered tokens and for one reaching back into them
// (whose rows are single tokens), with one and several query tokens.
func TestSelectorRows(t *testing.T) {
	const d, heads, kvHeads, tokens, P = 16, 4, 2, 4000, 16
	keys := func(l, g, n int, dst []float32) []float32 { return topicKeys(uint64(5+g), n, d, 40) }
	ix, err := Build(keys, 2, kvHeads, d, tokens, Options{Seed: 2, Window: 100})
	require.NoError(t, err)
	c := paging.Config{PageSize: P, Budget: 1024, Sinks: 16, Window: 256, DenseLayers: 1, Layers: 2, KVHeads: kvHeads,
		Options: map[string]any{OptionKey: ix}}
	sel, err := paging.New("squeezed", c)
	require.NoError(t, err)
	to, ok := sel.(paging.TokenOrdered)
	require.True(t, ok, "squeezed orders its tokens by cluster")
	order0, blocks0 := to.TokenOrder(0, 0)
	require.Nil(t, order0, "a dense layer has no order")
	require.Nil(t, blocks0)
	for g := 0; g < kvHeads; g++ {
		order, blocks := to.TokenOrder(1, g)
		require.Equal(t, int32(0), blocks[0])
		require.Equal(t, int32(len(order)), blocks[len(blocks)-1])
		require.True(t, slices.IsSorted(blocks), "blocks: ascending bounds")
		for j := 0; j+1 < len(blocks); j++ {
			require.Equal(t, ix.Heads[1][g].Tokens(j), order[blocks[j]:blocks[j+1]], "block %d is cluster %d", j, j)
		}
		require.Len(t, order, ix.Clustered)
		seen := make([]bool, len(order))
		for _, p := range order {
			require.False(t, seen[p], "a permutation")
			seen[p] = true
		}
		again, _ := to.TokenOrder(1, g)
		require.Same(t, &order[0], &again[0], "the same slice at every call: its identity keys the cache's copy")
	}
	r := rand.New(rand.NewPCG(7, 7))
	for _, tc := range []struct {
		name    string
		upto    int
		queries int
		full    bool // clusters fill most of the budget (not a long answer's)
	}{
		{"tail past the clusters", tokens + 10, 1, true},
		{"tail into the clusters", ix.Clustered + 40, 1, true},
		{"question", tokens + 30, 5, true},
		{"long answer", tokens + 900, 1, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q := make([][]float32, tc.queries)
			for i := range q {
				q[i] = make([]float32, heads*d)
				for j := range q[i] {
					q[i][j] = float32(r.NormFloat64())
				}
			}
			s := sel.Select(1, nil, &paging.Queries{Q: q, Heads: heads}, tc.upto)
			require.Len(t, s.Rows, kvHeads)
			for g := 0; g < kvHeads; g++ {
				order, _ := to.TokenOrder(1, g)
				runs, toks := s.Rows[g], s.Tokens[g]
				require.Zero(t, len(runs)%2, "pairs")
				var got []int32
				for i := 0; i < len(runs); i += 2 {
					a, b := runs[i], runs[i+1]
					require.Less(t, a, b, "run %d is empty", i/2)
					require.LessOrEqual(t, int(b), len(order), "run %d within the order", i/2)
					if i > 0 {
						require.Less(t, runs[i-1], a, "runs sorted, disjoint and not adjacent")
					}
					got = append(got, order[a:b]...)
				}
				slices.Sort(got)
				n := 0
				for n < len(toks) && int(toks[n]) < ix.Clustered {
					n++
				}
				for _, tk := range toks[n:] {
					require.GreaterOrEqual(t, int(tk), ix.Clustered, "the unclustered tokens are a suffix")
				}
				require.Equal(t, toks[:n], got, "the runs are the clustered tokens")
				require.NotEmpty(t, got, "the sinks at least")
				if tc.full {
					require.Greater(t, len(got), c.Budget/2, "clusters fill most of the budget")
					require.Less(t, len(runs)/2, len(got)/4, "runs, not single tokens")
				}
			}
		})
	}
}

// appendRuns turns marked rows into half-open runs, across word edges.
func TestRowMarksRuns(t *testing.T) {
	for _, tc := range []struct {
		rows  int
		spans [][2]int32
		want  []int32
	}{
		{10, nil, []int32{}}, // none marked: an empty list, not nil (nil is "no runs")
		{64, [][2]int32{{0, 64}}, []int32{0, 64}},
		{130, [][2]int32{{3, 5}, {5, 9}}, []int32{3, 9}},
		{200, [][2]int32{{60, 70}, {100, 101}, {127, 129}}, []int32{60, 70, 100, 101, 127, 129}},
		{200, [][2]int32{{0, 1}, {63, 64}, {64, 65}, {199, 200}}, []int32{0, 1, 63, 65, 199, 200}},
		{256, [][2]int32{{10, 250}}, []int32{10, 250}},
		{256, [][2]int32{{0, 256}}, []int32{0, 256}},
	} {
		t.Run(fmt.Sprint(tc.spans), func(t *testing.T) {
			var m rowMarks
			m.reset(tc.rows)
			for _, s := range tc.spans {
				m.span(s[0], s[1])
			}
			require.Equal(t, tc.want, m.appendRuns(nil))
		})
	}
}

// A selection's lists are reused two Selects later, never by the next
// one: a selection stays as it was through the following Select of its
// layer (the cache's pass uses it; tests compare two in a row).
func TestSelectionSurvivesNextSelect(t *testing.T) {
	const d, heads, kvHeads, tokens, P = 16, 4, 2, 3000, 16
	keys := func(l, g, n int, dst []float32) []float32 { return topicKeys(uint64(9+g), n, d, 30) }
	ix, err := Build(keys, 1, kvHeads, d, tokens, Options{Seed: 4, Window: 100})
	require.NoError(t, err)
	sel, err := paging.New("squeezed", paging.Config{PageSize: P, Budget: 512, Sinks: 16, Window: 64, Layers: 1, KVHeads: kvHeads,
		Options: map[string]any{OptionKey: ix}})
	require.NoError(t, err)
	r := rand.New(rand.NewPCG(3, 4))
	query := func() *paging.Queries {
		q := make([]float32, heads*d)
		for i := range q {
			q[i] = float32(r.NormFloat64())
		}
		return &paging.Queries{Q: [][]float32{q}, Heads: heads}
	}
	clone := func(s paging.Selection) paging.Selection {
		var c paging.Selection
		for g := range s.Tokens {
			c.Groups = append(c.Groups, slices.Clone(s.Groups[g]))
			c.Tokens = append(c.Tokens, slices.Clone(s.Tokens[g]))
			c.Rows = append(c.Rows, slices.Clone(s.Rows[g]))
		}
		return c
	}
	prev := sel.Select(0, nil, query(), tokens+5)
	for step := range 4 {
		saved := clone(prev)
		next := sel.Select(0, nil, query(), tokens+6+step)
		require.Equal(t, saved, clone(prev), "step %d: the previous selection changed under the next Select", step)
		require.NotEqual(t, saved.Tokens, next.Tokens, "step %d: other queries, other tokens", step)
		prev = next
	}
}
