package heads_test

import (
	"context"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/heads"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/runtime"
)

func TestMain(m *testing.M) {
	testmodels.Quiet()
	os.Exit(m.Run())
}

func openModel(t *testing.T, path string) *runtime.Model {
	t.Helper()
	m, err := runtime.Open(context.Background(), path, runtime.Options{Threads: 2, ContextLength: 512})
	require.NoError(t, err)
	t.Cleanup(m.Close)
	return m
}

// Profiles round-trip through their file; Load refuses, naming the file,
// malformed profiles, profiles of another model file and of another shape.
func TestProfileFiles(t *testing.T) {
	m := openModel(t, testmodels.Recall(t))
	other := openModel(t, testmodels.RecallWith(t, foundry.RecallOptions{Seed: 5}))
	dir := t.TempDir()
	p, err := heads.Synthetic(m, 0.5)
	require.NoError(t, err)
	good := filepath.Join(dir, "good.json")
	require.NoError(t, p.Save(good))

	t.Run("round trip", func(t *testing.T) {
		q, err := heads.Load(good, m)
		require.NoError(t, err)
		require.Equal(t, p, q)
		require.Equal(t, [][]bool{{false, true}, {false, true}}, q.KVClasses())
		require.True(t, q.Streaming(1, 1))
		require.False(t, q.Streaming(1, 0))
		require.Equal(t, 2, q.StreamingKVHeads())
	})
	bad := []struct {
		name, content, want string
	}{
		{"not json", "{", "malformed JSON"},
		{"wrong version", `{"version": 7}`, "format version 7"},
		{"short fingerprint", `{"version": 1, "fingerprint": "ab"}`, "fingerprint"},
		{"bad class", `{"version":1,"fingerprint":"` + p.Fingerprint + `","layers":1,"heads":4,"kv_heads":2,"scores":[[0,0,0,0]],"classes":[["retrieval","sleepy"]]}`, `class "sleepy"`},
		{"ragged scores", `{"version":1,"fingerprint":"` + p.Fingerprint + `","layers":1,"heads":4,"kv_heads":2,"scores":[[0,0]],"classes":[["retrieval","streaming"]]}`, "2 scores, want 4"},
		{"wrong shape", `{"version":1,"fingerprint":"` + p.Fingerprint + `","layers":1,"heads":4,"kv_heads":2,"scores":[[0,0,0,0]],"classes":[["retrieval","streaming"]]}`, "1 layers x 4 heads"},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, "bad.json")
			require.NoError(t, os.WriteFile(path, []byte(tc.content), 0o644))
			_, err := heads.Load(path, m)
			require.ErrorContains(t, err, path)
			require.ErrorContains(t, err, tc.want)
		})
	}
	t.Run("other model", func(t *testing.T) {
		_, err := heads.Load(good, other)
		require.ErrorContains(t, err, good)
		require.ErrorContains(t, err, "another model file")
		require.ErrorContains(t, err, other.Path())
	})
	t.Run("default path", func(t *testing.T) {
		require.Equal(t, "/m/recall.heads.json", heads.DefaultPath("/m/recall.gguf"))
		require.Equal(t, "/m/recall.bin.heads.json", heads.DefaultPath("/m/recall.bin"))
	})
	t.Run("missing", func(t *testing.T) {
		_, err := heads.Load(filepath.Join(dir, "nope.json"), m)
		require.ErrorContains(t, err, "nope.json")
	})
	t.Run("synthetic fractions", func(t *testing.T) {
		for _, f := range []float64{0, 0.5, 1} {
			q, err := heads.Synthetic(m, f)
			require.NoError(t, err)
			require.Equal(t, int(math.Round(f*2))*q.Layers, q.StreamingKVHeads())
		}
		_, err := heads.Synthetic(m, 1.5)
		require.Error(t, err)
	})
}
