package detect_test

import (
	"context"
	"fmt"
	"math"
	"os"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/haystack"
	"github.com/kvrecall/kvrecall/heads"
	"github.com/kvrecall/kvrecall/heads/detect"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/runtime"
)

func TestMain(m *testing.M) {
	testmodels.Quiet()
	os.Exit(m.Run())
}

func open(t *testing.T, path string, o runtime.Options) *runtime.Model {
	t.Helper()
	o.Threads = 2
	if o.ContextLength == 0 {
		o.ContextLength = 2048
	}
	m, err := runtime.Open(context.Background(), path, o)
	require.NoError(t, err)
	t.Cleanup(m.Close)
	return m
}

// The analysis cache computes the same logits as the dense cache, in one
// batch and in several, and its argmax is the host reference's: the float64
// forward pass of the same constructed model. Heads with a clear winner
// (the previous-token and retrieval heads) must pick exactly the
// reference's position; heads with ties (uniform heads) must pick a position
// whose reference weight equals the maximum.
func TestAnalysisMatchesDenseAndReference(t *testing.T) {
	path := testmodels.Recall(t)
	rec, err := foundry.BuildRecall(foundry.RecallOptions{})
	require.NoError(t, err)
	cases := []struct {
		name string
		opts runtime.Options
	}{
		{"one batch", runtime.Options{BatchSize: 512, KVType: "f32"}},
		{"batches of 48", runtime.Options{BatchSize: 48, KVType: "f32"}},
		{"f16 KV flash attention", runtime.Options{BatchSize: 64, KVType: "f16", FlashAttention: true}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := open(t, path, tc.opts)
			v, err := haystack.LoadVocab(m.File())
			require.NoError(t, err)
			c, err := v.NewCase(200, []float64{0.4}, 3)
			require.NoError(t, err)
			prompt := append(slices.Clone(c.Tokens), v.Question(c.Needles[0])...)
			ctx := context.Background()

			dense, err := m.NewSessionWith(runtime.DenseCache)
			require.NoError(t, err)
			defer dense.Close()
			want, err := dense.Eval(ctx, prompt, true, nil)
			require.NoError(t, err)

			s, a, err := detect.NewSession(m)
			require.NoError(t, err)
			defer s.Close()
			a.Record = true
			got, err := s.Eval(ctx, prompt, true, nil)
			require.NoError(t, err)
			require.Equal(t, want, got, "analysis mode changed the logits")

			ref := rec.Attention(prompt) // [layer][head][position] of the last token
			last := int32(len(prompt) - 1)
			clear := 0
			for l := range ref {
				for h, w := range ref[l] {
					at := a.Top(last, l, h)
					require.GreaterOrEqual(t, at, int32(0), "layer %d head %d not recorded", l, h)
					best := slices.Max(w)
					second := 0.0
					for p, x := range w {
						if p != slices.Index(w, best) {
							second = max(second, x)
						}
					}
					if best > 0.5 && second < 0.1 {
						clear++
						require.Equal(t, int32(slices.Index(w, best)), at, "layer %d head %d", l, h)
					} else {
						require.InDelta(t, best, w[at], 1e-3*best, "layer %d head %d picked a position the reference weighs %g < %g", l, h, w[at], best)
					}
				}
			}
			// previous-token head, offset-2 head, both retrieval heads, the retrieval layer's previous-token head
			require.GreaterOrEqual(t, clear, 4)
			// Every position of the prompt was recorded, in every batch.
			for p := range prompt {
				require.GreaterOrEqual(t, a.Top(int32(p), 0, 0), int32(0), "position %d", p)
			}
			// The previous-token head (layer 0, head 0) looks one back everywhere after BOS.
			for p := 1; p < len(prompt); p++ {
				require.Equal(t, int32(p-1), a.Top(int32(p), 0, 0), "position %d", p)
			}
		})
	}
}

// recorded returns the heads a constructed model lists under key
// (foundry.MetaRetrievalHeads, MetaEchoHeads) in its metadata, sorted.
func recorded(t *testing.T, m *runtime.Model, key string) []heads.Head {
	f := m.File()
	v, ok := f.Get(f.Architecture() + "." + key)
	require.True(t, ok, "%s records no %s", f.Path, key)
	pairs, ok := v.([]int32)
	require.True(t, ok && len(pairs)%2 == 0, "%s: %s is not (layer, head) pairs", f.Path, key)
	var hs []heads.Head
	for i := 0; i < len(pairs); i += 2 {
		hs = append(hs, heads.Head{Layer: int(pairs[i]), Head: int(pairs[i+1])})
	}
	slices.SortFunc(hs, func(a, b heads.Head) int { return (a.Layer-b.Layer)*100 + a.Head - b.Head })
	return hs
}

// NIAH detection finds exactly the retrieval heads the recall model records,
// and every prompt is answered.
func TestDetectFindsRecordedHeads(t *testing.T) {
	cases := []struct {
		name string
		opts foundry.RecallOptions
	}{
		{"default", foundry.RecallOptions{}},
		{"deep", foundry.RecallOptions{Deep: true}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := open(t, testmodels.RecallWith(t, tc.opts), runtime.Options{})
			p, err := detect.NIAH(context.Background(), m, detect.Options{Lengths: []int{256, 1024}, Depths: []float64{0, 0.5, 1}})
			require.NoError(t, err)
			for l, row := range p.Scores {
				t.Logf("layer %d scores %.3f in needle %.3f classes %v", l, row, p.InNeedle[l], p.Classes[l])
			}
			require.Equal(t, p.Samples, p.Correct)
			want := recorded(t, m, foundry.MetaRetrievalHeads)
			require.Equal(t, want, p.RetrievalHeads())
			group := p.Heads / p.KVHeads
			retrievalKV := map[[2]int]bool{}
			for _, h := range want {
				require.InDelta(t, 1, p.Scores[h.Layer][h.Head], 1e-9, "a recall head copies every answer token")
				retrievalKV[[2]int{h.Layer, h.Head / group}] = true
			}
			// The echo head looks into the needle at every step but never at
			// the token being generated: only the token rule keeps it out.
			if tc.opts.Deep {
				for _, h := range recorded(t, m, foundry.MetaEchoHeads) {
					require.Greater(t, p.InNeedle[h.Layer][h.Head], 0.9, "echo head %v", h)
					require.Zero(t, p.Scores[h.Layer][h.Head], "echo head %v", h)
				}
			}
			kv := p.KVClasses()
			for l := range kv {
				for g, streaming := range kv[l] {
					require.Equal(t, !retrievalKV[[2]int{l, g}], streaming, "layer %d KV head %d", l, g)
				}
			}
		})
	}
}

// The data-free score finds the retrieval (induction) heads and the echo
// heads without a needle set: exactly the heads each model records.
func TestDataFreeFindsInductionAndEchoHeads(t *testing.T) {
	cases := []struct {
		name string
		opts foundry.RecallOptions
	}{
		{"default", foundry.RecallOptions{}},
		{"deep", foundry.RecallOptions{Deep: true}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := open(t, testmodels.RecallWith(t, tc.opts), runtime.Options{})
			p, err := detect.DataFree(context.Background(), m, detect.DataFreeOptions{Period: 128, Samples: 2})
			require.NoError(t, err)
			for l := range p.Scores {
				t.Logf("layer %d induction %.3f echo %.3f", l, p.Induction[l], p.Echo[l])
			}
			above := func(s [][]float64) []heads.Head {
				var out []heads.Head
				for l := range s {
					for h, x := range s[l] {
						if x > p.Threshold {
							out = append(out, heads.Head{Layer: l, Head: h})
						}
					}
				}
				return out
			}
			induction := recorded(t, m, foundry.MetaRetrievalHeads)
			var echo []heads.Head
			if tc.opts.Deep {
				echo = recorded(t, m, foundry.MetaEchoHeads)
			}
			require.Equal(t, induction, above(p.Induction))
			require.Equal(t, echo, above(p.Echo))
			for _, h := range induction {
				require.Greater(t, p.Induction[h.Layer][h.Head], 0.9, "induction head %v", h)
			}
			for _, h := range echo {
				require.Greater(t, p.Echo[h.Layer][h.Head], 0.9, "echo head %v", h)
			}
		})
	}
}

// The causal check: with the detected retrieval KV heads limited to 4 sinks
// and the last 32 positions, the models answer no needle; with every other
// KV head limited instead, they answer every needle. Needles sit at 25-75 %
// of 1024 tokens, far from both the sinks and the window.
func TestAblation(t *testing.T) {
	for _, o := range []foundry.RecallOptions{{}, {Deep: true}} {
		name := map[bool]string{false: "default", true: "deep"}[o.Deep]
		t.Run(name, func(t *testing.T) {
			m := open(t, testmodels.RecallWith(t, o), runtime.Options{})
			ctx := context.Background()
			p, err := detect.NIAH(ctx, m, detect.Options{Lengths: []int{256}, Depths: []float64{0.5}})
			require.NoError(t, err)
			others := p.KVClasses()
			retrieval := make([][]bool, len(others))
			none := make([][]bool, len(others))
			for l := range others {
				none[l] = make([]bool, len(others[l]))
				for _, s := range others[l] {
					retrieval[l] = append(retrieval[l], !s)
				}
			}
			w := detect.Window{Sinks: 4, Recent: 32}
			no := detect.Options{Lengths: []int{1024}, Depths: []float64{0.25, 0.5, 0.75}}
			for _, tc := range []struct {
				name      string
				streaming [][]bool
				want      int
			}{
				{"none streaming", none, 3},
				{"all other KV heads streaming", others, 3},
				{"retrieval KV heads streaming", retrieval, 0},
			} {
				t.Run(tc.name, func(t *testing.T) {
					correct, total, err := detect.Ablation(ctx, m, tc.streaming, w, no)
					require.NoError(t, err)
					require.Equal(t, 3, total)
					require.Equal(t, tc.want, correct)
				})
			}
			_, _, err = detect.Ablation(ctx, m, none[:1], w, no)
			require.ErrorContains(t, err, "ablation mask has 1 layers")
		})
	}
}

// The windowed attention of the ablation, with a window that hides nothing,
// gives the dense logits up to rounding (it sums in another order).
func TestWindowedAttentionMatchesDense(t *testing.T) {
	for _, fa := range []bool{false, true} {
		t.Run(map[bool]string{false: "plain", true: "flash attention"}[fa], func(t *testing.T) {
			m := open(t, testmodels.Recall(t), runtime.Options{BatchSize: 64, FlashAttention: fa})
			v, err := haystack.LoadVocab(m.File())
			require.NoError(t, err)
			c, err := v.NewCase(300, []float64{0.3}, 9)
			require.NoError(t, err)
			prompt := append(slices.Clone(c.Tokens), v.Question(c.Needles[0])...)
			ctx := context.Background()
			dense, err := m.NewSessionWith(runtime.DenseCache)
			require.NoError(t, err)
			defer dense.Close()
			want, err := dense.Eval(ctx, prompt, true, nil)
			require.NoError(t, err)
			s, a, err := detect.NewSession(m)
			require.NoError(t, err)
			defer s.Close()
			a.Streaming = [][]bool{{true, true}, {true, true}}
			a.Window = detect.Window{Sinks: 0, Recent: 1 << 20}
			got, err := s.Eval(ctx, prompt, true, nil)
			require.NoError(t, err)
			worst := 0.0
			for i := range want {
				for j := range want[i] {
					worst = max(worst, math.Abs(float64(want[i][j]-got[i][j])))
				}
			}
			t.Logf("largest logit difference %.2g", worst)
			require.Less(t, worst, 0.05)
			// and a window of one position changes them
			s2, a2, err := detect.NewSession(m)
			require.NoError(t, err)
			defer s2.Close()
			a2.Streaming, a2.Window = [][]bool{{true, true}, {true, true}}, detect.Window{Recent: 1}
			narrow, err := s2.Eval(ctx, prompt, true, nil)
			require.NoError(t, err)
			require.NotEqual(t, want, narrow)
			// a mask of the wrong shape is an error, not a panic
			s3, a3, err := detect.NewSession(m)
			require.NoError(t, err)
			defer s3.Close()
			a3.Streaming = [][]bool{{true}}
			_, err = s3.Eval(ctx, prompt[:8], false, nil)
			require.ErrorContains(t, err, "[2 layers][2 KV heads]")
		})
	}
}

// The data-free score runs on any model: the pretrained stories260k (GGUF
// v1, 5 layers x 8 heads, 4 KV heads) has no echo or induction head, and a
// random qwen2 model (byte-level BPE vocabulary) gets a well-formed profile.
func TestDataFreeOtherModels(t *testing.T) {
	cases := []struct {
		name, path string
		none       bool // no head may score above the threshold
	}{
		{"stories260k", testmodels.Stories(t), true},
		{"random qwen2", testmodels.Random(t, "qwen2", "tiny", foundry.F32, 1, false), false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := open(t, tc.path, runtime.Options{ContextLength: 512})
			p, err := detect.DataFree(context.Background(), m, detect.DataFreeOptions{Period: 64, Samples: 2})
			require.NoError(t, err)
			cfg := m.Config()
			require.Len(t, p.Scores, cfg.Layers)
			require.Len(t, p.Classes[0], cfg.KVHeads)
			for l := range p.Scores {
				require.Len(t, p.Scores[l], cfg.Heads)
				for h, s := range p.Scores[l] {
					require.True(t, s >= 0 && s <= 1, "layer %d head %d score %v", l, h, s)
				}
			}
			if tc.none {
				require.Empty(t, p.RetrievalHeads())
				require.Equal(t, cfg.Layers*cfg.KVHeads, p.StreamingKVHeads())
			}
			_, err = detect.NIAH(context.Background(), m, detect.Options{})
			require.ErrorContains(t, err, "needs a recall model")
		})
	}
}

// A detected profile drives the "+heads" modifier of the paged cache: on
// the deep recall model (retrieval KV heads in layers 2 and 4, on different
// KV heads), dense+heads and retro+heads with the NIAH profile answer every
// needle; with the classes inverted (only the detected retrieval KV heads
// streaming) retro+heads answers none.
func TestProfileDrivesHeadMasks(t *testing.T) {
	path := testmodels.RecallWith(t, foundry.RecallOptions{Deep: true})
	ctx := context.Background()
	m, err := runtime.Open(ctx, path, runtime.Options{Threads: 2, ContextLength: 4096, DataDir: t.TempDir()})
	require.NoError(t, err)
	defer m.Close()
	p, err := detect.NIAH(ctx, m, detect.Options{Lengths: []int{256}, Depths: []float64{0.5}})
	require.NoError(t, err)
	inverse := heads.Mask(p.KVClasses())
	for l := range inverse {
		for g := range inverse[l] {
			inverse[l][g] = !inverse[l][g]
		}
	}
	v, err := haystack.LoadVocab(m.File())
	require.NoError(t, err)
	for _, depth := range []float64{0.25, 0.75} {
		c, err := v.NewCase(2048, []float64{depth}, uint64(depth*100))
		require.NoError(t, err)
		doc, err := m.IngestTokens(ctx, fmt.Sprintf("deep-%v", depth), c.Tokens, nil)
		require.NoError(t, err)
		n := c.Needles[0]
		for _, tc := range []struct {
			name, method string
			classes      heads.Classes
			exact        bool
		}{
			{"dense+heads/detected", "dense+heads", p, true},
			{"retro+heads/detected", "retro+heads", p, true},
			{"retro+heads/retrieval-streaming", "retro+heads", inverse, false},
		} {
			t.Run(fmt.Sprintf("%v/%s", depth, tc.name), func(t *testing.T) {
				s, err := m.DocumentSession(doc, runtime.PolicyOptions{Policy: tc.method, Budget: 512,
					Extra: map[string]any{heads.OptionKey: tc.classes}})
				require.NoError(t, err)
				defer s.Close()
				res, err := s.Generate(ctx, v.Question(n), runtime.GenerateOptions{MaxTokens: v.AnswerLength})
				require.NoError(t, err)
				require.Equal(t, tc.exact, slices.Equal(res.Tokens, n.Values), "got %v want %v", res.Tokens, n.Values)
			})
		}
	}
}
