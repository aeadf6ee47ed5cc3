package runtime

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/hyper"
)

// The exact layers' default query chunk is n/64 (at least 512) and grows
// until its graph fits the backend's size; an explicit chunk is kept.
func TestExactChunkFitsTheGraph(t *testing.T) {
	cases := []struct {
		name      string
		explicit  int
		n, nodes  int
		want      int // 0: only check the fit
		wantCount int // chunks, 0: unchecked
	}{
		{"short document: a batch of 512", 0, 2000, 944, 512, 4},
		{"64 chunks fit", 0, 32768, 2000, 512, 64},
		{"64k in 1024 nodes less a layer", 0, 65600, 944, 0, 0},
		{"128k in 1024 nodes less a layer", 0, 131072, 944, 0, 0},
		{"explicit", 300, 65600, 944, 300, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			o := HyperOptions{Config: hyper.Default(), ExactChunk: tc.explicit}
			chunk := o.exactChunk(tc.n, tc.nodes)
			if tc.want > 0 {
				require.Equal(t, tc.want, chunk)
			}
			if tc.wantCount > 0 {
				require.Equal(t, tc.wantCount, (tc.n+chunk-1)/chunk)
			}
			if tc.explicit == 0 {
				require.LessOrEqual(t, hyper.GraphSize(o.Config, tc.n, chunk), tc.nodes)
				if def := max(512, (tc.n+63)/64); chunk > def {
					require.Greater(t, hyper.GraphSize(o.Config, tc.n, chunk-64), tc.nodes, "the least chunk that fits, in steps of 64")
				}
			}
		})
	}
}
