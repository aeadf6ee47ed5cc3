package paging

import (
	"math"
	"slices"
)

// GraphScored is implemented by selectors whose per-step scores a cache can
// compute inside the forward pass's own graph, so that a decode step needs
// no host round trip of queries (no graph split per layer). quest does:
// its bound for one query head over every page is one matrix product of
// the packed key boxes ([center; radius] rows, PackedBoxes) with
// [q; |q|], which the cache keeps as a backend tensor.
//
// The scores of a pass come back after its graph ran, so they choose the
// pages of the next pass: a one-step lag. The cache calls UseGraphScores
// once, when it can compute them; until then the selector asks for the
// queries as before (NeedQueries) and scores on the host.
type GraphScored interface {
	// UseGraphScores switches the selector to in-graph scores for decode
	// steps (single-token passes); multi-token passes (a question) keep
	// the exact host scoring of their own queries. It reports whether the
	// selector took them (not with Config.Options[HostScores] set).
	UseGraphScores() bool
	// GraphScores reports whether the cache must compute layer's page
	// bounds in the graph of a pass of batch tokens ending at upto (the
	// last query's position + 1).
	GraphScores(layer, batch, upto int) bool
	// Scored hands over layer's page bounds computed in the graph, one per
	// page (the maximum over query heads), from the queries of the pass
	// that ended at upto. They choose the next pass's pages. scores is
	// the cache's: valid during the call only.
	Scored(layer int, scores []float32, upto int)
}

// CentroidScored is a GraphScored selector whose in-graph scores are the
// plain products of each query head with fixed vectors of its KV head
// (squeezed's cluster centroids), not Quest's box bound. The cache keeps a
// layer's vectors as one backend tensor, f32 [headDim, k, kvHeads],
// uploaded when their version changes (once per session: the vectors are
// the document's), scores every query head against its KV head's k rows
// with one mul_mat per layer, and hands Scored the k scores of each query
// head h at scores[h·k : (h+1)·k]. It works for any head groups.
type CentroidScored interface {
	GraphScored
	// Centroids returns layer's vectors, [kvHeads][k][headDim] flattened
	// (a KV head with fewer than k pads with rows whose scores it
	// ignores), and their version: the same version means the same rows.
	Centroids(layer int) (rows []float32, k int, version uint64)
}

// StepScored is a CentroidScored selector that can select a one-token
// pass from that pass's own centroid scores (Queries.Scores), computed by
// the cache in the pass's graph before the selection, instead of scoring
// the queries on the host. Not lagged: the selection is the host lookup's
// (the same ranking of the same products, summed in another order). On
// the CPU the host lookup ran on one thread while the graph's other
// threads waited for the selection (squeezed at the 1b preset: issue 14);
// in the graph the product is split across them. The cache computes them
// where the pass selects inside its graph (kvcache.SelectInGraph).
type StepScored interface {
	CentroidScored
	// StepScores reports whether layer's one-token passes take their own
	// scores with their queries (not with Config.Options[StepScoresKey]
	// set to false).
	StepScores(layer int) bool
}

// StepScoresKey is the Config.Options key (a bool) that, set to false,
// keeps a StepScored selector's scoring on the host: for comparisons.
const StepScoresKey = "step-scores"

// HostScores is the Config.Options key that keeps a GraphScored method's
// decode steps on the host (true): every step then splits the graph per
// layer for the queries and scores its own queries exactly, as before
// in-graph scoring. For comparisons and tests.
const HostScores = "host-scores"

// KeepLogits is the Config.Options key (a float64) of the lagged rule's
// hysteresis: a page selected at the last step keeps its place unless a
// page outside scores more than KeepLogits attention logits higher
// (bound·/√headDim). 0 takes the lagged top pages every step.
const KeepLogits = "quest-keep"

// DefaultKeepLogits is KeepLogits' default (see docs/kvcache.md, "Where
// the selector runs", for the measurements that chose it).
const DefaultKeepLogits = 4.0

// graphState is a scored selector's in-graph scoring state, per layer.
type graphState struct {
	on     bool
	keep   float64           // KeepLogits
	scores map[int][]float32 // the last decode step's page bounds
	kept   map[int][]int     // the pages the last pass chose beyond sinks and window
	// sx is the lagged rule's working memory, one for all layers (they
	// are selected one after another): a step's ranking allocates nothing
	// but the selection it returns, and the same few KiB stay in cache
	// from layer to layer.
	sx rankScratch
}

func (r *scored) UseGraphScores() bool {
	if _, ok := r.s.(boxScorer); !ok {
		return false // only Quest's bound has a graph form here
	}
	if host, _ := r.c.Options[HostScores].(bool); host {
		return false
	}
	keep := DefaultKeepLogits
	if v, ok := r.c.Options[KeepLogits].(float64); ok {
		keep = v
	}
	r.g = graphState{on: true, keep: keep, scores: map[int][]float32{}, kept: map[int][]int{}}
	return true
}

// boxScorer marks scorers whose scores are Quest's box bound (the form
// kvcache computes in the graph).
type boxScorer interface{ boxBound() }

func (questScorer) boxBound() {}

// graphStep reports whether layer's pass of batch tokens is scored in the
// graph (and selected from the previous step's scores).
func (r *scored) graphStep(layer, batch int) bool {
	return r.g.on && batch == 1 && !r.c.Dense(layer) && r.s.When() == PerStep
}

func (r *scored) GraphScores(layer, batch, upto int) bool {
	if !r.graphStep(layer, batch) {
		return false
	}
	req, free := r.c.Required(upto)
	return free < PagesOf(upto, r.c.PageSize)-len(req) // else every page fits the budget
}

func (r *scored) Scored(layer int, scores []float32, _ int) {
	if r.g.on {
		r.g.scores[layer] = append(r.g.scores[layer][:0], scores...)
	}
}

// lagged is the selection of a decode step scored in the graph: sinks and
// window, then the best pages by the previous step's bounds (with their
// neighbours) within the budget, where the pages the last pass chose get
// keep·√headDim added (hysteresis). The first decode step after a
// host-scored pass (a question) has no bounds yet and keeps that pass's
// pages.
func (r *scored) lagged(layer int, s Summaries, upto int) Selection {
	n := PagesOf(upto, r.c.PageSize)
	req, free := r.c.Required(upto)
	if free >= n-len(req) {
		return One(AllPages(n))
	}
	kept := r.g.kept[layer]
	sc, ok := r.g.scores[layer]
	var sel []int
	if !ok {
		sel = fillFrom(req, kept, free, r.neighbors, n)
	} else {
		adj := r.g.sx.floats(n) // every entry is written below
		ninf := float32(math.Inf(-1))
		for p := range adj {
			adj[p] = ninf
			if p < len(sc) {
				adj[p] = sc[p]
			}
		}
		if r.g.keep != 0 {
			bonus := float32(r.g.keep * math.Sqrt(float64(s.HeadDim())))
			for _, p := range kept {
				if p < n {
					adj[p] += bonus
				}
			}
		}
		sel = r.g.sx.topPages(req, adj, free, r.neighbors)
	}
	r.g.kept[layer] = beyond(req, sel, r.g.kept[layer][:0])
	return One(sel)
}

// fillFrom adds to req the pages of order (each with up to neighbors
// following pages) below n until free pages are added; sorted.
func fillFrom(req, order []int, free, neighbors, n int) []int {
	in := make([]bool, n)
	for _, p := range req {
		in[p] = true
	}
	out := slices.Clone(req)
	for _, p := range order {
		for k := 0; k <= neighbors && p+k < n && free > 0; k++ {
			if !in[p+k] {
				in[p+k] = true
				out = append(out, p+k)
				free--
			}
		}
	}
	slices.Sort(out)
	return out
}

// beyond appends to dst the pages of sel not in req.
func beyond(req, sel, dst []int) []int {
	for _, p := range sel {
		if !contains(req, p) {
			dst = append(dst, p)
		}
	}
	return dst
}

// remember keeps a host-scored pass's pages beyond req for the decode
// step after it, and drops the last bounds (scored before this pass).
func (r *scored) remember(layer int, req, sel []int) {
	if !r.g.on {
		return
	}
	r.g.kept[layer] = beyond(req, sel, r.g.kept[layer][:0])
	delete(r.g.scores, layer)
}

// QuestBounds is quest's host scorer: per query token of q, each of pages
// pages' bound Σ_i max(q_i·max_i, q_i·min_i), the largest over the query
// heads (-Inf past s.Pages()). The graph's bounds (kvcache) are checked
// against it.
func QuestBounds(s Summaries, q *Queries, pages int) [][]float32 {
	return scoreBoxes(s, q, pages)
}
