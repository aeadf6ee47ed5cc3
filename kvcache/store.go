// Package kvcache is kvrecall's paged KV cache. Keys and values live in pages
// of PageSize tokens per layer, in three tiers:
//
//   - device: per layer, a pool of page slots in backend memory that
//     attention reads (views of whole slots), bounded by the policy's budget;
//   - host: every page of the sequence in RAM as f16, with summaries (mean,
//     per-channel min and max, representative keys) kept up to date as
//     tokens are written;
//   - disk: documents in a versioned, checksummed page file (pagefile.go).
//
// Paged implements ollama's kvcache.Cache and arch.Hooks, so the forward
// pass can hand it a layer's queries before that layer's attention; a
// paging.Policy chooses the pages, and the residency manager brings them
// into the device pool (LRU).
package kvcache

import (
	"cmp"
	"fmt"
	"math"
	"slices"
	"sync/atomic"
	"unsafe"

	"github.com/viterin/vek/vek32"
	"github.com/x448/float16"

	"github.com/kvrecall/kvrecall/paging"
)

// Layout is the geometry of a model's paged KV cache.
type Layout struct {
	Layers   int
	KVHeads  int
	HeadDim  int
	PageSize int
}

// Row is the number of elements of one token's keys (or values) in one layer.
func (l Layout) Row() int { return l.KVHeads * l.HeadDim }

// PageBytes is the host size of one page of one layer (keys and values, f16).
func (l Layout) PageBytes() int { return 2 * 2 * l.PageSize * l.Row() }

// Check validates the layout.
func (l Layout) Check() error {
	if l.Layers <= 0 || l.KVHeads <= 0 || l.HeadDim <= 0 {
		return fmt.Errorf("kvcache: invalid layout %+v", l)
	}
	if l.PageSize < 16 || l.PageSize > 256 {
		return fmt.Errorf("kvcache: page size %d outside 16..256", l.PageSize)
	}
	return nil
}

// Reps is the number of representative keys kept per closed page and KV head.
const Reps = 4

// Page is one layer's keys and values for PageSize consecutive positions.
// Keys are token-major, the layout of the device pool's K; values are
// channel-major, the layout of the pool's permuted V, so that uploading a
// page is a few row copies.
type Page struct {
	K []uint16 // f16, [PageSize][KVHeads*HeadDim]
	V []uint16 // f16, [KVHeads*HeadDim][PageSize]
	N int      // tokens written

	// Summary of the keys written so far, per KV head and channel.
	Sum, Mean, Min, Max []float32 // [KVHeads*HeadDim]
	// Center (max+min)/2 and Radius (max-min)/2 of the key box, kept with
	// Min and Max: Quest's bound is then q·center + |q|·radius.
	Center, Radius []float32
	// Representative keys, [KVHeads][Reps][HeadDim]; set when the page closes.
	RepKeys []float32
	NReps   int

	gen uint64 // changes whenever the summary does (see layerView.PackedBoxes)

	// vt is a token-major copy of V ([PageSize][KVHeads*HeadDim]), made on
	// the first tokenValues call and dropped when the page is written: a
	// token pool gathers single tokens, and V's channel-major rows put
	// each of a token's values on another cache line. Shared by a
	// document's sessions like the page (an atomic pointer: forks build it
	// concurrently; a page being written belongs to one store).
	vt *atomic.Pointer[[]uint16]
}

// pageGen numbers summary changes across all pages, so that a (page, gen)
// pair identifies one state of one page's summary.
var pageGen atomic.Uint64

func newPage(l Layout) *Page {
	r := l.Row()
	p := &Page{
		K: make([]uint16, l.PageSize*r), V: make([]uint16, l.PageSize*r),
		Sum: make([]float32, r), Mean: make([]float32, r), Min: make([]float32, r), Max: make([]float32, r),
		Center: make([]float32, r), Radius: make([]float32, r), gen: pageGen.Add(1),
		vt: new(atomic.Pointer[[]uint16]),
	}
	for i := range p.Min {
		p.Min[i] = float32(math.Inf(1))
		p.Max[i] = float32(math.Inf(-1))
	}
	return p
}

func (p *Page) clone() *Page {
	c := *p
	c.K = append([]uint16(nil), p.K...)
	c.V = append([]uint16(nil), p.V...)
	c.Sum = append([]float32(nil), p.Sum...)
	c.Mean = append([]float32(nil), p.Mean...)
	c.Min = append([]float32(nil), p.Min...)
	c.Max = append([]float32(nil), p.Max...)
	c.Center = append([]float32(nil), p.Center...)
	c.Radius = append([]float32(nil), p.Radius...)
	c.RepKeys = append([]float32(nil), p.RepKeys...)
	c.vt = new(atomic.Pointer[[]uint16]) // the clone is written next
	return &c
}

// tokenValues returns the page's values token-major, [PageSize][Row] (the
// first N rows meaningful), building the copy on first use.
func (p *Page) tokenValues(l Layout) []uint16 {
	if v := p.vt.Load(); v != nil {
		return *v
	}
	r, P := l.Row(), l.PageSize
	t := make([]uint16, P*r)
	for ch := 0; ch < r; ch++ {
		for i, x := range p.V[ch*P : ch*P+p.N] {
			t[i*r+ch] = x
		}
	}
	p.vt.Store(&t)
	return t
}

// VTBytes is the host memory of the page's token-major value copy, if made.
func (p *Page) VTBytes() int64 {
	if v := p.vt.Load(); v != nil {
		return 2 * int64(len(*v))
	}
	return 0
}

// f16 converts one half-precision value.
func f16(u uint16) float32 { return float16.Frombits(u).Float32() }

// write stores rows starting at token index at and updates the summary
// incrementally (running sum, mean, min and max; O(rows) work, never a pass
// over the page or the context). k and v hold rows*Row f16 values.
func (p *Page) write(l Layout, at int, k, v []uint16, rows int, scratch []float32) {
	r, P := l.Row(), l.PageSize
	copy(p.K[at*r:], k[:rows*r])
	p.vt.Store(nil)
	for t := 0; t < rows; t++ {
		row := v[t*r : (t+1)*r]
		for ch, x := range row {
			p.V[ch*P+at+t] = x
		}
	}
	p.summarize(l, at, k, rows, scratch)
}

// summarize folds rows of new keys into the page's summary.
func (p *Page) summarize(l Layout, at int, k []uint16, rows int, scratch []float32) {
	r := l.Row()
	for t := 0; t < rows; t++ {
		row := k[t*r : (t+1)*r]
		for i, u := range row {
			x := f16(u)
			scratch[i] = x
			p.Sum[i] += x
			if x < p.Min[i] {
				p.Min[i] = x
			}
			if x > p.Max[i] {
				p.Max[i] = x
			}
		}
	}
	p.N = max(p.N, at+rows)
	inv := 1 / float32(p.N)
	for i, s := range p.Sum {
		p.Mean[i] = s * inv
		p.Center[i] = (p.Max[i] + p.Min[i]) / 2
		p.Radius[i] = (p.Max[i] - p.Min[i]) / 2
	}
	p.gen = pageGen.Add(1)
	if p.N == l.PageSize {
		p.close(l)
	}
}

// close picks representative keys per KV head: the keys least similar to
// the rest of their page (smallest sum of squared cosines to the other
// keys, after subtracting the page's mean key). Centring first matters
// when every key of a page shares a large component (a bias, a flag that
// is -1 on most tokens): a key that flips it then has a large negative
// cosine with every other, which the square would count as similarity,
// and the one unusual key would never be picked. The mean stands for what is typical in a page; representatives
// stand for what is unusual, such as a needle among filler, which is exactly
// what a question must be able to match. (Farthest-from-the-mean sampling
// does not work here: in many dimensions every key is about as far from the
// mean as any other.) Cost: O(P^2 x headDim) once per page and KV head.
func (p *Page) close(l Layout) {
	hd, P := l.HeadDim, p.N
	nr := min(Reps, P)
	p.RepKeys = make([]float32, l.KVHeads*Reps*hd)
	p.NReps = nr
	key := make([]float32, P*hd)
	unit := make([]float32, P*hd)
	mean := make([]float32, hd)
	sim := make([]float32, P)
	order := make([]int, P)
	for g := 0; g < l.KVHeads; g++ {
		clear(mean)
		for t := 0; t < P; t++ {
			for d := 0; d < hd; d++ {
				x := f16(p.K[t*l.Row()+g*hd+d])
				key[t*hd+d] = x
				mean[d] += x
			}
		}
		vek32.MulNumber_Inplace(mean, 1/float32(P))
		for t := 0; t < P; t++ {
			var n2 float32
			for d := 0; d < hd; d++ {
				x := key[t*hd+d] - mean[d]
				unit[t*hd+d] = x
				n2 += x * x
			}
			inv := float32(0)
			if n2 > 0 {
				inv = 1 / float32(math.Sqrt(float64(n2)))
			}
			vek32.MulNumber_Inplace(unit[t*hd:(t+1)*hd], inv)
		}
		for t := range sim {
			sim[t] = 0
			order[t] = t
		}
		for t := 0; t < P; t++ {
			a := unit[t*hd : (t+1)*hd]
			for u := t + 1; u < P; u++ {
				c := vek32.Dot(a, unit[u*hd:(u+1)*hd])
				sim[t] += c * c
				sim[u] += c * c
			}
		}
		slices.SortStableFunc(order, func(a, b int) int { return cmp.Compare(sim[a], sim[b]) })
		for j := 0; j < nr; j++ {
			copy(p.RepKeys[(g*Reps+j)*hd:], key[order[j]*hd:(order[j]+1)*hd])
		}
	}
}

func sqdist(a, b []float32) float32 {
	var s float32
	for i := range a {
		d := a[i] - b[i]
		s += d * d
	}
	return s
}

// resummarize recomputes the summary from the stored keys (after a truncation).
func (p *Page) resummarize(l Layout) {
	n := p.N
	q := newPage(l)
	q.K, q.V = p.K, p.V
	if n > 0 {
		q.summarize(l, 0, p.K, n, make([]float32, l.Row()))
	}
	*p = *q
	p.N = n
	p.gen = pageGen.Add(1)
}

// Store holds the pages of one sequence in host memory: every page of a
// global layer, and the pages a sliding-window layer can still read.
// Leading pages can be shared read-only with a document (Fork); writing
// into a shared page copies it first.
type Store struct {
	L      Layout
	pages  [][]*Page // [layer][page]; nil for a windowed layer's dropped page
	shared []bool    // page is shared with another store: copy before writing
	n      int       // tokens written in every layer
	scr    []float32

	// Sliding-window layers (gemma's local layers) keep only what their
	// window can still read. window[l] > 0 is the tokens a query of layer
	// l sees, itself included ([q-window+1, q]); 0 is a global layer.
	// from is the lowest position the sequence can still be cut back to
	// and resumed at (Paged.Remove, CanResume): the first position of the
	// last forward pass, or Len()-1 for a document (TrimWindows). A query
	// at from or later reads no key before from-window+1; one position
	// more is kept so that re-evaluating the token at from (generate's
	// one-token rollback) still finds its window.
	//
	// Invariant (checkWindows): from <= n, and for every layer l,
	// pages[l][p] == nil exactly for p < first[l], where
	// first[l] = max(0, from-window[l]) / PageSize for a windowed layer and
	// 0 for a global one. So a windowed layer holds at most
	// (window + the last batch)/PageSize + 2 pages whatever the length, and
	// its dropped pages are neither in memory nor in a page file.
	window []int
	first  []int
	from   int

	// epoch changes whenever a page may have changed other than by an
	// append: a new store, a fork, a truncation, pages dropped from a
	// window. Between two epochs, writes only append at Len(), so every
	// page before Len()/PageSize keeps its pointer and its summary.
	// Consumers that mirror page summaries elsewhere (the in-graph key
	// boxes, graphscore.go) rescan every page on a new epoch and only the
	// pages from Len()/PageSize on otherwise: a decode step then touches
	// one or two pages, not all of them.
	epoch uint64

	// ordered is the cluster-ordered copies of the document's KV that
	// staged token groups read (staged.go), shared with the stores forked
	// from this one; nil until needed, and again after a cut below them.
	ordered atomic.Pointer[orderedCopies]
	// orderCut: positions from orderCut on may differ from the other
	// stores sharing ordered (this store cut or rewrote them above every
	// copy built so far, below the shared base); 0 means none (staged.go).
	orderCut int
}

// storeEpochs numbers store epochs across all stores, so that a consumer
// never mistakes another store's epoch for its own.
var storeEpochs atomic.Uint64

// NewStore returns an empty store.
func NewStore(l Layout) (*Store, error) {
	if err := l.Check(); err != nil {
		return nil, err
	}
	return &Store{L: l, pages: make([][]*Page, l.Layers), scr: make([]float32, l.Row()),
		window: make([]int, l.Layers), first: make([]int, l.Layers), epoch: storeEpochs.Add(1)}, nil
}

// Window is layer's sliding window in tokens (0: a global layer).
func (s *Store) Window(layer int) int { return s.window[layer] }

// HeldPages is the number of layer's pages held in memory: all of them for
// a global layer, those its window can still read for a windowed one.
func (s *Store) HeldPages(layer int) int { return s.Pages() - s.first[layer] }

// windowed reports whether any layer is a sliding-window layer.
func (s *Store) windowed() bool {
	return slices.ContainsFunc(s.window, func(w int) bool { return w > 0 })
}

// heldFrom is the first page layer must hold for the store's from.
func (s *Store) heldFrom(layer int) int {
	if w := s.window[layer]; w > 0 {
		return max(0, s.from-w) / s.L.PageSize
	}
	return 0
}

// setWindows makes the layers with ws[l] > 0 sliding-window layers. A
// store that already has windows (a document ingested with them) must
// have the same ones: its dropped pages cannot come back.
func (s *Store) setWindows(ws []int) error {
	if len(ws) != s.L.Layers {
		return fmt.Errorf("kvcache: %d sliding windows for %d layers", len(ws), s.L.Layers)
	}
	for l, w := range ws {
		if w < 0 {
			return fmt.Errorf("kvcache: layer %d: sliding window %d", l, w)
		}
		if s.window[l] != 0 && s.window[l] != w {
			return fmt.Errorf("kvcache: layer %d of the document keeps a sliding window of %d tokens, the cache needs %d (0: every page)", l, s.window[l], w)
		}
	}
	copy(s.window, ws)
	s.trimTo(s.from)
	return nil
}

// trimTo raises from to m (<= Len) and drops the windowed layers' pages
// that no query at m or later can read.
func (s *Store) trimTo(m int) {
	s.from = max(s.from, min(m, s.n))
	for l := range s.pages {
		f := s.heldFrom(l)
		if s.first[l] < f {
			s.epoch = storeEpochs.Add(1)
		}
		for p := s.first[l]; p < f; p++ {
			s.pages[l][p] = nil
		}
		s.first[l] = max(s.first[l], f)
	}
}

// TrimWindows drops the windowed layers' pages that no query after the
// last token can read, keeping a one-token rollback (a document is saved
// and shared after this: from is Len()-1).
func (s *Store) TrimWindows() { s.trimTo(max(0, s.n-1)) }

// checkWindows reports a broken sliding-window invariant (see Store).
func (s *Store) checkWindows() error {
	if s.from < 0 || s.from > s.n {
		return fmt.Errorf("kvcache: store resumes from %d, outside [0, %d]", s.from, s.n)
	}
	for l := range s.pages {
		if f := s.heldFrom(l); s.first[l] != f {
			return fmt.Errorf("kvcache: layer %d (window %d) holds pages from %d, want %d (from position %d)", l, s.window[l], s.first[l], f, s.from)
		}
		for p, pg := range s.pages[l] {
			if (pg == nil) != (p < s.first[l]) {
				return fmt.Errorf("kvcache: layer %d page %d: held %v, but the layer holds pages from %d", l, p, pg != nil, s.first[l])
			}
		}
	}
	return nil
}

// Len is the number of tokens stored in every layer.
func (s *Store) Len() int { return s.n }

// Pages is the number of pages (the last may be partial).
func (s *Store) Pages() int { return len(s.pages[0]) }

// Page returns page i of layer, or nil if layer is a sliding-window layer
// and the page fell out of its window.
func (s *Store) Page(layer, i int) *Page { return s.pages[layer][i] }

// Bytes is the host memory held by the store's pages, shared ones included.
func (s *Store) Bytes() int64 {
	var held int64
	for l := range s.pages {
		held += int64(s.HeldPages(l))
	}
	return held * int64(s.L.PageBytes())
}

// Fork returns a store that shares all of s's pages read-only.
func (s *Store) Fork() *Store {
	f := &Store{L: s.L, pages: make([][]*Page, s.L.Layers), n: s.n, scr: make([]float32, s.L.Row()),
		window: slices.Clone(s.window), first: slices.Clone(s.first), from: s.from, epoch: storeEpochs.Add(1)}
	for l := range s.pages {
		f.pages[l] = append([]*Page(nil), s.pages[l]...)
	}
	f.shared = make([]bool, len(s.pages[0]))
	for i := range f.shared {
		f.shared[i] = true
	}
	// The fork shares the ordered copies: its tokens below s's length
	// are s's. From now on neither may raise their base alone.
	h := s.holder()
	h.mu.Lock()
	if !h.shared {
		h.base = max(h.base, s.n)
	}
	h.shared = true
	h.mu.Unlock()
	f.ordered.Store(h)
	f.orderCut = s.orderCut // the fork's pages are s's
	return f
}

// grow makes sure pages exist for n tokens, copying a shared partial page
// that will be written.
func (s *Store) grow(n int) {
	P := s.L.PageSize
	for s.Pages()*P < n {
		for l := range s.pages {
			s.pages[l] = append(s.pages[l], newPage(s.L))
		}
		s.shared = append(s.shared, false)
	}
	if first := s.n / P; s.n < n && first < len(s.shared) && s.shared[first] {
		for l := range s.pages {
			s.pages[l][first] = s.pages[l][first].clone()
		}
		s.shared[first] = false
	}
}

// write stores rows of layer's keys and values for positions pos.. (f16, token-major).
func (s *Store) write(layer, pos int, k, v []uint16, rows int) {
	P, r := s.L.PageSize, s.L.Row()
	if pos < s.n {
		s.epoch = storeEpochs.Add(1) // not an append (see epoch)
		s.detachOrdered(pos)
	}
	for done := 0; done < rows; {
		p := (pos + done) / P
		at := (pos + done) % P
		n := min(rows-done, P-at)
		s.pages[layer][p].write(s.L, at, k[done*r:], v[done*r:], n, s.scr)
		done += n
	}
}

// canCut reports whether the sequence can be cut back to n tokens: a
// windowed layer may have dropped pages that a query at n would read.
func (s *Store) canCut(n int) bool { return n <= s.n && (n >= s.from || !s.windowed()) }

// truncate drops every token at or after n (canCut(n) must hold).
func (s *Store) truncate(n int) {
	if n > s.n {
		return
	}
	s.from = min(s.from, n) // a no-op for a windowed store (canCut)
	s.epoch = storeEpochs.Add(1)
	s.detachOrdered(n)
	P := s.L.PageSize
	keep := (n + P - 1) / P
	for l := range s.pages {
		s.pages[l] = s.pages[l][:keep]
	}
	s.shared = s.shared[:keep]
	if n%P != 0 {
		last := keep - 1
		for l := range s.pages {
			pg := s.pages[l][last]
			if pg.N <= n%P {
				continue
			}
			if s.shared[last] {
				pg = pg.clone()
				s.pages[l][last] = pg
			}
			pg.N = n % P
			pg.resummarize(s.L)
		}
	}
	s.n = n
}

// Key implements paging.KeyReader: the f16 key of pos, KV head g, as f32.
func (v *layerView) Key(pos, g int, dst []float32) {
	P, hd := v.s.L.PageSize, v.s.L.HeadDim
	pg := v.s.pages[v.layer][pos/P]
	row := pg.K[(pos%P)*v.s.L.Row()+g*hd:][:hd]
	for i, u := range row {
		dst[i] = f16(u)
	}
}

// Summaries returns layer's view of the store as selectors see it (with
// its keys: paging.KeyReader).
func (s *Store) Summaries(layer int) paging.Summaries { return &layerView{s: s, layer: layer} }

// LayerKeys returns a key reader for another layer of the same sequence
// (probe reads every layer's keys for the representatives of new blocks).
func (v *layerView) LayerKeys(layer int) paging.KeyReader { return &layerView{s: v.s, layer: layer} }

// layerView exposes one layer's summaries to paging policies.
type layerView struct {
	s     *Store
	layer int
	reps  [][]float32

	// Packed key boxes for quest's scoring, per KV head [pages][2*headDim]
	// (center then radius), and the page state each row was packed from.
	boxes  [][]float32
	packed []packedPage
}

type packedPage struct {
	page *Page
	gen  uint64
}

func (v *layerView) Pages() int    { return v.s.Pages() }
func (v *layerView) Len(p int) int { return v.s.pages[v.layer][p].N }
func (v *layerView) KVHeads() int  { return v.s.L.KVHeads }
func (v *layerView) HeadDim() int  { return v.s.L.HeadDim }
func (v *layerView) span(g int) (int, int) {
	return g * v.s.L.HeadDim, (g + 1) * v.s.L.HeadDim
}
func (v *layerView) Mean(p, g int) []float32 {
	a, b := v.span(g)
	return v.s.pages[v.layer][p].Mean[a:b]
}
func (v *layerView) Min(p, g int) []float32 {
	a, b := v.span(g)
	return v.s.pages[v.layer][p].Min[a:b]
}
func (v *layerView) Max(p, g int) []float32 {
	a, b := v.span(g)
	return v.s.pages[v.layer][p].Max[a:b]
}
func (v *layerView) Box(p, g int) (center, radius []float32) {
	a, b := v.span(g)
	pg := v.s.pages[v.layer][p]
	return pg.Center[a:b], pg.Radius[a:b]
}

// PackedBoxes implements paging.PackedBoxes. Rows are repacked only for
// pages whose summary changed since the last call (in decode, the last
// page), so scoring every page costs one matrix-vector product per query head.
func (v *layerView) PackedBoxes(g int) []float32 {
	n, hd, kvh := v.s.Pages(), v.s.L.HeadDim, v.s.L.KVHeads
	if v.boxes == nil {
		v.boxes = make([][]float32, kvh)
	}
	for h := range v.boxes {
		if need := n * 2 * hd; len(v.boxes[h]) < need {
			v.boxes[h] = append(v.boxes[h], make([]float32, need-len(v.boxes[h]))...)
		}
	}
	if len(v.packed) > n {
		v.packed = v.packed[:n]
	}
	v.packed = append(v.packed, make([]packedPage, n-len(v.packed))...)
	for p := 0; p < n; p++ {
		pg := v.s.pages[v.layer][p]
		if v.packed[p] == (packedPage{pg, pg.gen}) {
			continue
		}
		for h := 0; h < kvh; h++ {
			row := v.boxes[h][p*2*hd : (p+1)*2*hd]
			copy(row[:hd], pg.Center[h*hd:(h+1)*hd])
			copy(row[hd:], pg.Radius[h*hd:(h+1)*hd])
		}
		v.packed[p] = packedPage{pg, pg.gen}
	}
	return v.boxes[g][:n*2*hd]
}

func (v *layerView) Reps(p, g int) [][]float32 {
	pg := v.s.pages[v.layer][p]
	v.reps = v.reps[:0]
	hd := v.s.L.HeadDim
	for j := 0; j < pg.NReps; j++ {
		o := (g*Reps + j) * hd
		v.reps = append(v.reps, pg.RepKeys[o:o+hd])
	}
	return v.reps
}

// u16bytes views f16 data as bytes without copying.
func u16bytes(u []uint16) []byte {
	if len(u) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(&u[0])), 2*len(u))
}

// bytesU16 views bytes as f16 data without copying (len must be even).
func bytesU16(b []byte) []uint16 {
	if len(b) == 0 {
		return nil
	}
	return unsafe.Slice((*uint16)(unsafe.Pointer(&b[0])), len(b)/2)
}
