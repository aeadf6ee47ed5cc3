package foundry

import (
	"fmt"
	"hash/fnv"
	"math"
	"math/rand/v2"
	"strings"

	fsggml "github.com/ollama/ollama/fs/ggml"
)

// Shape is the architecture of a random model.
type Shape struct {
	Hidden, Layers, Heads, KVHeads, HeadDim, FFN, Vocab int
	Context                                             int
	RopeBase                                            float32

	// gemma2/gemma3 only (zero elsewhere): the sliding window of the
	// windowed layers (attention.sliding_window), soft-capping of
	// attention scores and logits (gemma2), and a linear RoPE scaling
	// factor of the global layers (gemma3, as in its 4B+ models).
	SlidingWindow             int
	AttnSoftcap, FinalSoftcap float32
	RopeScaleLinear           float32
}

// gemma reports whether arch is gemma2 or gemma3.
func gemma(arch string) bool { return arch == "gemma2" || arch == "gemma3" }

// Presets are the shapes mkmodel knows by name.
var Presets = map[string]Shape{
	// A small model for tests and quick benchmarks.
	"tiny": {Hidden: 256, Layers: 4, Heads: 8, KVHeads: 2, HeadDim: 32, FFN: 512, Vocab: 512, Context: 131072, RopeBase: 10000},
	// gemma2 with a 64-token window on layers 0 and 2 (1 and 3 global),
	// and soft-capping small enough to change results (gemma2 2B's are 50
	// and 30).
	"gemma2-tiny": {Hidden: 256, Layers: 4, Heads: 8, KVHeads: 2, HeadDim: 32, FFN: 512, Vocab: 512, Context: 131072, RopeBase: 10000,
		SlidingWindow: 64, AttnSoftcap: 5, FinalSoftcap: 8},
	// gemma3 with a 64-token window: layers 0-4 local (RoPE base 10000),
	// layer 5 global (base 1e6, linear scaling 8).
	"gemma3-tiny": {Hidden: 256, Layers: 6, Heads: 8, KVHeads: 2, HeadDim: 32, FFN: 512, Vocab: 512, Context: 131072, RopeBase: 1e6,
		SlidingWindow: 64, RopeScaleLinear: 8},
	// Shaped like Llama-3.2-1B (with a 32k vocabulary).
	"1b": {Hidden: 2048, Layers: 16, Heads: 32, KVHeads: 8, HeadDim: 64, FFN: 8192, Vocab: 32000, Context: 131072, RopeBase: 500000},
}

// PresetArch is the architecture a preset is meant for: gemma2/gemma3 for
// their presets (they carry a sliding window), llama otherwise.
func PresetArch(preset string) string {
	for _, a := range []string{"gemma2", "gemma3"} {
		if strings.HasPrefix(preset, a+"-") {
			return a
		}
	}
	return "llama"
}

// RandomOptions select a random model.
type RandomOptions struct {
	Arch  string // "llama", "qwen2", "qwen3", "phi3", "gemma2" or "gemma3"
	Shape Shape
	DType DType
	Seed  uint64
	// RopeFreqs adds frequency factors: llama's Llama-3-style
	// rope_freqs.weight, or phi3's LongRoPE (rope_factors_long/short.weight,
	// original context LongRoPEOrigContext, attention factor
	// √(1 + ln(context/orig)/ln(orig)) as Phi-3's config gives it).
	RopeFreqs bool
}

// LongRoPEOrigContext is the original context of a random phi3 model with
// LongRoPE: a context above it takes the long factors.
const LongRoPEOrigContext = 256

// WriteRandom writes a model with random weights to path. The same options
// give the same bytes. Weights are scaled so that attention is not uniform
// and logits are spread over several units, which keeps greedy decoding away
// from near-ties in parity tests.
func WriteRandom(path string, o RandomOptions) error {
	s := o.Shape
	switch {
	case o.Arch != "llama" && o.Arch != "qwen2" && o.Arch != "qwen3" && o.Arch != "phi3" && !gemma(o.Arch):
		return fmt.Errorf("random models: architecture %q is not supported (llama, qwen2, qwen3, phi3, gemma2, gemma3)", o.Arch)
	case !gemma(o.Arch) && (s.SlidingWindow != 0 || s.AttnSoftcap != 0 || s.FinalSoftcap != 0 || s.RopeScaleLinear != 0):
		return fmt.Errorf("random models: sliding window, soft-capping and rope scaling are gemma2/gemma3 settings, not %s", o.Arch)
	case o.Arch == "gemma3" && s.AttnSoftcap != 0:
		return fmt.Errorf("random models: gemma3 has no attention soft-capping")
	case s.SlidingWindow < 0 || s.SlidingWindow == 1:
		return fmt.Errorf("random models: sliding window %d (want 0 or at least 2)", s.SlidingWindow)
	case o.Arch == "phi3" && s.Heads*s.HeadDim != s.Hidden:
		return fmt.Errorf("random models: phi3 needs heads x head dimension = hidden (%d x %d != %d)", s.Heads, s.HeadDim, s.Hidden)
	case s.Hidden <= 0 || s.Layers <= 0 || s.Heads <= 0 || s.KVHeads <= 0 || s.HeadDim <= 0 || s.FFN <= 0:
		return fmt.Errorf("random models: invalid shape %+v", s)
	case s.Heads%s.KVHeads != 0:
		return fmt.Errorf("random models: %d heads are not a multiple of %d KV heads", s.Heads, s.KVHeads)
	case o.RopeFreqs && o.Arch != "llama" && o.Arch != "phi3":
		return fmt.Errorf("random models: frequency factors are llama's rope_freqs or phi3's LongRoPE, not %s's", o.Arch)
	}
	if o.DType == "" {
		o.DType = F32
	}
	kv := fsggml.KV{
		"general.architecture":             o.Arch,
		"general.name":                     randomName(o),
		"general.file_type":                o.DType.fileType(),
		"block_count":                      uint32(s.Layers),
		"context_length":                   uint32(s.Context),
		"embedding_length":                 uint32(s.Hidden),
		"feed_forward_length":              uint32(s.FFN),
		"attention.head_count":             uint32(s.Heads),
		"attention.head_count_kv":          uint32(s.KVHeads),
		"attention.key_length":             uint32(s.HeadDim),
		"attention.value_length":           uint32(s.HeadDim),
		"attention.layer_norm_rms_epsilon": float32(1e-5),
		"rope.dimension_count":             uint32(s.HeadDim),
		"rope.freq_base":                   s.RopeBase,
		"tokenizer.ggml.add_bos_token":     o.Arch == "llama" || o.Arch == "phi3" || gemma(o.Arch),
		"tokenizer.ggml.add_eos_token":     false,
		"tokenizer.ggml.padding_token_id":  uint32(0),
		"general.quantization_version":     uint32(2),
		"tokenizer.ggml.add_space_prefix":  true,
		"general.kvrecall.foundry":         "random",
	}
	if o.RopeFreqs && o.Arch == "phi3" {
		orig := float64(LongRoPEOrigContext)
		kv["rope.scaling.original_context_length"] = uint32(LongRoPEOrigContext)
		kv["rope.scaling.attn_factor"] = float32(math.Sqrt(1 + math.Log(float64(s.Context)/orig)/math.Log(orig)))
	}
	if gemma(o.Arch) {
		kv["attention.layer_norm_rms_epsilon"] = float32(1e-6)
		if s.SlidingWindow > 0 {
			kv["attention.sliding_window"] = uint32(s.SlidingWindow)
		}
		if s.AttnSoftcap > 0 {
			kv["attn_logit_softcapping"] = s.AttnSoftcap
		}
		if s.FinalSoftcap > 0 {
			kv["final_logit_softcapping"] = s.FinalSoftcap
		}
		if s.RopeScaleLinear > 0 {
			kv["rope.scaling.type"] = "linear"
			kv["rope.scaling.factor"] = s.RopeScaleLinear
		}
	}
	if o.Arch == "llama" || o.Arch == "phi3" || gemma(o.Arch) {
		v, err := spmVocab(s.Vocab)
		if err != nil {
			return err
		}
		kv["tokenizer.ggml.model"] = "llama"
		kv["tokenizer.ggml.tokens"] = v.tokens
		kv["tokenizer.ggml.scores"] = v.scores
		kv["tokenizer.ggml.token_type"] = v.types
		kv["tokenizer.ggml.bos_token_id"] = uint32(1)
		kv["tokenizer.ggml.eos_token_id"] = uint32(2)
	} else {
		toks, types, merges, eos, err := bpeVocab(s.Vocab)
		if err != nil {
			return err
		}
		delete(kv, "tokenizer.ggml.add_space_prefix")
		kv["tokenizer.ggml.model"] = "gpt2"
		kv["tokenizer.ggml.pre"] = "qwen2"
		kv["tokenizer.ggml.tokens"] = toks
		kv["tokenizer.ggml.token_type"] = types
		kv["tokenizer.ggml.merges"] = merges
		kv["tokenizer.ggml.bos_token_id"] = uint32(eos)
		kv["tokenizer.ggml.eos_token_id"] = uint32(eos)
		kv["tokenizer.ggml.padding_token_id"] = uint32(eos)
	}

	h, q, kvd := s.Hidden, s.Heads*s.HeadDim, s.KVHeads*s.HeadDim
	var ts []*tensor
	mat := func(name string, in, out int, std float64) {
		ts = append(ts, &tensor{name: name, shape: []uint64{uint64(in), uint64(out)}, dtype: o.DType, gen: gaussian(o.Seed, name, 0, std)})
	}
	vec := func(name string, n int, mean, std float64) {
		ts = append(ts, &tensor{name: name, shape: []uint64{uint64(n)}, dtype: F32, gen: gaussian(o.Seed, name, mean, std)})
	}
	if gemma(o.Arch) {
		// Tied output, as gemma's files are (llama.cpp's gemma2 reads
		// token_embd as the output matrix even if output.weight exists).
		// The embeddings are scaled by √hidden on input: std 2/√hidden
		// gives inputs of RMS 2 and logits of a few units.
		mat("token_embd.weight", h, s.Vocab, 2/math.Sqrt(float64(h)))
	} else {
		mat("token_embd.weight", h, s.Vocab, 1)
		mat("output.weight", h, s.Vocab, 4/math.Sqrt(float64(h)))
	}
	vec("output_norm.weight", h, 1, 0.05)
	switch {
	case o.RopeFreqs && o.Arch == "phi3":
		// LongRoPE: short factors near 1, long ones rising to 16 for the
		// lowest frequencies (Phi-3-mini-128k's reach about 50).
		half := s.HeadDim / 2
		ts = append(ts, &tensor{name: "rope_factors_short.weight", shape: []uint64{uint64(half)}, dtype: F32,
			gen: func(dst []float32) {
				for i := range dst {
					dst[i] = float32(1 + 0.1*float64(i)/float64(half))
				}
			}},
			&tensor{name: "rope_factors_long.weight", shape: []uint64{uint64(half)}, dtype: F32,
				gen: func(dst []float32) {
					for i := range dst {
						dst[i] = float32(math.Pow(16, float64(i)/float64(half-1)))
					}
				}})
	case o.RopeFreqs:
		ts = append(ts, &tensor{name: "rope_freqs.weight", shape: []uint64{uint64(s.HeadDim / 2)}, dtype: F32,
			gen: func(dst []float32) { llama3RopeFactors(dst, float64(s.RopeBase), s.HeadDim) }})
	}
	for l := 0; l < s.Layers; l++ {
		p := fmt.Sprintf("blk.%d.", l)
		in := 1 / math.Sqrt(float64(h))
		vec(p+"attn_norm.weight", h, 1, 0.05)
		if o.Arch == "phi3" {
			// q, k and v in one matrix (rows in that order), gate and up too.
			ts = append(ts, &tensor{name: p + "attn_qkv.weight", shape: []uint64{uint64(h), uint64(q + 2*kvd)}, dtype: o.DType,
				gen: stacked(o.Seed, p+"attn_", h, []int{q, kvd, kvd}, []float64{1.5 * in, 1.5 * in, in})})
		} else {
			mat(p+"attn_q.weight", h, q, 1.5*in)
			mat(p+"attn_k.weight", h, kvd, 1.5*in)
			mat(p+"attn_v.weight", h, kvd, in)
		}
		mat(p+"attn_output.weight", q, h, 1/math.Sqrt(float64(q)))
		vec(p+"ffn_norm.weight", h, 1, 0.05)
		if o.Arch == "phi3" {
			mat(p+"ffn_up.weight", h, 2*s.FFN, in)
		} else {
			mat(p+"ffn_gate.weight", h, s.FFN, in)
			mat(p+"ffn_up.weight", h, s.FFN, in)
		}
		mat(p+"ffn_down.weight", s.FFN, h, 1/math.Sqrt(float64(s.FFN)))
		if gemma(o.Arch) {
			// The file's norm weights hold gemma's 1+w (llama.cpp's
			// convert adds the 1).
			vec(p+"post_attention_norm.weight", h, 1, 0.05)
			vec(p+"post_ffw_norm.weight", h, 1, 0.05)
		}
		if o.Arch == "qwen3" || o.Arch == "gemma3" {
			vec(p+"attn_q_norm.weight", s.HeadDim, 1, 0.1)
			vec(p+"attn_k_norm.weight", s.HeadDim, 1, 0.1)
		}
		if o.Arch == "qwen2" {
			vec(p+"attn_q.bias", q, 0, 0.5)
			vec(p+"attn_k.bias", kvd, 0, 0.5)
			vec(p+"attn_v.bias", kvd, 0, 0.1)
		}
	}
	return write(path, kv, ts)
}

// randomName is general.name. llama.cpp sets token attributes by model
// name: a name containing "phi3" or "phi-3" makes it look up Phi-3's
// special tokens (<|endoftext|>, ...), which a random vocabulary lacks.
func randomName(o RandomOptions) string {
	if o.Arch == "phi3" {
		return fmt.Sprintf("kvrecall-random-fused-%d", o.Seed)
	}
	return fmt.Sprintf("kvrecall-random-%s-%d", o.Arch, o.Seed)
}

// stacked fills a matrix of in-wide rows made of row blocks, block i
// rows[i] rows of N(0, stds[i]) (a fused q/k/v matrix whose parts want
// different scales).
func stacked(seed uint64, name string, in int, rows []int, stds []float64) func([]float32) {
	return func(dst []float32) {
		off := 0
		for i, r := range rows {
			gaussian(seed, fmt.Sprintf("%s%d", name, i), 0, stds[i])(dst[off : off+r*in])
			off += r * in
		}
	}
}

// gaussian fills with N(mean, std) from a stream seeded by (seed, name), so a
// tensor's values do not depend on the order tensors are generated in.
func gaussian(seed uint64, name string, mean, std float64) func([]float32) {
	return func(dst []float32) {
		h := fnv.New64a()
		h.Write([]byte(name))
		r := rand.New(rand.NewPCG(seed, h.Sum64()))
		for i := range dst {
			dst[i] = float32(mean + std*r.NormFloat64())
		}
	}
}

// llama3RopeFactors writes Llama 3.1's frequency factors (factor 8, low/high
// frequency factors 1 and 4, original context 8192): long wavelengths are
// stretched, short ones kept.
func llama3RopeFactors(dst []float32, base float64, headDim int) {
	const factor, lowFreq, highFreq, orig = 8.0, 1.0, 4.0, 8192.0
	lowWave, highWave := orig/lowFreq, orig/highFreq
	for i := range dst {
		freq := math.Pow(base, -float64(2*i)/float64(headDim))
		wave := 2 * math.Pi / freq
		switch {
		case wave < highWave:
			dst[i] = 1
		case wave > lowWave:
			dst[i] = factor
		default:
			smooth := (orig/wave - lowFreq) / (highFreq - lowFreq)
			dst[i] = float32(1 / ((1-smooth)/factor + smooth))
		}
	}
}
