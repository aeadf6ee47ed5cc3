package speed

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/hyper"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/runtime"
)

// With a data folder, a second run reads each ingest's stored document
// back instead of prefilling it (the prefill times it reports are the
// first run's), and decodes as the first did. The HyperAttention ingest
// that decode reads carries probe's representatives when a probe method
// is measured.
func TestRunPagedDataDirReuse(t *testing.T) {
	path := testmodels.Random(t, "llama", "tiny", foundry.F32, 1, false)
	cases := []struct {
		name   string
		hyper  *runtime.HyperOptions
		skip   bool
		reused []string
		reps   bool // probe's representatives built at the ingest
	}{
		{"dense ingest", nil, false, []string{"dense"}, false},
		{"hyper ingest, dense skipped, probe", &runtime.HyperOptions{Config: hyper.Default()}, true, []string{"hyper"}, true},
		{"dense and hyper on layer 1", &runtime.HyperOptions{Config: hyper.Default(), Layers: []int{1}}, false, []string{"dense", "hyper"}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			c := PagedConfig{Model: path, Label: "tiny", Contexts: []int{1024}, Threads: 2, Budget: 512, Methods: []string{"retro", "probe"},
				DecodeTokens: 2, Hyper: tc.hyper, SkipDense: tc.skip, SkipLlama: true, DataDir: dir}
			first, err := RunPaged(context.Background(), c)
			require.NoError(t, err)
			require.Empty(t, first[0].Reused, "the first run prefills")
			if tc.reps {
				require.Positive(t, first[0].ProbeRepsSec)
			} else {
				require.Zero(t, first[0].ProbeRepsSec)
			}
			second, err := RunPaged(context.Background(), c)
			require.NoError(t, err)
			require.Equal(t, tc.reused, second[0].Reused)
			require.Equal(t, first[0].PrefillSec, second[0].PrefillSec, "the stored document's prefill time")
			require.Equal(t, first[0].HyperPrefillSec, second[0].HyperPrefillSec)
			for _, meth := range []string{"dense", "retro", "probe"} {
				require.Positive(t, second[0].DecodeMs[meth], meth)
				require.Contains(t, second[0].OpenSec, meth)
			}
		})
	}
}
