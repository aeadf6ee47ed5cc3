package kvcache

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"sync/atomic"
	"time"

	ollamakv "github.com/ollama/ollama/kvcache"
	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/model/input"

	"github.com/kvrecall/kvrecall/paging"
)

// Options configure a Paged cache.
type Options struct {
	Layout   Layout
	Heads    int           // query heads of the model
	Policy   paging.Policy // which pages each layer attends to
	Capacity int           // most tokens in the sequence
	MaxBatch int           // most tokens in one forward pass
	// Prefix, if set, is a document's store: the cache starts with its
	// tokens and shares its pages read-only.
	Prefix *Store
}

// Stats describe a cache's memory and traffic.
type Stats struct {
	ResidentBytes int64 // device pools (keys and values)
	HostBytes     int64 // host pages, shared document pages included
	Pages         int   // pages in the sequence
	Uploads       int64 // pages copied host -> device so far
	// Upkeep is the time spent keeping host pages and their summaries up to
	// date (reading new keys and values back, writing pages, summaries).
	Upkeep time.Duration
}

// Paged is a paged KV cache for one sequence (sequence id 0). It is not safe
// for concurrent use; sessions each have their own.
type Paged struct {
	opt    Options
	L      Layout
	b      ml.Backend
	store  *Store
	pools  []*pool
	views  []*layerView
	closed bool

	// The current forward pass.
	pos0, n   int
	layer     int
	stamp     uint64
	upto      int
	writes    []int     // pages this batch writes
	sel       [][]int   // per layer: pages attended (nil until chosen)
	frozen    [][]int   // per layer: pages the last question retrieved (PerQuestion)
	cells     [][]int32 // per layer: pool cells of the batch's tokens
	uploads   [][]upload
	written   int // layers whose new rows reached the host store
	readbacks map[ml.Context][]readback
	graphRuns map[ml.Context]int // copy runs emitted into each graph of this pass
	pinned    []uint64           // per page: pinMark if placeAll must not evict it
	pinMark   uint64

	uploadCount atomic.Int64
	upkeep      atomic.Int64 // nanoseconds

	// The last mask built: layers with the same pool layout and selection
	// (every layer, for a dense policy) share it within a graph.
	mask struct {
		ctx    ml.Context
		pages  []int // pool.page of the used slots
		fill   []int
		sel    []int
		tensor ml.Tensor
	}
}

type upload struct{ page, slot, rows int }

type readback struct {
	layer int
	k, v  ml.Tensor // f16 [row, batch] copies of the new keys and values
}

var _ ollamakv.Cache = (*Paged)(nil)

// NewPaged returns a cache; Init must be called before use (the runtime does).
func NewPaged(o Options) (*Paged, error) {
	if err := o.Layout.Check(); err != nil {
		return nil, err
	}
	if o.Policy == nil {
		return nil, errors.New("kvcache: no paging policy")
	}
	if o.Policy.Config().PageSize != o.Layout.PageSize {
		return nil, fmt.Errorf("kvcache: policy page size %d differs from the cache's %d", o.Policy.Config().PageSize, o.Layout.PageSize)
	}
	if o.Heads <= 0 || o.Heads%o.Layout.KVHeads != 0 {
		return nil, fmt.Errorf("kvcache: %d query heads for %d KV heads", o.Heads, o.Layout.KVHeads)
	}
	c := &Paged{opt: o, L: o.Layout, readbacks: map[ml.Context][]readback{}, graphRuns: map[ml.Context]int{}}
	var err error
	if o.Prefix != nil {
		if o.Prefix.L != o.Layout {
			return nil, fmt.Errorf("kvcache: document layout %+v differs from the model's %+v", o.Prefix.L, o.Layout)
		}
		c.store = o.Prefix.Fork()
	} else if c.store, err = NewStore(o.Layout); err != nil {
		return nil, err
	}
	if o.Capacity < c.store.Len() {
		return nil, fmt.Errorf("kvcache: capacity %d is less than the %d tokens of the document", o.Capacity, c.store.Len())
	}
	n := o.Layout.Layers
	c.pools = make([]*pool, n)
	c.views = make([]*layerView, n)
	for l := range c.views {
		c.views[l] = &layerView{s: c.store, layer: l}
	}
	c.sel, c.frozen, c.cells, c.uploads = make([][]int, n), make([][]int, n), make([][]int32, n), make([][]upload, n)
	return c, nil
}

// Store returns the host pages (owned by the cache; read-only for callers).
func (c *Paged) Store() *Store { return c.store }

// Policy returns the cache's paging policy.
func (c *Paged) Policy() paging.Policy { return c.opt.Policy }

// Selected returns the pages layer attended to in the last forward pass.
func (c *Paged) Selected(layer int) []int { return slices.Clone(c.sel[layer]) }

// Stats reports memory use and traffic.
func (c *Paged) Stats() Stats {
	st := Stats{HostBytes: c.store.Bytes(), Pages: c.store.Pages(), Uploads: c.uploadCount.Load(),
		Upkeep: time.Duration(c.upkeep.Load())}
	for _, p := range c.pools {
		if p != nil {
			st.ResidentBytes += p.bytes(c.L)
		}
	}
	return st
}

// ResidentSlots is the size of layer's device pool in pages.
func (c *Paged) ResidentSlots(layer int) int { return c.slotsFor(layer) }

func (c *Paged) denseLayer(layer int) bool {
	pc := c.opt.Policy.Config()
	return c.opt.Policy.Name() == "dense" || pc.Budget <= 0 || layer < pc.DenseLayers
}

// slotsFor sizes layer's pool: the whole capacity for dense layers, else the
// budget plus room for the pages one batch writes.
func (c *Paged) slotsFor(layer int) int {
	P := c.L.PageSize
	pages := (c.opt.Capacity+P-1)/P + 1
	if c.denseLayer(layer) {
		return pages
	}
	pc := c.opt.Policy.Config()
	budget := max(pc.Budget, pc.Sinks+pc.Window+P)
	return min(pages, budget/P+(c.opt.MaxBatch+P-1)/P+3)
}

func (c *Paged) poolFor(layer int) *pool {
	if c.pools[layer] == nil {
		c.pools[layer] = newPool(c.b, c.L, layer, c.slotsFor(layer))
	}
	return c.pools[layer]
}

// Init implements kvcache.Cache. The pool is always f16 with permuted values
// and an f32 mask: ggml's attention without flash attention.
func (c *Paged) Init(b ml.Backend, dtype ml.DType, maxSequences, capacity, maxBatch int) {
	c.b = b
	if maxSequences > 1 {
		panic("kvcache: a paged cache holds one sequence")
	}
	if capacity > 0 && capacity < c.opt.Capacity {
		c.opt.Capacity = capacity
	}
	if maxBatch > 0 {
		c.opt.MaxBatch = max(c.opt.MaxBatch, maxBatch)
	}
}

// SetConfig implements kvcache.Cache; only the layout the paged pool
// produces (permuted V, f32 mask) is accepted.
func (c *Paged) SetConfig(cfg ml.CacheConfig) {
	if !cfg.PermutedV || (cfg.MaskDType != ml.DTypeF32 && cfg.MaskDType != ml.DTypeOther) {
		panic("kvcache: the paged cache needs permuted values and an f32 mask (flash attention off)")
	}
}

// Close frees the device pools.
func (c *Paged) Close() {
	for _, p := range c.pools {
		if p != nil {
			p.close()
		}
	}
	c.closed = true
}

// SetLayer implements kvcache.Cache.
func (c *Paged) SetLayer(layer int) { c.layer = layer }

// CopyPrefix is not supported: a paged cache holds one sequence; documents
// share pages through Options.Prefix instead.
func (c *Paged) CopyPrefix(srcSeq, dstSeq int, n int32) {}

// CanResume reports whether the next token can be at pos.
func (c *Paged) CanResume(seq int, pos int32) bool { return seq == 0 && int(pos) <= c.store.Len() }

// Remove drops tokens from beginIndex to the end (only suffixes can be removed).
func (c *Paged) Remove(seq int, beginIndex, endIndex int32) error {
	if seq != 0 || endIndex != math.MaxInt32 {
		return ollamakv.ErrNotSupported
	}
	n := int(beginIndex)
	if c.written > 0 && c.written < c.L.Layers {
		// A forward pass failed halfway: some layers hold the batch already.
		c.store.n = max(c.store.n, c.pos0+c.n)
	}
	c.written = 0
	c.store.truncate(n)
	P := c.L.PageSize
	for _, p := range c.pools {
		if p == nil {
			continue
		}
		p.drop((n + P - 1) / P)
		if n%P != 0 {
			if s := p.resident(n / P); s >= 0 {
				p.fill[s] = min(p.fill[s], n%P)
			}
		}
	}
	return nil
}

func (c *Paged) needQueries(layer int) bool {
	if c.denseLayer(layer) {
		return false
	}
	switch c.opt.Policy.Queries() {
	case paging.PerStep:
		return true
	case paging.PerQuestion:
		return c.n > 1
	}
	return false
}

// NeedQueries implements arch.Hooks.
func (c *Paged) NeedQueries(layer int) bool { return c.needQueries(layer) }

// StartForward implements kvcache.Cache: the batch must continue the
// sequence. It places the pages the batch writes in every layer's pool and
// chooses the pages of every layer whose policy needs no queries.
func (c *Paged) StartForward(ctx ml.Context, batch input.Batch, reserve bool) error {
	if reserve {
		return nil
	}
	if c.closed {
		return errors.New("kvcache: cache is closed")
	}
	n := len(batch.Positions)
	pos0 := c.store.Len()
	for i, p := range batch.Positions {
		if int(p) != pos0+i || batch.Sequences[i] != 0 {
			return fmt.Errorf("kvcache: batch must continue sequence 0 at position %d (got position %d)", pos0+i, p)
		}
	}
	if pos0+n > c.opt.Capacity {
		return fmt.Errorf("%w: %d tokens exceed the capacity of %d", ollamakv.ErrKvCacheFull, pos0+n, c.opt.Capacity)
	}
	P := c.L.PageSize
	c.pos0, c.n, c.upto, c.written = pos0, n, pos0+n, 0
	c.stamp++
	clear(c.graphRuns)
	c.store.grow(pos0 + n)
	c.writes = c.writes[:0]
	for p := pos0 / P; p <= (pos0+n-1)/P; p++ {
		c.writes = append(c.writes, p)
	}
	for l := 0; l < c.L.Layers; l++ {
		pl := c.poolFor(l)
		// Uploads planned by a pass that never reached its graph (it failed)
		// did not happen: those slots must be filled again.
		for _, u := range c.uploads[l] {
			if pl.page[u.slot] == u.page {
				pl.fill[u.slot] = 0
			}
		}
		c.sel[l], c.uploads[l], c.cells[l] = nil, c.uploads[l][:0], c.cells[l][:0]
		// Pages go into slots in page order, so that with every page selected
		// the pool is laid out like a dense cache (and sums in the same order).
		place := c.writes
		if !c.needQueries(l) {
			c.sel[l] = c.opt.Policy.Select(l, c.views[l], nil, c.upto)
			if c.opt.Policy.Queries() == paging.PerQuestion && c.frozen[l] != nil {
				c.sel[l] = union(c.sel[l], c.frozen[l], c.store.Pages())
			}
			place = union(c.sel[l], c.writes, c.store.Pages())
		}
		if err := c.placeAll(l, place); err != nil {
			return err
		}
		for i := 0; i < n; i++ {
			pos := pos0 + i
			c.cells[l] = append(c.cells[l], int32(pl.resident(pos/P)*P+pos%P))
		}
	}
	return nil
}

// placeAll makes pages resident in layer's pool (keeping the batch's pages
// and pages in the list pinned) and schedules uploads of what is missing.
func (c *Paged) placeAll(layer int, pages []int) error {
	pl := c.pools[layer]
	// Mark the pinned pages once: eviction asks about every slot for every
	// page it places.
	c.pinMark++
	if n := c.store.Pages(); len(c.pinned) < n {
		c.pinned = append(c.pinned, make([]uint64, n-len(c.pinned))...)
	}
	for _, list := range [][]int{c.writes, pages, c.sel[layer]} {
		for _, p := range list {
			c.pinned[p] = c.pinMark
		}
	}
	pinned := func(p int) bool { return p < len(c.pinned) && c.pinned[p] == c.pinMark }
	for _, p := range pages {
		s, err := pl.place(p, pinned, c.stamp)
		if err != nil {
			return err
		}
		if have := c.store.pages[layer][p].N; pl.fill[s] < have {
			c.uploads[layer] = append(c.uploads[layer], upload{page: p, slot: s, rows: have})
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

// plan makes every selected page of layer resident, scheduling uploads.
func (c *Paged) plan(layer int) error { return c.placeAll(layer, c.sel[layer]) }

// SetQueries implements arch.Hooks: choose layer's pages from its queries.
func (c *Paged) SetQueries(layer int, q [][]float32) error {
	c.sel[layer] = c.opt.Policy.Select(layer, c.views[layer], &paging.Queries{Q: q, Heads: c.opt.Heads}, c.upto)
	if c.opt.Policy.Queries() == paging.PerQuestion {
		// Keep what the question retrieved; sinks and window are recomputed
		// at every step, so the answer's pages stay within the budget.
		req := c.opt.Policy.Select(layer, c.views[layer], nil, c.upto)
		c.frozen[layer] = c.frozen[layer][:0]
		for _, p := range c.sel[layer] {
			if !slices.Contains(req, p) {
				c.frozen[layer] = append(c.frozen[layer], p)
			}
		}
	}
	return c.plan(layer)
}

// Put implements kvcache.Cache: the batch's keys and values go into their
// pool slots, and f16 copies are read back into the host pages after the
// graph runs. key, value: [headDim, kvHeads, batch].
func (c *Paged) Put(ctx ml.Context, key, value ml.Tensor) {
	l, r, n := c.layer, c.L.Row(), c.n
	if key.Dim(2) != n {
		panic(fmt.Errorf("kvcache: batch of %d tokens, StartForward saw %d", key.Dim(2), n))
	}
	pl := c.pools[l]
	cells := ctx.Input().FromInts(c.cells[l], n)
	k := key.Reshape(ctx, r, n)
	v := value.Reshape(ctx, r, n)
	ctx.Forward(pl.k.Reshape(ctx, r, pl.slots*c.L.PageSize).SetRows(ctx, k, cells))
	vp := v.Reshape(ctx, r, 1, n).Permute(ctx, 2, 0, 1, 3) // [1, batch, row]
	ctx.Forward(pl.v.Reshape(ctx, 1, pl.slots*c.L.PageSize, r).SetRows(ctx, vp, cells))
	kOut := ctx.Input().Empty(ml.DTypeF16, r, n)
	vOut := ctx.Input().Empty(ml.DTypeF16, r, n)
	ctx.Forward(k.Copy(ctx, kOut), v.Copy(ctx, vOut))
	c.readbacks[ctx] = append(c.readbacks[ctx], readback{layer: l, k: kOut, v: vOut})
	P := c.L.PageSize
	for i := 0; i < n; i++ {
		pos := c.pos0 + i
		s := pl.resident(pos / P)
		pl.fill[s] = max(pl.fill[s], pos%P+1)
	}
}

// Get implements kvcache.Cache: uploads the layer's missing pages and
// returns views over the used pool slots and the mask that hides free
// cells, pages not selected, and the future.
//
//	key [headDim, kvHeads, cells], value [cells, headDim, kvHeads], mask [cells, batch]
func (c *Paged) Get(ctx ml.Context) (ml.Tensor, ml.Tensor, ml.Tensor) {
	l := c.layer
	if c.sel[l] == nil {
		panic(fmt.Sprintf("kvcache: layer %d has no page selection (queries were not given)", l))
	}
	pl := c.pools[l]
	c.emitUploads(ctx, l)
	used := pl.used()
	P := c.L.PageSize
	cells := used * P
	k := pl.k.View(ctx, 0, c.L.HeadDim, pl.k.Stride(1), c.L.KVHeads, pl.k.Stride(2), cells)
	v := pl.v.View(ctx, 0, cells, pl.v.Stride(1), c.L.HeadDim, pl.v.Stride(2), c.L.KVHeads)
	if mk := &c.mask; mk.ctx == ctx && slices.Equal(mk.pages, pl.page[:used]) && slices.Equal(mk.fill, pl.fill[:used]) && slices.Equal(mk.sel, c.sel[l]) {
		return k, v, mk.tensor
	}
	// Row b of the mask shows every visible cell at or before position
	// pos0+b. Cells before the batch are the same for every row: build that
	// row once, then copy it and open the batch's own cells causally.
	ninf := float32(math.Inf(-1))
	row := make([]float32, cells)
	for i := range row {
		row[i] = ninf
	}
	visible := make([]bool, c.store.Pages())
	for _, p := range c.sel[l] {
		visible[p] = true
	}
	for _, p := range c.writes {
		visible[p] = true
	}
	var batchCells []int32 // cell of position pos0+i, for the batch's tokens
	for s := 0; s < used; s++ {
		p := pl.page[s]
		if p < 0 || !visible[p] {
			continue
		}
		for t := 0; t < pl.fill[s] && p*P+t < c.pos0; t++ {
			row[s*P+t] = 0
		}
	}
	for i := 0; i < c.n; i++ {
		pos := c.pos0 + i
		batchCells = append(batchCells, int32(pl.resident(pos/P)*P+pos%P))
	}
	mask := make([]float32, cells*c.n)
	for b := 0; b < c.n; b++ {
		r := mask[b*cells : (b+1)*cells]
		copy(r, row)
		for i := 0; i <= b; i++ {
			r[batchCells[i]] = 0
		}
	}
	t := ctx.Input().FromFloats(mask, cells, c.n)
	c.mask.ctx, c.mask.tensor = ctx, t
	c.mask.pages = append(c.mask.pages[:0], pl.page[:used]...)
	c.mask.fill = append(c.mask.fill[:0], pl.fill[:used]...)
	c.mask.sel = append(c.mask.sel[:0], c.sel[l]...)
	return k, v, t
}

// MaxUploadRuns bounds the copy runs uploads add to one graph: each run
// costs six tensors of the graph's context (two input views, two pool
// views, two copies), and ollama sizes that context for at least 1024. Uploads past it
// become one page scatter per layer. Both paths write the same bytes; tests
// change it to check that.
var MaxUploadRuns = 96

// emitUploads copies pages host -> device inside the graph. Uploads are
// grouped into runs of consecutive slots; each run is one f16 input tensor of
// the pages' rows per K and V, copied into a view of the pool: contiguous
// for K, a strided (permuted) copy for V. Copies stay f16, so they cost
// about a memcpy. Past MaxUploadRuns runs in a graph, whole pages go up with
// one set_rows per K and V instead (scatterPages), which needs an
// f16 -> f32 -> f16 round trip but only a few graph nodes.
func (c *Paged) emitUploads(ctx ml.Context, l int) {
	ups := c.uploads[l]
	if len(ups) == 0 {
		return
	}
	c.uploads[l] = nil
	slices.SortFunc(ups, func(a, b upload) int { return a.slot - b.slot })
	P := c.L.PageSize
	var runs [][]upload
	var full, partial []upload
	for i, u := range ups {
		if u.rows == P {
			full = append(full, u)
		} else {
			partial = append(partial, u)
		}
		if i > 0 {
			prev := ups[i-1]
			if u.slot == prev.slot+1 && prev.rows == P {
				runs[len(runs)-1] = append(runs[len(runs)-1], u)
				continue
			}
		}
		runs = append(runs, []upload{u})
	}
	if used := c.graphRuns[ctx]; len(runs) > MaxUploadRuns-used {
		// Partial pages (at most the last page or two) keep their own copies:
		// a whole-page upload would overwrite the rows this batch's Put
		// writes into the same slot.
		c.scatterPages(ctx, l, full)
		var single [][]upload
		for _, u := range partial {
			single = append(single, []upload{u})
		}
		c.copyRuns(ctx, l, single)
	} else {
		c.graphRuns[ctx] = used + len(runs)
		c.copyRuns(ctx, l, runs)
	}
	c.uploadCount.Add(int64(len(ups)))
}

// copyRuns uploads runs of pages in consecutive slots, two f16 copies per
// run. All runs share one K and one V input tensor (each input is a backend
// buffer of its own): K holds the runs' key rows token-major, V each run's
// values channel-major, run after run, as the pool lays them out.
func (c *Paged) copyRuns(ctx ml.Context, l int, runs [][]upload) {
	if len(runs) == 0 {
		return
	}
	pl := c.pools[l]
	r, P := c.L.Row(), c.L.PageSize
	total := 0
	for _, run := range runs {
		for _, u := range run {
			total += u.rows
		}
	}
	kbuf := make([]uint16, 0, total*r)
	vbuf := make([]uint16, total*r)
	voff := 0
	for _, run := range runs {
		for _, u := range run {
			kbuf = append(kbuf, c.store.pages[l][u.page].K[:u.rows*r]...)
		}
		for ch := 0; ch < r; ch++ {
			for _, u := range run {
				voff += copy(vbuf[voff:], c.store.pages[l][u.page].V[ch*P:ch*P+u.rows])
			}
		}
	}
	kIn := ctx.Input().FromBytes(ml.DTypeF16, u16bytes(kbuf), r*total)
	vIn := ctx.Input().FromBytes(ml.DTypeF16, u16bytes(vbuf), r*total)
	off := 0 // rows before this run
	for _, run := range runs {
		rows := 0
		for _, u := range run {
			rows += u.rows
		}
		first := run[0].slot * P
		k := kIn.View(ctx, off*r*2, r*rows)
		ctx.Forward(k.Copy(ctx, pl.k.View(ctx, first*r*2, r*rows)))
		// V pool rows are the headDim x kvHeads channels, each slots*P cells long.
		v := vIn.View(ctx, off*r*2, rows, rows*2, r) // [rows, channels]
		ctx.Forward(v.Copy(ctx, pl.v.View(ctx, first*2, rows, pl.v.Stride(1), r)))
		off += rows
	}
}

// scatterPages uploads whole pages into any slots with one set_rows per K
// and V, a page per row: the K pool seen as [row*P, slots] takes the pages'
// keys as [row*P, pages]; the V pool seen as [P, slots, channels] takes
// their values as [P, pages, channels]. Host work is a memcpy per page and
// channel; ggml's set_rows wants f32 rows, hence the casts.
func (c *Paged) scatterPages(ctx ml.Context, l int, ups []upload) {
	if len(ups) == 0 {
		return
	}
	pl := c.pools[l]
	r, P, n := c.L.Row(), c.L.PageSize, len(ups)
	kbuf := make([]uint16, 0, n*P*r)
	vbuf := make([]uint16, n*P*r)
	idx := make([]int32, n)
	for i, u := range ups {
		pg := c.store.pages[l][u.page]
		kbuf = append(kbuf, pg.K[:P*r]...)
		for ch := 0; ch < r; ch++ {
			copy(vbuf[(ch*n+i)*P:(ch*n+i+1)*P], pg.V[ch*P:(ch+1)*P])
		}
		idx[i] = int32(u.slot)
	}
	slots := ctx.Input().FromInts(idx, n)
	k := ctx.Input().FromBytes(ml.DTypeF16, u16bytes(kbuf), r*P, n).Cast(ctx, ml.DTypeF32)
	v := ctx.Input().FromBytes(ml.DTypeF16, u16bytes(vbuf), P, n, r).Cast(ctx, ml.DTypeF32)
	ctx.Forward(pl.k.Reshape(ctx, r*P, pl.slots).SetRows(ctx, k, slots))
	ctx.Forward(pl.v.Reshape(ctx, P, pl.slots, r).SetRows(ctx, v, slots))
}

// Outputs implements arch.Hooks: the read-back copies of ctx.
func (c *Paged) Outputs(ctx ml.Context) []ml.Tensor {
	var out []ml.Tensor
	for _, rb := range c.readbacks[ctx] {
		out = append(out, rb.k, rb.v)
	}
	return out
}

// Computed implements arch.Hooks: new keys and values reach the host pages
// and their summaries.
func (c *Paged) Computed(ctx ml.Context) error {
	t0 := time.Now()
	defer func() { c.upkeep.Add(int64(time.Since(t0))) }()
	for _, rb := range c.readbacks[ctx] {
		kb, vb := rb.k.Bytes(), rb.v.Bytes()
		if len(kb) != 2*c.n*c.L.Row() || len(vb) != len(kb) {
			return fmt.Errorf("kvcache: read back %d bytes of keys, want %d", len(kb), 2*c.n*c.L.Row())
		}
		c.store.write(rb.layer, c.pos0, bytesU16(kb), bytesU16(vb), c.n)
		c.written++
	}
	delete(c.readbacks, ctx)
	if c.written == c.L.Layers {
		c.store.n = c.pos0 + c.n
	}
	return nil
}
