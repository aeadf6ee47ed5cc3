package hyper

import (
	"fmt"
	"math"
	"slices"
)

// Shape describes the layout of Reference's inputs: q is [n][Heads][HeadDim]
// row-major (ggml's [headDim, heads, n]); k and v are [n][KVHeads][HeadDim].
// Query head h reads KV head h/(Heads/KVHeads), as ggml broadcasts.
type Shape struct{ Heads, KVHeads, HeadDim int }

func (s Shape) check(q, k, v []float32) (n int, err error) {
	if s.Heads < 1 || s.KVHeads < 1 || s.HeadDim < 1 || s.Heads%s.KVHeads != 0 {
		return 0, fmt.Errorf("hyper: heads %d, KV heads %d, head dim %d: want positive, heads a multiple of KV heads", s.Heads, s.KVHeads, s.HeadDim)
	}
	n = len(q) / (s.Heads * s.HeadDim)
	if n < 1 || len(q) != n*s.Heads*s.HeadDim || len(k) != n*s.KVHeads*s.HeadDim || len(v) != len(k) {
		return 0, fmt.Errorf("hyper: q has %d values, k %d, v %d: not n tokens of %d query and %d KV heads of %d", len(q), len(k), len(v), s.Heads, s.KVHeads, s.HeadDim)
	}
	if n > MaxTokens {
		return 0, fmt.Errorf("hyper: %d tokens: at most %d", n, MaxTokens)
	}
	return n, nil
}

// Reference computes HyperAttention in float64, in the layout of q. With
// causal false every query sees every key (the paper's unmasked algorithm);
// with causal true it is the paper's recursive halving over the sequence
// padded with zero tokens as Config.Padded says (the padding sorts with the
// real tokens in the approximated halves; its outputs are dropped).
func Reference(c Config, s Shape, q, k, v []float32, scale float64, causal bool) ([]float32, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	n, err := s.check(q, k, v)
	if err != nil {
		return nil, err
	}
	N := n
	if causal {
		// Zero tokens up to N = leaf·2^k, so that every halving is exact.
		N, _ = c.Padded(n)
		q = append(q[:len(q):len(q)], make([]float32, (N-n)*s.Heads*s.HeadDim)...)
		k = append(k[:len(k):len(k)], make([]float32, (N-n)*s.KVHeads*s.HeadDim)...)
		v = append(v[:len(v):len(v)], make([]float32, (N-n)*s.KVHeads*s.HeadDim)...)
	}
	r := &ref{c: c, s: s, q: q, k: k, v: v, scale: scale, proj: c.projections(s.HeadDim)}
	out := make([]float32, n*s.Heads*s.HeadDim)
	for h := 0; h < s.Heads; h++ {
		var res []row
		if causal {
			res = r.causal(h, 0, N)[:n]
		} else {
			res = r.unmasked(h, 0, n, 0, n)
		}
		for t, x := range res {
			for d, y := range x.o {
				out[(t*s.Heads+h)*s.HeadDim+d] = float32(y)
			}
		}
	}
	return out, nil
}

// Exact is softmax(q·kᵀ·scale)·v in float64 (causal: token t sees 0..t).
func Exact(s Shape, q, k, v []float32, scale float64, causal bool) ([]float32, error) {
	n, err := s.check(q, k, v)
	if err != nil {
		return nil, err
	}
	r := &ref{s: s, q: q, k: k, v: v, scale: scale}
	out := make([]float32, len(q))
	for h := 0; h < s.Heads; h++ {
		for t := 0; t < n; t++ {
			hi := n
			if causal {
				hi = t + 1
			}
			x := r.attend(h, t, seq(0, hi), nil, 0)
			for d, y := range x.o {
				out[(t*s.Heads+h)*s.HeadDim+d] = float32(y)
			}
		}
	}
	return out, nil
}

// ExactWindow is causal exact attention within a sliding window: query t
// sees keys t-window+1 .. t (CausalWindow's reference).
func ExactWindow(s Shape, q, k, v []float32, scale float64, window int) ([]float32, error) {
	n, err := s.check(q, k, v)
	if err != nil {
		return nil, err
	}
	if window < 1 {
		return nil, fmt.Errorf("hyper: window %d: want at least 1", window)
	}
	r := &ref{s: s, q: q, k: k, v: v, scale: scale}
	out := make([]float32, len(q))
	for h := 0; h < s.Heads; h++ {
		for t := 0; t < n; t++ {
			x := r.attend(h, t, seq(max(0, t-window+1), t+1), nil, 0)
			for d, y := range x.o {
				out[(t*s.Heads+h)*s.HeadDim+d] = float32(y)
			}
		}
	}
	return out, nil
}

// row is one query's normalised output and its log-sum-exp.
type row struct {
	o   []float64
	lse float64
}

type ref struct {
	c       Config
	s       Shape
	q, k, v []float32
	scale   float64
	proj    []float32
}

func (r *ref) qrow(t, h int) []float32 {
	d := r.s.HeadDim
	return r.q[(t*r.s.Heads+h)*d : (t*r.s.Heads+h+1)*d]
}

func (r *ref) krow(x []float32, t, g int) []float32 {
	d := r.s.HeadDim
	return x[(t*r.s.KVHeads+g)*d : (t*r.s.KVHeads+g+1)*d]
}

func (r *ref) kvHead(h int) int { return h / (r.s.Heads / r.s.KVHeads) }

func seq(lo, hi int) []int {
	s := make([]int, hi-lo)
	for i := range s {
		s[i] = lo + i
	}
	return s
}

// attend is the exact attention of query t of head h over keys, plus the
// keys in extra with log-weight logw added to their scores.
func (r *ref) attend(h, t int, keys, extra []int, logw float64) row {
	g := r.kvHead(h)
	qv := r.qrow(t, h)
	score := func(p int) float64 {
		kv := r.krow(r.k, p, g)
		dot := 0.0
		for i := range qv {
			dot += float64(qv[i]) * float64(kv[i])
		}
		return dot * r.scale
	}
	sc := make([]float64, 0, len(keys)+len(extra))
	for _, p := range keys {
		sc = append(sc, score(p))
	}
	for _, p := range extra {
		sc = append(sc, score(p)+logw)
	}
	mx := negInf
	for _, x := range sc {
		mx = math.Max(mx, x)
	}
	o := make([]float64, r.s.HeadDim)
	sum := 0.0
	for i, x := range sc {
		p := keys
		j := i
		if i >= len(keys) {
			p, j = extra, i-len(keys)
		}
		w := math.Exp(x - mx)
		sum += w
		vv := r.krow(r.v, p[j], g)
		for d := range o {
			o[d] += w * float64(vv[d])
		}
	}
	for d := range o {
		o[d] /= sum
	}
	return row{o: o, lse: mx + math.Log(sum)}
}

// causal is the paper's recursion over tokens [lo, hi) of head h: exact up
// to MinSeqLen tokens; else both halves recursively, and the second half's
// queries also attend the first half's keys with the unmasked algorithm,
// merged by log-sum-exp.
func (r *ref) causal(h, lo, hi int) []row {
	if hi-lo <= r.c.MinSeqLen {
		out := make([]row, hi-lo)
		for t := lo; t < hi; t++ {
			out[t-lo] = r.attend(h, t, seq(lo, t+1), nil, 0)
		}
		return out
	}
	mid := lo + (hi-lo+1)/2
	top := r.causal(h, lo, mid)
	bottom := r.causal(h, mid, hi)
	off := r.unmasked(h, mid, hi, lo, mid)
	for i := range bottom {
		bottom[i] = merge(bottom[i], off[i])
	}
	return append(top, bottom...)
}

func merge(a, b row) row {
	mx := math.Max(a.lse, b.lse)
	wa, wb := math.Exp(a.lse-mx), math.Exp(b.lse-mx)
	o := make([]float64, len(a.o))
	for d := range o {
		o[d] = (a.o[d]*wa + b.o[d]*wb) / (wa + wb)
	}
	return row{o: o, lse: mx + math.Log(wa+wb)}
}

// bucket returns the Gray-code rank of x's SimHash bits (bit i set when x
// is on the positive side of projection i).
func (r *ref) bucket(x []float32) int {
	d := r.s.HeadDim
	bits := 0
	for i := 0; i < r.c.Projections; i++ {
		dot := 0.0
		for j, y := range x {
			dot += float64(y) * float64(r.proj[i*d+j])
		}
		if dot > 0 {
			bits |= 1 << i
		}
	}
	return grayRank(bits, r.c.Projections)
}

// order returns positions lo..hi-1 sorted by (bucket, position).
func order(lo, hi int, bucket func(t int) int) []int {
	idx := seq(lo, hi)
	b := make(map[int]int, hi-lo)
	for _, t := range idx {
		b[t] = bucket(t)
	}
	slices.SortFunc(idx, func(x, y int) int {
		if b[x] != b[y] {
			return b[x] - b[y]
		}
		return x - y
	})
	return idx
}

// unmasked is the paper's algorithm without a mask: queries [qlo, qhi)
// over keys [klo, khi) of head h, exact when there are fewer than
// MinSeqLen queries. Queries and keys are sorted by bucket; the queries of
// block i (in sorted order) attend the keys of block i exactly, plus the
// sampled sorted keys outside block i, each weighted nk/m.
func (r *ref) unmasked(h, qlo, qhi, klo, khi int) []row {
	nq, nk := qhi-qlo, khi-klo
	out := make([]row, nq)
	if nq < r.c.MinSeqLen {
		for t := qlo; t < qhi; t++ {
			out[t-qlo] = r.attend(h, t, seq(klo, khi), nil, 0)
		}
		return out
	}
	g := r.kvHead(h)
	qs := order(qlo, qhi, func(t int) int { return r.bucket(r.qrow(t, h)) })
	ks := order(klo, khi, func(t int) int { return r.bucket(r.krow(r.k, t, g)) })
	b := r.c.BlockSize
	_, bq := r.c.blocks(nq, nk)
	samp := r.c.samples(klo, khi, r.s.KVHeads)[g]
	logw := math.Log(float64(nk) / float64(r.c.Samples))
	for i, t := range qs {
		blk := i / bq
		keys := ks[blk*b : min((blk+1)*b, nk)]
		var extra []int
		for _, s := range samp {
			if int(s)/b != blk {
				extra = append(extra, ks[s])
			}
		}
		out[t-qlo] = r.attend(h, t, keys, extra, logw)
	}
	return out
}
