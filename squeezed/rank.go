package squeezed

import (
	"math"
	"runtime"
	"slices"
	"sync"
	"weak"

	"github.com/viterin/vek/vek32"
)

// Transposed is a head's fine centroids laid out to score the query heads
// of its GQA group in one read of them: blocks of cols centroids, each
// block [headDim][cols] row-major, so that one vek32.MatMul_Into of the
// queries [G, headDim] by a block gives the G heads' scores of cols
// centroids ([G, cols]: an axpy over cols per query element, the
// centroids read once for all G query heads, where one matrix–vector
// product per query head reads them G times). cols keeps G·headDim·cols
// under vek's 100,000 threshold, past which it splits the product over
// goroutines (decode runs on one thread).
//
// Read-only once made: Head.Flat shares one per head and GQA size among
// the sessions of a document (its size is the centroids': 3.3 MiB for
// the tiny preset at 64k, 53 MiB for the 1b preset at 32k), as the
// centroids themselves are shared.
type Transposed struct {
	d, k, g, cols int
	blocks        [][]float32 // block b: centroids b·cols.., [d][≤cols]
}

// flatLayouts holds a Head's Transposed layouts, made on first use.
type flatLayouts struct {
	mu sync.Mutex
	by map[int]*Transposed // GQA group size -> layout
}

// flatCache maps a Head (weakly: it does not keep the Head, hence its
// document, alive) to its layouts. It lives outside the Head so that a
// Head stays plain data: an index read back from disk equals the
// ingested one (TestSqueezedNeedle compares them) whether or not a
// session has scored either flat.
var flatCache sync.Map // weak.Pointer[Head] -> *flatLayouts

// Flat returns h's centroids transposed for g query heads, made once and
// shared (safe for concurrent sessions) until h is collected.
func (h *Head) Flat(g int) *Transposed {
	key := weak.Make(h)
	v, loaded := flatCache.LoadOrStore(key, &flatLayouts{by: map[int]*Transposed{}})
	if !loaded {
		runtime.AddCleanup(h, func(k weak.Pointer[Head]) { flatCache.Delete(k) }, key)
	}
	fl := v.(*flatLayouts)
	fl.mu.Lock()
	defer fl.mu.Unlock()
	t := fl.by[g]
	if t == nil {
		t = h.Transpose(g)
		fl.by[g] = t
	}
	return t
}

// Transpose lays h's fine centroids out for Scores with g query heads.
func (h *Head) Transpose(g int) *Transposed {
	d, k := h.D, h.K()
	cols := max(8, (99_999/(g*d))&^7)
	t := &Transposed{d: d, k: k, g: g, cols: cols}
	for lo := 0; lo < k; lo += cols {
		n := min(cols, k-lo)
		blk := make([]float32, d*n)
		for j := range n {
			for i, v := range h.Centroids[(lo+j)*d : (lo+j+1)*d] {
				blk[i*n+j] = v
			}
		}
		t.blocks = append(t.blocks, blk)
	}
	return t
}

// Scores writes q_h·c_j for the g query heads q ([g][headDim], h's GQA
// group) and every fine centroid j: dst[h·K+j] (dst ≥ g·K long). tmp is
// the caller's scratch ([g][cols]), returned grown.
func (t *Transposed) Scores(dst, q, tmp []float32) []float32 {
	k := t.k
	tmp = grow(tmp, t.g*t.cols)
	for b, blk := range t.blocks {
		lo := b * t.cols
		n := min(t.cols, k-lo)
		out := vek32.MatMul_Into(tmp[:t.g*n], q[:t.g*t.d], blk, t.d)
		for h := range t.g {
			copy(dst[h*k+lo:h*k+lo+n], out[h*n:(h+1)*n])
		}
	}
	return tmp
}

// rankSample is how many scores TopRanked samples to place its cuts.
const rankSample = 256

// TopRanked is TopScores (FlatTop's answer from the scores of every fine
// centroid: best first, ties by the lower cluster, until their tokens
// reach budget) at a lower cost. TopScores finds its cut by a quickselect
// over a copy of all K scores and sorts the clusters above it through a
// comparison closure; here the cuts come from a strided sample of the
// scores (256 of them, a quickselect each), and the clusters are sorted as
// packed keys (the score's order bits, then the cluster: one uint64
// sort, no closure). The first cut is placed for ~1.25× the clusters the
// budget needs at the mean cluster size, +16; if the clusters above it
// do not fill the budget (the sample put it too high, or the best
// clusters are small ones), the next cut lies twice as deep in the
// sample and only the clusters between the two cuts are collected and
// sorted, appended after the others. Exact: every cluster below a cut
// scores strictly less than every cluster above it, so the order is
// built band by band. Small heads (K < 4·256) take TopScores.
func (h *Head) TopRanked(score []float32, budget int, sc *Scratch, out []int32) []int32 {
	k := h.K()
	if budget <= 0 || k == 0 {
		return out
	}
	if k < 4*rankSample {
		return h.TopScores(score, budget, sc, out)
	}
	score = score[:k]
	out0 := len(out)
	mean := max(1, len(h.Assign)/k)
	want := (budget/mean+1)*5/4 + 16 // clusters wanted above the first cut
	stride := k / rankSample
	sc.fine = sc.fine[:0]
	for i := 0; i < rankSample; i++ {
		sc.fine = append(sc.fine, score[i*stride])
	}
	r := min(rankSample, max(1, (want*rankSample+k-1)/k))
	tok := 0
	hi, first := float32(0), true
	for {
		cut := float32(math.Inf(-1))
		if r < rankSample {
			cut = nthLargest(sc.fine, r) // the sample's r-th best (quickselect; reorders the sample only)
		}
		if cut != cut {
			// A NaN score in the sample can come back as the cut, which
			// no score passes: every band would be empty. TopScores
			// ranks such scores without a sampled cut.
			return h.TopScores(score, budget, sc, out[:out0])
		}
		sc.keys = sc.keys[:0]
		for j, v := range score {
			if v >= cut && (first || v < hi) {
				sc.keys = append(sc.keys, rankKey(v, j))
			}
		}
		slices.Sort(sc.keys)
		for _, key := range sc.keys {
			if tok >= budget {
				return out
			}
			j := int32(uint32(key))
			out = append(out, j)
			tok += int(h.Sizes[j])
		}
		if tok >= budget || r >= rankSample {
			return out
		}
		hi, first, r = cut, false, 2*r
	}
}

// rankKey packs a score and its cluster so that ascending keys are
// descending scores, ties by the lower cluster (-0 is taken as +0, as
// the float comparison does).
func rankKey(v float32, j int) uint64 {
	if v == 0 {
		v = 0
	}
	b := math.Float32bits(v)
	if b&(1<<31) != 0 {
		b = ^b // negative: larger magnitude orders lower
	} else {
		b |= 1 << 31
	}
	return uint64(^b)<<32 | uint64(uint32(j))
}
