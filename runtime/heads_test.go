package runtime_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/gguf"
	"github.com/kvrecall/kvrecall/haystack"
	"github.com/kvrecall/kvrecall/heads"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/runtime"
)

// DuoAttention-style head masks on the recall model, whose retrieval heads
// its metadata records: with every other KV head streaming (sinks + recent
// window only), dense, quest and retro still find every needle, with less
// resident KV. The paper's ablation: making the retrieval heads streaming
// instead loses the needles in the middle, while making as many other heads
// streaming does not.
func TestHeadMasksNeedle(t *testing.T) {
	path := testmodels.Recall(t)
	f, err := gguf.Open(path)
	require.NoError(t, err)
	voc, err := haystack.LoadVocab(f)
	require.NoError(t, err)
	recorded, ok, err := heads.Recorded(f)
	require.NoError(t, err)
	require.True(t, ok, "the recall model records its retrieval heads")
	ctx := context.Background()
	m, err := runtime.Open(ctx, path, runtime.Options{Threads: 2, ContextLength: 16384 + 64, DataDir: t.TempDir()})
	require.NoError(t, err)
	defer m.Close()
	cfg := m.Config()
	profile, err := heads.FromQueryHeads(cfg.Layers, cfg.Heads, cfg.KVHeads, recorded)
	require.NoError(t, err)
	streaming, retrieval := profile.Count(cfg.Layers, cfg.KVHeads)
	require.Equal(t, 1, retrieval, "one retrieval KV head (query heads 0 and 1 of the last layer)")
	// The ablations: the retrieval KV heads alone streaming, or as many
	// other heads (KV head 1 of the last layer) streaming.
	ablate := heads.Mask{make([]bool, cfg.KVHeads), make([]bool, cfg.KVHeads)}
	other := heads.Mask{make([]bool, cfg.KVHeads), make([]bool, cfg.KVHeads)}
	for l := range cfg.Layers {
		for h := range cfg.KVHeads {
			ablate[l][h] = !profile.Streaming(l, h)
		}
	}
	other[cfg.Layers-1][1] = true
	t.Logf("profile: %d streaming, %d retrieval KV heads", streaming, retrieval)

	const length, budget = 16384, 1024
	for _, depth := range []int{10, 50, 90} {
		c, err := voc.NewCase(length, []float64{float64(depth) / 100}, uint64(11*length+depth))
		require.NoError(t, err)
		doc, err := m.IngestTokens(ctx, fmt.Sprintf("heads-%d", depth), c.Tokens, nil)
		require.NoError(t, err)
		n := c.Needles[0]
		resident := map[string]int64{}
		for _, tc := range []struct {
			method string
			mask   heads.Mask
			exact  bool
		}{
			{"dense", nil, true}, {"dense+heads", profile, true},
			{"quest", nil, true}, {"quest+heads", profile, true},
			{"retro", nil, true}, {"retro+heads", profile, true},
			{"retro+heads", ablate, false}, {"retro+heads", other, true},
			{"quest+heads", nil, true}, // the model's default: the heads it records
		} {
			name := tc.method
			switch {
			case tc.mask == nil && tc.method == "quest+heads":
				name += "/model-default"
			case tc.mask == nil:
			case tc.mask[0] == nil || &tc.mask[0][0] == &ablate[0][0]:
				name += "/retrieval-heads-streaming"
			case &tc.mask[0][0] == &other[0][0]:
				name += "/other-head-streaming"
			}
			t.Run(fmt.Sprintf("%d%%/%s", depth, name), func(t *testing.T) {
				opts := runtime.PolicyOptions{Policy: tc.method, Budget: budget}
				if tc.mask != nil {
					opts.Extra = map[string]any{heads.OptionKey: tc.mask}
				}
				s, err := m.DocumentSession(doc, opts)
				require.NoError(t, err)
				defer s.Close()
				res, err := s.Generate(ctx, voc.Question(n), runtime.GenerateOptions{MaxTokens: voc.AnswerLength})
				require.NoError(t, err)
				pc := s.Cache().(*kvcache.Paged)
				require.NoError(t, pc.CheckInvariants())
				st := pc.Stats()
				resident[name] = st.ResidentBytes
				t.Logf("resident KV %d B %v", st.ResidentBytes, st.ResidentByClass)
				require.Equal(t, tc.exact, equal(res.Tokens, n.Values), "needle at %d: got %v want %v", n.Pos, res.Tokens, n.Values)
			})
		}
		require.Equal(t, resident["quest+heads"], resident["quest+heads/model-default"])
		for _, base := range []string{"dense", "quest", "retro"} {
			require.Less(t, resident[base+"+heads"], resident[base], "%s+heads holds less KV than %s", base, base)
		}
	}
}
