package paging

import (
	"math"
	"slices"

	"github.com/viterin/vek/vek32"
)

// questScorer keeps, per layer and step, the pages with the largest upper
// bound of any query·key in them (Quest, arXiv 2406.10774): for query q and a
// page's per-channel key minima and maxima, Σ_i max(q_i·max_i, q_i·min_i),
// the largest over the query heads. A batch of several tokens (a question)
// shares the budget round-robin (see roundRobin).
type questScorer struct{}

func (questScorer) When() When { return PerStep }
func (questScorer) Score(_ int, s Summaries, q *Queries, n int) [][]float32 {
	return scoreBoxes(s, q, n)
}

// scoreBoxes is scorePages with boundScore, computed from packed boxes when
// s has them: Σ_i max(q_i·max_i, q_i·min_i) = [q; |q|]·[center; radius].
func scoreBoxes(s Summaries, qs *Queries, n int) [][]float32 {
	pb, ok := s.(PackedBoxes)
	if !ok {
		return scorePages(s, qs, n, boundScore)
	}
	hd, kvh, pages := s.HeadDim(), s.KVHeads(), min(s.Pages(), n)
	group := qs.Heads / kvh
	boxes := make([][]float32, kvh)
	for g := range boxes {
		boxes[g] = pb.PackedBoxes(g)[:pages*2*hd]
	}
	y := make([]float32, 2*hd)
	tmp := make([]float32, pages)
	ninf := float32(math.Inf(-1))
	out := make([][]float32, len(qs.Q))
	for t, q := range qs.Q {
		best := make([]float32, n)
		for i := range best {
			best[i] = ninf
		}
		for h := 0; h < qs.Heads; h++ {
			qh := q[h*hd : (h+1)*hd]
			copy(y[:hd], qh)
			vek32.Abs_Into(y[hd:], qh)
			matVec(tmp, boxes[h/group], y)
			vek32.Maximum_Inplace(best[:pages], tmp)
		}
		out[t] = best
	}
	return out
}

// matVecRows keeps each vek32.MatMul_Into call below the size at which vek
// spreads it over goroutines: selection runs between graph computations on
// the decode thread, and must not take the cores ggml's threads use.
const matVecRows = 256

// matVec sets dst = x·y for x [len(dst)][len(y)] (row-major).
func matVec(dst, x, y []float32) {
	n := len(y)
	for i := 0; i < len(dst); i += matVecRows {
		j := min(i+matVecRows, len(dst))
		vek32.MatMul_Into(dst[i:j], x[i*n:j*n], y, n)
	}
}

// retroScorer scores pages once per question (RetroLM, arXiv 2502.11444,
// without its trained retriever): the largest dot product between a question
// token's query and the page's mean key or one of its representative keys.
// The selection then serves every decode step of the answer; each retrieved
// page brings Neighbors following pages, because an answer continues past
// the text that matches the question.
type retroScorer struct{}

func (retroScorer) When() When { return PerQuestion }
func (retroScorer) Score(_ int, s Summaries, q *Queries, n int) [][]float32 {
	return scorePages(s, q, n, repScore)
}

// pageScore scores one page for one query head vector q (and its
// elementwise absolute value aq) against KV head g.
type pageScore func(s Summaries, page, g int, q, aq []float32) float32

// scorePages returns, per query token, each page's best score over the
// query heads. Partial pages are scored too (their summaries cover the
// tokens so far).
func scorePages(s Summaries, qs *Queries, n int, score pageScore) [][]float32 {
	hd := s.HeadDim()
	group := qs.Heads / s.KVHeads()
	out := make([][]float32, len(qs.Q))
	aq := make([]float32, len(qs.Q[0]))
	for t, q := range qs.Q {
		vek32.Abs_Into(aq, q)
		scores := make([]float32, n)
		for p := range scores {
			best := float32(math.Inf(-1))
			if p < s.Pages() {
				for h := 0; h < qs.Heads; h++ {
					if v := score(s, p, h/group, q[h*hd:(h+1)*hd], aq[h*hd:(h+1)*hd]); v > best {
						best = v
					}
				}
			}
			scores[p] = best
		}
		out[t] = scores
	}
	return out
}

// roundRobin fills the free budget from per-token rankings: each query token
// in turn, starting with the last one (whose logits pick the next token),
// adds its best page not chosen yet, then each its second best, and so on.
// Taking the maximum over a question's tokens instead lets the loose bounds
// of common words crowd out the one token that matches the needle. Each
// chosen page brings up to neighbors following pages.
func roundRobin(req []int, scores [][]float32, free, neighbors int) []int {
	if len(scores) == 1 {
		return topPages(req, scores[0], free, neighbors)
	}
	in := make([]bool, len(scores[0]))
	for _, p := range req {
		in[p] = true
	}
	orders := make([][]int, len(scores))
	for t, sc := range scores {
		orders[t] = rank(sc, in, 2*free)
	}
	out := slices.Clone(req)
	for r := 0; free > 0; r++ {
		any := false
		for t := len(orders) - 1; t >= 0 && free > 0; t-- {
			if r >= len(orders[t]) {
				continue
			}
			any = true
			p := orders[t][r]
			for k := 0; k <= neighbors && p+k < len(scores[t]) && free > 0; k++ {
				if !in[p+k] {
					in[p+k] = true
					out = append(out, p+k)
					free--
				}
			}
		}
		if !any {
			break
		}
	}
	slices.Sort(out)
	return out
}

// rank returns the best k pages not in skip by descending score (ties:
// lower page first). A bounded heap keeps it O(pages·log k): the callers
// consume at most 2·free entries of an order (each entry either adds a page
// or was already added as another's neighbor), so k = 2·free is exact.
func rank(scores []float32, skip []bool, k int) []int {
	var sx rankScratch
	return sx.rank(scores, skip, k)
}

// rankScratch is the working memory of rank and topPages (the heap, the
// order, the mask of pages taken, and the lagged rule's adjusted bounds),
// kept by a caller that ranks at every decode step so that a step
// allocates none of it: quest's lagged rule ranks ~1025 bounds per layer
// at 64k, and a step's fresh Go memory costs page faults (~14 KiB a layer
// of it: docs/kvcache.md, "quest at 64k").
type rankScratch struct {
	heap  []rankEntry
	order []int
	in    []bool
	adj   []float32
}

// rank is rank with sx's memory: the result is sx's and valid until its
// next call.
func (sx *rankScratch) rank(scores []float32, skip []bool, k int) []int {
	if n := max(0, min(k, len(scores))); cap(sx.heap) < n {
		sx.heap = make([]rankEntry, 0, n)
	}
	h := sx.heap[:0]
	p := 0
	for ; p < len(scores) && len(h) < k; p++ {
		if skip[p] {
			continue
		}
		h = append(h, rankEntry{scores[p], p})
		for i := len(h) - 1; i > 0 && h[i].worse(h[(i-1)/2]); i = (i - 1) / 2 {
			h[i], h[(i-1)/2] = h[(i-1)/2], h[i]
		}
	}
	if len(h) == k && k > 0 {
		// h[0] is the worst page kept. A later page p is worse than it
		// unless its score is higher (a tie goes to the lower page, the
		// kept one), so one comparison rejects most pages.
		worst := h[0].s
		for ; p < len(scores); p++ {
			if s := scores[p]; s > worst && !skip[p] {
				h[0] = rankEntry{s, p}
				siftDown(h)
				worst = h[0].s
			}
		}
	}
	slices.SortFunc(h, func(a, b rankEntry) int {
		switch {
		case b.worse(a):
			return -1
		case a.worse(b):
			return 1
		}
		return 0
	})
	sx.heap = h
	if sx.order == nil || cap(sx.order) < len(h) {
		sx.order = make([]int, 0, len(h)) // never nil: rank's callers got an empty order for k 0
	}
	out := sx.order[:0]
	for _, e := range h {
		out = append(out, e.p)
	}
	sx.order = out
	return out
}

// mask returns sx's page mask for n pages, all false.
func (sx *rankScratch) mask(n int) []bool {
	if cap(sx.in) < n {
		sx.in = make([]bool, n)
	}
	sx.in = sx.in[:n]
	clear(sx.in)
	return sx.in
}

// floats returns sx's adjusted-bounds buffer of n floats (not cleared).
func (sx *rankScratch) floats(n int) []float32 {
	if cap(sx.adj) < n {
		sx.adj = make([]float32, n)
	}
	sx.adj = sx.adj[:n]
	return sx.adj
}

// rankEntry is a page and its score in rank's heap.
type rankEntry struct {
	s float32
	p int
}

// worse reports whether a ranks below b: a lower score, or the same
// score and a later page.
func (a rankEntry) worse(b rankEntry) bool { return a.s < b.s || (a.s == b.s && a.p > b.p) }

// siftDown restores the min-heap h (under worse) after h[0] changed.
func siftDown(h []rankEntry) {
	for i := 0; ; {
		c := 2*i + 1
		if c >= len(h) {
			return
		}
		if c+1 < len(h) && h[c+1].worse(h[c]) {
			c++
		}
		if !h[c].worse(h[i]) {
			return
		}
		h[i], h[c] = h[c], h[i]
		i = c
	}
}

// boundScore is Quest's upper bound Σ_i max(q_i·max_i, q_i·min_i), written
// as q·center + |q|·radius: two SIMD dot products.
func boundScore(s Summaries, page, g int, q, aq []float32) float32 {
	c, r := s.Box(page, g)
	return vek32.Dot(q, c) + vek32.Dot(aq, r)
}

// repScore is the best dot product with the mean key or a representative key.
func repScore(s Summaries, page, g int, q, _ []float32) float32 {
	best := vek32.Dot(q, s.Mean(page, g))
	for _, r := range s.Reps(page, g) {
		if v := vek32.Dot(q, r); v > best {
			best = v
		}
	}
	return best
}
