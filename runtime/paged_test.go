package runtime_test

import (
	"context"
	"fmt"
	"math"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/gguf"
	"github.com/kvrecall/kvrecall/haystack"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/runtime"
)

func maxDiff(a, b [][]float32) (diff, scale float64) {
	for i := range a {
		for j := range a[i] {
			diff = math.Max(diff, math.Abs(float64(a[i][j]-b[i][j])))
			scale = math.Max(scale, math.Abs(float64(b[i][j])))
		}
	}
	return diff, scale
}

// Selecting every page reproduces dense attention: the dense policy (pages
// in position order), quest with a budget covering everything (split
// graphs, host-side selection), and a document read back from host pages.
func TestPagedAllPagesMatchDense(t *testing.T) {
	path := testmodels.Random(t, "llama", "tiny", foundry.F32, 4, false)
	ctx := context.Background()
	m, err := runtime.Open(ctx, path, runtime.Options{Threads: 1, ContextLength: 1024, BatchSize: 96, PageSize: 32, DataDir: t.TempDir()})
	require.NoError(t, err)
	defer m.Close()
	toks := make([]int32, 300)
	for i := range toks {
		toks[i] = int32(3 + (i*131)%500)
	}
	dense, err := m.NewSession()
	require.NoError(t, err)
	defer dense.Close()
	want, err := dense.Eval(ctx, toks, true, nil)
	require.NoError(t, err)

	for _, c := range []struct {
		name  string
		opts  runtime.PolicyOptions
		exact bool
	}{
		{"dense policy", runtime.PolicyOptions{Policy: "dense"}, true},
		{"quest covering all pages", runtime.PolicyOptions{Policy: "quest", Budget: 1024, Sinks: 32, Window: 64}, false},
		{"retro covering all pages", runtime.PolicyOptions{Policy: "retro", Budget: 1024, Sinks: 32, Window: 64}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			s, err := m.NewSessionWith(runtime.PagedCache(c.opts))
			require.NoError(t, err)
			defer s.Close()
			got, err := s.Eval(ctx, toks, true, nil)
			require.NoError(t, err)
			require.NoError(t, s.Cache().(*kvcache.Paged).CheckInvariants())
			d, scale := maxDiff(got, want)
			t.Logf("max |diff| %.3g at logit scale %.3g", d, scale)
			if c.exact {
				require.Zero(t, d, "bit-exact with ollama's dense causal cache")
			}
			require.LessOrEqual(t, d, 1e-4*scale)
		})
	}

	// A document's pages come back from host memory (f16) into the device
	// pool; continuing it gives the dense continuation's logits.
	// The dense reference is split into the same batches (batch boundaries
	// change ggml's matmul kernels, hence the last bits).
	ref, err := m.NewSession()
	require.NoError(t, err)
	defer ref.Close()
	_, err = ref.Eval(ctx, toks[:200], false, nil)
	require.NoError(t, err)
	wantCont, err := ref.Eval(ctx, toks[200:], true, nil)
	require.NoError(t, err)
	doc, err := m.IngestTokens(ctx, "dense-check", toks[:200], nil)
	require.NoError(t, err)
	// Both upload paths: copies of runs of consecutive slots, and the page
	// scatter (whole pages by set_rows, the partial last page copied).
	defer func(n int, h bool) { kvcache.MaxUploadRuns, kvcache.HostUploads = n, h }(kvcache.MaxUploadRuns, kvcache.HostUploads)
	for _, upload := range []struct {
		name string
		runs int
		host bool
	}{{"host copies", 1 << 20, true}, {"copy runs", 1 << 20, false}, {"page scatter", 0, false}} {
		kvcache.MaxUploadRuns, kvcache.HostUploads = upload.runs, upload.host
		for _, policy := range []string{"dense", "quest"} {
			s, err := m.DocumentSession(doc, runtime.PolicyOptions{Policy: policy, Budget: 1024, Sinks: 32, Window: 64})
			require.NoError(t, err)
			got, err := s.Eval(ctx, toks[200:], true, nil)
			s.Close()
			require.NoError(t, err)
			d, _ := maxDiff(got, wantCont)
			t.Logf("document continuation (%s, %s): max |diff| %.3g", policy, upload.name, d)
			require.Zero(t, d, "pages read back from host memory are the same f16 bytes")
		}
	}
}

// Under a budget smaller than the document, quest's selection moves every
// step and its pages go up into scattered slots: many copy runs per layer,
// or the page scatter, or (the CPU backend's default) plain copies into the
// host pool. All three upload paths must give the same logits.
func TestScatteredUploadPathsAgree(t *testing.T) {
	path := testmodels.Random(t, "llama", "tiny", foundry.F32, 4, false)
	ctx := context.Background()
	m, err := runtime.Open(ctx, path, runtime.Options{Threads: 1, ContextLength: 1024, PageSize: 16, DataDir: t.TempDir()})
	require.NoError(t, err)
	defer m.Close()
	toks := make([]int32, 640)
	for i := range toks {
		toks[i] = int32(3 + (i*977)%500)
	}
	doc, err := m.IngestTokens(ctx, "scatter", toks[:600], nil)
	require.NoError(t, err)
	defer func(n int, h bool) { kvcache.MaxUploadRuns, kvcache.HostUploads = n, h }(kvcache.MaxUploadRuns, kvcache.HostUploads)
	decode := func(runs int, host bool) (logits [][]float32, uploads int64) {
		kvcache.MaxUploadRuns, kvcache.HostUploads = runs, host
		s, err := m.DocumentSession(doc, runtime.PolicyOptions{Policy: "quest", Budget: 160, Sinks: 16, Window: 32})
		require.NoError(t, err)
		defer s.Close()
		for _, tok := range toks[600:] {
			out, err := s.Eval(ctx, []int32{tok}, true, nil)
			require.NoError(t, err)
			logits = append(logits, out...)
		}
		return logits, s.Cache().(*kvcache.Paged).Stats().Uploads
	}
	runs, nRuns := decode(1<<20, false)
	scatter, nScatter := decode(0, false)
	host, nHost := decode(1<<20, true)
	t.Logf("pages uploaded over 40 steps: %d (copy runs), %d (scatter), %d (host copies)", nRuns, nScatter, nHost)
	require.Equal(t, nRuns, nScatter)
	require.Equal(t, nRuns, nHost)
	// More than twice the pages the four layers' budgets hold (10 each).
	require.Greater(t, nRuns, int64(2*4*160/16), "the selection must move, or this tests nothing")
	d, _ := maxDiff(runs, scatter)
	require.Zero(t, d)
	d, _ = maxDiff(runs, host)
	require.Zero(t, d)
}

// Needle in a haystack over a 64-token-page cache with a budget of 1024 or
// 2048 tokens: quest and retro answer every case exactly; window (sinks and
// recent tokens only) loses needles in the middle.
func TestNeedlePaged(t *testing.T) {
	path := testmodels.Recall(t)
	f, err := gguf.Open(path)
	require.NoError(t, err)
	voc, err := haystack.LoadVocab(f)
	require.NoError(t, err)
	ctx := context.Background()
	m, err := runtime.Open(ctx, path, runtime.Options{Threads: 2, ContextLength: 32768 + 64, DataDir: t.TempDir()})
	require.NoError(t, err)
	defer m.Close()
	for _, length := range []int{16384, 32768} {
		for _, depth := range []int{0, 25, 50, 75, 100} {
			c, err := voc.NewCase(length, []float64{float64(depth) / 100}, uint64(7*length+depth))
			require.NoError(t, err)
			doc, err := m.IngestTokens(ctx, fmt.Sprintf("niah-%d-%d", length, depth), c.Tokens, nil)
			require.NoError(t, err)
			n := c.Needles[0]
			q := voc.Question(n)
			for _, budget := range []int{1024, 2048} {
				for _, policy := range []string{"retro", "quest", "window"} {
					t.Run(fmt.Sprintf("%d/%d%%/%s/%d", length, depth, policy, budget), func(t *testing.T) {
						s, err := m.DocumentSession(doc, runtime.PolicyOptions{Policy: policy, Budget: budget})
						require.NoError(t, err)
						defer s.Close()
						res, err := s.Generate(ctx, q, runtime.GenerateOptions{MaxTokens: voc.AnswerLength})
						require.NoError(t, err)
						require.Equal(t, len(c.Tokens), res.CachedTokens, "the document is not prefilled again")
						// Device-resident KV is bounded by the budget (plus one batch of
						// pages and slack), whatever the document's length.
						pc := s.Cache().(*kvcache.Paged)
						require.NoError(t, pc.CheckInvariants())
						st := pc.Stats()
						perToken := int64(m.Config().KVBytesPerToken(2))
						if policy != "dense" {
							require.LessOrEqual(t, st.ResidentBytes, int64(budget+512+4*64)*perToken)
						}
						exact := equal(res.Tokens, n.Values)
						switch {
						case policy != "window":
							require.True(t, exact, "%s lost the needle at position %d: got %v want %v", policy, n.Pos, res.Tokens, n.Values)
						case depth > 0 && depth < 100:
							require.False(t, exact, "window cannot see a needle at position %d", n.Pos)
						}
					})
				}
			}
		}
	}
}

func equal(a, b []int32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
