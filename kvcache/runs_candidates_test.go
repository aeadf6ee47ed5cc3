package kvcache

import (
	"fmt"

	"github.com/ollama/ollama/ml"
)

// The two graph-op candidates for issue 14's CPU no-copy read path,
// kept as test code: BenchmarkAttentionInPlace and the exactness tests
// measure them against the pool (docs/kvcache.md, "Reading pages in
// place, measured"). Neither is wired into Paged: both lost to the pool
// with host copies on the measured shapes, and both would need the host
// pages in per-layer ggml arenas. They live in a _test file so that no
// unused code ships in the package.

// kSpan is a run of consecutive cells of a key arena that attention reads
// in place, without copying them into a pool: cells [first, first+n) of
//
//	t: [headDim, kvHeads, cells] f16 (token-major, as a pool's K).
//
// A page of a document's arena is P cells, so a run of consecutive pages
// is one span.
type kSpan struct {
	t        ml.Tensor
	first, n int
}

// vSpan is n consecutive cells of values read in place: the view [n,
// headDim, kvHeads] at byte offset off of t, with row strides nb1 (between
// channels) and nb2 (between KV heads). mul_mat reads a span's cells of one
// channel contiguously, so values must be channel-major within a span:
//
//   - an arena channel-major over all its cells, [cells, headDim, kvHeads]
//     (a pool's permuted V): a run of pages is one span (vCells);
//   - an arena of pages each channel-major, [P, headDim, kvHeads, pages]
//     (a host Page's V as it is today): a span per page (vPage).
type vSpan struct {
	t            ml.Tensor
	off, n       int
	nb1, nb2     int
	heads, chans int
}

// vCells spans cells [first, first+n) of v [cells, headDim, kvHeads].
func vCells(v ml.Tensor, first, n int) vSpan {
	return vSpan{t: v, off: first * v.Stride(0), n: n, nb1: v.Stride(1), nb2: v.Stride(2), chans: v.Dim(1), heads: v.Dim(2)}
}

// vPage spans cells [from, from+n) of page of v [P, headDim, kvHeads, pages].
func vPage(v ml.Tensor, page, from, n int) vSpan {
	return vSpan{t: v, off: page*v.Stride(3) + from*v.Stride(0), n: n, nb1: v.Stride(1), nb2: v.Stride(2), chans: v.Dim(1), heads: v.Dim(2)}
}

// runAttention is scaled dot-product attention of q [headDim, heads,
// batch] over a sequence of cells read in place, given twice: as key spans
// ks and as value spans vs (two partitions of the same cells in the same
// order; they may cut it differently), with mask [cells, batch] (0 or
// -Inf, cells in that order). It returns [headDim, heads, batch] as
// ggml's SDPA without flash attention does.
//
// The softmax is exact, not a log-sum-exp merge of per-run softmaxes: each
// key span's scores K_r·q [n_r, batch, heads] are written into one score
// tensor [cells, batch, heads] (the first by padding it, the others with
// set_inplace, so scores are copied once and no backend buffer is
// allocated), one softmax runs over all of them, and each value span is
// weighted by a view of the probabilities, V_r·p_r [headDim, batch,
// heads], and the products summed. So a key span costs two graph ops (a
// mul_mat and a set), a value span two (a mul_mat and an add). Against
// attention over a pool holding the same cells in the same order, only the
// values' sum is split at span boundaries (float rounding); with one span
// each it is the same computation.
func runAttention(ctx ml.Context, q ml.Tensor, ks []kSpan, vs []vSpan, mask ml.Tensor, scale float64) ml.Tensor {
	if len(ks) == 0 || len(vs) == 0 {
		panic("kvcache: attention over no cells")
	}
	cells, vcells := 0, 0
	for _, r := range ks {
		cells += r.n
	}
	for _, r := range vs {
		vcells += r.n
	}
	if vcells != cells {
		panic(fmt.Sprintf("kvcache: %d key cells but %d value cells", cells, vcells))
	}
	if mask != nil && mask.Dim(0) != cells {
		panic(fmt.Sprintf("kvcache: a mask of %d cells for %d cells", mask.Dim(0), cells))
	}
	// mul_mat converts an f32 operand to f16 for f16 keys and values; do it
	// once for the query and the probabilities instead of once per span.
	f16 := ks[0].t.DType() == ml.DTypeF16
	query := q.Permute(ctx, 0, 2, 1, 3) // [headDim, batch, heads]
	if f16 {
		query = query.Cast(ctx, ml.DTypeF16)
	}
	var scores ml.Tensor // [cells, batch, heads] f32
	off := 0
	for _, r := range ks {
		k := r.t.View(ctx, r.first*r.t.Stride(2), r.t.Dim(0), r.t.Stride(1), r.t.Dim(1), r.t.Stride(2), r.n)
		kq := k.Permute(ctx, 0, 2, 1, 3).MulmatFullPrec(ctx, query) // [n, batch, heads]
		if scores == nil {
			scores = kq.Pad(ctx, cells-r.n, 0, 0, 0)
		} else {
			scores = scores.SetInplace(ctx, kq, scores.Stride(1), scores.Stride(2), scores.Stride(3), off*scores.Stride(0))
		}
		off += r.n
	}
	// soft_max_ext(s, mask, scale) computes s·scale + mask, then the
	// softmax, in f32: the same values as these three ops.
	p := scores.Scale(ctx, scale)
	if mask != nil {
		p = p.Add(ctx, mask)
	}
	p = p.Softmax(ctx)
	if vs[0].t.DType() == ml.DTypeF16 {
		p = p.Cast(ctx, ml.DTypeF16)
	}
	var out ml.Tensor // [headDim, batch, heads]
	off = 0
	for _, r := range vs {
		pr := p.View(ctx, off*p.Stride(0), r.n, p.Stride(1), p.Dim(1), p.Stride(2), p.Dim(2))
		v := r.t.View(ctx, r.off, r.n, r.nb1, r.chans, r.nb2, r.heads)
		o := v.Mulmat(ctx, pr)
		if out == nil {
			out = o
		} else {
			out = out.Add(ctx, o)
		}
		off += r.n
	}
	return out.Permute(ctx, 0, 2, 1, 3).Contiguous(ctx)
}

// cellRun is cells [first, first+n) of an arena whose cell c is position c.
type cellRun struct{ first, n int }

// pageRuns turns a sorted page list into runs of consecutive cells of an
// arena whose cell c is position c (a document's pages in order), each
// page contributing fill(p) cells: a run ends after a partial page.
func pageRuns(pages []int, P int, fill func(page int) int) []cellRun {
	var runs []cellRun
	for i, p := range pages {
		n := fill(p)
		if n == 0 {
			continue
		}
		if i > 0 && len(runs) > 0 {
			last := &runs[len(runs)-1]
			if pages[i-1] == p-1 && last.first+last.n == p*P {
				last.n += n
				continue
			}
		}
		runs = append(runs, cellRun{first: p * P, n: n})
	}
	return runs
}

// gatherPages reads the pages listed in idx from page-major arenas, one
// get_rows per K and V, into the layout attention reads:
//
//	kArena: [row·P, pages] f16, a column per page: Page.K ([P][row], token-major)
//	vArena: [P, row·pages] f16, a row per page and channel: Page.V ([row][P])
//	idx:    [n] i32, the pages (any order: it is the cells' order)
//	vidx:   [n·row] i32, entry ch·n+i = idx[i]·row + ch
//
// and returns k [headDim, kvHeads, n·P] and v [n·P, headDim, kvHeads], both
// f32 (ggml's get_rows writes f32; f16 values convert exactly). Values come
// out channel-major over all n·P cells with no permute: row ch·n+i of the
// V gather is channel ch of the i-th page. A page's cells past its fill
// are whatever the arena holds there (zeros from a fresh arena); the mask
// must hide them.
func gatherPages(ctx ml.Context, kArena, vArena, idx, vidx ml.Tensor, L Layout) (ml.Tensor, ml.Tensor) {
	n, P := idx.Dim(0), L.PageSize
	k := kArena.Rows(ctx, idx).Reshape(ctx, L.HeadDim, L.KVHeads, n*P)
	v := vArena.Rows(ctx, vidx).Reshape(ctx, n*P, L.HeadDim, L.KVHeads)
	return k, v
}

// gatherIndex returns gatherPages' idx and vidx for pages.
func gatherIndex(pages []int, row int) (idx, vidx []int32) {
	n := len(pages)
	idx = make([]int32, n)
	vidx = make([]int32, n*row)
	for i, p := range pages {
		idx[i] = int32(p)
		for ch := 0; ch < row; ch++ {
			vidx[ch*n+i] = int32(p*row + ch)
		}
	}
	return idx, vidx
}
