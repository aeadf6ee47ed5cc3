package kvcache

import (
	"fmt"
	"time"

	"github.com/ollama/ollama/ml"

	"github.com/kvrecall/kvrecall/internal/backendmem"
	"github.com/kvrecall/kvrecall/paging"
)

// In-graph page scoring (issue 14). A selector that is paging.GraphScored
// (quest) has each decode step's Quest bounds computed inside the step's
// own graph instead of splitting the graph after every layer's q/k/v
// projections for a host round trip of the queries:
//
//	bound[page] = max over query heads h of [q_h; |q_h|] · [center; radius]_(page, kv(h))
//
// Each layer keeps its key boxes as a backend tensor, f32
// [2·headDim, pages, kvHeads] (the rows layerView.PackedBoxes packs on the
// host), updated in the graph only for pages whose summary changed since
// it was last uploaded (at decode, the page being written). The bound is
// one mul_mat per layer and the maximum over query heads is taken in the
// graph; only the per-page bounds come back with the graph's outputs (4
// bytes a page: 2 KiB per layer at 32k with 64-token pages), and choose
// the next step's pages on the host (the selector's lagged rule with its
// hysteresis, paging/graph.go, which needs the bounds of the pages it
// holds as well as of the best ones: not only a top-k).
//
// On a backend whose box tensor is in host memory (CPU; HostBounds) the
// changed boxes are written straight into it: no input buffer and no
// copies in the graph (docs/kvcache.md, "quest at the floor").

// HostBounds lets quest's box tensors in host memory (the CPU backend)
// take their box updates as plain writes when the graph is built, like
// HostUploads for the pools. Tests turn it off to check that both paths
// give the same bounds and pages.
var HostBounds = true

// BoxRowMultiple is what the rows of quest's mul_mat are rounded up to:
// ggml's CPU backend multiplies f32 matrices with tinyBLAS only when the
// rows are a multiple of 4 (16 for its widest tiles), else with one dot
// product call per page and head, 1.6x the time at 1025 pages
// (BenchmarkQuestScores). Extra rows are the box tensor's headroom; their
// bounds are computed and dropped. Tests and benchmarks set 1 (the old
// behaviour) to compare; set it before a cache's first pass.
var BoxRowMultiple = 16

// boxTensor is one layer's key boxes in backend memory.
type boxTensor struct {
	id    uint64 // distinct for every box tensor made (kept step graphs)
	ctx   ml.Context
	t     ml.Tensor    // f32 [2·headDim, cap, kvHeads]
	host  []float32    // t's data when it is in host memory, else nil
	cap   int          // pages it has room for, a multiple of BoxRowMultiple
	state []packedPage // per page: the summary state its rows hold

	// Which pages the next upload must look at: every page when the
	// store's epoch is not epoch, else pages from scanFrom on (the store
	// only appended since: Store.epoch). Looking at every page each step
	// read each page's header, scattered between the pages' K and V, for
	// every page, layer and KV head: the part of quest's step that grew
	// with the document (docs/kvcache.md).
	epoch    uint64
	scanFrom int
	buf      []float32 // the changed rows, reused
}

// rankOut is the page bounds (or, for a CentroidScored selector, the
// [heads][k] centroid scores) a graph computes, read back after it ran.
type rankOut struct {
	layer  int
	upto   int
	pages  int
	scores ml.Tensor // f32 [pages]
}

// graphScoring reports whether layer's bounds are computed in this pass's
// graph.
func (c *Paged) graphScoring(layer int) bool {
	gs, isGS := c.opt.Selector.(paging.GraphScored)
	if !isGS || !c.graphScores {
		return false
	}
	// Quest's boxes are one group's (every KV head's) rows; centroid
	// scores are per KV head and fit any groups.
	if _, cs := gs.(paging.CentroidScored); !cs && c.single(layer) == nil {
		return false
	}
	return gs.GraphScores(layer, c.n, c.upto)
}

// boxesFor returns layer's box tensor with room for pages pages, grown
// (doubling, then filled again) when it has not.
func (c *Paged) boxesFor(layer, pages int) *boxTensor {
	if c.boxes == nil {
		c.boxes = make([]*boxTensor, c.L.Layers)
	}
	bt := c.boxes[layer]
	if bt != nil && bt.cap >= pages {
		return bt
	}
	if bt != nil {
		bt.ctx.Close()
	}
	// A quarter of headroom: a decode step that opens a new page must not
	// grow (and re-upload) a tensor sized to the question's end. Rows in
	// multiples of BoxRowMultiple, so that the padded mul_mat fits.
	capacity := roundUp(max(64, pages+pages/4), BoxRowMultiple)
	if bt != nil {
		capacity = max(capacity, 2*bt.cap)
	}
	bt = &boxTensor{id: graphObjects.Add(1), cap: capacity}
	elems := 2 * c.L.HeadDim * capacity * c.L.KVHeads
	backendmem.Do(func() {
		bt.ctx = c.b.NewContextSize(1).Layer(layer)
		bt.t = bt.ctx.Zeros(ml.DTypeF32, 2*c.L.HeadDim, capacity, c.L.KVHeads)
	})
	bt.host = hostF32(bt.t, elems)
	c.boxes[layer] = bt
	return bt
}

// roundUp rounds n up to a multiple of m.
func roundUp(n, m int) int { return (n + m - 1) / m * m }

// boxRows is the rows quest's mul_mat computes for pages pages of bt:
// pages rounded up to BoxRowMultiple, within bt's room.
func boxRows(bt *boxTensor, pages int) int {
	return min(bt.cap, roundUp(pages, BoxRowMultiple))
}

// scoreInGraph adds to ctx the upload of layer's changed key boxes and
// the bound of every page against q [headDim, heads, 1], which Computed
// hands to the selector.
func (c *Paged) scoreInGraph(ctx ml.Context, layer int, q ml.Tensor) {
	if cs, ok := c.opt.Selector.(paging.CentroidScored); ok {
		c.centroidScores(ctx, layer, cs, q)
		return
	}
	view := c.layers[layer].view
	pages := min(view.Pages(), paging.PagesOf(c.upto, c.L.PageSize))
	if pages == 0 {
		return
	}
	bt := c.boxesFor(layer, pages)
	host := HostBounds && bt.host != nil
	c.uploadBoxes(ctx, layer, bt, pages, host)
	rows := boxRows(bt, pages)
	s := questHeadScores(ctx, bt.t, q, rows) // [rows, heads]
	out := ctx.Input().Empty(ml.DTypeF32, pages)
	ctx.Forward(maxHeadsGraph(ctx, s, pages).Copy(ctx, out))
	c.ranks[ctx] = append(c.ranks[ctx], rankOut{layer: layer, upto: c.upto, pages: pages, scores: out})
}

// uploadBoxes copies the rows of pages whose summary changed since they
// were uploaded into bt: with host set, written straight into bt's host
// memory; else one input tensor for all of them and one copy per run of
// consecutive pages and KV head in ctx's graph. Only the pages the store
// may have changed are looked at (boxTensor.epoch); the rows are the
// layout layerView.PackedBoxes packs, [center; radius] per KV head, read
// from the pages directly.
func (c *Paged) uploadBoxes(ctx ml.Context, layer int, bt *boxTensor, pages int, host bool) {
	s := c.store
	hd, hd2, kvh := c.L.HeadDim, 2*c.L.HeadDim, c.L.KVHeads
	if len(bt.state) < pages {
		bt.state = append(bt.state, make([]packedPage, pages-len(bt.state))...)
	}
	from := 0
	if bt.epoch == s.epoch {
		from = min(bt.scanFrom, pages)
	}
	bt.epoch, bt.scanFrom = s.epoch, min(s.Len()/c.L.PageSize, pages)
	if host {
		t0 := time.Now()
		defer func() { c.hostWrites.Add(int64(time.Since(t0))) }()
	}
	type run struct{ first, n int }
	var runs []run
	total := 0
	for p := from; p < pages; p++ {
		pg := s.pages[layer][p]
		if pg == nil || bt.state[p] == (packedPage{pg, pg.gen}) {
			continue
		}
		bt.state[p] = packedPage{pg, pg.gen}
		if host {
			// Seen by this pass's graph, computed after it is built.
			for g := 0; g < kvh; g++ {
				row := bt.host[(g*bt.cap+p)*hd2:]
				copy(row[:hd], pg.Center[g*hd:(g+1)*hd])
				copy(row[hd:hd2], pg.Radius[g*hd:(g+1)*hd])
			}
			continue
		}
		if len(runs) > 0 && runs[len(runs)-1].first+runs[len(runs)-1].n == p {
			runs[len(runs)-1].n++
		} else {
			runs = append(runs, run{p, 1})
		}
		total++
	}
	if total == 0 {
		return
	}
	// buf: for each KV head, the runs' rows in order.
	buf := bt.buf[:0]
	for g := 0; g < kvh; g++ {
		for _, r := range runs {
			for p := r.first; p < r.first+r.n; p++ {
				pg := s.pages[layer][p]
				buf = append(buf, pg.Center[g*hd:(g+1)*hd]...)
				buf = append(buf, pg.Radius[g*hd:(g+1)*hd]...)
			}
		}
	}
	bt.buf = buf
	c.unwaitedBoxes = append(c.unwaitedBoxes, bt) // rows this graph copies (unstage)
	in := ctx.Input().FromFloats(buf, hd2*total*kvh)
	off := 0
	for g := 0; g < kvh; g++ {
		for _, r := range runs {
			src := in.View(ctx, off*4, hd2*r.n)
			dst := bt.t.View(ctx, (g*bt.cap+r.first)*hd2*4, hd2*r.n)
			ctx.Forward(src.Copy(ctx, dst))
			off += hd2 * r.n
		}
	}
}

// questHeadScores returns Quest's bound of the first rows pages of boxes
// for each query head of a single query token: boxes f32 [2·headDim, cap,
// kvHeads] (rows [center; radius]), q [headDim, heads, 1] with query head
// h reading KV head h / (heads/kvHeads). Result: f32 [rows, heads].
func questHeadScores(ctx ml.Context, boxes, q ml.Tensor, rows int) ml.Tensor {
	hd, heads := q.Dim(0), q.Dim(1)
	kvh := boxes.Dim(2)
	// |q| = relu(q) + relu(-q), exactly (one of the two is zero). ollama's
	// RELU is ggml_relu_inplace: it runs on copies (q·1 and -q), never on
	// q, which attention reads next.
	aq := q.Scale(ctx, 1).RELU(ctx).Add(ctx, q.Neg(ctx).RELU(ctx))
	qq := q.Concat(ctx, aq, 0).Reshape(ctx, 2*hd, heads/kvh, kvh) // [2hd, group, kvh]
	b := boxes.View(ctx, 0, 2*hd, boxes.Stride(1), rows, boxes.Stride(2), kvh)
	return b.Mulmat(ctx, qq).Reshape(ctx, rows, heads) // s[p, h]
}

// maxHeadsGraph returns the maximum over heads of the first pages rows of
// s [rows, heads] in the graph, halving: max(a, b) = b + relu(a - b),
// within a rounding of the larger (ggml has no elementwise maximum).
// Result: f32 [pages]. (Reading [rows, heads] back and taking the
// maximum on the host was slower on the CPU backend: 8x the bytes copied
// out, BenchmarkQuestScores.)
func maxHeadsGraph(ctx ml.Context, s ml.Tensor, pages int) ml.Tensor {
	rows := s.Dim(0)
	for n := s.Dim(1); n > 1; {
		half := n / 2
		a := s.View(ctx, 0, rows, s.Stride(1), half)
		bb := s.View(ctx, (n-half)*s.Stride(1), rows, s.Stride(1), half)
		m := bb.Add(ctx, a.Sub(ctx, bb).RELU(ctx)) // [rows, half]; the relu runs in place on a-b
		if n%2 == 1 {
			m = m.Concat(ctx, s.View(ctx, half*s.Stride(1), rows, s.Stride(1), 1), 1)
		}
		s, n = m, half+n%2
	}
	return s.View(ctx, 0, pages)
}

// centTensor is one layer's centroids (paging.CentroidScored) in backend
// memory.
type centTensor struct {
	ctx     ml.Context
	t       ml.Tensor // f32 [headDim, k, kvHeads]
	k       int
	version uint64
}

// centroidsFor returns layer's centroid tensor, uploaded again (a new
// tensor) when the selector's version of them changed.
func (c *Paged) centroidsFor(layer int, cs paging.CentroidScored) (*centTensor, error) {
	if c.cents == nil {
		c.cents = make([]*centTensor, c.L.Layers)
	}
	rows, k, version := cs.Centroids(layer)
	ct := c.cents[layer]
	if ct != nil && ct.version == version && ct.k == k {
		return ct, nil
	}
	if k <= 0 || len(rows) != k*c.L.KVHeads*c.L.HeadDim {
		return nil, fmt.Errorf("kvcache: %s gave %d centroid floats for layer %d, want %d rows of %d for each of %d KV heads", c.opt.Selector.Name(), len(rows), layer, k, c.L.HeadDim, c.L.KVHeads)
	}
	if ct != nil {
		ct.ctx.Close()
	}
	ct = &centTensor{k: k, version: version}
	backendmem.Do(func() {
		ct.ctx = c.b.NewContextSize(1).Layer(layer)
		ct.t = ct.ctx.FromFloats(rows, c.L.HeadDim, k, c.L.KVHeads)
	})
	c.cents[layer] = ct
	return ct, nil
}

// centroidScores adds to ctx every query head's product with its KV
// head's centroids, q [headDim, heads, 1] against the layer's centroid
// tensor [headDim, k, kvHeads] (query head h reads KV head h / (heads /
// kvHeads)): one mul_mat, f32 [k, heads/kvHeads, kvHeads], which Computed
// hands to the selector as [heads][k].
func (c *Paged) centroidScores(ctx ml.Context, layer int, cs paging.CentroidScored, q ml.Tensor) {
	ct, err := c.centroidsFor(layer, cs)
	if err != nil {
		panic(err) // a selector handing rows of the wrong shape is a bug, as a bad selection's shape is
	}
	hd, heads, kvh := q.Dim(0), q.Dim(1), c.L.KVHeads
	qq := q.Contiguous(ctx).Reshape(ctx, hd, heads/kvh, kvh)
	s := ct.t.Mulmat(ctx, qq) // [k, group, kvh]
	out := ctx.Input().Empty(ml.DTypeF32, ct.k*heads)
	ctx.Forward(s.Reshape(ctx, ct.k*heads).Copy(ctx, out))
	c.ranks[ctx] = append(c.ranks[ctx], rankOut{layer: layer, upto: c.upto, pages: ct.k * heads, scores: out})
}

// readRanks hands the bounds computed in ctx's graph to the selector.
func (c *Paged) readRanks(ctx ml.Context) error {
	rs := c.ranks[ctx]
	delete(c.ranks, ctx)
	gs, ok := c.opt.Selector.(paging.GraphScored)
	if !ok {
		return nil
	}
	for _, r := range rs {
		// The bounds are read where the graph wrote them when that is
		// host memory (ollama puts every input tensor, this output
		// among them, in CPU memory, whatever computes the graph):
		// Floats would allocate and copy 4 bytes a page per layer (4 KiB
		// at 64k) for Scored to copy again, and a decode step's fresh Go
		// memory costs page faults (docs/kvcache.md, "quest at 64k").
		// The backend is synced first, as Floats does. Scored copies what
		// it keeps: f is not held.
		syncTensor(r.scores)
		f := hostF32(r.scores, r.pages)
		if f == nil {
			f = r.scores.Floats()
		}
		if len(f) != r.pages {
			return fmt.Errorf("kvcache: read back %d page bounds of layer %d, want %d", len(f), r.layer, r.pages)
		}
		gs.Scored(r.layer, f, r.upto)
	}
	return nil
}
