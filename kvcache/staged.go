package kvcache

import (
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/ollama/ollama/ml"

	"github.com/kvrecall/kvrecall/paging"
)

// Token-granular groups on a host backend: a staging buffer, copied on
// the host each pass (issue 14).
//
// A token pool (tokens.go) keeps tokens across passes, with an LRU over
// its cells, per-token stamps, a plan of uploads and a mask over the
// cells. Under squeezed's per-step selection ~86% of a KV head's tokens
// change at every decode step, so on the CPU (pool and pages both host
// memory) that machinery was ~5-6 ms of a ~9 ms step at 64k for copies
// that keep nothing. A staged group instead has a buffer of the pool's
// size, in the layout the page pools attend (so attention costs what the
// dense floor's does):
//
//	k f16 [headDim, heads, cells]   token-major
//	v f16 [cells, headDim, heads]   channel-major (permuted, as mul_mat wants)
//
// and each pass fills it from scratch: cells [0, n) take the batch's keys
// and values (Put, in the graph: set_rows, V through the permuted view,
// as the page pools do), cells [n, n+m) the m earlier tokens the
// selection lists, copied on the host when the layer's attention is built
// (after Put's graph in the split pass, paging.HostScores; before the
// graph is computed otherwise). Attention reads exactly those n+m cells:
// no mask for one token, a causal mask over the batch's cells (the rest
// open) for more. The batch comes first because in the split pass Put's
// graph is built before the selection says m.
//
// A one-token pass of a layer whose groups are all staged is different
// (the layer op, InPlaceRuns): Put writes no cells, the batch's token is
// read from the graph's key and value (or, split, staged from the pages
// with the others), and cells [0, m) hold the earlier tokens not read in
// place.
//
// The earlier tokens come, in cell order:
//
//   - as runs of rows of a cluster-ordered copy of the document's KV,
//     when the selector is a paging.TokenOrdered and its Selection lists
//     Rows: one memmove of K per run, V transposed from the copy's
//     token-major rows into the buffer's channel rows (a squeezed
//     cluster, ~20 tokens at 64k, is one run); on a one-token pass
//     (InPlaceRuns, the default) the runs are not copied at all but read
//     in place by the attention (inplace.go);
//   - the rest (positions past the order: the observation window, the
//     question, the answer; or every token, without an order) from the
//     host pages, in runs of consecutive positions on one page: one copy
//     per token and head for K, one per channel for V (channel-major, as
//     the page stores it).
//
// The ordered copy (orderedCopy) is document memory: built once per
// (layer, group, order) from the pages by the first session that needs
// it, held by the store and shared by every fork (Store.ordered), so a
// session's own memory is its staging buffers, the budget's size.
//
// Non-host backends and sliding-window layers keep the token pools; so
// does every layer with TokenStaging off.
var TokenStaging = true

// orderedCopies is the cluster-ordered copies of a document's KV, shared
// by the stores forked from it. Every store sharing it holds the same
// tokens [0, base) (forks share pages below the fork point; a store that
// cuts below base, or rewrites a position below it, detaches), so a copy
// of positions below base is valid for all of them.
type orderedCopies struct {
	mu     sync.Mutex
	base   int  // positions [0, base) are the same in every sharing store (each below its own orderCut)
	reach  int  // the longest order a copy was made for: a store cut or rewritten below it detaches
	shared bool // handed to a fork: base can no longer rise
	m      map[orderKey]*orderedCopy
	bytes  atomic.Int64
}

// orderKey names one copy: the layer, the group's KV heads, and the
// order's identity (its first element's address and length: the map holds
// the slice, so the address is not reused while the copy lives).
type orderKey struct {
	layer int
	heads string
	order *int32
	n     int
}

// orderedCopy is one group's keys and values of positions order[0..n) in
// that order, f16, token-major (C = heads·headDim):
//
//	K [n][C]  elements [0, n·C):     row i is position order[i]'s keys
//	V [n][C]  elements [n·C, 2·n·C): row i is its values
//
// so that any run of rows [a, e) (a cluster, several neighbouring ones, a
// single sink row) is one contiguous span of K and one of V, read as
// exactly its own bytes, whatever its length: the in-place attention
// (inplace.go) reads the rows where they lie, q·k over a K row and
// acc += p·v over a V row. (The copy was laid out block by block with V
// channel-major before, as the staging buffer wants it: each run then
// cost C short copies or C per-channel reductions, and runs under 4 rows
// were taken from the pages, docs/kvcache.md.) In C memory (cAlloc16)
// whenever malloc gives it, so that every session of the document can
// attend it in place. Read-only once built.
type orderedCopy struct {
	once  sync.Once
	err   error
	order []int32
	c     int // C: elements of a row of K or V
	kv    []uint16
	cmem  *cMem // kv's C memory (the in-place op reads it), nil if Go's
}

// kRow and vRow are the indices in kv of row's first key and value.
func (oc *orderedCopy) kRow(row int) int { return row * oc.c }
func (oc *orderedCopy) vRow(row int) int { return (len(oc.order) + row) * oc.c }

// holder returns s's ordered copies, made if none.
func (s *Store) holder() *orderedCopies {
	if h := s.ordered.Load(); h != nil {
		return h
	}
	h := &orderedCopies{base: s.n, m: map[orderKey]*orderedCopy{}}
	if s.ordered.CompareAndSwap(nil, h) {
		return h
	}
	return s.ordered.Load()
}

// detachOrdered is called when positions from n on may change in s (a
// cut to n, or a write at n). Below the copies' reach, s's copies no
// longer hold its tokens: s drops its share of them (its next staged
// pass makes its own). Above it, s keeps sharing the copies made so far
// but marks its positions from n on as its own (orderCut), so that it
// neither uses nor builds a copy that reaches them. (A session's empty
// prompt cuts the last token of its document to run it again: that
// keeps the shared copies, which end before the observation window.)
func (s *Store) detachOrdered(n int) {
	if h := s.ordered.Load(); h != nil {
		h.mu.Lock()
		reach := h.reach
		h.mu.Unlock()
		if n < reach {
			s.ordered.Store(nil)
			s.orderCut = 0
			return
		}
		if s.orderCut == 0 || n < s.orderCut {
			s.orderCut = n
		}
	}
}

// orderLimit is how far a copy s uses may reach: positions below it are
// the same in s as in every store sharing h.
func (s *Store) orderLimit(h *orderedCopies) int {
	if s.orderCut > 0 {
		return min(h.base, s.orderCut)
	}
	return h.base
}

// OrderedBytes is the host memory of the cluster-ordered copies of the
// document's KV this store shares (staged token groups): document memory,
// held once for all of the document's sessions.
func (s *Store) OrderedBytes() int64 {
	if h := s.ordered.Load(); h != nil {
		return h.bytes.Load()
	}
	return 0
}

// orderedFor returns the copy of layer's group heads in order, built
// from s's pages if it is not yet, or nil if it cannot be shared: the
// order reaches past the positions every sharing store agrees on (the
// group then stages every token from the pages).
func (s *Store) orderedFor(layer int, heads []int, key string, order []int32) (*orderedCopy, error) {
	if len(order) == 0 {
		return nil, nil
	}
	h := s.holder()
	h.mu.Lock()
	if len(order) > s.orderLimit(h) && !h.shared && len(order) <= s.n {
		// Sole owner: its tokens so far are what any copy it makes
		// holds, and no other store relies on base.
		h.base, s.orderCut = s.n, 0
	}
	if len(order) > s.orderLimit(h) {
		h.mu.Unlock()
		return nil, nil
	}
	k := orderKey{layer: layer, heads: key, order: &order[0], n: len(order)}
	oc := h.m[k]
	if oc == nil {
		oc = &orderedCopy{order: order}
		h.m[k] = oc
		h.reach = max(h.reach, len(order))
	}
	h.mu.Unlock()
	oc.once.Do(func() {
		if oc.err = oc.build(s, layer, heads); oc.err == nil {
			h.bytes.Add(2 * int64(len(oc.kv)))
			return
		}
		// Not kept: the next pass (of any session) tries again, and a
		// half-built copy's memory is not held.
		oc.kv = nil
		h.mu.Lock()
		if h.m[k] == oc {
			delete(h.m, k)
		}
		h.mu.Unlock()
	})
	return oc, oc.err
}

// build copies the positions of oc.order from s's pages of layer, heads'
// keys and values, after checking that the order is a permutation of
// [0, len(order)). The pages are read in position order (each page once),
// the rows written where the order puts them (V transposed from the
// page's channel rows into token-major rows).
func (oc *orderedCopy) build(s *Store, layer int, heads []int) error {
	n, P, sr, hd := len(oc.order), s.L.PageSize, s.L.Row(), s.L.HeadDim
	C := len(heads) * hd
	rowOf := make([]int32, n)
	for i := range rowOf {
		rowOf[i] = -1
	}
	for r, t := range oc.order {
		if t < 0 || int(t) >= n || rowOf[t] >= 0 {
			return fmt.Errorf("the token order is not a permutation of positions [0, %d): position %d at row %d", n, t, r)
		}
		rowOf[t] = int32(r)
	}
	for p := 0; p*P < n; p++ {
		if p >= len(s.pages[layer]) || s.pages[layer][p] == nil || s.pages[layer][p].N < min(P, n-p*P) {
			return fmt.Errorf("the token order reaches position %d, which layer %d's host pages do not hold", min(n, (p+1)*P)-1, layer)
		}
	}
	oc.c = C
	// C memory, whatever InPlaceRuns says now: a later session of the
	// document (or a later pass) may attend it in place.
	oc.kv, oc.cmem = cAlloc16(2 * n * C)
	if oc.kv == nil {
		oc.kv = make([]uint16, 2*n*C) // no C memory: the staging path still reads it
	}
	for p := 0; p*P < n; p++ {
		pg := s.pages[layer][p]
		rows := min(P, n-p*P)
		for off := range rows {
			r := int(rowOf[p*P+off])
			for i, h := range heads {
				copy(oc.kv[oc.kRow(r)+i*hd:][:hd], pg.K[off*sr+h*hd:][:hd])
			}
		}
		for i, h := range heads {
			for d := range hd {
				src := pg.V[(h*hd+d)*P:][:rows]
				for off, x := range src {
					oc.kv[oc.vRow(int(rowOf[p*P+off]))+i*hd+d] = x
				}
			}
		}
	}
	return nil
}

// stagedOK reports whether layer's token-granular groups are staged:
// TokenStaging, a backend, a global layer (a windowed layer drops host
// pages), not refused host memory before, and a token-granular group.
func (c *Paged) stagedOK(layer int) bool {
	if !TokenStaging || c.b == nil || (c.noStage != nil && c.noStage[layer]) || c.SlidingWindow(layer) > 0 {
		return false
	}
	return slices.ContainsFunc(c.layers[layer].groups, func(g *group) bool { return g.Tokens })
}

// stagingFor returns g's staging buffer (a pool marked staged, its page
// maps unused), made or grown to the cells a token pool of its budget
// would have, or nil if the backend does not give it host memory.
func (c *Paged) stagingFor(layer int, g *group) *pool {
	want := c.slotsFor(g)
	if g.pool != nil && (!g.pool.staged || g.pool.slots < want) {
		g.pool.close()
		g.pool = nil
	}
	if g.pool == nil {
		pl := newPool(c.b, c.L, layer, len(g.heads), want, false)
		if pl.hk == nil {
			pl.close()
			return nil
		}
		pl.staged = true
		g.pool = pl
	}
	return g.pool
}

// startStaged readies layer's token-granular groups for a staged pass of
// the batch; it returns false (and marks the layer for token pools) if
// the backend keeps tensors out of host memory.
func (c *Paged) startStaged(layer int) bool {
	for _, g := range c.layers[layer].groups {
		if !g.Tokens {
			continue
		}
		if c.stagingFor(layer, g) == nil {
			c.noStage[layer] = true
			return false
		}
	}
	if len(c.seqCells) < c.n {
		c.seqCells = make([]int32, c.n)
		for i := range c.seqCells {
			c.seqCells[i] = int32(i)
		}
	}
	for _, g := range c.layers[layer].groups {
		if g.staged = g.Tokens; g.staged {
			g.forgetPass()
			g.uploads, g.tups = nil, nil
			g.cells = c.seqCells[:c.n] // Put writes the batch into cells [0, n)
		}
	}
	return true
}

// rowsSuffice reports whether layer's selection may come in the
// rows-only form (paging.Queries.RowsSuffice): a one-token pass with
// InPlaceRuns whose token-granular groups are all staged, so that the
// attention reads each group's runs in place from its ordered copy and
// only the loose tokens past the order from the pages; the full sorted
// token list would be built and checked for nothing (issue 14: squeezed's
// lists 2.8 ms of a 1b step's 11.3 ms Select at 32k, warm, in
// BenchmarkSelectRowsOnly; ~6-9 ms with checkTokens by the step's phase
// timers, docs/squeezed.md). Asked before the attention is built (SetQueries
// runs first), so a pass that then does not read in place (a softcapped
// layer, a copy in Go memory: fillStaged copies the runs instead) still
// reads only rows and loose tokens, and a group with no copy to read
// the rows from gets its full list back (setStaged).
func (c *Paged) rowsSuffice(layer int) bool {
	if c.n != 1 || !InPlaceRuns {
		return false
	}
	if _, ok := c.opt.Selector.(paging.TokenOrdered); !ok {
		return false // a wrapper without the order (the rows could not be read)
	}
	staged := false
	for _, g := range c.layers[layer].groups {
		if g.Tokens && !g.staged {
			return false
		}
		staged = staged || g.staged
	}
	return staged
}

// setStaged checks a staged group's selection beyond setSelection's: the
// earlier tokens and the batch fit its cells, and Rows (if listed) are
// valid runs of the selector's order whose count is the tokens below the
// order's end (rowsOnly: the tokens listed are all past it, and the rows
// count for themselves); it then finds the ordered copy the runs read.
// A rows-only selection with no copy to read (the order reaches past the
// positions written, or past those the document's sessions share) gets
// its full token list rebuilt from the order, the slow path. i is the
// group's index.
func (c *Paged) setStaged(layer, i int, g *group, rows []int32, rowsOnly bool) error {
	earlier := countBelow(g.tok, c.pos0)
	if rowsOnly {
		earlier += runRows(rows) // an upper bound: checked against the order below
	}
	if cells := g.pool.slots * c.L.PageSize; earlier+c.n > cells {
		return fmt.Errorf("%d selected tokens and a batch of %d do not fit the group's staging buffer of %d cells", earlier, c.n, cells)
	}
	g.rows, g.ocopy, g.rowsOnly = nil, nil, false
	if rows == nil {
		return nil
	}
	to, ok := c.opt.Selector.(paging.TokenOrdered)
	if !ok {
		if rowsOnly {
			return fmt.Errorf("a rows-only selection, but the selector gives no token order to read the rows by")
		}
		// A wrapper that passes an inner method's Rows through without
		// its order (a test's recorder): the tokens are all there, so
		// they are staged from the pages.
		return nil
	}
	order, _ := to.TokenOrder(layer, i) // the blocks: any run of the token-major copy is contiguous
	if err := checkRows(rows, order, g.tok, rowsOnly); err != nil {
		return err
	}
	if g.okey == "" {
		g.okey = fmt.Sprint(g.heads)
	}
	oc, err := c.store.orderedFor(layer, g.heads, g.okey, order)
	if err != nil {
		return err
	}
	if oc != nil && len(order) <= c.pos0 {
		g.rows, g.ocopy, g.rowsOnly = rows, oc, rowsOnly
		return nil
	}
	if rowsOnly {
		// No copy: every token is staged from the pages, so the group
		// needs them all listed, sorted, with their pages.
		g.ftok, g.fsel = fullTokens(g.ftok[:0], g.fsel[:0], order, rows, g.tok, c.L.PageSize)
		g.tok, g.sel = g.ftok, g.fsel
		if g.sel == nil {
			g.sel = []int{}
		}
	}
	return nil
}

// fullTokens appends to toks the positions of order's runs rows, sorted,
// then loose (sorted, every one at or past len(order)): a rows-only
// selection's full token list; and to pages their pages, ascending and
// distinct.
func fullTokens(toks []int32, pages []int, order, rows, loose []int32, P int) ([]int32, []int) {
	for i := 0; i+1 < len(rows); i += 2 {
		toks = append(toks, order[rows[i]:rows[i+1]]...)
	}
	slices.Sort(toks)
	toks = append(toks, loose...)
	for _, t := range toks {
		if p := int(t) / P; len(pages) == 0 || pages[len(pages)-1] != p {
			pages = append(pages, p)
		}
	}
	return toks, pages
}

// countBelow is the number of sorted toks below limit.
func countBelow(toks []int32, limit int) int {
	n, _ := slices.BinarySearch(toks, int32(limit))
	return n
}

// checkRows reports runs that are not sorted, disjoint (they may touch),
// non-empty half-open pairs within order, or whose rows do not number the listed
// tokens below len(order) (the rest of toks must be the positions at or
// past it; rowsOnly: the rows stand for those below, and toks lists none
// of them). Which positions the rows are is checked by CheckInvariants
// (checkStaged), not at every pass.
func checkRows(rows, order []int32, toks []int32, rowsOnly bool) error {
	if order == nil {
		return fmt.Errorf("the selection lists rows, but the selector gives the group no token order")
	}
	if len(rows)%2 != 0 {
		return fmt.Errorf("%d row bounds: not [start, end) pairs", len(rows))
	}
	n := 0
	for i := 0; i < len(rows); i += 2 {
		a, b := rows[i], rows[i+1]
		if a < 0 || b <= a || int(b) > len(order) || (i > 0 && a < rows[i-1]) {
			return fmt.Errorf("row run %d [%d, %d) is empty, out of the order's %d rows, or overlaps or precedes the last", i/2, a, b, len(order))
		}
		n += int(b - a)
	}
	below := countBelow(toks, len(order))
	if rowsOnly {
		if below > 0 {
			return fmt.Errorf("a rows-only selection lists %d tokens below the order's end %d, which its rows stand for", below, len(order))
		}
		return nil
	}
	if n != below {
		return fmt.Errorf("the row runs hold %d tokens, the selection lists %d below the order's end %d", n, below, len(order))
	}
	return nil
}

// fillStaged copies g's selected earlier tokens into its staging buffer,
// cells [n, n+m) (the runs of the ordered copy first, in the selection's
// order, then the tokens past the order, from the pages), and returns m.
// On a one-token pass that may read the copy in place (c.inplaceNow,
// InPlaceRuns) the runs are listed for the attention instead
// (inplaceRuns), and only the tokens past the order are staged.
func (c *Paged) fillStaged(l int, g *group) int {
	pl := g.pool
	P, r := c.L.PageSize, pl.row
	cells := pl.slots * P
	at := c.n
	loose := g.tok
	if oc := g.ocopy; oc != nil {
		loose = g.tok[countBelow(g.tok, len(oc.order)):]
		if c.inplaceNow && oc.cmem != nil {
			c.inplaceRows.Add(int64(c.inplaceRuns(g)))
			g.inplace = true
		} else {
			for i := 0; i < len(g.rows); i += 2 {
				a, e := int(g.rows[i]), int(g.rows[i+1])
				w := e - a
				copy(pl.hk[at*r:(at+w)*r], oc.kv[oc.kRow(a):oc.kRow(e)])
				transposeRows(pl.hv[at:], cells, oc.kv[oc.vRow(a):oc.vRow(e)], w, r)
				at += w
			}
			c.stagedCopy.Add(int64(at - c.n))
		}
	}
	from := at
	at = c.stageFromPages(l, g, loose, at, c.pos0)
	c.stagedPages.Add(int64(at - from))
	g.filled = at - c.n
	return g.filled
}

// transposeRows writes w token-major rows of r channels, src [w][r], as
// channel rows of dst: channel ch's w values at dst[ch·stride:][:w] (the
// staging buffer's V [cells, headDim, heads] from cell at, stride its
// cells). The run's source span (w·r·2 bytes, a few KiB) is read once
// from memory and then from cache, channel by channel; each channel's w
// values are written contiguously.
func transposeRows(dst []uint16, stride int, src []uint16, w, r int) {
	_ = src[w*r-1]
	for ch := range r {
		d := dst[ch*stride:][:w]
		for j := range d {
			d[j] = src[j*r+ch]
		}
	}
}

// stageFromPages copies the positions toks (sorted; those from limit on,
// the batch's when limit is pos0, are skipped) from layer l's host pages
// into g's staging cells from at, in runs of consecutive positions on one
// page, and returns the next cell.
func (c *Paged) stageFromPages(l int, g *group, toks []int32, at, limit int) int {
	pl := g.pool
	P, sr, r := c.L.PageSize, c.L.Row(), pl.row
	cells := pl.slots * P
	for i := 0; i < len(toks) && int(toks[i]) < limit; {
		t := int(toks[i])
		p, off := t/P, t%P
		j := i + 1
		for j < len(toks) && int(toks[j]) == t+j-i && int(toks[j])/P == p && int(toks[j]) < limit {
			j++
		}
		w := j - i
		pg := c.store.pages[l][p]
		// appendKeys appends into a slice of the buffer of length 0 whose
		// capacity runs to its end: it writes in place.
		c.appendKeys(pl.hk[at*r:at*r], g, pg.K[off*sr:], w)
		for ch := range r {
			sc := c.channel(g, ch)
			copy(pl.hv[ch*cells+at:][:w], pg.V[sc*P+off:][:w])
		}
		at += w
		i = j
	}
	return at
}

// stagedKV is groupKV for a staged group: fills its buffer and returns
// views of its n+m cells (the batch's first, written by Put) and the
// mask.
//
//	key [headDim, heads, n+m], value [n+m, headDim, heads], mask [n+m, batch] (nil for one token)
func (c *Paged) stagedKV(ctx ml.Context, l int, g *group) (ml.Tensor, ml.Tensor, ml.Tensor) {
	if g.tok == nil {
		panic(fmt.Sprintf("kvcache: layer %d has no token selection (queries were not given)", l))
	}
	t0 := time.Now()
	if !g.batchPut {
		// Put left the batch out of the cells (a layer-op pass, split:
		// its first graph computed) but the layer is attended group by
		// group (softcap): the batch from the pages, channel-major.
		if !c.batchOnPages(l) {
			panic(fmt.Sprintf("kvcache: layer %d's batch is neither in its staging cells nor on the host pages", l))
		}
		c.stageFromPages(l, g, c.batchPositions(), 0, c.pos0+c.n)
		g.batchPut = true
	}
	m := c.fillStaged(l, g)
	c.hostWrites.Add(int64(time.Since(t0)))
	pl, n, heads := g.pool, c.n, len(g.heads)
	cells := n + m
	k := pl.k.View(ctx, 0, c.L.HeadDim, pl.k.Stride(1), heads, pl.k.Stride(2), cells)
	v := pl.v.View(ctx, 0, cells, pl.v.Stride(1), c.L.HeadDim, pl.v.Stride(2), heads)
	if n == 1 {
		return k, v, nil
	}
	return k, v, c.stagedMask(ctx, n, m)
}

// stagedMask is a staged group's mask [n+m, n]: the batch's cells
// causal, the m earlier tokens after them open to every row. Groups of a
// graph with the same m share it.
func (c *Paged) stagedMask(ctx ml.Context, n, m int) ml.Tensor {
	if sm := &c.smask; sm.ctx == ctx && sm.m == m {
		return sm.t
	}
	t := causalMask(ctx, 0, n, n) // [n, n]
	if m > 0 {
		zero := ctx.Input().FromFloats([]float32{0}, 1, 1)
		t = t.Concat(ctx, zero.Pad(ctx, m-1, n-1, 0, 0), 0)
	}
	c.smask.ctx, c.smask.m, c.smask.t = ctx, m, t
	return t
}

// checkStaged reports broken invariants of a staged group (at names the
// layer and group): a staged buffer in host memory of the cells its
// budget sizes; its selection lists tokens, and they and the batch fit;
// its rows are valid runs of the order whose positions are exactly the
// listed tokens below the order's end; the ordered copy matches the host
// pages on a sample of rows; and once the pass's attention was built,
// the cells hold what the pass listed, in order, the same f16 bytes as
// the pages (the batch's cells once the pass is computed).
func (c *Paged) checkStaged(at string, l int, g *group) []error {
	var errs []error
	pl := g.pool
	if pl == nil || !pl.staged || pl.hk == nil || !g.Tokens {
		return append(errs, fmt.Errorf("%s: a staged group needs a staging buffer in host memory and a token-granular group", at))
	}
	P, sr, hd, r := c.L.PageSize, c.L.Row(), c.L.HeadDim, pl.row
	cells := pl.slots * P
	if pl.slots < c.slotsFor(g) {
		errs = append(errs, fmt.Errorf("%s: a staging buffer of %d slots, want %d", at, pl.slots, c.slotsFor(g)))
	}
	if g.sel != nil && g.tok == nil {
		errs = append(errs, fmt.Errorf("%s: a token-granular group has a selection without tokens", at))
	}
	earlier := countBelow(g.tok, c.pos0)
	if g.rowsOnly {
		earlier += runRows(g.rows)
		if g.ocopy == nil {
			errs = append(errs, fmt.Errorf("%s: a rows-only selection without an ordered copy to read its rows from", at))
		}
	}
	if earlier+c.n > cells {
		errs = append(errs, fmt.Errorf("%s: %d tokens and a batch of %d in %d cells", at, earlier, c.n, cells))
	}
	// The positions the cells hold, in cell order after the batch's.
	var pos []int32
	loose := g.tok
	if oc := g.ocopy; oc != nil {
		if err := checkRows(g.rows, oc.order, g.tok, g.rowsOnly); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", at, err))
			return errs
		}
		for i := 0; i < len(g.rows); i += 2 {
			pos = append(pos, oc.order[g.rows[i]:g.rows[i+1]]...)
		}
		sorted := slices.Sorted(slices.Values(slices.Clone(pos)))
		if g.inplace {
			pos = pos[:0] // the runs are read in place (inplace.go), not staged
			if oc.cmem == nil {
				errs = append(errs, fmt.Errorf("%s: the runs are read in place from an ordered copy in Go memory", at))
			} else if err := c.inplaceParamsErr(g); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", at, err))
			}
		}
		if g.rowsOnly {
			// The rows are the choice below the order's end: distinct
			// positions (the order a permutation, the runs disjoint),
			// all before the batch.
			if len(slices.Compact(slices.Clone(sorted))) != len(sorted) || len(sorted) > 0 && int(sorted[len(sorted)-1]) >= c.pos0 {
				errs = append(errs, fmt.Errorf("%s: the rows-only selection's runs hold repeated positions or positions from the batch's %d on", at, c.pos0))
			}
		} else if n := countBelow(g.tok, len(oc.order)); !slices.Equal(sorted, g.tok[:n]) {
			errs = append(errs, fmt.Errorf("%s: the row runs hold other positions than the %d tokens listed below %d", at, n, len(oc.order)))
		}
		loose = g.tok[countBelow(g.tok, len(oc.order)):]
		// A sample of the copy's rows against the pages.
		n := len(oc.order)
		for _, row := range []int{0, n / 3, n / 2, n - 1} {
			t := int(oc.order[row])
			pg := c.store.pages[l][t/P]
			for i, h := range g.heads {
				for d := range hd {
					ch := i*hd + d
					if oc.kv[oc.kRow(row)+ch] != pg.K[(t%P)*sr+h*hd+d] || oc.kv[oc.vRow(row)+ch] != pg.V[(h*hd+d)*P+t%P] {
						errs = append(errs, fmt.Errorf("%s: the ordered copy's row %d (position %d) differs from the host page", at, row, t))
						return errs
					}
				}
			}
		}
	}
	for _, t := range loose {
		if int(t) < c.pos0 {
			pos = append(pos, t)
		}
	}
	if g.filled < 0 {
		return errs // the pass's attention is not built yet
	}
	if g.layerOp {
		return append(errs, c.checkLoose(at, l, g)...)
	}
	if !g.batchPut {
		return append(errs, fmt.Errorf("%s: attended group by group, but Put left the batch out of the cells", at))
	}
	if g.filled != len(pos) {
		return append(errs, fmt.Errorf("%s: %d cells filled, the selection lists %d earlier tokens", at, g.filled, len(pos)))
	}
	cell := func(ci, t int) error {
		pg := c.store.pages[l][t/P]
		for i, h := range g.heads {
			for d := range hd {
				ch := i*hd + d
				if pl.hk[ci*r+ch] != pg.K[(t%P)*sr+h*hd+d] || pl.hv[ch*cells+ci] != pg.V[(h*hd+d)*P+t%P] {
					return fmt.Errorf("%s: staged cell %d differs from position %d on the host page", at, ci, t)
				}
			}
		}
		return nil
	}
	for i, t := range pos {
		if err := cell(c.n+i, int(t)); err != nil {
			return append(errs, err)
		}
	}
	if c.written == c.L.Layers { // computed: the batch is on the pages
		for i := range c.n {
			if err := cell(i, c.pos0+i); err != nil {
				return append(errs, err)
			}
		}
	}
	return errs
}

// stagedCells is Put's set_rows index for staged groups, I32 [n] holding
// 0..n-1: one input per graph, shared by the layer's groups.
func (c *Paged) stagedCells(ctx ml.Context) ml.Tensor {
	if sc := &c.scells; sc.ctx == ctx {
		return sc.t
	}
	c.scells.ctx, c.scells.t = ctx, ctx.Input().FromInts(c.seqCells[:c.n], c.n)
	return c.scells.t
}

// checkLoose is checkStaged's part for a group attended by its layer's op
// (kvr_layer_attn): the runs are read in place exactly when the group has
// an ordered copy in C memory (their params checked by checkStaged); cells
// [0, filled) hold the loose tokens (those past the order's end, or every
// listed earlier token without a readable copy) in position order, then
// the batch's if it came from the pages, the same f16 bytes as the pages
// (K token-major, V channel-major); the group's params point at those
// cells and count them, and the layer's params send each of its KV heads
// to them.
func (c *Paged) checkLoose(at string, l int, g *group) []error {
	pl := g.pool
	P, sr, hd, r := c.L.PageSize, c.L.Row(), c.L.HeadDim, pl.row
	cells := pl.slots * P
	oc := g.ocopy
	if readable := oc != nil && oc.cmem != nil; g.inplace != readable {
		return []error{fmt.Errorf("%s: runs read in place %v, but an ordered copy in C memory %v", at, g.inplace, readable)}
	}
	loose := g.tok
	if g.inplace {
		loose = g.tok[countBelow(g.tok, len(oc.order)):]
	}
	var pos []int32
	for _, t := range loose {
		if int(t) < c.pos0 {
			pos = append(pos, t)
		}
	}
	if g.batchLoose {
		for i := range c.n {
			pos = append(pos, int32(c.pos0+i))
		}
	}
	if g.filled != len(pos) || g.iparams == nil {
		return []error{fmt.Errorf("%s: %d loose cells filled, the pass lists %d (batch from the pages: %v)", at, g.filled, len(pos), g.batchLoose)}
	}
	for ci, t := range pos {
		pg := c.store.pages[l][int(t)/P]
		for i, h := range g.heads {
			for d := range hd {
				ch := i*hd + d
				if pl.hk[ci*r+ch] != pg.K[(int(t)%P)*sr+h*hd+d] || pl.hv[ch*cells+ci] != pg.V[(h*hd+d)*P+int(t)%P] {
					return []error{fmt.Errorf("%s: loose cell %d differs from position %d on the host page", at, ci, t)}
				}
			}
		}
	}
	p := g.iparams.p
	if !g.inplace && p.nruns != 0 {
		return []error{fmt.Errorf("%s: the layer op's params list %d runs of no readable copy", at, int(p.nruns))}
	}
	if unsafe.Pointer(p.lk) != unsafe.Pointer(&pl.hk[0]) || unsafe.Pointer(p.lv) != unsafe.Pointer(&pl.hv[0]) || int(p.lc) != r || int(p.nloose) != g.filled || int(p.lvs) != cells {
		return []error{fmt.Errorf("%s: the layer op's params read %d loose rows of %d, the group's cells are %d rows of %d", at, int(p.nloose), int(p.lc), g.filled, r)}
	}
	lp := c.layers[l].lparams
	if lp == nil || int(lp.p.hd) != hd || int(lp.p.kvh) != c.L.KVHeads {
		return []error{fmt.Errorf("%s: the layer op has no params, or another head dim or KV head count", at)}
	}
	grp := unsafe.Slice(lp.p.grp, c.L.KVHeads)
	hi := unsafe.Slice((*int32)(unsafe.Pointer(lp.p.hi)), c.L.KVHeads)
	for i, h := range g.heads {
		if unsafe.Pointer(grp[h]) != unsafe.Pointer(p) || int(hi[h]) != i {
			return []error{fmt.Errorf("%s: the layer op sends KV head %d to another group's params or channels", at, h)}
		}
	}
	return nil
}
