package squeezed

import (
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/paging"
)

// The method attends, per KV head, to the sinks, the tail, and the tokens
// of the clusters nearest the query: within the token budget (the batch's
// own tokens included), every token on a listed page, and the best
// cluster in. Its groups are token-granular, so the pages do not have to
// fit a pool: a budget's tokens on many more pages than Budget/P. A long
// answer never pushes the tail past the budget.
func TestSelectorTokens(t *testing.T) {
	const d, heads, kvHeads, tokens, P = 16, 4, 2, 4000, 16
	keys := func(l, g, n int, dst []float32) []float32 { return topicKeys(uint64(3+g), n, d, 40) }
	ix, err := Build(keys, 2, kvHeads, d, tokens, Options{Seed: 1, Window: 100})
	require.NoError(t, err)
	for _, mode := range []struct {
		name string
		use  Use
	}{{"budget", Use{Index: ix}}} {
		t.Run(mode.name, func(t *testing.T) {
			c := paging.Config{PageSize: P, Budget: 1024, Sinks: 16, Window: 64, DenseLayers: 1, Layers: 2, KVHeads: kvHeads,
				Options: map[string]any{OptionKey: mode.use}}
			sel, err := paging.New("squeezed", c)
			require.NoError(t, err)
			require.Len(t, sel.Groups(0), 1, "dense layer")
			require.Len(t, sel.Groups(1), kvHeads)
			require.False(t, sel.Groups(0)[0].Tokens, "the dense layer's pool holds pages")
			for _, g := range sel.Groups(1) {
				require.True(t, g.Tokens, "token-granular residency")
				require.Equal(t, c.Budget, g.Budget, "the pool holds the budget's tokens")
			}
			require.False(t, sel.NeedQueries(0, 1))
			require.True(t, sel.NeedQueries(1, 1))

			// A query near the centroid of token 1234's cluster (KV head 0)
			// and of token 77's (KV head 1).
			q := make([]float32, heads*d)
			for h := 0; h < heads; h++ {
				g := h / 2
				tok := []int{1234, 77}[g]
				hd := ix.Heads[1][g]
				j := int(hd.Assign[tok])
				copy(q[h*d:(h+1)*d], hd.Centroids[j*d:(j+1)*d])
			}
			for _, upto := range []int{tokens + 10, tokens + 2000} {
				s := sel.Select(1, nil, &paging.Queries{Q: [][]float32{q}, Heads: heads}, upto)
				require.Len(t, s.Groups, kvHeads)
				for g := 0; g < kvHeads; g++ {
					pages, toks := s.Groups[g], s.Tokens[g]
					require.True(t, slices.IsSorted(pages))
					require.True(t, slices.IsSorted(toks))
					require.LessOrEqual(t, len(toks), c.Budget, "tokens within the budget")
					if upto == tokens+10 {
						require.Greater(t, len(pages), c.Budget/P, "the tokens lie on more pages than a page pool of the budget holds")
						require.Greater(t, len(toks), c.Budget*9/10, "clusters fill the budget")
						require.Contains(t, toks, int32(ix.Clustered), "the observation window")
					} else {
						require.NotContains(t, toks, int32(ix.Clustered), "a tail past the budget is cut")
					}
					for _, tk := range toks {
						require.Contains(t, pages, int(tk)/P)
					}
					require.Contains(t, toks, int32(0), "sinks")
					require.Contains(t, toks, int32(upto-1), "tail")
					require.Len(t, slices.Compact(slices.Clone(toks)), len(toks), "distinct")
					if upto != tokens+10 {
						continue
					}
					var sc Scratch
					best := ix.Heads[1][g].FlatTop(q[2*g*d:(2*g+1)*d], 1, &sc, nil)[0]
					for _, tk := range ix.Heads[1][g].Tokens(int(best)) {
						require.Contains(t, toks, tk, "the best cluster's tokens")
					}
				}
			}
		})
	}
}

func TestSelectorBadConfig(t *testing.T) {
	ix, err := Build(func(l, g, n int, dst []float32) []float32 { return topicKeys(1, n, 8, 4) }, 1, 1, 8, 400, Options{})
	require.NoError(t, err)
	for _, c := range []struct {
		name string
		c    paging.Config
		want string
	}{
		{"no index", paging.Config{PageSize: 16, Budget: 1024}, "no clusters given"},
		{"no budget", paging.Config{PageSize: 16, Options: map[string]any{OptionKey: ix}}, "needs a token budget"},
		{"uncalibrated", paging.Config{PageSize: 16, Budget: 1024, Options: map[string]any{OptionKey: Use{Index: ix, Threshold: true}}}, "calibrated"},
		{"negative keep", paging.Config{PageSize: 16, Budget: 1024, Options: map[string]any{OptionKey: ix, KeepKey: -1.0}}, "squeezed-keep -1: the hysteresis must be ≥ 0"},
		{"negative int keep", paging.Config{PageSize: 16, Budget: 1024, Options: map[string]any{OptionKey: ix, KeepKey: -2}}, "squeezed-keep -2: the hysteresis must be ≥ 0"},
		{"keep of another type", paging.Config{PageSize: 16, Budget: 1024, Options: map[string]any{OptionKey: ix, KeepKey: "4"}}, `Options["squeezed-keep"] is a string`},
		{"shape", paging.Config{PageSize: 16, Budget: 1024, Layers: 2, KVHeads: 1, Options: map[string]any{OptionKey: ix}}, "1 layers × 1 KV heads, the model has 2 × 1"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := paging.New("squeezed", c.c)
			require.ErrorContains(t, err, c.want)
		})
	}
}
