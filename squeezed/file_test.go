package squeezed

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/paging"
)

func testIndex(t *testing.T) *Index {
	keys := func(l, g, n int, dst []float32) []float32 { return topicKeys(uint64(l*3+g), n, 8, 6) }
	ix, err := Build(keys, 2, 2, 8, 600, Options{Seed: 2})
	require.NoError(t, err)
	ix.Threshold = 0.0125
	return ix
}

func TestFileRoundTrip(t *testing.T) {
	ix := testIndex(t)
	path := filepath.Join(t.TempDir(), "clusters.kvs")
	require.NoError(t, ix.WriteFile(path))
	got, err := ReadFile(path, 2, 2, 8, 600)
	require.NoError(t, err)
	require.Equal(t, ix, got)
}

// Damage anywhere is refused with ErrCorrupt naming the file; a file of
// another shape or version is refused too.
func TestFileRefused(t *testing.T) {
	ix := testIndex(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "clusters.kvs")
	require.NoError(t, ix.WriteFile(path))
	good, err := os.ReadFile(path)
	require.NoError(t, err)
	for _, c := range []struct {
		name   string
		mutate func([]byte) []byte
		shape  [4]int
		want   string
	}{
		{"header bit", func(b []byte) []byte { b[20] ^= 1; return b }, [4]int{2, 2, 8, 600}, "header"},
		{"centroid bit", func(b []byte) []byte { b[60] ^= 1; return b }, [4]int{2, 2, 8, 600}, "layer 0, KV head 0: checksum mismatch"},
		{"last head bit", func(b []byte) []byte { b[len(b)-10] ^= 1; return b }, [4]int{2, 2, 8, 600}, "layer 1, KV head 1: checksum mismatch"},
		{"truncated", func(b []byte) []byte { return b[:len(b)-3] }, [4]int{2, 2, 8, 600}, "truncated"},
		{"extended", func(b []byte) []byte { return append(b, 0) }, [4]int{2, 2, 8, 600}, "after the last section"},
		{"other document", func(b []byte) []byte { return b }, [4]int{2, 2, 8, 700}, "over 600 tokens, want"},
		{"not ours", func(b []byte) []byte { return []byte("hello") }, [4]int{2, 2, 8, 600}, "not a clusters file"},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(dir, c.name)
			require.NoError(t, os.WriteFile(p, c.mutate(append([]byte(nil), good...)), 0o644))
			_, err := ReadFile(p, c.shape[0], c.shape[1], c.shape[2], c.shape[3])
			require.ErrorIs(t, err, kvcache.ErrCorrupt)
			require.ErrorContains(t, err, c.want)
			require.ErrorContains(t, err, p)
		})
	}
	t.Run("version", func(t *testing.T) {
		b := append([]byte(nil), good...)
		b[8] = 9
		p := filepath.Join(dir, "version")
		require.NoError(t, os.WriteFile(p, b, 0o644))
		_, err := ReadFile(p, 2, 2, 8, 600)
		require.ErrorContains(t, err, "version 9, this build reads version 1: ingest the document again")
	})
}

// The recorder asks for queries only in passes that reach the window, and
// keeps exactly the window's.
func TestRecorder(t *testing.T) {
	dense, err := paging.New("dense", paging.Config{PageSize: 16})
	require.NoError(t, err)
	const layers, tokens, window, batch = 3, 100, 30, 32
	r, err := NewRecorder(dense, layers, tokens, window)
	require.NoError(t, err)
	var asked []int
	for pos := 0; pos < tokens; pos += batch {
		n := min(batch, tokens-pos)
		for l := 0; l < layers; l++ {
			var q *paging.Queries
			if r.NeedQueries(l, n) {
				asked = append(asked, pos)
				q = &paging.Queries{Heads: 1}
				for i := 0; i < n; i++ {
					q.Q = append(q.Q, []float32{float32(pos + i)})
				}
			}
			r.Select(l, nil, q, pos+n)
		}
	}
	require.Equal(t, []int{64, 64, 64, 96, 96, 96}, asked)
	for l := 0; l < layers; l++ {
		require.Len(t, r.Queries()[l], window)
		require.Equal(t, float32(tokens-window), r.Queries()[l][0][0])
	}
}
