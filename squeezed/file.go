package squeezed

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
	"math"
	"os"

	"github.com/x448/float16"

	"github.com/kvrecall/kvrecall/internal/atomicfile"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/paging"
)

// The clusters file sits beside a document's page file, version 1, little
// endian, each section checksummed (CRC-32C) like the pages:
//
//	header   "KVRSQUEZ" | version u32 | layers u32 | kvHeads u32 | headDim u32 | tokens u32 | clustered u32
//	         | quantile f64 | threshold f32 | crc32c u32
//	heads    layers × kvHeads × ( K u32 | C u32 | centroids [K·headDim]f32 | sizes [K]i32 | assign [clustered]i32
//	         | coarse [C·headDim]f32 | radius [C]f32 | members [K]i32 | offsets [C+1]i32 | crc32c u32 )
const (
	fileMagic   = "KVRSQUEZ"
	FileVersion = 1
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// WriteFile writes ix to path atomically (a temporary file, synced and
// renamed): a crash leaves the old file or the new one.
func (ix *Index) WriteFile(path string) error {
	return atomicfile.WriteBytes(path, ix.Encode(), 0o644)
}

// Encode returns the file WriteFile writes (the local tier writes it with
// a document's other files, store.Local).
func (ix *Index) Encode() []byte {
	var buf bytes.Buffer
	put := func(v any) { binary.Write(&buf, binary.LittleEndian, v) }
	sum := func(from int) { put(crc32.Checksum(buf.Bytes()[from:], castagnoli)) }
	buf.WriteString(fileMagic)
	put([]uint32{FileVersion, uint32(ix.Layers), uint32(ix.KVHeads), uint32(ix.HeadDim), uint32(ix.Tokens), uint32(ix.Clustered)})
	put(ix.Quantile)
	put(ix.Threshold)
	sum(0)
	for l := 0; l < ix.Layers; l++ {
		for g := 0; g < ix.KVHeads; g++ {
			h := ix.Heads[l][g]
			from := buf.Len()
			put([]uint32{uint32(h.K()), uint32(len(h.Radius))})
			put(h.Centroids)
			put(h.Sizes)
			put(h.Assign)
			put(h.Coarse)
			put(h.Radius)
			put(h.Members)
			put(h.Offsets)
			sum(from)
		}
	}
	return buf.Bytes()
}

// ReadFile loads an index written by WriteFile, checking every checksum
// and that its shape is the expected one (layers × kvHeads × headDim, a
// document of tokens tokens). Damage is an error wrapping
// kvcache.ErrCorrupt that names the file and the section.
func ReadFile(path string, layers, kvHeads, headDim, tokens int) (*Index, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%s: %w: %s", path, kvcache.ErrCorrupt, fmt.Sprintf(format, args...))
	}
	r := bytes.NewReader(b)
	get := func(v any) error { return binary.Read(r, binary.LittleEndian, v) }
	check := func(from int, what string) error {
		end := len(b) - r.Len()
		var want uint32
		if err := get(&want); err != nil {
			return bad("%s: truncated", what)
		}
		if crc32.Checksum(b[from:end], castagnoli) != want {
			return bad("%s: checksum mismatch", what)
		}
		return nil
	}
	magic := make([]byte, len(fileMagic))
	if _, err := io.ReadFull(r, magic); err != nil || string(magic) != fileMagic {
		return nil, bad("not a clusters file")
	}
	var hdr [6]uint32
	if err := get(&hdr); err != nil {
		return nil, bad("header truncated")
	}
	if hdr[0] != FileVersion {
		return nil, fmt.Errorf("%s: clusters file version %d, this build reads version %d: ingest the document again", path, hdr[0], FileVersion)
	}
	ix := &Index{Layers: int(hdr[1]), KVHeads: int(hdr[2]), HeadDim: int(hdr[3]), Tokens: int(hdr[4]), Clustered: int(hdr[5])}
	if get(&ix.Quantile) != nil || get(&ix.Threshold) != nil {
		return nil, bad("header truncated")
	}
	if err := check(0, "header"); err != nil {
		return nil, err
	}
	if ix.Layers != layers || ix.KVHeads != kvHeads || ix.HeadDim != headDim || ix.Tokens != tokens || ix.Clustered > tokens {
		return nil, bad("clusters of %d layers × %d KV heads × %d over %d tokens, want %d × %d × %d over %d",
			ix.Layers, ix.KVHeads, ix.HeadDim, ix.Tokens, layers, kvHeads, headDim, tokens)
	}
	ix.Heads = make([][]*Head, layers)
	for l := range ix.Heads {
		ix.Heads[l] = make([]*Head, kvHeads)
		for g := range ix.Heads[l] {
			at := fmt.Sprintf("layer %d, KV head %d", l, g)
			from := len(b) - r.Len()
			var kc [2]uint32
			if get(&kc) != nil {
				return nil, bad("%s: truncated", at)
			}
			k, c, d, n := int(kc[0]), int(kc[1]), headDim, ix.Clustered
			if k < 1 || k > n || c < 1 || c > k {
				return nil, bad("%s: %d clusters, %d coarse for %d tokens", at, k, c, n)
			}
			if need := 4 * (k*d + k + n + c*d + c + k + c + 1 + 1); r.Len() < need {
				return nil, bad("%s: truncated", at)
			}
			h := &Head{D: d, Centroids: make([]float32, k*d), Sizes: make([]int32, k), Assign: make([]int32, n),
				Coarse: make([]float32, c*d), Radius: make([]float32, c), Members: make([]int32, k), Offsets: make([]int32, c+1)}
			for _, v := range []any{h.Centroids, h.Sizes, h.Assign, h.Coarse, h.Radius, h.Members, h.Offsets} {
				if err := get(v); err != nil {
					return nil, bad("%s: truncated", at)
				}
			}
			if err := check(from, at); err != nil {
				return nil, err
			}
			if err := h.check(tokens); err != nil {
				return nil, bad("%s: %v", at, err)
			}
			h.index()
			ix.Heads[l][g] = h
		}
	}
	if r.Len() != 0 {
		return nil, bad("%d bytes after the last section", r.Len())
	}
	if math.IsNaN(float64(ix.Threshold)) || ix.Threshold < 0 {
		return nil, bad("threshold %g", ix.Threshold)
	}
	return ix, nil
}

// StoreKeys reads keys from a document's host pages: the f16 keys of the
// first n tokens of one layer and KV head, as [n][headDim] float32.
func StoreKeys(s *kvcache.Store) KeySource {
	L := s.L
	return func(layer, g, n int, dst []float32) []float32 {
		d, row, P := L.HeadDim, L.Row(), L.PageSize
		if cap(dst) < n*d {
			dst = make([]float32, n*d)
		}
		dst = dst[:n*d]
		for t := 0; t < n; t++ {
			k := s.Page(layer, t/P).K[(t%P)*row+g*d:]
			for i := 0; i < d; i++ {
				dst[t*d+i] = float16.Frombits(k[i]).Float32()
			}
		}
		return dst
	}
}

// Recorder is a dense selector that keeps the roped queries of a prefill's
// last tokens (the observation window calibration needs). It asks for a
// layer's queries only in the passes that reach those tokens, so the rest
// of the prefill runs as one graph per pass.
type Recorder struct {
	paging.Selector
	layers, from int
	selects      int // Select calls in the current pass
	done         int // tokens of the passes completed
	q            [][][]float32
}

// NewRecorder records the queries of tokens from..tokens-1 of a prefill
// through a selector that attends every page: the dense method, or
// probe's ingester (a dense prefill that also builds probe's
// representatives, and so asks for every pass's queries itself).
func NewRecorder(dense paging.Selector, layers, tokens, window int) (*Recorder, error) {
	if n := dense.Name(); n != "dense" && n != "probe-ingest" {
		return nil, fmt.Errorf("squeezed: the recorder wraps the dense method or probe's ingester, not %s", n)
	}
	return &Recorder{Selector: dense, layers: layers, from: max(0, tokens-window), q: make([][][]float32, layers)}, nil
}

// NeedQueries is true in the passes that hold window tokens, and wherever
// the wrapped selector asks for queries: every layer of a pass sees the
// same start, since done moves only when the pass's last layer has
// selected.
func (r *Recorder) NeedQueries(layer int, batch int) bool {
	return r.done+batch > r.from || r.Selector.NeedQueries(layer, batch)
}

func (r *Recorder) Select(layer int, s paging.Summaries, q *paging.Queries, upto int) paging.Selection {
	if q != nil {
		pos0 := upto - len(q.Q)
		for t, row := range q.Q {
			if pos0+t >= r.from {
				r.q[layer] = append(r.q[layer], append([]float32(nil), row...))
			}
		}
	}
	if r.selects++; r.selects == r.layers {
		r.selects, r.done = 0, upto
	}
	return r.Selector.Select(layer, s, q, upto)
}

// Queries returns the recorded queries, [layer][token][heads·headDim].
func (r *Recorder) Queries() [][][]float32 { return r.q }
