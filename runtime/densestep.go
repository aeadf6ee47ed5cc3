package runtime

/*
#include "ggml.h"
#include "ggml-backend.h"

// kvr_placed lists in out (up to cap) the tensors of graph gf that ggml's
// scheduler will place: the nodes and their sources without memory when
// the graph is built (intermediate results, and views of them). Inputs,
// the KV cache and views of it, and weights have memory already. A tensor
// may be listed more than once. Returns how many there are, or -1 when a
// tensor with memory is not in a host buffer: then the scheduler may run
// the graph on more than one backend, and its split rewrites node sources
// in place to copies in its own context, which a reset frees (llama.cpp
// does not reuse a graph across a scheduler reset for this reason), so a
// kept graph would read freed copies.
static int kvr_placed(struct ggml_cgraph * gf, struct ggml_tensor ** out, int cap) {
	int n = 0;
	for (int i = 0; i < ggml_graph_n_nodes(gf); i++) {
		struct ggml_tensor * node = ggml_graph_node(gf, i);
		for (int j = -1; j < GGML_MAX_SRC; j++) {
			struct ggml_tensor * t = j < 0 ? node : node->src[j];
			if (t == NULL) {
				continue;
			}
			if (t->data == NULL && t->buffer == NULL) {
				if (n < cap) {
					out[n] = t;
				}
				n++;
			} else {
				// A view made of a tensor with memory has its data
				// but gets its buffer only when allocated.
				ggml_backend_buffer_t b = t->buffer;
				if (b == NULL && t->view_src != NULL) {
					b = t->view_src->buffer;
				}
				if (b == NULL || !ggml_backend_buffer_is_host(b)) {
					return -1;
				}
			}
		}
	}
	return n;
}

// kvr_release forgets where the scheduler placed the tensors ts: no data
// and no buffer again, as when they were built, so that the next compute
// places them anew. Their old buffer is not looked at: another graph may
// have freed it.
static void kvr_release(struct ggml_tensor ** ts, int n) {
	for (int i = 0; i < n; i++) {
		ts[i]->data = NULL;
		ts[i]->buffer = NULL;
	}
}
*/
import "C"

import (
	"errors"
	"fmt"
	"unsafe"

	ollamakv "github.com/ollama/ollama/kvcache"
	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/ml/backend/ggml"

	"github.com/kvrecall/kvrecall/runtime/arch"
)

// denseStepGraphs makes new DenseCache caches keep the graph of a one-token
// step across steps (stepGraph). Tests turn it off to compare against a
// graph built for every step.
var denseStepGraphs = true

// stepGraphHostOnly false makes every step graph count as one that is not
// all in host buffers, so that tests take the fallback a multi-backend
// scheduler takes.
var stepGraphHostOnly = true

// errStepGraphBackends: the step graph reads a tensor outside host memory,
// so ggml's scheduler may split it across backends and rewrite its
// sources (kvr_placed). The cache then stops keeping graphs and its steps
// are built one by one (arch.Run).
var errStepGraphBackends = errors.New("the step graph is not all in host memory; not kept")

// stepGraph is the graph of a one-token decode step on DenseCache's own
// cache, kept across steps, as llama.cpp keeps its graph. Every step that
// attends to the same cells (the cells in use padded to CachePadding, 256
// on ggml: a run of up to 256 steps) has the same graph: its token and
// position are read from two I32 [1] input tensors written before each
// compute, the cell it writes is that position (cell i holds position i),
// and its mask is a view of the cache's persistent row, whose changed cell
// is written on the host. A step then costs two 4-byte writes, one mask
// cell, and the compute, instead of building ~160 ops through cgo, a new
// ggml context and two input buffers (the token, the logits' copy)
// (docs/performance.md, "Dense decode at 2k: a kept step graph"). The
// kept context holds ollama's maximum graph size (max(1024, 32 per model
// tensor) nodes: ~0.5 MB on the tiny preset, ~2 MB on 1b, mostly never
// touched) for the cache's life.
//
// ollama's Context.Compute resets ggml's scheduler after every graph and
// all sessions share it, so another session's graph may reallocate the
// compute buffer between two steps: before each compute the graph's
// intermediate tensors are released (kvr_release: the tensors that had no
// memory when the graph was built, listed then; not "those in a compute
// buffer", which would read a buffer that may have been freed) and the
// scheduler places them again, as for a new graph. What is saved is the
// building, not the scheduler's split and allocation.
type stepGraph struct {
	ctx      ml.Context
	attended int       // the cells the step's query reads
	tokens   ml.Tensor // I32 [1]
	pos      ml.Tensor // I32 [1]: the position, and the cell to write
	logits   ml.Tensor // F32 [vocab, 1] in the graph's own buffer
	// placed are the tensors the scheduler places at each compute
	// (kvr_placed), released before it.
	placed []*C.struct_ggml_tensor
}

func (g *stepGraph) close() {
	if g != nil && g.ctx != nil {
		g.ctx.Close()
		g.ctx = nil
	}
}

// ggmlContext mirrors the first fields of ollama's ggml.Context
// (ml/backend/ggml, v0.17.4), which are unexported: the second is the ggml
// context, the third the graph Forward expands. buildStep checks what it finds (the first tensor of that
// context must be the graph's first input) before using it.
type ggmlContext struct {
	b     unsafe.Pointer
	ctx   *C.struct_ggml_context
	graph *C.struct_ggml_cgraph
}

// cTensor is a ggml tensor, for files of this package that use no cgo.
type cTensor = C.struct_ggml_tensor

// ggmlTensor mirrors ollama's ggml.Tensor, as kvcache's hostpool.go does.
type ggmlTensor struct {
	b unsafe.Pointer
	t *C.struct_ggml_tensor
}

// rawTensor returns the ggml tensor of t, checking its shape against
// ollama's.
func rawTensor(t ml.Tensor) *C.struct_ggml_tensor {
	gt, ok := t.(*ggml.Tensor)
	if !ok || gt == nil {
		panic(fmt.Sprintf("dense cache: %T is not a ggml tensor", t))
	}
	raw := (*ggmlTensor)(unsafe.Pointer(gt)).t
	shape := t.Shape()
	for i := range 4 {
		want := 1
		if i < len(shape) {
			want = shape[i]
		}
		if raw == nil || int(raw.ne[i]) != want {
			panic(fmt.Sprintf("dense cache: ollama's ggml.Tensor layout is not the one this code reads (shape %v)", shape))
		}
	}
	return raw
}

// setF32 writes v into the F32 tensor t from element off on.
func setF32(t ml.Tensor, off int, v []float32) {
	if len(v) == 0 {
		return
	}
	C.ggml_backend_tensor_set(rawTensor(t), unsafe.Pointer(&v[0]), C.size_t(off*4), C.size_t(len(v)*4))
}

// decodeStep computes a one-token step of token at the next cell through
// the kept graph, building it when the attended cells changed. Returns the
// logits, row-major [1][vocab].
func (c *denseCache) decodeStep(net *arch.Model, token int32, pos int32) ([]float32, int, error) {
	if int(pos) != c.n {
		return nil, 0, fmt.Errorf("%w: token 0 of the batch has position %d, the next cell is %d", errDenseOrder, pos, c.n)
	}
	if c.n+1 > c.cells {
		return nil, 0, fmt.Errorf("%w (cache: %d cells, %d used, batch: 1)", ollamakv.ErrKvCacheFull, c.cells, c.n)
	}
	attended := roundUp(c.n+1, c.config.CachePadding)
	if c.step == nil || c.step.attended != attended {
		c.step.close()
		c.step = nil
		g, err := c.buildStep(net, attended)
		if errors.Is(err, errStepGraphBackends) {
			c.keepGraph = false
		}
		if err != nil {
			return nil, 0, err
		}
		c.step = g
		c.stepBuilds++
	}
	g := c.step
	c.openRow(c.n + 1)
	g.tokens.FromInts([]int32{token})
	g.pos.FromInts([]int32{pos})
	releasePlaced(g.placed)
	g.ctx.Compute(g.logits)
	c.n++
	return g.logits.Floats(), g.logits.Dim(0), nil
}

// buildStep builds the graph of a one-token step that attends to the first
// attended cells.
func (c *denseCache) buildStep(net *arch.Model, attended int) (g *stepGraph, err error) {
	g = &stepGraph{ctx: c.backend.NewContext(), attended: attended}
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("dense cache: building the step graph: %v", r)
		}
		if err != nil {
			g.close()
			g = nil
		}
	}()
	in := g.ctx.Input()
	g.tokens = in.Empty(ml.DTypeI32, 1)
	g.pos = in.Empty(ml.DTypeI32, 1)
	if err := checkContextLayout(g.ctx, g.tokens); err != nil {
		return nil, err
	}
	// What Put and Get use while the graph is built (StartForward's
	// one-token case, with the position tensor for the arange's view).
	c.batch, c.attended, c.loc = 1, attended, g.pos
	c.mask = c.row.View(g.ctx, 0, attended) // [attended, 1]
	if c.config.MaskDType != ml.DTypeF32 {
		c.mask = c.mask.Cast(g.ctx, c.config.MaskDType)
	}
	out, err := net.StepGraph(g.ctx, g.tokens, g.pos, c)
	if err != nil {
		return nil, err
	}
	g.logits = in.Empty(ml.DTypeF32, out.Dim(0), out.Dim(1))
	g.ctx.Forward(out.Copy(g.ctx, g.logits))
	placed, err := placedTensors(g.ctx)
	if err != nil {
		return nil, err
	}
	g.placed = placed
	return g, nil
}

// placedTensors lists, once each, the tensors of ctx's graph that ggml's
// scheduler places at each compute (kvr_placed), to be released before
// each compute of a kept graph (releasePlaced). errStepGraphBackends when
// the graph reads a tensor outside host memory.
func placedTensors(ctx ml.Context) ([]*C.struct_ggml_tensor, error) {
	gc, ok := ctx.(*ggml.Context)
	if !ok {
		return nil, fmt.Errorf("step graph: %T is not a ggml context", ctx)
	}
	gf := (*ggmlContext)(unsafe.Pointer(gc)).graph
	if gf == nil {
		return nil, fmt.Errorf("step graph: ollama's ggml.Context layout is not the one this code reads (no graph)")
	}
	n := int(C.kvr_placed(gf, nil, 0))
	switch {
	case n < 0 || !stepGraphHostOnly:
		return nil, errStepGraphBackends
	case n == 0:
		return nil, fmt.Errorf("step graph: the graph has no tensors to compute")
	}
	all := make([]*C.struct_ggml_tensor, n)
	C.kvr_placed(gf, &all[0], C.int(n))
	seen := make(map[*C.struct_ggml_tensor]bool, n)
	var placed []*C.struct_ggml_tensor
	for _, t := range all {
		if !seen[t] {
			seen[t] = true
			placed = append(placed, t)
		}
	}
	return placed, nil
}

// releasePlaced forgets where the scheduler placed ts (kvr_release), so
// that the next compute places them anew.
func releasePlaced(ts []*C.struct_ggml_tensor) {
	if len(ts) > 0 {
		C.kvr_release(&ts[0], C.int(len(ts)))
	}
}

// checkContextLayout checks that ollama's ggml.Context of ctx is laid out
// as ggmlContext reads it: the first tensor of its ggml context is first,
// the step graph's first input.
func checkContextLayout(ctx ml.Context, first ml.Tensor) error {
	gc, ok := ctx.(*ggml.Context)
	if !ok {
		return fmt.Errorf("step graph: %T is not a ggml context", ctx)
	}
	raw := (*ggmlContext)(unsafe.Pointer(gc)).ctx
	if raw == nil || C.ggml_get_first_tensor(raw) != rawTensor(first) {
		return fmt.Errorf("step graph: ollama's ggml.Context layout is not the one this code reads")
	}
	return nil
}
