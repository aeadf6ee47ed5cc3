// Package paging decides which pages of the KV cache each layer's attention
// sees. It is the selection seam: every method (dense, window, quest, retro,
// and those other packages register) is a Selector built by name from a
// registry, one per session, owning its own state. A Selector splits each
// layer's KV heads into groups, each with its own budget and device pool,
// and picks each group's pages from the page summaries (and, if it asks for
// them, the layer's roped queries). kvcache places, uploads and masks what a
// Selection says and knows no method by name.
//
// Built in: dense (every page), window (StreamingLLM: sinks + recent tokens),
// quest (Quest: per step and layer, the pages with the largest upper bound
// of q·k from per-channel key min/max) and retro (RetroLM-style without
// training: pages scored once per question from the question tokens'
// queries against mean and representative keys; the chosen pages serve the
// whole answer). Score-based methods are Scorers that share one top-k rule
// (NewScored): sinks, window, neighbours, and the question's tokens sharing
// the budget round-robin.
package paging

import (
	"fmt"
	"slices"
)

// Summaries is what a selector may read about the pages of one layer.
// Vectors are [headDim] for one KV head; they stay valid until the next write.
type Summaries interface {
	Pages() int       // pages holding tokens, the last possibly partial
	Len(page int) int // tokens in page
	KVHeads() int     // key/value heads
	HeadDim() int     // dimension of a head
	Mean(page, kvHead int) []float32
	Min(page, kvHead int) []float32
	Max(page, kvHead int) []float32
	// Box returns the key box as its center (max+min)/2 and radius (max-min)/2.
	Box(page, kvHead int) (center, radius []float32)
	// Reps returns up to a few representative keys of a closed page.
	Reps(page, kvHead int) [][]float32
}

// PackedBoxes is an optional extension of Summaries: every page's key box
// for KV head g as rows of 2*HeadDim floats, center then radius,
// [Pages()][2*HeadDim]. quest then scores all pages for a query head with
// one matrix-vector product against [q; |q|] instead of two short dot
// products per page. Valid until the next write.
type PackedBoxes interface {
	PackedBoxes(kvHead int) []float32
}

// KeyReader is an optional extension of Summaries: the roped keys
// themselves, for methods that derive their own summaries from them (probe:
// block representatives from local attention). Key copies the key of
// position pos, KV head kvHead, into dst [HeadDim]; pos must be below the
// tokens written so far.
type KeyReader interface {
	Key(pos, kvHead int, dst []float32)
}

// PassStarter is implemented by selectors whose groups' budgets change
// between forward passes (probe's per-layer cut-off). The cache calls
// StartPass at the start of every forward pass, with the first position
// and the number of tokens of the batch, and then reads Groups(layer)
// again: a group's Budget may differ from the last pass (its pool is
// resized), its heads may not.
type PassStarter interface {
	StartPass(pos0, batch int)
}

// Queries are the roped queries of the current batch for one layer:
// Q[token][head*HeadDim + d], with Heads query heads; query head h reads KV
// head h / (Heads / KVHeads).
//
// RowsSuffice, set by the cache, says that this pass reads a
// token-granular group's earlier tokens from its Rows wherever a
// TokenOrdered selector lists them (kvcache: a decode step of staged
// groups, whose runs the attention reads in place from the
// cluster-ordered copy): the selector may then answer in the rows-only
// form (Selection.RowsOnly) and skip sorting the full token list, which
// was ~1/3 of squeezed's Select at the 1b preset (issue 14). Off, or
// with nil Queries (a selection made before the pass's queries), the
// answer lists every token.
//
// Scores, set by the cache for a StepScored selector, are this pass's own
// scores against the selector's centroids (CentroidScored.Centroids): a
// one-token pass, scores[h·k : (h+1)·k] the products of query head h with
// the k rows of its KV head, computed by the cache in the pass's graph
// with every thread (one mul_mat per layer), as Scored hands over the
// lagged ones. The selector may rank from them instead of scoring Q on
// the host. Valid during Select only (the graph's memory); nil otherwise.
type Queries struct {
	Q           [][]float32
	Heads       int
	RowsSuffice bool
	Scores      []float32
}

// When says when a scorer needs the queries of a layer.
type When int

const (
	Never       When = iota // selection depends on positions only
	PerQuestion             // once for each multi-token batch (a question); decode steps reuse it
	PerStep                 // every forward pass
)

// Config is shared by all selectors. Budget counts every attended token,
// sinks and window included.
type Config struct {
	PageSize    int // tokens per page
	Budget      int // tokens attended per query (0: every token)
	Sinks       int // first tokens always attended (default 64)
	Window      int // most recent tokens always attended (default 256)
	DenseLayers int // layers 0..DenseLayers-1 attend to everything
	Neighbors   int // retro: pages after each retrieved page also kept (default 1; <0: none)

	// The model's shape, for methods that treat heads or layers apart
	// (zero where unknown: single-group methods do not need it).
	Layers, KVHeads int

	// Options carry method-specific settings, keyed by the method or
	// modifier name that reads them (heads: its head classes).
	Options map[string]any
}

// Defaults for Config fields left at zero.
const (
	DefaultSinks  = 64
	DefaultWindow = 256
	DefaultBudget = 2048
)

// Group is a set of a layer's KV heads that attend to the same pages. Each
// group has its own device pool, sized by its budget, so a group that sees
// fewer tokens also holds and computes less.
type Group struct {
	// KVHeads lists the group's KV heads in ascending order; nil means
	// every KV head of the layer (the only group).
	KVHeads []int
	// Budget is the tokens the group attends per query, sinks and window
	// included; <= 0 means every token (a dense pool).
	Budget int
	// Class names the group in reports ("all", "retrieval", "streaming",
	// "windowed").
	Class string
	// Tokens makes the group's residency token-granular: its device pool
	// holds single tokens, any positions, in cells (as many as the pages
	// a page pool of the same Budget would have, times the page size),
	// and only the tokens its selection lists are uploaded. Its every
	// Selection must then list Tokens for it. Off (every built-in
	// method), the pool holds whole pages.
	Tokens bool
	// Window, if > 0, makes the group a sliding-window group (a model's
	// windowed layer, gemma's local attention): each query attends only
	// to the Window positions ending at itself, whatever pages are
	// selected, and the pool holds Window tokens (Budget is ignored).
	Window int
}

// Selection is a layer's choice: Groups[i] lists the sorted, distinct page
// ids that group i of Selector.Groups(layer) attends to.
//
// Tokens, if set, narrows the choice to single tokens: Tokens[i] lists the
// sorted, distinct positions group i attends to, each on one of its pages
// (a nil list: every token of its pages). For a page-granular group the
// pages stay resident whole and the mask hides their other tokens; a
// token-granular group (Group.Tokens, which must list them) holds only
// the listed tokens. The batch's own tokens are always attended
// (causally), listed or not.
//
// Rows, if set (by a TokenOrdered selector, for a token-granular group),
// says the same choice as runs of the group's TokenOrder: Rows[i] is a
// list of half-open [start, end) pairs, sorted and disjoint, of rows of
// TokenOrder(layer, i), and those rows' positions are exactly the listed
// Tokens[i] below len(order); the rest of Tokens[i] (positions at or past
// len(order): the observation window, the question, the answer) is a
// suffix of the sorted list. The cache can then copy each run of a
// cluster-ordered copy of the document's KV with one memmove instead of
// gathering its tokens one by one. A nil Rows[i] (or Rows): no runs, every
// token is taken where it lies.
//
// RowsOnly is the rows-only form, allowed only in answer to Queries with
// RowsSuffice set (the cache refuses it otherwise). For every group i
// with Rows[i] set, the rows alone stand for the positions below
// len(order) (order = TokenOrder(layer, i); the rows' positions are
// distinct, as the order is a permutation): Tokens[i] lists only the
// chosen positions at or past len(order), sorted (the suffix of the full
// list: the observation window, the question, the answer), and Groups[i]
// only their pages. The whole choice is the rows' positions plus
// Tokens[i], as in the full form; its pages (for reports) are the cache's
// to derive from the order. Groups with a nil Rows[i] keep the full form.
type Selection struct {
	Groups   [][]int
	Tokens   [][]int32
	Rows     [][]int32
	RowsOnly bool
}

// TokenOrdered is implemented by selectors whose token-granular groups
// choose tokens in fixed blocks (squeezed's clusters). TokenOrder returns
// the document's positions [0, len(order)) in the order a gather should
// keep them (row r is position order[r]; a permutation, so that each
// block is a run of rows), or nil where the group has none; and the
// blocks as ascending row bounds (block j is rows [blocks[j],
// blocks[j+1]), blocks[0] = 0, the last len(order); nil: none). The
// cache keeps the copy token-major, so that any run of rows is read as
// its own bytes; it does not use the blocks (squeezed's clusters: a
// selection's runs are whole clusters and sinks). The slice identifies the order: the cache keeps one
// cluster-ordered copy of the document's keys and values per (layer,
// group, order) and shares it with every session of the document, so
// neither slice may change while the selector lives (a different
// clustering is a different slice).
type TokenOrdered interface {
	TokenOrder(layer, group int) (order, blocks []int32)
}

// One is the selection of a single-group layer.
func One(pages []int) Selection { return Selection{Groups: [][]int{pages}} }

// Union returns the sorted pages any group attends to.
func (s Selection) Union() []int {
	var out []int
	for _, g := range s.Groups {
		out = append(out, g...)
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// Selector chooses pages for one sequence. It may keep state between
// forward passes (retro's retrieved pages, a probe's statistics), so each
// session has its own and uses it from one goroutine.
type Selector interface {
	// Name is the method's registered name (with modifiers: "retro+heads").
	Name() string
	Config() Config
	// Groups splits layer's KV heads into groups; the budgets size the
	// layer's device pools. The heads are fixed for the selector's life;
	// the budgets too, unless the selector is a PassStarter.
	Groups(layer int) []Group
	// NeedQueries reports whether Select needs layer's queries for a
	// forward pass of batch tokens (they cost a round trip to the host).
	NeedQueries(layer, batch int) bool
	// Select returns layer's pages, one list per group, when the sequence
	// holds upto tokens (the last query's position + 1). q is nil when
	// NeedQueries said no.
	Select(layer int, s Summaries, q *Queries, upto int) Selection
}

// Fill applies the defaults to c's zero fields and checks it.
func (c Config) Fill() (Config, error) {
	if c.PageSize <= 0 {
		return c, fmt.Errorf("paging: page size %d", c.PageSize)
	}
	if c.Sinks == 0 {
		c.Sinks = DefaultSinks
	}
	if c.Window == 0 {
		c.Window = DefaultWindow
	}
	if c.Sinks < 0 || c.Window < 0 || c.Budget < 0 || c.DenseLayers < 0 {
		return c, fmt.Errorf("paging: negative setting in budget %d, sinks %d, window %d, dense layers %d", c.Budget, c.Sinks, c.Window, c.DenseLayers)
	}
	if c.Neighbors == 0 {
		c.Neighbors = 1
	}
	if c.Neighbors < 0 {
		c.Neighbors = 0
	}
	return c, nil
}

// CheckBudget refuses a budget that cannot hold the sinks, the window and
// one page.
func (c Config) CheckBudget() error {
	if c.Budget > 0 && c.Budget < c.Sinks+c.Window+c.PageSize {
		return fmt.Errorf("paging: budget %d is less than sinks %d + window %d + one page of %d", c.Budget, c.Sinks, c.Window, c.PageSize)
	}
	return nil
}

// Dense reports whether layer attends to every token under c.
func (c Config) Dense(layer int) bool { return c.Budget <= 0 || layer < c.DenseLayers }

// AllPages returns 0..n-1.
func AllPages(n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = i
	}
	return out
}

// PagesOf is the number of pages of upto tokens.
func PagesOf(upto, pageSize int) int { return (upto + pageSize - 1) / pageSize }

// Required returns the sink and window pages for a sequence of upto tokens
// and how many more pages the budget allows.
func (c Config) Required(upto int) (req []int, free int) {
	p := c.PageSize
	n := PagesOf(upto, p)
	sinkPages := PagesOf(c.Sinks, p)
	first := max(0, upto-c.Window) / p // first page touching the window
	for i := 0; i < min(sinkPages, n); i++ {
		req = append(req, i)
	}
	for i := max(first, sinkPages); i < n; i++ {
		req = append(req, i)
	}
	if c.Budget <= 0 {
		return req, n - len(req)
	}
	return req, max(0, c.Budget/p-len(req))
}

// dense attends to every page.
type dense struct{ c Config }

func (d *dense) Name() string              { return "dense" }
func (d *dense) Config() Config            { return d.c }
func (d *dense) Groups(int) []Group        { return []Group{{Class: "all"}} }
func (d *dense) NeedQueries(_, _ int) bool { return false }
func (d *dense) Select(_ int, _ Summaries, _ *Queries, upto int) Selection {
	return One(AllPages(PagesOf(upto, d.c.PageSize)))
}

// window keeps the sinks and the most recent Budget - Sinks tokens
// (StreamingLLM).
type window struct{ c Config }

func (w *window) Name() string              { return "window" }
func (w *window) Config() Config            { return w.c }
func (w *window) NeedQueries(_, _ int) bool { return false }
func (w *window) Groups(layer int) []Group {
	if w.c.Dense(layer) {
		return []Group{{Class: "all"}}
	}
	return []Group{{Budget: w.c.Budget, Class: "all"}}
}

func (w *window) Select(layer int, _ Summaries, _ *Queries, upto int) Selection {
	if w.c.Dense(layer) {
		return One(AllPages(PagesOf(upto, w.c.PageSize)))
	}
	c := w.c
	c.Window = max(c.Window, c.Budget-c.Sinks-c.PageSize) // the partial last page counts as a page
	req, _ := c.Required(upto)
	return One(req)
}

// topPages adds to req the free highest-scoring pages not already in req,
// each with up to neighbors following pages, and returns the sorted set.
func topPages(req []int, scores []float32, free, neighbors int) []int {
	var sx rankScratch
	return sx.topPages(req, scores, free, neighbors)
}

// topPages is topPages with sx's working memory; the result is its own.
func (sx *rankScratch) topPages(req []int, scores []float32, free, neighbors int) []int {
	in := sx.mask(len(scores))
	for _, p := range req {
		in[p] = true
	}
	order := sx.rank(scores, in, 2*free)
	out := make([]int, len(req), len(req)+max(0, free))
	copy(out, req)
	for _, p := range order {
		if free <= 0 {
			break
		}
		for k := 0; k <= neighbors && p+k < len(scores) && free > 0; k++ {
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
