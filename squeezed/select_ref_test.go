package squeezed

// The reference: Select as it was before its decode-step rework
// (branch selectcost), kept verbatim (its flat scoring through the
// former Transposed layout and vek32.MatMul_Into), so that TestSelectMatchesReference
// can check the new Select's Groups, Tokens and Rows against it and
// BenchmarkSelectStep can time the two in one run. It marks the chosen
// tokens in a bitmap over the positions and the chosen rows in a bitmap
// over the head's order, then reads both back.

import (
	"math"
	"math/bits"

	"github.com/viterin/vek/vek32"

	"github.com/kvrecall/kvrecall/paging"
)

// refSelector is a selector whose Select is the reference. Its bitmaps
// and cluster epochs are its own (they shadow the selector's); the rest
// (ranking state, output buffers) is the embedded selector's, which a
// refSelector does not share: a refSelector and a selector fed the same
// calls evolve the same state apart.
type refSelector struct {
	*selector
	bits  []uint64
	rows  rowMarks
	seen  []uint32
	epoch uint32
	old   map[[2]int]*oldTransposed // per layer and KV head: the centroids as Transpose laid them out before
}

// oldFlat returns layer's KV head g's centroids in the former layout,
// made on first use.
func (s *refSelector) oldFlat(layer, g int, h *Head, G int) *oldTransposed {
	if s.old == nil {
		s.old = map[[2]int]*oldTransposed{}
	}
	t := s.old[[2]int{layer, g}]
	if t == nil {
		t = oldTranspose(h, G)
		s.old[[2]int{layer, g}] = t
	}
	return t
}

// oldTransposed is Transposed before score4AVX2: unpadded blocks, each
// scored by vek32.MatMul_Into.
type oldTransposed struct {
	d, k, g, cols int
	blocks        [][]float32 // block b: centroids b·cols.., [d][≤cols]
}

func oldTranspose(h *Head, g int) *oldTransposed {
	d, k := h.D, h.K()
	cols := max(8, (99_999/(g*d))&^7)
	t := &oldTransposed{d: d, k: k, g: g, cols: cols}
	for lo := 0; lo < k; lo += cols {
		n := min(cols, k-lo)
		blk := make([]float32, d*n)
		for j := range n {
			for i, v := range h.Centroids[(lo+j)*d : (lo+j+1)*d] {
				blk[i*n+j] = v
			}
		}
		t.blocks = append(t.blocks, blk)
	}
	return t
}

func (t *oldTransposed) Scores(dst, q, tmp []float32) []float32 {
	k := t.k
	tmp = grow(tmp, t.g*t.cols)
	for b, blk := range t.blocks {
		lo := b * t.cols
		n := min(t.cols, k-lo)
		out := vek32.MatMul_Into(tmp[:t.g*n], q[:t.g*t.d], blk, t.d)
		for h := range t.g {
			copy(dst[h*k+lo:h*k+lo+n], out[h*n:(h+1)*n])
		}
	}
	return tmp
}

func (s *refSelector) Select(layer int, sum paging.Summaries, q *paging.Queries, upto int) paging.Selection {
	P := s.c.PageSize
	n := paging.PagesOf(upto, P)
	if s.c.Dense(layer) || q == nil && !s.graph {
		return paging.One(paging.AllPages(n))
	}
	sinks, tail, tokBudget := s.bounds(upto)
	sel := paging.Selection{Groups: make([][]int, s.ix.KVHeads), Tokens: make([][]int32, s.ix.KVHeads),
		Rows: make([][]int32, s.ix.KVHeads)}
	words := (upto + 63) / 64
	if len(s.lists[layer]) != s.ix.KVHeads {
		s.lists[layer] = make([]rankedLists, s.ix.KVHeads)
	}
	scores, lagged := s.scores[layer]
	if q != nil {
		delete(s.scores, layer) // scored before this pass
	}
	for g := 0; g < s.ix.KVHeads; g++ {
		h := s.ix.Heads[layer][g]
		// One ranked cluster list per (query token, query head), the last
		// token first: they share the budget round-robin. The lists are
		// kept end to end in s.flat (list i is s.flat[s.offs[i]:s.offs[i+1]]).
		s.flat, s.offs = s.flat[:0], append(s.offs[:0], 0)
		switch {
		case q != nil:
			G := q.Heads / s.ix.KVHeads
			d := s.ix.HeadDim
			tr := s.flatHead(layer, g)
			for t := len(q.Q) - 1; t >= 0 && tokBudget > 0; t-- {
				if tr != nil && !s.thresh {
					// Flat: the group's G query heads against every
					// centroid in one read of them, then ranked.
					k := h.K()
					s.sbuf = grow(s.sbuf, G*k)
					s.tmp = s.oldFlat(layer, g, h, G).Scores(s.sbuf, q.Q[t][g*G*d:(g+1)*G*d], s.tmp)
					for j := 0; j < G; j++ {
						s.flat = h.TopRanked(s.sbuf[j*k:(j+1)*k], tokBudget, &s.sc, s.flat)
						s.offs = append(s.offs, int32(len(s.flat)))
					}
					continue
				}
				for j := 0; j < G; j++ {
					qh := q.Q[t][(g*G+j)*d : (g*G+j+1)*d]
					n0 := s.sc.Scored
					s.flat = s.rank(h, qh, tokBudget, s.flat)
					s.offs = append(s.offs, int32(len(s.flat)))
					if !s.thresh {
						s.probe(layer, g, s.sc.Scored-n0, G)
					}
				}
				tr = s.flatHead(layer, g)
			}
		case lagged && tokBudget > 0:
			// The last decode step's scores, from the graph: the same
			// ranking as FlatTop / FlatAbove on the host.
			k := s.centK[layer]
			G := len(scores) / (k * s.ix.KVHeads)
			var held []int32
			if hs := s.held[layer]; s.keep > 0 && len(hs) > g {
				held = hs[g]
			}
			bonus := float32(s.keep * math.Sqrt(float64(h.D)))
			for j := 0; j < G; j++ {
				row := scores[(g*G+j)*k : (g*G+j+1)*k]
				if len(held) > 0 {
					s.adj = append(s.adj[:0], row...)
					for _, c := range held {
						s.adj[c] += bonus
					}
					row = s.adj
				}
				s.flat = s.rankScores(h, row, tokBudget, s.flat)
				s.offs = append(s.offs, int32(len(s.flat)))
			}
		default:
			// No scores yet (the first decode step after a question):
			// the last scoring's lists. In budget mode each is cut to
			// the prefix that fills this step's budget, which is what
			// ranking the same queries again would give (the budget only
			// shrinks as the tail grows; Top takes a prefix of one order).
			rl := s.lists[layer][g]
			for i := 0; i+1 < len(rl.offs); i++ {
				l := rl.flat[rl.offs[i]:rl.offs[i+1]]
				if !s.thresh {
					tok := 0
					for m, j := range l {
						if tok >= tokBudget {
							l = l[:m]
							break
						}
						tok += int(h.Sizes[j])
					}
				}
				s.flat = append(s.flat, l...)
				s.offs = append(s.offs, int32(len(s.flat)))
			}
		}
		if s.graph && (q != nil || lagged) {
			rl := &s.lists[layer][g]
			rl.flat, rl.offs = append(rl.flat[:0], s.flat...), append(rl.offs[:0], s.offs...)
		}
		// The chosen tokens as a bitmap over the positions: setting bits
		// dedups the sinks and tail against the clusters, and reading it
		// back lists them sorted, in O(upto/64 + tokens) instead of a sort.
		// taken: cluster j is taken in this group when seen[j] == epoch.
		if s.epoch++; s.epoch == 0 || len(s.seen) < h.K() {
			s.seen, s.epoch = make([]uint32, max(h.K(), len(s.seen))), 1
		}
		if cap(s.bits) < words {
			s.bits = make([]uint64, words)
		}
		s.bits = s.bits[:words]
		clear(s.bits)
		// The same choice as rows of the head's cluster order
		// (TokenOrder): a taken cluster is one run.
		s.rows.reset(len(h.Assign))
		n := 0
		mark := func(t int32) {
			if w, b := t>>6, uint64(1)<<(t&63); s.bits[w]&b == 0 {
				s.bits[w] |= b
				n++
			}
		}
		lists := len(s.offs) - 1
		used := 0
		var taken []int32
		for r := 0; used < tokBudget; r++ {
			any := false
			for i := 0; i < lists; i++ {
				l := s.flat[s.offs[i]:s.offs[i+1]]
				if r >= len(l) || used >= tokBudget {
					continue
				}
				any = true
				j := l[r]
				if s.seen[j] == s.epoch {
					continue
				}
				s.seen[j] = s.epoch
				ct := h.Tokens(int(j))
				if len(ct) > tokBudget-used {
					continue // too many tokens for what is left
				}
				for _, t := range ct {
					mark(t)
				}
				s.rows.cluster(h, j)
				used += len(ct)
				if s.keep > 0 {
					taken = append(taken, j)
				}
			}
			if !any {
				break
			}
		}
		if s.keep > 0 {
			hs := s.held[layer]
			if len(hs) != s.ix.KVHeads {
				hs = make([][]int32, s.ix.KVHeads)
				s.held[layer] = hs
			}
			hs[g] = append(hs[g][:0], taken...)
		}
		sr, _ := s.sinkRows(layer, g, h)
		for t := 0; t < sinks; t++ {
			mark(int32(t))
			if t < len(sr) {
				s.rows.mark(sr[t])
			}
		}
		for t := tail; t < upto; t++ {
			mark(int32(t))
			s.rows.token(h, int32(t)) // clustered only when the window reaches back into them
		}
		buf := s.bufsFor(layer, g)
		toks := grow32(buf.toks[buf.turn][:0], n)
		for w, word := range s.bits {
			for word != 0 {
				toks = append(toks, int32(w<<6+bits.TrailingZeros64(word)))
				word &= word - 1
			}
		}
		// The pages of the tokens: reports (Paged.Selected) and the
		// selection's check read them; the pool holds only the tokens.
		// Counted first: appending from nil (~1,500 pages at 64k) was
		// a quarter of Select in growing and clearing the slice.
		np, last := 0, -1
		for _, t := range toks {
			if p := int(t) / P; p != last {
				np, last = np+1, p
			}
		}
		ps := buf.ps[buf.turn][:0]
		if cap(ps) < np {
			ps = make([]int, 0, np+np/4)
		}
		for _, t := range toks {
			if p := int(t) / P; len(ps) == 0 || ps[len(ps)-1] != p {
				ps = append(ps, p)
			}
		}
		rows := s.rows.appendRuns(grow32(buf.rows[buf.turn][:0], 2*s.rows.marks))
		buf.toks[buf.turn], buf.ps[buf.turn], buf.rows[buf.turn] = toks, ps, rows
		sel.Groups[g], sel.Tokens[g], sel.Rows[g] = ps, toks, rows
	}
	return sel
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
