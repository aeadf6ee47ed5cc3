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

// Hooks is implemented by caches that work across graph boundaries: a paged
// cache that chooses pages from a layer's queries must see those queries on
// the host before that layer's attention is built. Run then computes the
// forward pass in several graphs, split after the q/k/v projections of the
// layers that ask for it.
type Hooks interface {
	// NeedQueries reports whether layer's queries must reach the host
	// before its attention (asked after StartForward, once per layer).
	NeedQueries(layer int) bool
	// SetQueries hands over layer's roped queries, q[token][head*headDim+d].
	SetQueries(layer int, q [][]float32) error
	// Outputs lists tensors of ctx that must be computed with its graph
	// (copies of new keys and values for host memory, say).
	Outputs(ctx ml.Context) []ml.Tensor
	// Computed runs after ctx's graph has been computed, before ctx closes.
	Computed(ctx ml.Context) error
}

// Attender is implemented by caches that compute a layer's attention
// themselves instead of handing keys, values and one mask to nn.Attention:
// a paged cache whose KV heads attend to different pages (each head group
// over its own pool, so that heads which see fewer tokens compute less), an
// analysis cache that also reports where each head looks, or a sparse
// prefill (HyperAttention). Run and ForwardCache use it when the cache has it.
type Attender interface {
	// Attention returns softmax(q·kᵀ·scale)·v for layer, [headDim, heads,
	// batch]. q are the roped queries [headDim, heads, batch]; k and v are
	// the batch's new keys and values [headDim, kvHeads, batch], to be
	// stored in the cache first, or nil when an earlier graph stored them.
	Attention(ctx ml.Context, layer int, q, k, v ml.Tensor, scale float64) ml.Tensor
}

// SoftcapAttender is implemented by Attender caches that can also cap
// attention scores (gemma2): softmax(cap·tanh(q·kᵀ·scale/cap))·v.
type SoftcapAttender interface {
	AttentionSoftcap(ctx ml.Context, layer int, q, k, v ml.Tensor, scale float64, softcap float32) ml.Tensor
}

// LayerTyper is implemented by caches that keep windowed and global layers
// apart (ollama's WrapperCache of an SWA and a causal cache): type 0 is a
// windowed layer, 1 a global one.
type LayerTyper interface {
	SetLayerType(int)
}

// attention is nn.Attention unless the cache computes attention itself;
// with softcap > 0 the scores are capped first (SoftcapSDPA).
func (m *Model) attention(ctx ml.Context, layer int, q, k, v ml.Tensor, scale float64, softcap float32, cache kvcache.Cache) ml.Tensor {
	if softcap > 0 {
		if a, ok := cache.(SoftcapAttender); ok {
			return a.AttentionSoftcap(ctx, layer, q, k, v, scale, softcap)
		}
		if _, ok := cache.(Attender); ok {
			// Checked when sessions are made (CheckCache); a panic here
			// is a programming error, turned into an error by the caller.
			panic(fmt.Sprintf("arch: the %T cache cannot soft-cap attention scores (%s)", cache, m.Params.Arch))
		}
		ctx.Forward(q)
		if k != nil {
			ctx.Forward(k, v)
			cache.Put(ctx, k, v)
		}
		key, value, mask := cache.Get(ctx)
		var cfg ml.CacheConfig // the layout caches give Get's results (kvcache.Causal's rule)
		if cc, ok := m.Backend().(ml.BackendCacheConfig); ok {
			cfg = cc.CacheConfig()
		}
		if !cfg.PermutedV {
			value = value.Permute(ctx, 1, 2, 0, 3).Contiguous(ctx) // [cells, headDim, kvHeads]
		}
		if mask != nil && mask.DType() != ml.DTypeF32 {
			mask = mask.Cast(ctx, ml.DTypeF32)
		}
		return SoftcapSDPA(ctx, q, key, value, mask, scale, softcap)
	}
	if a, ok := cache.(Attender); ok {
		return a.Attention(ctx, layer, q, k, v, scale)
	}
	return nn.Attention(ctx, q, k, v, scale, cache)
}

// Positioner is implemented by caches whose cells are their tokens'
// positions (DenseCache's own cache): Positions returns the I32 [batch]
// positions of the pass StartForward began, as a tensor of ctx the cache
// already made (a view of its persistent arange), so that a step uploads
// no positions buffer of its own.
type Positioner interface {
	Positions(ctx ml.Context) ml.Tensor
}

// SlidingWindower is implemented by Attender caches that apply sliding
// windows themselves: SlidingWindow(layer) is the window layer's queries
// are limited to (0: none).
type SlidingWindower interface {
	SlidingWindow(layer int) int
}

// CheckCache reports whether cache can run this model's attention: an
// Attender cache computes attention itself, so it must cap scores
// (gemma2) and limit windowed layers to their window (gemma) as the model
// does. Caches that only store (ollama's) get both from the forward pass
// and from DenseCache's SWA cache.
func (m *Model) CheckCache(cache kvcache.Cache) error {
	if _, ok := cache.(Attender); !ok {
		return nil
	}
	if m.Params.AttnSoftcap > 0 {
		if _, ok := cache.(SoftcapAttender); !ok {
			return fmt.Errorf("%s caps attention scores (attn_logit_softcapping %g), which the %T cache does not support", m.Params.Arch, m.Params.AttnSoftcap, cache)
		}
	}
	if m.Params.SlidingWindow > 0 {
		sw, ok := cache.(SlidingWindower)
		if !ok {
			return fmt.Errorf("%s has sliding-window layers (window %d), which the %T cache does not apply", m.Params.Arch, m.Params.SlidingWindow, cache)
		}
		for l := 0; l < m.Params.Layers; l++ {
			want := 0
			if m.Params.Windowed(l) {
				want = m.Params.SlidingWindow
			}
			if got := sw.SlidingWindow(l); got != want {
				return fmt.Errorf("the %T cache limits layer %d to a window of %d, the model to %d (0: global)", cache, l, got, want)
			}
		}
	}
	return nil
}

// SoftcapSDPA is attention with capped scores, as llama.cpp's
// build_attn_mha computes it without flash attention: kq = k·q in f32,
// scaled, capped as cap·tanh(kq/cap), masked, softmax, times v. The mask
// add and plain softmax equal llama.cpp's soft_max_ext(kq, mask, 1)
// exactly (x·1 + 1·m).
//
//	q [headDim, heads, batch], key [headDim, kvHeads, cells],
//	value [cells, headDim, kvHeads] (permuted), mask f32 [cells, batch]
//	-> [headDim, heads, batch]
func SoftcapSDPA(ctx ml.Context, q, key, value, mask ml.Tensor, scale float64, softcap float32) ml.Tensor {
	q = q.Permute(ctx, 0, 2, 1, 3)     // [headDim, batch, heads]
	key = key.Permute(ctx, 0, 2, 1, 3) // [headDim, cells, kvHeads]
	kq := key.MulmatFullPrec(ctx, q)   // [cells, batch, heads]
	if scale != 1 {
		kq = kq.Scale(ctx, scale)
	}
	kq = kq.Scale(ctx, float64(1/softcap)).Tanh(ctx).Scale(ctx, float64(softcap))
	if mask != nil {
		kq = kq.Add(ctx, mask)
	}
	kq = kq.Softmax(ctx)
	kqv := value.Mulmat(ctx, kq) // [headDim, batch, heads]
	return kqv.Permute(ctx, 0, 2, 1, 3).Contiguous(ctx)
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
	// gemma: norms of the attention output and the MLP output, [hidden].
	PostAttentionNorm *nn.RMSNorm `gguf:"post_attention_norm"`
	PostMLPNorm       *nn.RMSNorm `gguf:"post_ffw_norm"`
}

// Attention holds the projections of one layer. The backend duplicates the
// file's single rope_freqs.weight per layer as blk.N.rope_freqs.weight.
type Attention struct {
	QKV         *nn.Linear `gguf:"attn_qkv"` // phi3: q, k and v in one matrix
	Query       *nn.Linear `gguf:"attn_q"`
	Key         *nn.Linear `gguf:"attn_k"`
	Value       *nn.Linear `gguf:"attn_v"`
	Output      *nn.Linear `gguf:"attn_output"`
	RopeFactors ml.Tensor  `gguf:"rope_freqs.weight"`
	// LongRoPE's factors (Config.LongRoPE), [ropeDim/2], duplicated per
	// layer by the backend as rope_freqs is.
	RopeLong  ml.Tensor `gguf:"rope_factors_long.weight"`
	RopeShort ml.Tensor `gguf:"rope_factors_short.weight"`
	// qwen3: RMS norms of each head's queries and keys, [headDim].
	QueryNorm *nn.RMSNorm `gguf:"attn_q_norm"`
	KeyNorm   *nn.RMSNorm `gguf:"attn_k_norm"`
}

// MLP is the SwiGLU feed-forward block. Without Gate (phi3), Up is
// [hidden, 2·FFN]: gate and up in one matrix.
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
		if m.Params.Gemma {
			check(p+"post_attention_norm.weight", l.PostAttentionNorm != nil && l.PostAttentionNorm.Weight != nil)
			check(p+"post_ffw_norm.weight", l.PostMLPNorm != nil && l.PostMLPNorm.Weight != nil)
		}
		a := l.Attention
		check(p+"attn_q/k/v/output", a != nil && a.Output != nil && (a.QKV != nil || (a.Query != nil && a.Key != nil && a.Value != nil)))
		if a != nil && m.Params.LongRoPE {
			check(p+"rope_factors_long/short.weight", a.RopeLong != nil && a.RopeShort != nil)
		}
		if a != nil && m.Params.QKNorm {
			check(p+"attn_q_norm/attn_k_norm.weight", a.QueryNorm != nil && a.QueryNorm.Weight != nil && a.KeyNorm != nil && a.KeyNorm.Weight != nil)
		}
		if a != nil && m.Params.QKVBias {
			check(p+"attn_q/k/v.bias", a.Query != nil && a.Query.Bias != nil && a.Key != nil && a.Key.Bias != nil && a.Value != nil && a.Value.Bias != nil)
		}
		check(p+"ffn_gate/up/down", l.MLP != nil && (l.MLP.Gate != nil || m.Params.FusedGateUp) && l.MLP.Up != nil && l.MLP.Down != nil)
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing tensors: %v", missing)
	}
	return nil
}

// Shift re-ropes cached keys by shift positions (kvcache.Causal's shift hook).
func (m *Model) Shift(ctx ml.Context, layer int, key, shift ml.Tensor) (ml.Tensor, error) {
	return m.rope(ctx, layer, key, shift), nil
}

// rope rotates t with layer's base, scale and frequency factors (gemma3's
// windowed layers have their own base and scale; LongRoPE's factors
// depend on the context, and its attention factor scales the rotation as
// llama.cpp's ggml_rope_ext call does with ext_factor 0).
func (m *Model) rope(ctx ml.Context, layer int, t, positions ml.Tensor) ml.Tensor {
	a := m.Layers[layer].Attention
	factors := a.RopeFactors
	if m.Params.LongRoPE {
		factors = a.RopeShort
		if m.Params.LongFactors {
			factors = a.RopeLong
		}
	}
	opts := []func(*rope.Options){rope.WithFactors(factors)}
	if m.Params.RopeNeoX {
		opts = append(opts, rope.WithTypeNeoX())
	}
	if f := m.Params.RopeAttnFactor; f != 0 && f != 1 {
		opts = append(opts, rope.WithAttentionFactor(f))
	}
	base, scale := m.Params.Rope(layer)
	return nn.RoPE(ctx, t, positions, m.Params.RopeDim, base, scale, opts...)
}

// setLayer tells the cache which layer comes next and, for caches that
// keep windowed layers apart, its type.
func (m *Model) setLayer(cache kvcache.Cache, i int) {
	cache.SetLayer(i)
	if lt, ok := cache.(LayerTyper); ok && m.Params.SlidingWindow > 0 {
		if m.Params.Windowed(i) {
			lt.SetLayerType(0)
		} else {
			lt.SetLayerType(1)
		}
	}
}

// embed looks up the tokens' embeddings [hidden, batch]; gemma scales them
// by √hidden (llama.cpp: sqrtf(n_embd), a float32).
func (m *Model) embed(ctx ml.Context, tokens ml.Tensor) ml.Tensor {
	h := m.TokenEmbedding.Forward(ctx, tokens)
	if m.Params.Gemma {
		h = h.Scale(ctx, float64(float32(math.Sqrt(float64(m.Params.Hidden)))))
	}
	return h
}

// logits applies the output norm and matrix to h [hidden, n] and caps the
// logits where the model does (gemma2): [vocab, n].
func (m *Model) logits(ctx ml.Context, h ml.Tensor) ml.Tensor {
	h = m.OutputNorm.Forward(ctx, h, m.Params.Eps)
	out := m.Output.Forward(ctx, h)
	if c := m.Params.FinalSoftcap; c > 0 {
		out = out.Scale(ctx, float64(1/c)).Tanh(ctx).Scale(ctx, float64(c))
	}
	return out
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
	h := m.embed(ctx, batch.Inputs) // [hidden, batch]
	for i := range m.Layers {
		m.setLayer(cache, i)
		var outputs ml.Tensor
		if i == len(m.Layers)-1 {
			outputs = batch.Outputs
		}
		h = m.layer(ctx, i, h, positions, outputs, cache)
	}
	return m.logits(ctx, h), nil
}

// StepGraph builds into ctx the graph of a one-token pass whose token and
// position are read from tokens and positions (I32 [1] each) when the
// graph is computed, not when it is built, so that the caller can keep the
// graph and compute it again for later steps after writing them (DenseCache
// keeps one per run of steps that attend to the same cells; a Paged cache
// one per shape of its step, runtime/pagedstep.go). The cache's
// StartForward is not called: the caller must have set up what the
// cache's Put and Get (or Attention) use for the step. A cache with Hooks
// must not split the pass (NeedQueries false for every layer, asked
// here); the caller forwards its Outputs with the logits and calls
// Computed after each compute. Returns the logits [vocab, 1].
func (m *Model) StepGraph(ctx ml.Context, tokens, positions ml.Tensor, cache kvcache.Cache) (ml.Tensor, error) {
	if hooks, ok := cache.(Hooks); ok {
		for i := range m.Layers {
			if hooks.NeedQueries(i) {
				return nil, fmt.Errorf("arch: a kept step graph cannot split the pass (the %T cache needs layer %d's queries on the host)", cache, i)
			}
		}
	}
	h := m.embed(ctx, tokens) // [hidden, 1]
	for i := range m.Layers {
		m.setLayer(cache, i)
		h = m.layer(ctx, i, h, positions, nil, cache)
	}
	return m.logits(ctx, h), nil
}

func (m *Model) layer(ctx ml.Context, i int, h, positions, outputs ml.Tensor, cache kvcache.Cache) ml.Tensor {
	l := &m.Layers[i]
	q, k, v := m.qkv(ctx, i, l.Attention, l.AttentionNorm.Forward(ctx, h, m.Params.Eps), positions)
	attn := m.attention(ctx, i, q, k, v, m.attnScale(), m.Params.AttnSoftcap, cache) // [headDim, heads, batch]
	// In the last layer (outputs set) only the rows that want logits go on.
	return m.finish(ctx, l, attn, h, outputs)
}

// attnScale is the softmax scale of attention scores: 1/√headDim, or 1
// where the queries carry it (phi3 and gemma scale them after RoPE, as
// llama.cpp does).
func (m *Model) attnScale() float64 {
	if m.Params.ScaleQueries || m.Params.QueryScale != 0 {
		return 1
	}
	return 1 / math.Sqrt(float64(m.Params.HeadDim))
}

// qkv returns the layer's roped queries [headDim, heads, batch] and keys and
// values [headDim, kvHeads, batch] for the normed input h.
func (m *Model) qkv(ctx ml.Context, layer int, a *Attention, h, positions ml.Tensor) (q, k, v ml.Tensor) {
	n := h.Dim(1)
	hd := m.Params.HeadDim
	if a.QKV != nil {
		// One matrix: rows q (heads·hd), then k and v (kvHeads·hd each).
		// Views of it, as llama.cpp takes them; v is made contiguous for
		// the cache.
		qkv := a.QKV.Forward(ctx, h) // [(heads+2·kvHeads)·hd, batch]
		q = qkv.View(ctx, 0, hd, hd*4, m.Params.Heads, qkv.Stride(1), n)
		k = qkv.View(ctx, m.Params.Heads*hd*4, hd, hd*4, m.Params.KVHeads, qkv.Stride(1), n)
		v = qkv.View(ctx, (m.Params.Heads+m.Params.KVHeads)*hd*4, hd, hd*4, m.Params.KVHeads, qkv.Stride(1), n).Contiguous(ctx)
	} else {
		q = a.Query.Forward(ctx, h).Reshape(ctx, hd, m.Params.Heads, n)
		k = a.Key.Forward(ctx, h).Reshape(ctx, hd, m.Params.KVHeads, n)
		v = a.Value.Forward(ctx, h).Reshape(ctx, hd, m.Params.KVHeads, n)
	}
	if m.Params.QKNorm { // per head: the norm runs over dimension 0
		q = a.QueryNorm.Forward(ctx, q, m.Params.Eps)
		k = a.KeyNorm.Forward(ctx, k, m.Params.Eps)
	}
	q, k = m.rope(ctx, layer, q, positions), m.rope(ctx, layer, k, positions)
	if m.Params.ScaleQueries {
		q = q.Scale(ctx, 1/math.Sqrt(float64(hd)))
	}
	if s := m.Params.QueryScale; s != 0 {
		q = q.Scale(ctx, float64(s))
	}
	return q, k, v
}

// finish applies the output projection, the residual and the MLP to a
// layer's attention result [headDim, heads, batch].
func (m *Model) finish(ctx ml.Context, l *Layer, attn, residual, outputs ml.Tensor) ml.Tensor {
	n := attn.Dim(2)
	h := l.Attention.Output.Forward(ctx, attn.Reshape(ctx, m.Params.HeadDim*m.Params.Heads, n))
	if outputs != nil {
		h = h.Rows(ctx, outputs)
		residual = residual.Rows(ctx, outputs)
	}
	if m.Params.Gemma {
		h = l.PostAttentionNorm.Forward(ctx, h, m.Params.Eps)
	}
	h = h.Add(ctx, residual)
	residual = h
	h = l.MLPNorm.Forward(ctx, h, m.Params.Eps)
	if m.Params.Gemma {
		// GeGLU: gelu(gate)·up in one op (ggml_geglu_split, as llama.cpp's
		// build_ffn with LLM_FFN_GELU, LLM_FFN_PAR), [FFN, batch].
		h = l.MLP.Gate.Forward(ctx, h).GELU(ctx, l.MLP.Up.Forward(ctx, h))
		h = l.PostMLPNorm.Forward(ctx, l.MLP.Down.Forward(ctx, h), m.Params.Eps)
		return h.Add(ctx, residual)
	}
	if l.MLP.Gate == nil {
		// Fused gate and up (phi3): SwiGLU over the two halves.
		up := l.MLP.Up.Forward(ctx, h) // [2·FFN, batch]
		f := m.Params.FFN
		gate := up.View(ctx, 0, f, up.Stride(1), up.Dim(1))
		h = gate.SILU(ctx, up.View(ctx, f*4, f, up.Stride(1), up.Dim(1)))
	} else {
		h = l.MLP.Gate.Forward(ctx, h).SILU(ctx, l.MLP.Up.Forward(ctx, h))
	}
	h = l.MLP.Down.Forward(ctx, h)
	return h.Add(ctx, residual)
}

// Step is one forward pass: tokens at positions, logits wanted for the batch
// indices in Outputs.
type Step struct {
	Tokens    []int32
	Positions []int32
	Outputs   []int32
	// Reserve builds the pass's graph and reserves the backend's compute
	// buffer for it (ggml_backend_sched_reserve) instead of computing it:
	// later graphs that fit reuse that buffer instead of reallocating it.
	// Nothing is computed, stored or returned. The cache must not split
	// the pass (Hooks.NeedQueries false for every layer).
	Reserve bool
	// Started: the caller has called the cache's StartForward for this
	// pass already (a kept step graph that could not be used,
	// runtime/pagedstep.go); Run does not call it again.
	Started bool
}

// Run computes a forward pass with cache and returns the logits, row-major
// [len(Outputs)][vocab]. Caches implementing Hooks may split it into several
// graphs; the result is the same computation.
func (m *Model) Run(b ml.Backend, st Step, cache kvcache.Cache) (logits []float32, vocab int, err error) {
	n := len(st.Tokens)
	hooks, _ := cache.(Hooks)
	seqs := make([]int, n)
	ctx := b.NewContext()
	defer func() { ctx.Close() }()
	// When every row of the batch wants logits, in order (a one-token
	// decode step, or a prefill that asks for all rows), selecting the
	// output rows is the identity: no outputs tensor and no get_rows (two
	// per step in the last layer), as llama.cpp skips them when n_outputs
	// equals n_tokens. The rows' values are copies either way.
	everyRow := len(st.Outputs) == n
	for i, o := range st.Outputs {
		everyRow = everyRow && int(o) == i
	}
	newOutputs := func() ml.Tensor {
		if everyRow {
			return nil
		}
		return ctx.Input().FromInts(st.Outputs, len(st.Outputs))
	}
	batch := input.Batch{
		Inputs:    ctx.Input().FromInts(st.Tokens, n),
		Outputs:   newOutputs(),
		Positions: st.Positions,
		Sequences: seqs,
	}
	if !st.Started {
		if err := cache.StartForward(ctx, batch, st.Reserve); err != nil {
			return nil, 0, err
		}
	}
	compute := func(ts ...ml.Tensor) error {
		if hooks != nil {
			outs := hooks.Outputs(ctx)
			ctx.Forward(outs...)
			ts = append(ts, outs...)
		}
		ctx.Forward(ts...).Compute(ts...)
		if hooks != nil {
			return hooks.Computed(ctx)
		}
		return nil
	}
	var positions ml.Tensor
	if p, ok := cache.(Positioner); ok {
		positions = p.Positions(ctx)
	} else {
		positions = ctx.Input().FromInts(st.Positions, n)
	}
	h := m.embed(ctx, batch.Inputs) // [hidden, batch]
	scale := m.attnScale()
	split := false // ctx was replaced: batch's tensors belong to a closed context
	for i := range m.Layers {
		l := &m.Layers[i]
		m.setLayer(cache, i)
		var outputs ml.Tensor
		if i == len(m.Layers)-1 {
			// The batch's outputs tensor, unless a split closed its context
			// (one input buffer less a step; each is an allocation).
			outputs = batch.Outputs
			if split {
				outputs = newOutputs()
			}
		}
		if hooks == nil || !hooks.NeedQueries(i) {
			h = m.layer(ctx, i, h, positions, outputs, cache)
			continue
		}
		if st.Reserve {
			return nil, 0, fmt.Errorf("reserve: layer %d splits the pass (its cache needs the queries on the host)", i)
		}
		// Graph A: projections; k and v go into the cache, q and h to the host.
		q, k, v := m.qkv(ctx, i, l.Attention, l.AttentionNorm.Forward(ctx, h, m.Params.Eps), positions)
		cache.Put(ctx, k, v)
		qOut := ctx.Input().Empty(ml.DTypeF32, m.Params.HeadDim, m.Params.Heads, n)
		hOut := ctx.Input().Empty(ml.DTypeF32, m.Params.Hidden, n)
		ctx.Forward(q.Copy(ctx, qOut), h.Copy(ctx, hOut))
		if err := compute(qOut, hOut); err != nil {
			return nil, 0, err
		}
		qHost, hHost := qOut.Floats(), hOut.Floats()
		ctx.Close()
		rows := make([][]float32, n)
		w := m.Params.HeadDim * m.Params.Heads
		for t := range rows {
			rows[t] = qHost[t*w : (t+1)*w]
		}
		if err := hooks.SetQueries(i, rows); err != nil {
			ctx = b.NewContext()
			return nil, 0, err
		}
		// Graph B: attention over what the cache chose, then the rest.
		ctx = b.NewContext()
		split = true
		positions = ctx.Input().FromInts(st.Positions, n)
		if outputs != nil {
			outputs = newOutputs()
		}
		h = ctx.Input().FromFloats(hHost, m.Params.Hidden, n)
		q = ctx.Input().FromFloats(qHost, m.Params.HeadDim, m.Params.Heads, n)
		attn := m.attention(ctx, i, q, nil, nil, scale, m.Params.AttnSoftcap, cache)
		h = m.finish(ctx, l, attn, h, outputs)
	}
	out := m.logits(ctx, h) // [vocab, outputs]
	// Graph results live in the backend's shared compute buffer, which the
	// next graph (another session's) overwrites: copy the logits into a
	// tensor of this context before computing.
	logitsOut := ctx.Input().Empty(ml.DTypeF32, out.Dim(0), out.Dim(1))
	ctx.Forward(out.Copy(ctx, logitsOut))
	if st.Reserve {
		if hooks != nil {
			ctx.Forward(hooks.Outputs(ctx)...)
		}
		ctx.Reserve()
		return nil, out.Dim(0), nil
	}
	if err := compute(logitsOut); err != nil {
		return nil, 0, err
	}
	return logitsOut.Floats(), out.Dim(0), nil
}
