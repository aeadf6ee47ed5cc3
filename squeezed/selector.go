package squeezed

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"sync/atomic"

	"github.com/viterin/vek/vek32"

	"github.com/kvrecall/kvrecall/paging"
)

// OptionKey is the paging.Config.Options key under which the "squeezed"
// method finds its document's clusters: an *Index or a Use.
const OptionKey = "squeezed"

// KeepKey is the paging.Config.Options key (a float64) of an optional
// hysteresis for decode steps scored in the graph one step late
// (UseGraphScores; not for a pass's own scores, paging.StepScored), as quest's
// paging.KeepLogits: a cluster the last step took gets KeepKey attention
// logits (KeepKey·√headDim on q·c) added before the clusters are ranked,
// so it stays unless another scores that much higher. 0 (the default) is
// the paper's selection: each step's own top clusters. It trades the
// paper's selection for fewer uploads (docs/kvcache.md).
const KeepKey = "squeezed-keep"

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
	taken      []int32        // the clusters taken, in the order taken
	touched    int32          // tokenLists' touch of the taken clusters' lists (kept: the loads stay)
	sortA      []int32        // tokenLists' clustered positions to sort
	sortB      []int32        // radixSort32's other buffer
	hist       [4][256]uint32 // radixSort32's digit counts
	cbits      []uint64       // rowRuns' bitmap over the clusters
	single     []int32        // rowRuns' single rows (clustered sinks and tail), ascending
	rowTmp     []int32        // rowRuns' scratch: a few sinks' rows, sorted
	tailTmp    []int32        // rowRuns' scratch: the clustered tail's rows, ascending
	bufs       [][]selBufs
	sinkRow    [][][]int32   // per layer and KV head: the rows of the sinks in its order, by position
	sinkSorted [][][]int32   // the same rows ascending
	tailRow    [][]*tailRows // per layer and KV head: its last clustered positions' rows

	// Decode steps scored in the graph (paging.CentroidScored): the
	// centroid rows per layer (built once), the scores of the last decode
	// step per layer ([heads][k]), and per layer and KV head the ranked
	// lists the last scoring produced (flat end to end, offs), which a
	// decode step with no scores yet (the first after a question) reuses.
	graph   bool
	version uint64
	cents   [][]float32
	centK   []int
	scores  map[int][]float32
	lists   map[int][]rankedLists
	keep    float64           // KeepKey
	held    map[int][][]int32 // per layer and KV head: the clusters the last pass took
	adj     []float32         // a score row with the held clusters' bonus

	// Host lookups in budget mode (the default path): per layer and KV
	// head, the centroids scored by the first lookups (Head.Top, the
	// hierarchy) and how many lookups that was; once the hierarchy is
	// seen not to prune, the head's centroids transposed (flat), scored
	// for the GQA group at once and ranked by TopRanked.
	probed [][][2]int
	flatTr [][]*Transposed // the Index's shared layouts (Head.Flat)
	sbuf   []float32       // [G][K] scores of the flat lookup
	tmp    []float32       // Transposed.Scores' scratch
}

// Hierarchy probing: after probeLookups host lookups of a head, if Top
// scored at least probeScored of its fine and coarse centroids on
// average, the coarse bounds do not prune on this head's keys (the tiny
// preset's random ones: every bound passes) and it is scored flat, every
// centroid for the whole GQA group in one read of them, then ranked by
// TopRanked: the same clusters in the same order (FlatTop's answer, which
// Top equals), at 0.6 ms instead of 1.7–2.2 ms per decode step at 64k on
// the tiny preset (BenchmarkStepLimit, docs/performance.md). A head whose
// keys have structure keeps the hierarchy.
const (
	probeLookups = 8
	probeScored  = 0.75
)

// flatHead returns the transposed centroids of layer's KV head g once it
// is scored flat, else nil (still probing, or hierarchical).
func (s *selector) flatHead(layer, g int) *Transposed {
	if s.flatTr == nil {
		s.flatTr, s.probed = make([][]*Transposed, s.ix.Layers), make([][][2]int, s.ix.Layers)
	}
	if s.flatTr[layer] == nil {
		s.flatTr[layer], s.probed[layer] = make([]*Transposed, s.ix.KVHeads), make([][2]int, s.ix.KVHeads)
	}
	return s.flatTr[layer][g]
}

// probe records one Top lookup of layer's KV head g that scored n
// centroids, and lays the head out flat once it is seen not to prune.
func (s *selector) probe(layer, g, n, G int) {
	p := &s.probed[layer][g]
	if p[0] >= probeLookups {
		return // decided: hierarchical
	}
	p[0]++
	p[1] += n
	if p[0] < probeLookups {
		return
	}
	h := s.ix.Heads[layer][g]
	if float64(p[1]) >= probeScored*float64(p[0]*(h.K()+len(h.Radius))) {
		s.flatTr[layer][g] = h.Flat(G) // shared by the document's sessions
	}
}

// rankedLists is one KV head's ranked cluster lists: list i is
// flat[offs[i]:offs[i+1]].
type rankedLists struct{ flat, offs []int32 }

// versions numbers centroid sets: each selector's (its document's) own.
var versions atomic.Uint64

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
	var keep float64
	switch v := c.Options[KeepKey].(type) {
	case nil:
	case float64:
		keep = v
	case int:
		keep = float64(v)
	default:
		// A setting of the wrong type would otherwise be read as 0, silently.
		return nil, fmt.Errorf("squeezed: Options[%q] is a %T, want a number of attention logits", KeepKey, v)
	}
	if v, set := c.Options[paging.StepScoresKey]; set {
		if _, ok := v.(bool); !ok {
			return nil, fmt.Errorf("squeezed: Options[%q] is a %T, want a bool", paging.StepScoresKey, v)
		}
	}
	if keep < 0 || math.IsNaN(keep) {
		return nil, fmt.Errorf("squeezed: %s %v: the hysteresis must be ≥ 0 attention logits", KeepKey, keep)
	}
	return &selector{c: c, ix: u.Index, thresh: u.Threshold, resident: u.Resident, lists: map[int][]rankedLists{},
		keep: keep, held: map[int][][]int32{}}, nil
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

// NeedQueries: centroids are scored at every step, as in the paper; a
// decode step whose scores the cache computes in the graph
// (UseGraphScores) needs no queries on the host.
func (s *selector) NeedQueries(layer, batch int) bool {
	return !s.c.Dense(layer) && !(s.graph && batch == 1)
}

// UseGraphScores implements paging.GraphScored: decode steps take their
// clusters from the centroid scores the cache computed in the previous
// step's graph (one step late), ranked by the same rule as on the host.
// Multi-token passes (a question) keep the host lookup of their own
// queries. Only with Config.Options[paging.HostScores] set to false:
// one step late lost needles the host lookup finds (TestSqueezedNeedle,
// recall model, depth 10%, in threshold mode and then in budget mode: the
// answer repeated a token whose cluster the previous query had chosen),
// so the paper's per-step lookup on the host stays the default.
func (s *selector) UseGraphScores() bool {
	if host, set := s.c.Options[paging.HostScores].(bool); host || !set {
		return false
	}
	s.graph, s.version = true, versions.Add(1)
	s.scores = map[int][]float32{}
	return true
}

// GraphScores implements paging.GraphScored: every clustered layer's
// decode step, while the budget leaves room for clusters.
func (s *selector) GraphScores(layer, batch, upto int) bool {
	if !s.graph || batch != 1 || s.c.Dense(layer) {
		return false
	}
	_, _, tokBudget := s.bounds(upto + 1)
	return tokBudget > 0
}

// Scored implements paging.GraphScored: layer's centroid scores, [heads][k]
// as Centroids lays the rows out, from the step that ended at upto.
func (s *selector) Scored(layer int, scores []float32, _ int) {
	if s.graph {
		s.scores[layer] = append(s.scores[layer][:0], scores...)
	}
}

// Centroids implements paging.CentroidScored: per KV head g, the fine
// centroids (rows 0..K_g-1), then the coarse ones (rows K_g..K_g+C_g-1:
// threshold mode's log Z reads their scores), then zero rows up to k: the
// largest K_g+C_g of the layer rounded up to a multiple of centRowAlign.
func (s *selector) Centroids(layer int) ([]float32, int, uint64) {
	if s.cents == nil {
		s.cents, s.centK = make([][]float32, s.ix.Layers), make([]int, s.ix.Layers)
	}
	if s.cents[layer] == nil {
		d, k := s.ix.HeadDim, 0
		for _, h := range s.ix.Heads[layer] {
			k = max(k, h.K()+len(h.Radius))
		}
		k = (k + centRowAlign - 1) / centRowAlign * centRowAlign
		rows := make([]float32, s.ix.KVHeads*k*d)
		for g, h := range s.ix.Heads[layer] {
			at := g * k * d
			at += copy(rows[at:], h.Centroids)
			copy(rows[at:], h.Coarse)
		}
		s.cents[layer], s.centK[layer] = rows, k
	}
	return s.cents[layer], s.centK[layer], s.version
}

// centRowAlign is what Centroids' k is a multiple of. The cache scores
// the rows with one ggml mul_mat ([headDim, k, kvHeads] × the queries),
// and ggml's CPU backend hands it to llamafile's tinyBLAS only when k is
// a multiple of 4 (of 16 to split it across threads by blocks); otherwise
// it falls back to one vec_dot call per row and query head. At 1b and
// 32k (one decode thread, the Xeon of docs/performance.md) the product
// took 15.7 ms of squeezed's step that way and 12-13 ms through tinyBLAS,
// which is then bound by reading the 55 MiB of f32 centroids (perf on
// BenchmarkQuestFromDisk). The zero rows cost 15 rows a KV head at most.
const centRowAlign = 16

// StepScores implements paging.StepScored: a clustered layer's one-token
// passes take their own centroid scores from the graph, unless decode
// steps use the lagged ones (UseGraphScores) or Options[StepScoresKey]
// is false.
func (s *selector) StepScores(layer int) bool {
	if on, set := s.c.Options[paging.StepScoresKey].(bool); set && !on {
		return false
	}
	return !s.graph && !s.c.Dense(layer)
}

// bounds returns the tokens always attended and the budget left for
// clusters at upto: the sinks, and every token from the recent window or
// the end of the clustered tokens, whichever comes first (the observation
// window, the question and the answer are in no cluster), but never more
// than the budget: a long answer pushes the tail's start past the
// clustered tokens' end.
func (s *selector) bounds(upto int) (sinks, tail, tokBudget int) {
	sinks = min(s.c.Sinks, upto)
	tail = max(sinks, min(s.ix.Clustered, upto-s.c.Window), upto-(s.c.Budget-sinks))
	return sinks, tail, s.c.Budget - sinks - (upto - tail)
}

func (s *selector) Select(layer int, sum paging.Summaries, q *paging.Queries, upto int) paging.Selection {
	P := s.c.PageSize
	n := paging.PagesOf(upto, P)
	if s.c.Dense(layer) || q == nil && !s.graph {
		return paging.One(paging.AllPages(n))
	}
	sinks, tail, tokBudget := s.bounds(upto)
	// The cache reads the clustered tokens from the rows alone (a decode
	// step attended in place): the full sorted list (tokenLists: gather,
	// radix sort, pages, ~5-6.6 ms of a 1b step at 32k) is not built.
	rowsOnly := q != nil && q.RowsSuffice
	sel := paging.Selection{Groups: make([][]int, s.ix.KVHeads), Tokens: make([][]int32, s.ix.KVHeads),
		Rows: make([][]int32, s.ix.KVHeads), RowsOnly: rowsOnly}
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
		case q != nil && q.Scores != nil && len(q.Q) == 1 && tokBudget > 0:
			// This pass's own scores, computed in its graph (StepScored):
			// the host lookup's ranking of the same products.
			k := s.stepK(layer, q)
			G := q.Heads / s.ix.KVHeads
			for j := 0; j < G; j++ {
				s.flat = s.rankScores(h, q.Scores[(g*G+j)*k:(g*G+j+1)*k], tokBudget, s.flat)
				s.offs = append(s.offs, int32(len(s.flat)))
			}
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
					s.tmp = tr.Scores(s.sbuf, q.Q[t][g*G*d:(g+1)*G*d], s.tmp)
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
		// Take clusters round-robin from the lists until the budget's
		// tokens are filled: cluster j is taken in this group when
		// seen[j] == epoch; s.taken lists them in the order taken.
		if s.epoch++; s.epoch == 0 || len(s.seen) < h.K() {
			s.seen, s.epoch = make([]uint32, max(h.K(), len(s.seen))), 1
		}
		s.taken = s.taken[:0]
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
				size := int(h.tokOff[j+1] - h.tokOff[j])
				if size > tokBudget-used {
					continue // too many tokens for what is left
				}
				s.taken = append(s.taken, j)
				used += size
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
			hs[g] = append(hs[g][:0], s.taken...)
		}
		buf := s.bufsFor(layer, g)
		rows := s.rowRuns(layer, g, h, sinks, tail, upto, buf.rows[buf.turn])
		var toks []int32
		var ps []int
		if rowsOnly {
			// The rows stand for the clustered positions: only the loose
			// ones past the order are listed (paging.Selection.RowsOnly).
			toks, ps = s.looseLists(len(h.tokens), sinks, tail, upto, buf.toks[buf.turn], buf.ps[buf.turn])
		} else {
			toks, ps = s.tokenLists(h, used, sinks, tail, upto, buf.toks[buf.turn], buf.ps[buf.turn])
		}
		buf.toks[buf.turn], buf.ps[buf.turn], buf.rows[buf.turn] = toks, ps, rows
		sel.Groups[g], sel.Tokens[g], sel.Rows[g] = ps, toks, rows
	}
	return sel
}

// stepK is the score row length of layer's Queries.Scores: Centroids'
// k. A row count that does not match is a bug of the cache's.
func (s *selector) stepK(layer int, q *paging.Queries) int {
	_, k, _ := s.Centroids(layer)
	if len(q.Scores) != k*q.Heads {
		panic(fmt.Sprintf("squeezed: layer %d: %d step scores for %d heads of %d centroids", layer, len(q.Scores), q.Heads, k))
	}
	return k
}

// rankScores is rank from the scores the graph computed, fine[j] = q·c_j
// for j < K followed by the coarse clusters' q·C_c (Centroids' rows): in
// budget mode FlatTop's answer, in threshold mode FlatAbove's clusters
// ranked as rank ranks them, with log Z from the coarse scores.
func (s *selector) rankScores(h *Head, row []float32, budget int, out []int32) []int32 {
	k := h.K()
	fine := row[:k]
	if !s.thresh {
		return h.TopRanked(fine, budget, &s.sc, out)
	}
	lz := h.logZFrom(row[k : k+len(h.Radius)])
	tau := float32(math.Sqrt(float64(h.D)) * (math.Log(float64(s.ix.Threshold)) + lz))
	start := len(out)
	for j, v := range fine {
		if v >= tau {
			out = append(out, int32(j))
		}
	}
	sortByScore(out[start:], func(j int32) float32 { return fine[j] })
	return out
}

// sortByScore orders clusters ids best first by score, ties by the lower
// cluster.
func sortByScore(ids []int32, score func(int32) float32) {
	slices.SortFunc(ids, func(a, b int32) int {
		switch sa, sb := score(a), score(b); {
		case sa > sb:
			return -1
		case sa < sb:
			return 1
		}
		return int(a - b)
	})
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
	sortByScore(out[start:], func(j int32) float32 { return score[j] })
	return out
}

// coarseLogZ is log Σ_c N_c exp(q·C_c/√d) over the coarse clusters (N_c
// the tokens under c): by Jensen a lower bound of log Z over the fine ones.
func (h *Head) coarseLogZ(q []float32, sc *Scratch) float64 {
	sc.coarse = grow(sc.coarse, len(h.Radius))
	matVec(sc.coarse, h.Coarse, q)
	return h.logZFrom(sc.coarse)
}

// logZFrom is coarseLogZ from the coarse scores q·C_c.
func (h *Head) logZFrom(coarse []float32) float64 {
	c := len(h.Radius)
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
		m = max(m, float64(coarse[p])*inv+logN(p))
	}
	var z float64
	for p := 0; p < c; p++ {
		z += math.Exp(float64(coarse[p])*inv + logN(p) - m)
	}
	return m + math.Log(z)
}
