package squeezed

import (
	"encoding/binary"
	"math"
	"math/bits"
	"runtime"
	"slices"
	"sync"
	"unsafe"
	"weak"

	"github.com/viterin/vek/vek32"
)

// Transposed is a head's fine centroids laid out to score the query heads
// of its GQA group in one read of them: blocks of cols centroids, each
// block [headDim][cols rounded up to 8] row-major, so that one product of
// the queries [G, headDim] by a block (score4, or vek32.MatMul_Into)
// gives the G heads' scores of cols centroids ([G, cols]: the centroids
// read once for all G query heads, where one matrix–vector product per
// query head reads them G times). cols keeps G·headDim·cols under vek's
// 100,000 threshold, past which it splits the product over goroutines
// (decode runs on one thread).
//
// Read-only once made: Head.Flat shares one per head and GQA size among
// the sessions of a document (its size is the centroids': 3.3 MiB for
// the tiny preset at 64k, 53 MiB for the 1b preset at 32k), as the
// centroids themselves are shared.
type Transposed struct {
	d, k, g, cols int
	blocks        [][]float32 // block b: centroids b·cols.., [d][≤cols rounded up to 8] (zero columns past K)
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
		np := (n + 7) &^ 7 // score4AVX2 takes 8 columns at a time
		blk := make([]float32, d*np)
		for j := range n {
			for i, v := range h.Centroids[(lo+j)*d : (lo+j+1)*d] {
				blk[i*np+j] = v
			}
		}
		t.blocks = append(t.blocks, blk)
	}
	return t
}

// Scores writes q_h·c_j for the g query heads q ([g][headDim], h's GQA
// group) and every fine centroid j: dst[h·K+j] (dst ≥ g·K long). tmp is
// the caller's scratch ([g][cols]), returned grown.
//
// Where vek runs its AVX2 kernel, a GQA group of a multiple of 4 query
// heads is scored by score4 (score_amd64.s; AVX-512 where there is
// one), 4 heads at a time: the same fused multiply-adds in the same
// order (so the same scores, bit for bit, TestScoresMatchVek), with a
// tile's sums kept in registers instead of loaded and stored at every
// element of headDim (BenchmarkSelectStep's score against score-old).
func (t *Transposed) Scores(dst, q, tmp []float32) []float32 {
	k := t.k
	tmp = grow(tmp, max(t.g*(t.cols+7), t.g+t.d))
	for b, blk := range t.blocks {
		lo := b * t.cols
		n := min(t.cols, k-lo)
		np := (n + 7) &^ 7
		// A block of one centroid (n = 1) vek scores as a matrix–vector
		// product, in another order: it keeps vek.
		if useScore4 && t.g%4 == 0 && t.d > 0 && n > 1 {
			_, _ = dst[t.g*k-1], q[t.g*t.d-1] // the kernel's reach, checked
			for h := 0; h < t.g; h += 4 {
				if np == n { // straight into dst's rows
					score4(dst[h*k+lo:], q[h*t.d:], blk, t.d, np, np, k)
					continue
				}
				out := tmp[:4*np]
				score4(out, q[h*t.d:], blk, t.d, np, np, np)
				for i := range 4 {
					copy(dst[(h+i)*k+lo:(h+i)*k+lo+n], out[i*np:i*np+n])
				}
			}
			continue
		}
		if n == 1 {
			// Unpadded, as before: vek takes a one-column product for a
			// matrix–vector one, which sums in another order.
			col := tmp[t.g : t.g+t.d]
			for i := range col {
				col[i] = blk[i*np]
			}
			out := vek32.MatMul_Into(tmp[:t.g], q[:t.g*t.d], col, t.d)
			for h := range t.g {
				dst[h*k+lo] = out[h]
			}
			continue
		}
		out := vek32.MatMul_Into(tmp[:t.g*np], q[:t.g*t.d], blk, t.d)
		for h := range t.g {
			copy(dst[h*k+lo:h*k+lo+n], out[h*np:h*np+n])
		}
	}
	return tmp
}

// rankSample is how many scores TopRanked samples to place its cuts.
const rankSample = 256

// TopRanked is TopScores (FlatTop's answer from the scores of every fine
// centroid: best first, ties by the lower cluster, until their tokens
// reach budget) at a lower cost. A squeezed decode step at 64k ranks 32
// such lists (4 layers × 2 KV heads × 4 query heads, K = 3,272 scores
// each, ~100–140 clusters taken), so what one list costs is paid 32
// times a step.
//
// The clusters are taken band by band: a cut placed from a strided
// sample of the scores (256 of them) for ~1.5× the clusters the budget
// needs at the mean cluster size, +16; the clusters at or above it are
// sorted and taken while the budget lasts; if they do not fill it, the
// next cut is placed twice as deep in the sample and only the clusters
// between the two cuts are collected, sorted and taken; the last band
// (the whole sample deep) holds every cluster left. Exact: every cluster
// below a cut scores strictly less than every cluster above it, so the
// bands in turn are the sorted order, whatever the cuts are. The parts,
// each chosen by measurement (docs/performance.md, "Squeezed's ranking at
// 64k"):
//   - the cut bisects the sample's values with SIMD counts (sampleCut),
//     where a quickselect of the sample cost a third of the ranking;
//   - the clusters above it come from vek32's SIMD comparison of all K
//     scores into a mask, packed to bits and walked (collectAbove),
//     where a scalar loop paid a branch per cluster;
//   - a band is sorted by two radix passes on its keys' top 16 score
//     bits and an insertion pass for what they left tied (radixSortHi),
//     where a comparison sort of ~150 keys cost as much as the rest;
//   - the first band is placed for 1.5× (not 1.25×) the mean-size
//     estimate: on the 64k document the best clusters are small ones
//     (~120 taken where budget / mean size is 107), and a second band
//     (another pass over K) cost more than sorting ~40 more keys.
//
// Scores with a NaN (vek32.Sum of the scores is NaN then) take
// topRankedSampled, the ranking TopRanked made before: a NaN orders
// against nothing, and the answer for one depends on how that code's
// quickselects placed it; keeping the code keeps the answer. Small heads
// (K < 4·256) take TopScores, as before.
func (h *Head) TopRanked(score []float32, budget int, sc *Scratch, out []int32) []int32 {
	k := h.K()
	if budget <= 0 || k == 0 {
		return out
	}
	if k < 4*rankSample {
		return h.TopScores(score, budget, sc, out)
	}
	score = score[:k]
	if s := vek32.Sum(score); s != s {
		return h.topRankedSampled(score, budget, sc, out)
	}
	mean := max(1, len(h.Assign)/k)
	want := (budget/mean+1)*3/2 + 16 // clusters wanted above the first cut
	stride := k / rankSample
	sc.fine = grow(sc.fine, rankSample)
	for i := range sc.fine {
		sc.fine[i] = score[i*stride]
	}
	r := min(rankSample, max(1, (want*rankSample+k-1)/k))
	mask := sc.boolMask(k)
	tok := 0
	hi, first := float32(0), true
	for {
		cut := float32(math.Inf(-1))
		if r < rankSample {
			cut = sampleCut(sc.fine, r, &sc.smask, &sc.top)
		}
		// A deeper r bisects to a cut no higher than the last (the two
		// bisections go the same way until the deeper one turns below);
		// an equal one (ties at the cut) would make an empty band.
		if first || cut < hi {
			vek32.GteNumber_Into(mask, score, cut)
			sc.keys = collectAbove(sc.keys[:0], &sc.idx, mask, score, hi, first)
			for _, key := range radixSortHi(sc.keys, &sc.keysTmp, &sc.hist) {
				if tok >= budget {
					return out
				}
				j := int32(uint32(key))
				out = append(out, j)
				tok += int(h.Sizes[j])
			}
			hi, first = cut, false
		}
		if tok >= budget || r >= rankSample {
			return out
		}
		r *= 2
	}
}

// boolMask returns sc's [n]bool mask, its storage words so that
// collectAbove may read it 8 bytes at a time aligned.
func (sc *Scratch) boolMask(n int) []bool {
	if len(sc.mask)*8 < n {
		sc.mask = make([]uint64, (n+7)/8)
	}
	return unsafe.Slice((*bool)(unsafe.Pointer(unsafe.SliceData(sc.mask))), n)
}

// sampleCut returns a cut with at least r of sample (no NaN in it, r <
// len(sample)) at or above it, and not many more: bisection on the value
// between the sample's least and greatest, each step counting the
// sample's values at or above the midpoint with vek32 (a SIMD compare
// and count of 256 values), stopping once r to r+r/4 are. Any cut gives
// TopRanked's answer (the bands are exact whatever their bounds); a cut
// near the sample's r-th best keeps the first band near the size the
// budget needs. A few SIMD passes cost less than keeping the best r in
// a sorted list or a quickselect, whose branches each mispredict often.
// Bounds that are not finite (an infinite score sampled) take the exact
// r-th best (nthLargest on a copy in *top).
func sampleCut(sample []float32, r int, mask *[]bool, top *[]float32) float32 {
	lo, hi := vek32.Min(sample), vek32.Max(sample)
	if math.IsInf(float64(lo), 0) || math.IsInf(float64(hi), 0) {
		*top = append((*top)[:0], sample...)
		return nthLargest(*top, r)
	}
	if cap(*mask) < len(sample) {
		*mask = make([]bool, len(sample))
	}
	m := (*mask)[:len(sample)]
	count := func(c float32) int { return vek32.Count(vek32.GteNumber_Into(m, sample, c)) }
	// Invariant: count(lo) ≥ r (lo is the least), count(hi) < r unless
	// hi is the greatest and r values tie there.
	if mid := vek32.Mean(sample); mid > lo && mid < hi {
		if count(mid) >= r {
			lo = mid
		} else {
			hi = mid
		}
	}
	for range 24 {
		mid := lo/2 + hi/2 // finite for finite bounds, where hi−lo may not be
		if !(mid > lo && mid < hi) {
			break // lo and hi adjacent floats
		}
		c := count(mid)
		if c < r {
			hi = mid
			continue
		}
		lo = mid
		if c <= r+r/4 {
			break
		}
	}
	return lo
}

// collectAbove appends to keys the packed key (rankKey) of every cluster
// j with mask[j] set and, unless first, score[j] < hi (below the last
// band's cut), in ascending order of j. mask is a Scratch.boolMask (read
// 8 bytes at a time from its aligned start). A band is ~5 % of K, so the
// mask is mostly 0: it is packed 64 clusters to a word (each 8-byte word
// of 0/1 bytes folds to 8 bits with one multiply) and the set bits are
// walked, about one branch miss per 64 clusters, where a scan of the
// bytes or of the 8-byte words missed about once per cluster taken. The
// first band's keys are made as its bits are walked (a second loop over
// a list of the clusters cost ~5 % of the ranking); a later band's
// clusters are listed in idx (scratch, grown to len(mask)) and kept
// below hi.
// littleEndian: collectAbove's word fold assumes the bools of a word are
// its bytes in little-endian order.
var littleEndian = binary.NativeEndian.Uint16([]byte{1, 0}) == 1

func collectAbove(keys []uint64, idx *[]int32, mask []bool, score []float32, hi float32, first bool) []uint64 {
	if cap(*idx) < len(mask) {
		*idx = make([]int32, len(mask))
	}
	ix := (*idx)[:len(mask)]
	// fold packs the 8 bytes (0 or 1) of w into bits 0..7: byte i's bit
	// lands alone at bit 56+i of the product (no two terms share a bit,
	// so nothing carries).
	const fold = 0x0102040810204080
	n, full := 0, len(mask)&^63
	if !littleEndian {
		full = 0 // the fold reads byte i of a word as cluster 8c+i: the byte loop below instead
	}
	words := unsafe.Slice((*uint64)(unsafe.Pointer(unsafe.SliceData(mask))), full/8)
	for c := 0; c < len(words); c += 8 {
		w := words[c : c+8 : c+8]
		bm := w[0]*fold>>56 | w[1]*fold>>56<<8 | w[2]*fold>>56<<16 | w[3]*fold>>56<<24 |
			w[4]*fold>>56<<32 | w[5]*fold>>56<<40 | w[6]*fold>>56<<48 | w[7]*fold>>56<<56
		base := c * 8
		if first {
			for bm != 0 {
				j := base + bits.TrailingZeros64(bm)
				keys = append(keys, rankKey(score[j], j))
				bm &= bm - 1
			}
			continue
		}
		for bm != 0 {
			ix[n] = int32(base + bits.TrailingZeros64(bm))
			n++
			bm &= bm - 1
		}
	}
	for j := full; j < len(mask); j++ {
		if mask[j] {
			ix[n] = int32(j)
			n++
		}
	}
	for _, j := range ix[:n] {
		if v := score[j]; first || v < hi {
			keys = append(keys, rankKey(v, int(j)))
		}
	}
	return keys
}

// radixSortHi sorts keys by their upper 32 bits (rankKey's score half),
// stably, so keys collected in cluster order keep ties by the lower
// cluster: the same order as sorting the whole uint64s. Two LSD passes
// of 8 bits on the top 16 bits of (key − the band's best), then an
// insertion pass over the whole keys for the pairs those 16 bits left
// tied (a band of ~200 keys spread over 65,536 digits: a handful, each
// moved a step or two). A band whose 16 bits tie widely (a few scores
// far from the rest make the digits coarse) would make that pass
// quadratic: past 8 moves a key it hands over to slices.Sort. Short
// lists take slices.Sort at once (the passes' fixed cost would
// dominate). The result is keys, sorted in place (*tmp is the passes'
// other buffer, grown).
func radixSortHi(keys []uint64, tmp *[]uint64, hist *[2][256]uint32) []uint64 {
	n := len(keys)
	if n <= 32 {
		slices.Sort(keys)
		return keys
	}
	if cap(*tmp) < n {
		*tmp = make([]uint64, n)
	}
	lo, hi := uint32(keys[0]>>32), uint32(keys[0]>>32)
	for _, x := range keys {
		lo, hi = min(lo, uint32(x>>32)), max(hi, uint32(x>>32))
	}
	shift := max(0, bits.Len32(hi-lo)-16)
	*hist = [2][256]uint32{}
	for _, x := range keys {
		d := (uint32(x>>32) - lo) >> shift
		hist[0][byte(d)]++
		hist[1][byte(d>>8)]++
	}
	src, dst := keys, (*tmp)[:n]
	for p := range 2 {
		c := &hist[p]
		var sum uint32
		for i, v := range c {
			c[i] = sum
			sum += v
		}
		ds := shift + 8*p
		for _, x := range src {
			b := byte((uint32(x>>32) - lo) >> ds)
			dst[c[b]] = x
			c[b]++
		}
		src, dst = dst, src
	}
	if shift > 0 {
		moves := 0
		for i := 1; i < n; i++ {
			x := src[i]
			if src[i-1] <= x {
				continue
			}
			j := i
			for j > 0 && src[j-1] > x {
				src[j] = src[j-1]
				j--
			}
			src[j] = x
			if moves += i - j; moves > 8*n {
				slices.Sort(src)
				break
			}
		}
	}
	return src
}

// topRankedSampled is the ranking TopRanked made before its SIMD filter
// and radix sort, kept for scores with a NaN: the answer depends then on
// the quickselects (a NaN cut, for one, passes no score and hands the
// list to TopScores), and TopRanked gives the same answer as before for
// every input. The cuts come from a strided sample of the scores (a
// quickselect each), the clusters above a cut are found by a scalar
// scan and sorted as packed keys.
func (h *Head) topRankedSampled(score []float32, budget int, sc *Scratch, out []int32) []int32 {
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
