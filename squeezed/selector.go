package squeezed

import (
	"errors"
	"fmt"
	"math"
	"math/bits"
	"slices"

	"github.com/viterin/vek/vek32"

	"github.com/kvrecall/kvrecall/paging"
)

// OptionKey is the paging.Config.Options key under which the "squeezed"
// method finds its document's clusters: an *Index or a Use.
const OptionKey = "squeezed"

// Use is what the method reads from Options[OptionKey]: the document's
// index and the mode.
type Use struct {
	Index *Index
	// Threshold selects the calibrated mode: every cluster whose share
	// S_j reaches the index's threshold (within the budget's tokens). Off,
	// clusters are taken by score until the budget's tokens are filled.
	Threshold bool
	// Resident is the tokens each KV head's device pool holds (default:
	// the budget). Residency is token-granular (paging.Group.Tokens): the
	// pool holds the selected tokens themselves, not their pages, so the
	// budget fills it. A larger pool keeps more recently used tokens
	// resident, so later steps upload fewer, at the price of resident
	// bytes.
	Resident int
}

func init() { paging.Register("squeezed", newSelector) }

// selector is the "squeezed" method: in each layer past DenseLayers, every
// KV head is its own group, attending to the tokens of its best clusters
// plus the sinks and the recent tokens.
//
// Granularity: the selection is token-granular (paging.Selection.Tokens)
// and so is residency (paging.Group.Tokens): each group's device pool
// holds Resident tokens (default the budget), and only the chosen
// clusters' tokens are uploaded, not their pages.
type selector struct {
	c        paging.Config
	ix       *Index
	thresh   bool
	resident int // tokens of each group's pool
	sc       Scratch
	// Select's buffers, reused across steps: the ranked cluster lists end
	// to end (flat, offs), the clusters taken (seen[j] == epoch), the
	// chosen positions' bitmap.
	flat, offs []int32
	seen       []uint32
	epoch      uint32
	bits       []uint64
}

func newSelector(c paging.Config) (paging.Selector, error) {
	var u Use
	switch v := c.Options[OptionKey].(type) {
	case *Index:
		u.Index = v
	case Use:
		u = v
	}
	if u.Index == nil {
		return nil, errors.New("squeezed: no clusters given: the method needs a document ingested with clustering on (runtime Options.Squeezed), or a squeezed.Index under Options[\"squeezed\"]")
	}
	if c.Budget <= 0 {
		return nil, fmt.Errorf("squeezed: budget %d: the method needs a token budget (it sizes each KV head's pool)", c.Budget)
	}
	if err := c.CheckBudget(); err != nil {
		return nil, err
	}
	if u.Threshold && u.Index.Threshold <= 0 {
		return nil, errors.New("squeezed: threshold mode needs a calibrated index (its document had no observation window queries)")
	}
	if c.KVHeads != 0 && c.KVHeads != u.Index.KVHeads || c.Layers != 0 && c.Layers != u.Index.Layers {
		return nil, fmt.Errorf("squeezed: clusters for %d layers × %d KV heads, the model has %d × %d", u.Index.Layers, u.Index.KVHeads, c.Layers, c.KVHeads)
	}
	if u.Resident == 0 {
		u.Resident = c.Budget
	}
	if u.Resident < c.Budget {
		return nil, fmt.Errorf("squeezed: resident tokens %d are fewer than the budget %d", u.Resident, c.Budget)
	}
	return &selector{c: c, ix: u.Index, thresh: u.Threshold, resident: u.Resident}, nil
}

func (s *selector) Name() string          { return "squeezed" }
func (s *selector) Config() paging.Config { return s.c }

func (s *selector) Groups(layer int) []paging.Group {
	if s.c.Dense(layer) {
		return []paging.Group{{Class: "all"}}
	}
	gs := make([]paging.Group, s.ix.KVHeads)
	for g := range gs {
		gs[g] = paging.Group{KVHeads: []int{g}, Budget: s.resident, Class: "all", Tokens: true}
	}
	return gs
}

// NeedQueries: centroids are scored at every step, as in the paper.
func (s *selector) NeedQueries(layer, _ int) bool { return !s.c.Dense(layer) }

func (s *selector) Select(layer int, sum paging.Summaries, q *paging.Queries, upto int) paging.Selection {
	P := s.c.PageSize
	n := paging.PagesOf(upto, P)
	if s.c.Dense(layer) || q == nil {
		return paging.One(paging.AllPages(n))
	}
	// Always attended: the sinks, and every token from the recent window
	// or the end of the clustered tokens, whichever comes first (the
	// observation window, the question and the answer are in no cluster),
	// but never more than the budget: a long answer pushes the tail's
	// start past the clustered tokens' end.
	sinks := min(s.c.Sinks, upto)
	tail := max(sinks, min(s.ix.Clustered, upto-s.c.Window), upto-(s.c.Budget-sinks))
	tokBudget := s.c.Budget - sinks - (upto - tail)
	G := q.Heads / s.ix.KVHeads
	d := s.ix.HeadDim
	sel := paging.Selection{Groups: make([][]int, s.ix.KVHeads), Tokens: make([][]int32, s.ix.KVHeads)}
	words := (upto + 63) / 64
	for g := 0; g < s.ix.KVHeads; g++ {
		h := s.ix.Heads[layer][g]
		// One ranked cluster list per (query token, query head), the last
		// token first: they share the budget round-robin. The lists are
		// kept end to end in s.flat (list i is s.flat[s.offs[i]:s.offs[i+1]]).
		s.flat, s.offs = s.flat[:0], append(s.offs[:0], 0)
		for t := len(q.Q) - 1; t >= 0 && tokBudget > 0; t-- {
			for j := 0; j < G; j++ {
				qh := q.Q[t][(g*G+j)*d : (g*G+j+1)*d]
				s.flat = s.rank(h, qh, tokBudget, s.flat)
				s.offs = append(s.offs, int32(len(s.flat)))
			}
		}
		// The chosen tokens as a bitmap over the positions: setting bits
		// dedups the sinks and tail against the clusters, and reading it
		// back lists them sorted, in O(upto/64 + tokens) instead of a sort.
		// taken: cluster j is taken in this group when seen[j] == epoch.
		if s.epoch++; s.epoch == 0 || len(s.seen) < h.K() {
			s.seen, s.epoch = make([]uint32, max(h.K(), len(s.seen))), 1
		}
		s.bits = append(s.bits[:0], make([]uint64, words)...)
		n := 0
		mark := func(t int32) {
			if w, b := t>>6, uint64(1)<<(t&63); s.bits[w]&b == 0 {
				s.bits[w] |= b
				n++
			}
		}
		lists := len(s.offs) - 1
		used := 0
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
				used += len(ct)
			}
			if !any {
				break
			}
		}
		for t := 0; t < sinks; t++ {
			mark(int32(t))
		}
		for t := tail; t < upto; t++ {
			mark(int32(t))
		}
		toks := make([]int32, 0, n)
		for w, word := range s.bits {
			for word != 0 {
				toks = append(toks, int32(w<<6+bits.TrailingZeros64(word)))
				word &= word - 1
			}
		}
		// The pages of the tokens: reports (Paged.Selected) and the
		// selection's check read them; the pool holds only the tokens.
		var ps []int
		for _, t := range toks {
			if p := int(t) / P; len(ps) == 0 || ps[len(ps)-1] != p {
				ps = append(ps, p)
			}
		}
		sel.Groups[g], sel.Tokens[g] = ps, toks
	}
	return sel
}

// rank returns h's clusters for query qh, best first: in budget mode the
// top clusters that fill budget tokens, in threshold mode those whose
// share reaches the calibrated threshold (log Z estimated from the
// coarse level, which can only under-estimate it: that admits at least
// the clusters the exact Z would).
func (s *selector) rank(h *Head, qh []float32, budget int, out []int32) []int32 {
	if !s.thresh {
		return h.Top(qh, budget, &s.sc, out)
	}
	lz := h.coarseLogZ(qh, &s.sc)
	tau := float32(math.Sqrt(float64(h.D)) * (math.Log(float64(s.ix.Threshold)) + lz))
	start := len(out)
	out = h.Above(qh, tau, &s.sc, out)
	score := make(map[int32]float32, len(out)-start)
	for _, j := range out[start:] {
		score[j] = vek32.Dot(qh, h.Centroids[int(j)*h.D:int(j+1)*h.D])
	}
	slices.SortFunc(out[start:], func(a, b int32) int {
		switch {
		case score[a] > score[b]:
			return -1
		case score[a] < score[b]:
			return 1
		}
		return int(a - b)
	})
	return out
}

// coarseLogZ is log Σ_c N_c exp(q·C_c/√d) over the coarse clusters (N_c
// the tokens under c): by Jensen a lower bound of log Z over the fine ones.
func (h *Head) coarseLogZ(q []float32, sc *Scratch) float64 {
	c := len(h.Radius)
	sc.coarse = grow(sc.coarse, c)
	matVec(sc.coarse, h.Coarse, q)
	inv := 1 / math.Sqrt(float64(h.D))
	logN := func(p int) float64 {
		var n int64
		for _, j := range h.Members[h.Offsets[p]:h.Offsets[p+1]] {
			n += int64(h.Sizes[j])
		}
		return math.Log(float64(n))
	}
	m := math.Inf(-1)
	for p := 0; p < c; p++ {
		m = max(m, float64(sc.coarse[p])*inv+logN(p))
	}
	var z float64
	for p := 0; p < c; p++ {
		z += math.Exp(float64(sc.coarse[p])*inv + logN(p) - m)
	}
	return m + math.Log(z)
}
