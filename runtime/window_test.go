package runtime_test

import (
	"context"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/hyper"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/llamaref"
	"github.com/kvrecall/kvrecall/paging"
	"github.com/kvrecall/kvrecall/runtime"
	"github.com/kvrecall/kvrecall/squeezed"
)

// A gemma model's windowed layers are streaming layers in the paged cache:
// one "windowed" group that keeps the pages of its 64-token window (no
// sinks, no budget, no scored selection), each query masked to its own
// window. With a budget covering the context, paged prefill and decode
// (teacher-forced, one token per step) give the dense cache's logits; the
// windowed pools stay the same size however long the sequence grows.
//
// Not bit-exact: a windowed layer's keys sit in other cells than in
// ollama's SWA ring, so softmax sums them in another order, and ggml
// rounds the probabilities to f16 for the product with the f16 values; a
// last-bit change of the sum flips some of them to the neighbouring f16
// value. Seen: 0.8e-4 to 1.9e-4 of the logit scale; a window off by one
// token moves logits by ~5e-2 of it (the parity test's mutation).
//
// retro's recent window is set to cover the context: retro keeps, for
// the decode steps, the pages its question retrieved, and a page that
// leaves the recent window after the question is not among them, so with
// a 64-token window it drops page 14 at the fourth step whatever the
// budget (its documented behaviour, not the windowed layers').
func TestPagedSlidingWindowLayers(t *testing.T) {
	const P, batch = 16, 96
	const tol = 3e-4
	cases := []struct {
		name, arch, preset string
		seed               uint64
		policy             runtime.PolicyOptions
	}{
		{"gemma3 retro", "gemma3", "gemma3-tiny", 9, runtime.PolicyOptions{Policy: "retro", Budget: 1024, Sinks: 32, Window: 512}},
		{"gemma3 quest", "gemma3", "gemma3-tiny", 9, runtime.PolicyOptions{Policy: "quest", Budget: 1024, Sinks: 32, Window: 64}},
		{"gemma3 dense", "gemma3", "gemma3-tiny", 9, runtime.PolicyOptions{Policy: "dense"}},
		{"gemma2 retro (soft-capped)", "gemma2", "gemma2-tiny", 8, runtime.PolicyOptions{Policy: "retro", Budget: 1024, Sinks: 32, Window: 512}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ctx := context.Background()
			path := testmodels.Random(t, c.arch, c.preset, foundry.F32, c.seed, false)
			m, err := runtime.Open(ctx, path, runtime.Options{Threads: 1, ContextLength: 1024, BatchSize: batch, PageSize: P, DataDir: t.TempDir()})
			require.NoError(t, err)
			defer m.Close()
			cfg := m.Config()
			W := cfg.SlidingWindow
			require.Equal(t, 64, W)
			windowed := cfg.WindowedLayers()
			require.NotEmpty(t, windowed)
			require.Less(t, len(windowed), cfg.Layers, "the preset needs a global layer too")

			toks := make([]int32, 300)
			for i := range toks {
				toks[i] = int32(3 + (i*131)%500)
			}
			const steps = 24
			dense, err := m.NewSession()
			require.NoError(t, err)
			defer dense.Close()
			paged, err := m.NewSessionWith(runtime.PagedCache(c.policy))
			require.NoError(t, err)
			defer paged.Close()
			pc := paged.Cache().(*kvcache.Paged)
			for l := 0; l < cfg.Layers; l++ {
				want := 0
				if cfg.Windowed(l) {
					want = W
				}
				require.Equal(t, want, pc.SlidingWindow(l), "layer %d", l)
			}

			want, err := dense.Eval(ctx, toks, true, nil)
			require.NoError(t, err)
			got, err := paged.Eval(ctx, toks, true, nil)
			require.NoError(t, err)
			require.NoError(t, pc.CheckInvariants())
			d, scale := maxDiff(got, want)
			t.Logf("prefill of %d: max |diff| %.3g at logit scale %.3g", len(toks), d, scale)
			require.LessOrEqual(t, d, tol*scale)

			var slots0 []int
			for step := 0; step < steps; step++ {
				tok := []int32{int32(3 + (step*37)%500)}
				w, err := dense.Eval(ctx, tok, true, nil)
				require.NoError(t, err)
				g, err := paged.Eval(ctx, tok, true, nil)
				require.NoError(t, err)
				require.NoError(t, pc.CheckInvariants())
				d, scale := maxDiff(g, w)
				require.LessOrEqual(t, d, tol*scale, "decode step %d", step)

				pos := paged.Len() - 1 // the step's query
				var slots []int
				for _, l := range windowed {
					gs, sel := pc.SelectedByGroup(l)
					require.Len(t, gs, 1)
					require.Equal(t, "windowed", gs[0].Class)
					// Exactly the pages touching the query's window.
					var pages []int
					for p := (pos - W + 1) / P; p <= pos/P; p++ {
						pages = append(pages, p)
					}
					require.Equal(t, pages, sel[0], "layer %d step %d", l, step)
					slots = append(slots, pc.ResidentSlots(l))
				}
				// A windowed pool holds the window's pages, the largest
				// batch's (96 tokens span up to 7 pages) and the pool's
				// slack of 3, whatever the length.
				for _, s := range slots {
					require.LessOrEqual(t, s, (W+P-1)/P+batch/P+1+3)
				}
				if slots0 == nil {
					slots0 = slots
				}
				require.Equal(t, slots0, slots, "windowed pools must not grow with the sequence")
			}
			st := pc.Stats()
			require.Positive(t, st.ResidentByClass["windowed"])
			t.Logf("resident KV by class: %v", st.ResidentByClass)
			for l := 0; l < cfg.Layers; l++ {
				if !cfg.Windowed(l) {
					require.Greater(t, pc.ResidentSlots(l), pc.ResidentSlots(windowed[0]), "global layer %d", l)
				}
			}
		})
	}
}

// The inner method never sees a windowed layer: no queries are asked for
// it and its one group takes no budget.
func TestSlidingWindowSelector(t *testing.T) {
	inner, err := paging.New("retro", paging.Config{PageSize: 16, Budget: 512, Sinks: 32, Window: 64, Layers: 6, KVHeads: 2})
	require.NoError(t, err)
	sel, err := paging.SlidingWindow(inner, func(l int) bool { return l%6 < 5 }, 64)
	require.NoError(t, err)
	cases := []struct {
		layer     int
		windowed  bool
		needsQ    bool
		groupSize int
	}{
		{0, true, false, 1}, {4, true, false, 1}, {5, false, true, 1},
	}
	for _, c := range cases {
		t.Run(string(rune('0'+c.layer)), func(t *testing.T) {
			gs := sel.Groups(c.layer)
			require.Len(t, gs, c.groupSize)
			require.Equal(t, c.windowed, gs[0].Window == 64)
			require.Equal(t, c.needsQ, sel.NeedQueries(c.layer, 10)) // retro asks for a question's (multi-token) queries
			if c.windowed {
				sel.(paging.PassStarter).StartPass(200, 10)
				// Queries 200..209 see back to 137: pages 8..13.
				require.Equal(t, paging.One([]int{8, 9, 10, 11, 12, 13}), sel.Select(c.layer, nil, nil, 210))
			}
		})
	}
	_, err = paging.SlidingWindow(inner, func(int) bool { return true }, 1)
	require.ErrorContains(t, err, "sliding window 1")
}

// Methods and ingests that assume every layer attends causally to all it
// selects are refused on gemma models with an error naming them, instead
// of computing something else (HyperAttention has no score cap, so
// gemma2 is refused; probe's cut-off and squeezed's clusters are per
// layer).
func TestSlidingWindowRefusals(t *testing.T) {
	ctx := context.Background()
	for _, c := range []struct{ arch, preset string }{{"gemma2", "gemma2-tiny"}, {"gemma3", "gemma3-tiny"}} {
		t.Run(c.arch, func(t *testing.T) {
			path := testmodels.Random(t, c.arch, c.preset, foundry.F32, 9, false)
			m, err := runtime.Open(ctx, path, runtime.Options{Threads: 1, ContextLength: 1024, PageSize: 16, DataDir: t.TempDir()})
			require.NoError(t, err)
			defer m.Close()
			toks := make([]int32, 200)
			for i := range toks {
				toks[i] = int32(3 + i%50)
			}
			_, err = m.IngestTokensWith(ctx, "h", toks, runtime.IngestOptions{Hyper: &runtime.HyperOptions{Config: hyper.Default()}}, nil)
			if c.arch == "gemma2" {
				require.ErrorContains(t, err, "HyperAttention does not support gemma2's soft-capped attention scores")
			} else {
				// gemma3's windowed layers attend their window exactly
				// (TestHyperIngestGemma3Windows).
				require.NoError(t, err)
			}
			_, err = m.IngestTokensWith(ctx, "s", toks, runtime.IngestOptions{Streaming: true}, nil)
			require.ErrorContains(t, err, "method probe does not support "+c.arch)
			for _, meth := range []string{"probe", "squeezed", "probe+heads"} {
				_, err = m.NewSelector(runtime.PolicyOptions{Policy: meth})
				require.ErrorContains(t, err, "does not support "+c.arch, meth)
			}
			_, err = m.NewSelector(runtime.PolicyOptions{Policy: "retro"})
			require.NoError(t, err)
			// A dense ingest works; asking it under probe is refused before
			// probe's representatives are computed (that prefill would read
			// windowed layers' keys beyond the window, which are not kept).
			d, err := m.IngestTokens(ctx, "d", toks, nil)
			require.NoError(t, err)
			_, err = m.DocumentSession(d, runtime.PolicyOptions{Policy: "probe"})
			require.ErrorContains(t, err, "method probe does not support "+c.arch)

			sq, err := runtime.Open(ctx, path, runtime.Options{Threads: 1, ContextLength: 1024, PageSize: 16, DataDir: t.TempDir(), Squeezed: &squeezed.Options{}})
			require.NoError(t, err)
			defer sq.Close()
			_, err = sq.IngestTokens(ctx, "c", toks, nil)
			require.ErrorContains(t, err, "Squeezed-Attention clusters do not support "+c.arch)
		})
	}
}

// A gemma3 model's windowed layers keep only their window in host memory
// and in a document's page file (kvcache.Store): as the sequence grows,
// their held pages stay at the window plus one batch while the global
// layers keep every page. A document ingested past many windows, saved
// and read back by another process, answers with exactly the tokens and
// logits of the in-memory document, and its 32-token greedy answer is
// llama.cpp's on the same tokens (which keeps every cell of its SWA cache
// the same way it did before pages were dropped).
func TestWindowedHostPages(t *testing.T) {
	const P, batch, docLen = 16, 64, 600
	cases := []struct {
		name   string
		policy runtime.PolicyOptions
	}{
		{"dense", runtime.PolicyOptions{Policy: "dense"}},
		{"retro covering the document", runtime.PolicyOptions{Policy: "retro", Budget: 1024, Sinks: 32, Window: 512}},
	}
	ctx := context.Background()
	path := testmodels.Random(t, "gemma3", "gemma3-tiny", foundry.F32, 9, false)
	opts := runtime.Options{Threads: 1, ContextLength: 1024, BatchSize: batch, PageSize: P}
	doc := make([]int32, docLen)
	for i := range doc {
		doc[i] = int32(3 + (i*131+7)%500)
	}
	question := []int32{17, 250, 33, 402, 9, 77, 311, 5}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			o := opts
			o.DataDir = t.TempDir()
			m, err := runtime.Open(ctx, path, o)
			require.NoError(t, err)
			cfg := m.Config()
			W := cfg.SlidingWindow
			require.Equal(t, 64, W)
			windowed := cfg.WindowedLayers()

			// A live session, one batch at a time.
			s, err := m.NewSessionWith(runtime.PagedCache(c.policy))
			require.NoError(t, err)
			pc := s.Cache().(*kvcache.Paged)
			bound := (W+batch)/P + 2
			for start := 0; start < docLen; start += batch {
				_, err := s.Eval(ctx, doc[start:min(docLen, start+batch)], false, nil)
				require.NoError(t, err)
				require.NoError(t, pc.CheckInvariants())
				st := pc.Store()
				for l := 0; l < cfg.Layers; l++ {
					if cfg.Windowed(l) {
						require.Equal(t, W, st.Window(l))
						require.Equal(t, st.Pages()-max(0, start-W)/P, st.HeldPages(l), "layer %d after %d tokens", l, st.Len())
						require.LessOrEqual(t, st.HeldPages(l), bound)
					} else {
						require.Equal(t, st.Pages(), st.HeldPages(l), "global layer %d", l)
					}
				}
			}
			st := pc.Store()
			full := int64(st.Pages()) * int64(cfg.Layers) * int64(m.Layout().PageBytes())
			t.Logf("%d tokens: host pages %d KiB, %d KiB if the %d windowed layers kept every page", docLen, st.Bytes()>>10, full>>10, len(windowed))
			require.Less(t, st.Bytes(), full)
			s.Close()

			d, err := m.IngestTokens(ctx, "doc", doc, nil)
			require.NoError(t, err)
			for _, l := range windowed {
				require.Equal(t, d.Store().Pages()-(docLen-1-W)/P, d.Store().HeldPages(l))
			}
			require.Equal(t, d.Store().Bytes(), d.HostBytes)
			answer := func(m *runtime.Model, d *runtime.Document) ([][]float32, []int32) {
				s, err := m.DocumentSession(d, c.policy)
				require.NoError(t, err)
				defer s.Close()
				logits, err := s.Eval(ctx, question, true, nil)
				require.NoError(t, err)
				require.NoError(t, s.Truncate(docLen))
				res, err := s.Generate(ctx, question, runtime.GenerateOptions{MaxTokens: 32})
				require.NoError(t, err)
				require.NoError(t, s.Cache().(*kvcache.Paged).CheckInvariants())
				return logits, res.Tokens
			}
			wantLogits, wantTokens := answer(m, d)
			m.Close()

			// Another process reads the page file (version 2: the windowed
			// layers' first pages are not in it).
			m2, err := runtime.Open(ctx, path, o)
			require.NoError(t, err)
			defer m2.Close()
			d2, err := m2.OpenDocument("doc")
			require.NoError(t, err)
			require.Equal(t, d.HostBytes, d2.Store().Bytes())
			for _, l := range windowed {
				require.Nil(t, d2.Store().Page(l, 0))
				require.Equal(t, d.Store().HeldPages(l), d2.Store().HeldPages(l))
			}
			gotLogits, gotTokens := answer(m2, d2)
			require.Equal(t, wantTokens, gotTokens)
			for i := range wantLogits {
				require.Equal(t, wantLogits[i], gotLogits[i], "question token %d: bit-exact after a reload", i)
			}

			ref, err := llamaref.Load(path, llamaref.Options{Threads: 1, KVType: "f32", Context: 1024})
			require.NoError(t, err)
			defer ref.Close()
			refGen, err := ref.Greedy(append(slices.Clone(doc), question...), 32)
			require.NoError(t, err)
			require.Equal(t, refGen, gotTokens, "llama.cpp's greedy answer")
		})
	}
}
