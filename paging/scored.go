package paging

import "slices"

// Scorer scores a layer's pages against the queries of a batch. Methods
// that rank pages (quest, retro, and those other packages register) are
// Scorers wrapped by NewScored, so that they share one top-k rule.
type Scorer interface {
	// When says when scores need queries: PerStep scores every forward
	// pass; PerQuestion scores each multi-token batch and keeps its pages
	// for the decode steps that follow.
	When() When
	// Score returns, per query token, a score for each of pages pages
	// (higher is better). Pages the summaries do not hold yet may get -Inf.
	Score(layer int, s Summaries, q *Queries, pages int) [][]float32
}

// scored is a Selector over a Scorer: sinks and window always, then the
// best pages of each query token in turn (round-robin), each with up to
// neighbors following pages, within the budget. With PerQuestion it keeps
// the pages a question retrieved (its own state, one per session) for the
// decode steps after it, while sinks and window move on.
type scored struct {
	name      string
	c         Config
	s         Scorer
	neighbors int
	frozen    map[int][]int // per layer: pages the last question retrieved beyond sinks and window
	g         graphState    // in-graph scores of decode steps (GraphScored), when the cache computes them
}

// NewScored returns a selector that ranks pages with s under c's budget.
func NewScored(name string, c Config, s Scorer, neighbors int) (Selector, error) {
	if err := c.CheckBudget(); err != nil {
		return nil, err
	}
	return &scored{name: name, c: c, s: s, neighbors: neighbors, frozen: map[int][]int{}}, nil
}

func (r *scored) Name() string   { return r.name }
func (r *scored) Config() Config { return r.c }

func (r *scored) Groups(layer int) []Group {
	if r.c.Dense(layer) {
		return []Group{{Class: "all"}}
	}
	return []Group{{Budget: r.c.Budget, Class: "all"}}
}

func (r *scored) NeedQueries(layer, batch int) bool {
	if r.c.Dense(layer) {
		return false
	}
	switch r.s.When() {
	case PerStep:
		return !r.graphStep(layer, batch)
	case PerQuestion:
		return batch > 1
	}
	return false
}

func (r *scored) Select(layer int, s Summaries, q *Queries, upto int) Selection {
	n := PagesOf(upto, r.c.PageSize)
	if r.c.Dense(layer) {
		return One(AllPages(n))
	}
	if q == nil && r.g.on && r.s.When() == PerStep {
		return r.lagged(layer, s, upto)
	}
	req, free := r.c.Required(upto)
	if q == nil || free == 0 {
		if r.s.When() == PerQuestion {
			// Keep what the question retrieved; sinks and window are
			// recomputed at every step, so the answer's pages stay within
			// the budget (give or take the page the window leaves).
			return One(union(req, r.frozen[layer], n))
		}
		return One(req)
	}
	sel := roundRobin(req, r.s.Score(layer, s, q, n), free, r.neighbors)
	r.remember(layer, req, sel)
	if r.s.When() == PerQuestion {
		fr := r.frozen[layer][:0]
		for _, p := range sel {
			if !contains(req, p) {
				fr = append(fr, p)
			}
		}
		r.frozen[layer] = fr
	}
	return One(sel)
}

func contains(list []int, p int) bool { return slices.Contains(list, p) }

// union returns the sorted pages of a and of b below limit.
func union(a, b []int, limit int) []int {
	out := make([]int, 0, len(a)+len(b))
	out = append(out, a...)
	for _, p := range b {
		if p < limit && !contains(out, p) {
			out = append(out, p)
		}
	}
	slices.Sort(out)
	return out
}
