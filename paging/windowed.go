package paging

import "fmt"

// SlidingWindow wraps a session's selector for a model whose windowed
// layers (gemma2's even layers, gemma3's five of six) attend only to the
// last window tokens of each query, the query included. Such a layer is a
// streaming layer by construction: its one group keeps the pages of the
// window (no sinks: the model never attends to them), takes no budget and
// gets no selection to score (the inner method never sees the layer, and
// no queries are asked for it). The cache masks each query to its own
// window (Group.Window). Global layers are the inner method's.
func SlidingWindow(inner Selector, windowed func(layer int) bool, window int) (Selector, error) {
	if window < 2 {
		return nil, fmt.Errorf("paging: sliding window %d (want at least 2)", window)
	}
	c := inner.Config()
	w := &slidingWindow{inner: inner, window: window, windowed: make([]bool, c.Layers)}
	for l := range w.windowed {
		w.windowed[l] = windowed(l)
	}
	if c.Layers <= 0 {
		return nil, fmt.Errorf("paging: %s: the model's layer count is unknown", inner.Name())
	}
	return w, nil
}

type slidingWindow struct {
	inner    Selector
	window   int
	windowed []bool
	pos0     int // first position of the current pass
}

// Unwrap returns the inner method's selector.
func (w *slidingWindow) Unwrap() Selector { return w.inner }

func (w *slidingWindow) Name() string   { return w.inner.Name() }
func (w *slidingWindow) Config() Config { return w.inner.Config() }

func (w *slidingWindow) isWindowed(layer int) bool {
	return layer < len(w.windowed) && w.windowed[layer]
}

func (w *slidingWindow) Groups(layer int) []Group {
	if w.isWindowed(layer) {
		return []Group{{Budget: w.window, Window: w.window, Class: "windowed"}}
	}
	return w.inner.Groups(layer)
}

// StartPass records where the pass starts (its first query's window
// reaches back window-1 positions) and forwards to an inner PassStarter.
func (w *slidingWindow) StartPass(pos0, batch int) {
	w.pos0 = pos0
	if p, ok := w.inner.(PassStarter); ok {
		p.StartPass(pos0, batch)
	}
}

func (w *slidingWindow) NeedQueries(layer, batch int) bool {
	return !w.isWindowed(layer) && w.inner.NeedQueries(layer, batch)
}

// Select gives a windowed layer the pages touching positions
// pos0-window+1 .. upto-1: every key some query of the pass can see.
func (w *slidingWindow) Select(layer int, s Summaries, q *Queries, upto int) Selection {
	if !w.isWindowed(layer) {
		return w.inner.Select(layer, s, q, upto)
	}
	P := w.inner.Config().PageSize
	first := max(0, min(w.pos0, upto-1)-w.window+1) / P
	var pages []int
	for p := first; p < PagesOf(upto, P); p++ {
		pages = append(pages, p)
	}
	return One(pages)
}
