package kvcache

/*
#include <stdint.h>
#include "ggml.h"
*/
import "C"

import (
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"unsafe"
	"weak"

	"github.com/ollama/ollama/ml/backend/ggml"

	"github.com/kvrecall/kvrecall/paging"
)

// Selection inside the graph (issue 14: squeezed's decode step at 1b).
//
// A method that chooses tokens from the step's own queries (squeezed's
// per-step centroid lookup) made arch.Model.Run split the pass at every
// such layer: a graph up to the layer's q/k/v, the queries copied to the
// host, the selection, then a new graph for the attention and the rest
// (runtime/arch/model.go). At 1b that was 17 graphs a step, each built,
// allocated and computed apart: ~5 ms of squeezed's step (docs/squeezed.md).
//
// Where the layer op attends the layer (a one-token pass, every group
// staged: layerOp), the graph's shape does not depend on the selection
// (the op's output is [headDim, heads, 1] whatever it reads; what it reads
// is in its params). So the selection can run inside the graph instead:
// a custom op (kvr_select, n_tasks 1) takes the layer's queries, calls
// back into Go on the thread that computes the graph (the goroutine that
// asked for the compute is blocked in that cgo call, so the cache is not
// used concurrently), which selects (SetQueries) and fills the layer op's
// params (prepareLayer); the layer op depends on it and runs next. The
// pass is one graph. NeedQueries then says no for those layers.
//
// The selector runs while the backend computes this graph (its scheduler
// held): a selector called in the graph must not compute on the backend
// itself (none does: squeezed scores on the host, or reads the scores
// this graph computed before the selection op, paging.StepScored), or it
// would wait for itself.
//
// Not for softcapped attention (Options.AttnSoftcap: attended group by
// group, whose views need the selection when the graph is built), nor
// for passes of more than one token (the question: staged, split).

// SelectInGraph makes one-token passes of layers attended by the layer op
// select inside the graph (above) instead of splitting the pass. On by
// default; tests turn it off to compare with the split pass.
var SelectInGraph = true

// selectInGraph reports whether layer's one-token pass selects inside the
// graph: SelectInGraph, no softcap, and the layer op attends it.
func (c *Paged) selectInGraph(layer int) bool {
	return SelectInGraph && c.opt.AttnSoftcap == 0 && c.layerOp(layer)
}

// inGraphCaches maps a cache's id to the cache, for the selection op's
// callback (C holds the id, not a Go pointer). Weak: a cache nobody
// holds is collected, and its entry removed with it.
var (
	inGraphCaches sync.Map // uint64 -> weak.Pointer[Paged]
	inGraphIDs    atomic.Uint64
)

// selectLayerBits is how many low bits of a selection op's key hold the
// layer.
const selectLayerBits = 16

// selectKey is the selection op's key for layer: the cache's id and the
// layer.
func (c *Paged) selectKey(layer int) uint64 {
	if layer >= 1<<selectLayerBits {
		panic(fmt.Sprintf("kvcache: layer %d: too many layers for a selection in the graph", layer))
	}
	if c.gid == 0 {
		c.gid = inGraphIDs.Add(1)
		inGraphCaches.Store(c.gid, weak.Make(c))
		runtime.AddCleanup(c, func(id uint64) { inGraphCaches.Delete(id) }, c.gid)
	}
	return c.gid<<selectLayerBits | uint64(layer)
}

// kvrSelect is the selection op's callback (kvr_select in inplace.go): it
// reads the layer's roped queries from q (f32 [headDim, heads, 1]), selects
// (SetQueries) and fills the layer op's params. An error (or a panic) is
// kept for Computed, which returns it for the pass; the layer's params
// then list nothing.
//
//export kvrSelect
func kvrSelect(key C.uint64_t, q, scores *C.struct_ggml_tensor) (ret C.int) {
	id, layer := uint64(key)>>selectLayerBits, int(uint64(key)&(1<<selectLayerBits-1))
	wp, ok := inGraphCaches.Load(id)
	if !ok {
		return 1 // unreachable: the cache computing the graph is alive
	}
	c := wp.(weak.Pointer[Paged]).Value()
	if c == nil {
		return 1
	}
	defer func() {
		if r := recover(); r != nil {
			c.failInGraph(layer, fmt.Errorf("kvcache: layer %d's selection in the graph: %v", layer, r))
			ret = 1
		}
	}()
	hd, heads := int(q.ne[0]), int(q.ne[1])
	if q._type != C.GGML_TYPE_F32 || hd != c.L.HeadDim || heads != c.opt.Heads || q.ne[2] != 1 || int(q.nb[0]) != 4 {
		c.failInGraph(layer, fmt.Errorf("kvcache: layer %d's selection in the graph got queries %v of type %d, want f32 [%d, %d, 1]", layer, [3]int64{int64(q.ne[0]), int64(q.ne[1]), int64(q.ne[2])}, int(q._type), c.L.HeadDim, c.opt.Heads))
		return 1
	}
	// A fresh row per layer and step, as a split pass hands over: a
	// selector may keep its queries (paging.Queries says nothing against).
	row := make([]float32, hd*heads)
	for h := range heads {
		src := unsafe.Slice((*float32)(unsafe.Add(q.data, uintptr(h)*uintptr(q.nb[1]))), hd)
		copy(row[h*hd:(h+1)*hd], src)
	}
	var sc []float32
	if scores != nil {
		// [k, heads/kvHeads, kvHeads] from kvr_step_scores: read where the
		// graph put them for this CPU op (host memory: the CPU backend's,
		// or the scheduler's copy from a GPU layer's), during the
		// selection only (paging.Queries.Scores).
		n := int(scores.ne[0] * scores.ne[1] * scores.ne[2] * scores.ne[3])
		if scores._type != C.GGML_TYPE_F32 || int(scores.ne[1]*scores.ne[2]) != heads || scores.ne[3] != 1 ||
			int(scores.nb[0]) != 4 || int(scores.nb[1]) != 4*int(scores.ne[0]) || int(scores.nb[2]) != 4*int(scores.ne[0]*scores.ne[1]) {
			c.failInGraph(layer, fmt.Errorf("kvcache: layer %d's centroid scores in the graph are %v of type %d, want f32 [k, %d, %d] contiguous", layer, [4]int64{int64(scores.ne[0]), int64(scores.ne[1]), int64(scores.ne[2]), int64(scores.ne[3])}, int(scores._type), heads/c.L.KVHeads, c.L.KVHeads))
			return 1
		}
		sc = unsafe.Slice((*float32)(scores.data), n)
	}
	if err := c.setQueries(layer, [][]float32{row}, sc); err != nil {
		c.failInGraph(layer, err)
		return 1
	}
	c.prepareLayer(layer, false)
	c.graphSelections.Add(1)
	if sc != nil {
		c.stepScored.Add(1)
	}
	return 0
}

// stepCentroids returns layer's centroid tensor (f32 [headDim, k,
// kvHeads]) when its selector takes a one-token pass's own scores from
// the graph (paging.StepScored), else nil.
func (c *Paged) stepCentroids(layer int) *C.struct_ggml_tensor {
	ss, ok := c.opt.Selector.(paging.StepScored)
	if !ok || !ss.StepScores(layer) {
		return nil
	}
	ct, err := c.centroidsFor(layer, ss)
	if err != nil {
		panic(err) // a selector handing rows of the wrong shape is a bug, as a bad selection's shape is
	}
	gt, ok := ct.t.(*ggml.Tensor)
	if !ok {
		panic(fmt.Sprintf("kvcache: layer %d's centroids are a %T, not a ggml tensor", layer, ct.t))
	}
	return (*ggmlTensor)(unsafe.Pointer(gt)).t
}

// failInGraph keeps the first error of a selection in the graph for
// Computed, empties the layer's params and forgets its selection.
func (c *Paged) failInGraph(layer int, err error) {
	if c.graphErr == nil {
		c.graphErr = err
	}
	c.emptyLayer(layer)
	// A selection refused half-way leaves some groups selected: forget
	// it, as the next pass's start would (the cache stays consistent for
	// CheckInvariants meanwhile).
	for _, g := range c.layers[layer].groups {
		g.forgetPass()
	}
}

// prebuildOrdered makes sure the ordered copies layer's staged groups
// read exist before the graph is computed: the selection inside the graph
// would otherwise build them on ggml's thread 0 (seconds at 1b, the
// document's first step) while the other threads spin at the graph's
// barrier. The order needs no queries. Errors are left to the selection
// (setStaged reports them for the pass that reads the copy).
func (c *Paged) prebuildOrdered(layer int) {
	to, ok := c.opt.Selector.(paging.TokenOrdered)
	if !ok {
		return
	}
	for i, g := range c.layers[layer].groups {
		if !g.staged {
			continue
		}
		order, _ := to.TokenOrder(layer, i)
		if len(order) == 0 || len(order) > c.pos0 {
			continue // setStaged takes no copy either
		}
		if g.okey == "" {
			g.okey = fmt.Sprint(g.heads)
		}
		_, _ = c.store.orderedFor(layer, g.heads, g.okey, order)
	}
}
