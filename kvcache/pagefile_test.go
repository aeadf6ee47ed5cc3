package kvcache

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// rawHeader is a page file header with any field values, and a valid CRC.
type rawHeader struct {
	version, layers, kvHeads, headDim, pageSize, reps, pages uint32
	tokens                                                   uint64
}

func (h rawHeader) bytes() []byte {
	var b bytes.Buffer
	b.WriteString(pageFileMagic)
	for _, v := range []uint32{h.version, h.layers, h.kvHeads, h.headDim, h.pageSize, h.reps, h.pages} {
		binary.Write(&b, binary.LittleEndian, v)
	}
	binary.Write(&b, binary.LittleEndian, h.tokens)
	b.Write(make([]byte, 32))
	binary.Write(&b, binary.LittleEndian, crc32.Checksum(b.Bytes(), castagnoli))
	return b.Bytes()
}

func goodHeader() rawHeader {
	l := testLayout
	return rawHeader{pageFileVersion, uint32(l.Layers), uint32(l.KVHeads), uint32(l.HeadDim), uint32(l.PageSize), Reps, 4, 50}
}

// Headers whose checksum is valid but whose counts are hostile give an
// error, never a panic or a huge allocation: each count is bounded as an
// unsigned number before it is used.
func TestPageFileHostileHeaders(t *testing.T) {
	cases := []struct {
		name string
		edit func(*rawHeader)
		tail int // bytes after the header
		want string
	}{
		// The file is exactly a header: the size 84 + 4*(-1) + 4 checked out
		// when the count was signed.
		{"tokens 2^64-1 in 0 pages", func(h *rawHeader) { h.tokens, h.pages = math.MaxUint64, 0 }, 0, "beyond this build's limits"},
		{"tokens 2^64-1 in 2^32-1 pages", func(h *rawHeader) { h.tokens, h.pages = math.MaxUint64, math.MaxUint32 }, 4, "beyond this build's limits"},
		{"tokens 2^63 in 0 pages", func(h *rawHeader) { h.tokens, h.pages = 1<<63, 0 }, 4, "beyond this build's limits"},
		{"tokens 2^32 in 0 pages", func(h *rawHeader) { h.tokens, h.pages = 1<<32, 0 }, 4, "beyond this build's limits"},
		{"0 tokens in 1 page", func(h *rawHeader) { h.tokens, h.pages = 0, 1 }, 4, "cannot hold"},
		{"too few pages", func(h *rawHeader) { h.pages = 3 }, 4, "cannot hold"},
		{"2^32-1 layers", func(h *rawHeader) { h.layers = math.MaxUint32 }, 4, "layers"},
		{"2^32-1 KV heads", func(h *rawHeader) { h.kvHeads = math.MaxUint32 }, 4, "KV heads"},
		{"2^32-1 head dimension", func(h *rawHeader) { h.headDim = math.MaxUint32 }, 4, "head dimension"},
		{"4096 KV heads of 4096", func(h *rawHeader) { h.kvHeads, h.headDim, h.tokens, h.pages = maxLayoutDim, maxLayoutDim, 0, 0 }, 4, "channels"},
		{"0 layers", func(h *rawHeader) { h.layers = 0 }, 4, "invalid layout"},
		{"page size 0", func(h *rawHeader) { h.pageSize = 0 }, 4, "page size"},
		{"page size 2^32-1", func(h *rawHeader) { h.pageSize = math.MaxUint32 }, 4, "page size"},
		{"2^31 reps", func(h *rawHeader) { h.reps = 1 << 31 }, 4, "representative keys"},
		{"largest layout and length", func(h *rawHeader) {
			h.layers, h.kvHeads, h.headDim, h.pageSize = maxLayoutDim, 256, 256, 16
			h.tokens, h.pages = maxFileTokens, maxFileTokens/16+1
		}, 4, "the header implies"},
		{"largest claims, small file", func(h *rawHeader) {
			h.layers, h.kvHeads, h.headDim, h.pageSize = 1, 1, 1, 16
			h.tokens, h.pages = maxFileTokens, maxFileTokens/16+1
		}, 4, "the header implies"},
		{"valid header, no body", func(*rawHeader) {}, 0, "the header implies"},
	}
	dir := t.TempDir()
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h := goodHeader()
			c.edit(&h)
			data := append(h.bytes(), make([]byte, c.tail)...)
			p := filepath.Join(dir, strings.Repeat("x", i+1)+".kvp")
			require.NoError(t, os.WriteFile(p, data, 0o600))
			for _, want := range []*Layout{nil, &testLayout} {
				_, _, _, err := ReadPageFile(p, want)
				require.Error(t, err)
				require.True(t, errors.Is(err, ErrCorrupt), "%v", err)
				require.ErrorContains(t, err, c.want)
			}
			_, err := ReadPageFileInfo(p)
			require.ErrorContains(t, err, c.want)
		})
	}
}

// ReadPageFileInfo checks the header and the size without reading pages.
func TestReadPageFileInfo(t *testing.T) {
	s, _ := NewStore(testLayout)
	fill(t, s, rand.New(rand.NewPCG(3, 4)), 50, 50)
	p := filepath.Join(t.TempDir(), "p.kvp")
	require.NoError(t, WritePageFile(p, s, make([]int32, 50), Fingerprint{9}))
	info, err := ReadPageFileInfo(p)
	require.NoError(t, err)
	require.Equal(t, PageFileInfo{Layout: testLayout, Pages: 4, Tokens: 50, Fingerprint: Fingerprint{9}}, info)
	st, err := os.Stat(p)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), st.Mode().Perm(), "pages hold the document's text")
	require.NoError(t, os.Truncate(p, st.Size()-1))
	_, err = ReadPageFileInfo(p)
	require.ErrorContains(t, err, "truncated or extended")
	_, err = ReadPageFileInfo(filepath.Join(t.TempDir(), "missing.kvp"))
	require.True(t, errors.Is(err, os.ErrNotExist))
}

// FuzzPageFile: any bytes give a store or an error naming the file, never a
// panic; an accepted file's counts agree with each other. Seed corpus:
// testdata/fuzz/FuzzPageFile (a valid file, the crafted header of issue 17,
// a truncated file) plus a valid file made here.
func FuzzPageFile(f *testing.F) {
	s, _ := NewStore(testLayout)
	fill(nil, s, rand.New(rand.NewPCG(1, 1)), 20, 20)
	var b bytes.Buffer
	if err := writePages(&b, s, make([]int32, 20), Fingerprint{}); err != nil {
		f.Fatal(err)
	}
	f.Add(b.Bytes())
	// A version 2 file: layer 0 windowed, its first pages left out.
	w, _ := NewStore(testLayout)
	if err := w.setWindows([]int{20, 0}); err != nil {
		f.Fatal(err)
	}
	fill(nil, w, rand.New(rand.NewPCG(1, 2)), 70, 70)
	w.TrimWindows()
	b.Reset()
	if err := writePages(&b, w, make([]int32, 70), Fingerprint{}); err != nil {
		f.Fatal(err)
	}
	f.Add(b.Bytes())
	h := goodHeader()
	h.tokens, h.pages = math.MaxUint64, 0
	f.Add(h.bytes())
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		p := filepath.Join(dir, "fuzz.kvp")
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		for _, want := range []*Layout{nil, &testLayout} {
			st, toks, info, err := ReadPageFile(p, want)
			if err != nil {
				if !strings.Contains(err.Error(), p) {
					t.Fatalf("error does not name the file: %v", err)
				}
				continue
			}
			if len(toks) != info.Tokens || st.Len() != info.Tokens || st.Pages() != info.Pages {
				t.Fatalf("accepted file disagrees: %d tokens, store of %d in %d pages, header %+v", len(toks), st.Len(), st.Pages(), info)
			}
			if err := st.checkWindows(); err != nil {
				t.Fatalf("accepted file breaks the window invariant: %v", err)
			}
		}
	})
}
