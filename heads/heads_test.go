package heads_test

import (
	"context"
	"math"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/haystack"
	"github.com/kvrecall/kvrecall/heads"
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

			s, a, err := heads.NewSession(m)
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

// recorded returns the model's retrieval heads from its metadata, sorted.
func recorded(t *testing.T, m *runtime.Model, key string) [][2]int {
	hs, err := heads.Recorded(m.File(), key)
	require.NoError(t, err)
	slices.SortFunc(hs, func(a, b [2]int) int { return (a[0]-b[0])*100 + a[1] - b[1] })
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
			p, err := heads.Detect(context.Background(), m, heads.Options{Lengths: []int{256, 1024}, Depths: []float64{0, 0.5, 1}})
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
				require.InDelta(t, 1, p.Scores[h[0]][h[1]], 1e-9, "a recall head copies every answer token")
				retrievalKV[[2]int{h[0], h[1] / group}] = true
			}
			// The echo head looks into the needle at every step but never at
			// the token being generated: only the token rule keeps it out.
			if tc.opts.Deep {
				for _, h := range recorded(t, m, foundry.MetaEchoHeads) {
					require.Greater(t, p.InNeedle[h[0]][h[1]], 0.9, "echo head %v", h)
					require.Zero(t, p.Scores[h[0]][h[1]], "echo head %v", h)
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
			p, err := heads.DataFree(context.Background(), m, heads.DataFreeOptions{Period: 128, Samples: 2})
			require.NoError(t, err)
			for l := range p.Scores {
				t.Logf("layer %d induction %.3f echo %.3f", l, p.Induction[l], p.Echo[l])
			}
			above := func(s [][]float64) [][2]int {
				var out [][2]int
				for l := range s {
					for h, x := range s[l] {
						if x > p.Threshold {
							out = append(out, [2]int{l, h})
						}
					}
				}
				return out
			}
			induction := recorded(t, m, foundry.MetaRetrievalHeads)
			var echo [][2]int
			if tc.opts.Deep {
				echo = recorded(t, m, foundry.MetaEchoHeads)
			}
			require.Equal(t, induction, above(p.Induction))
			require.Equal(t, echo, above(p.Echo))
			for _, h := range induction {
				require.Greater(t, p.Induction[h[0]][h[1]], 0.9, "induction head %v", h)
			}
			for _, h := range echo {
				require.Greater(t, p.Echo[h[0]][h[1]], 0.9, "echo head %v", h)
			}
		})
	}
}

func TestProfileFiles(t *testing.T) {
	m := open(t, testmodels.Recall(t), runtime.Options{})
	other := open(t, testmodels.RecallWith(t, foundry.RecallOptions{Seed: 5}), runtime.Options{})
	dir := t.TempDir()
	p, err := heads.Synthetic(m, 0.5)
	require.NoError(t, err)
	good := filepath.Join(dir, "good.json")
	require.NoError(t, p.Save(good))

	t.Run("round trip", func(t *testing.T) {
		q, err := heads.Load(good, m)
		require.NoError(t, err)
		require.Equal(t, p, q)
		require.Equal(t, [][]bool{{false, true}, {false, true}}, q.KVClasses())
		require.True(t, q.Streaming(1, 1))
		require.False(t, q.Streaming(1, 0))
		require.Equal(t, 2, q.StreamingKVHeads())
	})
	bad := []struct {
		name, content, want string
	}{
		{"not json", "{", "malformed JSON"},
		{"wrong version", `{"version": 7}`, "format version 7"},
		{"short fingerprint", `{"version": 1, "fingerprint": "ab"}`, "fingerprint"},
		{"bad class", `{"version":1,"fingerprint":"` + p.Fingerprint + `","layers":1,"heads":4,"kv_heads":2,"scores":[[0,0,0,0]],"classes":[["retrieval","sleepy"]]}`, `class "sleepy"`},
		{"ragged scores", `{"version":1,"fingerprint":"` + p.Fingerprint + `","layers":1,"heads":4,"kv_heads":2,"scores":[[0,0]],"classes":[["retrieval","streaming"]]}`, "2 scores, want 4"},
		{"wrong shape", `{"version":1,"fingerprint":"` + p.Fingerprint + `","layers":1,"heads":4,"kv_heads":2,"scores":[[0,0,0,0]],"classes":[["retrieval","streaming"]]}`, "1 layers x 4 heads"},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, "bad.json")
			require.NoError(t, os.WriteFile(path, []byte(tc.content), 0o644))
			_, err := heads.Load(path, m)
			require.ErrorContains(t, err, path)
			require.ErrorContains(t, err, tc.want)
		})
	}
	t.Run("other model", func(t *testing.T) {
		_, err := heads.Load(good, other)
		require.ErrorContains(t, err, good)
		require.ErrorContains(t, err, "another model file")
		require.ErrorContains(t, err, other.Path())
	})
	t.Run("default path", func(t *testing.T) {
		require.Equal(t, "/m/recall.heads.json", heads.DefaultPath("/m/recall.gguf"))
		require.Equal(t, "/m/recall.bin.heads.json", heads.DefaultPath("/m/recall.bin"))
	})
	t.Run("missing", func(t *testing.T) {
		_, err := heads.Load(filepath.Join(dir, "nope.json"), m)
		require.ErrorContains(t, err, "nope.json")
	})
	t.Run("synthetic fractions", func(t *testing.T) {
		for _, f := range []float64{0, 0.5, 1} {
			q, err := heads.Synthetic(m, f)
			require.NoError(t, err)
			require.Equal(t, int(math.Round(f*2))*q.Layers, q.StreamingKVHeads())
		}
		_, err := heads.Synthetic(m, 1.5)
		require.Error(t, err)
	})
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
			p, err := heads.Detect(ctx, m, heads.Options{Lengths: []int{256}, Depths: []float64{0.5}})
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
			w := heads.Window{Sinks: 4, Recent: 32}
			no := heads.Options{Lengths: []int{1024}, Depths: []float64{0.25, 0.5, 0.75}}
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
					correct, total, err := heads.Ablation(ctx, m, tc.streaming, w, no)
					require.NoError(t, err)
					require.Equal(t, 3, total)
					require.Equal(t, tc.want, correct)
				})
			}
			_, _, err = heads.Ablation(ctx, m, none[:1], w, no)
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
			s, a, err := heads.NewSession(m)
			require.NoError(t, err)
			defer s.Close()
			a.Streaming = [][]bool{{true, true}, {true, true}}
			a.Window = heads.Window{Sinks: 0, Recent: 1 << 20}
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
			s2, a2, err := heads.NewSession(m)
			require.NoError(t, err)
			defer s2.Close()
			a2.Streaming, a2.Window = [][]bool{{true, true}, {true, true}}, heads.Window{Recent: 1}
			narrow, err := s2.Eval(ctx, prompt, true, nil)
			require.NoError(t, err)
			require.NotEqual(t, want, narrow)
			// a mask of the wrong shape is an error, not a panic
			s3, a3, err := heads.NewSession(m)
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
			p, err := heads.DataFree(context.Background(), m, heads.DataFreeOptions{Period: 64, Samples: 2})
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
			_, err = heads.Detect(context.Background(), m, heads.Options{})
			require.ErrorContains(t, err, "needs a recall model")
		})
	}
}
