package store

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/internal/atomicfile"
	"github.com/kvrecall/kvrecall/internal/redistest"
)

// tierCase is a fresh Tier and a switch that makes its writes fail (a full
// disk for Local, a store that stops taking writes for Shared).
type tierCase struct {
	tier        Tier
	breakWrites func(on bool)
}

// breakable is a Backend whose writes fail while broken is set.
type breakable struct {
	Backend
	broken atomic.Bool
}

func (b *breakable) Set(ctx context.Context, key string, v []byte) error {
	if b.broken.Load() {
		return fmt.Errorf("%w: injected write failure", ErrUnavailable)
	}
	return b.Backend.Set(ctx, key, v)
}

func (b *breakable) SetNX(ctx context.Context, key string, v []byte) (bool, error) {
	if b.broken.Load() {
		return false, fmt.Errorf("%w: injected write failure", ErrUnavailable)
	}
	return b.Backend.SetNX(ctx, key, v)
}

// tiers returns each Tier implementation: Local on a temporary folder, and
// Shared on Redis (a real redis-server) and on a directory store.
func tiers() map[string]func(t *testing.T) tierCase {
	shared := func(t *testing.T, b Backend) tierCase {
		bb := &breakable{Backend: b}
		s := New(bb, "test")
		s.ChunkSize = 4096 // pages span several chunks
		t.Cleanup(func() { s.Close() })
		return tierCase{tier: NewShared(s, "model"), breakWrites: bb.broken.Store}
	}
	return map[string]func(t *testing.T) tierCase{
		"local": func(t *testing.T) tierCase {
			l := OpenLocal(t.TempDir())
			t.Cleanup(func() { l.Close() })
			return tierCase{tier: l, breakWrites: func(on bool) {
				if !on {
					atomicfile.Fault = nil
					return
				}
				atomicfile.Fault = func(path, step string) error {
					if step == "written" {
						return syscall.ENOSPC
					}
					return nil
				}
			}}
		},
		"shared-redis": func(t *testing.T) tierCase {
			r := redistest.Start(t)
			b, err := openRedis(r.URL)
			require.NoError(t, err)
			return shared(t, b)
		},
		"shared-dir": func(t *testing.T) tierCase {
			d, err := OpenDir(t.TempDir())
			require.NoError(t, err)
			return shared(t, d)
		},
	}
}

// version is a test document version: its metadata names its text, and
// every file's content is derived from it, so a mix of two versions shows.
func version(text string) Version {
	pages := bytes.Repeat([]byte(text), 5000/len(text)+1) // > 1 chunk of 4096
	return Version{
		Content: ContentKey("model", "tokens:"+text),
		Meta:    json.RawMessage(fmt.Sprintf(`{"id":"doc","text":%q}`, text)),
		Files: []File{
			// Streamed, as runtime writes a page file.
			{Name: PagesFile, Write: func(w io.Writer) error { _, err := w.Write(pages); return err }},
			{Name: ClustersFile, Data: []byte("clusters of " + text)},
			{Name: "probe-b64-r4-w256.kvr", Data: []byte("probe of " + text)},
		},
	}
}

// read returns what a View of id gives: the metadata's text, the content
// address and each file's bytes.
func read(t *testing.T, tier Tier, id string) (text, content string, files map[string][]byte, err error) {
	err = tier.View(context.Background(), id, func(v Version) error {
		var m struct{ Text string }
		if err := json.Unmarshal(v.Meta, &m); err != nil {
			return err
		}
		text, content, files = m.Text, v.Content, map[string][]byte{}
		for _, f := range v.Files {
			b, err := f.Bytes()
			if err != nil {
				return err
			}
			files[f.Name] = b
		}
		return nil
	})
	return
}

// requireVersion checks that id reads back as version(text), whole.
func requireVersion(t *testing.T, tier Tier, id, text string) {
	t.Helper()
	got, content, files, err := read(t, tier, id)
	require.NoError(t, err)
	want := version(text)
	require.Equal(t, text, got)
	require.Equal(t, want.Content, content)
	require.Len(t, files, len(want.Files))
	for _, f := range want.Files {
		b, err := f.Bytes()
		require.NoError(t, err)
		require.True(t, bytes.Equal(b, files[f.Name]), "%s of version %q", f.Name, text)
	}
}

// The behaviour both tiers share, one table for Local and Shared.
func TestTiers(t *testing.T) {
	ctx := context.Background()
	for name, open := range tiers() {
		t.Run(name, func(t *testing.T) {
			for _, tc := range []struct {
				name string
				run  func(t *testing.T, c tierCase)
			}{
				{"missing id", func(t *testing.T, c tierCase) {
					_, _, _, err := read(t, c.tier, "nothing")
					require.ErrorIs(t, err, ErrNotFound)
					require.ErrorIs(t, c.tier.Delete(ctx, "nothing"), ErrNotFound)
				}},
				{"round trip", func(t *testing.T, c tierCase) {
					require.NoError(t, c.tier.Put(ctx, "doc", version("alpha")))
					requireVersion(t, c.tier, "doc", "alpha")
				}},
				{"replace", func(t *testing.T, c tierCase) {
					require.NoError(t, c.tier.Put(ctx, "doc", version("alpha")))
					require.NoError(t, c.tier.Put(ctx, "doc", version("beta")))
					requireVersion(t, c.tier, "doc", "beta")
				}},
				{"two ids, one text", func(t *testing.T, c tierCase) {
					require.NoError(t, c.tier.Put(ctx, "doc", version("alpha")))
					require.NoError(t, c.tier.Put(ctx, "copy", version("alpha")))
					require.NoError(t, c.tier.Delete(ctx, "doc"))
					requireVersion(t, c.tier, "copy", "alpha")
				}},
				{"delete", func(t *testing.T, c tierCase) {
					require.NoError(t, c.tier.Put(ctx, "doc", version("alpha")))
					require.NoError(t, c.tier.Delete(ctx, "doc"))
					_, _, _, err := read(t, c.tier, "doc")
					require.ErrorIs(t, err, ErrNotFound)
					require.ErrorIs(t, c.tier.Delete(ctx, "doc"), ErrNotFound)
				}},
				{"failed put keeps the previous version", func(t *testing.T, c tierCase) {
					require.NoError(t, c.tier.Put(ctx, "doc", version("alpha")))
					c.breakWrites(true)
					err := c.tier.Put(ctx, "doc", version("beta"))
					c.breakWrites(false)
					require.Error(t, err)
					requireVersion(t, c.tier, "doc", "alpha")
					require.NoError(t, c.tier.Put(ctx, "doc", version("gamma")), "writes work again")
					requireVersion(t, c.tier, "doc", "gamma")
				}},
				{"failed first put leaves nothing", func(t *testing.T, c tierCase) {
					c.breakWrites(true)
					err := c.tier.Put(ctx, "doc", version("alpha"))
					c.breakWrites(false)
					require.Error(t, err)
					_, _, _, err = read(t, c.tier, "doc")
					require.ErrorIs(t, err, ErrNotFound)
				}},
				{"readers see one version whole during replacements", func(t *testing.T, c tierCase) {
					require.NoError(t, c.tier.Put(ctx, "doc", version("v0")))
					var wg sync.WaitGroup
					stop := make(chan struct{})
					errs := make(chan error, 4)
					for r := 0; r < 2; r++ {
						wg.Add(1)
						go func() {
							defer wg.Done()
							for {
								select {
								case <-stop:
									return
								default:
								}
								text, _, files, err := read(t, c.tier, "doc")
								if err != nil {
									errs <- err
									return
								}
								if want, _ := version(text).Files[1].Bytes(); !bytes.Equal(files[ClustersFile], want) {
									errs <- fmt.Errorf("metadata of %q with clusters %q", text, files[ClustersFile])
									return
								}
							}
						}()
					}
					for i := 1; i <= 10; i++ {
						require.NoError(t, c.tier.Put(ctx, "doc", version(fmt.Sprintf("v%d", i))))
					}
					close(stop)
					wg.Wait()
					close(errs)
					for err := range errs {
						require.NoError(t, err)
					}
					requireVersion(t, c.tier, "doc", "v10")
				}},
			} {
				t.Run(tc.name, func(t *testing.T) { tc.run(t, open(t)) })
			}
		})
	}
}

// Local keeps one version's files: a replacement removes the previous page
// file and clusters, and doc.json names the page file (the layout that
// runtime and docs/server.md describe).
func TestLocalLayout(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	l := OpenLocal(dir)
	defer l.Close()
	require.NoError(t, l.Put(ctx, "doc", version("alpha")))
	require.NoError(t, l.Put(ctx, "doc", version("beta")))
	var names []string
	es, err := os.ReadDir(filepath.Join(dir, "doc"))
	require.NoError(t, err)
	for _, e := range es {
		names = append(names, e.Name())
		info, err := e.Info()
		require.NoError(t, err)
		require.Equal(t, os.FileMode(FilePerm), info.Mode().Perm(), e.Name())
	}
	require.Len(t, names, 4, "doc.json, one page file, its clusters, the side file: %v", names)
	meta, _, err := readMeta(filepath.Join(dir, "doc"))
	require.NoError(t, err)
	require.Contains(t, names, meta.PagesFile)
	require.Contains(t, names, clustersOf(meta.PagesFile))
	require.Equal(t, version("beta").Content, meta.ContentKey)
}

// A folder written before page files were versioned (doc.json without
// pages_file, the page file pages.kvp) still loads, and a replacement
// moves it to the versioned names.
func TestLocalReadsLegacyFolders(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "old"), 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "old", "doc.json"), []byte(`{"id":"old","text":"legacy"}`), 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "old", "pages.kvp"), []byte("legacy pages"), 0o600))
	l := OpenLocal(dir)
	defer l.Close()
	text, _, files, err := read(t, l, "old")
	require.NoError(t, err)
	require.Equal(t, "legacy", text)
	require.Equal(t, "legacy pages", string(files[PagesFile]))
	listed, err := l.List(nil)
	require.NoError(t, err)
	require.Len(t, listed, 1)
	require.NoError(t, l.Put(ctx, "old", version("alpha")))
	requireVersion(t, l, "old", "alpha")
	_, err = os.Stat(filepath.Join(dir, "old", "pages.kvp"))
	require.True(t, errors.Is(err, os.ErrNotExist), "the legacy page file is removed once replaced")
}

// A Put that fails on a full disk, at the page file or at doc.json, leaves
// no file behind: a first Put no folder, a replacement only the previous
// version's files.
func TestLocalFailedPutLeavesNoFiles(t *testing.T) {
	ctx := context.Background()
	for _, at := range []string{"pages", "doc.json"} {
		t.Run(at, func(t *testing.T) {
			dir := t.TempDir()
			l := OpenLocal(dir)
			defer l.Close()
			atomicfile.Fault = func(path, step string) error {
				if step == "written" && strings.HasPrefix(filepath.Base(path), at) {
					return syscall.ENOSPC
				}
				return nil
			}
			err := l.Put(ctx, "first", version("alpha"))
			atomicfile.Fault = nil
			require.ErrorIs(t, err, syscall.ENOSPC)
			_, err = os.Stat(filepath.Join(dir, "first"))
			require.True(t, errors.Is(err, os.ErrNotExist), "a failed first Put leaves no folder")

			require.NoError(t, l.Put(ctx, "doc", version("alpha")))
			before, err := os.ReadDir(filepath.Join(dir, "doc"))
			require.NoError(t, err)
			atomicfile.Fault = func(path, step string) error {
				if step == "written" && strings.HasPrefix(filepath.Base(path), at) {
					return syscall.ENOSPC
				}
				return nil
			}
			err = l.Put(ctx, "doc", version("beta"))
			atomicfile.Fault = nil
			require.ErrorIs(t, err, syscall.ENOSPC)
			after, err := os.ReadDir(filepath.Join(dir, "doc"))
			require.NoError(t, err)
			names := func(es []os.DirEntry) (out []string) {
				for _, e := range es {
					if !IsSideFile(e.Name()) { // side files: their content is checked below
						out = append(out, e.Name())
					}
				}
				return out
			}
			require.Equal(t, names(before), names(after))
			for _, e := range after {
				require.False(t, IsSideFile(e.Name()) && !bytes.Contains(must(os.ReadFile(filepath.Join(dir, "doc", e.Name()))), []byte("alpha")), "the failed version wrote no side file")
			}
			requireVersion(t, l, "doc", "alpha")
		})
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
