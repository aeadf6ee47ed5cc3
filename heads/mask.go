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
// groups are the layer's groups and from, for each, the inner group whose
// selection it takes (-1: the streaming group).
type masked struct {
	inner     paging.Selector
	c         paging.Config
	retrieval [][]int
	streaming [][]int
	groups    [][]paging.Group
	from      [][]int
}

func newMasked(inner paging.Selector, c paging.Config) (paging.Selector, error) {
	cl, ok := c.Options[OptionKey].(Classes)
	if !ok || cl == nil {
		return nil, errors.New("heads: no head profile given (detect one with `heads detect`, or pass a heads.Classes under Options[\"heads\"])")
	}
	if c.Layers <= 0 || c.KVHeads <= 0 {
		return nil, fmt.Errorf("heads: the model's shape is unknown (%d layers, %d KV heads)", c.Layers, c.KVHeads)
	}
	m := &masked{inner: inner, c: c, retrieval: make([][]int, c.Layers), streaming: make([][]int, c.Layers),
		groups: make([][]paging.Group, c.Layers), from: make([][]int, c.Layers)}
	for l := 0; l < c.Layers; l++ {
		for h := 0; h < c.KVHeads; h++ {
			if l >= c.DenseLayers && cl.Streaming(l, h) {
				m.streaming[l] = append(m.streaming[l], h)
			} else {
				m.retrieval[l] = append(m.retrieval[l], h)
			}
		}
		if err := m.layerGroups(l); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// Unwrap returns the inner method's selector.
func (m *masked) Unwrap() paging.Selector { return m.inner }

// layerGroups splits each of the inner method's groups of layer into its
// retrieval heads, which keep the inner group's budget and selection, and
// gathers every streaming head into one streaming group. A method with
// one group of every head (dense, window, quest, retro) gives a retrieval
// group and a streaming group; one with a group per KV head (squeezed)
// keeps its retrieval heads' groups as they are.
func (m *masked) layerGroups(l int) error {
	inner := m.inner.Groups(l)
	if len(m.streaming[l]) == 0 {
		m.groups[l] = inner
		for i := range inner {
			m.from[l] = append(m.from[l], i)
		}
		return nil
	}
	stream := paging.Group{Budget: m.streamBudget(), Class: "streaming"}
	if len(m.retrieval[l]) == 0 {
		m.groups[l], m.from[l] = []paging.Group{stream}, []int{-1}
		return nil
	}
	isStreaming := make([]bool, m.c.KVHeads)
	for _, h := range m.streaming[l] {
		isStreaming[h] = true
	}
	for i, g := range inner {
		heads := g.KVHeads
		if heads == nil {
			if len(inner) != 1 {
				return fmt.Errorf("heads: %s lists no heads for group %d of layer %d, which has %d groups", m.inner.Name(), i, l, len(inner))
			}
			heads = append([]int(nil), m.retrieval[l]...)
		} else {
			var keep []int
			for _, h := range heads {
				if !isStreaming[h] {
					keep = append(keep, h)
				}
			}
			heads = keep
		}
		if len(heads) == 0 {
			continue
		}
		m.groups[l] = append(m.groups[l], paging.Group{KVHeads: heads, Budget: g.Budget, Class: "retrieval", Tokens: g.Tokens})
		m.from[l] = append(m.from[l], i)
	}
	stream.KVHeads = m.streaming[l]
	m.groups[l] = append(m.groups[l], stream)
	m.from[l] = append(m.from[l], -1)
	return nil
}

func (m *masked) Name() string          { return m.inner.Name() + "+heads" }
func (m *masked) Config() paging.Config { return m.c }

// streamBudget covers the sinks and the window (the pool adds the batch's
// pages and the partial page).
func (m *masked) streamBudget() int { return m.c.Sinks + m.c.Window }

func (m *masked) Groups(layer int) []paging.Group { return m.groups[layer] }

// StartPass forwards to an inner method whose budgets change between
// forward passes (paging.PassStarter), so that the retrieval group's pool
// follows them.
func (m *masked) StartPass(pos0, batch int) {
	p, ok := m.inner.(paging.PassStarter)
	if !ok {
		return
	}
	p.StartPass(pos0, batch)
	// Split the inner groups again, so that the retrieval groups' pools
	// follow the inner method's new budgets. Its head lists do not change
	// between passes, so construction already checked what could fail.
	for l := range m.groups {
		m.groups[l], m.from[l] = nil, nil
		_ = m.layerGroups(l)
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
	// A rows-only answer (q.RowsSuffice) stays one: each retrieval group
	// keeps its inner group's rows and loose tokens; the streaming group
	// lists pages only.
	out := paging.Selection{RowsOnly: inner.RowsOnly}
	if inner.Tokens != nil {
		out.Tokens = make([][]int32, len(m.from[layer]))
	}
	if inner.Rows != nil {
		out.Rows = make([][]int32, len(m.from[layer]))
	}
	for i, f := range m.from[layer] {
		if f < 0 {
			out.Groups = append(out.Groups, stream)
			continue
		}
		out.Groups = append(out.Groups, inner.Groups[f])
		if inner.Tokens != nil {
			out.Tokens[i] = inner.Tokens[f]
		}
		if inner.Rows != nil {
			out.Rows[i] = inner.Rows[f]
		}
	}
	return out
}

// TokenOrder implements paging.TokenOrdered for an inner method that
// orders its tokens (squeezed's clusters): a retrieval group keeps its
// inner group's order (the order is of positions, whichever of the
// group's heads remain); the streaming group has none.
func (m *masked) TokenOrder(layer, group int) (order, blocks []int32) {
	to, ok := m.inner.(paging.TokenOrdered)
	if !ok {
		return nil, nil
	}
	if len(m.streaming[layer]) == 0 {
		return to.TokenOrder(layer, group)
	}
	if group < 0 || group >= len(m.from[layer]) || m.from[layer][group] < 0 {
		return nil, nil
	}
	return to.TokenOrder(layer, m.from[layer][group])
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
