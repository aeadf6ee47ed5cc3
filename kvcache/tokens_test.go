package kvcache

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/ollama/ollama/model/input"
	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/paging"
)

// Token-granular pools (paging.Group.Tokens) planned without a backend, as
// the page tests above: which tokens are uploaded, which cells they take,
// what is evicted, and the errors.

// below returns the sorted, distinct tokens of toks below upto, plus the
// tail upto-tail..upto-1 (the batch's own among them).
func below(toks []int32, upto, tail int) []int32 {
	var out []int32
	for _, t := range toks {
		if int(t) < upto {
			out = append(out, t)
		}
	}
	for t := max(0, upto-tail); t < upto; t++ {
		out = append(out, int32(t))
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// tokenStep runs one pass of n tokens and checks the planning against what
// the pool held before it: exactly the selected earlier tokens it lacked
// are uploaded (each once, into a distinct cell); evicted tokens were not
// used in this pass, and were no more recently used than any unselected
// token that stays; free cells go before any eviction. It returns the
// pass's uploads and evictions, or StartForward's / SetQueries' error.
func tokenStep(t *testing.T, c *Paged, r *rand.Rand, n int) (uploads, evictions int, err error) {
	t.Helper()
	type before struct {
		at    map[int32]int32
		stamp map[int32]uint64
		free  int
	}
	prev := map[*group]before{}
	for l := range c.layers {
		for _, g := range c.layers[l].groups {
			if g.pool == nil || g.pool.tok == nil {
				continue
			}
			b := before{at: map[int32]int32{}, stamp: map[int32]uint64{}}
			for cl, p := range g.pool.tok.pos {
				if p < 0 {
					b.free++
					continue
				}
				b.at[p], b.stamp[p] = int32(cl), g.pool.tok.stamp[cl]
			}
			prev[g] = b
		}
	}
	pos0 := c.store.Len()
	pos := make([]int32, n)
	for i := range pos {
		pos[i] = int32(pos0 + i)
	}
	if err := c.StartForward(nil, input.Batch{Positions: pos, Sequences: make([]int, n)}, false); err != nil {
		return 0, 0, err
	}
	for l := range c.layers {
		if c.NeedQueries(l) {
			if err := c.SetQueries(l, nil); err != nil {
				return 0, 0, err
			}
		}
		for _, g := range c.layers[l].groups {
			b, ok := prev[g]
			if !ok || g.pool.tok == nil || len(b.at)+b.free != len(g.pool.tok.pos) {
				g.uploads, g.tups = nil, nil // a new pool: nothing to compare with
				continue
			}
			tc := g.pool.tok
			var want []int32
			for _, tk := range g.tok {
				if _, had := b.at[tk]; !had && int(tk) < pos0 {
					want = append(want, tk)
				}
			}
			var got []int32
			cells := map[int32]bool{}
			for _, u := range g.tups {
				got = append(got, u.pos)
				require.False(t, cells[u.cell], "cell %d taken twice", u.cell)
				cells[u.cell] = true
				require.Equal(t, u.cell, tc.cellOf(u.pos))
			}
			slices.Sort(got)
			require.Equal(t, want, got, "layer %d: uploads are the selected tokens the pool lacked", l)
			uploads += len(got)
			// Evictions: only when no cell was free, never a token of this
			// pass, and the least recently used first.
			var evicted []int32
			oldestKept := uint64(math.MaxUint64)
			for p, st := range b.stamp {
				if tc.cellOf(p) < 0 {
					evicted = append(evicted, p)
					require.False(t, slices.Contains(g.tok, p), "selected token %d evicted", p)
				} else if tc.stamp[tc.cellOf(p)] != c.stamp {
					oldestKept = min(oldestKept, st)
				}
			}
			evictions += len(evicted)
			for _, p := range evicted {
				require.Zero(t, b.free-len(g.tups)-n+len(evicted), "evicted %d with free cells left", p)
				require.LessOrEqual(t, b.stamp[p], oldestKept, "evicted %d is not the least recently used", p)
			}
			g.uploads, g.tups = nil, nil // emitted into the graph
		}
		c.batchWritten(l)
		c.stored(l, rows(r, c.L, n), rows(r, c.L, n))
	}
	require.NoError(t, c.CheckInvariants())
	return uploads, evictions, nil
}

func TestTokenPoolPlanning(t *testing.T) {
	const P = 16
	fixed := []int32{0, 1, 2, 3, 5, 17, 40, 41, 42, 63, 100}
	cases := []struct {
		name   string
		budget int
		// pick is the selection (besides the tail of 8 tokens) of the decode
		// steps; the prompt's passes attend to the tail only, so that the
		// pool, of 224 cells, keeps the prompt's last tokens only.
		pick  func(upto int) []int32
		steps int // decode steps after a 400-token prompt in 4 batches
		// uploads is the total expected over the decode steps (-1: not checked)
		uploads int
		want    string // error substring
	}{
		{"a fixed selection is uploaded once", 64, func(int) []int32 { return fixed }, 30, len(fixed), ""},
		{"a moving selection evicts the least recently used", 64, func(upto int) []int32 {
			r := rand.New(rand.NewPCG(uint64(upto), 1))
			var out []int32
			for range 40 {
				out = append(out, int32(r.IntN(120)))
			}
			slices.Sort(out)
			return slices.Compact(out)
		}, 60, -1, ""},
		{"the budget's tokens on more pages than a page pool holds", 64, func(int) []int32 {
			var out []int32
			for p := int32(0); p < 8; p++ {
				out = append(out, p*P+3, p*P+11) // 16 tokens on 8 pages; a page pool of this budget has 4+1+3
			}
			return out
		}, 5, 16, ""},
		{"more selected tokens than cells", 64, func(upto int) []int32 {
			var out []int32
			for t := int32(0); t < int32(upto); t++ {
				out = append(out, t)
			}
			return out
		}, 100, -1, "do not fit a token pool"},
	}
	for _, tc := range cases {
		for _, needQ := range []bool{false, true} {
			t.Run(tc.name+map[bool]string{false: "/at start", true: "/from queries"}[needQ], func(t *testing.T) {
				sel := &testSelector{c: paging.Config{PageSize: P, Sinks: 4, Window: 8},
					groups: []paging.Group{{KVHeads: []int{0}, Budget: tc.budget, Tokens: true}, {KVHeads: []int{1}, Budget: tc.budget, Tokens: true}},
					needQ:  needQ}
				sel.tok = func(layer, upto int) [][]int32 {
					var toks []int32
					if upto > 400 {
						toks = tc.pick(upto)
					}
					toks = below(toks, upto, 8)
					// The second KV head attends to the same tokens shifted by
					// one: the groups' pools are independent.
					var other []int32
					for _, t := range toks {
						if int(t)+1 < upto {
							other = append(other, t+1)
						}
					}
					return [][]int32{toks, below(other, upto, 8)}
				}
				c := newTestCache(t, sel, 1024, 128)
				r := rand.New(rand.NewPCG(11, 12))
				for range 4 {
					_, _, err := tokenStep(t, c, r, 100)
					require.NoError(t, err)
				}
				g := c.layers[0].groups[0]
				require.Equal(t, c.slotsFor(g)*P, len(g.pool.tok.pos), "a token pool has the cells of a page pool of its budget")
				require.Equal(t, (64/P+7+3)*P, len(g.pool.tok.pos), "budget pages + 7 batch pages + 3, as page pools")
				require.Equal(t, int32(-1), g.pool.tok.cellOf(100), "the prompt's early tokens were evicted")
				total, evictions := 0, 0
				var err error
				for i := 0; i < tc.steps && err == nil; i++ {
					var up, ev int
					up, ev, err = tokenStep(t, c, r, 1)
					total, evictions = total+up, evictions+ev
				}
				if tc.want != "" {
					require.ErrorContains(t, err, tc.want)
					return
				}
				require.NoError(t, err)
				require.Positive(t, evictions, "the full pool evicts (and the eviction checks ran)")
				if tc.uploads >= 0 {
					// Per layer and group: the pools of both groups and layers
					// upload the same number of tokens.
					require.Equal(t, tc.uploads*2*2, total, "each selected earlier token is uploaded once per pool")
				}
				for l := range c.layers {
					for i, g := range c.layers[l].groups {
						require.Equal(t, len(g.tok), g.pool.tok.mapped-countUnselected(g), "layer %d group %d", l, i)
					}
				}
				require.Equal(t, c.layers[0].groups[0].tok, sel.tok(0, c.store.Len())[0])
				st := c.Stats()
				require.Equal(t, st.TokenUploads*int64(testLayout.HeadDim)*2*2, st.UploadedBytes)
				require.Equal(t, int64(len(c.layers[0].groups[0].tok)+len(c.layers[0].groups[1].tok))*int64(testLayout.HeadDim)*4*2, st.AttendedBytes)
			})
		}
	}
}

// countUnselected is the resident tokens of g's pool not in its selection.
func countUnselected(g *group) int {
	n := 0
	for p, cl := range g.pool.tok.at {
		if cl >= 0 && !slices.Contains(g.tok, int32(p)) {
			n++
		}
	}
	return n
}

func TestTokenVictims(t *testing.T) {
	// Cells 0..5: 0 free, 1 pos 10 (stamp 3), 2 pos 11 (stamp 1), 3 free,
	// 4 pos 12 (stamp 1), 5 pos 13 (stamp 9: this pass).
	mk := func() *tokenCells {
		tc := newTokenCells(6)
		for _, x := range []struct {
			cell, pos int32
			stamp     uint64
		}{{1, 10, 3}, {2, 11, 1}, {4, 12, 1}, {5, 13, 9}} {
			tc.set(x.cell, x.pos, x.stamp)
		}
		return tc
	}
	for _, c := range []struct {
		name string
		need int
		want []int32
		ok   bool
	}{
		{"none", 0, nil, true},
		{"free cells first, ascending", 2, []int32{0, 3}, true},
		{"then the oldest, ties in cell order", 4, []int32{0, 3, 2, 4}, true},
		{"then the next oldest", 5, []int32{0, 3, 2, 4, 1}, true},
		{"never a cell of this pass", 6, nil, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, ok := mk().victims(c.need, 9)
			require.Equal(t, c.ok, ok)
			require.Equal(t, c.want, got)
		})
	}
}

// victims' quickselect over packed (stamp, cell) keys chooses exactly
// what a full sort by (stamp, cell) does, on pools with many equally old
// cells (a decode step's evictions share few stamps).
func TestTokenVictimsMatchSort(t *testing.T) {
	for _, c := range []struct {
		name          string
		cells, stamps int
	}{{"few stamps", 300, 3}, {"many stamps", 300, 200}, {"one stamp", 64, 1}, {"tiny", 3, 2}} {
		t.Run(c.name, func(t *testing.T) {
			r := rand.New(rand.NewPCG(uint64(c.cells), uint64(c.stamps)))
			for trial := 0; trial < 50; trial++ {
				tc := newTokenCells(c.cells)
				now := uint64(c.stamps + 1)
				for cl := 0; cl < c.cells; cl++ {
					if r.IntN(10) == 0 {
						continue // free
					}
					st := uint64(1 + r.IntN(c.stamps))
					if r.IntN(5) == 0 {
						st = now
					}
					tc.set(int32(cl), int32(1000+cl), st)
				}
				need := r.IntN(c.cells + 1)
				got, ok := tc.victims(need, now)
				want, wok := tc.victimsSorted(need, now, freeCells(tc, need))
				if len(freeCells(tc, need)) == need {
					want, wok = freeCells(tc, need), true
				}
				require.Equal(t, wok, ok, "trial %d need %d", trial, need)
				if ok {
					require.Equal(t, want, got, "trial %d need %d", trial, need)
				}
			}
		})
	}
}

// freeCells is victims' first part: up to need free cells, ascending.
func freeCells(tc *tokenCells, need int) []int32 {
	var out []int32
	for c, p := range tc.pos {
		if p < 0 && len(out) < need {
			out = append(out, int32(c))
		}
	}
	return out
}

func TestTokenRuns(t *testing.T) {
	ups := []tokenUpload{{0, 7}, {1, 3}, {2, 99}, {5, 4}, {6, 5}, {9, 1}}
	require.Equal(t, [][2]int{{0, 3}, {3, 5}, {5, 6}}, tokenRuns(ups), "consecutive cells, whatever the positions")
	require.Nil(t, tokenRuns(nil))
}

func TestBuildTokenMask(t *testing.T) {
	// 8 cells: 0 <- pos 9, 1 <- pos 2, 2 free, 3 <- pos 30 (not selected),
	// 4 <- pos 40 and 5 <- pos 41 (the batch: positions 40, 41).
	tc := newTokenCells(8)
	for _, x := range [][2]int32{{0, 9}, {1, 2}, {3, 30}, {4, 40}, {5, 41}} {
		tc.set(x[0], x[1], 1)
	}
	ninf := float32(math.Inf(-1))
	for _, c := range []struct {
		name  string
		tok   []int32
		cells int
		want  []float32
	}{
		{"selected cells and the batch, causally", []int32{2, 9, 40, 41}, 8, []float32{
			0, 0, ninf, ninf, 0, ninf, ninf, ninf,
			0, 0, ninf, ninf, 0, 0, ninf, ninf,
		}},
		{"an unselected resident token stays hidden", []int32{9}, 8, []float32{
			0, ninf, ninf, ninf, 0, ninf, ninf, ninf,
			0, ninf, ninf, ninf, 0, 0, ninf, ninf,
		}},
		{"a selected token past the view is left out", []int32{30}, 6, []float32{
			ninf, ninf, ninf, 0, 0, ninf,
			ninf, ninf, ninf, 0, 0, 0,
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			require.Equal(t, c.want, buildTokenMask(tc, c.cells, c.tok, []int32{4, 5}, 40))
		})
	}
	require.Equal(t, 8, tc.used(4), "cells up to the last occupied, in whole pages")
	tc.free(5)
	tc.free(4)
	require.Equal(t, 4, tc.used(4))
}

func TestTokenPoolErrorsAndRemove(t *testing.T) {
	const P = 16
	sel := &testSelector{c: paging.Config{PageSize: P, Sinks: 4, Window: 8},
		groups: []paging.Group{{KVHeads: []int{0, 1}, Budget: 64, Tokens: true}}}
	sel.sel = func(_, upto int) [][]int { return [][]int{{0}} }
	c := newTestCache(t, sel, 1024, 64)
	err := c.StartForward(nil, input.Batch{Positions: []int32{0}, Sequences: []int{0}}, false)
	require.ErrorContains(t, err, "group 0: the group is token-granular, but its selection lists no tokens")

	sel.sel = nil
	sel.tok = func(_, upto int) [][]int32 { return [][]int32{below([]int32{1, 20, 33}, upto, 8)} }
	c = newTestCache(t, sel, 1024, 64)
	r := rand.New(rand.NewPCG(1, 1))
	for _, n := range []int{64, 1, 1} {
		_, _, err := tokenStep(t, c, r, n)
		require.NoError(t, err)
	}
	g := c.layers[1].groups[0]
	require.Equal(t, []int32{1, 20, 33, 58, 59, 60, 61, 62, 63, 64, 65}, g.tok)
	require.NoError(t, c.Remove(0, 40, math.MaxInt32))
	for p, cl := range g.pool.tok.at {
		if cl >= 0 {
			require.Less(t, p, 40, "removed tokens leave their cells")
		}
	}
	require.Equal(t, 40, g.pool.tok.mapped, "positions 0..39 kept")

	// CheckInvariants finds a broken token pool.
	c = newTestCache(t, sel, 1024, 64)
	_, _, err = tokenStep(t, c, r, 64)
	require.NoError(t, err)
	tc := c.layers[0].groups[0].pool.tok
	for _, b := range []struct {
		name string
		brk  func() (restore func())
		want string
	}{
		{"inverse maps", func() func() {
			saved := tc.at[1]
			tc.at[1] = tc.at[20]
			return func() { tc.at[1] = saved }
		}, "maps to cell"},
		{"past the sequence", func() func() {
			tc.set(150, 500, 0)
			return func() { tc.free(150) }
		}, "position 500, past the 64 tokens"},
		{"selected token not resident", func() func() {
			tc.free(tc.cellOf(20))
			return nil
		}, "selected token 20 is not resident"},
	} {
		t.Run(b.name, func(t *testing.T) {
			restore := b.brk()
			require.ErrorContains(t, c.CheckInvariants(), b.want)
			if restore != nil {
				restore()
				require.NoError(t, c.CheckInvariants())
			}
		})
	}
}
