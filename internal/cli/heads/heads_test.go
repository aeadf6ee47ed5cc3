package heads

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/heads"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/runtime"
)

func TestMain(m *testing.M) {
	testmodels.Quiet()
	os.Exit(m.Run())
}

// Both subcommands write a profile that loads for the model and a PNG
// heatmap beside it; bad invocations are errors that say what is wrong.
func TestCommand(t *testing.T) {
	model := testmodels.Recall(t)
	dir := t.TempDir()
	ctx := context.Background()
	for _, args := range [][]string{
		{"detect", "--lengths", "256", "--depths", "0,50", "--threads", "2"},
		{"datafree", "--period", "64", "--samples", "1", "--threads", "2"},
	} {
		t.Run(args[0], func(t *testing.T) {
			out := filepath.Join(dir, args[0]+".json")
			require.NoError(t, Run(ctx, append(args, "--model", model, "-o", out)))
			m, err := runtime.Open(ctx, model, runtime.Options{Threads: 2, ContextLength: 512})
			require.NoError(t, err)
			defer m.Close()
			p, err := heads.Load(out, m)
			require.NoError(t, err)
			require.Equal(t, []heads.Head{{Layer: 1, Head: 0}, {Layer: 1, Head: 1}}, p.RetrievalHeads())
			png, err := os.ReadFile(filepath.Join(dir, args[0]+".png"))
			require.NoError(t, err)
			require.True(t, bytes.HasPrefix(png, []byte("\x89PNG")), "heatmap is a PNG")
		})
	}
	bad := []struct {
		args []string
		want string
	}{
		{nil, "missing command"},
		{[]string{"guess"}, `unknown command "guess"`},
		{[]string{"detect"}, "--model FILE is required"},
		{[]string{"detect", "--model", model, "--depths", "0,150"}, "150 is outside"},
		{[]string{"detect", "--model", model, "--lengths", "x"}, "--lengths"},
		{[]string{"datafree", "--model", model, "-o", filepath.Join(dir, "p.txt")}, ".json"},
		{[]string{"datafree", "--model", filepath.Join(dir, "none.gguf")}, "none.gguf"},
	}
	for _, tc := range bad {
		t.Run(tc.want, func(t *testing.T) {
			require.ErrorContains(t, Run(ctx, tc.args), tc.want)
		})
	}
}
