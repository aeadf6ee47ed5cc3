package probe

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math"
	"os"
	"slices"

	"github.com/viterin/vek/vek32"

	"github.com/kvrecall/kvrecall/internal/atomicfile"
	"github.com/kvrecall/kvrecall/paging"
)

// Reps are a sequence's block representatives: per layer, block and KV
// head, the mean of the RepTopK keys of the block that received the most
// local attention (softmax over the Window keys before each query, summed
// over the query heads of the KV head's group and over the queries that saw
// the key), as InfLLM and ActQKV pick them.
type Reps struct {
	Layers, KVHeads, HeadDim int
	BlockSize, RepTopK       int
	Window                   int // local attention span the scores were taken over
	Blocks                   int
	// R is [Layers][Blocks][KVHeads][HeadDim].
	R []float32
	// Stats are each layer's running statistics of the query activations
	// over the sequence's windows [heads·headDim]: a session's probe
	// starts from them, so that the question's outliers stand out against
	// the document's queries rather than against the question alone.
	Stats []actStats
	// Entropy holds each layer's normalised entropies of the block scores
	// of the sequence's last windows (oldest first), as a probe would have
	// seen them while reading it: a session's cut-off starts from this
	// history instead of equal shares.
	Entropy [][]float64
}

// Rep returns the representative of block b, KV head g in layer [HeadDim].
func (r *Reps) Rep(layer, b, g int) []float32 {
	o := ((layer*r.Blocks+b)*r.KVHeads + g) * r.HeadDim
	return r.R[o : o+r.HeadDim]
}

// Matches reports, as an error naming the setting, whether r was computed
// with the given block size, representative count and window.
func (r *Reps) Matches(blockSize, repTopK, window int) error {
	switch {
	case r.BlockSize != blockSize:
		return fmt.Errorf("probe: representatives were computed with block_size %d, not %d", r.BlockSize, blockSize)
	case r.RepTopK != repTopK:
		return fmt.Errorf("probe: representatives were computed with repr_topk %d, not %d", r.RepTopK, repTopK)
	case r.Window != window:
		return fmt.Errorf("probe: representatives were computed with a local window of %d, not %d", r.Window, window)
	}
	return nil
}

// Builder accumulates the local attention each key receives and turns it
// into block representatives. Feed it every forward pass's queries in
// order (Add); it reads keys through a paging.KeyReader. Each key's score
// is the sum, over the queries at most Window-1 positions after it and over
// the query heads of its KV group, of softmax(q·k/sqrt(headDim)) taken over
// that query's Window most recent keys.
type Builder struct {
	layers, kvh, hd, block, topk, window int
	base                                 int // first position scored
	scale                                float32
	// score[layer][g][pos-base]: local attention received.
	score [][][]float32
	exc   int        // window of queries per statistics update
	stats []actStats // per layer
	// Probes of the last windows, per layer, for the entropy history
	// (kept when SetHistory was called).
	hist   int
	layout paging.Config
	probes [][]windowProbe
	w      []float32
	// Scratch, reused across calls: keys [kvh][span][hd], logits [span].
	keys   []float32
	logits []float32
}

// NewBuilder returns a builder for positions from base on. It also keeps
// each layer's query statistics, updated once per window of exc queries.
func NewBuilder(layers, kvHeads, headDim, blockSize, repTopK, window, exc, base int) *Builder {
	b := &Builder{layers: layers, kvh: kvHeads, hd: headDim, block: blockSize, topk: repTopK, window: window, base: base,
		exc: exc, stats: make([]actStats, layers), scale: float32(1 / math.Sqrt(float64(headDim)))}
	b.score = make([][][]float32, layers)
	for l := range b.score {
		b.score[l] = make([][]float32, kvHeads)
	}
	return b
}

// Add scores the keys that the batch q (positions pos0, pos0+1, ...)
// attends to locally in layer. The keys up to the batch's last position
// must be readable from k.
func (b *Builder) Add(layer int, k paging.KeyReader, q *paging.Queries, pos0 int) {
	n := len(q.Q)
	if n == 0 {
		return
	}
	for i := 0; i < n; i += b.exc {
		win := q.Q[i:min(n, i+b.exc)]
		b.stats[layer].update(win, DefaultStatCap)
		if b.hist > 0 {
			b.w = b.stats[layer].weights(b.w, win)
			vec := make([]float32, len(win[0]))
			for t, row := range win {
				for c, v := range row {
					vec[c] += b.w[t] * v
				}
			}
			ps := append(b.probes[layer], windowProbe{vec: vec, upto: pos0 + i + len(win), heads: q.Heads})
			if len(ps) > b.hist {
				ps = ps[len(ps)-b.hist:]
			}
			b.probes[layer] = ps
		}
	}
	hd, kvh := b.hd, b.kvh
	group := q.Heads / kvh
	lo := max(b.base, pos0-b.window+1) // first key any query of the batch sees
	end := pos0 + n
	span := end - lo
	if need := kvh * span * hd; cap(b.keys) < need {
		b.keys = make([]float32, need)
	}
	keys := b.keys[:kvh*span*hd]
	for g := 0; g < kvh; g++ {
		for p := lo; p < end; p++ {
			k.Key(p, g, keys[(g*span+p-lo)*hd:][:hd])
		}
	}
	for g := 0; g < kvh; g++ {
		sc := b.score[layer][g]
		if len(sc) < end-b.base {
			sc = append(sc, make([]float32, end-b.base-len(sc))...)
			b.score[layer][g] = sc
		}
	}
	if cap(b.logits) < b.window {
		b.logits = make([]float32, b.window)
	}
	for t := 0; t < n; t++ {
		pos := pos0 + t
		first := max(b.base, pos-b.window+1)
		w := pos - first + 1
		lg := b.logits[:w]
		for h := 0; h < q.Heads; h++ {
			g := h / group
			qh := q.Q[t][h*hd : (h+1)*hd]
			kg := keys[(g*span+first-lo)*hd:]
			for j := range lg {
				lg[j] = vek32.Dot(qh, kg[j*hd:(j+1)*hd]) * b.scale
			}
			softmax(lg)
			vek32.Add_Inplace(b.score[layer][g][first-b.base:pos-b.base+1], lg)
		}
	}
}

// windowProbe is the probe query of one window of a layer: the
// activation-weighted sum of its queries [heads·headDim], and the sequence
// length at its end.
type windowProbe struct {
	vec         []float32
	upto, heads int
}

// SetHistory makes the builder keep the probe queries of the last history
// windows of every layer, so that Reps can fill Entropy; c gives the page
// size, sinks and window that decide which blocks a probe ranks.
func (b *Builder) SetHistory(c paging.Config, history int) {
	b.hist, b.layout = history, c
	b.probes = make([][]windowProbe, b.layers)
}

// softmax normalises x in place.
func softmax(x []float32) {
	m := vek32.Max(x)
	var s float32
	for i, v := range x {
		e := float32(math.Exp(float64(v - m)))
		x[i] = e
		s += e
	}
	vek32.DivNumber_Inplace(x, s)
}

// Reps returns the representatives of the blocks of positions [0, upto),
// the last block possibly partial, reading keys from keys(layer). Blocks
// before the builder's base are not its to build: it covers
// [base/block, ...) and base must be a block boundary.
func (b *Builder) Reps(upto int, keys func(layer int) paging.KeyReader) (*Reps, error) {
	if b.base%b.block != 0 {
		return nil, fmt.Errorf("probe: builder base %d is not a block boundary", b.base)
	}
	first := b.base / b.block
	nb := (upto + b.block - 1) / b.block
	r := &Reps{Layers: b.layers, KVHeads: b.kvh, HeadDim: b.hd, BlockSize: b.block, RepTopK: b.topk, Window: b.window,
		Blocks: nb - first}
	r.R = make([]float32, b.layers*r.Blocks*b.kvh*b.hd)
	for _, st := range b.stats {
		r.Stats = append(r.Stats, st.clone())
	}

	key := make([]float32, b.hd)
	idx := make([]int, 0, b.block)
	for l := 0; l < b.layers; l++ {
		kr := keys(l)
		for blk := first; blk < nb; blk++ {
			lo, hi := blk*b.block, min(upto, (blk+1)*b.block)
			for g := 0; g < b.kvh; g++ {
				sc := b.score[l][g]
				idx = topScores(idx[:0], sc, lo-b.base, hi-b.base, b.topk)
				dst := r.Rep(l, blk-first, g)
				for _, i := range idx {
					kr.Key(b.base+i, g, key)
					vek32.Add_Inplace(dst, key)
				}
				vek32.MulNumber_Inplace(dst, 1/float32(len(idx)))
			}
		}
	}
	return r, nil
}

// AddEntropies fills r.Entropy from the probes the builder kept
// (SetHistory), for representatives of a whole sequence (base 0).
func (b *Builder) AddEntropies(r *Reps) {
	if b.hist > 0 && b.base == 0 {
		r.Entropy = b.entropies(r)
	}
}

// entropies scores, for each kept window probe, the blocks a probe at the
// window's end would rank (those with a page outside sinks and window), and
// returns the normalised entropies per layer.
func (b *Builder) entropies(r *Reps) [][]float64 {
	out := make([][]float64, b.layers)
	var scores []float32
	for l, ps := range b.probes {
		for _, p := range ps {
			req, _ := b.layout.Required(p.upto)
			scores = scores[:0]
			for blk := 0; blk < r.Blocks && (blk+1)*b.block <= p.upto; blk++ {
				if blockInPages(blk, b.block/b.layout.PageSize, req) {
					continue
				}
				scores = append(scores, blockCosine(p.vec, norm(p.vec), r, l, blk, p.heads))
			}
			out[l] = append(out[l], NormEntropy(scores))
		}
	}
	return out
}

// blockInPages reports whether every page of block blk (pp pages) is in
// the sorted list pages.
func blockInPages(blk, pp int, pages []int) bool {
	for pg := blk * pp; pg < (blk+1)*pp; pg++ {
		if _, ok := slices.BinarySearch(pages, pg); !ok {
			return false
		}
	}
	return true
}

// blockCosine is the cosine between a probe [heads·headDim] (norm pn) and
// block blk's representatives of layer, each query head against its KV
// head's.
func blockCosine(probe []float32, pn float32, r *Reps, layer, blk, heads int) float32 {
	hd, kvh := r.HeadDim, r.KVHeads
	group := heads / kvh
	var dot, rn float32
	for g := 0; g < kvh; g++ {
		rep := r.Rep(layer, blk, g)
		rn += float32(group) * vek32.Dot(rep, rep)
		for h := g * group; h < (g+1)*group; h++ {
			dot += vek32.Dot(probe[h*hd:(h+1)*hd], rep)
		}
	}
	return cosine(dot, pn, rn)
}

// topScores appends to idx the positions in [lo, hi) with the k largest
// scores (ties: lower position first); positions past len(sc) score 0.
func topScores(idx []int, sc []float32, lo, hi, k int) []int {
	at := func(i int) float32 {
		if i < len(sc) {
			return sc[i]
		}
		return 0
	}
	for i := lo; i < hi; i++ {
		// Insertion into a list of at most k (k is a handful).
		j := len(idx)
		if j == k {
			if at(i) <= at(idx[k-1]) {
				continue
			}
			j--
			idx = idx[:j]
		}
		idx = append(idx, i)
		for ; j > 0 && at(idx[j-1]) < at(i); j-- {
			idx[j] = idx[j-1]
		}
		idx[j] = i
	}
	return idx
}

// Representatives file, version 1 (little endian): a document's block
// representatives, written next to its page file.
//
//	header  magic "KVRPROBE", version u32, layers u32, kvHeads u32, headDim u32,
//	        blockSize u32, repTopK u32, window u32, blocks u32, tokens u64,
//	        fingerprint [32]byte, crc32c u32 of the header so far
//	        channels u32 (query heads·headDim of the statistics), history u32
//	layers  layers x ( [blocks][kvHeads][headDim]f32, windows u32,
//	        mean [channels]f64, variance [channels]f64,
//	        entropies u32, [history]f64 (the first entropies used), crc32c u32 )
const (
	repsMagic   = "KVRPROBE"
	repsVersion = 1
	repsHeader  = 8 + 4*10 + 8 + 32 + 4
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrCorrupt is wrapped by every error about a representatives file's content.
var ErrCorrupt = errors.New("corrupt representatives file")

// ErrStale is wrapped by the error for a representatives file of another
// document or model: they are to be computed again.
var ErrStale = errors.New("representatives of another document")

// WriteFile stores r for a document of tokens tokens and model fingerprint fp.
func (r *Reps) WriteFile(path string, tokens int, fp [32]byte) error {
	var h bytes.Buffer
	h.WriteString(repsMagic)
	ch := r.channels()
	if len(r.Stats) != r.Layers {
		return fmt.Errorf("probe: representatives hold statistics for %d of %d layers", len(r.Stats), r.Layers)
	}
	for _, v := range []int{repsVersion, r.Layers, r.KVHeads, r.HeadDim, r.BlockSize, r.RepTopK, r.Window, r.Blocks} {
		binary.Write(&h, binary.LittleEndian, uint32(v))
	}
	binary.Write(&h, binary.LittleEndian, uint64(tokens))
	h.Write(fp[:])
	hl := r.historyLen()
	binary.Write(&h, binary.LittleEndian, uint32(ch))
	binary.Write(&h, binary.LittleEndian, uint32(hl))
	binary.Write(&h, binary.LittleEndian, crc32.Checksum(h.Bytes(), castagnoli))
	per := r.Blocks * r.KVHeads * r.HeadDim
	for l := 0; l < r.Layers; l++ {
		b := make([]byte, 0, r.layerRecord(ch, hl))
		for _, v := range r.R[l*per : (l+1)*per] {
			b = binary.LittleEndian.AppendUint32(b, math.Float32bits(v))
		}
		st := r.Stats[l]
		b = binary.LittleEndian.AppendUint32(b, uint32(st.Count))
		for i := 0; i < ch; i++ {
			b = binary.LittleEndian.AppendUint64(b, math.Float64bits(at(st.mean, i)))
		}
		for i := 0; i < ch; i++ {
			b = binary.LittleEndian.AppendUint64(b, math.Float64bits(at(st.vars, i)))
		}
		var ent []float64
		if l < len(r.Entropy) {
			ent = r.Entropy[l]
		}
		b = binary.LittleEndian.AppendUint32(b, uint32(len(ent)))
		for i := 0; i < hl; i++ {
			b = binary.LittleEndian.AppendUint64(b, math.Float64bits(at(ent, i)))
		}
		b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
		h.Write(b)
	}
	return atomicfile.WriteBytes(path, h.Bytes(), 0o644)
}

func at(x []float64, i int) float64 {
	if i < len(x) {
		return x[i]
	}
	return 0
}

// channels is the width of the statistics (0 if none were kept).
func (r *Reps) channels() int {
	for _, st := range r.Stats {
		if len(st.mean) > 0 {
			return len(st.mean)
		}
	}
	return 0
}

func (r *Reps) historyLen() int {
	n := 0
	for _, e := range r.Entropy {
		n = max(n, len(e))
	}
	return n
}

func (r *Reps) layerRecord(ch, hl int) int {
	return 4*r.Blocks*r.KVHeads*r.HeadDim + 4 + 16*ch + 4 + 8*hl + 4
}

// ReadFile loads representatives written by WriteFile and checks them
// against the document (tokens, fingerprint) and the model's shape.
func ReadFile(path string, tokens int, fp [32]byte, layers, kvHeads, headDim int) (*Reps, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if len(b) < repsHeader || string(b[:8]) != repsMagic {
		return nil, fmt.Errorf("%s: %w: not a representatives file", path, ErrCorrupt)
	}
	u := func(i int) int { return int(binary.LittleEndian.Uint32(b[8+4*i:])) }
	if v := u(0); v != repsVersion {
		return nil, fmt.Errorf("%s: representatives file version %d; this build reads version %d (ask again to recompute them)", path, v, repsVersion)
	}
	if binary.LittleEndian.Uint32(b[repsHeader-4:]) != crc32.Checksum(b[:repsHeader-4], castagnoli) {
		return nil, fmt.Errorf("%s: %w: header checksum", path, ErrCorrupt)
	}
	r := &Reps{Layers: u(1), KVHeads: u(2), HeadDim: u(3), BlockSize: u(4), RepTopK: u(5), Window: u(6), Blocks: u(7)}
	if r.Layers != layers || r.KVHeads != kvHeads || r.HeadDim != headDim {
		return nil, fmt.Errorf("%s: representatives for %d layers × %d KV heads × %d, the model has %d × %d × %d", path, r.Layers, r.KVHeads, r.HeadDim, layers, kvHeads, headDim)
	}
	if n := int(binary.LittleEndian.Uint64(b[8+4*8:])); n != tokens || !bytes.Equal(b[8+4*8+8:][:32], fp[:]) {
		return nil, fmt.Errorf("%s: %w (%d tokens)", path, ErrStale, n)
	}
	if r.BlockSize <= 0 || r.Blocks != (tokens+r.BlockSize-1)/r.BlockSize {
		return nil, fmt.Errorf("%s: %w: %d blocks of %d for %d tokens", path, ErrCorrupt, r.Blocks, r.BlockSize, tokens)
	}
	per := r.Blocks * r.KVHeads * r.HeadDim
	ch := int(binary.LittleEndian.Uint32(b[repsHeader-12:]))
	hl := int(binary.LittleEndian.Uint32(b[repsHeader-8:]))
	if ch > 1<<24 || hl > 1<<20 {
		return nil, fmt.Errorf("%s: %w: %d channels, %d entropies", path, ErrCorrupt, ch, hl)
	}
	size := r.layerRecord(ch, hl)
	if len(b) != repsHeader+r.Layers*size {
		return nil, fmt.Errorf("%s: %w: %d bytes, want %d", path, ErrCorrupt, len(b), repsHeader+r.Layers*size)
	}
	r.R = make([]float32, r.Layers*per)
	for l := 0; l < r.Layers; l++ {
		rec := b[repsHeader+l*size:][:size]
		if binary.LittleEndian.Uint32(rec[size-4:]) != crc32.Checksum(rec[:size-4], castagnoli) {
			return nil, fmt.Errorf("%s: %w: layer %d checksum", path, ErrCorrupt, l)
		}
		for i := 0; i < per; i++ {
			r.R[l*per+i] = math.Float32frombits(binary.LittleEndian.Uint32(rec[4*i:]))
		}
		o := 4 * per
		st := actStats{Count: int(binary.LittleEndian.Uint32(rec[o:])), mean: make([]float64, ch), vars: make([]float64, ch)}
		o += 4
		for i := range st.mean {
			st.mean[i] = math.Float64frombits(binary.LittleEndian.Uint64(rec[o+8*i:]))
			st.vars[i] = math.Float64frombits(binary.LittleEndian.Uint64(rec[o+8*(ch+i):]))
		}
		if st.Count == 0 {
			st = actStats{}
		}
		r.Stats = append(r.Stats, st)
		o += 16 * ch
		ne := int(binary.LittleEndian.Uint32(rec[o:]))
		if ne > hl {
			return nil, fmt.Errorf("%s: %w: layer %d has %d of %d entropies", path, ErrCorrupt, l, ne, hl)
		}
		ent := make([]float64, ne)
		for i := range ent {
			ent[i] = math.Float64frombits(binary.LittleEndian.Uint64(rec[o+4+8*i:]))
		}
		r.Entropy = append(r.Entropy, ent)
	}
	return r, nil
}
