package kvcache

import (
	"fmt"

	"github.com/ollama/ollama/ml"

	"github.com/kvrecall/kvrecall/internal/backendmem"
)

// Token-granular groups on a host backend: one gather per layer, no pool.
//
// A token pool (tokens.go) copies each pass's newly selected tokens from
// the host pages into its cells, with an LRU over the cells, a plan of
// the copies, per-token stamps and a mask over the cells. On the CPU
// backend the pool and the pages are both host memory, and under the
// paper's per-step selection ~86% of a KV head's tokens change at every
// decode step (docs/performance.md), so that machinery cost about a third
// of a squeezed decode step for a copy that buys nothing.
//
// With TokenGather (opt-in, see below), a layer whose backend keeps tensors in
// host memory instead keeps a mirror of the sequence's keys and values in
// one ggml tensor (the layer's arena), each token's key and value rows
// side by side (a scattered gather's second cache line comes with the
// first: 5.25 -> 4.66 ms a step against separate K and V arenas):
//
//	arena: f16 [2·headDim, kvHeads·cap]; row t·kvHeads+h is K(t, h), then V(t, h)
//
// and each pass gathers the selected tokens of every token-granular group
// of the layer, then the batch's, with one get_rows from one int32 index
// input (f32 [2·headDim, rows] out). A group's keys are a view of its
// rows, [headDim, heads, m+n] (row stride 2·headDim); its values the view
// headDim further, permuted to [m+n, headDim, heads] by a converting copy
// (what ggml's mul_mat needs; the pool path pays the same copy). Put
// copies the batch's keys and values into the arena inside the graph
// (rounded to f16, as the pool stores them), before the gather; in the
// split pass attention is in another graph than Put, computed after it.
// Every gathered row is attended: no mask before the batch, the batch
// causal (none for one token). Before each pass the arena is synced from
// the host pages up to the pass (the batch reaches the pages in Computed,
// after its graph; a failed pass's rows are overwritten), so a decode step
// copies one token per layer into it on the host.
//
// The arena belongs to the session (a document's sessions each hold one:
// a second host copy of the document's KV for every layer with token
// groups; Stats.ArenaBytes). Non-host backends keep the token pools.
//
// Off by default: a session's arena is a full copy of its document's keys
// and values (1 GiB per session for the 1b preset at 32k), made at its
// first pass, where a token pool is the budget's size; sharing one arena
// per document among its sessions is not done. Turn it on for the faster
// decode step when memory allows.
var TokenGather = false

// tokenArena is one layer's mirror of the sequence's keys and values.
type tokenArena struct {
	ctx    ml.Context
	kv     ml.Tensor // f16 [2·headDim, kvHeads·cap]: row t·kvHeads+h is K(t, h), then V(t, h)
	hkv    []uint16  // its memory
	cap    int       // tokens
	synced int       // tokens [0, synced) equal the host pages
}

func (a *tokenArena) close() {
	if a != nil && a.ctx != nil {
		a.ctx.Close()
		a.ctx = nil
	}
}

// gatherOK reports whether layer's token-granular groups take the gather
// path: TokenGather, a backend, a global layer (a windowed layer drops
// host pages), and host memory (found out with the layer's first arena:
// a layer whose backend refuses it keeps its token pools).
func (c *Paged) gatherOK(layer int) bool {
	if !TokenGather || c.b == nil || (c.noGather != nil && c.noGather[layer]) || c.SlidingWindow(layer) > 0 {
		return false
	}
	for _, g := range c.layers[layer].groups {
		if g.Tokens {
			return true
		}
	}
	return false
}

// arenaHost reports whether layer's backend gives its tensors host
// memory, from a one-element tensor: a device backend is found out
// without allocating a document-sized arena on it.
func (c *Paged) arenaHost(layer int) bool {
	var ctx ml.Context
	var t ml.Tensor
	backendmem.Do(func() {
		ctx = c.b.NewContextSize(1).Layer(layer)
		t = ctx.Empty(ml.DTypeF16, 1)
	})
	defer ctx.Close()
	return hostMem(t, 1) != nil
}

// syncArena makes layer's arena (created or grown as needed) mirror the
// host pages' tokens [0, upto), with room for room more (the batch, which
// Put copies in). It returns false if the backend does not
// keep the arena in host memory.
func (c *Paged) syncArena(layer, upto, room int) bool {
	if c.arenas == nil {
		c.arenas = make([]*tokenArena, c.L.Layers)
	}
	a := c.arenas[layer]
	P, r := c.L.PageSize, c.L.Row()
	if a == nil && !c.arenaHost(layer) {
		return false
	}
	if a == nil || a.cap < upto+room {
		capTokens := roundUp(upto+room+upto/4+P, P) // room for an answer before it grows
		na := &tokenArena{cap: capTokens}
		backendmem.Do(func() {
			na.ctx = c.b.NewContextSize(1).Layer(layer)
			// Not zeroed: a row is read only after it is written (synced
			// here, or the batch's by Put before the gather).
			na.kv = na.ctx.Empty(ml.DTypeF16, 2*c.L.HeadDim, c.L.KVHeads*capTokens)
		})
		if na.hkv = hostMem(na.kv, capTokens*2*r); na.hkv == nil {
			na.close()
			return false
		}
		if a != nil {
			copy(na.hkv, a.hkv[:a.synced*2*r])
			na.synced = a.synced
			a.close()
		}
		a = na
		c.arenas[layer] = a
	}
	hd, kv := c.L.HeadDim, c.L.KVHeads
	for t := a.synced; t < upto; {
		pg := c.store.pages[layer][t/P]
		off := t % P
		n := min(upto-t, P-off)
		vt := pg.vt.Load()
		for i := range n {
			for h := range kv {
				row := a.hkv[((t+i)*kv+h)*2*hd:][:2*hd]
				copy(row[:hd], pg.K[(off+i)*r+h*hd:][:hd])
				if vt != nil {
					copy(row[hd:], (*vt)[(off+i)*r+h*hd:][:hd])
					continue
				}
				for d := range hd { // the page's values are channel-major
					row[hd+d] = pg.V[(h*hd+d)*P+off+i]
				}
			}
		}
		t += n
	}
	a.synced = upto
	return true
}

// gathered is a layer's gather in one graph: every gather group's rows.
type gathered struct {
	ctx   ml.Context
	layer int
	kv    ml.Tensor         // f32 [2·headDim, rows]: keys, then values
	at    map[*group][2]int // group -> first row, tokens
}

// gatherLayer emits layer's get_rows (once per graph) and returns them.
func (c *Paged) gatherLayer(ctx ml.Context, l int) *gathered {
	if gt := c.gath; gt != nil && gt.ctx == ctx && gt.layer == l {
		return gt
	}
	kv := c.L.KVHeads
	gt := &gathered{ctx: ctx, layer: l, at: map[*group][2]int{}}
	idx := c.gatherIdx[:0]
	for _, g := range c.layers[l].groups {
		if !g.gather {
			continue
		}
		if g.tok == nil {
			panic(fmt.Sprintf("kvcache: layer %d has no token selection (queries were not given)", l))
		}
		first, m := len(idx), 0
		add := func(t int32) {
			for _, h := range g.heads {
				idx = append(idx, t*int32(kv)+int32(h))
			}
			m++
		}
		for _, t := range g.tok {
			if int(t) >= c.pos0 {
				break // the batch's, added below in order
			}
			add(t)
		}
		for i := range c.n {
			add(int32(c.pos0 + i))
		}
		gt.at[g] = [2]int{first, m}
	}
	c.gatherIdx = idx
	a := c.arenas[l]
	rows := ctx.Input().FromInts(idx, len(idx))
	gt.kv = a.kv.Rows(ctx, rows)
	c.gath = gt
	return gt
}

// gatherKV is groupKV for a gather group: its selected tokens' keys and
// values, then the batch's, gathered from the layer's arena (Put copied
// the batch there earlier in the graph).
//
//	key [headDim, heads, m+n] f32, value [m+n, headDim, heads] f32, mask [m+n, batch] (nil for one token)
func (c *Paged) gatherKV(ctx ml.Context, l int, g *group) (ml.Tensor, ml.Tensor, ml.Tensor) {
	gt := c.gatherLayer(ctx, l)
	heads, hd, n := len(g.heads), c.L.HeadDim, c.n
	at := gt.at[g]
	cells := at[1]                 // earlier tokens, then the batch's
	off, w := at[0]*2*hd*4, 2*hd*4 // bytes: the group's first row, a row
	k := gt.kv.View(ctx, off, hd, w, heads, heads*w, cells)
	v := gt.kv.View(ctx, off+hd*4, hd, w, heads, heads*w, cells)
	// [cells, headDim, heads]. ggml copies a permuted tensor of the same
	// type with one memcpy per element (dup_bytes: 16% of a squeezed
	// decode step at 16k in perf); a converting copy is one typed loop.
	// The values were f16 in the arena, so the round trip is exact, and
	// attention weighs f32 values as the pool path does.
	v = v.Permute(ctx, 1, 2, 0, 3).Cast(ctx, ml.DTypeF16).Cast(ctx, ml.DTypeF32)
	var mask ml.Tensor
	if n > 1 {
		mask = causalMask(ctx, cells-n, cells, n)
	}
	return k, v, mask
}

// putArena copies the batch's keys and values of layer into its arena at
// rows pos0·kvHeads.. (f16, as the pools and the host pages round them),
// inside the graph, before the gathers that read them: the split pass
// (paging.HostScores) builds attention in another graph than Put's, and
// the host pages have the batch only after the pass.
//
//	key, value: [headDim, kvHeads, batch]
func (c *Paged) putArena(ctx ml.Context, l int, key, value ml.Tensor) {
	a := c.arenas[l]
	hd, rows := c.L.HeadDim, c.L.KVHeads*c.n
	at, w := c.pos0*c.L.KVHeads*2*hd*2, 2*hd*2 // bytes: the batch's first row, a row
	ctx.Forward(key.Copy(ctx, a.kv.View(ctx, at, hd, w, rows)))
	ctx.Forward(value.Copy(ctx, a.kv.View(ctx, at+hd*2, hd, w, rows)))
}

// checkGather reports broken invariants of a gather group (at names the
// layer and group): it has no pool, its layer has an arena that mirrors
// no more than the sequence, and every token it lists before the batch is
// in the arena.
func (c *Paged) checkGather(at string, l int, g *group) []error {
	var errs []error
	if g.pool != nil {
		errs = append(errs, fmt.Errorf("%s: a gather group holds a pool", at))
	}
	if !g.Tokens {
		errs = append(errs, fmt.Errorf("%s: a gather group that is not token-granular", at))
	}
	if c.arenas == nil || c.arenas[l] == nil {
		return append(errs, fmt.Errorf("%s: a gather group without an arena", at))
	}
	a := c.arenas[l]
	limit := c.store.Len()
	if c.written < c.L.Layers {
		limit = max(limit, c.pos0+c.n)
	}
	if a.synced > limit || a.synced > a.cap {
		errs = append(errs, fmt.Errorf("%s: the arena mirrors %d tokens, past the %d of the sequence or its %d cells", at, a.synced, limit, a.cap))
	}
	if g.sel != nil && g.tok == nil {
		errs = append(errs, fmt.Errorf("%s: a token-granular group has a selection without tokens", at))
	}
	for _, t := range g.tok {
		if int(t) >= a.synced && int(t) < c.pos0 {
			errs = append(errs, fmt.Errorf("%s: selected token %d is not in the arena (%d tokens)", at, t, a.synced))
		}
	}
	return errs
}
