package store

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/internal/redistest"
)

// backends returns a fresh store of each kind: Redis (a real redis-server)
// and a directory.
func backends(t *testing.T) map[string]func(t *testing.T) *Store {
	return map[string]func(t *testing.T) *Store{
		"redis": func(t *testing.T) *Store {
			r := redistest.Start(t)
			s, err := Open(r.URL)
			require.NoError(t, err)
			t.Cleanup(func() { s.Close() })
			return s
		},
		"dir": func(t *testing.T) *Store {
			s, err := Open("file://" + t.TempDir())
			require.NoError(t, err)
			return s
		},
	}
}

// testDoc has a file that spans several chunks (with a short last one), one
// that fits one, and an empty one.
func testDoc() Document {
	big := make([]byte, 10_000)
	for i := range big {
		big[i] = byte(i * 7)
	}
	return Document{Meta: json.RawMessage(`{"id":"book"}`),
		Files: []File{{Name: "pages", Data: big}, {Name: "clusters", Data: []byte("centroids")}, {Name: "empty", Data: []byte{}}}}
}

func manifestOf(t *testing.T, s *Store, content string) manifest {
	raw, ok, err := s.b.Get(context.Background(), s.manifestKey(content))
	require.NoError(t, err)
	require.True(t, ok)
	var m manifest
	require.NoError(t, json.Unmarshal(raw, &m))
	return m
}

func TestRoundTripAndFaults(t *testing.T) {
	ctx := context.Background()
	for name, open := range backends(t) {
		t.Run(name, func(t *testing.T) {
			s := open(t)
			s.ChunkSize = 4096 // the 10000-byte file takes 3 chunks
			key := ContentKey("model", "tokens:abc", "page_size=64", "kv=f16")
			_, err := s.Get(ctx, key)
			require.ErrorIs(t, err, ErrNotFound)

			kept, err := s.Put(ctx, key, testDoc())
			require.NoError(t, err)
			require.True(t, kept)
			require.Len(t, manifestOf(t, s, key).Files[0].Chunks, 3)
			got, err := s.Get(ctx, key)
			require.NoError(t, err)
			require.JSONEq(t, `{"id":"book"}`, string(got.Meta))
			require.Len(t, got.Files, 3)
			for i, f := range testDoc().Files {
				require.Equal(t, f.Name, got.Files[i].Name)
				require.True(t, bytes.Equal(f.Data, got.Files[i].Data), f.Name)
			}
			kept, err = s.Put(ctx, key, testDoc())
			require.NoError(t, err)
			require.False(t, kept, "a second copy is not stored")

			require.NoError(t, s.SetName(ctx, "model", "book", key))
			r, err := s.Resolve(ctx, "model", "book")
			require.NoError(t, err)
			require.Equal(t, key, r)
			require.NoError(t, s.DeleteName(ctx, "model", "book"))
			_, err = s.Resolve(ctx, "model", "book")
			require.ErrorIs(t, err, ErrNotFound)

			// A chunk evicted, a chunk with a flipped byte: both are found,
			// the manifest goes, and a new Put stores the document again.
			for _, fault := range []string{"evicted", "flipped"} {
				t.Run(fault, func(t *testing.T) {
					m := manifestOf(t, s, key)
					ck := s.chunkKey(key, m.Writer, "pages", 1)
					if fault == "evicted" {
						require.NoError(t, s.b.Del(ctx, ck))
					} else {
						c, ok, err := s.b.Get(ctx, ck)
						require.NoError(t, err)
						require.True(t, ok)
						c[100] ^= 1
						require.NoError(t, s.b.Set(ctx, ck, c))
					}
					_, err := s.Get(ctx, key)
					require.ErrorIs(t, err, ErrDamaged)
					require.ErrorContains(t, err, "chunk 1 of pages")
					_, err = s.Get(ctx, key)
					require.ErrorIs(t, err, ErrNotFound, "the damaged copy is no longer visible")
					for _, k := range allKeys(t, s) {
						require.NotContains(t, k, m.Writer, "the damaged copy's chunks are removed")
					}
					kept, err := s.Put(ctx, key, testDoc())
					require.NoError(t, err)
					require.True(t, kept, "stored again after the damage")
					_, err = s.Get(ctx, key)
					require.NoError(t, err)
				})
			}
		})
	}
}

// Many writers of one document at once: exactly one copy's chunks remain,
// and it reads back whole.
func TestConcurrentPutsKeepOneCopy(t *testing.T) {
	ctx := context.Background()
	for name, open := range backends(t) {
		t.Run(name, func(t *testing.T) {
			s := open(t)
			s.ChunkSize = 1000
			key := ContentKey("model", "tokens:race")
			var wg sync.WaitGroup
			kept := make([]bool, 8)
			errs := make([]error, 8)
			for i := range kept {
				wg.Add(1)
				go func() { defer wg.Done(); kept[i], errs[i] = s.Put(ctx, key, testDoc()) }()
			}
			wg.Wait()
			n := 0
			for i := range kept {
				require.NoError(t, errs[i])
				if kept[i] {
					n++
				}
			}
			require.Equal(t, 1, n, "exactly one writer's copy is kept")
			m := manifestOf(t, s, key)
			_, err := s.Get(ctx, key)
			require.NoError(t, err)
			// No loser's chunk is left behind.
			chunks := 0
			for _, k := range allKeys(t, s) {
				if strings.HasPrefix(k, "kvrecall:chunk:") {
					chunks++
					require.Contains(t, k, ":"+m.Writer+":", "only the kept writer's chunks remain")
				}
			}
			require.Equal(t, 10+1+1, chunks, "one copy: 10 chunks of pages, 1 of clusters, 1 empty")
		})
	}
}

// allKeys lists every key in the store's back end.
func allKeys(t *testing.T, s *Store) []string {
	var out []string
	switch b := s.b.(type) {
	case *redisBackend:
		keys, err := b.c.Keys(context.Background(), "*").Result()
		require.NoError(t, err)
		out = keys
	case *Dir:
		es, err := os.ReadDir(b.path)
		require.NoError(t, err)
		for _, e := range es {
			out = append(out, strings.ReplaceAll(e.Name(), "_", ":"))
		}
	default:
		t.Fatalf("unknown back end %T", b)
	}
	return out
}

// Redis killed: every call fails with ErrUnavailable, promptly.
func TestRedisDown(t *testing.T) {
	ctx := context.Background()
	r := redistest.Start(t)
	s, err := Open(r.URL)
	require.NoError(t, err)
	defer s.Close()
	key := ContentKey("model", "tokens:down")
	_, err = s.Put(ctx, key, testDoc())
	require.NoError(t, err)
	r.Kill()
	for name, call := range map[string]func() error{
		"ping": func() error { return s.Ping(ctx) },
		"get":  func() error { _, err := s.Get(ctx, key); return err },
		"put":  func() error { _, err := s.Put(ctx, ContentKey("model", "other"), testDoc()); return err },
	} {
		t.Run(name, func(t *testing.T) {
			err := call()
			require.ErrorIs(t, err, ErrUnavailable)
			require.False(t, errors.Is(err, ErrNotFound), "down is not missing")
		})
	}
}

func TestOpenRejectsBadURLs(t *testing.T) {
	for _, u := range []string{"memcached://x", "file://relative/path", "redis://host:notaport"} {
		t.Run(u, func(t *testing.T) {
			_, err := Open(u)
			require.Error(t, err)
			require.Contains(t, err.Error(), fmt.Sprint("store"))
		})
	}
}

func TestContentKeyIgnoresSettingOrder(t *testing.T) {
	a := ContentKey("m", "t", "page_size=64", "kv=f16")
	require.Equal(t, a, ContentKey("m", "t", "kv=f16", "page_size=64"))
	require.NotEqual(t, a, ContentKey("m", "t", "page_size=32", "kv=f16"), "the page size changes the bytes")
	require.NotEqual(t, a, ContentKey("m2", "t", "page_size=64", "kv=f16"))
}

// failAfter is a back end that stops answering after n reads: Redis dying
// in the middle of a document's chunks.
type failAfter struct {
	Backend
	n int
}

func (f *failAfter) Get(ctx context.Context, key string) ([]byte, bool, error) {
	if f.n--; f.n < 0 {
		return nil, false, fmt.Errorf("%w: connection reset", ErrUnavailable)
	}
	return f.Backend.Get(ctx, key)
}

// A store that dies between chunks gives an error, never part of a
// document, and does not mark the copy damaged (it is not).
func TestDiesMidGet(t *testing.T) {
	ctx := context.Background()
	dir, err := OpenDir(t.TempDir())
	require.NoError(t, err)
	s := New(dir, "test")
	s.ChunkSize = 1000
	key := ContentKey("model", "tokens:mid")
	_, err = s.Put(ctx, key, testDoc())
	require.NoError(t, err)
	for _, after := range []int{0, 1, 5, 11} { // the manifest, then chunks
		t.Run(fmt.Sprint(after), func(t *testing.T) {
			f := New(&failAfter{Backend: dir, n: after}, "failing")
			doc, err := f.Get(ctx, key)
			require.ErrorIs(t, err, ErrUnavailable)
			require.False(t, errors.Is(err, ErrDamaged))
			require.Nil(t, doc.Files, "nothing partial")
			_, err = s.Get(ctx, key)
			require.NoError(t, err, "the copy is intact and still visible")
		})
	}
}
