package kvcache

import (
	"fmt"
	"slices"
	"time"

	"github.com/ollama/ollama/ml"
)

// MaxUploadRuns bounds the copy runs uploads add to one graph: each run
// costs six tensors of the graph's context (two input views, two pool
// views, two copies), and ollama sizes that context for at least 1024. Uploads past it
// become one page scatter per pool. Both paths write the same bytes; tests
// change it to check that.
var MaxUploadRuns = 96

// planRuns sorts a group's uploads by slot and groups them into runs of
// consecutive slots (a run continues only after a whole page), and splits
// them into whole and partial pages for the scatter path.
func planRuns(ups []upload, P int) (runs [][]upload, full, partial []upload) {
	slices.SortFunc(ups, func(a, b upload) int { return a.slot - b.slot })
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
	return runs, full, partial
}

// emitUploads copies a group's pages host -> device. A pool in host memory
// (the CPU backend, HostUploads) takes them as plain copies now
// (writeHost). Otherwise they go inside the graph: uploads are grouped into runs of consecutive slots; each run is one f16
// input tensor of the pages' rows per K and V, copied into a view of the
// pool: contiguous for K, a strided (permuted) copy for V. Copies stay f16,
// so they cost about a memcpy. Past MaxUploadRuns runs in a graph, whole
// pages go up with one set_rows per K and V instead (scatterPages), which
// needs an f16 -> f32 -> f16 round trip but only a few graph nodes.
func (c *Paged) emitUploads(ctx ml.Context, l int, g *group) {
	ups := g.uploads
	if len(ups) == 0 {
		return
	}
	g.uploads = nil
	if HostUploads && g.pool.hk != nil {
		// A pool in host memory (the CPU backend): copy the pages in now,
		// with no input tensors and no graph ops.
		t0 := time.Now()
		c.writeHost(l, g, ups)
		c.hostWrites.Add(int64(time.Since(t0)))
	} else {
		for _, u := range ups { // filled by this graph (unstage)
			c.unwaited = append(c.unwaited, stagedCell{g.pool, u.slot, u.page})
		}
		if !c.deviceUploads(ctx, l, g, ups) {
			c.emitGraphUploads(ctx, l, g, ups)
		}
	}
	c.uploadCount.Add(int64(len(ups)))
	for _, u := range ups {
		c.uploadBytes.Add(int64(u.rows) * int64(g.pool.row) * 2 * 2)
	}
}

// emitGraphUploads copies ups into g's pool inside the graph: copy runs,
// or past MaxUploadRuns the page scatter.
func (c *Paged) emitGraphUploads(ctx ml.Context, l int, g *group, ups []upload) {
	runs, full, partial := planRuns(ups, c.L.PageSize)
	if used := c.graphRuns[ctx]; len(runs) > MaxUploadRuns-used {
		// Partial pages (at most the last page or two) keep their own copies:
		// a whole-page upload would overwrite the rows this batch's Put
		// writes into the same slot.
		c.scatterPages(ctx, l, g, full)
		var single [][]upload
		for _, u := range partial {
			single = append(single, []upload{u})
		}
		c.copyRuns(ctx, l, g, single)
	} else {
		c.graphRuns[ctx] = used + len(runs)
		c.copyRuns(ctx, l, g, runs)
	}
}

// appendKeys appends rows tokens of page's keys for g's heads, token-major
// as the pool lays them out. A group of every head copies the store rows
// whole.
func (c *Paged) appendKeys(dst []uint16, g *group, K []uint16, rows int) []uint16 {
	r := c.L.Row()
	if g.all {
		return append(dst, K[:rows*r]...)
	}
	hd := c.L.HeadDim
	for t := 0; t < rows; t++ {
		for _, h := range g.heads {
			dst = append(dst, K[t*r+h*hd:t*r+(h+1)*hd]...)
		}
	}
	return dst
}

// channel returns the store channel of g's pool channel ch (head-major,
// like a row of keys).
func (c *Paged) channel(g *group, ch int) int {
	if g.all {
		return ch
	}
	hd := c.L.HeadDim
	return g.heads[ch/hd]*hd + ch%hd
}

// copyRuns uploads runs of pages in consecutive slots, two f16 copies per
// run. All runs share one K and one V input tensor (each input is a backend
// buffer of its own), packed by packRuns.
func (c *Paged) copyRuns(ctx ml.Context, l int, g *group, runs [][]upload) {
	if len(runs) == 0 {
		return
	}
	r := g.pool.row
	total := 0
	for _, run := range runs {
		for _, u := range run {
			total += u.rows
		}
	}
	kbuf := make([]uint16, 0, total*r)
	vbuf := make([]uint16, total*r)
	if n := c.packRuns(kbuf, vbuf, l, g, runs); n != total*r {
		panic(fmt.Sprintf("kvcache: packed %d key elements for %d", n, total*r))
	}
	kbuf = kbuf[:total*r]
	kIn := ctx.Input().FromBytes(ml.DTypeF16, u16bytes(kbuf), r*total)
	vIn := ctx.Input().FromBytes(ml.DTypeF16, u16bytes(vbuf), r*total)
	c.copyRunsFrom(ctx, g, runs, kIn, vIn)
}

// packRuns packs the runs' pages as copyRunsFrom reads them: into k (length
// 0, capacity the runs' rows · row) their key rows token-major, into v
// each run's values channel-major, run after run. Returns the key elements
// written: more than k's capacity would have gone to a copy, not to k's
// memory, so callers check it.
func (c *Paged) packRuns(k, v []uint16, l int, g *group, runs [][]upload) int {
	r, P := g.pool.row, c.L.PageSize
	var first *uint16
	if cap(k) > 0 {
		first = &k[:1][0]
	}
	voff := 0
	for _, run := range runs {
		for _, u := range run {
			k = c.appendKeys(k, g, c.store.pages[l][u.page].K, u.rows)
		}
		for ch := 0; ch < r; ch++ {
			sc := c.channel(g, ch)
			for _, u := range run {
				voff += copy(v[voff:], c.store.pages[l][u.page].V[sc*P:sc*P+u.rows])
			}
		}
	}
	if cap(k) > 0 && &k[:1][0] != first {
		return -1 // grew out of the caller's memory
	}
	return len(k)
}

// copyRunsFrom copies the runs from kIn and vIn (f16, packed by packRuns,
// at least as long as the runs' rows · row) into g's pool: a contiguous
// copy per run for K, a strided one for V.
func (c *Paged) copyRunsFrom(ctx ml.Context, g *group, runs [][]upload, kIn, vIn ml.Tensor) {
	pl := g.pool
	r, P := pl.row, c.L.PageSize
	off := 0 // rows before this run
	for _, run := range runs {
		rows := 0
		for _, u := range run {
			rows += u.rows
		}
		first := run[0].slot * P
		k := kIn.View(ctx, off*r*2, r*rows)
		ctx.Forward(k.Copy(ctx, pl.k.View(ctx, first*r*2, r*rows)))
		// V pool rows are the headDim x heads channels, each slots*P cells long.
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
func (c *Paged) scatterPages(ctx ml.Context, l int, g *group, ups []upload) {
	if len(ups) == 0 {
		return
	}
	pl := g.pool
	r, P, n := pl.row, c.L.PageSize, len(ups)
	kbuf := make([]uint16, 0, n*P*r)
	vbuf := make([]uint16, n*P*r)
	idx := make([]int32, n)
	for i, u := range ups {
		pg := c.store.pages[l][u.page]
		kbuf = c.appendKeys(kbuf, g, pg.K, P)
		for ch := 0; ch < r; ch++ {
			sc := c.channel(g, ch)
			copy(vbuf[(ch*n+i)*P:(ch*n+i+1)*P], pg.V[sc*P:(sc+1)*P])
		}
		idx[i] = int32(u.slot)
	}
	slots := ctx.Input().FromInts(idx, n)
	k := ctx.Input().FromBytes(ml.DTypeF16, u16bytes(kbuf), r*P, n).Cast(ctx, ml.DTypeF32)
	v := ctx.Input().FromBytes(ml.DTypeF16, u16bytes(vbuf), P, n, r).Cast(ctx, ml.DTypeF32)
	ctx.Forward(pl.k.Reshape(ctx, r*P, pl.slots).SetRows(ctx, k, slots))
	ctx.Forward(pl.v.Reshape(ctx, P, pl.slots, r).SetRows(ctx, v, slots))
}
