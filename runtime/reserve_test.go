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

// An ingest reserves the compute buffer for its last batch before the
// first (reserve.go). That moves where ggml puts intermediate tensors and
// nothing else: the pages must be the same f16 bytes as a paged session's
// prefill of the same tokens in the same batches, which reserves nothing
// and lets the buffer grow batch by batch. Lengths cover a last batch that
// is full, a short one, and one batch.
func TestIngestReserveKeepsPages(t *testing.T) {
	path := testmodels.Random(t, "llama", "tiny", foundry.F32, 4, false)
	ctx := context.Background()
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
				m, err := runtime.Open(ctx, path, runtime.Options{Threads: 2, ContextLength: 512, BatchSize: 96, PageSize: 32, DataDir: t.TempDir()})
				require.NoError(t, err)
				t.Cleanup(m.Close)
				return m
			}
			doc, err := open().IngestTokens(ctx, "reserved", toks, nil)
			require.NoError(t, err)

			s, err := open().NewSessionWith(runtime.PagedCache(runtime.PolicyOptions{Policy: "dense"}))
			require.NoError(t, err)
			defer s.Close()
			_, err = s.Eval(ctx, toks, false, nil)
			require.NoError(t, err)
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
