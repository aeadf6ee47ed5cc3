package runtime_test

import (
	"cmp"
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/gguf"
	"github.com/kvrecall/kvrecall/haystack"
	"github.com/kvrecall/kvrecall/hyper"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/probe"
	"github.com/kvrecall/kvrecall/runtime"
)

// Needle in a haystack at 16k with budgets 1024 and 2048: probe answers
// exactly wherever retro does, reports its per-layer budgets, and keeps
// each layer's device pool within its budget.
func TestNeedleProbe(t *testing.T) {
	for _, v := range []struct {
		name   string
		o      foundry.RecallOptions
		depths []int
	}{
		// The default model (salient retrieval: both retrieval heads, and
		// head 1 also attends to a needle while it is read).
		{"default", foundry.RecallOptions{}, []int{10, 50, 90}},
		{"2 layers", foundry.RecallOptions{Salience: true}, []int{10, 50, 90}},
		// Retrieval in layer 2 of 4: its keys depend on layer 1's attention.
		{"4 layers", foundry.RecallOptions{Layers: 4, PrevLayer: 1, RetrievalLayer: 2, Salience: true}, []int{30, 70}},
	} {
		t.Run(v.name, func(t *testing.T) { needleProbe(t, v.o, v.depths) })
	}
}

func needleProbe(t *testing.T, o foundry.RecallOptions, depths []int) {
	path := testmodels.RecallWith(t, o)
	f, err := gguf.Open(path)
	require.NoError(t, err)
	voc, err := haystack.LoadVocab(f)
	require.NoError(t, err)
	ctx := context.Background()
	m, err := runtime.Open(ctx, path, runtime.Options{Threads: 2, ContextLength: 16384 + 64, DataDir: t.TempDir()})
	require.NoError(t, err)
	defer m.Close()
	const length = 16384
	for _, depth := range depths {
		c, err := voc.NewCase(length, []float64{float64(depth) / 100}, uint64(7*length+depth))
		require.NoError(t, err)
		doc, err := m.IngestTokens(ctx, fmt.Sprintf("probe-%d", depth), c.Tokens, nil)
		require.NoError(t, err)
		n := c.Needles[0]
		q := voc.Question(n)
		for _, budget := range []int{1024, 2048} {
			exact := map[string]bool{}
			for _, policy := range []string{"retro", "probe"} {
				t.Run(fmt.Sprintf("%d%%/%s/%d", depth, policy, budget), func(t *testing.T) {
					t0 := time.Now()
					s, err := m.DocumentSession(doc, runtime.PolicyOptions{Policy: policy, Budget: budget})
					require.NoError(t, err)
					defer s.Close()
					res, err := s.Generate(ctx, q, runtime.GenerateOptions{MaxTokens: voc.AnswerLength})
					require.NoError(t, err)
					exact[policy] = equal(res.Tokens, n.Values)
					t.Logf("needle block %d; %s: got %v want %v, layer budgets %v (%v)", (n.Pos+1)/64, policy, res.Tokens, n.Values, res.LayerBudgets, time.Since(t0))
					if policy != "probe" {
						return
					}
					require.Len(t, res.LayerBudgets, m.Config().Layers)
					pc := s.Cache().(*kvcache.Paged)
					for l, b := range res.LayerBudgets {
						require.Positive(t, b, "layer %d", l)
						// The pool holds the layer's budget, the batch's page and slack.
						require.LessOrEqual(t, pc.ResidentSlots(l)*64, b+4*64, "layer %d pool for budget %d", l, b)
					}
				})
			}
			if exact["retro"] {
				require.True(t, exact["probe"], "depth %d%%, budget %d: retro is exact, probe is not", depth, budget)
			}
		}
	}
}

// The long-question variant: the question is many ordinary words followed
// by "q1 q2 q3 K", and the haystack holds many needles whose keys are
// distractors. The activation-weighted probe finds the asked needle; the
// plain mean of the question's queries (probe with Uniform weights) is
// measured next to it, and retro too.
func TestNeedleProbeLongQuestion(t *testing.T) {
	path := testmodels.RecallWith(t, foundry.RecallOptions{Salience: true})
	f, err := gguf.Open(path)
	require.NoError(t, err)
	voc, err := haystack.LoadVocab(f)
	require.NoError(t, err)
	ctx := context.Background()
	m, err := runtime.Open(ctx, path, runtime.Options{Threads: 2, ContextLength: 16384 + 512, DataDir: t.TempDir()})
	require.NoError(t, err)
	defer m.Close()
	const length, needles, words = 16384, 48, 200
	depths := make([]float64, needles)
	for i := range depths {
		depths[i] = 0.05 + 0.9*float64(i)/float64(needles-1)
	}
	c, err := voc.NewCase(length, depths, 99)
	require.NoError(t, err)
	doc, err := m.IngestTokens(ctx, "long-question", c.Tokens, nil)
	require.NoError(t, err)
	rng := rand.New(rand.NewPCG(5, 6))
	type row struct {
		name string
		o    runtime.PolicyOptions
	}
	rows := []row{
		{"probe", runtime.PolicyOptions{Policy: "probe"}},
		{"probe-uniform", runtime.PolicyOptions{Policy: "probe", Extra: map[string]any{probe.OptionKey: probe.Settings{Uniform: true}}}},
		{"retro", runtime.PolicyOptions{Policy: "retro"}},
	}
	for _, budget := range []int{1024, 2048} {
		hits := map[string]int{}
		asked := 0
		for i, n := range c.Needles {
			if i%6 != 0 {
				continue // every sixth needle: 8 questions per budget
			}
			asked++
			q := make([]int32, 0, words+4)
			for range words {
				q = append(q, voc.Filler[rng.IntN(len(voc.Filler))])
			}
			q = append(q, voc.Question(n)...)
			for _, r := range rows {
				o := r.o
				o.Budget = budget
				s, err := m.DocumentSession(doc, o)
				require.NoError(t, err)
				res, err := s.Generate(ctx, q, runtime.GenerateOptions{MaxTokens: voc.AnswerLength})
				s.Close()
				require.NoError(t, err)
				if equal(res.Tokens, n.Values) {
					hits[r.name]++
				}
			}
		}
		t.Logf("budget %d, %d needles, %d-word questions: exact answers of %d: probe %d, mean query %d, retro %d",
			budget, needles, words, asked, hits["probe"], hits["probe-uniform"], hits["retro"])
		require.Equal(t, asked, hits["probe"], "budget %d: the activation-weighted probe must find every needle", budget)
		require.Less(t, hits["probe-uniform"], asked, "budget %d: the plain mean of the question's queries should lose needles", budget)
	}
}

// A document's representatives are computed on the first probe question
// (the document was ingested without them), stored next to its pages,
// read back by another process without a prefill, and a corrupt file is
// refused with an error naming it.
func TestProbeRepsUpgradeAndReload(t *testing.T) {
	path := testmodels.RecallWith(t, foundry.RecallOptions{Salience: true})
	f, err := gguf.Open(path)
	require.NoError(t, err)
	voc, err := haystack.LoadVocab(f)
	require.NoError(t, err)
	ctx := context.Background()
	dir := t.TempDir()
	open := func() *runtime.Model {
		m, err := runtime.Open(ctx, path, runtime.Options{Threads: 2, ContextLength: 4096, DataDir: dir})
		require.NoError(t, err)
		return m
	}
	c, err := voc.NewCase(3000, []float64{0.3}, 3)
	require.NoError(t, err)
	n := c.Needles[0]
	m := open()
	doc, err := m.IngestTokens(ctx, "reps", c.Tokens, nil)
	require.NoError(t, err)
	file := filepath.Join(dir, "reps", "probe-b64-r4-w256.kvr")
	_, err = os.Stat(file)
	require.ErrorIs(t, err, os.ErrNotExist, "ingest does not compute representatives")
	session := func(m *runtime.Model, doc *runtime.Document) ([]int32, error) {
		s, err := m.DocumentSession(doc, runtime.PolicyOptions{Policy: "probe", Budget: 1024})
		if err != nil {
			return nil, err
		}
		defer s.Close()
		res, err := s.Generate(ctx, voc.Question(n), runtime.GenerateOptions{MaxTokens: voc.AnswerLength})
		if err != nil {
			return nil, err
		}
		return res.Tokens, nil
	}
	got, err := session(m, doc)
	require.NoError(t, err)
	require.Equal(t, n.Values, got)
	st, err := os.Stat(file)
	require.NoError(t, err, "the first probe question stores the representatives")
	m.Close()

	m2 := open()
	doc2, err := m2.OpenDocument("reps")
	require.NoError(t, err)
	got, err = session(m2, doc2)
	require.NoError(t, err)
	require.Equal(t, n.Values, got)
	st2, err := os.Stat(file)
	require.NoError(t, err)
	require.Equal(t, st.ModTime(), st2.ModTime(), "read back, not recomputed")
	m2.Close()

	b, err := os.ReadFile(file)
	require.NoError(t, err)
	b[len(b)-100] ^= 0x40
	require.NoError(t, os.WriteFile(file, b, 0o644))
	m3 := open()
	defer m3.Close()
	doc3, err := m3.OpenDocument("reps")
	require.NoError(t, err)
	_, err = session(m3, doc3)
	require.ErrorIs(t, err, probe.ErrCorrupt)
	require.Contains(t, err.Error(), file)
}

// Streaming prefill (ingest under probe) on the 4-layer salience variant,
// where layer 2's keys depend on layer 1's attention: documents ingested
// this way answer the needles that densely ingested ones do, and carry
// their representatives.
func TestStreamingPrefillNeedle(t *testing.T) {
	path := testmodels.RecallWith(t, foundry.RecallOptions{Layers: 4, PrevLayer: 1, RetrievalLayer: 2, Salience: true})
	f, err := gguf.Open(path)
	require.NoError(t, err)
	voc, err := haystack.LoadVocab(f)
	require.NoError(t, err)
	ctx := context.Background()
	dir := t.TempDir()
	m, err := runtime.Open(ctx, path, runtime.Options{Threads: 2, ContextLength: 16384 + 64, DataDir: dir})
	require.NoError(t, err)
	defer m.Close()
	const length = 16384
	for _, depth := range []int{30, 70} {
		c, err := voc.NewCase(length, []float64{float64(depth) / 100}, uint64(11*length+depth))
		require.NoError(t, err)
		n := c.Needles[0]
		t0 := time.Now()
		dense, err := m.IngestTokens(ctx, fmt.Sprintf("dense-%d", depth), c.Tokens, nil)
		require.NoError(t, err)
		tDense := time.Since(t0)
		t0 = time.Now()
		streamed, err := m.IngestTokensWith(ctx, fmt.Sprintf("stream-%d", depth), c.Tokens, runtime.IngestOptions{Streaming: true, Budget: 2048}, nil)
		require.NoError(t, err)
		tStream := time.Since(t0)
		require.Equal(t, 2048, streamed.StreamingBudget)
		_, err = os.Stat(filepath.Join(dir, streamed.ID, "probe-b64-r4-w256.kvr"))
		require.NoError(t, err, "the streaming prefill stores its representatives")
		t.Logf("depth %d%%: dense ingest %v, streaming ingest %v", depth, tDense, tStream)
		for _, doc := range []*runtime.Document{dense, streamed} {
			for _, policy := range []string{"dense", "probe"} {
				s, err := m.DocumentSession(doc, runtime.PolicyOptions{Policy: policy, Budget: 2048})
				require.NoError(t, err)
				res, err := s.Generate(ctx, voc.Question(n), runtime.GenerateOptions{MaxTokens: voc.AnswerLength})
				s.Close()
				require.NoError(t, err)
				t.Logf("%s asked under %s: got %v want %v", doc.ID, policy, res.Tokens, n.Values)
				require.Equal(t, n.Values, res.Tokens, "%s under %s", doc.ID, policy)
			}
		}
	}
}

// Representatives built during the ingest (IngestOptions.ProbeReps) are
// the ones the dense path computes at the first probe question (a second,
// dense prefill: computeProbeReps), and leave that prefill undone.
//
// Layer 0's queries and keys come before any attention, so its
// representatives and entropy history must be equal bit for bit in every
// case. The later layers:
//
//   - A dense ingest is the same prefill: bit for bit.
//   - A HyperAttention ingest of a document of at most min_seq_len tokens
//     (4096 in the paper's settings) computes exact attention, but from the
//     batch's f32 keys and values, where the dense prefill reads the f16
//     copies in the paged pools (and ggml rounds its queries to f16). The
//     later layers' keys and queries then differ at f16 rounding (2^-11 of
//     a value). A representative is the mean of a block's repr_topk keys
//     by local-attention score; where scores are near ties, that rounding
//     swaps a key and the representative moves by a whole key. So: a share
//     minAgree of each layer's representatives within relTol (1e-2) of
//     the layer's largest element, the others swapped. The random tiny
//     model has few near ties (at most 1 of 94 per layer); the recall
//     model's previous-token layer gives every key about the same score
//     (each key is the previous token of exactly one query), so 12-15 of
//     94 swap there. The entropy histories, which set probe's per-layer
//     budgets, must agree within entTol.
//   - A HyperAttention ingest that approximates (min_seq_len 512 below the
//     document) stores other keys than a dense prefill from layer 1 on:
//     its representatives are its own keys' (the dense path's second
//     prefill would score a dense prefill's keys, not the document's). Only
//     layer 0 and the entropy histories are compared.
func TestProbeRepsAtIngest(t *testing.T) {
	ctx := context.Background()
	recall := testmodels.RecallWith(t, foundry.RecallOptions{Layers: 4, PrevLayer: 1, RetrievalLayer: 2, Salience: true})
	tiny := testmodels.Random(t, "llama", "tiny", foundry.F32, 1, false)
	exact := hyper.Default() // min_seq_len 4096 > the document: exact
	approx := hyper.Config{Projections: 7, BlockSize: 256, Samples: 256, MinSeqLen: 512, Seed: 1}
	cases := []struct {
		name     string
		model    string
		o        runtime.IngestOptions
		relTol   float64 // of the layer's largest element, layers >= 1
		minAgree float64 // share of representatives within relTol, layers >= 1
		entTol   float64 // entropy histories, layers >= 1
	}{
		{"recall, dense ingest", recall, runtime.IngestOptions{}, 0, 1, 0},
		{"recall, hyper all layers, exact", recall, runtime.IngestOptions{Hyper: &runtime.HyperOptions{Config: exact}}, 1e-2, 0.8, 1e-3},
		{"recall, hyper layers 2-3, exact", recall, runtime.IngestOptions{Hyper: &runtime.HyperOptions{Config: exact, Layers: []int{2, 3}}}, 1e-2, 0.8, 1e-3},
		{"tiny, dense ingest, block 128 top 8 window 128", tiny, runtime.IngestOptions{Probe: probe.Settings{BlockSize: 128, RepTopK: 8}, Window: 128}, 0, 1, 0},
		{"tiny, hyper all layers, exact", tiny, runtime.IngestOptions{Hyper: &runtime.HyperOptions{Config: exact}}, 1e-2, 0.97, 1e-3},
		{"tiny, hyper all layers, exact, block 128 top 8 window 128", tiny, runtime.IngestOptions{Hyper: &runtime.HyperOptions{Config: exact}, Probe: probe.Settings{BlockSize: 128, RepTopK: 8}, Window: 128}, 1e-2, 0.97, 1e-3},
		{"tiny, hyper all layers, approximate (min_seq_len 512)", tiny, runtime.IngestOptions{Hyper: &runtime.HyperOptions{Config: approx}}, math.Inf(1), 1, 5e-3},
	}
	const length = 3000
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			m, err := runtime.Open(ctx, tc.model, runtime.Options{Threads: 2, ContextLength: length + 64, DataDir: dir})
			require.NoError(t, err)
			defer m.Close()
			toks := make([]int32, length)
			rng := rand.New(rand.NewPCG(5, 9))
			for i := range toks {
				toks[i] = int32(1 + rng.IntN(m.Config().Vocab-1))
			}
			s := tc.o.Probe
			s.BlockSize, s.RepTopK = cmp.Or(s.BlockSize, 64), cmp.Or(s.RepTopK, probe.DefaultRepTopK)
			window := cmp.Or(tc.o.Window, 256)

			// The dense path: a plain ingest, representatives at the first ask.
			ref, err := m.IngestTokens(ctx, "dense", toks, nil)
			require.NoError(t, err)
			before := runtime.ProbeRepsPrefills()
			want, err := runtime.ProbeReps(ctx, m, ref, s, window)
			require.NoError(t, err)
			require.Equal(t, before+1, runtime.ProbeRepsPrefills(), "a plain ingest leaves the representatives to a second prefill")

			o := tc.o
			o.ProbeReps = true
			doc, err := m.IngestTokensWith(ctx, "at-ingest", toks, o, nil)
			require.NoError(t, err)
			require.Positive(t, doc.ProbeRepsSeconds)
			file := filepath.Join(dir, "at-ingest", fmt.Sprintf("probe-b%d-r%d-w%d.kvr", s.BlockSize, s.RepTopK, window))
			_, err = os.Stat(file)
			require.NoError(t, err, "the ingest stores its representatives")
			before = runtime.ProbeRepsPrefills()
			got, err := runtime.ProbeReps(ctx, m, doc, s, window)
			require.NoError(t, err)
			require.Equal(t, []int{want.Layers, want.Blocks, want.KVHeads, want.HeadDim, want.BlockSize, want.RepTopK, want.Window},
				[]int{got.Layers, got.Blocks, got.KVHeads, got.HeadDim, got.BlockSize, got.RepTopK, got.Window})
			// Another process reads them from the file, and ingesting the
			// same tokens again reuses the stored document.
			m2, err := runtime.Open(ctx, tc.model, runtime.Options{Threads: 2, ContextLength: length + 64, DataDir: dir})
			require.NoError(t, err)
			defer m2.Close()
			again, err := m2.IngestTokensWith(ctx, "at-ingest", toks, o, nil)
			require.NoError(t, err)
			require.True(t, doc.Created.Equal(again.Created), "the stored document, not a new prefill")
			read, err := runtime.ProbeReps(ctx, m2, again, s, window)
			require.NoError(t, err)
			require.Equal(t, got.R, read.R)
			require.Equal(t, before, runtime.ProbeRepsPrefills(), "no second prefill")

			per := want.Blocks * want.KVHeads * want.HeadDim
			for l := 0; l < want.Layers; l++ {
				relTol, minAgree, entTol := tc.relTol, tc.minAgree, tc.entTol
				if l == 0 {
					relTol, minAgree, entTol = 0, 1, 0
				}
				w, g := want.R[l*per:(l+1)*per], got.R[l*per:(l+1)*per]
				var scale, worst float64
				for i := range w {
					scale = max(scale, math.Abs(float64(w[i])))
				}
				agree := 0 // block representatives within relTol
				for b := 0; b < want.Blocks*want.KVHeads; b++ {
					var d float64
					for i := b * want.HeadDim; i < (b+1)*want.HeadDim; i++ {
						d = max(d, math.Abs(float64(w[i]-g[i]))/scale)
					}
					worst = max(worst, d)
					if d <= relTol {
						agree++
					}
				}
				var ent float64
				require.Len(t, got.Entropy[l], len(want.Entropy[l]))
				require.NotEmpty(t, want.Entropy[l])
				for i, e := range want.Entropy[l] {
					ent = max(ent, math.Abs(e-got.Entropy[l][i]))
				}
				n := want.Blocks * want.KVHeads
				t.Logf("layer %d: largest deviation %.2e of the largest element %.3g; %d of %d representatives within %g; entropy history (%d) deviation %.2e",
					l, worst, scale, agree, n, relTol, len(want.Entropy[l]), ent)
				require.GreaterOrEqual(t, float64(agree), minAgree*float64(n), "layer %d: representatives within %g", l, relTol)
				require.LessOrEqual(t, ent, entTol, "layer %d: entropy history", l)
			}
		})
	}
}

// An ingest asked for probe representatives it cannot build says which
// setting is wrong, before any prefill.
func TestProbeRepsAtIngestRefusals(t *testing.T) {
	ctx := context.Background()
	cases := []struct {
		name  string
		model string
		o     runtime.IngestOptions
		want  string
	}{
		{"block size not a multiple of the page", testmodels.Random(t, "llama", "tiny", foundry.F32, 1, false),
			runtime.IngestOptions{ProbeReps: true, Probe: probe.Settings{BlockSize: 100}}, "block_size 100"},
		{"repr_topk above the block", testmodels.Random(t, "llama", "tiny", foundry.F32, 1, false),
			runtime.IngestOptions{ProbeReps: true, Probe: probe.Settings{RepTopK: 65}}, "repr_topk 65"},
		{"sliding-window layers", testmodels.Random(t, "gemma3", "gemma3-tiny", foundry.F16, 10, false),
			runtime.IngestOptions{ProbeReps: true}, "sliding-window"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m, err := runtime.Open(ctx, tc.model, runtime.Options{Threads: 2, ContextLength: 1024, DataDir: t.TempDir()})
			require.NoError(t, err)
			defer m.Close()
			_, err = m.IngestTokensWith(ctx, "x", make([]int32, 300), tc.o, nil)
			require.ErrorContains(t, err, tc.want)
			require.ErrorContains(t, err, "probe representatives")
		})
	}
}
