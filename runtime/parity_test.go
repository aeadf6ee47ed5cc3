package runtime_test

import (
	"context"
	"math"
	"strings"
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
func TestParityWithLlamaCpp(t *testing.T) {
	cases := []struct {
		name   string
		path   func(t *testing.T) string
		kv     string
		prompt string // tokenized text; random ids when empty
	}{
		{"stories260k", func(t *testing.T) string { return testmodels.StoriesV3(t) }, "f32",
			"Once upon a time, there was a little dog named Max. Max liked to run in the park with his friend, a small cat. One day they found a big red ball under a tree and they played with it until the sun went down."},
		{"llama-gqa-rope-freqs", func(t *testing.T) string { return testmodels.Random(t, "llama", "tiny", foundry.F32, 1, true) }, "f32", ""},
		{"qwen2-bias", func(t *testing.T) string { return testmodels.Random(t, "qwen2", "tiny", foundry.F32, 2, false) }, "f32", ""},
		{"qwen3-qk-norm", func(t *testing.T) string { return testmodels.Random(t, "qwen3", "tiny", foundry.F32, 6, false) }, "f32", ""},
		{"llama-f16-kv", func(t *testing.T) string { return testmodels.Random(t, "llama", "tiny", foundry.F32, 3, false) }, "f16", ""},
	}
	// Quantized weights, written by ggml's own quantizer: the same blocks
	// and the same kernels in both engines.
	for _, dt := range []foundry.DType{foundry.Q8_0, foundry.Q4_0, foundry.Q4_K, foundry.Q5_K, foundry.Q6_K, foundry.Q4_K_M} {
		cases = append(cases, struct {
			name   string
			path   func(t *testing.T) string
			kv     string
			prompt string
		}{"llama-" + string(dt), func(t *testing.T) string { return testmodels.Random(t, "llama", "tiny", dt, 5, false) }, "f16", ""})
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := c.path(t)
			ours, err := runtime.Open(context.Background(), path, runtime.Options{Threads: 1, KVType: c.kv, ContextLength: 256})
			require.NoError(t, err)
			defer ours.Close()
			ref, err := llamaref.Load(path, llamaref.Options{Threads: 1, KVType: c.kv, Context: 256})
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
				for i := 0; i < 64; i++ {
					toks = append(toks, int32((i*7919+13)%(n-3)+3))
				}
			}
			require.GreaterOrEqual(t, len(toks), 64)
			toks = toks[:min(64, len(toks))]

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
			if strings.HasPrefix(c.name, "llama-q") {
				require.Zero(t, maxDiff, "same quantized blocks, same kernels: bit-exact")
			}

			// 32-token greedy generations must be identical.
			prompt := toks[:8]
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
