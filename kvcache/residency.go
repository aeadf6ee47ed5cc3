package kvcache

import (
	"fmt"
	"slices"

	"github.com/ollama/ollama/ml"

	"github.com/kvrecall/kvrecall/internal/backendmem"
)

// pool is one head group's device tier in one layer: slots page slots in
// backend memory holding the group's KV heads. Attention reads views over
// the first used slots; which page sits in which slot does not matter (keys
// are roped before they are cached), only the mask must agree.
//
//	k: [headDim, heads, slots*pageSize]   (as ollama's causal cache)
//	v: [slots*pageSize, headDim, heads]   (permuted: what ggml's mul_mat wants)
//
// Invariants (CheckInvariants): page and where are inverse maps; a free
// slot (page -1) has fill 0; fill <= pageSize.
type pool struct {
	id    uint64 // distinct for every pool made (kept step graphs, keptstep.go)
	slots int
	row   int // headDim * heads: elements of one token's keys in this pool
	ctx   ml.Context
	k, v  ml.Tensor
	page  []int       // slot -> page id, -1 when free
	fill  []int       // tokens of that page present in the slot
	stamp []uint64    // last forward pass that used the slot (LRU)
	where map[int]int // page id -> slot
	// tok, if set, makes the pool token-granular (paging.Group.Tokens):
	// its slots·P cells hold single tokens and page, fill and where stay
	// empty (see tokens.go).
	tok *tokenCells
	// hk, hv are k's and v's memory when the backend keeps them in host
	// memory (the CPU backend), nil otherwise: uploads are then plain
	// copies (HostUploads, hostpool.go).
	hk, hv []uint16
	// staged marks a staged token group's buffer (staged.go): its cells
	// are refilled every pass, its page maps stay empty.
	staged bool
	layer  int // the model layer whose device holds it
	// stage is the pool's device-upload staging tensors (devupload.go),
	// nil until its first device upload; noStage once the backend
	// refused their memory.
	stage   *stage
	noStage bool
}

// newPool allocates a pool: k [headDim, heads, cells]; v permuted, [cells,
// headDim, heads], or with tokenV (token pools, tokens.go) token-major
// like k.
func newPool(b ml.Backend, l Layout, layer, heads, slots int, tokenV bool) *pool {
	cells := slots * l.PageSize
	p := &pool{id: graphObjects.Add(1), slots: slots, row: heads * l.HeadDim, layer: layer,
		page: make([]int, slots), fill: make([]int, slots), stamp: make([]uint64, slots),
		where: map[int]int{},
	}
	if b != nil {
		backendmem.Do(func() {
			p.ctx = b.NewContextSize(2).Layer(layer)
			p.k = p.ctx.Zeros(ml.DTypeF16, l.HeadDim, heads, cells)
			if tokenV {
				p.v = p.ctx.Zeros(ml.DTypeF16, l.HeadDim, heads, cells)
			} else {
				p.v = p.ctx.Zeros(ml.DTypeF16, cells, l.HeadDim, heads)
			}
		})
		p.hk = hostMem(p.k, cells*p.row)
		p.hv = hostMem(p.v, cells*p.row)
		if p.hk == nil || p.hv == nil {
			p.hk, p.hv = nil, nil
		}
	}
	for i := range p.page {
		p.page[i] = -1
	}
	return p
}

func (p *pool) close() {
	if p.stage != nil {
		p.stage.close()
		p.stage = nil
	}
	if p.ctx != nil {
		p.ctx.Close()
		p.ctx = nil
	}
}

// used is one past the highest occupied slot.
func (p *pool) used() int {
	for s := p.slots - 1; s >= 0; s-- {
		if p.page[s] >= 0 {
			return s + 1
		}
	}
	return 0
}

// resident returns the slot holding page, or -1.
func (p *pool) resident(page int) int {
	if s, ok := p.where[page]; ok {
		return s
	}
	return -1
}

// place puts page into a slot and returns it.
//
// With pack (the pass's selection is known and pinned), the page takes the
// lowest slot that is free or holds a page that is neither pinned nor used
// in this pass. Attention reads every cell of the first used slots (a
// masked cell costs what an attended one does), so this keeps the pages a
// pass attends to at the bottom of the pool, and the slack slots above
// them (a budget pool has the budget's pages + batch pages + 3) out of
// the attention's view (attended). A page a window or a retrieval has just
// left behind is the usual victim; pages placed in order into a pool that
// keeps them all (a dense selection) land in position order.
//
// Without pack (a batch's pages placed before a selector that needs the
// queries has chosen), a page that is not pinned may still be chosen a
// moment later, so nothing is evicted while a slot is free: slot page mod
// slots if free (position order when every page fits), else the lowest
// free slot, else the least recently used slot whose page is not pinned.
func (p *pool) place(page int, pinned func(page int) bool, stamp uint64, pack bool) (int, error) {
	if s := p.resident(page); s >= 0 {
		p.stamp[s] = stamp
		return s, nil
	}
	victim := -1
	if s := page % p.slots; !pack && p.page[s] < 0 {
		victim = s
	}
	for s := 0; s < p.slots && victim < 0; s++ {
		if p.page[s] < 0 || (pack && !pinned(p.page[s]) && p.stamp[s] != stamp) {
			victim = s
		}
	}
	if victim < 0 && !pack {
		for s := 0; s < p.slots; s++ {
			if pinned(p.page[s]) || p.stamp[s] == stamp {
				continue
			}
			if victim < 0 || p.stamp[s] < p.stamp[victim] {
				victim = s
			}
		}
	}
	if victim < 0 {
		return -1, fmt.Errorf("kvcache: all %d device slots are pinned; raise the budget's slack", p.slots)
	}
	if old := p.page[victim]; old >= 0 {
		delete(p.where, old)
	}
	p.page[victim], p.fill[victim], p.stamp[victim] = page, 0, stamp
	p.where[page] = victim
	return victim, nil
}

// attended is one past the highest slot holding a page the pass attends
// to (visible: selected or written by the batch): attention reads only
// those first slots, and cells above them hold stale pages that the mask
// would hide anyway.
func (p *pool) attended(visible func(page int) bool) int {
	for s := p.slots - 1; s >= 0; s-- {
		if p.page[s] >= 0 && visible(p.page[s]) {
			return s + 1
		}
	}
	return 0
}

// drop frees the slots of pages at or after first.
func (p *pool) drop(first int) {
	for s, pg := range p.page {
		if pg >= first {
			delete(p.where, pg)
			p.page[s], p.fill[s] = -1, 0
		}
	}
}

// bytes is the device memory of the pool (f16 keys and values).
func (p *pool) bytes(l Layout) int64 {
	return int64(p.slots) * int64(l.PageSize) * int64(p.row) * 2 * 2
}

// placeAll makes pages resident in group g's pool of layer (keeping the
// batch's pages, the pages in the list and the group's selection pinned)
// and schedules uploads of what is missing.
func (c *Paged) placeAll(layer int, g *group, pages []int) error {
	pl := g.pool
	// Mark the pinned pages once: eviction asks about every slot for every
	// page it places.
	c.pinMark++
	if n := c.store.Pages(); len(c.pinned) < n {
		c.pinned = append(c.pinned, make([]uint64, n-len(c.pinned))...)
	}
	for _, list := range [][]int{c.writes, pages, g.sel} {
		for _, p := range list {
			c.pinned[p] = c.pinMark
		}
	}
	pinned := func(p int) bool { return p >= 0 && p < len(c.pinned) && c.pinned[p] == c.pinMark }
	for _, p := range pages {
		// With the selection known (g.sel set) its pages are pinned, so
		// the pool can be packed; a query selector's batch pages come
		// before its selection (StartForward) and must not evict.
		s, err := pl.place(p, pinned, c.stamp, g.sel != nil)
		if err != nil {
			return err
		}
		if have := c.store.pages[layer][p].N; pl.fill[s] < have {
			g.uploads = append(g.uploads, upload{page: p, slot: s, rows: have})
			pl.fill[s] = have
		}
	}
	return nil
}

func union(a, b []int, limit int) []int {
	out := slices.Clone(a)
	for _, p := range b {
		if p < limit && !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	slices.Sort(out)
	return out
}
