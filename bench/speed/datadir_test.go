package speed

import (
	"context"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/hyper"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/runtime"
)

// With a data folder, a second run reads each ingest's stored document
// back instead of prefilling it (the prefill times it reports are the
// first run's), and decodes as the first did. The ingest that decode
// reads carries probe's representatives, since a probe method is
// measured.
func TestRunPagedDataDirReuse(t *testing.T) {
	path := testmodels.Random(t, "llama", "tiny", foundry.F32, 1, false)
	cases := []struct {
		name   string
		hyper  *runtime.HyperOptions
		skip   bool
		reused []string
		probe  bool // a probe method: the decoded document gets its representatives at ingest
		more   []string
	}{
		{"dense ingest", nil, false, []string{"dense"}, true, nil},
		{"hyper ingest, dense skipped", &runtime.HyperOptions{Config: hyper.Default()}, true, []string{"hyper"}, true, nil},
		{"hyper ingest, dense skipped, no probe method", &runtime.HyperOptions{Config: hyper.Default()}, true, []string{"hyper"}, false, nil},
		{"dense and hyper on layer 1", &runtime.HyperOptions{Config: hyper.Default(), Layers: []int{1}}, false, []string{"dense", "hyper"}, true, nil},
		// squeezed's query recorder wraps probe's ingester.
		{"dense ingest, squeezed too", nil, false, []string{"dense"}, true, []string{"squeezed"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			methods := append([]string{"retro"}, tc.more...)
			if tc.probe {
				methods = append(methods, "probe")
			}
			c := PagedConfig{Model: path, Label: "tiny", Contexts: []int{1024}, Threads: 2, Budget: 512, Methods: methods,
				DecodeTokens: 2, Hyper: tc.hyper, SkipDense: tc.skip, SkipLlama: true, DataDir: dir}
			first, err := RunPaged(context.Background(), c)
			require.NoError(t, err)
			require.Empty(t, first[0].Reused, "the first run prefills")
			// The document decode reads has probe's representatives from
			// its ingest when probe is measured, and only then.
			if tc.probe {
				require.Positive(t, first[0].ProbeRepsSec)
			} else {
				require.Zero(t, first[0].ProbeRepsSec)
			}
			second, err := RunPaged(context.Background(), c)
			require.NoError(t, err)
			require.Equal(t, tc.reused, second[0].Reused)
			require.Equal(t, first[0].PrefillSec, second[0].PrefillSec, "the stored document's prefill time")
			require.Equal(t, first[0].HyperPrefillSec, second[0].HyperPrefillSec)
			// The representatives came back with the document (a copy
			// without them is ingested again, and then not reused).
			require.Equal(t, first[0].ProbeRepsSec, second[0].ProbeRepsSec)
			if slices.Contains(second[0].Reused, "dense") {
				require.Zero(t, second[0].IngestSec, "a reused document's ingest is not timed")
			}
			for _, meth := range append([]string{"dense"}, methods...) {
				require.Positive(t, second[0].DecodeMs[meth], meth)
				require.Contains(t, second[0].OpenSec, meth)
			}
		})
	}
}
