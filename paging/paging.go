// Package paging decides which pages of the KV cache each layer's attention
// sees. A Policy gets the page summaries of one layer (and, if it asks for
// them, the layer's roped queries) and returns page ids within a token
// budget. Every policy keeps the attention sinks (the first tokens) and the
// recent window, and can leave the first layers dense.
//
// Policies: dense (every page), window (StreamingLLM: sinks + recent
// tokens), quest (Quest: per step and layer, the pages with the largest upper
// bound of q·k from per-channel key min/max) and retro (RetroLM-style without
// training: pages scored once per question from the question tokens' queries
// against mean and representative keys; the chosen pages serve the whole
// answer).
package paging

import (
	"fmt"
	"slices"
	"strings"
)

// Summaries is what a policy may read about the pages of one layer. Vectors
// are [headDim] for one KV head; they stay valid until the next write.
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

// Queries are the roped queries of the current batch for one layer:
// Q[token][head*HeadDim + d], with Heads query heads; query head h reads KV
// head h / (Heads / KVHeads).
type Queries struct {
	Q     [][]float32
	Heads int
}

// When says when a policy needs the queries of a layer.
type When int

const (
	Never       When = iota // selection depends on positions only
	PerQuestion             // once for each multi-token batch (a question); decode steps reuse it
	PerStep                 // every forward pass
)

// Config is shared by all policies. Budget counts every attended token,
// sinks and window included.
type Config struct {
	PageSize    int // tokens per page
	Budget      int // tokens attended per query (0: every token)
	Sinks       int // first tokens always attended (default 64)
	Window      int // most recent tokens always attended (default 256)
	DenseLayers int // layers 0..DenseLayers-1 attend to everything
	Neighbors   int // retro: pages after each retrieved page also kept (default 1)
}

// Defaults for Config fields left at zero.
const (
	DefaultSinks  = 64
	DefaultWindow = 256
	DefaultBudget = 2048
)

// Policy selects pages.
type Policy interface {
	Name() string
	Config() Config
	Queries() When
	// Select returns the sorted page ids layer attends to when the sequence
	// holds upto tokens (the last query's position + 1). With q nil a
	// query-driven policy returns only what it always keeps (sinks, window).
	Select(layer int, s Summaries, q *Queries, upto int) []int
}

// Names lists the policies New knows.
var Names = []string{"dense", "window", "quest", "retro"}

// New builds a policy by name.
func New(name string, c Config) (Policy, error) {
	if c.PageSize <= 0 {
		return nil, fmt.Errorf("paging: page size %d", c.PageSize)
	}
	if c.Sinks == 0 {
		c.Sinks = DefaultSinks
	}
	if c.Window == 0 {
		c.Window = DefaultWindow
	}
	if c.Sinks < 0 || c.Window < 0 || c.Budget < 0 || c.DenseLayers < 0 {
		return nil, fmt.Errorf("paging: negative setting in %+v", c)
	}
	if c.Neighbors == 0 {
		c.Neighbors = 1
	}
	if c.Neighbors < 0 {
		c.Neighbors = 0
	}
	if name != "dense" && c.Budget > 0 && c.Budget < c.Sinks+c.Window+c.PageSize {
		return nil, fmt.Errorf("paging: budget %d is less than sinks %d + window %d + one page of %d", c.Budget, c.Sinks, c.Window, c.PageSize)
	}
	switch name {
	case "dense":
		return dense{c}, nil
	case "window":
		return window{c}, nil
	case "quest":
		return &quest{base{c}}, nil
	case "retro":
		return &retro{base{c}}, nil
	}
	return nil, fmt.Errorf("paging: unknown policy %q (%s)", name, strings.Join(Names, ", "))
}

func allPages(n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = i
	}
	return out
}

// base holds the selection rules every policy shares.
type base struct{ c Config }

func (b base) Config() Config { return b.c }

func pagesOf(upto, p int) int { return (upto + p - 1) / p }

// required returns the sink and window pages for a sequence of upto tokens
// and how many more pages the budget allows.
func (b base) required(upto int) (req []int, free int) {
	p := b.c.PageSize
	n := pagesOf(upto, p)
	sinkPages := pagesOf(b.c.Sinks, p)
	first := max(0, upto-b.c.Window) / p // first page touching the window
	for i := 0; i < min(sinkPages, n); i++ {
		req = append(req, i)
	}
	for i := max(first, sinkPages); i < n; i++ {
		req = append(req, i)
	}
	if b.c.Budget <= 0 {
		return req, n - len(req)
	}
	return req, max(0, b.c.Budget/p-len(req))
}

// dense attends to every page.
type dense struct{ c Config }

func (d dense) Name() string   { return "dense" }
func (d dense) Config() Config { return d.c }
func (d dense) Queries() When  { return Never }
func (d dense) Select(_ int, _ Summaries, _ *Queries, upto int) []int {
	return allPages(pagesOf(upto, d.c.PageSize))
}

// window keeps the sinks and the most recent Budget - Sinks tokens
// (StreamingLLM).
type window struct{ c Config }

func (w window) Name() string   { return "window" }
func (w window) Config() Config { return w.c }
func (w window) Queries() When  { return Never }
func (w window) Select(layer int, _ Summaries, _ *Queries, upto int) []int {
	if layer < w.c.DenseLayers {
		return allPages(pagesOf(upto, w.c.PageSize))
	}
	c := w.c
	if c.Budget > 0 {
		c.Window = max(c.Window, c.Budget-c.Sinks-c.PageSize) // the partial last page counts as a page
	}
	req, _ := base{c}.required(upto)
	return req
}

// topPages adds to req the free highest-scoring pages not already in req,
// each with up to neighbors following pages, and returns the sorted set.
func topPages(req []int, scores []float32, free, neighbors int) []int {
	in := make([]bool, len(scores))
	for _, p := range req {
		in[p] = true
	}
	order := rank(scores, in, 2*free)
	out := slices.Clone(req)
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
