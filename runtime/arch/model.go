package arch

import (
	"errors"
	"fmt"
	"math"

	"github.com/ollama/ollama/fs"
	"github.com/ollama/ollama/kvcache"
	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/ml/nn"
	"github.com/ollama/ollama/ml/nn/rope"
	"github.com/ollama/ollama/model"
	"github.com/ollama/ollama/model/input"
)

func init() {
	for _, a := range Supported {
		model.Register(a, New)
	}
}

// QueryObserver is implemented by caches that choose keys per query: the
// layer hands them its roped queries, [headDim, heads, batch], before Put/Get.
type QueryObserver interface {
	ObserveQuery(ctx ml.Context, q ml.Tensor)
}

// Model is a llama-family decoder. Tensor fields are filled from the GGUF by
// ollama's model.New through their gguf tags.
type Model struct {
	model.Base

	TokenEmbedding *nn.Embedding `gguf:"token_embd"`
	Layers         []Layer       `gguf:"blk"`
	OutputNorm     *nn.RMSNorm   `gguf:"output_norm"`
	Output         *nn.Linear    `gguf:"output,alt:token_embd"`

	Params Config
}

// Layer is one transformer block.
type Layer struct {
	AttentionNorm *nn.RMSNorm `gguf:"attn_norm"`
	Attention     *Attention
	MLPNorm       *nn.RMSNorm `gguf:"ffn_norm"`
	MLP           *MLP
}

// Attention holds the projections of one layer. The backend duplicates the
// file's single rope_freqs.weight per layer as blk.N.rope_freqs.weight.
type Attention struct {
	Query       *nn.Linear `gguf:"attn_q"`
	Key         *nn.Linear `gguf:"attn_k"`
	Value       *nn.Linear `gguf:"attn_v"`
	Output      *nn.Linear `gguf:"attn_output"`
	RopeFactors ml.Tensor  `gguf:"rope_freqs.weight"`
}

// MLP is the SwiGLU feed-forward block.
type MLP struct {
	Gate *nn.Linear `gguf:"ffn_gate"`
	Up   *nn.Linear `gguf:"ffn_up"`
	Down *nn.Linear `gguf:"ffn_down"`
}

// New builds an empty model for ollama's registry from the file's metadata.
func New(c fs.Config) (model.Model, error) {
	cfg, err := parseHParams(func(key string) (any, bool) {
		v := c.Value(key)
		return v, v != nil
	})
	if err != nil {
		return nil, err
	}
	return &Model{Layers: make([]Layer, cfg.Layers), Params: cfg}, nil
}

// Validate runs after the tensors are assigned: a missing tensor must be an
// error here, not a nil dereference in the first forward pass.
func (m *Model) Validate() error {
	var missing []string
	check := func(name string, ok bool) {
		if !ok {
			missing = append(missing, name)
		}
	}
	check("token_embd.weight", m.TokenEmbedding != nil && m.TokenEmbedding.Weight != nil)
	check("output_norm.weight", m.OutputNorm != nil && m.OutputNorm.Weight != nil)
	check("output.weight", m.Output != nil && m.Output.Weight != nil)
	for i, l := range m.Layers {
		p := fmt.Sprintf("blk.%d.", i)
		check(p+"attn_norm.weight", l.AttentionNorm != nil && l.AttentionNorm.Weight != nil)
		check(p+"ffn_norm.weight", l.MLPNorm != nil && l.MLPNorm.Weight != nil)
		a := l.Attention
		check(p+"attn_q/k/v/output", a != nil && a.Query != nil && a.Key != nil && a.Value != nil && a.Output != nil)
		if a != nil && m.Params.QKVBias {
			check(p+"attn_q/k/v.bias", a.Query != nil && a.Query.Bias != nil && a.Key != nil && a.Key.Bias != nil && a.Value != nil && a.Value.Bias != nil)
		}
		check(p+"ffn_gate/up/down", l.MLP != nil && l.MLP.Gate != nil && l.MLP.Up != nil && l.MLP.Down != nil)
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing tensors: %v", missing)
	}
	return nil
}

// Shift re-ropes cached keys by shift positions (kvcache.Causal's shift hook).
func (m *Model) Shift(ctx ml.Context, layer int, key, shift ml.Tensor) (ml.Tensor, error) {
	return m.rope(ctx, key, shift, m.Layers[layer].Attention.RopeFactors), nil
}

func (m *Model) rope(ctx ml.Context, t, positions, factors ml.Tensor) ml.Tensor {
	opts := []func(*rope.Options){rope.WithFactors(factors)}
	if m.Params.RopeNeoX {
		opts = append(opts, rope.WithTypeNeoX())
	}
	return nn.RoPE(ctx, t, positions, m.Params.RopeDim, m.Params.RopeBase, m.Params.RopeScale, opts...)
}

// Forward implements model.Model with the cache set in the model's config.
func (m *Model) Forward(ctx ml.Context, batch input.Batch) (ml.Tensor, error) {
	return m.ForwardCache(ctx, batch, m.Base.Config().Cache)
}

// ForwardCache runs the decoder over batch with the given cache (one cache per
// sequence lets many sessions share the weights). StartForward must have been
// called on the cache. Returns logits [vocab, len(outputs)].
func (m *Model) ForwardCache(ctx ml.Context, batch input.Batch, cache kvcache.Cache) (ml.Tensor, error) {
	if cache == nil {
		return nil, errors.New("arch: forward needs a KV cache")
	}
	positions := ctx.Input().FromInts(batch.Positions, len(batch.Positions))
	h := m.TokenEmbedding.Forward(ctx, batch.Inputs) // [hidden, batch]
	for i := range m.Layers {
		cache.SetLayer(i)
		var outputs ml.Tensor
		if i == len(m.Layers)-1 {
			outputs = batch.Outputs
		}
		h = m.layer(ctx, i, h, positions, outputs, cache)
	}
	h = m.OutputNorm.Forward(ctx, h, m.Params.Eps)
	return m.Output.Forward(ctx, h), nil
}

func (m *Model) layer(ctx ml.Context, i int, h, positions, outputs ml.Tensor, cache kvcache.Cache) ml.Tensor {
	l := &m.Layers[i]
	residual := h
	h = l.AttentionNorm.Forward(ctx, h, m.Params.Eps)
	h = m.attention(ctx, l.Attention, h, positions, cache)
	if outputs != nil {
		// Last layer: only the rows that want logits go on.
		h = h.Rows(ctx, outputs)
		residual = residual.Rows(ctx, outputs)
	}
	h = h.Add(ctx, residual)
	residual = h
	h = l.MLPNorm.Forward(ctx, h, m.Params.Eps)
	h = l.MLP.Down.Forward(ctx, l.MLP.Gate.Forward(ctx, h).SILU(ctx, l.MLP.Up.Forward(ctx, h)))
	return h.Add(ctx, residual)
}

func (m *Model) attention(ctx ml.Context, a *Attention, h, positions ml.Tensor, cache kvcache.Cache) ml.Tensor {
	n := h.Dim(1)
	q := a.Query.Forward(ctx, h).Reshape(ctx, m.Params.HeadDim, m.Params.Heads, n)   // [headDim, heads, batch]
	k := a.Key.Forward(ctx, h).Reshape(ctx, m.Params.HeadDim, m.Params.KVHeads, n)   // [headDim, kvHeads, batch]
	v := a.Value.Forward(ctx, h).Reshape(ctx, m.Params.HeadDim, m.Params.KVHeads, n) // [headDim, kvHeads, batch]
	q = m.rope(ctx, q, positions, a.RopeFactors)
	k = m.rope(ctx, k, positions, a.RopeFactors)
	if qo, ok := cache.(QueryObserver); ok {
		qo.ObserveQuery(ctx, q)
	}
	out := nn.Attention(ctx, q, k, v, 1/math.Sqrt(float64(m.Params.HeadDim)), cache) // [headDim, heads, batch]
	return a.Output.Forward(ctx, out.Reshape(ctx, m.Params.HeadDim*m.Params.Heads, n))
}
