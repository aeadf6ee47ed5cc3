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

var _ paging.TokenOrdered = (*selector)(nil)

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

// rowMarks is a bitmap over one head's rows (Select's scratch, reused),
// and how many clusters and tokens were marked (at most that many runs).
type rowMarks struct {
	bits  []uint64
	marks int
}

// reset clears the marks for an order of rows rows.
func (m *rowMarks) reset(rows int) {
	words := (rows + 63) / 64
	if cap(m.bits) < words {
		m.bits = make([]uint64, words)
	}
	m.bits = m.bits[:words]
	clear(m.bits)
	m.marks = 0
}

// cluster marks cluster j's rows, [tokOff[j], tokOff[j+1]).
func (m *rowMarks) cluster(h *Head, j int32) {
	m.span(h.tokOff[j], h.tokOff[j+1])
	m.marks++
}

// span marks rows [a, b) a word at a time.
func (m *rowMarks) span(a, b int32) {
	for a < b {
		w, o := a>>6, a&63
		n := min(64-o, b-a)
		mask := ^uint64(0) >> (64 - n) << o
		m.bits[w] |= mask
		a += n
	}
}

// token marks position t's row if t is clustered (t < len(h.Assign)).
func (m *rowMarks) token(h *Head, t int32) {
	if int(t) < len(h.Assign) {
		m.mark(h.rowOf(t))
	}
}

// mark marks row r.
func (m *rowMarks) mark(r int32) {
	m.bits[r>>6] |= 1 << (r & 63)
	m.marks++
}

// sinkRows returns the rows of the clustered sinks (positions below
// Config.Sinks) in layer's KV head g's order, found once: each is a
// lookup in a random cluster, ~1/6 of Select's row work at 64k if done
// every step.
func (s *selector) sinkRows(layer, g int, h *Head) []int32 {
	if s.sinkRow == nil {
		s.sinkRow = make([][][]int32, s.ix.Layers)
	}
	if s.sinkRow[layer] == nil {
		s.sinkRow[layer] = make([][]int32, s.ix.KVHeads)
	}
	if s.sinkRow[layer][g] == nil {
		rows := make([]int32, 0, s.c.Sinks)
		for t := 0; t < min(s.c.Sinks, len(h.Assign)); t++ {
			rows = append(rows, h.rowOf(int32(t)))
		}
		s.sinkRow[layer][g] = rows
	}
	return s.sinkRow[layer][g]
}

// appendRuns appends the marked rows as half-open [start, end) pairs,
// ascending: O(words + runs). A nil out gets the capacity the marks can
// need, at once (growing it was a tenth of Select at 64k); there are at
// most marks runs.
func (m *rowMarks) appendRuns(out []int32) []int32 {
	if out == nil {
		out = make([]int32, 0, 2*m.marks)
	}
	open := false
	for w, word := range m.bits {
		base := int32(w * 64)
		for off := 0; off < 64; {
			rest := word >> off
			if open {
				// The ones from off on: a run continues into the next
				// word if they reach its end (the shifted-in zeros become
				// ones under ^, so z ≤ 64-off).
				z := bits.TrailingZeros64(^rest)
				if off+z >= 64 {
					break
				}
				out = append(out, base+int32(off+z))
				open, off = false, off+z
				continue
			}
			if rest == 0 {
				break
			}
			o := bits.TrailingZeros64(rest)
			out = append(out, base+int32(off+o))
			open, off = true, off+o
		}
	}
	if open {
		out = append(out, int32(len(m.bits)*64))
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
