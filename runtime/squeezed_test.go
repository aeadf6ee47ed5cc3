package runtime_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/gguf"
	"github.com/kvrecall/kvrecall/haystack"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/paging"
	"github.com/kvrecall/kvrecall/runtime"
	"github.com/kvrecall/kvrecall/squeezed"
)

// Squeezed Attention on the recall model at 16k: the document's keys are
// clustered at ingest, and every needle is answered exactly while each
// KV head of the clustered layers attends to at most 1/8 of the keys
// (sinks, window and its clusters' tokens). A new model instance reopens
// the clusters from disk, identical, without clustering again.
//
// Residency is token-granular (docs/kvcache.md, token selections): each
// clustered KV head's pool is the default, the budget's tokens (plus the
// batch and slack, as every pool), and holds the chosen tokens, not their
// pages; the resident KV is checked against that size.
func TestSqueezedNeedle(t *testing.T) {
	for _, v := range []struct {
		name   string
		o      foundry.RecallOptions
		depths []int
	}{
		{"recall", foundry.RecallOptions{}, []int{10, 50, 90}},
		// Four layers: the previous-token head in layer 1, retrieval in 3
		// (one depth: its prefill takes twice as long).
		{"recall-4layers", foundry.RecallOptions{Layers: 4, PrevLayer: 1, RetrievalLayer: 3}, []int{10}},
	} {
		t.Run(v.name, func(t *testing.T) { squeezedNeedle(t, testmodels.RecallWith(t, v.o), v.depths) })
	}
}

func squeezedNeedle(t *testing.T, path string, depths []int) {
	f, err := gguf.Open(path)
	require.NoError(t, err)
	voc, err := haystack.LoadVocab(f)
	require.NoError(t, err)
	ctx := context.Background()
	dir := t.TempDir()
	const length = 16384
	open := func(so *squeezed.Options) *runtime.Model {
		m, err := runtime.Open(ctx, path, runtime.Options{Threads: 2, ContextLength: length + 64, DataDir: dir, Squeezed: so})
		require.NoError(t, err)
		return m
	}
	m := open(&squeezed.Options{Seed: 1})
	defer m.Close()
	cfg := m.Config()
	for _, depth := range depths {
		c, err := voc.NewCase(length, []float64{float64(depth) / 100}, uint64(13*length+depth))
		require.NoError(t, err)
		id := fmt.Sprintf("squeezed-%d", depth)
		doc, err := m.IngestTokens(ctx, id, c.Tokens, nil)
		require.NoError(t, err)
		require.NotNil(t, doc.Clusters())
		t.Logf("prefill %.1fs, clustering %.1fs, threshold %.3g", doc.PrefillSeconds, doc.ClusterSeconds, doc.Clusters().Threshold)
		n := c.Needles[0]
		for _, mode := range []struct {
			name, policy string
			use          squeezed.Use
			inplace      bool // kvcache.InPlaceRuns (the default: on)
			split        bool // kvcache.SelectInGraph off: decode steps split the pass at each clustered layer
			hostScores   bool // paging.StepScoresKey false: selections in the graph score the queries on the host
		}{
			// The document's ordered copies are made by the first session
			// (C memory, whatever InPlaceRuns says) and read by the later
			// ones: in place by the decode steps, or, with InPlaceRuns
			// off, through the staging copy.
			// Decode steps select inside the graph (kvcache.SelectInGraph,
			// the default), or split the pass at each clustered layer.
			// Selected in the graph, they rank from centroid scores the
			// graph computed (paging.StepScored), or, with host scores,
			// score the queries in the selection's callback.
			{"budget, in place", "squeezed", squeezed.Use{Index: doc.Clusters()}, true, false, false},
			{"budget, in place, host scores", "squeezed", squeezed.Use{Index: doc.Clusters()}, true, false, true},
			{"budget, in place, split", "squeezed", squeezed.Use{Index: doc.Clusters()}, true, true, false},
			{"budget, staged", "squeezed", squeezed.Use{Index: doc.Clusters()}, false, false, false},
			{"threshold", "squeezed", squeezed.Use{Index: doc.Clusters(), Threshold: true}, true, false, false},
			// The model's recorded retrieval heads attend to clusters, the
			// other KV heads keep only sinks and window.
			{"budget+heads", "squeezed+heads", squeezed.Use{Index: doc.Clusters()}, true, false, false},
		} {
			t.Run(fmt.Sprintf("%d%%/%s", depth, mode.name), func(t *testing.T) {
				defer func(ip, ig bool) { kvcache.InPlaceRuns, kvcache.SelectInGraph = ip, ig }(kvcache.InPlaceRuns, kvcache.SelectInGraph)
				kvcache.InPlaceRuns, kvcache.SelectInGraph = mode.inplace, !mode.split
				mem0 := m.DocumentMemory().Bytes
				s, err := m.DocumentSession(doc, runtime.PolicyOptions{Policy: mode.policy, Budget: length / 8,
					Extra: map[string]any{squeezed.OptionKey: mode.use, paging.StepScoresKey: !mode.hostScores}})
				require.NoError(t, err)
				closed := false
				defer func() {
					if !closed {
						s.Close()
					}
				}()
				pc := s.Cache().(*kvcache.Paged)
				ordered0 := pc.Stats().OrderedBytes
				// Bytes uploaded by the decode steps: from the first token
				// (sampled after the question's pass) to the last.
				var first, last kvcache.Stats
				tokens := 0
				res, err := s.Generate(ctx, voc.Question(n), runtime.GenerateOptions{MaxTokens: voc.AnswerLength,
					OnToken: func(runtime.Token) error {
						if tokens++; tokens == 1 {
							first = pc.Stats()
						}
						last = pc.Stats()
						return nil
					}})
				require.NoError(t, err)
				require.NoError(t, pc.CheckInvariants())
				require.Zero(t, last.Uploads-first.Uploads, "no page uploads in decode: the clustered heads' pools hold tokens")
				// Every KV head's pool holds (budget/P + the question's
				// pages, at most 2 + 3 slack) pages' worth of token cells,
				// f16 K and V of one head: the budget bounds resident KV.
				if mode.policy == "squeezed" {
					P := m.Options().PageSize
					bound := int64(cfg.Layers*cfg.KVHeads) * int64(length/8/P+2+3) * int64(P*cfg.HeadDim*2*2)
					require.LessOrEqual(t, last.ResidentBytes, bound, "pools of the budget's size")
				}
				for l := 0; l < cfg.Layers; l++ {
					for g, a := range pc.AttendedTokens(l) {
						require.LessOrEqual(t, a, length/8, "layer %d group %d attends to %d of %d keys", l, g, a, length)
					}
				}
				gs, _ := pc.SelectedByGroup(cfg.Layers - 1)
				t.Logf("attended per group (last layer): %v %v, resident %v; tokens uploaded: %d by the question's pass, %.0f bytes per decode step (%d steps)",
					pc.AttendedTokens(cfg.Layers-1), gs, pc.Stats().ResidentByClass, first.TokenUploads,
					float64(last.UploadedBytes-first.UploadedBytes)/float64(max(1, tokens-1)), tokens-1)
				require.Equal(t, n.Values, res.Tokens, "needle at %d", n.Pos)
				if mode.inplace {
					require.Positive(t, last.InPlaceRows-first.InPlaceRows, "the decode steps read runs in place")
				} else {
					require.Zero(t, last.InPlaceRows-first.InPlaceRows, "InPlaceRuns off: every run staged")
				}
				switch {
				case mode.inplace && !mode.split && mode.policy == "squeezed":
					// Every clustered layer of every decode step after the first.
					require.Positive(t, last.GraphSelections-first.GraphSelections, "decode steps select inside the graph")
					if mode.hostScores {
						require.Zero(t, last.StepScored-first.StepScored, "scored on the host")
					} else {
						require.Equal(t, last.GraphSelections-first.GraphSelections, last.StepScored-first.StepScored, "scored in the graph")
					}
				case mode.split || !mode.inplace:
					require.Zero(t, last.GraphSelections-first.GraphSelections, "the pass splits: selected between graphs")
				}
				// (+heads: a layer whose heads are all retrieval heads is all
				// staged groups and selects in the graph; one with streaming
				// heads mixes page pools in and splits.)
				// The cluster-ordered copies the session built are the
				// document's (the next session reuses them): counted in
				// its memory once the session closes.
				if last.OrderedBytes > ordered0 {
					t.Logf("ordered copies built: %d bytes", last.OrderedBytes-ordered0)
				}
				s.Close()
				closed = true
				require.Equal(t, mem0+last.OrderedBytes-ordered0, m.DocumentMemory().Bytes, "document memory counts the ordered copies")
			})
		}
	}

	// Reopened by another model instance: the clusters come from disk.
	m2 := open(nil)
	defer m2.Close()
	id := fmt.Sprintf("squeezed-%d", depths[0])
	doc, err := m2.OpenDocument(id)
	require.NoError(t, err)
	first, err := m.OpenDocument(id)
	require.NoError(t, err)
	require.Equal(t, first.Clusters(), doc.Clusters())
	// Without clusters the method is refused with a clear message.
	c, err := voc.NewCase(1024, []float64{0.5}, 3)
	require.NoError(t, err)
	plain, err := m2.IngestTokens(ctx, "plain", c.Tokens, nil)
	require.NoError(t, err)
	_, err = m2.DocumentSession(plain, runtime.PolicyOptions{Policy: "squeezed"})
	require.ErrorContains(t, err, "document plain has no Squeezed-Attention clusters: ingest it again with runtime Options.Squeezed set")
	// Ingesting it again where clustering is on upgrades it (a new prefill:
	// the calibration needs its queries).
	up, err := m.IngestTokens(ctx, "plain", c.Tokens, nil)
	require.NoError(t, err)
	require.NotNil(t, up.Clusters())
	require.True(t, up.HasClusters)
}
