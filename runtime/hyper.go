package runtime

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"sync/atomic"

	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/model/input"

	"github.com/kvrecall/kvrecall/hyper"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/runtime/arch"
)

// HyperOptions configure a HyperAttention prefill.
type HyperOptions struct {
	// Config holds r, b, m, min_seq_len and the seed (hyper.Default: the
	// paper's 7, 256, 256, 4096). Layer l uses seed Seed+l.
	hyper.Config
	// Layers lists the layers that use HyperAttention; empty means every
	// layer that attends the whole sequence (a sliding-window layer
	// attends its window exactly). The paper patches the last layers.
	Layers []int
	// ExactChunk is the query chunk of the other layers' exact attention
	// (scores [chunk end, chunk, heads] at a time). Default: n/64, at
	// least 512 (512 is a dense prefill's batch), and larger where the
	// backend's graph size cannot hold that many chunks (a model with few
	// weights gets few graph nodes: see hyper.Staged).
	ExactChunk int
}

// validate fills the defaults and checks the settings for a model of
// cfg's layers. Sliding-window layers (gemma3's local layers) attend
// their window exactly (hyper.CausalWindow, already O(n·window)): no
// layer list includes them, and naming one is an error.
func (o *HyperOptions) validate(cfg arch.Config) (use []bool, err error) {
	if err := o.Config.Validate(); err != nil {
		return nil, err
	}
	if o.ExactChunk < 0 {
		return nil, fmt.Errorf("hyper: exact chunk %d: want 0 (default) or more", o.ExactChunk)
	}
	layers := cfg.Layers
	use = make([]bool, layers)
	if len(o.Layers) == 0 {
		for i := range use {
			use[i] = !cfg.Windowed(i)
		}
	}
	for _, l := range o.Layers {
		if l < 0 || l >= layers {
			return nil, fmt.Errorf("hyper: layer %d: the model has layers 0..%d", l, layers-1)
		}
		if cfg.Windowed(l) {
			return nil, fmt.Errorf("hyper: layer %d is a sliding-window layer (window %d): it attends its window exactly; HyperAttention is for the global layers %v", l, cfg.SlidingWindow, globalLayers(cfg))
		}
		use[l] = true
	}
	return use, nil
}

// globalLayers lists cfg's layers that attend the whole sequence.
func globalLayers(cfg arch.Config) []int {
	var out []int
	for l := 0; l < cfg.Layers; l++ {
		if !cfg.Windowed(l) {
			out = append(out, l)
		}
	}
	return out
}

// IngestWith is Ingest with options (see IngestOptions).
func (m *Model) IngestWith(ctx context.Context, id, text string, o IngestOptions, progress Progress) (*Document, error) {
	sum := sha256.Sum256([]byte(text))
	toks, err := m.tok.Encode(text, true)
	if err != nil {
		return nil, err
	}
	return m.ingest(ctx, id, toks, hex.EncodeToString(sum[:]), o, progress)
}

// hyperCache is the paged cache of a HyperAttention ingest. The document
// is one batch at position 0, so each layer's attention sees the whole
// sequence's q, k and v: HyperAttention's causal recursion on the chosen
// layers, hyper.Causal (exact, in query chunks) on the others, from the
// batch's f32 keys and values. The keys and values are stored in the paged
// cache as a dense prefill stores them.
//
// A ggml graph holds a fixed number of tensors and HyperAttention needs
// hundreds per layer, so the pass is split after every layer's
// projections (arch.Hooks): graph A computes q, k and v and stores k and
// v, whose f32 copies come back to the host with q; graph B computes that
// layer's attention from them.
//
// A layer whose HyperAttention does not fit one graph (staged) is computed
// by hyper.Staged in graphs of its own while graph B is built, from the
// host copies of q, k and v; graph B then takes its output as an input.
type hyperCache struct {
	*kvcache.Paged
	o      HyperOptions
	use    []bool
	active bool // the batch is the document, from position 0

	b      ml.Backend
	nodes  int    // the backend's graph size (MaxGraphNodes)
	staged []bool // layers whose HyperAttention runs in hyper.Staged
	chunk  int    // the exact layers' query chunk

	pendK, pendV ml.Tensor // graph A's copies of k and v
	k, v         []float32 // their values, for graph B
	q            []float32 // the layer's queries [headDim, heads, n], for hyper.Staged
	kvHeads      int
}

var (
	_ arch.Attender = (*hyperCache)(nil)
	_ arch.Hooks    = (*hyperCache)(nil)
)

func (c *hyperCache) StartForward(ctx ml.Context, batch input.Batch, reserve bool) error {
	c.active = len(batch.Positions) > 0 && batch.Positions[0] == 0
	return c.Paged.StartForward(ctx, batch, reserve)
}

// NeedQueries implements arch.Hooks: every layer of the document's batch
// gets its own attention graph.
func (c *hyperCache) NeedQueries(layer int) bool {
	return c.active || c.Paged.NeedQueries(layer)
}

// SetQueries implements arch.Hooks: it keeps a staged layer's queries for
// hyper.Staged and passes the paged cache's own requests on.
func (c *hyperCache) SetQueries(layer int, q [][]float32) error {
	if c.active && c.staged[layer] {
		c.q = c.q[:0]
		for _, row := range q {
			c.q = append(c.q, row...)
		}
	}
	if !c.Paged.NeedQueries(layer) {
		return nil
	}
	return c.Paged.SetQueries(layer, q)
}

// Put stores k and v, and in the document's batch also brings f32 copies
// of them to the host for the layer's attention graph.
func (c *hyperCache) Put(ctx ml.Context, k, v ml.Tensor) {
	if c.active {
		c.kvHeads = k.Dim(1)
		c.pendK = ctx.Input().Empty(ml.DTypeF32, k.Dim(0), k.Dim(1), k.Dim(2))
		c.pendV = ctx.Input().Empty(ml.DTypeF32, v.Dim(0), v.Dim(1), v.Dim(2))
		ctx.Forward(k.Copy(ctx, c.pendK), v.Copy(ctx, c.pendV))
	}
	c.Paged.Put(ctx, k, v)
}

// Outputs implements arch.Hooks.
func (c *hyperCache) Outputs(ctx ml.Context) []ml.Tensor {
	outs := c.Paged.Outputs(ctx)
	if c.pendK != nil {
		outs = append(outs, c.pendK, c.pendV)
	}
	return outs
}

// Computed implements arch.Hooks.
func (c *hyperCache) Computed(ctx ml.Context) error {
	if c.pendK != nil {
		c.k = append(c.k[:0], c.pendK.Floats()...)
		c.v = append(c.v[:0], c.pendV.Floats()...)
		c.pendK, c.pendV = nil, nil
	}
	return c.Paged.Computed(ctx)
}

// Attention implements arch.Attender. q [headDim, heads, n], k and v
// [headDim, kvHeads, n] (nil in graph B: they come from graph A).
func (c *hyperCache) Attention(ctx ml.Context, layer int, q, k, v ml.Tensor, scale float64) ml.Tensor {
	if !c.active {
		return c.Paged.Attention(ctx, layer, q, k, v, scale)
	}
	if k == nil {
		d, n := q.Dim(0), q.Dim(2)
		k = ctx.Input().FromFloats(c.k, d, c.kvHeads, n)
		v = ctx.Input().FromFloats(c.v, d, c.kvHeads, n)
	} else {
		ctx.Forward(q, k, v)
		c.Paged.Put(ctx, k, v)
	}
	if !c.use[layer] {
		// Exact: within the window on a sliding-window layer (0: none).
		return hyper.CausalWindow(ctx, q, k, v, scale, c.chunk, c.SlidingWindow(layer))
	}
	cfg := c.o.Config
	cfg.Seed += uint64(layer)
	if !c.staged[layer] {
		return hyper.Attention(ctx, cfg, q, k, v, scale, true)
	}
	d, heads, n := q.Dim(0), q.Dim(1), q.Dim(2)
	newCtx := func() ml.Context {
		hyperStagedGraphs.Add(1)
		return c.b.NewContext()
	}
	out, err := hyper.Staged(newCtx, cfg, hyper.Shape{Heads: heads, KVHeads: c.kvHeads, HeadDim: d}, c.q, c.k, c.v, scale, c.nodes)
	if err != nil {
		// newHyperCache planned these graphs before the pass began.
		panic(fmt.Sprintf("hyper: layer %d: %v", layer, err))
	}
	return ctx.Input().FromFloats(out, d, heads, n)
}

// Test hooks: hyperGraphNodes, when positive, stands for the backend's
// graph size; hyperStagedGraphs counts hyper.Staged's graphs.
var (
	hyperGraphNodes   int
	hyperStagedGraphs atomic.Int64
)

// newHyperCache plans a one-batch HyperAttention ingest of n tokens
// within the backend's graph size: each layer's attention graph (with the
// layer's MLP and the next projections, about 80 tensors) must fit, so
// the exact layers' chunk grows and a HyperAttention layer whose
// recursion does not fit one graph is staged (hyper.Staged). ggml aborts
// the process when a graph runs out of nodes, hence the plan.
func (m *Model) newHyperCache(paged *kvcache.Paged, o HyperOptions, use []bool, n int) (*hyperCache, error) {
	if n > hyper.MaxTokens {
		return nil, fmt.Errorf("hyper: the document has %d tokens: at most %d", n, hyper.MaxTokens)
	}
	ctx := m.backend.NewContext()
	limit := ctx.MaxGraphNodes()
	ctx.Close()
	if hyperGraphNodes > 0 {
		limit = hyperGraphNodes
	}
	const layerNodes = 80 // the rest of a layer's graph
	c := &hyperCache{Paged: paged, o: o, use: use, b: m.backend, nodes: limit - layerNodes, staged: make([]bool, len(use))}
	c.chunk = o.exactChunk(n, c.nodes)
	for l, u := range use {
		switch {
		case !u:
			if need := hyper.GraphSize(o.Config, n, c.chunk); need > c.nodes {
				return nil, fmt.Errorf("hyper: exact attention over %d tokens in chunks of %d needs about %d graph nodes per layer; the backend allows %d: raise the exact chunk", n, c.chunk, need+layerNodes, limit)
			}
		case hyper.GraphSize(o.Config, n, 0) > c.nodes:
			if _, err := o.Config.Stages(n, c.nodes); err != nil {
				return nil, err
			}
			c.staged[l] = true
		}
	}
	return c, nil
}

// exactChunk is ExactChunk, or its default for n tokens in graphs of at
// most nodes tensors.
func (o *HyperOptions) exactChunk(n, nodes int) int {
	if o.ExactChunk > 0 {
		return o.ExactChunk
	}
	chunk := max(512, (n+63)/64)
	for chunk < n && hyper.GraphSize(o.Config, n, chunk) > nodes {
		chunk += 64
	}
	return chunk
}
