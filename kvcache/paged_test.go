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

// These tests drive the cache's planning (placement, LRU eviction, pinning,
// masks, upload plans, head groups) without a backend, in the spirit of
// ollama's kvcache/causal_test.go: pools are created without tensors
// (Init with a nil backend), and step does the host half of Put and
// Computed that a graph would trigger.

// testSelector is a programmable paging.Selector.
type testSelector struct {
	c      paging.Config
	groups []paging.Group
	// sel returns the pages of each group; nil selects every page for
	// every group.
	sel func(layer, upto int) [][]int
	// tok, if set, returns the tokens of each group (sorted, below upto);
	// the pages are theirs.
	tok   func(layer, upto int) [][]int32
	needQ bool
}

func (s *testSelector) Name() string                      { return "test" }
func (s *testSelector) Config() paging.Config             { return s.c }
func (s *testSelector) Groups(int) []paging.Group         { return s.groups }
func (s *testSelector) NeedQueries(layer, batch int) bool { return s.needQ }
func (s *testSelector) Select(layer int, _ paging.Summaries, _ *paging.Queries, upto int) paging.Selection {
	if s.tok != nil {
		var out paging.Selection
		for _, toks := range s.tok(layer, upto) {
			var pages []int
			for _, t := range toks {
				if p := int(t) / s.c.PageSize; len(pages) == 0 || pages[len(pages)-1] != p {
					pages = append(pages, p)
				}
			}
			out.Groups, out.Tokens = append(out.Groups, pages), append(out.Tokens, toks)
		}
		return out
	}
	if s.sel != nil {
		return paging.Selection{Groups: s.sel(layer, upto)}
	}
	out := make([][]int, len(s.groups))
	for i := range out {
		out[i] = paging.AllPages(paging.PagesOf(upto, s.c.PageSize))
	}
	return paging.Selection{Groups: out}
}

func newTestCache(t *testing.T, sel paging.Selector, capacity, maxBatch int) *Paged {
	t.Helper()
	c, err := NewPaged(Options{Layout: testLayout, Heads: 4, Selector: sel, Capacity: capacity, MaxBatch: maxBatch})
	require.NoError(t, err)
	c.Init(nil, 0, 1, capacity, maxBatch)
	return c
}

// step runs one forward pass of n tokens through the cache's planning and
// the host half of Put/Computed, with random keys and values, then checks
// the invariants.
func step(t *testing.T, c *Paged, r *rand.Rand, n int) {
	t.Helper()
	pos := make([]int32, n)
	seqs := make([]int, n)
	for i := range pos {
		pos[i] = int32(c.store.Len() + i)
	}
	require.NoError(t, c.StartForward(nil, input.Batch{Positions: pos, Sequences: seqs}, false))
	for l := range c.layers {
		if c.NeedQueries(l) {
			require.NoError(t, c.SetQueries(l, nil))
		}
		for _, g := range c.layers[l].groups {
			g.uploads, g.tups = nil, nil // emitted into the graph
		}
		c.batchWritten(l)
		c.stored(l, rows(r, c.L, n), rows(r, c.L, n))
	}
	require.NoError(t, c.CheckInvariants())
}

// clip returns the distinct pages below n, sorted.
func clip(pages []int, n int) []int {
	var out []int
	for _, p := range pages {
		if p >= 0 && p < n {
			out = append(out, p)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

func TestDenseSelectionKeepsPositionOrder(t *testing.T) {
	sel := &testSelector{c: paging.Config{PageSize: 16}, groups: []paging.Group{{}}}
	c := newTestCache(t, sel, 160, 32)
	r := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int{32, 20, 1, 1, 40} {
		step(t, c, r, n)
	}
	pl := c.layers[0].groups[0].pool
	// Like a dense cache: page p in slot p, filled to its tokens.
	for p := 0; p < c.store.Pages(); p++ {
		require.Equal(t, p, pl.resident(p), "page %d", p)
		require.Equal(t, c.store.pages[0][p].N, pl.fill[p])
	}
}

func TestEvictionAndPinning(t *testing.T) {
	cases := []struct {
		name string
		// pages kept per step besides the written ones
		keep  func(upto int) []int
		steps int
		want  string // error substring, "" for none
	}{
		{"LRU keeps the selection and the written page", func(upto int) []int { return []int{0, 1} }, 40, ""},
		{"moving selection evicts the least recently used", func(upto int) []int {
			p := paging.PagesOf(upto, 16)
			return []int{0, max(0, p-3), max(0, p-2)}
		}, 60, ""},
		{"more pinned pages than slots", func(upto int) []int { return paging.AllPages(paging.PagesOf(upto, 16)) }, 200, "pinned"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			sel := &testSelector{c: paging.Config{PageSize: 16, Sinks: 16, Window: 16}, groups: []paging.Group{{Budget: 48}}}
			sel.sel = func(_, upto int) [][]int {
				keep := clip(tc.keep(upto), paging.PagesOf(upto, 16))
				return [][]int{keep}
			}
			c := newTestCache(t, sel, 4096, 1)
			slots := c.slotsFor(c.layers[0].groups[0])
			require.Less(t, slots, 4096/16, "the budget bounds the pool")
			r := rand.New(rand.NewPCG(3, 4))
			step(t, c, r, 16) // a first page, then decode steps
			var err error
			for i := 0; i < tc.steps && err == nil; i++ {
				err = tryStep(c, r)
				if err == nil {
					require.NoError(t, c.CheckInvariants())
					// The last pass's selection and written pages are resident.
					for _, p := range c.Selected(1) {
						require.GreaterOrEqual(t, c.layers[1].groups[0].pool.resident(p), 0)
					}
				}
			}
			if tc.want == "" {
				require.NoError(t, err)
			} else {
				require.ErrorContains(t, err, tc.want)
			}
		})
	}
}

// tryStep is step that returns StartForward's error.
func tryStep(c *Paged, r *rand.Rand) error {
	pos := []int32{int32(c.store.Len())}
	if err := c.StartForward(nil, input.Batch{Positions: pos, Sequences: []int{0}}, false); err != nil {
		return err
	}
	for l := range c.layers {
		for _, g := range c.layers[l].groups {
			g.uploads, g.tups = nil, nil
		}
		c.batchWritten(l)
		c.stored(l, rows(r, c.L, 1), rows(r, c.L, 1))
	}
	return nil
}

func TestLRUVictim(t *testing.T) {
	p := newPool(nil, testLayout, 0, 2, 3, false)
	none := func(int) bool { return false }
	for i, page := range []int{0, 1, 2} {
		s, err := p.place(page, none, uint64(i+1), false)
		require.NoError(t, err)
		require.Equal(t, page, s, "free slot page mod slots")
	}
	// Touch page 0 again: page 1 is now the least recently used.
	_, err := p.place(0, none, 4, false)
	require.NoError(t, err)
	s, err := p.place(7, none, 5, false)
	require.NoError(t, err)
	require.Equal(t, 1, s)
	require.Equal(t, -1, p.resident(1))
	// Pinned pages are never victims, even when least recently used.
	pinned := func(pg int) bool { return pg == 2 }
	s, err = p.place(8, pinned, 6, false)
	require.NoError(t, err)
	require.Equal(t, 0, s, "page 0 (stamp 4) goes, page 2 (stamp 3) is pinned")
	_, err = p.place(9, func(int) bool { return true }, 7, false)
	require.ErrorContains(t, err, "all 3 device slots are pinned")
}

// With the selection known, placement packs the pass's pages into the
// lowest slots instead of keeping the least recently used ones.
func TestPackedVictim(t *testing.T) {
	p := newPool(nil, testLayout, 0, 2, 3, false)
	none := func(int) bool { return false }
	for _, page := range []int{0, 1, 2} { // one pass (stamp 1)
		s, err := p.place(page, none, 1, true)
		require.NoError(t, err)
		require.Equal(t, page, s, "the lowest free slot")
	}
	// Pass 4 uses page 0 again, then places page 7: the lowest slot whose
	// page is neither pinned nor used in the pass goes (page 1), so that
	// the pass's pages stay packed at the bottom of the pool.
	_, err := p.place(0, none, 4, true)
	require.NoError(t, err)
	s, err := p.place(7, none, 4, true)
	require.NoError(t, err)
	require.Equal(t, 1, s)
	require.Equal(t, -1, p.resident(1))
	// In a later pass the lowest stale slot goes, whatever its age.
	s, err = p.place(8, none, 5, true)
	require.NoError(t, err)
	require.Equal(t, 0, s, "page 0 (stamp 4) is in the lowest slot")
	// Pinned pages are never victims, even in the lowest slot.
	pinned := func(pg int) bool { return pg == 8 || pg == 7 }
	s, err = p.place(9, pinned, 6, true)
	require.NoError(t, err)
	require.Equal(t, 2, s, "pages 8 and 7 are pinned: page 2 goes")
	// The lowest stale slot goes, although page 7 above it is older.
	s, err = p.place(3, none, 7, true)
	require.NoError(t, err)
	require.Equal(t, 0, s, "page 8 (stamp 5) in slot 0, page 7 (stamp 4) in slot 1")
	// A free slot above stale ones is taken once they are used in the pass.
	p.drop(9)
	var got []int
	for _, page := range []int{11, 12, 13} {
		s, err = p.place(page, none, 8, true)
		require.NoError(t, err)
		got = append(got, s)
	}
	require.Equal(t, []int{0, 1, 2}, got)
	_, err = p.place(10, func(int) bool { return true }, 8, true)
	require.ErrorContains(t, err, "all 3 device slots are pinned")
}

// Attention reads the slots up to the last one a pass attends to: the
// planning packs the attended pages at the bottom of a budget pool, so a
// window that moves on leaves its old pages above them (or replaces them),
// not in between. Without the packing, the pool's slack slots were read
// at every step of every method (36 slots where 33 are attended at a
// 2048-token budget with 64-token pages).
func TestAttendedSlotsStayPacked(t *testing.T) {
	const P = 16
	for _, keep := range []struct {
		name string
		sel  func(upto int) []int
	}{
		{"window", func(upto int) []int { // sinks page + the last 3 pages
			p := paging.PagesOf(upto, P)
			return []int{0, max(0, p-3), max(0, p-2), max(0, p-1)}
		}},
		{"retrieved pages and a window", func(upto int) []int {
			p := paging.PagesOf(upto, P)
			return []int{0, 5, 6, max(0, p-2), max(0, p-1)}
		}},
	} {
		t.Run(keep.name, func(t *testing.T) {
			sel := &testSelector{c: paging.Config{PageSize: P, Sinks: P, Window: 2 * P}, groups: []paging.Group{{Budget: 5 * P}}}
			sel.sel = func(_, upto int) [][]int {
				return [][]int{clip(keep.sel(upto), paging.PagesOf(upto, P))}
			}
			c := newTestCache(t, sel, 4096, 1)
			r := rand.New(rand.NewPCG(5, 6))
			step(t, c, r, 16)
			for i := 0; i < 300; i++ {
				require.NoError(t, tryStep(c, r))
				require.NoError(t, c.CheckInvariants())
				g := c.layers[0].groups[0]
				visible := union(g.sel, c.writes, c.store.Pages())
				used := g.pool.attended(func(p int) bool { return slices.Contains(visible, p) })
				require.Equal(t, len(visible), used, "step %d: pages %v in slots %v", i, visible, g.pool.page)
				require.Less(t, used, g.pool.slots, "the pool has slack")
			}
		})
	}
}

func TestBuildMask(t *testing.T) {
	const P = 4
	p := newPool(nil, Layout{Layers: 1, KVHeads: 1, HeadDim: 2, PageSize: P}, 0, 1, 4, false)
	// Slots: 0 <- page 2 (full), 1 <- page 0 (full), 2 <- page 3 (the batch's page), 3 free.
	for _, x := range []struct{ page, slot, fill int }{{2, 0, 4}, {0, 1, 4}, {3, 2, 2}} {
		p.page[x.slot], p.fill[x.slot], p.where[x.page] = x.page, x.fill, x.slot
	}
	// Batch: positions 13 and 14 (page 3, offsets 1 and 2); page 3 holds 12 already.
	p.fill[2] = 3
	ninf := float32(math.Inf(-1))
	cases := []struct {
		name string
		sel  []int
		tok  []int32
		want []float32 // [2 rows][used*P cells]
	}{
		{"every page", []int{0, 2, 3}, nil, []float32{
			0, 0, 0, 0, 0, 0, 0, 0, 0, 0, ninf, ninf,
			0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, ninf,
		}},
		{"page 2 hidden", []int{0, 3}, nil, []float32{
			ninf, ninf, ninf, ninf, 0, 0, 0, 0, 0, 0, ninf, ninf,
			ninf, ninf, ninf, ninf, 0, 0, 0, 0, 0, 0, 0, ninf,
		}},
		// Tokens 1, 3 (page 0), 9 (page 2) and 12 (the batch's page, before
		// it): only those and the batch's own cells are open.
		{"tokens", []int{0, 2, 3}, []int32{1, 3, 9, 12}, []float32{
			ninf, 0, ninf, ninf, ninf, 0, ninf, 0, 0, 0, ninf, ninf,
			ninf, 0, ninf, ninf, ninf, 0, ninf, 0, 0, 0, 0, ninf,
		}},
		// Without token 12 the batch's page hides its earlier token.
		{"tokens without the page's earlier token", []int{0, 2, 3}, []int32{9}, []float32{
			ninf, 0, ninf, ninf, ninf, ninf, ninf, ninf, ninf, 0, ninf, ninf,
			ninf, 0, ninf, ninf, ninf, ninf, ninf, ninf, ninf, 0, 0, ninf,
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := buildMask(p, 3, c.sel, c.tok, []int{3}, 4, 13, 2, P)
			require.Equal(t, c.want, got)
		})
	}
}

func TestPlanRuns(t *testing.T) {
	const P = 16
	ups := []upload{{page: 9, slot: 5, rows: P}, {page: 1, slot: 0, rows: P}, {page: 2, slot: 1, rows: P},
		{page: 3, slot: 2, rows: 7}, {page: 4, slot: 3, rows: P}, {page: 8, slot: 4, rows: P}}
	runs, full, partial := planRuns(ups, P)
	slotsOf := func(run []upload) []int {
		var s []int
		for _, u := range run {
			s = append(s, u.slot)
		}
		return s
	}
	var got [][]int
	for _, r := range runs {
		got = append(got, slotsOf(r))
	}
	// A run continues only after a whole page: the partial page in slot 2
	// ends its run, and slot 3 starts a new one.
	require.Equal(t, [][]int{{0, 1, 2}, {3, 4, 5}}, got)
	require.Len(t, full, 5)
	require.Equal(t, []int{2}, slotsOf(partial))
}

// Uploads are planned for pages the pool lacks or holds partly, never for
// pages already resident in full.
func TestUploadPlanning(t *testing.T) {
	pick := []int{0, 3}
	sel := &testSelector{c: paging.Config{PageSize: 16, Sinks: 16, Window: 16}, groups: []paging.Group{{Budget: 64}}, needQ: true}
	sel.sel = func(_, upto int) [][]int { return [][]int{clip(pick, paging.PagesOf(upto, 16))} }
	c := newTestCache(t, sel, 1024, 64)
	r := rand.New(rand.NewPCG(5, 6))
	step(t, c, r, 64)  // pages 0-3 written in place: nothing to upload
	step(t, c, r, 64)  // pages 4-7
	pick = []int{0, 1} // page 1 was evicted? it must come back with an upload if so
	require.NoError(t, c.StartForward(nil, input.Batch{Positions: []int32{128}, Sequences: []int{0}}, false))
	require.NoError(t, c.SetQueries(0, nil))
	g := c.layers[0].groups[0]
	for _, u := range g.uploads {
		require.Contains(t, []int{0, 1}, u.page)
		require.Equal(t, 16, u.rows)
	}
	for _, p := range []int{0, 1} {
		s := g.pool.resident(p)
		require.GreaterOrEqual(t, s, 0)
		require.Equal(t, 16, g.pool.fill[s], "planned upload fills the slot")
	}
	require.NoError(t, c.CheckInvariants())
}

func TestHeadGroupsHaveTheirOwnPools(t *testing.T) {
	sel := &testSelector{c: paging.Config{PageSize: 16, Sinks: 16, Window: 16}, groups: []paging.Group{
		{KVHeads: []int{1}, Budget: 0, Class: "retrieval"},
		{KVHeads: []int{0}, Budget: 48, Class: "streaming"},
	}}
	sel.sel = func(_, upto int) [][]int {
		n := paging.PagesOf(upto, 16)
		return [][]int{paging.AllPages(n), clip([]int{0, n - 1}, n)}
	}
	c := newTestCache(t, sel, 1024, 16)
	r := rand.New(rand.NewPCG(7, 8))
	for range 20 {
		step(t, c, r, 16)
	}
	gs := c.layers[0].groups
	require.Equal(t, testLayout.HeadDim, gs[0].pool.row, "one KV head per pool row")
	require.Greater(t, gs[0].pool.slots, gs[1].pool.slots, "a dense group holds every page, the streaming one its budget")
	st := c.Stats()
	require.Equal(t, st.ResidentBytes, st.ResidentByClass["retrieval"]+st.ResidentByClass["streaming"])
	require.Greater(t, st.ResidentByClass["retrieval"], st.ResidentByClass["streaming"])
	groups, picks := c.SelectedByGroup(0)
	require.Equal(t, []int{1}, groups[0].KVHeads)
	require.Len(t, picks[0], 20)
	require.Equal(t, []int{0, 19}, picks[1])
}

func TestBadSelectionsAreErrors(t *testing.T) {
	cases := []struct {
		name   string
		groups []paging.Group
		sel    [][]int
		want   string
	}{
		{"head in two groups", []paging.Group{{KVHeads: []int{0, 1}}, {KVHeads: []int{1}}}, nil, "in two groups"},
		{"head in no group", []paging.Group{{KVHeads: []int{0}}}, nil, "in no group"},
		{"unsorted pages", []paging.Group{{}}, [][]int{{1, 0}}, "not sorted"},
		{"page out of range", []paging.Group{{}}, [][]int{{0, 99}}, "out of range"},
		{"wrong group count", []paging.Group{{}}, [][]int{{0}, {0}}, "2 head groups"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			sel := &testSelector{c: paging.Config{PageSize: 16}, groups: tc.groups}
			if tc.sel != nil {
				sel.sel = func(int, int) [][]int { return tc.sel }
			}
			c, err := NewPaged(Options{Layout: testLayout, Heads: 4, Selector: sel, Capacity: 256, MaxBatch: 32})
			if err == nil {
				c.Init(nil, 0, 1, 256, 32)
				pos := make([]int32, 32)
				for i := range pos {
					pos[i] = int32(i)
				}
				err = c.StartForward(nil, input.Batch{Positions: pos, Sequences: make([]int, 32)}, false)
			}
			require.ErrorContains(t, err, tc.want)
		})
	}
}

func TestCheckInvariantsFindsBrokenState(t *testing.T) {
	sel := &testSelector{c: paging.Config{PageSize: 16}, groups: []paging.Group{{}}}
	c := newTestCache(t, sel, 256, 32)
	step(t, c, rand.New(rand.NewPCG(9, 9)), 32)
	pl := c.layers[1].groups[0].pool
	pl.where[1] = 0 // page 1 claims slot 0, which holds page 0
	require.ErrorContains(t, c.CheckInvariants(), "maps to slot")
	pl.where[1] = 1
	pl.fill[1] = 17
	require.ErrorContains(t, c.CheckInvariants(), "fill 17")
	pl.fill[1] = 16
	c.layers[0].groups[0].sel = []int{1, 0}
	require.ErrorContains(t, c.CheckInvariants(), "not sorted")
	c.layers[0].groups[0].sel = slices.Clone([]int{0, 1})
	require.NoError(t, c.CheckInvariants())
}

// A budgeted pool is sized for the batches that come: a document session's
// short question and one-token decode steps keep it at the budget; a long
// prompt later grows it, and its pages are uploaded again.
func TestPoolGrowsWithTheBatch(t *testing.T) {
	sel := &testSelector{c: paging.Config{PageSize: 16, Sinks: 16, Window: 16}, groups: []paging.Group{{Budget: 64}}}
	sel.sel = func(_, upto int) [][]int {
		n := paging.PagesOf(upto, 16)
		return [][]int{clip([]int{0, 1, n - 2, n - 1}, n)}
	}
	c := newTestCache(t, sel, 4096, 512)
	r := rand.New(rand.NewPCG(10, 11))
	step(t, c, r, 8)
	for range 40 {
		step(t, c, r, 1)
	}
	g := c.layers[0].groups[0]
	small := g.pool.slots
	require.Equal(t, 64/16+1+3, small, "budget pages + one batch page + slack, not MaxBatch's 32 pages")
	step(t, c, r, 100) // spans 7 pages
	require.Equal(t, 64/16+7+3, g.pool.slots)
	for _, p := range c.Selected(0) {
		require.GreaterOrEqual(t, g.pool.resident(p), 0)
	}
	step(t, c, r, 1)
	require.Equal(t, 64/16+7+3, g.pool.slots, "pools only grow")
}

// passSelector changes its budget every pass (as probe's cut-off does).
type passSelector struct {
	testSelector
	budgets []int // budget of pass i (cycled)
	pass    int
}

func (s *passSelector) StartPass(pos0, batch int) { s.pass++ }
func (s *passSelector) Groups(int) []paging.Group {
	return []paging.Group{{Budget: s.budgets[s.pass%len(s.budgets)], Class: "all"}}
}

// A paging.PassStarter's budgets are read again at every pass: its pools
// grow and shrink to fit them, with the selection and invariants intact.
func TestPoolsFollowChangingBudgets(t *testing.T) {
	c0 := paging.Config{PageSize: 16, Sinks: 16, Window: 32}
	sel := &passSelector{testSelector: testSelector{c: c0, groups: []paging.Group{{}}}, budgets: []int{256, 64, 128}}
	sel.sel = func(layer, upto int) [][]int {
		req, _ := c0.Required(upto)
		return [][]int{req}
	}
	c := newTestCache(t, sel, 1024, 32)
	r := rand.New(rand.NewPCG(3, 4))
	step(t, c, r, 32)
	var slots []int
	for i := 0; i < 7; i++ {
		step(t, c, r, 1)
		g := c.layers[0].groups[0]
		require.Equal(t, sel.budgets[sel.pass%3], g.Budget, "pass %d", sel.pass)
		require.Equal(t, c.slotsFor(g), g.pool.slots, "pass %d: the pool is sized for this pass's budget", sel.pass)
		slots = append(slots, g.pool.slots)
	}
	require.Greater(t, slices.Max(slots), slices.Min(slots), "the pools must have changed size")
}

func TestCheckTokens(t *testing.T) {
	const P = 4
	for _, c := range []struct {
		name  string
		toks  []int32
		pages []int
		want  string
	}{
		{"ok", []int32{0, 3, 9, 10}, []int{0, 2}, ""},
		{"empty", []int32{}, []int{1}, ""},
		{"unsorted", []int32{3, 1}, []int{0}, "not sorted"},
		{"repeated", []int32{1, 1}, []int{0}, "not sorted"},
		{"page not selected", []int32{1, 5}, []int{0, 2}, "token 5 is on page 1"},
		{"past the pages", []int32{12}, []int{0, 2}, "token 12 is on page 3"},
		{"negative", []int32{-1}, []int{0}, "token -1"},
		{"a page's tokens, then one on an unselected page", []int32{8, 9, 11, 12}, []int{2}, "token 12 is on page 3"},
		{"many on each page", []int32{0, 1, 2, 3, 8, 9, 10, 11}, []int{0, 2}, ""},
		{"unsorted within a page", []int32{8, 10, 9}, []int{2}, "not sorted"},
		{"a gap back to an earlier page", []int32{9, 4}, []int{1, 2}, "not sorted"},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := checkTokens(c.toks, c.pages, P)
			if c.want == "" {
				require.NoError(t, err)
			} else {
				require.ErrorContains(t, err, c.want)
			}
		})
	}
}
