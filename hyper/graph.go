package hyper

import (
	"fmt"
	"math"

	"github.com/ollama/ollama/ml"
)

// masked is the score of a hidden column. Not -Inf: a row whose columns are
// all hidden (a sample set that falls inside the query's own block) must
// give weight 0 in the merge, not NaN.
const masked = -1e30

// Attention builds HyperAttention as ggml graph ops: q [headDim, heads, n],
// k and v [headDim, kvHeads, n] (query head h reads KV head h/(heads/kvHeads))
// give [headDim, heads, n]. It is the same algorithm as Reference, with the
// same projections, sort order and samples. The settings must be valid
// (Validate) and n at most MaxTokens.
func Attention(ctx ml.Context, c Config, q, k, v ml.Tensor, scale float64, causal bool) ml.Tensor {
	if err := c.Validate(); err != nil {
		panic(err)
	}
	d, H, n := q.Dim(0), q.Dim(1), q.Dim(2)
	if n > MaxTokens {
		panic(fmt.Sprintf("hyper: %d tokens: at most %d", n, MaxTokens))
	}
	g := &graph{ctx: ctx, c: c, scale: scale, d: d, heads: H, kvHeads: k.Dim(1), masks: map[int]ml.Tensor{}}
	g.q = q.Permute(ctx, 0, 2, 1, 3).Contiguous(ctx)  // [d, n, H]
	g.k = k.Permute(ctx, 0, 2, 1, 3).Contiguous(ctx)  // [d, n, kvHeads]
	g.v = v.Permute(ctx, 0, 2, 1, 3).Contiguous(ctx)  // [d, n, kvHeads]
	g.vt = v.Permute(ctx, 1, 2, 0, 3).Contiguous(ctx) // [n, d, kvHeads]
	var p part
	if causal {
		p = g.causal(0, n)
	} else {
		p = g.unmasked(0, n, 0, n)
	}
	return p.o.Permute(ctx, 0, 2, 1, 3).Contiguous(ctx) // [d, n, H] -> [d, H, n]
}

// part is attention over a subset of the keys, for queries in token order:
// o = softmax(x)·v [d, nq, H], and the normaliser as c [1, nq, H], a
// stabiliser within log(columns) below the largest score (Σ softmax(x)·x),
// and z = Σ exp(x - c) [1, nq, H], so that exp(lse) = z·exp(c) without a
// log (ggml has none) and neither overflows nor underflows.
type part struct{ o, c, z ml.Tensor }

type graph struct {
	ctx               ml.Context
	c                 Config
	scale             float64
	d, heads, kvHeads int
	q, k, v, vt       ml.Tensor
	proj, upper, enc  ml.Tensor
	masks             map[int]ml.Tensor // causal masks by size
}

// tokens returns the view of x [d, n, heads] over tokens [lo, hi).
func tokens(ctx ml.Context, x ml.Tensor, lo, hi int) ml.Tensor {
	return x.View(ctx, lo*x.Stride(1), x.Dim(0), x.Stride(1), hi-lo, x.Stride(2), x.Dim(2))
}

// tokensT returns the view of vt [n, d, kvHeads] over tokens [lo, hi).
func tokensT(ctx ml.Context, x ml.Tensor, lo, hi int) ml.Tensor {
	return x.View(ctx, lo*x.Stride(0), hi-lo, x.Stride(1), x.Dim(1), x.Stride(2), x.Dim(2))
}

// soft returns softmax(x) over dim 0 and x's (c, z) (see part).
func (g *graph) soft(x ml.Tensor) (p, c, z ml.Tensor) {
	p = x.Softmax(g.ctx)
	c = p.Mul(g.ctx, x).SumRows(g.ctx)
	z = x.Sub(g.ctx, c).Exp(g.ctx).SumRows(g.ctx)
	return p, c, z
}

// exact is exact attention of queries [qlo, qhi) over keys [klo, khi),
// causal when the ranges are the same (then the mask hides the future).
func (g *graph) exact(qlo, qhi, klo, khi int, causal bool) part {
	ctx := g.ctx
	x := tokens(ctx, g.k, klo, khi).MulmatFullPrec(ctx, tokens(ctx, g.q, qlo, qhi)) // [nk, nq, H]
	x = x.Scale(ctx, g.scale)
	if causal {
		x = x.Add(ctx, g.causalMask(qhi-qlo))
	}
	p, c, z := g.soft(x)
	o := tokensT(ctx, g.vt, klo, khi).Mulmat(ctx, p) // [d, nq, H]
	return part{o, c, z}
}

// causalMask is [L, L]: row i hides columns past i.
func (g *graph) causalMask(L int) ml.Tensor {
	if m, ok := g.masks[L]; ok {
		return m
	}
	m := make([]float32, L*L)
	for i := 0; i < L; i++ {
		for j := i + 1; j < L; j++ {
			m[i*L+j] = masked
		}
	}
	t := g.ctx.Input().FromFloats(m, L, L)
	g.masks[L] = t
	return t
}

// causal is the paper's recursive halving over tokens [lo, hi).
func (g *graph) causal(lo, hi int) part {
	if hi-lo <= g.c.MinSeqLen {
		return g.exact(lo, hi, lo, hi, true)
	}
	mid := lo + (hi-lo+1)/2
	top := g.causal(lo, mid)
	bottom := g.merge(g.causal(mid, hi), g.unmasked(mid, hi, lo, mid))
	ctx := g.ctx
	return part{
		o: top.o.Concat(ctx, bottom.o, 1),
		c: top.c.Concat(ctx, bottom.c, 1),
		z: top.z.Concat(ctx, bottom.z, 1),
	}
}

// merge combines attention over two disjoint key sets: the log-sum-exp
// merge, with the larger stabiliser as the common one.
func (g *graph) merge(a, b part) part {
	ctx := g.ctx
	c := b.c.Add(ctx, a.c.Sub(ctx, b.c).RELU(ctx)) // max(a.c, b.c)
	wa := a.z.Mul(ctx, a.c.Sub(ctx, c).Exp(ctx))
	wb := b.z.Mul(ctx, b.c.Sub(ctx, c).Exp(ctx))
	z := wa.Add(ctx, wb)
	o := a.o.Mul(ctx, wa).Add(ctx, b.o.Mul(ctx, wb)).Div(ctx, z)
	return part{o, c, z}
}

// sortIndex returns, per head, the tokens of x [d, n, heads] sorted by
// (Gray-code rank of their SimHash bucket, token): I32 [n, heads].
func (g *graph) sortIndex(x ml.Tensor) ml.Tensor {
	ctx := g.ctx
	r := g.c.Projections
	if g.proj == nil {
		g.proj = ctx.Input().FromFloats(g.c.projections(g.d), g.d, r) // [d, r]
		// upper [r, r]: column i sums bits i..r-1; enc [r, 1]: 2^i·MaxTokens.
		up := make([]float32, r*r)
		enc := make([]float32, r)
		for i := 0; i < r; i++ {
			for k := i; k < r; k++ {
				up[i*r+k] = 1
			}
			enc[i] = float32(int(1)<<i) * MaxTokens
		}
		g.upper = ctx.Input().FromFloats(up, r, r)
		g.enc = ctx.Input().FromFloats(enc, r, 1)
	}
	n, heads := x.Dim(1), x.Dim(2)
	// Sign bits: x·p > 0 -> 1, else 0 (scaled past every finite value, clamped).
	bits := g.proj.MulmatFullPrec(ctx, x).Scale(ctx, 1e38).Clamp(ctx, 0, 1) // [r, n, heads]
	// Bit i of the Gray rank is the parity of bits i..r-1: cos(π·sum) is ±1.
	par := g.upper.MulmatFullPrec(ctx, bits).Scale(ctx, math.Pi).Cos(ctx).Scale(ctx, -1e38).Clamp(ctx, 0, 1)
	key := g.enc.MulmatFullPrec(ctx, par) // [1, n, heads], rank·MaxTokens
	idx := make([]float32, n)
	for i := range idx {
		idx[i] = float32(i)
	}
	key = key.Add(ctx, ctx.Input().FromFloats(idx, 1, n, 1)) // unique keys: the sort needs no stability
	return key.Reshape(ctx, n, heads).Argsort(ctx)
}

// unmasked is the paper's algorithm without a mask: queries [qlo, qhi) over
// keys [klo, khi), exact with fewer than MinSeqLen queries (see
// ref.unmasked).
func (g *graph) unmasked(qlo, qhi, klo, khi int) part {
	nq, nk := qhi-qlo, khi-klo
	if nq < g.c.MinSeqLen {
		return g.exact(qlo, qhi, klo, khi, false)
	}
	ctx := g.ctx
	d, H, Hkv, b := g.d, g.heads, g.kvHeads, g.c.BlockSize
	qv, kv := tokens(ctx, g.q, qlo, qhi), tokens(ctx, g.k, klo, khi)
	qidx := g.sortIndex(qv)                          // [nq, H]
	kidx := g.sortIndex(kv)                          // [nk, kvHeads]
	qs := qv.Rows(ctx, qidx)                         // [d, nq, H] in sorted order
	ks := kv.Rows(ctx, kidx)                         // [d, nk, kvHeads]
	vs := tokens(ctx, g.v, klo, khi).Rows(ctx, kidx) // [d, nk, kvHeads]
	nb, bq := g.c.blocks(nq, nk)
	qp, kp, vp := qs, ks, vs
	if pad := nb*bq - nq; pad > 0 {
		qp = qs.Pad(ctx, 0, pad, 0, 0)
	}
	if pad := nb*b - nk; pad > 0 {
		kp = ks.Pad(ctx, 0, pad, 0, 0)
		vp = vs.Pad(ctx, 0, pad, 0, 0)
	}
	// Diagonal blocks: block i of the sorted queries against block i of the
	// sorted keys, [b, bq, nb, H].
	xb := kp.Reshape(ctx, d, b, nb, Hkv).MulmatFullPrec(ctx, qp.Reshape(ctx, d, bq, nb, H)).Scale(ctx, g.scale)
	if pad := nb*b - nk; pad > 0 {
		m := make([]float32, b*nb) // [b, 1, nb, 1]: padded keys hidden
		for j := nk; j < nb*b; j++ {
			m[j] = masked
		}
		xb = xb.Add(ctx, ctx.Input().FromFloats(m, b, 1, nb, 1))
	}
	x := xb
	m := g.c.Samples
	var vsT ml.Tensor
	if m > 0 && nb > 1 {
		samp := g.c.samples(klo, khi, Hkv)
		flat := make([]int32, 0, m*Hkv)
		for _, s := range samp {
			flat = append(flat, s...)
		}
		sidx := ctx.Input().FromInts(flat, m, Hkv)
		// Sampled columns, weighted nk/m, hidden from the queries of their
		// own block: [m, 1, nb, H] added to the scores [m, bq, nb, H].
		logw := float32(math.Log(float64(nk) / float64(m)))
		mk := make([]float32, m*nb*H)
		G := H / Hkv
		for h := 0; h < H; h++ {
			for blk := 0; blk < nb; blk++ {
				for j, s := range samp[h/G] {
					w := logw
					if int(s)/b == blk {
						w = masked
					}
					mk[(h*nb+blk)*m+j] = w
				}
			}
		}
		xs := ks.Rows(ctx, sidx).MulmatFullPrec(ctx, qp) // [m, nb*bq, H]
		xs = xs.Reshape(ctx, m, bq, nb, H).Scale(ctx, g.scale).Add(ctx, ctx.Input().FromFloats(mk, m, 1, nb, H))
		x = xb.Concat(ctx, xs, 0) // [b+m, bq, nb, H]: one softmax is the LSE merge of both
		vsT = vs.Rows(ctx, sidx).Permute(ctx, 1, 0, 2, 3).Contiguous(ctx).Reshape(ctx, m, d, 1, Hkv)
	}
	p, c, z := g.soft(x)
	vbT := vp.Reshape(ctx, d, b, nb, Hkv).Permute(ctx, 1, 0, 2, 3).Contiguous(ctx) // [b, d, nb, kvHeads]
	pb := p
	if vsT != nil {
		pb = p.View(ctx, 0, b, p.Stride(1), bq, p.Stride(2), nb, p.Stride(3), H)
	}
	o := vbT.Mulmat(ctx, pb) // [d, bq, nb, H]
	if vsT != nil {
		ps := p.View(ctx, b*p.Stride(0), m, p.Stride(1), bq, p.Stride(2), nb, p.Stride(3), H)
		o = o.Add(ctx, vsT.Mulmat(ctx, ps))
	}
	// Back to token order: rows [o; c; z] of sorted query i go to token qidx[i].
	pack := o.Reshape(ctx, d, bq*nb, H).Concat(ctx, c.Reshape(ctx, 1, bq*nb, H), 0).Concat(ctx, z.Reshape(ctx, 1, bq*nb, H), 0) // [d+2, nb*bq, H]
	dst := pack.Scale(ctx, 0)                                                                                                   // every row is written: only its shape matters
	if nb*bq > nq {
		pack = pack.View(ctx, 0, d+2, pack.Stride(1), nq, pack.Stride(2), H)
		dst = dst.View(ctx, 0, d+2, dst.Stride(1), nq, dst.Stride(2), H)
	}
	out := dst.SetRows(ctx, pack, qidx)
	return part{
		o: out.View(ctx, 0, d, out.Stride(1), nq, out.Stride(2), H),
		c: out.View(ctx, d*out.Stride(0), 1, out.Stride(1), nq, out.Stride(2), H),
		z: out.View(ctx, (d+1)*out.Stride(0), 1, out.Stride(1), nq, out.Stride(2), H),
	}
}

// Causal builds exact causal attention as ggml graph ops in query chunks
// of at most chunk tokens, so that no [n, n] scores exist at once: each
// chunk's scores are [chunk end, chunk, heads]. Shapes as in Attention.
// It is the exact path of a one-batch prefill's other layers.
func Causal(ctx ml.Context, q, k, v ml.Tensor, scale float64, chunk int) ml.Tensor {
	if chunk < 1 {
		panic(fmt.Sprintf("hyper: exact chunk %d: want at least 1", chunk))
	}
	d, H, n := q.Dim(0), q.Dim(1), q.Dim(2)
	g := &graph{ctx: ctx, scale: scale, d: d, heads: H, kvHeads: k.Dim(1), masks: map[int]ml.Tensor{}}
	g.q = q.Permute(ctx, 0, 2, 1, 3).Contiguous(ctx)  // [d, n, H]
	g.k = k.Permute(ctx, 0, 2, 1, 3).Contiguous(ctx)  // [d, n, kvHeads]
	g.vt = v.Permute(ctx, 1, 2, 0, 3).Contiguous(ctx) // [n, d, kvHeads]
	var out ml.Tensor
	for lo := 0; lo < n; lo += chunk {
		hi := min(lo+chunk, n)
		keys, vals := tokens(ctx, g.k, lo, hi), tokensT(ctx, g.vt, lo, hi)
		mask := g.causalMask(hi - lo) // [c, c]
		if lo > 0 {
			// The chunk's own keys first, then the earlier ones: the
			// causal mask padded with zeros at its end covers them all.
			keys = keys.Concat(ctx, tokens(ctx, g.k, 0, lo), 1)   // [d, hi, kvHeads]
			vals = vals.Concat(ctx, tokensT(ctx, g.vt, 0, lo), 0) // [hi, d, kvHeads]
			mask = mask.Pad(ctx, lo, 0, 0, 0)                     // [hi, c]
		}
		x := keys.MulmatFullPrec(ctx, tokens(ctx, g.q, lo, hi)).Scale(ctx, scale).Add(ctx, mask) // [hi, c, H]
		o := vals.Mulmat(ctx, x.Softmax(ctx))                                                    // [d, c, H]
		if out == nil {
			out = o
		} else {
			out = out.Concat(ctx, o, 1)
		}
	}
	return out.Permute(ctx, 0, 2, 1, 3).Contiguous(ctx) // [d, n, H] -> [d, H, n]
}

// GraphSize is an upper estimate of the ggml tensors that Attention (with
// chunk 0) or Causal (with chunk > 0) creates for n tokens: a ggml context
// holds a fixed number (ml.Context.MaxGraphNodes), and running out aborts
// the process, so callers check before building. Each unmasked
// approximation costs about 80 tensors (counted from the code), so the count grows as
// n/MinSeqLen.
func GraphSize(c Config, n, chunk int) int {
	if chunk > 0 {
		return 16 + 14*((n+chunk-1)/chunk)
	}
	var size func(lo, hi int) int
	size = func(lo, hi int) int {
		if hi-lo <= c.MinSeqLen {
			return 15
		}
		mid := lo + (hi-lo+1)/2
		approx := 15
		if hi-mid >= c.MinSeqLen {
			approx = 100
		}
		return size(lo, mid) + size(mid, hi) + approx + 17
	}
	return 16 + size(0, n)
}
