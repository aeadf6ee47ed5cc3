package kvcache_test

import (
	"context"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/model/input"
	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/paging"
	"github.com/kvrecall/kvrecall/runtime"
)

// rowsOnlySelector is an orderedTokenSelector that needs the queries (so
// that the cache may say the rows suffice, paging.Queries.RowsSuffice)
// and then answers in the rows-only form (paging.Selection.RowsOnly) if
// short is set, or whenever it is given queries if force is (an answer
// the cache did not ask for). asked counts the Selects told that the rows
// suffice, and batches those of them for more than one query token.
type rowsOnlySelector struct {
	*orderedTokenSelector
	short, force   bool
	asked, batches int
}

func (s *rowsOnlySelector) NeedQueries(_, _ int) bool { return true }

func (s *rowsOnlySelector) Select(l int, sum paging.Summaries, q *paging.Queries, upto int) paging.Selection {
	sel := s.orderedTokenSelector.Select(l, sum, q, upto)
	if q != nil && q.RowsSuffice {
		s.asked++
		if len(q.Q) != 1 {
			s.batches++
		}
	}
	if q == nil || !(s.force || s.short && q.RowsSuffice) {
		return sel
	}
	return rowsOnlyForm(sel, tOrder)
}

// rowsOnlyForm is sel in the rows-only form, for an order of n positions:
// each group with rows lists only its tokens at or past n, and their
// pages.
func rowsOnlyForm(sel paging.Selection, n int) paging.Selection {
	out := paging.Selection{Groups: slices.Clone(sel.Groups), Tokens: slices.Clone(sel.Tokens), Rows: sel.Rows, RowsOnly: true}
	for g, rows := range sel.Rows {
		if rows == nil {
			continue
		}
		toks := sel.Tokens[g]
		i, _ := slices.BinarySearch(toks, int32(n))
		out.Tokens[g] = append([]int32{}, toks[i:]...) // non-nil: a token-granular group lists tokens
		var pages []int
		for _, t := range out.Tokens[g] {
			if p := int(t) / tPage; len(pages) == 0 || pages[len(pages)-1] != p {
				pages = append(pages, p)
			}
		}
		out.Groups[g] = pages
	}
	return out
}

// rowsPick is orderedPick, and before it gives rows (upto ≤ tOrder: the
// order not yet written, or cut back into) rows too: a random fifth of
// the order's rows whose positions precede upto-1, and their positions
// as the tokens, so that a one-token pass after a cut into the order
// lists rows the cache has no copy to read from.
func rowsPick(orders [][]int32) func(g, upto int) ([]int32, []int32) {
	ordered := orderedPick(orders)
	return func(g, upto int) ([]int32, []int32) {
		if upto > tOrder {
			return ordered(g, upto)
		}
		r := rand.New(rand.NewPCG(uint64(upto), uint64(g)+20))
		toks, rows := []int32{}, []int32{}
		for x, p := range orders[g] {
			if int(p) >= upto-1 || r.IntN(5) != 0 {
				continue
			}
			if n := len(rows); n > 0 && rows[n-1] == int32(x) {
				rows[n-1]++
			} else {
				rows = append(rows, int32(x), int32(x+1))
			}
			toks = append(toks, p)
		}
		slices.Sort(toks)
		return toks, rows
	}
}

// A rows-only selection (paging.Selection.RowsOnly: the rows stand for
// the tokens of the order, Tokens lists only those past it) attends
// exactly what the full lists attend. Two caches run the same passes, one
// with a selector answering in full, one in the rows-only form where the
// cache asks for it (Queries.RowsSuffice: one-token passes of staged
// groups with InPlaceRuns, never a batch); after every pass their outputs
// are the same (and within 2e-3 of float64 attention over the listed
// positions), and so are AttendedTokens, Selected, SelectedByGroup and
// the Stats (attended bytes, rows read in place, staged from the copy
// and from the pages); CheckInvariants holds in both. The passes run
// with the copy's runs read in place, copied from an ordered copy in Go
// memory (no C memory: not attendable in place), and with InPlaceRuns
// off (not asked); a cut into the order makes one-token passes whose
// rows have no copy to read from (the order reaches past the positions
// written), which get their full lists back (setStaged's fallback).
func TestRowsOnlySelectionMatchesFull(t *testing.T) {
	m, err := runtime.Open(context.Background(), testmodels.Random(t, "llama", "tiny", foundry.F32, 4, false), runtime.Options{Threads: 2, ContextLength: 512})
	require.NoError(t, err)
	defer m.Close()
	b := m.Backend()
	defer func(s, ip bool) { kvcache.TokenStaging, kvcache.InPlaceRuns = s, ip }(kvcache.TokenStaging, kvcache.InPlaceRuns)
	kvcache.TokenStaging = true
	groups := []paging.Group{{KVHeads: []int{0, 2}, Budget: 32, Tokens: true}, {KVHeads: []int{1, 3}, Budget: 32, Tokens: true}}
	cfg := paging.Config{PageSize: tPage, Sinks: 4, Window: 4}
	orders := randomOrders(len(groups), 8)
	pick := rowsPick(orders)
	for _, mode := range []struct {
		name     string
		inplace  bool // kvcache.InPlaceRuns
		goMemory bool // the ordered copies moved to Go memory before each pass
	}{
		{"in place", true, false},
		{"copy in Go memory", true, true},
		{"in place off", false, false},
	} {
		t.Run(mode.name, func(t *testing.T) {
			kvcache.InPlaceRuns = mode.inplace
			mk := func(short bool) (*kvcache.Paged, *rowsOnlySelector) {
				s := &rowsOnlySelector{orderedTokenSelector: &orderedTokenSelector{c: cfg, groups: groups, order: orders, pick: pick}, short: short}
				c, err := kvcache.NewPaged(kvcache.Options{Layout: tLayout, Heads: tHeads, Selector: s, Capacity: 512, MaxBatch: 96})
				require.NoError(t, err)
				c.Init(b, ml.DTypeF16, 1, 512, 96)
				return c, s
			}
			full, fullSel := mk(false)
			defer full.Close()
			short, shortSel := mk(true)
			defer short.Close()
			r := rand.New(rand.NewPCG(51, 52))
			const total = 400
			q, k, v := randoms(r, total*tHeads*tDim), randoms(r, total*tKV*tDim), randoms(r, total*tKV*tDim)
			split := func(x []float32, per, from, to int) []float32 { return x[from*per : to*per] }
			ones, moved := 0, 0
			var copied int64 // the short cache's runs staged from a copy by one-token passes
			step := func(pos0, n int, what string) {
				t.Helper()
				end := pos0 + n
				if mode.goMemory {
					moved += full.Store().OrderedToGoMemory() + short.Store().OrderedToGoMemory()
				}
				before := short.Stats().StagedFromCopy
				qs := split(q, tHeads*tDim, pos0, end)
				a := passQueries(t, b, full, pos0, qs, split(k, tKV*tDim, pos0, end), split(v, tKV*tDim, pos0, end))
				got := passQueries(t, b, short, pos0, qs, split(k, tKV*tDim, pos0, end), split(v, tKV*tDim, pos0, end))
				require.Equal(t, a, got, "%s: tokens %d..%d: the same output", what, pos0, end)
				want := referenceAt(qs, k, v, pos0, func(g, p int) bool {
					toks, _ := pick(g%2, end)
					return p >= pos0 || slices.Contains(toks, int32(p))
				})
				for i := range want {
					for j := range want[i] {
						require.InDelta(t, want[i][j], float64(got[i*tHeads*tDim+j]), 2e-3, "%s: tokens %d..%d", what, pos0, end)
					}
				}
				require.Equal(t, full.AttendedTokens(0), short.AttendedTokens(0), "%s at %d: attended tokens", what, pos0)
				require.Equal(t, full.Selected(0), short.Selected(0), "%s at %d: pages", what, pos0)
				fg, fp := full.SelectedByGroup(0)
				sg, sp := short.SelectedByGroup(0)
				require.Equal(t, fg, sg)
				require.Equal(t, fp, sp, "%s at %d: pages by group", what, pos0)
				fs, ss := full.Stats(), short.Stats()
				require.Positive(t, ss.AttendedBytes)
				require.Equal(t, fs.AttendedBytes, ss.AttendedBytes, "%s at %d: attended bytes", what, pos0)
				require.Equal(t, fs.InPlaceRows, ss.InPlaceRows, "%s at %d: rows read in place", what, pos0)
				require.Equal(t, fs.StagedFromCopy, ss.StagedFromCopy, "%s at %d: staged from the copy", what, pos0)
				require.Equal(t, fs.StagedFromPages, ss.StagedFromPages, "%s at %d: staged from the pages", what, pos0)
				if n == 1 {
					ones++
					copied += ss.StagedFromCopy - before
				}
			}
			pos0 := 0
			for _, n := range []int{80, 80, 1, 1, 3, 1, 1, 1} {
				step(pos0, n, "first pass")
				pos0 += n
			}
			// A cut into the order: one-token passes before its end have
			// rows but no copy (setStaged's fallback), until the order is
			// written again and copied from the new keys.
			const cut = 150
			require.NoError(t, full.Remove(0, cut, math.MaxInt32))
			require.NoError(t, short.Remove(0, cut, math.MaxInt32))
			copy(k[cut*tKV*tDim:], randoms(r, (total-cut)*tKV*tDim))
			copy(v[cut*tKV*tDim:], randoms(r, (total-cut)*tKV*tDim))
			pos0 = cut
			for _, n := range []int{1, 1, 8, 1, 1, 4, 1} {
				step(pos0, n, "after the cut")
				pos0 += n
			}
			st := short.Stats()
			t.Logf("%d one-token passes, %d Selects asked for rows only; in place %d rows, staged %d from the copy (%d by one-token passes), %d from pages",
				ones, shortSel.asked, st.InPlaceRows, st.StagedFromCopy, copied, st.StagedFromPages)
			require.Zero(t, fullSel.batches+shortSel.batches, "a batch is never asked for rows only")
			require.Equal(t, fullSel.asked, shortSel.asked)
			if !mode.inplace {
				require.Zero(t, shortSel.asked, "InPlaceRuns off: the rows are not asked for")
				return
			}
			require.Equal(t, ones, shortSel.asked, "every one-token pass asks for rows only")
			if mode.goMemory {
				require.Positive(t, moved, "copies moved to Go memory")
				// The layer op reads only C memory: one-token passes stage
				// every token of a group whose copy is in Go memory from the
				// pages (its full list rebuilt from the rows).
				require.Zero(t, copied, "one-token passes do not copy runs: the layer op attends them")
				require.Positive(t, st.StagedFromPages)
			} else {
				require.Positive(t, st.InPlaceRows, "one-token passes read runs in place")
				require.Zero(t, copied, "one-token passes read the copy in place")
			}
		})
	}
}

// A rows-only answer the cache did not ask for (a batch: the rows do not
// suffice there; or InPlaceRuns off) is an error, not a selection missing
// its clustered tokens.
func TestRowsOnlyNotAskedIsAnError(t *testing.T) {
	m, err := runtime.Open(context.Background(), testmodels.Random(t, "llama", "tiny", foundry.F32, 4, false), runtime.Options{Threads: 2, ContextLength: 512})
	require.NoError(t, err)
	defer m.Close()
	b := m.Backend()
	defer func(s, ip bool) { kvcache.TokenStaging, kvcache.InPlaceRuns = s, ip }(kvcache.TokenStaging, kvcache.InPlaceRuns)
	kvcache.TokenStaging = true
	groups := []paging.Group{{KVHeads: []int{0, 2}, Budget: 32, Tokens: true}, {KVHeads: []int{1, 3}, Budget: 32, Tokens: true}}
	cfg := paging.Config{PageSize: tPage, Sinks: 4, Window: 4}
	orders := [][]int32{make([]int32, tOrder), make([]int32, tOrder)}
	for g := range orders {
		for i := range orders[g] {
			orders[g][i] = int32(tOrder - 1 - i)
		}
	}
	for _, tc := range []struct {
		name    string
		batch   int
		inplace bool
	}{
		{"a batch", 4, true},
		{"in place off", 1, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kvcache.InPlaceRuns = tc.inplace
			s := &rowsOnlySelector{orderedTokenSelector: &orderedTokenSelector{c: cfg, groups: groups, order: orders, pick: rowsPick(orders)}, force: true}
			c, err := kvcache.NewPaged(kvcache.Options{Layout: tLayout, Heads: tHeads, Selector: s, Capacity: 512, MaxBatch: 96})
			require.NoError(t, err)
			defer c.Close()
			c.Init(b, ml.DTypeF16, 1, 512, 96)
			// The document, written with the selector told to answer in
			// full (no queries: nothing to force).
			r := rand.New(rand.NewPCG(3, 4))
			s.force = false
			for pos0 := 0; pos0 < 192; pos0 += 96 {
				passQueries(t, b, c, pos0, randoms(r, 96*tHeads*tDim), randoms(r, 96*tKV*tDim), randoms(r, 96*tKV*tDim))
			}
			s.force = true
			ctx := b.NewContext()
			defer ctx.Close()
			positions := make([]int32, tc.batch)
			for i := range positions {
				positions[i] = int32(192 + i)
			}
			require.NoError(t, c.StartForward(ctx, input.Batch{Positions: positions, Sequences: make([]int, tc.batch)}, false))
			c.SetLayer(0)
			qs := make([][]float32, tc.batch)
			for i := range qs {
				qs[i] = randoms(r, tHeads*tDim)
			}
			err = c.SetQueries(0, qs)
			require.ErrorContains(t, err, "rows-only form, which the cache did not ask for")
			require.Zero(t, s.asked)
		})
	}
}
