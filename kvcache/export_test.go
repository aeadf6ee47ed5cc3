package kvcache

import (
	"runtime"
	"slices"

	"github.com/ollama/ollama/ml"
	"github.com/x448/float16"
)

// The package's tests run device uploads (DeviceUploads, on the CPU
// backend with HostUploads off) as an asynchronous device would: the
// copies into staging tensors happen only when something waits for them,
// so a graph computed before Outputs reads stale staging here too.
func init() { deferCopies = true }

// OrderedHostMask is buildMask for a pool whose slots hold pages 0..used-1
// in order, full before pos0 and filled to pos0+n after it, all selected.
func OrderedHostMask(pos0, cells, n, P int) []float32 {
	used := cells / P
	pl := newPool(nil, Layout{Layers: 1, KVHeads: 1, HeadDim: 1, PageSize: P}, 0, 1, used, false)
	var sel []int
	for s := 0; s < used; s++ {
		pl.page[s], pl.where[s] = s, s
		pl.fill[s] = min(P, max(0, pos0+n-s*P))
		sel = append(sel, s)
	}
	var writes []int
	for p := pos0 / P; p <= (pos0+n-1)/P; p++ {
		writes = append(writes, p)
	}
	return buildMask(pl, used, sel, nil, writes, used, pos0, n, P)
}

// QuestHeadScores and MaxHeadsGraph are questHeadScores and
// maxHeadsGraph: one layer's in-graph Quest bounds per head, and their
// maximum over heads.
var (
	QuestHeadScores = questHeadScores
	MaxHeadsGraph   = maxHeadsGraph
)

// FillForTest appends rows tokens to every layer of s: k[l], v[l] hold
// layer l's keys and values, rows × Row f16 values, token-major.
func (s *Store) FillForTest(k, v [][]uint16, rows int) {
	pos := s.n
	s.grow(pos + rows)
	for l := range k {
		s.write(l, pos, k[l], v[l], rows)
	}
	s.n = pos + rows
}

// KSpan, VSpan are kSpan, vSpan for tests.
type (
	KSpan = kSpan
	VSpan = vSpan
)

// NewKSpan spans cells [first, first+n) of k [headDim, kvHeads, cells].
func NewKSpan(k ml.Tensor, first, n int) KSpan { return kSpan{t: k, first: first, n: n} }

// VCells, VPage are vCells, vPage for tests.
func VCells(v ml.Tensor, first, n int) VSpan     { return vCells(v, first, n) }
func VPage(v ml.Tensor, page, from, n int) VSpan { return vPage(v, page, from, n) }

// RunAttention is runAttention for tests.
func RunAttention(ctx ml.Context, q ml.Tensor, ks []KSpan, vs []VSpan, mask ml.Tensor, scale float64) ml.Tensor {
	return runAttention(ctx, q, ks, vs, mask, scale)
}

// PageRuns is pageRuns for tests: first cell and cells of each run.
func PageRuns(pages []int, P int, fill func(int) int) [][2]int {
	var out [][2]int
	for _, r := range pageRuns(pages, P, fill) {
		out = append(out, [2]int{r.first, r.n})
	}
	return out
}

// GatherPages is gatherPages for tests, with its index tensors made from
// pages.
func GatherPages(ctx ml.Context, kArena, vArena ml.Tensor, pages []int, L Layout) (ml.Tensor, ml.Tensor) {
	idx, vidx := gatherIndex(pages, L.Row())
	return gatherPages(ctx, kArena, vArena, ctx.Input().FromInts(idx, len(idx)), ctx.Input().FromInts(vidx, len(vidx)), L)
}

// HostPooled reports whether every pool of every layer is in host memory
// and takes its uploads as plain copies.
func (c *Paged) HostPooled() bool {
	for _, ls := range c.layers {
		for _, g := range ls.groups {
			if g.pool == nil || g.pool.hk == nil || !HostUploads {
				return false
			}
		}
	}
	return true
}

// HostMem is hostMem for tests.
func HostMem(t ml.Tensor, elems int) []uint16 { return hostMem(t, elems) }

// InPlaceKernel runs the in-place attention op (kvr_attn) on be for one
// group of kvHeads KV heads of headDim hd, g query heads each, outside a
// cache: the ordered copy is n token-major rows kc and vc ([n][kvHeads·hd]
// f32, rounded to f16), runs its [a, e) pairs of rows, and the staging
// cells sk and sv ([cells][kvHeads][hd] each, cells ≥ 1, rounded to f16)
// are laid out as a staging buffer's (K token-major, V channel-major). q
// is [kvHeads·g][hd]; it returns the output [kvHeads·g][hd].
func InPlaceKernel(be ml.Backend, hd, kvHeads, g int, kc, vc []float32, runs []int32, sk, sv, q []float32, scale float64) []float32 {
	C := kvHeads * hd
	n, cells := len(kc)/C, len(sk)/C
	oc := &orderedCopy{order: make([]int32, n), c: C}
	if oc.kv, oc.cmem = cAlloc16(2 * n * C); oc.kv == nil {
		panic("no C memory")
	}
	for i := range kc {
		oc.kv[i] = float16.Fromfloat32(kc[i]).Bits()
		oc.kv[n*C+i] = float16.Fromfloat32(vc[i]).Bits()
	}
	heads := make([]int, kvHeads)
	for i := range heads {
		heads[i] = i
	}
	c := &Paged{L: Layout{Layers: 1, KVHeads: kvHeads, HeadDim: hd, PageSize: 16}}
	gr := &group{heads: heads, rows: runs, ocopy: oc}
	c.inplaceRuns(gr)
	ctx := be.NewContext()
	defer ctx.Close()
	// V channel-major: [cells, hd, kvHeads].
	svT := make([]float32, len(sv))
	for j := range cells {
		for ch := range C {
			svT[ch*cells+j] = sv[j*C+ch]
		}
	}
	key := ctx.Input().FromFloats(sk, hd, kvHeads, cells).Cast(ctx, ml.DTypeF16)
	value := ctx.Input().FromFloats(svT, cells, hd, kvHeads).Cast(ctx, ml.DTypeF16)
	qt := ctx.Input().FromFloats(q, hd, kvHeads*g, 1)
	out := c.inplaceAttention(ctx, qt, key, value, gr, scale)
	ctx.Forward(out).Compute(out)
	res := out.Floats()
	runtime.KeepAlive(oc)
	runtime.KeepAlive(gr) // its params' finalizer frees what the op read
	return res
}

// OrderedToGoMemory moves s's cluster-ordered copies into Go memory, as
// when malloc refused C memory (cAlloc16), so that a one-token pass
// copies their runs into the staging buffer instead of reading them in
// place; it returns how many it moved.
func (s *Store) OrderedToGoMemory() int {
	h := s.ordered.Load()
	if h == nil {
		return 0
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, oc := range h.m {
		if oc.cmem != nil && oc.kv != nil {
			oc.kv, oc.cmem = slices.Clone(oc.kv), nil
			n++
		}
	}
	return n
}

// StageTwice asks layer 0's first pool for staging twice within one graph
// and then again in the next graph (Outputs), reporting whether each was
// granted: staging tensors are written once per graph.
func (c *Paged) StageTwice(ctx ml.Context) (first, second, next bool) {
	pl := c.layers[0].groups[0].pool
	ds, first := c.stageFor(pl, c.L.PageSize)
	if first {
		ds.send()
	}
	_, second = c.stageFor(pl, c.L.PageSize)
	c.Outputs(ctx)
	ds, next = c.stageFor(pl, c.L.PageSize)
	if next {
		ds.send()
	}
	c.Outputs(ctx)
	return first, second, next
}
