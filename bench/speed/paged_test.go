package speed

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestPagedTableAndPlots(t *testing.T) {
	rows := []PagedRow{
		{Model: "tiny (f16)", Context: 16384, Budget: 2048, BaseMs: 1,
			DecodeMs: map[string]float64{"llama.cpp": 10, "dense": 11, "retro": 2},
			Resident: map[string]int64{"llama.cpp": 64 << 20, "dense": 64 << 20, "retro": 4 << 20}, PrefillSec: 20, UpkeepSec: 0.2},
		{Model: "tiny (f16)", Context: 32768, Budget: 2048, BaseMs: 1,
			DecodeMs: map[string]float64{"llama.cpp": 20, "dense": 21, "retro": 2},
			Resident: map[string]int64{"llama.cpp": 128 << 20, "dense": 128 << 20, "retro": 4 << 20}, PrefillSec: 80, UpkeepSec: 0.4},
	}
	require.InDelta(t, 20.0, rows[1].AttentionMs("dense")/rows[1].AttentionMs("retro"), 1e-9)
	require.InDelta(t, 0.01, rows[0].UpkeepShare(), 1e-9)
	md := PagedTable(rows, []string{"retro"})
	require.Contains(t, md, "| tiny (f16) | 32768 | 2048 | retro | 2.00 | 10.50 | 10.00 | 1.00 | 20.0x | 4.0 MiB |")
	require.Contains(t, md, "| tiny (f16) | 16384 | 20.0 | — | — | — | — | — | — | — | — | 1.00% |")
	// With HyperAttention and llama.cpp in the run: ratios and peaks.
	rows[1].LlamaPrefillS, rows[1].HyperPrefillSec = 40, 16
	rows[1].PeakRSS = map[string]int64{"dense": 100 << 20, "hyper": 300 << 20, "llama.cpp": 200 << 20}
	require.Contains(t, PrefillTable(rows), "| tiny (f16) | 32768 | 80.0 | 16.0 | 40.0 | 2.00 | 2.50 | 5.00 | 100.0 MiB | 300.0 MiB | 200.0 MiB | 0.50% |")
	// llama.cpp skipped: no llama.cpp row, no ratio against it.
	skipped := rows[0]
	skipped.DecodeMs = map[string]float64{"dense": 11, "retro": 2}
	md = PagedTable([]PagedRow{skipped}, []string{"retro"})
	require.NotContains(t, md, "| llama.cpp |")
	require.Contains(t, md, "| tiny (f16) | 16384 | 2048 | retro | 2.00 | 5.50 | — |")
	dir := t.TempDir()
	require.NoError(t, PagedPlots(rows, []string{"retro"}, dir))
	for _, n := range []string{"decode-tiny.png", "decode-tiny.svg", "resident-tiny.png", "resident-tiny.svg"} {
		st, err := os.Stat(filepath.Join(dir, n))
		require.NoError(t, err, n)
		require.Positive(t, st.Size())
	}
	require.True(t, strings.HasPrefix(DenseTable(nil), "| model |"))
	require.NotContains(t, md, "streaming ingest", "no streaming ingest was measured")
	require.NotContains(t, md, "per-layer budgets", "no method reported any")
	require.NotContains(t, md, "attended KV per step", "rows without traffic numbers (older results) print no traffic table")
	// A model given by path names its plots after the file.
	path := []PagedRow{rows[0]}
	path[0].Model = "/models/dir/recall.gguf"
	require.NoError(t, PagedPlots(path, []string{"retro"}, dir))
	_, err := os.Stat(filepath.Join(dir, "decode-recall.png"))
	require.NoError(t, err)

	// Squeezed: attended vs resident vs uploaded per step, and the
	// clustering share of the prefill.
	rows[0].Attended = map[string]int64{"dense": 64 << 20, "squeezed": 4 << 20}
	rows[0].Resident["squeezed"] = 8 << 20
	rows[0].UploadedPerStep = map[string]float64{"dense": 0, "squeezed": 1 << 20}
	rows[0].Summaries = map[string]int64{"squeezed": 3 << 20}
	rows[0].ClusterSec = 1
	require.InDelta(t, 0.05, rows[0].ClusterShare(), 1e-9)
	md = PagedTable(rows[:1], []string{"squeezed"})
	require.Contains(t, md, "| tiny (f16) | 16384 | squeezed | 4.0 MiB | 8.0 MiB | 0.50 | 1.0 MiB | 3.0 MiB |")
	require.Contains(t, md, "| tiny (f16) | 16384 | dense | 64.0 MiB | 64.0 MiB | 1.00 | 0.0 MiB | 0.0 MiB |")
	require.Contains(t, md, "| tiny (f16) | 16384 | 20.0 | 1.00 | 5.0% |")
}

// The streaming-ingest and per-layer budget tables appear for the rows and
// methods that have them.
func TestPagedTableStreamingAndLayerBudgets(t *testing.T) {
	rows := []PagedRow{
		{Model: "recall", Context: 32768, Budget: 2048, BaseMs: 1,
			DecodeMs: map[string]float64{"llama.cpp": 4, "dense": 4, "probe": 2, "retro": 2},
			Resident: map[string]int64{}, PrefillSec: 20, UpkeepSec: 0.2, LlamaPrefillS: 10,
			IngestSec: 24, StreamingIngestSec: 12, LayerBudgets: map[string][]int{"probe": {1984, 2112}}},
		{Model: "recall", Context: 65536, Budget: 2048, BaseMs: 1,
			DecodeMs: map[string]float64{"llama.cpp": 4, "dense": 4, "probe": 2, "retro": 2},
			Resident: map[string]int64{}, PrefillSec: 80, UpkeepSec: 0.4, LlamaPrefillS: 40, IngestSec: 90},
	}
	md := PagedTable(rows, []string{"retro", "probe"})
	require.Contains(t, md, "| recall | 32768 | 2048 | 24.0 | 12.0 | 10.0 | 2.00x | 0.83x |")
	require.NotContains(t, md, "| recall | 65536 | 2048 | 90.0 |", "a row without a streaming ingest has no line there")
	require.Contains(t, md, "| recall | 32768 | probe | 2048 | 1984, 2112 | 2048 |")
	require.NotContains(t, LayerBudgetTable(rows, []string{"retro"}), "retro")

	// A model given by path (bench speed --model) names its plots by base name.
	for i := range rows {
		rows[i].Model = "/tmp/models/recall-l4.gguf"
	}
	dir := t.TempDir()
	require.NoError(t, PagedPlots(rows, []string{"retro", "probe"}, dir))
	_, err := os.Stat(filepath.Join(dir, "decode-recall-l4.png"))
	require.NoError(t, err)
}

// A model with sliding-window layers: llama.cpp with window-sized SWA
// caches gets a row of its own (its ratio column is still against plain
// llama.cpp), and device KV splits by layer type beside the host pages.
func TestPagedTableWindowedLayers(t *testing.T) {
	row := PagedRow{Model: "gemma3-tiny (f16)", Context: 32768, Budget: 2048, BaseMs: 1,
		DecodeMs: map[string]float64{"llama.cpp": 40, llamaSWA: 8, "dense": 8, "retro": 2},
		Resident: map[string]int64{"llama.cpp": 48 << 20, llamaSWA: 9 << 20, "dense": 9 << 20, "retro": 1 << 20},
		ResidentByClass: map[string]map[string]int64{
			"dense": {"all": 8 << 20, "windowed": 1 << 20}, "retro": {"all": 512 << 10, "windowed": 512 << 10}},
		HostKV:     map[string]int64{"dense": 8 << 20, "retro": 8 << 20, "document": 8 << 20},
		HostKVFull: 48 << 20, PrefillSec: 37, LlamaPrefillS: 87, LlamaSWAPrefillS: 35}
	md := PagedTable([]PagedRow{row}, []string{"retro"})
	require.Contains(t, md, "| gemma3-tiny (f16) | 32768 | 2048 | llama.cpp swa | 8.00 | 1.00 | 5.00 | — | — | 9.0 MiB |")
	require.Contains(t, md, "| gemma3-tiny (f16) | 32768 | retro | 0.5 MiB | 0.5 MiB | 8.0 MiB | 8.0 MiB | 48.0 MiB |")
	require.Contains(t, md, "| gemma3-tiny (f16) | 32768 | dense | 1.0 MiB | 8.0 MiB | 8.0 MiB | 8.0 MiB | 48.0 MiB |")
	require.Contains(t, md, "window-sized SWA caches: prefill 35.0 s")
	row.HostKVFull = 0 // no windowed layers
	require.NotContains(t, PagedTable([]PagedRow{row}, []string{"retro"}), "device KV, windowed layers")
}

// The floor table gives each method's decode time over the floor (dense
// decode at a context of the budget's tokens) measured in the same run,
// through both caches; rows without a floor print nothing.
func TestFloorTable(t *testing.T) {
	rows := []PagedRow{
		{Model: "tiny (f16)", Context: 32768, Budget: 2048, BaseMs: 1,
			DecodeMs: map[string]float64{"llama.cpp": 20, "dense": 21, "retro": 2.5, "window": 2.2},
			Resident: map[string]int64{}, PrefillSec: 80, Floor: 2048, FloorMs: 2, FloorPagedMs: 2.2},
		{Model: "tiny (f16)", Context: 65536, Budget: 2048, BaseMs: 1,
			DecodeMs: map[string]float64{"dense": 40, "retro": 3}, Resident: map[string]int64{}, PrefillSec: 160},
	}
	md := PagedTable(rows, []string{"retro", "window"})
	require.Contains(t, md, "| tiny (f16) | 32768 | 2048 | 2048 | retro | 2.50 | 1.25 | 1.14 |")
	require.Contains(t, md, "| tiny (f16) | 32768 | 2048 | 2048 | window | 2.20 | 1.10 | 1.00 |")
	require.Contains(t, md, "| tiny (f16) | 32768 | 2048 | 2048 | floor (dense engine) | 2.00 | 1.00 | 0.91 |")
	require.Contains(t, md, "| tiny (f16) | 32768 | 2048 | 2048 | floor (paged dense) | 2.20 | 1.10 | 1.00 |")
	require.NotContains(t, md, "| tiny (f16) | 65536 | 2048 | 2048 |", "the 64k row measured no floor")
	require.Empty(t, FloorTable(rows[1:], []string{"retro"}))
}

func TestStepOrder(t *testing.T) {
	for _, n := range []int{0, 1, 3, 7} {
		t.Run(fmt.Sprintf("%d sessions", n), func(t *testing.T) {
			after := make([]int, n) // steps where session j runs right after session 0
			const steps = 64
			for i := range steps {
				order := stepOrder(i, n)
				if !slices.Equal(order, stepOrder(i, n)) {
					t.Fatalf("step %d: two calls gave %v and %v", i, order, stepOrder(i, n))
				}
				if got := slices.Sorted(slices.Values(order)); !slices.Equal(got, seq(n)) {
					t.Fatalf("step %d: %v is not a permutation of 0..%d", i, order, n-1)
				}
				for k := 1; k < n; k++ {
					if order[k-1] == 0 {
						after[order[k]]++
					}
				}
			}
			// The fixed order (0, 1, ..., n-1) put session 1 right after
			// session 0 (bench speed's dense) at every step.
			for j := 1; j < n; j++ {
				if after[j] > steps/2 {
					t.Errorf("session %d ran right after session 0 in %d of %d steps", j, after[j], steps)
				}
			}
		})
	}
}

func seq(n int) []int {
	s := make([]int, n)
	for i := range s {
		s[i] = i
	}
	return s
}
