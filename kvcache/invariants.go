package kvcache

import (
	"errors"
	"fmt"
)

// CheckInvariants reports the first broken invariant of the cache's
// residency state; tests call it after forward passes. Between passes:
//   - in every pool, slot -> page and page -> slot are inverse maps, and a
//     page sits in at most one slot;
//   - a free slot has fill 0; fill <= page size and, once the pass is
//     computed, <= the tokens the host page holds;
//   - every pool has the slots its group's budget and the largest batch
//     so far size;
//   - selections are sorted, distinct and in range;
//   - the pages the last batch wrote are resident in every pool of every
//     layer (they were pinned while placing), and so is every selected page;
//   - in a token-granular pool (paging.Group.Tokens): cell -> position and
//     position -> cell are inverse maps over slots·P cells, every mapped
//     position is in the sequence (or the batch under way), the group's
//     selection lists tokens, and every listed token and every token of
//     the batch has a cell (checkTokenPool);
//   - a staged token group (staged.go) has a staging buffer in host
//     memory that fits its tokens and the batch, valid row runs whose
//     positions are its listed tokens below the order's end, an ordered
//     copy equal to the pages on a sample of rows, and cells that hold
//     exactly what the pass listed (checkStaged);
//   - a sliding-window layer's host pages are exactly those a query from
//     the last pass's first position on can read (Store, checkWindows);
//     every selected or written page is held on the host; a slot may
//     still hold a page the host dropped (an LRU leftover) but never
//     attends to it;
//   - no device upload is in flight (Outputs waited for them), every
//     uploader's arena use is within its size, and a pool's staging
//     tensors hold whole pages, never more than its slots (devupload.go).
func (c *Paged) CheckInvariants() error {
	var errs []error
	P := c.L.PageSize
	for i, u := range c.uploaders {
		if u.pending {
			errs = append(errs, fmt.Errorf("uploader %d: copies in flight between passes", i))
		}
		if u.used < 0 || u.used > u.size {
			errs = append(errs, fmt.Errorf("uploader %d: %d bytes of its arena used, of %d", i, u.used, u.size))
		}
	}
	pages := c.store.Pages()
	if err := c.store.checkWindows(); err != nil {
		errs = append(errs, err)
	}
	for l := range c.layers {
		for gi, g := range c.layers[l].groups {
			pl := g.pool
			at := fmt.Sprintf("layer %d group %d", l, gi)
			if g.staged {
				errs = append(errs, c.checkStaged(at, l, g)...)
				continue
			}
			if pl == nil {
				continue
			}
			if pl.slots != c.slotsFor(g) || len(pl.page) != pl.slots {
				errs = append(errs, fmt.Errorf("%s: %d slots, want %d", at, pl.slots, c.slotsFor(g)))
			}
			if st := pl.stage; st != nil && (st.cells > pl.slots*P || st.cells%P != 0 ||
				st.k.Dim(0) != st.cells*pl.row || st.v.Dim(0) != st.cells*pl.row) {
				errs = append(errs, fmt.Errorf("%s: staging tensors of %d cells (%d, %d elements) for a pool of %d slots, row %d", at, st.cells, st.k.Dim(0), st.v.Dim(0), pl.slots, pl.row))
			}
			if pl.row != len(g.heads)*c.L.HeadDim {
				errs = append(errs, fmt.Errorf("%s: row %d for %d heads", at, pl.row, len(g.heads)))
			}
			if (pl.tok != nil) != g.Tokens {
				errs = append(errs, fmt.Errorf("%s: token-granular group %v with a token pool %v", at, g.Tokens, pl.tok != nil))
			}
			if pl.tok != nil {
				errs = append(errs, c.checkTokenPool(at, g)...)
				continue
			}
			occupied := 0
			for s, p := range pl.page {
				switch {
				case p < 0:
					if pl.fill[s] != 0 {
						errs = append(errs, fmt.Errorf("%s: free slot %d has fill %d", at, s, pl.fill[s]))
					}
					continue
				case pl.where[p] != s:
					errs = append(errs, fmt.Errorf("%s: slot %d holds page %d, which maps to slot %d", at, s, p, pl.where[p]))
				}
				occupied++
				if pl.fill[s] > P {
					errs = append(errs, fmt.Errorf("%s: slot %d fill %d > page size %d", at, s, pl.fill[s], P))
				}
				if (c.written == 0 || c.written == c.L.Layers) && p < pages && c.store.pages[l][p] != nil && pl.fill[s] > c.store.pages[l][p].N {
					errs = append(errs, fmt.Errorf("%s: slot %d fill %d > %d tokens of page %d", at, s, pl.fill[s], c.store.pages[l][p].N, p))
				}
			}
			if occupied != len(pl.where) {
				errs = append(errs, fmt.Errorf("%s: %d occupied slots, %d mapped pages", at, occupied, len(pl.where)))
			}
			if g.sel != nil {
				if err := checkPages(g.sel, pages); err != nil {
					errs = append(errs, fmt.Errorf("%s: selection: %w", at, err))
				}
				for _, p := range g.sel {
					if pl.resident(p) < 0 {
						errs = append(errs, fmt.Errorf("%s: selected page %d is not resident", at, p))
					}
					if p < pages && c.store.pages[l][p] == nil {
						errs = append(errs, fmt.Errorf("%s: selected page %d was dropped from the host", at, p))
					}
				}
			}
			for _, p := range c.writes {
				if pl.resident(p) < 0 {
					errs = append(errs, fmt.Errorf("%s: written page %d is not resident", at, p))
				}
				if p < pages && c.store.pages[l][p] == nil {
					errs = append(errs, fmt.Errorf("%s: written page %d was dropped from the host", at, p))
				}
			}
		}
	}
	return errors.Join(errs...)
}
