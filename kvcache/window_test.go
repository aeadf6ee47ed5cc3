package kvcache

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	ollamakv "github.com/ollama/ollama/kvcache"
	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/paging"
)

// windowedCache returns a cache of testLayout (2 layers, pages of 16) whose
// layer 0 is a sliding-window layer of window tokens and layer 1 a global
// (dense) one, and a reference cache whose layers are both global.
func windowedCache(t *testing.T, window, capacity, maxBatch int, prefix, refPrefix *Store) (win, ref *Paged) {
	t.Helper()
	mk := func(windowed bool, prefix *Store) *Paged {
		inner := &testSelector{c: paging.Config{PageSize: 16, Layers: 2}, groups: []paging.Group{{}}}
		var sel paging.Selector = inner
		if windowed {
			var err error
			sel, err = paging.SlidingWindow(inner, func(l int) bool { return l == 0 }, window)
			require.NoError(t, err)
		}
		c, err := NewPaged(Options{Layout: testLayout, Heads: 4, Selector: sel, Capacity: capacity, MaxBatch: maxBatch, Prefix: prefix})
		require.NoError(t, err)
		c.Init(nil, 0, 1, capacity, maxBatch)
		return c
	}
	return mk(true, prefix), mk(false, refPrefix)
}

// samePage requires a held page to be the reference's page, byte for byte.
func samePage(t *testing.T, want, got *Page, msg string) {
	t.Helper()
	require.NotNil(t, got, msg)
	require.Equal(t, want.N, got.N, msg)
	require.Equal(t, want.K, got.K, msg)
	require.Equal(t, want.V, got.V, msg)
	require.Equal(t, want.Mean, got.Mean, msg)
	require.Equal(t, want.Min, got.Min, msg)
	require.Equal(t, want.Max, got.Max, msg)
	require.Equal(t, want.NReps, got.NReps, msg)
}

// A sliding-window layer's host pages hold only what its window can still
// read: after every pass, exactly the pages touching positions from
// pos0-window on (pos0: the pass's first position), whatever the length,
// while the global layer keeps every page. What is held is what a cache
// without windows holds, byte for byte; what its window reads (the
// selection) is always held; and host bytes are bounded by the window and
// the largest batch.
func TestWindowedLayersKeepOnlyTheirWindow(t *testing.T) {
	const P = 16
	cases := []struct {
		name    string
		window  int
		batches []int // tokens of each pass, repeated until 300 tokens
	}{
		{"decode steps, window of 40", 40, []int{1}},
		{"batches of 7, window of 40", 40, []int{7}},
		{"batches wider than the window", 20, []int{50}},
		{"mixed, window a multiple of the page", 32, []int{33, 1, 1, 16, 5}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			win, ref := windowedCache(t, tc.window, 400, 64, nil, nil)
			require.Equal(t, tc.window, win.SlidingWindow(0))
			require.Zero(t, win.SlidingWindow(1))
			rw, rr := rand.New(rand.NewPCG(1, 2)), rand.New(rand.NewPCG(1, 2))
			maxBatch := 0
			for i := 0; win.store.Len() < 300; i++ {
				n := min(tc.batches[i%len(tc.batches)], 300-win.store.Len())
				maxBatch = max(maxBatch, n)
				pos0 := win.store.Len()
				step(t, win, rw, n) // CheckInvariants includes the store's windows
				step(t, ref, rr, n)
				s := win.store
				first := max(0, pos0-tc.window) / P
				require.Equal(t, s.Pages()-first, s.HeldPages(0), "windowed layer after the pass at %d", pos0)
				require.Equal(t, s.Pages(), s.HeldPages(1), "the global layer keeps every page")
				require.LessOrEqual(t, s.HeldPages(0), (tc.window+maxBatch)/P+2)
				for p := 0; p < s.Pages(); p++ {
					if p < first {
						require.Nil(t, s.Page(0, p), "page %d left the window", p)
						continue
					}
					samePage(t, ref.store.Page(0, p), s.Page(0, p), "windowed layer")
				}
				// The window the next query reads is held.
				next := s.Len()
				for p := max(0, next-tc.window+1) / P; p < s.Pages(); p++ {
					require.NotNil(t, s.Page(0, p), "page %d is in the next query's window", p)
				}
				require.Equal(t, int64(s.HeldPages(0)+s.HeldPages(1))*int64(testLayout.PageBytes()), win.Stats().HostBytes)
			}
			require.Less(t, win.Stats().HostBytes, ref.Stats().HostBytes)

			// The sequence can be cut back to where the last pass began,
			// not before: those pages are gone.
			from := win.store.from
			require.True(t, win.CanResume(0, int32(from)))
			if from > 0 {
				require.False(t, win.CanResume(0, int32(from-1)))
				err := win.Remove(0, int32(from-1), 1<<31-1)
				require.True(t, errors.Is(err, ollamakv.ErrNotSupported), "%v", err)
				require.ErrorContains(t, err, "sliding-window")
			}
			require.NoError(t, win.Remove(0, int32(from), 1<<31-1))
			require.NoError(t, ref.Remove(0, int32(from), 1<<31-1))
			require.NoError(t, win.store.checkWindows()) // the selections are the removed pass's until the next one
			step(t, win, rw, 3)
			step(t, ref, rr, 3)
		})
	}
}

// A document's store, trimmed to its last token (TrimWindows), keeps only
// the windowed layer's last window in memory and in its page file
// (version 2, smaller by the dropped records); read back, it holds the same
// pages; a session forked from either continues exactly like one forked
// from an untrimmed document, and trims its own copy, never the document.
func TestWindowedDocumentPageFile(t *testing.T) {
	const P, W, N = 16, 40, 203
	build := func() (*Store, *Store) {
		win, ref := windowedCache(t, W, 400, 64, nil, nil)
		rw, rr := rand.New(rand.NewPCG(3, 4)), rand.New(rand.NewPCG(3, 4))
		for win.store.Len() < N {
			n := min(64, N-win.store.Len())
			step(t, win, rw, n)
			step(t, ref, rr, n)
		}
		win.store.TrimWindows()
		ref.store.TrimWindows() // no windowed layer: a no-op
		require.NoError(t, win.store.checkWindows())
		return win.store, ref.store
	}
	doc, full := build()
	first := (N - 1 - W) / P
	require.Equal(t, doc.Pages()-first, doc.HeldPages(0))
	require.Equal(t, full.Pages(), full.HeldPages(0))

	dir := t.TempDir()
	write := func(s *Store, name string) string {
		p := filepath.Join(dir, name)
		require.NoError(t, WritePageFile(p, s, make([]int32, N), Fingerprint{7}))
		return p
	}
	docPath, fullPath := write(doc, "windowed.kvp"), write(full, "full.kvp")
	st1, err := os.Stat(docPath)
	require.NoError(t, err)
	st2, err := os.Stat(fullPath)
	require.NoError(t, err)
	// Version 2 adds from and a window per layer to the header and leaves
	// out the windowed layer's records of the first pages.
	require.Equal(t, st2.Size()+8+4*int64(testLayout.Layers)-int64(first*testLayout.layerRecordSize()), st1.Size())

	got, _, info, err := ReadPageFile(docPath, &testLayout)
	require.NoError(t, err)
	require.Equal(t, []int{W, 0}, info.Windows)
	require.Equal(t, N-1, info.From)
	require.NoError(t, got.checkWindows())
	require.Equal(t, doc.Bytes(), got.Bytes())
	for l := 0; l < testLayout.Layers; l++ {
		for p := 0; p < doc.Pages(); p++ {
			if doc.Page(l, p) == nil {
				require.Nil(t, got.Page(l, p), "layer %d page %d", l, p)
				continue
			}
			samePage(t, doc.Page(l, p), got.Page(l, p), "read back")
		}
	}
	_, _, v1, err := ReadPageFile(fullPath, &testLayout)
	require.NoError(t, err)
	require.Nil(t, v1.Windows, "no windowed layer: version 1")

	// Sessions on the read-back document and on the untrimmed one write the
	// same pages from the same keys.
	for _, prefix := range []*Store{doc, got} {
		win, ref := windowedCache(t, W, 400, 64, prefix, full)
		require.NoError(t, win.CheckInvariants())
		rw, rr := rand.New(rand.NewPCG(5, 6)), rand.New(rand.NewPCG(5, 6))
		for i := 0; i < 60; i++ {
			step(t, win, rw, 1+i%3)
			step(t, ref, rr, 1+i%3)
		}
		for p := win.store.first[0]; p < win.store.Pages(); p++ {
			samePage(t, ref.store.Page(0, p), win.store.Page(0, p), "session")
		}
		require.NotNil(t, prefix.Page(0, first), "a session never drops the document's pages")
		require.Less(t, prefix.first[0], win.store.first[0])
	}

	// The windows belong to the model: another window, or a global layer
	// where the document dropped pages, is refused.
	_, err = NewPaged(Options{Layout: testLayout, Heads: 4, Capacity: 400, Prefix: got,
		Selector: &testSelector{c: paging.Config{PageSize: 16, Layers: 2}, groups: []paging.Group{{}}}})
	require.ErrorContains(t, err, "layer 0 of the document keeps a sliding window of 40 tokens, the cache needs 0")
	inner := &testSelector{c: paging.Config{PageSize: 16, Layers: 2}, groups: []paging.Group{{}}}
	other, err := paging.SlidingWindow(inner, func(l int) bool { return l == 0 }, 64)
	require.NoError(t, err)
	_, err = NewPaged(Options{Layout: testLayout, Heads: 4, Capacity: 400, Prefix: got, Selector: other})
	require.ErrorContains(t, err, "cache needs 64")
}

// Version 2 headers are checked like version 1's: a position past the
// tokens, a huge window or a cut file is an error naming the file.
func TestWindowedPageFileHostile(t *testing.T) {
	win, _ := windowedCache(t, 40, 400, 64, nil, nil)
	r := rand.New(rand.NewPCG(7, 8))
	for win.store.Len() < 100 {
		step(t, win, r, 25)
	}
	win.store.TrimWindows()
	var b bytes.Buffer
	require.NoError(t, writePages(&b, win.store, make([]int32, 100), Fingerprint{}))
	good := b.Bytes()
	// from sits after the v1 header's fields, windows after it.
	rewrite := func(edit func([]byte)) []byte {
		d := append([]byte(nil), good...)
		edit(d)
		ext := headerSize - 4 + 8 + 4*testLayout.Layers
		binary.LittleEndian.PutUint32(d[ext:], crc32.Checksum(d[:ext], castagnoli))
		return d
	}
	cases := []struct {
		name string
		data []byte
		want string
	}{
		{"from past the tokens", rewrite(func(d []byte) { d[headerSize-4] = 200 }), "resumes from position 200"},
		{"window of 2^32-1", rewrite(func(d []byte) { copy(d[headerSize+4:], []byte{255, 255, 255, 255}) }), "sliding window"},
		{"window 0: the dropped records are missing", rewrite(func(d []byte) { copy(d[headerSize+4:], []byte{0, 0, 0, 0}) }), "the header implies"},
		{"flipped window byte", func() []byte { d := append([]byte(nil), good...); d[headerSize+4] ^= 1; return d }(), "header checksum"},
		{"cut in the header", good[:headerSize+2], "truncated header"},
		{"cut in a page", good[:len(good)-10], "the header implies"},
	}
	dir := t.TempDir()
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(dir, string(rune('a'+i))+".kvp")
			require.NoError(t, os.WriteFile(p, c.data, 0o600))
			_, _, _, err := ReadPageFile(p, &testLayout)
			require.True(t, errors.Is(err, ErrCorrupt), "%v", err)
			require.ErrorContains(t, err, c.want)
			require.ErrorContains(t, err, p)
		})
	}
	p := filepath.Join(dir, "good.kvp")
	require.NoError(t, os.WriteFile(p, good, 0o600))
	_, _, info, err := ReadPageFile(p, &testLayout)
	require.NoError(t, err)
	require.Equal(t, 99, info.From)
}
