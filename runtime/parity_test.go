package runtime_test

import (
	"context"
	"math"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/llamaref"
	"github.com/kvrecall/kvrecall/runtime"
)

// Our forward pass must reproduce llama.cpp's full-attention logits on the
// same file: a real pretrained model and random llama (GQA, rope_freqs) and
// qwen2 (QKV biases, NeoX rope) models, with the same KV type in both.
//
// gemma2 and gemma3 run on prompts longer than their 64-token window
// (n = 200 tokens of logits, greedy decoding from 100), so that the
// windowed layers really drop keys (a window one token wider moves logits
// by ~1). They are bit-exact: same ops in the same order (embedding scale,
// q scaled after RoPE in float32, capped scores then mask and softmax as
// soft_max_ext(kq, mask, 1) computes them, geglu_split), and the windowed
// layers' ring caches (ollama's SWA cache of window-1+batch cells,
// llama.cpp's iswa cache of n_swa+ubatch) have not wrapped within 232
// tokens, so every key sits in the same cell in both engines. Past the
// ring's first wrap the cells' order may differ, and sums over cells would
// then round differently (not exercised here).
func TestParityWithLlamaCpp(t *testing.T) {
	type parityCase struct {
		name   string
		path   func(t *testing.T) string
		kv     string
		prompt string // tokenized text; random ids when empty
		n      int    // tokens compared (default 64)
		greedy int    // prompt tokens of the greedy check (default 8)
		exact  bool   // logits must be bit-exact
		ctx    int    // context length of both engines (default 256)
	}
	cases := []parityCase{
		{"stories260k", func(t *testing.T) string { return testmodels.StoriesV3(t) }, "f32",
			"Once upon a time, there was a little dog named Max. Max liked to run in the park with his friend, a small cat. One day they found a big red ball under a tree and they played with it until the sun went down.", 0, 0, false, 0},
		{"llama-gqa-rope-freqs", func(t *testing.T) string { return testmodels.Random(t, "llama", "tiny", foundry.F32, 1, true) }, "f32", "", 0, 0, false, 0},
		{"qwen2-bias", func(t *testing.T) string { return testmodels.Random(t, "qwen2", "tiny", foundry.F32, 2, false) }, "f32", "", 0, 0, false, 0},
		{"phi3-fused-qkv-gate-up", func(t *testing.T) string { return testmodels.Random(t, "phi3", "tiny", foundry.F32, 7, false) }, "f32", "", 0, 0, false, 0},
		// LongRoPE: the long factors at a context of 512 (above the
		// file's original 256), the short ones at 256, and the attention
		// factor (1.26) either way.
		{name: "phi3-longrope-long", path: func(t *testing.T) string { return testmodels.Random(t, "phi3", "tiny", foundry.F32, 11, true) }, kv: "f32", ctx: 512},
		{name: "phi3-longrope-short", path: func(t *testing.T) string { return testmodels.Random(t, "phi3", "tiny", foundry.F32, 11, true) }, kv: "f32", ctx: foundry.LongRoPEOrigContext},
		{"qwen3-qk-norm", func(t *testing.T) string { return testmodels.Random(t, "qwen3", "tiny", foundry.F32, 6, false) }, "f32", "", 0, 0, false, 0},
		{"llama-f16-kv", func(t *testing.T) string { return testmodels.Random(t, "llama", "tiny", foundry.F32, 3, false) }, "f16", "", 0, 0, false, 0},
		{name: "gemma2-window-softcap", path: func(t *testing.T) string { return testmodels.Random(t, "gemma2", "gemma2-tiny", foundry.F32, 8, false) },
			kv: "f32", n: 200, greedy: 100, exact: true},
		{name: "gemma3-window-local-rope", path: func(t *testing.T) string { return testmodels.Random(t, "gemma3", "gemma3-tiny", foundry.F32, 9, false) },
			kv: "f32", n: 200, greedy: 100, exact: true},
		{name: "gemma3-f16-kv", path: func(t *testing.T) string {
			return testmodels.Random(t, "gemma3", "gemma3-tiny", foundry.F16, 10, false)
		},
			kv: "f16", n: 200, greedy: 100, exact: true},
	}
	// Quantized weights, written by ggml's own quantizer: the same blocks
	// and the same kernels in both engines.
	for _, dt := range []foundry.DType{foundry.Q8_0, foundry.Q4_0, foundry.Q4_K, foundry.Q5_K, foundry.Q6_K, foundry.Q4_K_M} {
		cases = append(cases, parityCase{"llama-" + string(dt), func(t *testing.T) string { return testmodels.Random(t, "llama", "tiny", dt, 5, false) }, "f16", "", 0, 0, true, 0})
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if c.n == 0 {
				c.n = 64
			}
			if c.greedy == 0 {
				c.greedy = 8
			}
			if c.ctx == 0 {
				c.ctx = 256
			}
			path := c.path(t)
			ours, err := runtime.Open(context.Background(), path, runtime.Options{Threads: 1, KVType: c.kv, ContextLength: c.ctx})
			require.NoError(t, err)
			defer ours.Close()
			if cfg := ours.Config(); cfg.LongRoPE {
				require.Equal(t, c.ctx > cfg.RopeOrigContext, cfg.LongFactors, "LongRoPE's factors follow the context")
			}
			if w := ours.Config().SlidingWindow; w > 0 {
				require.Greater(t, c.n, w, "the prompt must be longer than the window")
				require.Greater(t, c.greedy, w)
			}
			ref, err := llamaref.Load(path, llamaref.Options{Threads: 1, KVType: c.kv, Context: c.ctx})
			require.NoError(t, err)
			defer ref.Close()

			var toks []int32
			if c.prompt != "" {
				toks, err = ours.Tokenizer().Encode(c.prompt, true)
				require.NoError(t, err)
				refToks, err := ref.Tokenize(c.prompt, true)
				require.NoError(t, err)
				require.Equal(t, refToks, toks, "tokenizers disagree")
			} else {
				n := ours.Config().Vocab
				for i := 0; i < c.n; i++ {
					toks = append(toks, int32((i*7919+13)%(n-3)+3))
				}
			}
			require.GreaterOrEqual(t, len(toks), c.n)
			toks = toks[:c.n]

			s, err := ours.NewSession()
			require.NoError(t, err)
			defer s.Close()
			got, err := s.Eval(context.Background(), toks, true, nil)
			require.NoError(t, err)
			want, err := ref.Append(toks, true, nil)
			require.NoError(t, err)
			require.Len(t, got, len(want))
			var maxDiff, maxAbs float64
			for i := range want {
				for j := range want[i] {
					maxDiff = math.Max(maxDiff, math.Abs(float64(got[i][j]-want[i][j])))
					maxAbs = math.Max(maxAbs, math.Abs(float64(want[i][j])))
				}
			}
			t.Logf("%d positions: max |diff| %.3g, max |logit| %.3g", len(want), maxDiff, maxAbs)
			require.Greater(t, maxAbs, 1.0, "degenerate logits")
			require.LessOrEqual(t, maxDiff, 1e-3*maxAbs)
			if c.exact {
				require.Zero(t, maxDiff, "same ops, same kernels, same cell order: bit-exact")
			}

			// 32-token greedy generations must be identical.
			prompt := toks[:c.greedy]
			refGen, err := ref.Greedy(prompt, 32)
			require.NoError(t, err)
			s2, err := ours.NewSession()
			require.NoError(t, err)
			defer s2.Close()
			res, err := s2.Generate(context.Background(), prompt, runtime.GenerateOptions{MaxTokens: 32})
			require.NoError(t, err)
			require.Equal(t, refGen, res.Tokens)
			if len(refGen) < 32 {
				require.Equal(t, runtime.StopEOG, res.StopReason)
			}
		})
	}
}

// LongRoPE's two factor sets really differ: the same tokens give other
// logits at a context above the original one than at or below it.
func TestLongRoPEFactorsMatter(t *testing.T) {
	path := testmodels.Random(t, "phi3", "tiny", foundry.F32, 11, true)
	logits := func(ctxLen int) [][]float32 {
		m, err := runtime.Open(context.Background(), path, runtime.Options{Threads: 1, ContextLength: ctxLen})
		require.NoError(t, err)
		defer m.Close()
		require.True(t, m.Config().LongRoPE)
		s, err := m.NewSession()
		require.NoError(t, err)
		defer s.Close()
		toks := make([]int32, 64)
		for i := range toks {
			toks[i] = int32((i*7919+13)%500 + 3)
		}
		out, err := s.Eval(context.Background(), toks, true, nil)
		require.NoError(t, err)
		return out
	}
	short, long := logits(foundry.LongRoPEOrigContext), logits(2*foundry.LongRoPEOrigContext)
	var diff float64
	for i := range short {
		for j := range short[i] {
			diff = math.Max(diff, math.Abs(float64(short[i][j]-long[i][j])))
		}
	}
	require.Greater(t, diff, 0.1, "long and short factors gave the same logits")
}
