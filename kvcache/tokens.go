package kvcache

import (
	"cmp"
	"fmt"
	"math"
	"slices"

	"github.com/ollama/ollama/ml"
)

// Token-granular residency (paging.Group.Tokens; the squeezed method).
//
// A page pool's slot holds one page, so a selection of scattered tokens (a
// cluster's keys lie on many pages) makes whole pages resident, and a pool
// of Budget/P pages holds few clusters. A token pool has slots·P cells
// (k and v both token-major, [headDim, heads, slots·P]: a token's upload
// is one row of each; attention reads v permuted, one copy per pass) and
// treats them one by one: a cell holds the keys and values of one
// position, any position (keys are roped before they are cached, so where
// a key sits does not matter, only the mask must agree). Each pass:
//
//   - the batch's tokens get cells (Put writes them, as for pages);
//   - the selected tokens already in a cell are stamped (used this pass);
//   - the others are copied from the host pages (values from each page's
//     token-major copy, Page.tokenValues) into a staging buffer and
//     uploaded into free cells, else into the least recently used cells
//     not used in this pass, in position order. Consecutive cells form a
//     run, one f16 copy per K and V (like page runs); past MaxUploadRuns
//     runs, one set_rows per K and V scatters every token at once;
//   - the mask opens the selected tokens' cells and the batch's, causally.
//
// So a pool of Budget cells holds exactly the budget's tokens, and a
// decode step uploads only the tokens its selection adds (2·2·headDim
// bytes per token and KV head), not their pages.

// tokenCells is the cell map of a token pool.
//
// Invariants (CheckInvariants): len(pos) = len(stamp) = slots·P; pos and
// at are inverse maps (pos[c] = p ⇔ at[p] = c), so a position sits in at
// most one cell; a mapped position is below the sequence's length, or in
// the batch of the pass under way; every token the group's selection lists
// and every token of the batch is mapped. Between passes every mapped
// cell holds its token's f16 keys and values (uploaded, or written by
// Put), the same bytes as the host page.
type tokenCells struct {
	pos []int32 // cell -> position, -1 when free
	// at maps position -> cell, -1 (or past its end) when not resident: a
	// slice indexed by position, grown as positions come (4 bytes per
	// token of the sequence; a map's lookups were 7% of a squeezed decode
	// step at 16k). mapped counts the positions it maps.
	at     []int32
	mapped int
	stamp  []uint64 // last pass that used the cell (LRU); the current pass's stamp pins it

	// Buffers reused from pass to pass (growing them anew every pass was
	// a fifth of a squeezed decode step at 32k, with its page faults):
	// victims' result and keys, placeTokens' missing tokens.
	vout, missing []int32
	vkeys         []uint64
}

// tokenUpload is a planned copy of position pos's keys and values from
// its host page into cell.
type tokenUpload struct{ cell, pos int32 }

func newTokenCells(cells int) *tokenCells {
	t := &tokenCells{pos: make([]int32, cells), stamp: make([]uint64, cells)}
	for i := range t.pos {
		t.pos[i] = -1
	}
	return t
}

// cellOf returns the cell holding pos, or -1.
func (t *tokenCells) cellOf(pos int32) int32 {
	if int(pos) < len(t.at) {
		return t.at[pos]
	}
	return -1
}

// set puts pos into cell (evicting what it held) and stamps it.
func (t *tokenCells) set(cell, pos int32, stamp uint64) {
	if old := t.pos[cell]; old >= 0 {
		t.at[old] = -1
		t.mapped--
	}
	t.pos[cell], t.stamp[cell] = pos, stamp
	for int(pos) >= len(t.at) {
		t.at = append(t.at, -1)
	}
	t.at[pos] = cell
	t.mapped++
}

// free empties cell.
func (t *tokenCells) free(cell int32) {
	if old := t.pos[cell]; old >= 0 {
		t.at[old] = -1
		t.mapped--
	}
	t.pos[cell], t.stamp[cell] = -1, 0
}

// drop frees the cells of positions at or after first.
func (t *tokenCells) drop(first int) {
	for c, p := range t.pos {
		if int(p) >= first {
			t.free(int32(c))
		}
	}
}

// used is the cells attention reads: one past the highest occupied cell,
// rounded up to whole pages (the free cells in between are masked).
func (t *tokenCells) used(P int) int {
	for c := len(t.pos) - 1; c >= 0; c-- {
		if t.pos[c] >= 0 {
			return min(len(t.pos), (c/P+1)*P)
		}
	}
	return 0
}

// victims returns need cells for new tokens: the free cells in ascending
// order, then the least recently used cells not used in the pass stamp,
// oldest first and, among equally old ones, in cell order (tokens evicted
// together leave consecutive cells, so their successors upload in runs).
// ok is false when fewer than need cells are free or evictable.
func (t *tokenCells) victims(need int, stamp uint64) (out []int32, ok bool) {
	if need == 0 {
		return nil, true
	}
	out = t.vout[:0]
	defer func() { t.vout = out[:0] }()
	for c, p := range t.pos {
		if p < 0 {
			out = append(out, int32(c))
			if len(out) == need {
				return out, true
			}
		}
	}
	// The evictable cells as keys stamp<<32 | cell, so that plain integer
	// order is (oldest, then lowest cell); only the k smallest are needed:
	// a quickselect, then a sort of those k. (A sort of every evictable
	// cell by a comparison closure was a tenth of a squeezed decode step
	// at 16k: the pool has Budget cells and a step replaces most of them.)
	if stamp >= 1<<32 {
		return t.victimsSorted(need, stamp, out)
	}
	old := t.vkeys[:0]
	defer func() { t.vkeys = old[:0] }()
	for c, p := range t.pos {
		if p >= 0 && t.stamp[c] != stamp {
			old = append(old, t.stamp[c]<<32|uint64(c))
		}
	}
	k := need - len(out)
	if len(old) < k {
		return nil, false
	}
	smallest(old, k)
	old = old[:k]
	slices.Sort(old)
	for _, key := range old {
		out = append(out, int32(uint32(key)))
	}
	return out, true
}

// victimsSorted is victims past 2³² passes (stamps too wide to pack).
func (t *tokenCells) victimsSorted(need int, stamp uint64, out []int32) ([]int32, bool) {
	var old []int32
	for c, p := range t.pos {
		if p >= 0 && t.stamp[c] != stamp {
			old = append(old, int32(c))
		}
	}
	if len(out)+len(old) < need {
		return nil, false
	}
	slices.SortFunc(old, func(a, b int32) int {
		return cmp.Or(cmp.Compare(t.stamp[a], t.stamp[b]), cmp.Compare(a, b))
	})
	return append(out, old[:need-len(out)]...), true
}

// smallest reorders keys so that its k smallest come first, in any order
// (quickselect, median-of-three pivots; keys are distinct).
func smallest(keys []uint64, k int) {
	lo, hi := 0, len(keys)-1
	for lo < hi && k > lo && k <= hi {
		mid := lo + (hi-lo)/2
		if keys[mid] < keys[lo] {
			keys[mid], keys[lo] = keys[lo], keys[mid]
		}
		if keys[hi] < keys[lo] {
			keys[hi], keys[lo] = keys[lo], keys[hi]
		}
		if keys[hi] < keys[mid] {
			keys[hi], keys[mid] = keys[mid], keys[hi]
		}
		pivot := keys[mid]
		i, j := lo, hi
		for i <= j {
			for keys[i] < pivot {
				i++
			}
			for keys[j] > pivot {
				j--
			}
			if i <= j {
				keys[i], keys[j] = keys[j], keys[i]
				i++
				j--
			}
		}
		// keys[lo..j] ≤ pivot ≤ keys[i..hi], and j < i.
		if k <= j {
			hi = j
		} else if k >= i {
			lo = i
		} else {
			return
		}
	}
}

// placeBatchTokens gives the batch's positions cells of g's token pool
// (pinned for the pass) and records them as g.cells for Put.
func (c *Paged) placeBatchTokens(layer int, g *group) error {
	tc := g.pool.tok
	need := 0
	for i := 0; i < c.n; i++ {
		if cl := tc.cellOf(int32(c.pos0 + i)); cl >= 0 {
			tc.stamp[cl] = c.stamp // left by a pass that failed: Put writes it again
		} else {
			need++
		}
	}
	vs, ok := tc.victims(need, c.stamp)
	if !ok {
		return fmt.Errorf("kvcache: %s, layer %d: a batch of %d tokens does not fit a token pool of %d cells", c.opt.Selector.Name(), layer, c.n, len(tc.pos))
	}
	for i := 0; i < c.n; i++ {
		pos := int32(c.pos0 + i)
		cl := tc.cellOf(pos)
		if cl < 0 {
			cl, vs = vs[0], vs[1:]
			tc.set(cl, pos, c.stamp)
		}
		g.cells = append(g.cells, cl)
	}
	return nil
}

// placeTokens makes g's selected tokens resident in its token pool: those
// present are stamped, the others get free or least recently used cells
// and are scheduled for upload (g.tups). The batch's own tokens already
// have cells.
func (c *Paged) placeTokens(layer int, g *group) error {
	tc := g.pool.tok
	missing := tc.missing[:0]
	for _, t := range g.tok {
		if int(t) >= c.pos0 {
			break // the batch's (sorted list): placed with the batch
		}
		if cl := tc.cellOf(t); cl >= 0 {
			tc.stamp[cl] = c.stamp
		} else {
			missing = append(missing, t)
		}
	}
	vs, ok := tc.victims(len(missing), c.stamp)
	if !ok {
		return fmt.Errorf("kvcache: %s, layer %d: %d selected tokens and a batch of %d do not fit a token pool of %d cells", c.opt.Selector.Name(), layer, len(g.tok), c.n, len(tc.pos))
	}
	for i, t := range missing {
		tc.set(vs[i], t, c.stamp)
		g.tups = append(g.tups, tokenUpload{cell: vs[i], pos: t})
	}
	tc.missing = missing[:0]
	return nil
}

// tokenKV is groupKV for a token pool: uploads the selected tokens it
// lacks and returns views of its used cells and its mask.
//
//	key [headDim, heads, cells], value [cells, headDim, heads], mask [cells, batch]
func (c *Paged) tokenKV(ctx ml.Context, l int, g *group) (ml.Tensor, ml.Tensor, ml.Tensor) {
	if g.tok == nil {
		panic(fmt.Sprintf("kvcache: layer %d has no token selection (queries were not given)", l))
	}
	pl := g.pool
	c.emitTokenUploads(ctx, l, g)
	cells := pl.tok.used(c.L.PageSize)
	heads := len(g.heads)
	k := pl.k.View(ctx, 0, c.L.HeadDim, pl.k.Stride(1), heads, pl.k.Stride(2), cells)
	// The pool's values are token-major ([headDim, heads, cells], like
	// the keys), so that a token's upload is one row, as for K; attention
	// wants them permuted: one copy of the used cells per pass, converted
	// to f32 on the way. An f16→f16 copy of a permuted tensor is ggml's
	// generic byte copy, one memcpy call per element: it was a sixth of a
	// squeezed decode step at 16k (perf, docs/performance.md); the
	// converting copy is one loop, and attention then weighs f32 values.
	v := pl.v.View(ctx, 0, c.L.HeadDim, pl.v.Stride(1), heads, pl.v.Stride(2), cells).Permute(ctx, 1, 2, 0, 3).Cast(ctx, ml.DTypeF32)
	mask := buildTokenMask(pl.tok, cells, g.tok, g.cells, c.pos0)
	return k, v, ctx.Input().FromFloats(mask, cells, c.n)
}

// buildTokenMask returns a token pool's [cells, batch] mask (row-major by
// batch row): 0 at the cells of the selected positions before pos0 and,
// causally, at the batch's cells (batch[i] is position pos0+i's cell);
// -Inf elsewhere (free cells, resident tokens not selected).
func buildTokenMask(tc *tokenCells, cells int, tok, batch []int32, pos0 int) []float32 {
	ninf := float32(math.Inf(-1))
	row := make([]float32, cells)
	for i := range row {
		row[i] = ninf
	}
	for _, t := range tok {
		if int(t) >= pos0 {
			break
		}
		if cl := tc.cellOf(t); cl >= 0 && int(cl) < cells {
			row[cl] = 0
		}
	}
	n := len(batch)
	mask := make([]float32, cells*n)
	for b := 0; b < n; b++ {
		r := mask[b*cells : (b+1)*cells]
		copy(r, row)
		for i := 0; i <= b; i++ {
			r[batch[i]] = 0
		}
	}
	return mask
}

// tokenRuns splits uploads sorted by cell into runs of consecutive cells:
// [from, to) index ranges of ups.
func tokenRuns(ups []tokenUpload) [][2]int {
	var runs [][2]int
	for i, u := range ups {
		if i > 0 && u.cell == ups[i-1].cell+1 {
			runs[len(runs)-1][1] = i + 1
			continue
		}
		runs = append(runs, [2]int{i, i + 1})
	}
	return runs
}

// emitTokenUploads copies g's planned tokens host -> device: into a pool
// in host memory as plain copies now, page row to cell (HostUploads),
// else inside the graph. For the graph, the tokens' keys are gathered from their host pages into one f16
// staging tensor in cell order, token-major as the pool lays them out;
// their values channel-major, run after run. Runs of consecutive cells are
// one f16 copy per K and V (about a memcpy); past MaxUploadRuns runs in the
// graph, one set_rows per K and V writes every token into its cell (K as
// [row, cells], V as [1, cells, row]), with the f16 -> f32 -> f16 round
// trip set_rows needs (exact for f16 values).
func (c *Paged) emitTokenUploads(ctx ml.Context, l int, g *group) {
	ups := g.tups
	if len(ups) == 0 {
		return
	}
	g.tups = ups[:0] // done; the capacity is kept for the next pass
	pl := g.pool
	r, P, m := pl.row, c.L.PageSize, len(ups)
	sr, hd := c.L.Row(), c.L.HeadDim
	c.touchTokens(l, g, ups)
	if HostUploads && pl.hk != nil {
		// A pool in host memory (the CPU backend): each token's rows are
		// copied from its page straight into its cell now (K and V
		// token-major alike), no graph ops, no staging copy and no sort
		// by cell (runs matter only to the graph's copies): at 64k the
		// staging copy and the sort were ~1 ms of a ~9 ms squeezed step
		// (perf, docs/performance.md).
		for _, u := range ups {
			pg := c.store.pages[l][int(u.pos)/P]
			t := int(u.pos) % P
			K, V := pg.K[t*sr:(t+1)*sr], pg.tokenValues(c.L)[t*sr:(t+1)*sr]
			at := int(u.cell) * r
			dk, dv := pl.hk[at:at+r], pl.hv[at:at+r]
			if g.all {
				copy(dk, K)
				copy(dv, V)
				continue
			}
			for i, h := range g.heads {
				copy(dk[i*hd:(i+1)*hd], K[h*hd:(h+1)*hd])
				copy(dv[i*hd:(i+1)*hd], V[h*hd:(h+1)*hd])
			}
		}
		c.tokenUploads.Add(int64(m))
		c.uploadBytes.Add(int64(m) * int64(r) * 2 * 2)
		return
	}
	for _, u := range ups { // filled by this graph (unstage)
		c.unwaited = append(c.unwaited, stagedCell{pl, int(u.cell), int(u.pos)})
	}
	slices.SortFunc(ups, func(a, b tokenUpload) int { return cmp.Compare(a.cell, b.cell) })
	runs := tokenRuns(ups)
	fits := len(runs) <= MaxUploadRuns-c.graphRuns[ctx]
	// Keys and values alike are token-major rows of r (the group's heads),
	// in cell order: packed straight into the arena of a pool outside host
	// memory (its staging tensors, copied asynchronously: devupload.go),
	// else into reused buffers that FromBytes copies into the graph's
	// input tensors at once (fresh ones per group and step were page
	// faults and GC work in the profile).
	ds, staged := deviceStage{}, false
	if fits {
		ds, staged = c.stageFor(pl, m)
	}
	kbuf, vbuf := c.stageK[:0], c.stageV[:0]
	if staged {
		kbuf, vbuf = ds.k[:0], ds.v[:0]
	}
	for _, u := range ups {
		pg := c.store.pages[l][int(u.pos)/P]
		t := int(u.pos) % P
		K, V := pg.K[t*sr:(t+1)*sr], pg.tokenValues(c.L)[t*sr:(t+1)*sr]
		if g.all {
			kbuf, vbuf = append(kbuf, K...), append(vbuf, V...)
			continue
		}
		for _, h := range g.heads {
			kbuf, vbuf = append(kbuf, K[h*hd:(h+1)*hd]...), append(vbuf, V[h*hd:(h+1)*hd]...)
		}
	}
	if fits {
		c.graphRuns[ctx] += len(runs)
		var kIn, vIn ml.Tensor
		if staged {
			if len(kbuf) != len(ds.k) || &kbuf[0] != &ds.k[0] || &vbuf[0] != &ds.v[0] {
				panic(fmt.Sprintf("kvcache: packed %d key elements into staging of %d", len(kbuf), len(ds.k)))
			}
			ds.send()
			kIn, vIn = ds.st.k, ds.st.v
			c.deviceStagedTokens.Add(int64(m))
		} else {
			c.stageK, c.stageV = kbuf, vbuf
			kIn = ctx.Input().FromBytes(ml.DTypeF16, u16bytes(kbuf), r*m)
			vIn = ctx.Input().FromBytes(ml.DTypeF16, u16bytes(vbuf), r*m)
		}
		for _, run := range runs {
			off, rows, first := run[0], run[1]-run[0], int(ups[run[0]].cell)
			ctx.Forward(kIn.View(ctx, off*r*2, r*rows).Copy(ctx, pl.k.View(ctx, first*r*2, r*rows)))
			ctx.Forward(vIn.View(ctx, off*r*2, r*rows).Copy(ctx, pl.v.View(ctx, first*r*2, r*rows)))
		}
	} else {
		c.stageK, c.stageV = kbuf, vbuf
		idx := make([]int32, m)
		for i, u := range ups {
			idx[i] = u.cell
		}
		cells := ctx.Input().FromInts(idx, m)
		k := ctx.Input().FromBytes(ml.DTypeF16, u16bytes(kbuf), r, m).Cast(ctx, ml.DTypeF32)
		v := ctx.Input().FromBytes(ml.DTypeF16, u16bytes(vbuf), r, m).Cast(ctx, ml.DTypeF32)
		ctx.Forward(pl.k.Reshape(ctx, r, pl.slots*P).SetRows(ctx, k, cells))
		ctx.Forward(pl.v.Reshape(ctx, r, pl.slots*P).SetRows(ctx, v, cells))
	}
	c.tokenUploads.Add(int64(m))
	c.uploadBytes.Add(int64(m) * int64(r) * 2 * 2)
}

// touchTokens reads one value of each upload's key row and value row
// before the gathers copy them. The tokens are scattered over the
// document's pages, so nearly every row is a cache miss; in the copy
// loops (tens of instructions per token) the CPU waits for them one
// token at a time, while this loop has a few instructions per token and
// independent loads, so many misses are in flight at once (a software
// prefetch). In a squeezed decode step's profile at 16k, 85% of the value
// gather's time was the first load of each token's row.
func (c *Paged) touchTokens(l int, g *group, ups []tokenUpload) {
	P, sr, off := c.L.PageSize, c.L.Row(), g.heads[0]*c.L.HeadDim
	var sum uint16
	for _, u := range ups {
		pg := c.store.pages[l][int(u.pos)/P]
		t := int(u.pos) % P
		sum += pg.K[t*sr+off] + pg.tokenValues(c.L)[t*sr+off]
	}
	c.touched += sum // kept, so that the loads are not dead code
}

// checkTokenPool reports broken invariants of g's token pool (see
// tokenCells); at names the layer and group.
func (c *Paged) checkTokenPool(at string, g *group) []error {
	var errs []error
	tc := g.pool.tok
	if n := g.pool.slots * c.L.PageSize; len(tc.pos) != n || len(tc.stamp) != n {
		errs = append(errs, fmt.Errorf("%s: %d token cells, want %d", at, len(tc.pos), n))
	}
	limit := c.store.Len()
	if c.written < c.L.Layers {
		limit = max(limit, c.pos0+c.n) // a pass under way: its batch has cells already
	}
	mapped := 0
	for cl, p := range tc.pos {
		if p < 0 {
			continue
		}
		mapped++
		if got := tc.cellOf(p); int(got) != cl {
			errs = append(errs, fmt.Errorf("%s: cell %d holds position %d, which maps to cell %d", at, cl, p, tc.cellOf(p)))
		}
		if int(p) >= limit {
			errs = append(errs, fmt.Errorf("%s: cell %d holds position %d, past the %d tokens of the sequence", at, cl, p, limit))
		}
	}
	inverse := 0
	for _, cl := range tc.at {
		if cl >= 0 {
			inverse++
		}
	}
	if mapped != inverse || mapped != tc.mapped {
		errs = append(errs, fmt.Errorf("%s: %d occupied cells, %d mapped positions (%d counted)", at, mapped, inverse, tc.mapped))
	}
	if g.sel != nil && g.tok == nil {
		errs = append(errs, fmt.Errorf("%s: a token-granular group has a selection without tokens", at))
	}
	for _, t := range g.tok {
		if tc.cellOf(t) < 0 {
			errs = append(errs, fmt.Errorf("%s: selected token %d is not resident", at, t))
		}
	}
	for i := 0; i < c.n && c.pos0+i < limit; i++ {
		if tc.cellOf(int32(c.pos0+i)) < 0 {
			errs = append(errs, fmt.Errorf("%s: batch token %d is not resident", at, c.pos0+i))
		}
	}
	return errs
}
