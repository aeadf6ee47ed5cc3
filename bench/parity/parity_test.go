package parity_test

import (
	"context"
	"os"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/bench/parity"
	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/internal/testmodels"
)

func TestMain(m *testing.M) {
	testmodels.Quiet()
	testmodels.NoBackendLibraries()
	os.Exit(m.Run())
}

// The CPU against itself: every check holds bit for bit, so the rows, the
// table and the comparison are what a GPU run fills with its own numbers.
func TestCPUAgainstCPU(t *testing.T) {
	path := testmodels.Random(t, "llama", "tiny", foundry.F32, 1, false)
	rows, err := parity.Run(context.Background(), parity.Config{Models: []string{path}, Device: "cpu", Threads: 2})
	require.NoError(t, err)
	require.Len(t, rows, 3)
	for _, r := range rows {
		require.True(t, r.OK, "%+v", r)
		require.Zero(t, r.MaxDiff, "the same code on the same device")
		require.Contains(t, r.Device, "CPU")
	}
	require.Greater(t, rows[0].Scale, 1.0, "real logits were compared")
	require.Greater(t, rows[1].Scale, 1.0)
	table := parity.Table(rows)
	require.Contains(t, table, "| dense |")
	require.Contains(t, table, "| paged quest |")
	require.Contains(t, table, "| greedy 32 | — | — | yes |")
}

// A device that is not there is an error naming it, not a failed row.
func TestMissingDevice(t *testing.T) {
	path := testmodels.Random(t, "llama", "tiny", foundry.F32, 1, false)
	_, err := parity.Run(context.Background(), parity.Config{Models: []string{path}, Device: "gpu", Threads: 2})
	require.ErrorContains(t, err, "on gpu")
	require.ErrorContains(t, err, "no GPU device is loaded")
}
