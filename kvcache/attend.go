package kvcache

/*
#cgo LDFLAGS: -lm
#include <stdint.h>
#include <stdlib.h>
int kvr_attend_supported(void);
void kvr_attend_pages(const float *q, int nq, int nkv, int hd, int P, int npages,
		const uint16_t *const *K, const uint16_t *const *V, const int *fill,
		float scale, float *scores, float *out);
*/
import "C"

import (
	"errors"
	"fmt"
	"runtime"
	"unsafe"
)

// attendPages is one query token's attention over host pages read where
// they are, by our own CPU kernel (attend_pages.c, F16C and FMA): no pool,
// no copy and no graph op per page. It is a measured candidate for issue
// 14's CPU read path (BenchmarkAttentionInPlace, "kernel"), not wired into
// Paged: using it needs a custom ggml op per layer (so that it runs inside
// the graph, after the layer's queries) and the batch's own keys.
//
//	q:   [heads][headDim] f32
//	ks:  per page, f16 keys [P][kvHeads·headDim] (Page.K)
//	vs:  per page, f16 values [kvHeads·headDim][P] (Page.V)
//	fill: per page, the tokens attended (its first fill[i])
//
// It returns [heads][headDim]. The pages' memory is pinned for the call
// (their addresses are handed to C in a C array).
func attendPages(L Layout, heads int, q []float32, ks, vs [][]uint16, fill []int, scale float32) ([]float32, error) {
	hd, kv, P := L.HeadDim, L.KVHeads, L.PageSize
	if C.kvr_attend_supported() == 0 {
		return nil, errors.New("kvcache: attendPages needs an x86 CPU with AVX2, FMA and F16C")
	}
	if hd%8 != 0 || heads%kv != 0 || heads/kv > 16 {
		return nil, fmt.Errorf("kvcache: attendPages needs a head dim that is a multiple of 8 (got %d) and at most 16 query heads per KV head (got %d/%d)", hd, heads, kv)
	}
	if len(q) != heads*hd || len(ks) != len(vs) || len(ks) != len(fill) || len(ks) == 0 {
		return nil, fmt.Errorf("kvcache: attendPages: %d query values for %d heads of %d, %d key pages, %d value pages, %d fills", len(q), heads, hd, len(ks), len(vs), len(fill))
	}
	cells := 0
	for i, n := range fill {
		if n < 1 || n > P || len(ks[i]) < n*L.Row() || len(vs[i]) < L.Row()*P {
			return nil, fmt.Errorf("kvcache: attendPages: page %d holds %d tokens", i, n)
		}
		cells += n
	}
	var pin runtime.Pinner
	defer pin.Unpin()
	n := len(ks)
	ptrs := (*[1 << 28]unsafe.Pointer)(C.malloc(C.size_t(2*n) * C.size_t(unsafe.Sizeof(uintptr(0)))))[: 2*n : 2*n]
	defer C.free(unsafe.Pointer(&ptrs[0]))
	cfill := make([]C.int, n)
	for i := range ks {
		pin.Pin(&ks[i][0])
		pin.Pin(&vs[i][0])
		ptrs[i], ptrs[n+i] = unsafe.Pointer(&ks[i][0]), unsafe.Pointer(&vs[i][0])
		cfill[i] = C.int(fill[i])
	}
	scores := make([]float32, heads*cells)
	out := make([]float32, heads*hd)
	C.kvr_attend_pages((*C.float)(&q[0]), C.int(heads), C.int(kv), C.int(hd), C.int(P), C.int(n),
		(**C.uint16_t)(unsafe.Pointer(&ptrs[0])), (**C.uint16_t)(unsafe.Pointer(&ptrs[n])), &cfill[0],
		C.float(scale), (*C.float)(&scores[0]), (*C.float)(&out[0]))
	return out, nil
}
