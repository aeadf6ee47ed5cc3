package kvcache

import (
	"fmt"
	"slices"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/ollama/ollama/ml"

	"github.com/kvrecall/kvrecall/paging"
)

// A kept step graph (issue 14, "Graph reuse across decode steps"): the
// runtime keeps the graph of a one-token decode step on a Paged cache
// across steps (runtime/pagedstep.go), as it does for the dense engine
// (runtime/densestep.go), and builds it again only when its shape
// changes. This file is the cache's side: what a step writes on the host
// before the kept graph is computed again, and the key that says when the
// graph must be built again.
//
// The kept path covers the common case on the CPU backend: every layer's
// pages chosen without the step's queries (no graph split: window, retro,
// quest scored in the graph, dense), every head group a page pool in host
// memory (HostUploads), quest's box tensors in host memory (HostBounds).
// Token-granular groups (token pools, staged groups), centroid scores
// (squeezed), pools or boxes outside host memory and passes of more than
// one token build their graph for the pass, as before (PrepareKeptStep
// says no).
//
// Per step, before the graph is computed (in the order a fresh build
// does it: the previous graph has finished, docs/kvcache.md "Copying at
// build time is safe"): quest's changed box rows and the pools' page
// uploads are copied in on the host; the cells the step's keys and values
// go to (set_rows indices, I32 [1] per group) and each distinct mask (F32
// [cells, 1], persistent, written in place) are written; the read-back
// outputs (the new keys and values, quest's bounds) are persistent and
// read in Computed as a fresh graph's are. The key holds what the graph's
// shape depends on: per layer whether it is scored in the graph and the
// box tensor, page count and padded rows of its bound; per group its pool
// (a new pool when budgets or batches resize it), the slots attended, and
// which mask it shares.

// graphObjects numbers pools and box tensors, so that a kept graph's key
// names the tensors it reads (an address may be reused after a free).
var graphObjects atomic.Uint64

// keptPlan is what PrepareKeptStep found for the current step.
type keptPlan struct {
	key    []uint64
	maskOf map[*group]int // the mask each group reads
	reps   []maskRep      // per mask: a group it is built from
}

// maskRep is the group whose state a mask is built from, and its
// attended slots.
type maskRep struct {
	layer int
	g     *group
	used  int
}

// KeptInputs are the persistent inputs and outputs of a kept step graph
// that the cache writes before and reads after each compute.
type KeptInputs struct {
	ctx       ml.Context
	cells     []keptCells
	masks     [][]float32 // per mask id: its tensor's memory, F32 [cells, 1]
	maskT     []ml.Tensor // per mask id: the tensor
	readbacks []readback
	ranks     []rankOut
}

type keptCells struct {
	g   *group
	dst []int32 // the I32 [1] set_rows index tensor's memory
}

// PrepareKeptStep is called after StartForward of a one-token pass. If
// the pass can be computed by a kept graph, it does the step's host work
// that a graph build would do (box rows, page uploads, the pools' fill)
// and returns the key of the graph's shape: a kept graph built with the
// same key computes this step once WriteKeptStep has written its inputs.
// ok false: the pass must be built as before (nothing has been done that
// a build would not do again).
func (c *Paged) PrepareKeptStep() (key []uint64, ok bool) {
	c.plan = nil
	if c.n != 1 || !HostUploads {
		return nil, false
	}
	_, centroids := c.opt.Selector.(paging.CentroidScored)
	for l := range c.layers {
		if c.NeedQueries(l) {
			return nil, false
		}
		if c.graphScoring(l) && (centroids || !HostBounds) {
			return nil, false
		}
		for _, g := range c.layers[l].groups {
			if g.staged || g.pool == nil || g.pool.tok != nil || g.pool.hk == nil || g.sel == nil {
				return nil, false
			}
		}
	}
	// Box tensors first: one not in host memory refuses the step before
	// any host work.
	for l := range c.layers {
		if !c.graphScoring(l) {
			continue
		}
		if pages := min(c.layers[l].view.Pages(), paging.PagesOf(c.upto, c.L.PageSize)); pages > 0 && c.boxesFor(l, pages).host == nil {
			return nil, false
		}
	}
	p := &keptPlan{maskOf: map[*group]int{}}
	p.key = append(p.key, uint64(c.n), uint64(len(c.layers)))
	for l := range c.layers {
		if c.graphScoring(l) {
			pages := min(c.layers[l].view.Pages(), paging.PagesOf(c.upto, c.L.PageSize))
			p.key = append(p.key, 1, uint64(pages))
			if pages > 0 {
				bt := c.boxesFor(l, pages)
				c.uploadBoxes(nil, l, bt, pages, true) // host: no graph ops
				p.key = append(p.key, bt.id, uint64(boxRows(bt, pages)))
			}
		} else {
			p.key = append(p.key, 0)
		}
		c.batchWritten(l)
		for _, g := range c.layers[l].groups {
			c.emitUploads(nil, l, g) // host: plain copies
			used := c.usedSlots(g)
			id := len(p.reps)
			if last := id - 1; last >= 0 && sameMaskState(p.reps[last].g, p.reps[last].used, g, used) {
				id = last
			} else {
				p.reps = append(p.reps, maskRep{layer: l, g: g, used: used})
			}
			p.maskOf[g] = id
			p.key = append(p.key, g.pool.id, uint64(used), uint64(id))
		}
	}
	c.plan = p
	return p.key, true
}

// usedSlots is the slots of g's pool the pass attends to (groupKV's
// used).
func (c *Paged) usedSlots(g *group) int {
	return g.pool.attended(func(p int) bool {
		_, sel := slices.BinarySearch(g.sel, p)
		return sel || slices.Contains(c.writes, p)
	})
}

// sameMaskState reports whether groups a and b (with ua and ub slots
// attended) have the same mask in this pass: maskFor's sharing rule.
func sameMaskState(a *group, ua int, b *group, ub int) bool {
	return ua == ub && a.Window == b.Window && slices.Equal(a.pool.page[:ua], b.pool.page[:ub]) &&
		slices.Equal(a.pool.fill[:ua], b.pool.fill[:ub]) && slices.Equal(a.sel, b.sel) &&
		slices.Equal(a.tok, b.tok) && (a.tok == nil) == (b.tok == nil)
}

// BeginKeptBuild makes the graph built next into ctx a kept one: Put and
// the masks use persistent inputs that WriteKeptStep writes. It needs the
// plan of PrepareKeptStep for this step.
func (c *Paged) BeginKeptBuild(ctx ml.Context) error {
	if c.plan == nil {
		return fmt.Errorf("kvcache: a kept step graph needs PrepareKeptStep first")
	}
	n := len(c.plan.reps)
	c.building = &KeptInputs{ctx: ctx, masks: make([][]float32, n), maskT: make([]ml.Tensor, n)}
	return nil
}

// EndKeptBuild returns the inputs of the kept graph built into ctx since
// BeginKeptBuild; its read-back outputs are the cache's to read at every
// step (Computed), no longer this pass's only.
func (c *Paged) EndKeptBuild(ctx ml.Context) (*KeptInputs, error) {
	k := c.building
	c.building = nil
	if k == nil || k.ctx != ctx {
		return nil, fmt.Errorf("kvcache: EndKeptBuild without BeginKeptBuild on this context")
	}
	for id, m := range k.masks {
		if m == nil {
			return nil, fmt.Errorf("kvcache: the kept graph reads no mask %d", id)
		}
	}
	k.readbacks = c.readbacks[ctx]
	k.ranks = c.ranks[ctx]
	delete(c.readbacks, ctx)
	delete(c.ranks, ctx)
	return k, nil
}

// AbortKeptBuild forgets a kept build, or a kept step, that failed: the
// outputs registered for ctx (which the caller closes).
func (c *Paged) AbortKeptBuild(ctx ml.Context) {
	c.building = nil
	delete(c.readbacks, ctx)
	delete(c.ranks, ctx)
}

// keptCellsFor returns the I32 [n] tensor of the cells Put writes for g
// in a kept build (written at every step), or nil when not building one.
func (c *Paged) keptCellsFor(ctx ml.Context, g *group) ml.Tensor {
	k := c.building
	if k == nil || k.ctx != ctx {
		return nil
	}
	t := ctx.Input().Empty(ml.DTypeI32, c.n)
	p := hostData(t, ml.DTypeI32, c.n)
	if p == nil {
		panic("kvcache: a kept step graph's cell tensor is not in host memory")
	}
	k.cells = append(k.cells, keptCells{g: g, dst: unsafe.Slice((*int32)(p), c.n)})
	return t
}

// keptMaskFor returns the persistent mask tensor g reads in a kept build,
// F32 [used·P, n], or nil when not building one. Groups that share a mask
// in the plan read one tensor, as maskFor shares one in a fresh graph.
func (c *Paged) keptMaskFor(ctx ml.Context, g *group, used int) ml.Tensor {
	k := c.building
	if k == nil || k.ctx != ctx {
		return nil
	}
	id, ok := c.plan.maskOf[g]
	if !ok || c.plan.reps[id].used != used {
		panic(fmt.Sprintf("kvcache: the kept step's plan does not match its build (layer %d)", c.layer))
	}
	if t := k.maskT[id]; t != nil {
		return t
	}
	elems := used * c.L.PageSize * c.n
	t := ctx.Input().Empty(ml.DTypeF32, used*c.L.PageSize, c.n)
	if k.masks[id] = hostF32(t, elems); k.masks[id] == nil {
		panic("kvcache: a kept step graph's mask is not in host memory")
	}
	k.maskT[id] = t
	return t
}

// WriteKeptStep writes the step's inputs into k's graph (built for the
// key PrepareKeptStep returned for this step) and makes its outputs this
// pass's, for Computed after the compute.
func (c *Paged) WriteKeptStep(k *KeptInputs) error {
	p := c.plan
	if p == nil || len(k.masks) != len(p.reps) {
		return fmt.Errorf("kvcache: the kept step graph does not match this step's plan")
	}
	t0 := time.Now()
	for _, kc := range k.cells {
		copy(kc.dst, kc.g.cells)
	}
	P := c.L.PageSize
	for id, r := range p.reps {
		pl := r.g.pool
		mask := k.masks[id]
		if len(mask) != r.used*P*c.n {
			return fmt.Errorf("kvcache: the kept mask %d holds %d cells, the step attends to %d", id, len(mask)/c.n, r.used*P)
		}
		buildMaskInto(mask, pl, r.used, r.g.sel, r.g.tok, c.writes, c.store.Pages(), c.pos0, c.n, P)
		if r.g.Window > 0 {
			slideMask(mask, pl, r.used, c.pos0, c.n, P, r.g.Window)
		}
	}
	c.hostWrites.Add(int64(time.Since(t0)))
	c.readbacks[k.ctx] = k.readbacks
	for i := range k.ranks {
		k.ranks[i].upto = c.upto // the bounds score this step's pages
	}
	c.ranks[k.ctx] = k.ranks
	return nil
}
