// Package arch holds kvrecall's own forward passes for the llama family
// (architectures "llama", "qwen2", "qwen3", "phi3", "gemma2" and "gemma3"), written with ollama's ml ops and
// registered with ollama's model registry. ollama's model/models is never
// imported: it registers the same names.
//
// Attention goes through a cache seam: each layer hands its roped q, k and v
// to a kvcache.Cache, which stores k and v and decides which keys, values and
// mask attention sees. A cache that also implements Hooks sees the
// layer's queries first, so it can pick pages for them.
package arch

import (
	"fmt"
	"math"
	"slices"
	"strings"

	"github.com/kvrecall/kvrecall/gguf"
)

// Supported lists the architectures this package implements.
var Supported = []string{"llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"}

// Config holds the hyperparameters of a llama-family model.
type Config struct {
	Arch          string
	Layers        int
	Hidden        int
	Heads         int
	KVHeads       int
	HeadDim       int
	RopeDim       int
	FFN           int
	Vocab         int
	ContextLength int // trained context (0 if unknown)
	Eps           float32
	RopeBase      float32
	RopeScale     float32 // multiplies positions (1 / linear scaling factor)
	RopeNeoX      bool    // qwen2 rotates the two halves of a head, llama adjacent pairs
	QKVBias       bool
	QKNorm        bool // qwen3: RMS norms over each head's queries and keys before RoPE
	FusedGateUp   bool // phi3: ffn_up holds gate and up, [hidden, 2·FFN]
	ScaleQueries  bool // phi3: queries are scaled by 1/√headDim after RoPE, attention by 1
	RopeFreqs     bool // a rope_freqs.weight tensor scales the frequencies (Llama 3)
	// LongRoPE (Phi-3's 128k models): per-frequency factors
	// rope_factors_long/short.weight, the long ones when a sequence's
	// context is longer than RopeOrigContext (llama.cpp's
	// get_rope_factors), and RoPE's rotations scaled by RopeAttnFactor
	// (rope.scaling.attn_factor, 1 if absent). LongFactors is the choice
	// for the context this model was opened with (set by the runtime).
	LongRoPE        bool
	RopeOrigContext int
	RopeAttnFactor  float32
	LongFactors     bool
	TiedOutput      bool // no output.weight: the embedding doubles as the output matrix

	// Gemma (gemma2, gemma3): embeddings are scaled by √hidden, the MLP is
	// GeGLU (tanh-approximated GELU gate), and each block has two more RMS
	// norms, after attention (post_attention_norm) and after the MLP
	// (post_ffw_norm), both before their residual adds. The GGUF's norm
	// weights already hold gemma's 1+w (llama.cpp's convert adds the 1), so
	// every RMS norm is the plain x/rms·w.
	Gemma bool
	// QueryScale, if set, multiplies the queries after RoPE and attention
	// uses scale 1 (gemma: 1/√headDim, or 1/√(hidden/heads) for the 27B
	// models, as llama.cpp decides; 1/√query_pre_attn_scalar where the GGUF
	// gives that key, which llama.cpp ignores).
	QueryScale float32
	// AttnSoftcap and FinalSoftcap cap attention scores and logits as
	// cap·tanh(x/cap) (gemma2: 50 and 30 by default); 0 means none.
	AttnSoftcap, FinalSoftcap float32
	// SlidingWindow is the tokens a windowed layer attends to, the query's
	// own included (llama.cpp's n_swa: key p0 is visible to query p1 when
	// p1-p0 < SlidingWindow); 0 means every layer is global.
	SlidingWindow int
	// SWAPattern groups layers: in each run of SWAPattern layers all but
	// the last are windowed (gemma2 2: even layers; gemma3 6: five local,
	// one global).
	SWAPattern int
	// LocalRopeBase, if set, is the RoPE base of windowed layers, which
	// also get no rope scaling (gemma3: 10000); global layers use RopeBase
	// and RopeScale.
	LocalRopeBase float32
}

// Windowed reports whether layer attends only to its sliding window.
func (c Config) Windowed(layer int) bool {
	return c.SlidingWindow > 0 && c.SWAPattern > 0 && layer%c.SWAPattern < c.SWAPattern-1
}

// WindowedLayers lists the layers that attend only to their window.
func (c Config) WindowedLayers() []int {
	var out []int
	for l := 0; l < c.Layers; l++ {
		if c.Windowed(l) {
			out = append(out, l)
		}
	}
	return out
}

// Rope returns the RoPE base and position scale of layer.
func (c Config) Rope(layer int) (base, scale float32) {
	if c.LocalRopeBase > 0 && c.Windowed(layer) {
		return c.LocalRopeBase, 1
	}
	return c.RopeBase, c.RopeScale
}

// KVBytesPerToken is the KV cache size of one token at the given element size.
func (c Config) KVBytesPerToken(elemBytes int) int {
	return 2 * c.Layers * c.KVHeads * c.HeadDim * elemBytes
}

// UnsupportedError reports an architecture this package does not implement.
type UnsupportedError struct{ Arch string }

func (e *UnsupportedError) Error() string {
	return fmt.Sprintf("architecture %q is not supported (supported: %s)", e.Arch, strings.Join(Supported, ", "))
}

// Getter looks up a metadata value by its full key.
type Getter func(key string) (any, bool)

// ParseConfig reads and checks the hyperparameters and tensors of f.
// Every error names the problem; callers add the file name.
func ParseConfig(f *gguf.File) (Config, error) {
	c, err := parseHParams(f.Get)
	if err != nil {
		return c, err
	}
	return c, c.checkTensors(f)
}

func uintOf(get Getter, key string) (uint64, bool) {
	v, ok := get(key)
	if !ok {
		return 0, false
	}
	return gguf.AsUint(v)
}

func stringOf(get Getter, key string) string {
	v, _ := get(key)
	s, _ := v.(string)
	return s
}

// parseHParams reads the scalar hyperparameters; it needs no tensor data, so
// the registered constructor can use it on ollama's metadata too.
func parseHParams(get Getter) (Config, error) {
	a := stringOf(get, "general.architecture")
	if a == "" {
		return Config{}, fmt.Errorf("general.architecture is missing")
	}
	if !slices.Contains(Supported, a) {
		return Config{}, &UnsupportedError{Arch: a}
	}
	gemma := a == "gemma2" || a == "gemma3"
	c := Config{Arch: a, RopeNeoX: a == "qwen2" || a == "qwen3" || a == "phi3" || gemma, QKVBias: a == "qwen2",
		QKNorm: a == "qwen3" || a == "gemma3", FusedGateUp: a == "phi3", ScaleQueries: a == "phi3", Gemma: gemma}
	need := func(key string) (int, error) {
		v, ok := uintOf(get, a+"."+key)
		if !ok || v == 0 || v > 1<<24 {
			return 0, fmt.Errorf("metadata %s.%s is missing or invalid", a, key)
		}
		return int(v), nil
	}
	var err error
	if c.Layers, err = need("block_count"); err != nil {
		return c, err
	}
	if c.Hidden, err = need("embedding_length"); err != nil {
		return c, err
	}
	if c.Heads, err = need("attention.head_count"); err != nil {
		return c, err
	}
	if c.FFN, err = need("feed_forward_length"); err != nil {
		return c, err
	}
	c.KVHeads = c.Heads
	if v, ok := uintOf(get, a+".attention.head_count_kv"); ok {
		c.KVHeads = int(v)
	}
	if c.KVHeads == 0 || c.Heads%c.KVHeads != 0 {
		return c, fmt.Errorf("attention.head_count %d is not a multiple of head_count_kv %d", c.Heads, c.KVHeads)
	}
	c.HeadDim = c.Hidden / c.Heads
	if v, ok := uintOf(get, a+".attention.key_length"); ok {
		c.HeadDim = int(v)
	}
	if v, ok := uintOf(get, a+".attention.value_length"); ok && int(v) != c.HeadDim {
		return c, fmt.Errorf("attention.value_length %d differs from key_length %d, which is not supported", v, c.HeadDim)
	}
	c.RopeDim = c.HeadDim
	if v, ok := uintOf(get, a+".rope.dimension_count"); ok {
		c.RopeDim = int(v)
	}
	if c.RopeDim > c.HeadDim || c.RopeDim%2 != 0 || c.RopeDim == 0 {
		return c, fmt.Errorf("rope.dimension_count %d is invalid for head dimension %d", c.RopeDim, c.HeadDim)
	}
	if v, ok := uintOf(get, a+".context_length"); ok {
		c.ContextLength = int(v)
	}
	if v, ok := get("tokenizer.ggml.tokens"); ok {
		if s, ok := v.([]string); ok {
			c.Vocab = len(s)
		}
	}
	c.Eps = float32Of(get, a+".attention.layer_norm_rms_epsilon", 1e-5)
	c.RopeBase = float32Of(get, a+".rope.freq_base", 10000)
	c.RopeScale = 1
	switch t := stringOf(get, a+".rope.scaling.type"); t {
	case "", "none":
	case "linear":
		if s := float32Of(get, a+".rope.scaling.factor", 1); s > 0 {
			c.RopeScale = 1 / s
		}
	default:
		return c, fmt.Errorf("rope scaling type %q is not supported (none, linear)", t)
	}
	if s := float32Of(get, a+".rope.scale_linear", 0); s > 0 {
		c.RopeScale = 1 / s
	}
	if v, ok := uintOf(get, a+".rope.scaling.original_context_length"); ok {
		c.RopeOrigContext = int(v)
	}
	c.RopeAttnFactor = float32Of(get, a+".rope.scaling.attn_factor", 1)
	if c.Gemma {
		if err := c.parseGemma(get); err != nil {
			return c, err
		}
	}
	if v, ok := uintOf(get, a+".expert_count"); ok && v > 0 {
		return c, fmt.Errorf("mixture-of-experts models (expert_count %d) are not supported", v)
	}
	return c, nil
}

// parseGemma reads gemma2/gemma3's settings as llama.cpp's loader does
// (llama-model.cpp, load_hparams).
func (c *Config) parseGemma(get Getter) error {
	a := c.Arch
	// llama.cpp: 1/√(n_embd/n_head) for the 27B models (recognised by
	// their layer count), else 1/√head_dim, computed in float32.
	qpre := float32(c.HeadDim)
	if (a == "gemma2" && c.Layers == 46) || (a == "gemma3" && c.Layers == 62) {
		qpre = float32(c.Hidden / c.Heads)
	}
	if s := float32Of(get, a+".attention.query_pre_attn_scalar", 0); s > 0 {
		qpre = s
	}
	c.QueryScale = 1 / float32(math.Sqrt(float64(qpre)))
	window, hasWindow := uintOf(get, a+".attention.sliding_window")
	switch a {
	case "gemma2":
		c.AttnSoftcap = float32Of(get, a+".attn_logit_softcapping", 50)
		c.FinalSoftcap = float32Of(get, a+".final_logit_softcapping", 30)
		c.SlidingWindow, c.SWAPattern = 4096, 2
		if hasWindow {
			c.SlidingWindow = int(window)
		}
	case "gemma3":
		c.FinalSoftcap = float32Of(get, a+".final_logit_softcapping", 0)
		if hasWindow && window > 0 {
			c.SlidingWindow, c.SWAPattern, c.LocalRopeBase = int(window), 6, 10000
		}
	}
	if p, ok := uintOf(get, a+".attention.sliding_window_pattern"); ok && c.SlidingWindow > 0 {
		// Not read by the pinned llama.cpp (it fixes 2 and 6); honoured
		// when a file states it.
		if p == 0 || p > uint64(c.Layers) {
			return fmt.Errorf("metadata %s.attention.sliding_window_pattern %d is outside 1..%d", a, p, c.Layers)
		}
		c.SWAPattern = int(p)
	}
	if c.SlidingWindow == 1 {
		return fmt.Errorf("metadata %s.attention.sliding_window 1 is not supported (a window of the token alone)", a)
	}
	if c.AttnSoftcap < 0 || c.FinalSoftcap < 0 {
		return fmt.Errorf("negative soft-capping (attn_logit_softcapping %g, final_logit_softcapping %g)", c.AttnSoftcap, c.FinalSoftcap)
	}
	return nil
}

func float32Of(get Getter, key string, def float32) float32 {
	v, ok := get(key)
	if !ok {
		return def
	}
	switch x := v.(type) {
	case float32:
		return x
	case float64:
		return float32(x)
	}
	return def
}

// checkTensors verifies that every tensor the forward pass reads exists with
// the shape the hyperparameters imply (ggml order: input dimension first).
func (c *Config) checkTensors(f *gguf.File) error {
	emb, ok := f.Tensor("token_embd.weight")
	if !ok {
		return fmt.Errorf("missing tensor token_embd.weight")
	}
	if len(emb.Shape) != 2 || int(emb.Shape[0]) != c.Hidden {
		return fmt.Errorf("tensor token_embd.weight has shape %v, want [%d, vocab]", emb.Shape, c.Hidden)
	}
	c.Vocab = int(emb.Shape[1])
	if toks, ok := f.Get("tokenizer.ggml.tokens"); ok {
		if s, ok := toks.([]string); ok && len(s) != c.Vocab {
			return fmt.Errorf("tokenizer has %d tokens but token_embd.weight has %d rows", len(s), c.Vocab)
		}
	} else {
		return fmt.Errorf("metadata tokenizer.ggml.tokens is missing")
	}
	q, kv := c.Heads*c.HeadDim, c.KVHeads*c.HeadDim
	want := map[string][]uint64{
		"output_norm.weight": {uint64(c.Hidden)},
	}
	if _, ok := f.Tensor("output.weight"); ok {
		want["output.weight"] = []uint64{uint64(c.Hidden), uint64(c.Vocab)}
	} else {
		c.TiedOutput = true
	}
	long, hasLong := f.Tensor("rope_factors_long.weight")
	short, hasShort := f.Tensor("rope_factors_short.weight")
	if hasLong || hasShort {
		if !hasLong || !hasShort {
			return fmt.Errorf("LongRoPE needs both rope_factors_long.weight and rope_factors_short.weight; the file has only one")
		}
		for _, t := range []gguf.Tensor{long, short} {
			if len(t.Shape) != 1 || int(t.Shape[0]) != c.RopeDim/2 {
				return fmt.Errorf("tensor %s has shape %v, want [%d]", t.Name, t.Shape, c.RopeDim/2)
			}
		}
		c.LongRoPE = true
		if c.RopeOrigContext <= 0 {
			// llama.cpp: n_ctx_orig_yarn defaults to the trained context.
			c.RopeOrigContext = c.ContextLength
		}
	}
	if t, ok := f.Tensor("rope_freqs.weight"); ok {
		c.RopeFreqs = true
		if len(t.Shape) != 1 || int(t.Shape[0]) != c.RopeDim/2 {
			return fmt.Errorf("tensor rope_freqs.weight has shape %v, want [%d]", t.Shape, c.RopeDim/2)
		}
	}
	for i := 0; i < c.Layers; i++ {
		p := fmt.Sprintf("blk.%d.", i)
		want[p+"attn_norm.weight"] = []uint64{uint64(c.Hidden)}
		if _, fused := f.Tensor(p + "attn_qkv.weight"); fused {
			want[p+"attn_qkv.weight"] = []uint64{uint64(c.Hidden), uint64(q + 2*kv)}
		} else {
			want[p+"attn_q.weight"] = []uint64{uint64(c.Hidden), uint64(q)}
			want[p+"attn_k.weight"] = []uint64{uint64(c.Hidden), uint64(kv)}
			want[p+"attn_v.weight"] = []uint64{uint64(c.Hidden), uint64(kv)}
		}
		want[p+"attn_output.weight"] = []uint64{uint64(q), uint64(c.Hidden)}
		want[p+"ffn_norm.weight"] = []uint64{uint64(c.Hidden)}
		if c.FusedGateUp {
			want[p+"ffn_up.weight"] = []uint64{uint64(c.Hidden), uint64(2 * c.FFN)}
		} else {
			want[p+"ffn_gate.weight"] = []uint64{uint64(c.Hidden), uint64(c.FFN)}
			want[p+"ffn_up.weight"] = []uint64{uint64(c.Hidden), uint64(c.FFN)}
		}
		want[p+"ffn_down.weight"] = []uint64{uint64(c.FFN), uint64(c.Hidden)}
		if c.Gemma {
			want[p+"post_attention_norm.weight"] = []uint64{uint64(c.Hidden)}
			want[p+"post_ffw_norm.weight"] = []uint64{uint64(c.Hidden)}
		}
		if c.QKNorm {
			want[p+"attn_q_norm.weight"] = []uint64{uint64(c.HeadDim)}
			want[p+"attn_k_norm.weight"] = []uint64{uint64(c.HeadDim)}
		}
		if c.QKVBias {
			want[p+"attn_q.bias"] = []uint64{uint64(q)}
			want[p+"attn_k.bias"] = []uint64{uint64(kv)}
			want[p+"attn_v.bias"] = []uint64{uint64(kv)}
		}
	}
	names := make([]string, 0, len(want))
	for n := range want {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		t, ok := f.Tensor(n)
		if !ok {
			return fmt.Errorf("missing tensor %s", n)
		}
		if !slices.Equal(t.Shape, want[n]) {
			return fmt.Errorf("tensor %s has shape %v, want %v", n, t.Shape, want[n])
		}
	}
	return nil
}
