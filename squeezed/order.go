package squeezed

import (
	"math/bits"
	"slices"

	"github.com/kvrecall/kvrecall/paging"
)

// Cluster order: squeezed's selections as runs of rows (paging.TokenOrdered).
//
// A KV head's clusters list their tokens end to end (Head.tokens, cluster
// j at rows tokOff[j]..tokOff[j+1]): a permutation of the clustered
// positions [0, Clustered). A cache that keeps the document's keys and
// values in that order (kvcache's cluster-ordered copy, shared by the
// document's sessions) reads a chosen cluster as one run of consecutive
// rows, where the position-ordered pages scatter its ~20 tokens over the
// document: at 64k on the tiny preset a step's 16,384 scattered rows
// become ~800 runs (docs/squeezed.md, "The step's physical limit").

var (
	_ paging.TokenOrdered = (*selector)(nil)
	_ paging.StepScored   = (*selector)(nil)
)

// TokenOrder implements paging.TokenOrdered: KV head group's clusters'
// tokens end to end, and the clusters as the blocks (tokOff), the Index's
// own slices (shared, read-only), so the order's identity is the
// clustering's. nil for a dense layer.
func (s *selector) TokenOrder(layer, group int) (order, blocks []int32) {
	if s.c.Dense(layer) || group < 0 || group >= s.ix.KVHeads {
		return nil, nil
	}
	h := s.ix.Heads[layer][group]
	return h.tokens, h.tokOff
}

// rowOf returns the row of clustered position t in h's order: its
// cluster's first row plus its rank among the cluster's (ascending)
// tokens, by binary search in ~20 tokens; no inverse map is kept.
func (h *Head) rowOf(t int32) int32 {
	j := h.Assign[t]
	i, _ := slices.BinarySearch(h.Tokens(int(j)), t)
	return h.tokOff[j] + int32(i)
}

// sinkRows returns the rows of the clustered sinks (positions below
// Config.Sinks) in layer's KV head g's order, in position order, and the
// same rows ascending, found once: each is a lookup in a random cluster,
// ~1/6 of Select's row work at 64k if done every step.
func (s *selector) sinkRows(layer, g int, h *Head) (rows, sorted []int32) {
	if s.sinkRow == nil {
		s.sinkRow, s.sinkSorted = make([][][]int32, s.ix.Layers), make([][][]int32, s.ix.Layers)
	}
	if s.sinkRow[layer] == nil {
		s.sinkRow[layer], s.sinkSorted[layer] = make([][]int32, s.ix.KVHeads), make([][]int32, s.ix.KVHeads)
	}
	if s.sinkRow[layer][g] == nil {
		rows := make([]int32, 0, s.c.Sinks)
		for t := 0; t < min(s.c.Sinks, len(h.Assign)); t++ {
			rows = append(rows, h.rowOf(int32(t)))
		}
		s.sinkRow[layer][g], s.sinkSorted[layer][g] = rows, slices.Sorted(slices.Values(rows))
	}
	return s.sinkRow[layer][g], s.sinkSorted[layer][g]
}

// tailRows is one head's rows of its last clustered positions [base,
// len(Assign)), base = len(Assign) − Config.Window, as packed (row,
// position) keys sorted by row, found once: a decode step's tail
// reaches back into the clustered tokens by up to the window (the
// observation window is shorter than Config.Window by default: at 64k
// ~150 tail tokens per KV head are clustered), and a binary search for
// each of their rows at every step was ~1/10 of Select's row work.
type tailRows struct {
	base int
	keys []uint64 // row<<32 | position, ascending
}

// tailRowsOf returns layer's KV head g's tailRows, made on first use.
func (s *selector) tailRowsOf(layer, g int, h *Head) *tailRows {
	if s.tailRow == nil {
		s.tailRow = make([][]*tailRows, s.ix.Layers)
	}
	if s.tailRow[layer] == nil {
		s.tailRow[layer] = make([]*tailRows, s.ix.KVHeads)
	}
	tr := s.tailRow[layer][g]
	if tr == nil {
		n := len(h.Assign)
		tr = &tailRows{base: max(0, n-s.c.Window)}
		for t := tr.base; t < n; t++ {
			tr.keys = append(tr.keys, uint64(h.rowOf(int32(t)))<<32|uint64(t))
		}
		slices.Sort(tr.keys)
		s.tailRow[layer][g] = tr
	}
	return tr
}

// tokenLists returns the chosen positions of h, ascending (the taken
// clusters' tokens, s.taken, used of them; the sinks [0, sinks); the
// tail [tail, upto)), and their pages, ascending, in toks's and ps's
// storage (grown). The sinks and the tail are ranges, below and above
// every other position; the clusters are disjoint, so their tokens in
// [sinks, tail) (the rest repeat a sink or a tail token) are distinct:
// they are collected and sorted by an LSD radix sort on 8-bit digits
// (two passes below 64k positions), O(tokens), where a bitmap over
// [0, upto), set and read back, cost O(upto/64) per KV head besides.
// The pages come from the sorted positions by a shift when the page
// size is a power of two, else by one division per page.
func (s *selector) tokenLists(h *Head, used, sinks, tail, upto int, toks []int32, ps []int) ([]int32, []int) {
	// The taken clusters' token lists (~100 of them a KV head, ~20
	// tokens each, anywhere in the head's 256 KiB of lists at 64k, which
	// the centroids' scan has evicted) are first touched in a loop of
	// independent loads, so that their cache misses overlap: walked
	// cluster by cluster they came one at a time, and were half of
	// Select's list work.
	var touch int32
	for _, j := range s.taken {
		if a, b := h.tokOff[j], h.tokOff[j+1]; a < b {
			touch += h.tokens[a] + h.tokens[b-1]
		}
	}
	s.touched = touch
	keys := s.sortA[:0]
	if cap(keys) < used {
		keys = make([]int32, 0, used+used/4)
	}
	lo, span := int32(sinks), uint32(tail-sinks)
	for _, j := range s.taken {
		for _, t := range h.tokens[h.tokOff[j]:h.tokOff[j+1]] {
			if uint32(t-lo) < span {
				keys = append(keys, t)
			}
		}
	}
	s.sortA = keys
	keys = radixSort32(keys, &s.sortB, bits.Len32(uint32(max(0, tail-1))), &s.hist)
	toks = grow32(toks, sinks+len(keys)+(upto-tail))
	for t := range sinks {
		toks = append(toks, int32(t))
	}
	toks = append(toks, keys...)
	for t := tail; t < upto; t++ {
		toks = append(toks, int32(t))
	}
	return toks, s.pagesOf(toks, ps)
}

// looseLists is tokenLists' rows-only form (paging.Selection.RowsOnly):
// the chosen positions at or past the order's end n, ascending (the sinks
// past it, [n, sinks), when the clustered tokens are fewer than the
// sinks; the tail's [max(tail, n), upto)), and their pages, in toks's and
// ps's storage (grown). The clusters' tokens and the clustered sinks and
// tail are all below n: rowRuns' rows stand for them.
func (s *selector) looseLists(n, sinks, tail, upto int, toks []int32, ps []int) ([]int32, []int) {
	from := max(tail, n)
	toks = grow32(toks, max(0, sinks-n)+max(0, upto-from))
	for t := n; t < sinks; t++ {
		toks = append(toks, int32(t))
	}
	for t := from; t < upto; t++ {
		toks = append(toks, int32(t))
	}
	return toks, s.pagesOf(toks, ps)
}

// pagesOf returns the pages of toks (ascending), ascending and distinct,
// in ps's storage (grown).
func (s *selector) pagesOf(toks []int32, ps []int) []int {
	// The pages: reports (Paged.Selected) and the selection's check read
	// them; the pool holds only the tokens. No more than the tokens.
	ps = ps[:0]
	if cap(ps) < len(toks) {
		ps = make([]int, 0, len(toks)+len(toks)/4)
	}
	if P := s.c.PageSize; P&(P-1) == 0 {
		// Branch-free: every token's page is written at n, which moves
		// on only past a new page (at 64k the page changes at ~3 of 4
		// tokens, unpredictably).
		sh, last, n := bits.TrailingZeros(uint(P)), -1, 0
		all := ps[:len(toks)]
		for _, t := range toks {
			p := int(t) >> sh
			all[n] = p
			inc := 0
			if p != last {
				inc = 1
			}
			n += inc
			last = p
		}
		ps = all[:n]
	} else {
		next := 0 // the first position past the last page listed
		for _, t := range toks {
			if int(t) >= next {
				p := int(t) / P
				ps = append(ps, p)
				next = (p + 1) * P
			}
		}
	}
	return ps
}

// radixSort32 sorts keys (non-negative, below 1<<width) ascending by LSD
// radix passes of 8 bits, ⌈width/8⌉ of them, between keys and *tmp
// (grown); it returns the sorted keys, in either. The digits' counts
// come from one pass over the keys for every digit at once.
func radixSort32(keys []int32, tmp *[]int32, width int, hist *[4][256]uint32) []int32 {
	passes := (width + 7) / 8
	if len(keys) < 2 || passes == 0 {
		return keys
	}
	if cap(*tmp) < len(keys) {
		*tmp = make([]int32, len(keys)+len(keys)/4)
	}
	passes = min(passes, 4)
	*hist = [4][256]uint32{}
	if passes <= 2 { // positions below 64k: only the digits sorted on are counted
		for _, k := range keys {
			u := uint32(k)
			hist[0][byte(u)]++
			hist[1][byte(u>>8)]++
		}
	} else {
		for _, k := range keys {
			u := uint32(k)
			hist[0][byte(u)]++
			hist[1][byte(u>>8)]++
			hist[2][byte(u>>16)]++
			hist[3][byte(u>>24)]++
		}
	}
	src, dst := keys, (*tmp)[:len(keys)]
	for p := range passes {
		c := &hist[p]
		var sum uint32
		for i, v := range c {
			c[i] = sum
			sum += v
		}
		sh := 8 * p
		for _, k := range src {
			b := byte(uint32(k) >> sh)
			dst[c[b]] = k
			c[b]++
		}
		src, dst = dst, src
	}
	return src
}

// rowRuns returns the chosen tokens as runs of rows of h's order
// (Selection.Rows: half-open [start, end) pairs, ascending, maximal), in
// out's storage (grown): each taken cluster is the run [tokOff[j],
// tokOff[j+1]); the clustered sinks and tail tokens are single rows.
// The clusters are walked in ascending order (a bitmap over the K
// clusters, K/64 words) and the single rows (sorted lists: the sinks'
// found once, the tail's from tailRows) merged into them, joining runs
// that touch; no bitmap over the document's rows, which was O(T/64) to
// clear and read back per KV head.
func (s *selector) rowRuns(layer, g int, h *Head, sinks, tail, upto int, out []int32) []int32 {
	// The single rows, ascending: the clustered sinks' ...
	sr, srSorted := s.sinkRows(layer, g, h)
	sinkRows := srSorted
	if m := min(sinks, len(sr)); m < len(sr) { // fewer sinks than Config.Sinks (upto < Sinks)
		s.rowTmp = append(s.rowTmp[:0], sr[:m]...)
		slices.Sort(s.rowTmp)
		sinkRows = s.rowTmp
	}
	// ... and the clustered tail's, [tail, min(upto, len(Assign))).
	end := min(upto, len(h.Assign))
	s.tailTmp = s.tailTmp[:0]
	if tail < end {
		if tr := s.tailRowsOf(layer, g, h); tail >= tr.base {
			for _, key := range tr.keys {
				if t := int(uint32(key)); t >= tail && t < end {
					s.tailTmp = append(s.tailTmp, int32(key>>32))
				}
			}
		} else {
			for t := tail; t < end; t++ {
				s.tailTmp = append(s.tailTmp, h.rowOf(int32(t)))
			}
			slices.Sort(s.tailTmp)
		}
	}
	s.single = mergeSorted(s.single[:0], sinkRows, s.tailTmp)
	// The taken clusters as a bitmap over K.
	words := (h.K() + 63) / 64
	if cap(s.cbits) < words {
		s.cbits = make([]uint64, words)
	}
	cb := s.cbits[:words]
	clear(cb)
	for _, j := range s.taken {
		cb[j>>6] |= 1 << (j & 63)
	}
	return appendRuns(grow32(out, 2*(len(s.taken)+len(s.single))), h.tokOff, cb, s.single)
}

// mergeSorted appends the merge of ascending a and b to out.
func mergeSorted(out, a, b []int32) []int32 {
	i, j := 0, 0
	for i < len(a) && j < len(b) {
		if a[i] <= b[j] {
			out = append(out, a[i])
			i++
		} else {
			out = append(out, b[j])
			j++
		}
	}
	out = append(out, a[i:]...)
	return append(out, b[j:]...)
}

// appendRuns appends to out the union of the blocks [off[j], off[j+1])
// of the clusters j set in cb and of the rows single (ascending) as
// maximal half-open runs, ascending: blocks and rows in ascending start
// order, each joining the open run when it starts at or before its end.
// An empty block adds nothing.
func appendRuns(out []int32, off []int32, cb []uint64, single []int32) []int32 {
	open := false
	var a, b int32 // the open run [a, b)
	add := func(x, y int32) {
		if open && x <= b {
			b = max(b, y)
			return
		}
		if open {
			out = append(out, a, b)
		}
		a, b, open = x, y, true
	}
	si := 0
	for w, word := range cb {
		for word != 0 {
			j := w<<6 + bits.TrailingZeros64(word)
			word &= word - 1
			x, y := off[j], off[j+1]
			if x == y {
				continue
			}
			for si < len(single) && single[si] < x {
				add(single[si], single[si]+1)
				si++
			}
			add(x, y)
		}
	}
	for _, r := range single[si:] {
		add(r, r+1)
	}
	if open {
		out = append(out, a, b)
	}
	return out
}

// selBufs are one layer and KV head's selection lists (Tokens, pages,
// Rows), two sets used in turn: a selection Select returns stays valid
// through the next Select of its layer (the cache uses it within its
// pass; a caller may compare two in a row) and is overwritten by the one
// after. Fresh lists every step (~16k tokens and ~1,500 pages a step at
// 64k) were a third of Select's time in allocating and first touching
// them (pprof, BenchmarkSqueezedFromDisk).
type selBufs struct {
	toks, rows [2][]int32
	ps         [2][]int
	turn       int
}

// bufsFor returns layer's KV head g's lists, turned to the other set.
func (s *selector) bufsFor(layer, g int) *selBufs {
	if s.bufs == nil {
		s.bufs = make([][]selBufs, s.ix.Layers)
	}
	if s.bufs[layer] == nil {
		s.bufs[layer] = make([]selBufs, s.ix.KVHeads)
	}
	b := &s.bufs[layer][g]
	b.turn ^= 1
	return b
}

// grow32 returns x[:0] with room for n, non-nil (an empty list of rows
// is not "no rows").
func grow32(x []int32, n int) []int32 {
	if x == nil || cap(x) < n {
		return make([]int32, 0, n+n/4)
	}
	return x[:0]
}
