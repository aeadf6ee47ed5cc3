package kvcache

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math"
	"math/bits"
	"os"

	"github.com/kvrecall/kvrecall/internal/atomicfile"
)

// Page file format, version 1 (little endian). A document's pages and their
// summaries, with a checksum per page so that corruption is found and
// reported, never used:
//
//	header   magic "KVRPAGES", version u32, layers u32, kvHeads u32, headDim u32,
//	         pageSize u32, reps u32, pages u32, tokens u64, fingerprint [32]byte,
//	         crc32c u32 of the header so far
//	tokens   tokens x int32, crc32c u32
//	pages    pages x record; a record holds, for each layer:
//	           n u32, K [pageSize][row]u16 (token-major), V [row][pageSize]u16 (channel-major),
//	           sum, mean, min, max [row]f32, nreps u32, repKeys [kvHeads*reps*headDim]f32
//	         followed by the record's crc32c u32
//
// Records have a fixed size, so a truncated file is detected from its size.
// Files are written to a temporary name, synced and renamed.
//
// Version 2 is written for a store with sliding-window layers (gemma's
// local layers), whose pages before their window are dropped (Store). Its
// header adds, before the checksum:
//
//	from u64 (the lowest position the document resumes at), windows [layers]u32
//
// and a page's record holds only the layers that keep the page: layer l is
// in record p iff p >= max(0, from-windows[l])/pageSize for windows[l] > 0
// (always for a global layer, windows[l] = 0). So the size is still known
// from the header alone. Version 1 is written when no layer is windowed:
// such files are byte for byte what earlier builds wrote, and both
// versions are read.
const (
	pageFileMagic   = "KVRPAGES"
	pageFileVersion = 1
	// pageFileWindowed is the version with sliding-window layers.
	pageFileWindowed = 2
	headerSize       = 8 + 4*7 + 8 + 32 + 4
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrCorrupt is wrapped by every error about a page file's content.
var ErrCorrupt = errors.New("corrupt page file")

// Fingerprint identifies the model a page file belongs to.
type Fingerprint [32]byte

func (l Layout) layerRecordSize() int {
	r := l.Row()
	return 4 + 2*2*l.PageSize*r + 4*4*r + 4 + 4*l.KVHeads*Reps*l.HeadDim
}

func (l Layout) recordSize() int { return l.Layers*l.layerRecordSize() + 4 }

// WritePageFile stores the store's pages and the document's tokens at path.
func WritePageFile(path string, s *Store, tokens []int32, fp Fingerprint) error {
	if len(tokens) != s.Len() {
		return fmt.Errorf("kvcache: %d tokens for a store of %d", len(tokens), s.Len())
	}
	// 0600: the pages encode the document's text.
	return atomicfile.Write(path, 0o600, func(f *os.File) error {
		w := bufio.NewWriterSize(f, 1<<20)
		if err := writePages(w, s, tokens, fp); err != nil {
			return err
		}
		return w.Flush()
	})
}

// WritePages streams the page file of the store's pages and the document's
// tokens to w (what WritePageFile writes; a document tier that writes it
// atomically calls this, store.Local).
func WritePages(w io.Writer, s *Store, tokens []int32, fp Fingerprint) error {
	if len(tokens) != s.Len() {
		return fmt.Errorf("kvcache: %d tokens for a store of %d", len(tokens), s.Len())
	}
	return writePages(w, s, tokens, fp)
}

func writePages(w io.Writer, s *Store, tokens []int32, fp Fingerprint) error {
	l := s.L
	version := uint32(pageFileVersion)
	if s.windowed() {
		version = pageFileWindowed
	}
	var h bytes.Buffer
	h.WriteString(pageFileMagic)
	for _, v := range []uint32{version, uint32(l.Layers), uint32(l.KVHeads), uint32(l.HeadDim), uint32(l.PageSize), Reps, uint32(s.Pages())} {
		binary.Write(&h, binary.LittleEndian, v)
	}
	binary.Write(&h, binary.LittleEndian, uint64(len(tokens)))
	h.Write(fp[:])
	if version == pageFileWindowed {
		binary.Write(&h, binary.LittleEndian, uint64(s.from))
		for _, w := range s.window {
			binary.Write(&h, binary.LittleEndian, uint32(w))
		}
	}
	binary.Write(&h, binary.LittleEndian, crc32.Checksum(h.Bytes(), castagnoli))
	if _, err := w.Write(h.Bytes()); err != nil {
		return err
	}
	tb := make([]byte, 4*len(tokens)+4)
	for i, t := range tokens {
		binary.LittleEndian.PutUint32(tb[4*i:], uint32(t))
	}
	binary.LittleEndian.PutUint32(tb[4*len(tokens):], crc32.Checksum(tb[:4*len(tokens)], castagnoli))
	if _, err := w.Write(tb); err != nil {
		return err
	}
	rec := make([]byte, 0, l.recordSize())
	for p := 0; p < s.Pages(); p++ {
		rec = rec[:0]
		for layer := 0; layer < l.Layers; layer++ {
			if p >= s.first[layer] { // a windowed layer's dropped pages are not written
				rec = appendPage(rec, l, s.pages[layer][p])
			}
		}
		rec = binary.LittleEndian.AppendUint32(rec, crc32.Checksum(rec, castagnoli))
		if _, err := w.Write(rec); err != nil {
			return err
		}
	}
	return nil
}

func appendPage(b []byte, l Layout, pg *Page) []byte {
	b = binary.LittleEndian.AppendUint32(b, uint32(pg.N))
	b = append(b, u16bytes(pg.K)...)
	b = append(b, u16bytes(pg.V)...)
	for _, v := range [][]float32{pg.Sum, pg.Mean, pg.Min, pg.Max} {
		b = appendF32(b, v)
	}
	b = binary.LittleEndian.AppendUint32(b, uint32(pg.NReps))
	reps := pg.RepKeys
	if len(reps) == 0 {
		reps = make([]float32, l.KVHeads*Reps*l.HeadDim)
	}
	return appendF32(b, reps)
}

func appendF32(b []byte, v []float32) []byte {
	for _, x := range v {
		b = binary.LittleEndian.AppendUint32(b, math.Float32bits(x))
	}
	return b
}

// PageFileInfo is a page file's header.
type PageFileInfo struct {
	Layout      Layout
	Pages       int
	Tokens      int
	Fingerprint Fingerprint
	// Windows is each layer's sliding window (nil: version 1, no windowed
	// layer); From is the lowest position the document resumes at (see
	// Store). Layer l holds pages from max(0, From-Windows[l])/PageSize on.
	Windows []int
	From    int
}

// firstPage is the first page layer l holds in the file.
func (info PageFileInfo) firstPage(l int) int {
	if info.Windows == nil || info.Windows[l] == 0 {
		return 0
	}
	return max(0, info.From-info.Windows[l]) / info.Layout.PageSize
}

func corrupt(path, format string, args ...any) error {
	return fmt.Errorf("%s: %w: %s", path, ErrCorrupt, fmt.Sprintf(format, args...))
}

// Limits on what a page file's header may claim, checked before anything is
// allocated from it. No model comes close to the layout limits; together they
// keep every size computed from a header far from overflowing an int64.
const (
	maxLayoutDim   = 1 << 12 // layers, KV heads, head dimension
	maxRow         = 1 << 16 // KV heads x head dimension (128 heads of 512)
	maxFileTokens  = 1<<31 - 1
	maxFileRecords = maxFileTokens/16 + 1
)

// ReadPageFileInfo reads and checks a page file's header and its size
// against what the header implies, without reading the pages: a cheap test
// that the file is there and whole (page checksums are checked on load).
func ReadPageFileInfo(path string) (PageFileInfo, error) {
	f, err := os.Open(path)
	if err != nil {
		return PageFileInfo{}, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return PageFileInfo{}, err
	}
	return readHeader(f, path, st.Size())
}

// readHeader parses and bounds a header. Every count from the file is
// checked as an unsigned number before it is converted or multiplied, so a
// crafted header gives an error, never a negative length or a panic.
func readHeader(r io.Reader, path string, fileSize int64) (PageFileInfo, error) {
	var info PageFileInfo
	h := make([]byte, headerSize)
	if _, err := io.ReadFull(r, h); err != nil {
		return info, corrupt(path, "truncated header (%d bytes)", fileSize)
	}
	if string(h[:8]) != pageFileMagic {
		return info, corrupt(path, "not a kvrecall page file")
	}
	u := func(i int) uint32 { return binary.LittleEndian.Uint32(h[8+4*i:]) }
	version := u(0)
	if version != pageFileVersion && version != pageFileWindowed {
		// Checked before the checksum: a version 2 checksum sits further on.
		if got, want := binary.LittleEndian.Uint32(h[headerSize-4:]), crc32.Checksum(h[:headerSize-4], castagnoli); got != want {
			return info, corrupt(path, "header checksum mismatch")
		}
		return info, fmt.Errorf("%s: page file version %d is not supported (this build reads %d and %d)", path, version, pageFileVersion, pageFileWindowed)
	}
	var ext []byte // version 2: from u64, windows [layers]u32
	if version == pageFileWindowed {
		// The layer count sizes the rest of the header: bounded before
		// the checksum that covers it can be read.
		if v := u(1); v > maxLayoutDim {
			return info, corrupt(path, "%d layers (at most %d)", v, maxLayoutDim)
		}
		ext = make([]byte, 8+4*int(u(1)))
		copy(ext, h[headerSize-4:])
		if _, err := io.ReadFull(r, ext[4:]); err != nil {
			return info, corrupt(path, "truncated header (%d bytes)", fileSize)
		}
		crc := make([]byte, 4)
		if _, err := io.ReadFull(r, crc); err != nil {
			return info, corrupt(path, "truncated header (%d bytes)", fileSize)
		}
		body := append(h[:headerSize-4:headerSize-4], ext...)
		if binary.LittleEndian.Uint32(crc) != crc32.Checksum(body, castagnoli) {
			return info, corrupt(path, "header checksum mismatch")
		}
	} else if got, want := binary.LittleEndian.Uint32(h[headerSize-4:]), crc32.Checksum(h[:headerSize-4], castagnoli); got != want {
		return info, corrupt(path, "header checksum mismatch")
	}
	for i, name := range []string{"layers", "KV heads", "head dimension"} {
		if v := u(1 + i); v > maxLayoutDim {
			return info, corrupt(path, "%d %s (at most %d)", v, name, maxLayoutDim)
		}
	}
	// A store allocates a row of scratch even when empty: an 88-byte file
	// must not cost 64 MB.
	if row := uint64(u(2)) * uint64(u(3)); row > maxRow {
		return info, corrupt(path, "%d KV heads of %d channels (at most %d channels)", u(2), u(3), maxRow)
	}
	if v := u(4); v > 256 {
		return info, corrupt(path, "page size %d outside 16..256", v)
	}
	l := Layout{Layers: int(u(1)), KVHeads: int(u(2)), HeadDim: int(u(3)), PageSize: int(u(4))}
	if err := l.Check(); err != nil {
		return info, corrupt(path, "%v", err)
	}
	if u(5) != Reps {
		return info, corrupt(path, "%d representative keys per page, this build keeps %d", u(5), Reps)
	}
	pages, tokens := uint64(u(6)), binary.LittleEndian.Uint64(h[8+4*7:])
	if tokens > maxFileTokens || pages > maxFileRecords {
		return info, corrupt(path, "%d tokens in %d pages is beyond this build's limits", tokens, pages)
	}
	P := uint64(l.PageSize)
	if want := tokens/P + (tokens%P+P-1)/P; pages != want {
		return info, corrupt(path, "%d pages cannot hold %d tokens", pages, tokens)
	}
	// The limits above keep this product under 2^62; it is computed in 128
	// bits anyway so that raising a limit cannot make it wrap.
	hi, records := bits.Mul64(pages, uint64(l.recordSize()))
	if hi != 0 || records > math.MaxInt64 {
		return info, corrupt(path, "%d pages of %d bytes overflow a file size", pages, l.recordSize())
	}
	info.Layout, info.Pages, info.Tokens = l, int(pages), int(tokens)
	size := uint64(headerSize) + 4*tokens + 4 + records // < 2^63 + 2^34
	if ext != nil {
		from := binary.LittleEndian.Uint64(ext)
		if from > tokens {
			return info, corrupt(path, "resumes from position %d of %d tokens", from, tokens)
		}
		info.From, info.Windows = int(from), make([]int, l.Layers)
		for i := range info.Windows {
			w := binary.LittleEndian.Uint32(ext[8+4*i:])
			if w > maxFileTokens {
				return info, corrupt(path, "layer %d: sliding window of %d tokens", i, w)
			}
			info.Windows[i] = int(w)
		}
		// Dropped layer records shrink the file: at most records, so no
		// overflow. A windowed layer keeps its last page (from <= tokens).
		size += uint64(len(ext))
		for i := range info.Windows {
			size -= uint64(info.firstPage(i)) * uint64(l.layerRecordSize())
		}
	}
	if fileSize < 0 || uint64(fileSize) != size {
		return info, corrupt(path, "size %d bytes, the header implies %d (truncated or extended)", fileSize, size)
	}
	copy(info.Fingerprint[:], h[8+4*7+8:])
	return info, nil
}

// ReadPageFile loads a page file written by WritePageFile, verifying its
// size and every checksum. want, if not nil, must match its layout.
func ReadPageFile(path string, want *Layout) (*Store, []int32, PageFileInfo, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, PageFileInfo{}, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, nil, PageFileInfo{}, err
	}
	r := bufio.NewReaderSize(f, int(min(st.Size(), 1<<20))) // small files, small buffer
	info, err := readHeader(r, path, st.Size())
	if err != nil {
		return nil, nil, info, err
	}
	l, P := info.Layout, info.Layout.PageSize
	if want != nil && *want != l {
		return nil, nil, info, fmt.Errorf("%s: page layout %+v does not match the model's %+v", path, l, *want)
	}
	tb := make([]byte, 4*info.Tokens+4)
	if _, err := io.ReadFull(r, tb); err != nil {
		return nil, nil, info, corrupt(path, "reading tokens: %v", err)
	}
	if binary.LittleEndian.Uint32(tb[4*info.Tokens:]) != crc32.Checksum(tb[:4*info.Tokens], castagnoli) {
		return nil, nil, info, corrupt(path, "token checksum mismatch")
	}
	tokens := make([]int32, info.Tokens)
	for i := range tokens {
		tokens[i] = int32(binary.LittleEndian.Uint32(tb[4*i:]))
	}
	s, _ := NewStore(l)
	if info.Windows != nil {
		copy(s.window, info.Windows)
		s.from = info.From
		for layer := range s.first {
			s.first[layer] = info.firstPage(layer)
		}
	}
	rec := make([]byte, l.recordSize())
	for p := 0; p < info.Pages; p++ {
		held := 0 // the layers whose page p is in the file
		for layer := range s.first {
			if p >= s.first[layer] {
				held++
			}
		}
		rec := rec[:held*l.layerRecordSize()+4]
		if _, err := io.ReadFull(r, rec); err != nil {
			return nil, nil, info, corrupt(path, "reading page %d: %v", p, err)
		}
		body := rec[:len(rec)-4]
		if binary.LittleEndian.Uint32(rec[len(rec)-4:]) != crc32.Checksum(body, castagnoli) {
			return nil, nil, info, corrupt(path, "page %d checksum mismatch", p)
		}
		at := 0
		for layer := 0; layer < l.Layers; layer++ {
			if p < s.first[layer] {
				s.pages[layer] = append(s.pages[layer], nil) // out of the layer's window
				continue
			}
			pg, err := parsePage(body[at*l.layerRecordSize():(at+1)*l.layerRecordSize()], l)
			at++
			if err != nil {
				return nil, nil, info, corrupt(path, "page %d layer %d: %v", p, layer, err)
			}
			want := min(P, info.Tokens-p*P)
			if pg.N != want {
				return nil, nil, info, corrupt(path, "page %d layer %d holds %d tokens, want %d", p, layer, pg.N, want)
			}
			s.pages[layer] = append(s.pages[layer], pg)
		}
		s.shared = append(s.shared, false)
	}
	s.n = info.Tokens
	return s, tokens, info, nil
}

func parsePage(b []byte, l Layout) (*Page, error) {
	r := l.Row()
	pg := newPage(l)
	pg.N = int(binary.LittleEndian.Uint32(b))
	if pg.N < 0 || pg.N > l.PageSize {
		return nil, fmt.Errorf("%d tokens in a page of %d", pg.N, l.PageSize)
	}
	o := 4
	n := l.PageSize * r
	copy(u16bytes(pg.K), b[o:o+2*n])
	o += 2 * n
	copy(u16bytes(pg.V), b[o:o+2*n])
	o += 2 * n
	for _, v := range [][]float32{pg.Sum, pg.Mean, pg.Min, pg.Max} {
		for i := range v {
			v[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[o:]))
			o += 4
		}
	}
	for i := range pg.Center {
		pg.Center[i] = (pg.Max[i] + pg.Min[i]) / 2
		pg.Radius[i] = (pg.Max[i] - pg.Min[i]) / 2
	}
	pg.gen = pageGen.Add(1)
	pg.NReps = int(binary.LittleEndian.Uint32(b[o:]))
	o += 4
	if pg.NReps < 0 || pg.NReps > Reps {
		return nil, fmt.Errorf("%d representative keys", pg.NReps)
	}
	if pg.NReps > 0 {
		pg.RepKeys = make([]float32, l.KVHeads*Reps*l.HeadDim)
		for i := range pg.RepKeys {
			pg.RepKeys[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[o:]))
			o += 4
		}
	}
	return pg, nil
}
