package kvcache

/*
#include "ggml.h"
#include "ggml-backend.h"
*/
import "C"

import (
	"unsafe"

	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/ml/backend/ggml"
)

// HostUploads lets pools in host memory (the CPU backend) take their
// uploads as plain copies from the host pages at planning time, instead of
// through f16 input tensors copied inside the graph. Measured on the CPU
// backend (docs/kvcache.md, "What the copy costs"), nearly all of an
// in-graph upload's time was the fresh backend buffer ollama allocates for
// every input tensor (page faults on first touch), not the copy. Tests
// turn it off to check that both paths write the same bytes.
var HostUploads = true

// ggmlTensor mirrors ollama's ggml.Tensor (ml/backend/ggml, v0.17.4),
// whose fields are unexported: its second field is the ggml tensor. Only
// read by hostData, which checks what it finds against the tensor's shape
// before using it.
type ggmlTensor struct {
	b    unsafe.Pointer
	t    *C.struct_ggml_tensor
	sync func()
}

// syncTensor waits for the backend that computes t, as ollama's Floats
// and Bytes do before they read it: reading t's host memory in place
// (hostData) must not race an asynchronous compute.
func syncTensor(t ml.Tensor) {
	if gt, ok := t.(*ggml.Tensor); ok && gt != nil {
		if s := (*ggmlTensor)(unsafe.Pointer(gt)).sync; s != nil {
			s()
		}
	}
}

// hostMem returns t's data as f16 values if t is an f16 tensor of elems
// elements in host memory whose ggml shape is ollama's shape, else nil.
// Writes into it are seen by graphs computed later.
func hostMem(t ml.Tensor, elems int) []uint16 {
	if p := hostData(t, ml.DTypeF16, elems); p != nil {
		return unsafe.Slice((*uint16)(p), elems)
	}
	return nil
}

// hostF32 is hostMem for an f32 tensor (quest's key boxes, graphscore.go).
func hostF32(t ml.Tensor, elems int) []float32 {
	if p := hostData(t, ml.DTypeF32, elems); p != nil {
		return unsafe.Slice((*float32)(p), elems)
	}
	return nil
}

// hostData returns the data of t if t is a contiguous dtype tensor of
// elems elements in host memory whose ggml shape is ollama's shape, else
// nil.
func hostData(t ml.Tensor, dtype ml.DType, elems int) unsafe.Pointer {
	gt, ok := t.(*ggml.Tensor)
	if !ok || gt == nil || t.DType() != dtype {
		return nil
	}
	ct := (*ggmlTensor)(unsafe.Pointer(gt)).t
	if ct == nil || ct.buffer == nil || !bool(C.ggml_backend_buffer_is_host(ct.buffer)) {
		return nil
	}
	shape := t.Shape()
	n := 1
	for i, d := range shape {
		if int(ct.ne[i]) != d {
			return nil
		}
		n *= d
	}
	if n != elems || int(C.ggml_nelements(ct)) != elems || !bool(C.ggml_is_contiguous(ct)) || ct.data == nil {
		return nil
	}
	return ct.data
}

// writeHost copies a group's planned page uploads straight into its pool
// in host memory: keys token-major at the slot's cells, values into each
// channel's row of the permuted V ([cells, headDim, heads]: channel ch of
// cell c at ch·cells + c). The same bytes the in-graph copies write.
func (c *Paged) writeHost(l int, g *group, ups []upload) {
	pl := g.pool
	r, P, cells := pl.row, c.L.PageSize, pl.slots*c.L.PageSize
	for _, u := range ups {
		pg := c.store.pages[l][u.page]
		at := u.slot * P
		// appendKeys appends into a slice of the pool of length 0 whose
		// capacity runs to the pool's end: it writes in place.
		c.appendKeys(pl.hk[at*r:at*r], g, pg.K, u.rows)
		for ch := 0; ch < r; ch++ {
			sc := c.channel(g, ch)
			copy(pl.hv[ch*cells+at:ch*cells+at+u.rows], pg.V[sc*P:sc*P+u.rows])
		}
	}
}
