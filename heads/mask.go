// Package heads treats attention heads apart: retrieval heads, which fetch
// from anywhere in the context, and streaming heads, which only ever look
// at the attention sinks and the recent tokens (Retrieval Head, arXiv
// 2404.15574; DuoAttention, arXiv 2410.10819; RazorAttention, arXiv
// 2407.15891).
//
// The "heads" modifier of the selection seam ("retro+heads", "dense+heads")
// applies a head profile to any single-group method: in each layer the
// retrieval KV heads form one group that attends to what the inner method
// selects, and the streaming KV heads another group that keeps only sinks +
// the recent window, with a device pool of that size. Streaming heads thus
// hold and compute over a few hundred tokens, whatever the context.
package heads

import (
	"errors"
	"fmt"

	"github.com/kvrecall/kvrecall/paging"
)

// OptionKey is the paging.Config.Options key under which the modifier
// finds its Classes (runtime.PolicyOptions.Extra["heads"]).
const OptionKey = "heads"

// Classes says which KV heads of a layer are streaming heads. A *Profile
// is one; Mask is a fixed one.
type Classes interface {
	Streaming(layer, kvHead int) bool
}

// Mask is a fixed head classification: Mask[layer][kvHead] is true for a
// streaming head. Layers or heads past its end are retrieval heads.
type Mask [][]bool

// Streaming implements Classes.
func (m Mask) Streaming(layer, kvHead int) bool {
	return layer < len(m) && kvHead < len(m[layer]) && m[layer][kvHead]
}

// HalfStreaming marks the upper half of every layer's KV heads as
// streaming: a synthetic profile for speed benchmarks on models without
// real retrieval heads.
func HalfStreaming(layers, kvHeads int) Mask {
	m := make(Mask, layers)
	for l := range m {
		m[l] = make([]bool, kvHeads)
		for h := kvHeads / 2; h < kvHeads; h++ {
			m[l][h] = true
		}
	}
	return m
}

func init() { paging.RegisterModifier("heads", newMasked) }

// masked is the modifier's selector. Per layer, retrieval (the KV heads of
// the inner method) and streaming list the heads; either may be empty.
type masked struct {
	inner     paging.Selector
	c         paging.Config
	retrieval [][]int
	streaming [][]int
}

func newMasked(inner paging.Selector, c paging.Config) (paging.Selector, error) {
	cl, ok := c.Options[OptionKey].(Classes)
	if !ok || cl == nil {
		return nil, errors.New("heads: no head profile given (detect one with `heads detect`, or pass a heads.Classes under Options[\"heads\"])")
	}
	if c.Layers <= 0 || c.KVHeads <= 0 {
		return nil, fmt.Errorf("heads: the model's shape is unknown (%d layers, %d KV heads)", c.Layers, c.KVHeads)
	}
	m := &masked{inner: inner, c: c, retrieval: make([][]int, c.Layers), streaming: make([][]int, c.Layers)}
	for l := 0; l < c.Layers; l++ {
		if gs := inner.Groups(l); len(gs) != 1 || gs[0].KVHeads != nil {
			return nil, fmt.Errorf("heads: %s already splits the heads of layer %d", inner.Name(), l)
		}
		for h := 0; h < c.KVHeads; h++ {
			if l >= c.DenseLayers && cl.Streaming(l, h) {
				m.streaming[l] = append(m.streaming[l], h)
			} else {
				m.retrieval[l] = append(m.retrieval[l], h)
			}
		}
	}
	return m, nil
}

// Unwrap returns the inner method's selector.
func (m *masked) Unwrap() paging.Selector { return m.inner }

func (m *masked) Name() string          { return m.inner.Name() + "+heads" }
func (m *masked) Config() paging.Config { return m.c }

// streamBudget covers the sinks and the window (the pool adds the batch's
// pages and the partial page).
func (m *masked) streamBudget() int { return m.c.Sinks + m.c.Window }

func (m *masked) Groups(layer int) []paging.Group {
	inner := m.inner.Groups(layer)[0]
	switch {
	case len(m.streaming[layer]) == 0:
		return []paging.Group{inner}
	case len(m.retrieval[layer]) == 0:
		return []paging.Group{{Budget: m.streamBudget(), Class: "streaming"}}
	}
	return []paging.Group{
		{KVHeads: m.retrieval[layer], Budget: inner.Budget, Class: "retrieval"},
		{KVHeads: m.streaming[layer], Budget: m.streamBudget(), Class: "streaming"},
	}
}

// StartPass forwards to an inner method whose budgets change between
// forward passes (paging.PassStarter), so that the retrieval group's pool
// follows them.
func (m *masked) StartPass(pos0, batch int) {
	if p, ok := m.inner.(paging.PassStarter); ok {
		p.StartPass(pos0, batch)
	}
}

func (m *masked) NeedQueries(layer, batch int) bool {
	return len(m.retrieval[layer]) > 0 && m.inner.NeedQueries(layer, batch)
}

func (m *masked) Select(layer int, s paging.Summaries, q *paging.Queries, upto int) paging.Selection {
	if len(m.streaming[layer]) == 0 {
		return m.inner.Select(layer, s, q, upto)
	}
	stream, _ := m.c.Required(upto)
	if len(m.retrieval[layer]) == 0 {
		return paging.One(stream)
	}
	inner := m.inner.Select(layer, s, q, upto)
	return paging.Selection{Groups: [][]int{inner.Groups[0], stream}}
}

// Resolve turns a command-line profile spec into head classes for m: ""
// gives nil (the model's default), "half" the synthetic HalfStreaming mask,
// anything else is a profile file (Load: it must be m's).
func Resolve(spec string, m Model) (Classes, error) {
	switch spec {
	case "":
		return nil, nil
	case "half":
		cfg := m.Config()
		return HalfStreaming(cfg.Layers, cfg.KVHeads), nil
	}
	return Load(spec, m)
}
