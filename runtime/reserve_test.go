package runtime_test

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/runtime"
)

// computeBuffer returns the size of the backend's compute buffer now.
// ollama reports it (BackendMemory's Graph) only when a graph is reserved,
// so reserve a graph of one small op: it fits any buffer, and ggml's
// scheduler keeps its buffer until a graph needs more, so the probe reads
// the size without changing it.
func computeBuffer(m *runtime.Model) uint64 {
	ctx := m.Backend().NewContext()
	defer ctx.Close()
	x := ctx.Input().FromFloats([]float32{1, 2, 3, 4}, 4)
	ctx.Forward(x.Scale(ctx, 2))
	ctx.Reserve()
	return graphBytes(m)
}

// graphBytes is the compute buffer size that the last reserve reported.
func graphBytes(m *runtime.Model) uint64 {
	mem := m.Backend().BackendMemory()
	n := mem.CPU.Graph
	for _, g := range mem.GPUs {
		n += g.Graph
	}
	return n
}

// An ingest reserves the compute buffer for its last batch before the
// first (reserve.go), so that the buffer is not freed and reallocated batch
// after batch. The test checks that the reserve happened and was large
// enough: the buffer the ingest reserved is the buffer it ends with (it did
// not grow during the ingest), and it covers what a paged session's
// prefill of the same tokens in the same batches grows its buffer to
// without a reserve (which it does batch by batch: checked, so that the
// probe is seen to detect growth). Without the reserve the first check
// fails: nothing was reserved, and the buffer grew.
//
// The reserve moves where ggml puts intermediate tensors and nothing else:
// the pages must be the same f16 bytes as the session's. Lengths cover a
// last batch that is full, a short one, and one batch.
func TestIngestReserveKeepsPages(t *testing.T) {
	path := testmodels.Random(t, "llama", "tiny", foundry.F32, 4, false)
	ctx := context.Background()
	const batch = 96
	for _, tc := range []struct {
		name string
		n    int
	}{{"full last batch", 384}, {"short last batch", 300}, {"one batch", 70}} {
		t.Run(tc.name, func(t *testing.T) {
			toks := make([]int32, tc.n)
			for i := range toks {
				toks[i] = int32(3 + (i*131)%500)
			}
			open := func() *runtime.Model {
				m, err := runtime.Open(ctx, path, runtime.Options{Threads: 2, ContextLength: 512, BatchSize: batch, PageSize: 32, DataDir: t.TempDir()})
				require.NoError(t, err)
				t.Cleanup(m.Close)
				return m
			}
			ing := open()
			require.Zero(t, graphBytes(ing), "nothing reserved before the ingest")
			doc, err := ing.IngestTokens(ctx, "reserved", toks, nil)
			require.NoError(t, err)
			reserved := graphBytes(ing) // what the ingest's reserve reported
			require.Positive(t, reserved, "the ingest reserved no compute buffer")
			require.Equal(t, reserved, computeBuffer(ing), "the compute buffer grew during the ingest: the reserve was too small")

			ses := open()
			s, err := ses.NewSessionWith(runtime.PagedCache(runtime.PolicyOptions{Policy: "dense"}))
			require.NoError(t, err)
			defer s.Close()
			first := min(batch, tc.n)
			_, err = s.Eval(ctx, toks[:first], false, nil)
			require.NoError(t, err)
			afterFirst := computeBuffer(ses)
			if tc.n > first {
				_, err = s.Eval(ctx, toks[first:], false, nil)
				require.NoError(t, err)
			}
			grown := computeBuffer(ses)
			if tc.n > 2*batch {
				require.Greater(t, grown, afterFirst, "without a reserve the buffer grows with the batches (or the probe sees nothing)")
			}
			require.GreaterOrEqual(t, reserved, grown, "the reserve is smaller than the real passes need")
			t.Logf("compute buffer: reserved %d B; session without reserve: %d B after its first batch, %d B at the end", reserved, afterFirst, grown)

			want := s.Cache().(*kvcache.Paged).Store()
			got := doc.Store()
			require.Equal(t, want.Len(), got.Len())
			require.Equal(t, want.Pages(), got.Pages())
			for l := range 4 {
				for p := range got.Pages() {
					require.Equal(t, want.Page(l, p).K, got.Page(l, p).K, "layer %d page %d keys", l, p)
					require.Equal(t, want.Page(l, p).V, got.Page(l, p).V, "layer %d page %d values", l, p)
				}
			}
		})
	}
}
