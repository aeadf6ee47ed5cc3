package kvcache

import (
	"fmt"
	"math"
	"slices"

	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/ml/nn"

	"github.com/kvrecall/kvrecall/runtime/arch"
)

// single returns layer's only group if it holds every KV head: the layout
// nn.Attention can use through Get.
func (c *Paged) single(layer int) *group {
	if gs := c.layers[layer].groups; len(gs) == 1 && gs[0].all {
		return gs[0]
	}
	return nil
}

// Get implements kvcache.Cache for a layer whose heads form one group:
// uploads the layer's missing pages and returns views over the used pool
// slots and the mask that hides free cells, pages not selected, and the
// future. Layers with several head groups need Attention.
//
//	key [headDim, kvHeads, cells], value [cells, headDim, kvHeads], mask [cells, batch]
func (c *Paged) Get(ctx ml.Context) (ml.Tensor, ml.Tensor, ml.Tensor) {
	g := c.single(c.layer)
	if g == nil {
		panic(fmt.Sprintf("kvcache: layer %d has %d head groups; use Attention", c.layer, len(c.layers[c.layer].groups)))
	}
	return c.groupKV(ctx, c.layer, g)
}

// groupKV uploads what g's pool misses and returns views of its used slots
// and its mask.
func (c *Paged) groupKV(ctx ml.Context, l int, g *group) (ml.Tensor, ml.Tensor, ml.Tensor) {
	if g.staged {
		return c.stagedKV(ctx, l, g)
	}
	if g.pool.tok != nil {
		return c.tokenKV(ctx, l, g)
	}
	if g.sel == nil {
		panic(fmt.Sprintf("kvcache: layer %d has no page selection (queries were not given)", l))
	}
	pl := g.pool
	c.emitUploads(ctx, l, g)
	// Only the slots up to the last one this pass attends to: stale pages
	// above it would cost as much as attended ones, masked or not.
	used := pl.attended(func(p int) bool {
		_, sel := slices.BinarySearch(g.sel, p)
		return sel || slices.Contains(c.writes, p)
	})
	cells := used * c.L.PageSize
	heads := len(g.heads)
	k := pl.k.View(ctx, 0, c.L.HeadDim, pl.k.Stride(1), heads, pl.k.Stride(2), cells)
	v := pl.v.View(ctx, 0, cells, pl.v.Stride(1), c.L.HeadDim, pl.v.Stride(2), heads)
	return k, v, c.maskFor(ctx, g, used)
}

// Attention implements arch.Attender. A layer with one group of every head
// goes through nn.Attention with Get, exactly as a plain cache would. A
// layer with several groups computes each group's attention over its own
// pool (so a group that sees fewer tokens computes less) from its query
// heads, then puts the heads back in order. q: [headDim, heads, batch].
func (c *Paged) Attention(ctx ml.Context, layer int, q, k, v ml.Tensor, scale float64) ml.Tensor {
	return c.AttentionSoftcap(ctx, layer, q, k, v, scale, 0)
}

// AttentionSoftcap implements arch.SoftcapAttender: Attention with scores
// capped as cap·tanh(s/cap) before the mask (gemma2); 0 means no cap.
func (c *Paged) AttentionSoftcap(ctx ml.Context, layer int, q, k, v ml.Tensor, scale float64, softcap float32) ml.Tensor {
	c.layer = layer
	if c.graphScoring(layer) {
		c.scoreInGraph(ctx, layer, q) // bounds that choose the next step's pages
	}
	if softcap > 0 && c.opt.AttnSoftcap == 0 && c.selectInGraph(layer) && c.opt.Selector.NeedQueries(layer, c.n) {
		// NeedQueries said no split (it reads Options.AttnSoftcap), so no
		// selection was made: softcapped layers are attended group by group.
		panic(fmt.Sprintf("kvcache: layer %d's attention is softcapped (%g) but the cache's Options.AttnSoftcap is 0: set it to the model's softcap", layer, softcap))
	}
	// A one-token pass of staged groups may attend the runs of their
	// ordered copies in place (InPlaceRuns): not through nn.Attention.
	c.inplaceNow = InPlaceRuns && softcap == 0 && q.Dim(2) == 1 &&
		slices.ContainsFunc(c.layers[layer].groups, func(g *group) bool { return g.staged })
	defer func() { c.inplaceNow = false }()
	if c.single(layer) != nil && softcap == 0 && !c.inplaceNow {
		return nn.Attention(ctx, q, k, v, scale, c)
	}
	ctx.Forward(q)
	if k != nil {
		ctx.Forward(k, v)
		c.keepCells = softcap > 0 // attended group by group: the batch goes into the cells
		c.Put(ctx, k, v)
		c.keepCells = false
	}
	// Every group staged (squeezed's decode steps): one op for the layer,
	// the batch's token read from k and v (nil: on the pages already).
	if c.inplaceNow && c.layerOp(layer) {
		return c.layerAttention(ctx, layer, q, k, v, scale)
	}
	sdpa := func(q, key, value, mask ml.Tensor) ml.Tensor {
		if softcap > 0 {
			return arch.SoftcapSDPA(ctx, q, key, value, mask, scale, softcap)
		}
		return q.(ml.ScaledDotProductAttention).ScaledDotProductAttention(ctx, key, value, mask, nil, nil, scale, true)
	}
	if g := c.single(layer); g != nil {
		key, value, mask := c.groupKV(ctx, layer, g)
		if g.inplace {
			return c.inplaceAttention(ctx, q, key, value, g, scale)
		}
		return sdpa(q, key, value, mask)
	}
	G := c.opt.Heads / c.L.KVHeads
	var out ml.Tensor
	var order []int // query heads in the order of out
	for _, g := range c.layers[layer].groups {
		key, value, mask := c.groupKV(ctx, layer, g)
		var qheads []int
		for _, h := range g.heads {
			for j := 0; j < G; j++ {
				qheads = append(qheads, h*G+j)
			}
		}
		qg := pickHeads(ctx, q, qheads) // [headDim, len(qheads), batch]
		var a ml.Tensor
		if g.inplace {
			a = c.inplaceAttention(ctx, qg, key, value, g, scale)
		} else {
			a = sdpa(qg, key, value, mask)
		}
		if out == nil {
			out = a
		} else {
			out = out.Concat(ctx, a, 1)
		}
		order = append(order, qheads...)
	}
	if slices.IsSorted(order) {
		return out
	}
	// Row h of each token must be query head h again: gather with, for
	// every token, the position of head h in order. get_rows wants
	// [heads, batch] indices for a [headDim, heads, batch] source.
	n := q.Dim(2)
	pos := make([]int32, len(order))
	for i, h := range order {
		pos[h] = int32(i)
	}
	idx := make([]int32, 0, len(order)*n)
	for range n {
		idx = append(idx, pos...)
	}
	return out.Rows(ctx, ctx.Input().FromInts(idx, len(order), n))
}

// maskFor returns g's mask [cells, batch]: row b shows every cell of a
// selected page at or before position pos0+b. Pools with the same layout
// and selection (every layer, for a dense selector) share one mask within
// a graph.
func (c *Paged) maskFor(ctx ml.Context, g *group, used int) ml.Tensor {
	if t := c.keptMaskFor(ctx, g, used); t != nil {
		return t // a kept graph's, written at every step (keptstep.go)
	}
	pl := g.pool
	if mk := &c.mask; mk.ctx == ctx && mk.window == g.Window && slices.Equal(mk.pages, pl.page[:used]) && slices.Equal(mk.fill, pl.fill[:used]) && slices.Equal(mk.sel, g.sel) && slices.Equal(mk.tok, g.tok) && (mk.tok == nil) == (g.tok == nil) {
		return mk.tensor
	}
	var t ml.Tensor
	if g.tok == nil && g.Window <= 0 && c.positionOrdered(g, used) {
		t = causalMask(ctx, c.pos0, used*c.L.PageSize, c.n)
	} else {
		mask := buildMask(pl, used, g.sel, g.tok, c.writes, c.store.Pages(), c.pos0, c.n, c.L.PageSize)
		if g.Window > 0 {
			slideMask(mask, pl, used, c.pos0, c.n, c.L.PageSize, g.Window)
		}
		t = ctx.Input().FromFloats(mask, used*c.L.PageSize, c.n)
	}
	c.mask.ctx, c.mask.tensor, c.mask.window = ctx, t, g.Window
	c.mask.pages = append(c.mask.pages[:0], pl.page[:used]...)
	c.mask.fill = append(c.mask.fill[:0], pl.fill[:used]...)
	c.mask.sel = append(c.mask.sel[:0], g.sel...)
	c.mask.tok = nil
	if g.tok != nil {
		c.mask.tok = append([]int32{}, g.tok...)
	}
	return t
}

// slideMask hides, in row b of a [cells, batch] mask, every cell whose
// position is window or more before the row's query pos0+b: a windowed
// layer's query sees only the window positions ending at itself
// (llama.cpp's LLAMA_SWA_TYPE_STANDARD: masked when p1-p0 >= n_swa).
func slideMask(mask []float32, pl *pool, used, pos0, n, P, window int) {
	cells := used * P
	ninf := float32(math.Inf(-1))
	for b := 0; b < n; b++ {
		lo := pos0 + b - window + 1 // first visible position
		if lo <= 0 {
			continue
		}
		r := mask[b*cells : (b+1)*cells]
		for s := 0; s < used; s++ {
			p := pl.page[s]
			if p < 0 || p*P >= lo {
				continue
			}
			for t := 0; t < P && p*P+t < lo; t++ {
				r[s*P+t] = ninf
			}
		}
	}
}

// positionOrdered reports whether g's first used slots hold pages 0..used-1
// in order, every one attended and filled up to the batch: then cell c is
// position c, every cell before the batch is visible, and the mask is plain
// causal (a dense selection: document ingest, the dense method).
func (c *Paged) positionOrdered(g *group, used int) bool {
	P := c.L.PageSize
	pl := g.pool
	for s := 0; s < used; s++ {
		if pl.page[s] != s || pl.fill[s] < min(P, max(0, c.pos0-s*P)) {
			return false
		}
	}
	// Every page before the batch's first is attended (the batch's own
	// pages always are).
	first := c.pos0 / P
	if len(g.sel) < first {
		return false
	}
	for i := 0; i < first; i++ {
		if g.sel[i] != i {
			return false
		}
	}
	return true
}

// causalMask builds the plain causal mask [cells, batch] in the graph
// instead of on the host: cells before pos0 are 0, and cell pos0+j is 0 for
// batch rows b >= j and -Inf otherwise (ggml_tri keeps -Inf above the
// diagonal and zeroes the rest). A host mask is cells·batch floats per
// pass, in a buffer ollama allocates afresh for every input: at 64k tokens
// and 512-token batches, 128 MiB of new pages per batch. Graph nodes live
// in the scheduler's compute buffer, which is reused. The values are the
// host mask's exactly (0 and -Inf), so results do not change.
//
// The ops are chosen to use every thread: ggml's CPU repeat runs on one
// thread, and its concat splits the work by dimension 2 only. So the zeros
// before the batch come from ggml_pad (split by rows) of one zero, and the
// parts are concatenated as [cols, batch/maskSplit, maskSplit] (split into
// maskSplit pieces), which is the same memory as [cols, batch]. A 16k
// ingest spent about 6 % of its CPU time on the single-threaded version.
func causalMask(ctx ml.Context, pos0, cells, n int) ml.Tensor {
	ninf := ctx.Input().FromFloats([]float32{float32(math.Inf(-1))}, 1, 1)
	out := ninf.Repeat4D(ctx, n, n, 1, 1).Tri(ctx, triUpper) // ggml_tri wants a square
	rest := cells - pos0 - n                                 // the last page's empty cells
	if pos0 == 0 && rest <= 0 {
		return out
	}
	k := 1
	if n%maskSplit == 0 {
		k = maskSplit
	}
	out = out.Reshape(ctx, n, n/k, k)
	if pos0 > 0 {
		zero := ctx.Input().FromFloats([]float32{0}, 1, 1, 1)
		out = zero.Pad(ctx, pos0-1, n/k-1, k-1, 0).Concat(ctx, out, 0)
	}
	if rest > 0 {
		out = out.Concat(ctx, ninf.Repeat4D(ctx, rest, n/k, k, 1), 0)
	}
	return out.Reshape(ctx, cells, n)
}

// maskSplit is the number of pieces causalMask's concatenations are split
// into (a multiple of the thread counts in use).
const maskSplit = 8

// CausalMask is causalMask for callers that must build the same graph
// (runtime reserves the compute buffer of an ingest's last batch with it).
func CausalMask(ctx ml.Context, pos0, cells, n int) ml.Tensor { return causalMask(ctx, pos0, cells, n) }

// triUpper is GGML_TRI_TYPE_UPPER: keep elements with i0 > i1, zero the rest.
const triUpper = 1

// buildMask returns the [cells, batch] mask (row-major by batch row) of a
// pool's first used slots for a batch of n tokens from pos0: 0 where
// attended, -Inf elsewhere. Cells before the batch are the same for every
// row: that row is built once, then copied and the batch's own cells opened
// causally. With tok (a token selection), only the listed earlier
// positions are attended, besides the batch.
func buildMask(pl *pool, used int, sel []int, tok []int32, writes []int, pages, pos0, n, P int) []float32 {
	mask := make([]float32, used*P*n)
	buildMaskInto(mask, pl, used, sel, tok, writes, pages, pos0, n, P)
	return mask
}

// buildMaskInto writes buildMask's mask into mask (used·P·n floats): a
// kept step graph's persistent mask tensor (keptstep.go) is written in
// place at every step.
func buildMaskInto(mask []float32, pl *pool, used int, sel []int, tok []int32, writes []int, pages, pos0, n, P int) {
	cells := used * P
	ninf := float32(math.Inf(-1))
	row := mask[:cells] // built as row 0's earlier cells, then copied
	for i := range row {
		row[i] = ninf
	}
	visible := make([]bool, pages)
	for _, p := range sel {
		visible[p] = true
	}
	for _, p := range writes {
		visible[p] = true
	}
	for s := 0; s < used; s++ {
		p := pl.page[s]
		if p < 0 || !visible[p] || tok != nil {
			continue
		}
		for t := 0; t < pl.fill[s] && p*P+t < pos0; t++ {
			row[s*P+t] = 0
		}
	}
	for _, t := range tok {
		p := int(t) / P
		if s := pl.resident(p); s >= 0 && int(t) < pos0 && int(t)%P < pl.fill[s] {
			row[s*P+int(t)%P] = 0
		}
	}
	batchCells := make([]int32, n) // cell of position pos0+i
	for i := range batchCells {
		pos := pos0 + i
		batchCells[i] = int32(pl.resident(pos/P)*P + pos%P)
	}
	// Rows from the last down, so that row 0 (the shared part) is copied
	// before its own batch cell is opened.
	for b := n - 1; b >= 0; b-- {
		r := mask[b*cells : (b+1)*cells]
		if b > 0 {
			copy(r, row)
		}
		for i := 0; i <= b; i++ {
			r[batchCells[i]] = 0
		}
	}
}
