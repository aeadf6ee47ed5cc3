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
// same projections, sort order and samples. The causal recursion is built
// level by level: every segment of a level has the same size (the sequence
// is padded as Padded says), so a level is one set of ops over all its
// segments, with segments as extra heads, and the graph's size grows with
// log(n/MinSeqLen), not n/MinSeqLen. The settings must be valid (Validate)
// and n at most MaxTokens.
func Attention(ctx ml.Context, c Config, q, k, v ml.Tensor, scale float64, causal bool) ml.Tensor {
	if err := c.Validate(); err != nil {
		panic(err)
	}
	d, H, n := q.Dim(0), q.Dim(1), q.Dim(2)
	if n > MaxTokens {
		panic(fmt.Sprintf("hyper: %d tokens: at most %d", n, MaxTokens))
	}
	g := newGraph(ctx, scale, d, H, k.Dim(1))
	g.c = c
	N, leaf := n, n
	if causal {
		N, leaf = c.Padded(n)
	}
	g.prepare(q, k, v, N)
	var pack ml.Tensor // [d+2, N, H]: o, c, z (see part)
	if causal {
		pack = g.levels(g.leafPass(N, leaf), N, leaf, N)
	} else {
		pack = g.unmasked(g.q, g.qh, g.k, g.v, [][][]int32{c.samples(0, n, g.kvHeads)})
	}
	return g.result(pack, n)
}

// prepare sets the graph's q, qh, k and v from q [d, heads, n] and k, v
// [d, kvHeads, n]: token-major per head, padded to N tokens.
func (g *graph) prepare(q, k, v ml.Tensor, N int) {
	ctx := g.ctx
	n := q.Dim(2)
	g.qh = q.Permute(ctx, 0, 2, 1, 3).Contiguous(ctx) // [d, n, H]
	g.k = k.Permute(ctx, 0, 2, 1, 3).Contiguous(ctx)  // [d, n, kvHeads]
	g.v = v.Permute(ctx, 0, 2, 1, 3).Contiguous(ctx)  // [d, n, kvHeads]
	if N > n {
		// Zero tokens at the end: they are in every real query's future,
		// or only keys of segments whose queries are all padding.
		g.qh = g.qh.Pad(ctx, 0, N-n, 0, 0)
		g.k = g.k.Pad(ctx, 0, N-n, 0, 0)
		g.v = g.v.Pad(ctx, 0, N-n, 0, 0)
	}
	g.q = g.qh.Scale(ctx, g.scale)
}

// result is the attention output [d, heads, n] of the first n tokens of a
// pack [d+2, N, heads].
func (g *graph) result(pack ml.Tensor, n int) ml.Tensor {
	o := pack.View(g.ctx, 0, g.d, pack.Stride(1), n, pack.Stride(2), g.heads)
	return o.Permute(g.ctx, 0, 2, 1, 3).Contiguous(g.ctx) // [d, n, H] -> [d, H, n]
}

// Staged is causal Attention over host values, computed in as many graphs
// as it takes to keep each within nodes tensors (a backend's
// ml.Context.MaxGraphNodes): the leaves and the first levels of the
// recursion in the first graph, then as many levels per graph as fit, the
// running pack [d+2, N, heads] carried through host memory in between.
// The ops and their f32 values are Attention's, so the result is the
// same. A model with few tensors gets a small graph size from ollama's
// backend (32 per weight, at least 1024), too small for the recursion of a
// long sequence in one graph. q is [d, heads, n] and k, v [d, kvHeads, n]
// (row-major, d fastest); newCtx makes a context for each graph. Returns
// [d, heads, n].
func Staged(newCtx func() ml.Context, c Config, s Shape, q, k, v []float32, scale float64, nodes int) ([]float32, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	n, err := s.check(q, k, v)
	if err != nil {
		return nil, err
	}
	if n > MaxTokens {
		return nil, fmt.Errorf("hyper: %d tokens: at most %d", n, MaxTokens)
	}
	plan, err := c.Stages(n, nodes)
	if err != nil {
		return nil, err
	}
	d, H := s.HeadDim, s.Heads
	N, leaf := c.Padded(n)
	var acc []float32 // [d+2, N, H] between graphs
	for i, st := range plan {
		ctx := newCtx()
		g := newGraph(ctx, scale, d, H, s.KVHeads)
		g.c = c
		g.prepare(ctx.Input().FromFloats(q, d, H, n), ctx.Input().FromFloats(k, d, s.KVHeads, n), ctx.Input().FromFloats(v, d, s.KVHeads, n), N)
		var pack ml.Tensor
		if i == 0 {
			pack = g.leafPass(N, leaf)
		} else {
			pack = ctx.Input().FromFloats(acc, d+2, N, H)
		}
		pack = g.levels(pack, N, st[0], st[1])
		out, dst := pack, ctx.Input().Empty(ml.DTypeF32, d+2, N, H)
		if i == len(plan)-1 {
			out, dst = g.result(pack, n), ctx.Input().Empty(ml.DTypeF32, d, H, n)
		}
		// The result is copied out of the backend's shared compute buffer
		// into a tensor of this context before it is read.
		ctx.Forward(out.Copy(ctx, dst)).Compute(dst)
		acc = dst.Floats()
		ctx.Close()
	}
	return acc, nil
}

// Stages plans Staged's graphs for a causal pass of n tokens within nodes
// tensors each: graph i computes the levels whose half-segment length is
// in [from, to) (graph 0 also the leaves; its range may be empty). One
// graph is Attention's whole pass.
func (c Config) Stages(n, nodes int) ([][2]int, error) {
	N, leaf := c.Padded(n)
	budget := nodes - stageBase - leafSize(leaf)
	if budget < 0 {
		return nil, fmt.Errorf("hyper: the exact leaves of %d tokens (min_seq_len %d) need about %d graph nodes; the backend allows %d: lower min_seq_len", leaf, c.MinSeqLen, stageBase+leafSize(leaf), nodes)
	}
	if nodes-stageBase < levelSize && 2*leaf <= N {
		return nil, fmt.Errorf("hyper: a level of the recursion needs about %d graph nodes; the backend allows %d", stageBase+levelSize, nodes)
	}
	var plan [][2]int
	from := leaf
	for first := true; first || from < N; first = false {
		to := from
		for 2*to <= N && budget >= levelSize {
			to *= 2
			budget -= levelSize
		}
		plan = append(plan, [2]int{from, to})
		from, budget = to, nodes-stageBase
	}
	return plan, nil
}

// Padded returns the length N >= n that a causal pass of n tokens is
// computed over (zero tokens appended) and its leaf size: N = leaf·2^k with
// the least k such that leaf = ceil(n/2^k) <= MinSeqLen, so that every
// halving of the recursion is exact.
func (c Config) Padded(n int) (N, leaf int) {
	k := 0
	for (n+(1<<k)-1)>>k > c.MinSeqLen {
		k++
	}
	leaf = (n + (1 << k) - 1) >> k
	return leaf << k, leaf
}

// part is attention over a subset of the keys, for queries in token order,
// packed as rows [d+2, nq, heads]: o = softmax(x)·v (d rows), then c, a
// stabiliser within log(columns) below the largest score (Σ softmax(x)·x),
// then z = Σ exp(x - c), so that exp(lse) = z·exp(c) without a log (ggml
// has none) and neither overflows nor underflows.
type graph struct {
	ctx               ml.Context
	c                 Config
	scale             float64
	d, heads, kvHeads int
	// q is the queries times scale ([d, N, heads]): the scores are then
	// one matmul with no pass over them to scale. qh is q unscaled, which
	// the SimHash hashes (as the reference does).
	q, qh, k, v, vt  ml.Tensor
	proj, upper, enc ml.Tensor
	masks            map[int]ml.Tensor // causal masks by size
	ones, spread     map[int]ml.Tensor // see rowSum and spreadRows, by columns
}

// tokens returns the view of x [d, n, heads] over tokens [lo, hi).
func tokens(ctx ml.Context, x ml.Tensor, lo, hi int) ml.Tensor {
	return x.View(ctx, lo*x.Stride(1), x.Dim(0), x.Stride(1), hi-lo, x.Stride(2), x.Dim(2))
}

// tokensT returns the view of vt [n, d, kvHeads] over tokens [lo, hi).
func tokensT(ctx ml.Context, x ml.Tensor, lo, hi int) ml.Tensor {
	return x.View(ctx, lo*x.Stride(0), hi-lo, x.Stride(1), x.Dim(1), x.Stride(2), x.Dim(2))
}

// segments returns, from x [d, N, heads], the half-segments of one level
// as [d, half, heads·segs] (head fastest, so that ggml's broadcast still
// maps query head h of segment s to KV head h/G of segment s): the first
// halves of the segments of length 2·half, or the second halves.
func (g *graph) segments(x ml.Tensor, half int, second bool) ml.Tensor {
	ctx := g.ctx
	d, N, heads := x.Dim(0), x.Dim(1), x.Dim(2)
	segs := N / (2 * half)
	off := 0
	if second {
		off = half * x.Stride(1)
	}
	v := x.View(ctx, off, d, x.Stride(1), half, 2*half*x.Stride(1), segs, x.Stride(2), heads) // [d, half, segs, heads]
	return v.Permute(ctx, 0, 1, 3, 2).Contiguous(ctx).Reshape(ctx, d, half, heads*segs)
}

// unsegment is segments' inverse for a pack [rows, half, heads·segs]:
// [rows, half, segs, heads].
func (g *graph) unsegment(p ml.Tensor, heads int) ml.Tensor {
	ctx := g.ctx
	rows, half, hs := p.Dim(0), p.Dim(1), p.Dim(2)
	return p.Reshape(ctx, rows, half, heads, hs/heads).Permute(ctx, 0, 1, 3, 2).Contiguous(ctx)
}

func newGraph(ctx ml.Context, scale float64, d, heads, kvHeads int) *graph {
	return &graph{ctx: ctx, scale: scale, d: d, heads: heads, kvHeads: kvHeads,
		masks: map[int]ml.Tensor{}, ones: map[int]ml.Tensor{}, spread: map[int]ml.Tensor{}}
}

// soft returns softmax(x) over dim 0 and x's c and z (see part).
func (g *graph) soft(x ml.Tensor) (p, c, z ml.Tensor) {
	p = x.Softmax(g.ctx)
	c = g.rowSum(p.Mul(g.ctx, x))
	z = g.rowSum(x.Sub(g.ctx, g.spreadRows(c, x.Dim(0))).Exp(g.ctx))
	return p, c, z
}

// rowSum is SumRows as a matmul with a ones vector: x [cols, a, b, c] ->
// [1, a, b, c]. ggml's CPU sum_rows runs on one thread (the others wait
// at the barrier); a matmul runs on all of them.
func (g *graph) rowSum(x ml.Tensor) ml.Tensor {
	cols := x.Dim(0)
	o, ok := g.ones[cols]
	if !ok {
		f := make([]float32, cols)
		for i := range f {
			f[i] = 1
		}
		o = g.ctx.Input().FromFloats(f, cols, 1) // [cols, 1]
		g.ones[cols] = o
	}
	return o.MulmatFullPrec(g.ctx, x)
}

// spreadK is the depth of spreadRows' matmul: ggml's CPU sgemm takes
// float32 only when the depth is a multiple of 16 (AVX-512's lanes).
const spreadK = 16

// spreadRows returns c [1, a, b, e] repeated along dim 0 to [cols, a, b,
// e], as the outer product of a ones row and c (exact: 1·c plus zeros).
// Why: x.Sub(c) with c one column wide is ggml's slow broadcast (one
// call per element), x.Sub(spreadRows(c)) is a vectorised pass.
func (g *graph) spreadRows(c ml.Tensor, cols int) ml.Tensor {
	e, ok := g.spread[cols]
	if !ok {
		f := make([]float32, spreadK*cols) // [spreadK, cols]: row 0 of each column is 1
		for j := 0; j < cols; j++ {
			f[j*spreadK] = 1
		}
		e = g.ctx.Input().FromFloats(f, spreadK, cols)
		g.spread[cols] = e
	}
	return e.MulmatFullPrec(g.ctx, c.Pad(g.ctx, spreadK-1, 0, 0, 0)) // [cols, a, b, e]
}

// exact is exact attention of q [d, nq, B] (already scaled) over keys
// k [d, nk, Bkv] with values transposed vT [nk, d, Bkv], with mask
// [nk, nq] if not nil; it returns the pack [d+2, nq, B].
func (g *graph) exact(q, k, vT, mask ml.Tensor) ml.Tensor {
	ctx := g.ctx
	x := k.MulmatFullPrec(ctx, q) // [nk, nq, B]
	if mask != nil {
		x = x.Add(ctx, mask)
	}
	p, c, z := g.soft(x)
	o := vT.Mulmat(ctx, p) // [d, nq, B]
	return o.Concat(ctx, c, 0).Concat(ctx, z, 0)
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

// The paper's causal recursion over N = leaf·2^k tokens goes level by
// level: exact causal attention inside every leaf (leafPass), then for
// each level from the deepest, the second halves of its segments attend
// their first halves (unmasked), merged into the running result by
// log-sum-exp (levels).

// leafPass is exact causal attention inside every leaf of the padded
// sequence: the pack [d+2, N, heads].
func (g *graph) leafPass(N, leaf int) ml.Tensor {
	ctx := g.ctx
	leaves := N / leaf
	// Leaves as heads: [d, leaf, heads·leaves].
	asLeaves := func(x ml.Tensor) ml.Tensor {
		return x.Reshape(ctx, x.Dim(0), leaf, leaves, x.Dim(2)).Permute(ctx, 0, 1, 3, 2).Contiguous(ctx).Reshape(ctx, x.Dim(0), leaf, x.Dim(2)*leaves)
	}
	acc := g.leaves(asLeaves(g.q), asLeaves(g.k), asLeaves(g.v)) // [d+2, leaf, H·leaves]
	return g.unsegment(acc, g.heads).Reshape(ctx, g.d+2, N, g.heads)
}

// levels merges into acc [d+2, N, heads] the levels of the recursion
// whose half-segments are from (inclusive) to to (exclusive) tokens long.
func (g *graph) levels(acc ml.Tensor, N, from, to int) ml.Tensor {
	ctx := g.ctx
	d, H, Hkv := g.d, g.heads, g.kvHeads
	var filler ml.Tensor
	for half := from; half < to && 2*half <= N; half *= 2 {
		segs := N / (2 * half)
		samp := make([][][]int32, segs)
		for s := range samp {
			samp[s] = g.c.samples(s*2*half, s*2*half+half, Hkv)
		}
		p := g.unmasked(g.segments(g.q, half, true), g.segments(g.qh, half, true), g.segments(g.k, half, false), g.segments(g.v, half, false), samp)
		p = g.unsegment(p, H) // [d+2, half, segs, H]: the second halves
		if filler == nil {
			// First halves get no part: o 0, c -1e30, z 1 (weight 0).
			f := make([]float32, d+2)
			f[d], f[d+1] = masked, 1
			filler = ctx.Input().FromFloats(f, d+2, 1, 1, 1)
		}
		full := filler.Repeat4D(ctx, d+2, half, segs, H).Concat(ctx, p, 1).Reshape(ctx, d+2, N, H)
		acc = g.merge(acc, full)
	}
	return acc
}

// leafChunk is the query chunk of the exact causal attention inside the
// leaves: only the scores at or below the diagonal are computed, in
// [chunk end, chunk] pieces. The chunks in the second half of a leaf are
// half as long (leafSpans), so that the largest scores, the last chunk's
// [leaf, chunk, heads·leaves], are N·leafChunk/2·heads floats: as large as
// a level's [b+m, N/2, heads] with the paper's b+m = 512, and half of what
// they were with 512 throughout (1 GiB at 64k on the tiny preset).
const leafChunk = 512

// leafSpans returns the query chunks [lo, hi) of a leaf of L tokens.
func leafSpans(L int) [][2]int {
	var out [][2]int
	for lo := 0; lo < L; {
		c := leafChunk
		if lo+leafChunk > L/2 {
			c = leafChunk / 2
		}
		hi := min(lo+c, L)
		out = append(out, [2]int{lo, hi})
		lo = hi
	}
	return out
}

// leaves is exact causal attention of q [d, L, B] (scaled) over k, v
// [d, L, Bkv] in the query chunks of leafSpans: chunk [lo, hi) against
// keys [0, hi) under a mask that hides the keys past each query. The
// chunk's queries are copied to a contiguous tensor: ggml's CPU matmul
// uses its fast sgemm only when the right operand is contiguous, and a
// view of tokens [lo, hi) across heads is not (a dot product per output
// instead, about 2x slower for these scores). Returns the pack
// [d+2, L, B].
func (g *graph) leaves(q, k, v ml.Tensor) ml.Tensor {
	ctx := g.ctx
	L := q.Dim(1)
	vT := v.Permute(ctx, 1, 0, 2, 3).Contiguous(ctx) // [L, d, Bkv]
	var out ml.Tensor
	for _, sp := range leafSpans(L) {
		lo, hi := sp[0], sp[1]
		qc := tokens(ctx, q, lo, hi)
		if L > hi-lo {
			qc = qc.Contiguous(ctx)
		}
		p := g.exact(qc, tokens(ctx, k, 0, hi), tokensT(ctx, vT, 0, hi), g.chunkMask(lo, hi))
		if out == nil {
			out = p
		} else {
			out = out.Concat(ctx, p, 1)
		}
	}
	return out
}

// chunkMask is [hi, hi-lo]: query lo+i sees keys 0..lo+i.
func (g *graph) chunkMask(lo, hi int) ml.Tensor {
	if lo == 0 {
		return g.causalMask(hi)
	}
	c := hi - lo
	m := make([]float32, hi*c)
	for i := 0; i < c; i++ {
		for j := lo + i + 1; j < hi; j++ {
			m[i*hi+j] = masked
		}
	}
	return g.ctx.Input().FromFloats(m, hi, c)
}

// merge combines packs [d+2, n, H] of attention over disjoint key sets:
// the log-sum-exp merge, with the larger stabiliser as the common one. a's
// c must be finite; b's may be -1e30 (no part: weight 0).
func (g *graph) merge(a, b ml.Tensor) ml.Tensor {
	ctx := g.ctx
	d := g.d
	rows := func(p ml.Tensor, lo, n int) ml.Tensor {
		return p.View(ctx, lo*p.Stride(0), n, p.Stride(1), p.Dim(1), p.Stride(2), p.Dim(2))
	}
	ao, ac, az := rows(a, 0, d), rows(a, d, 1), rows(a, d+1, 1)
	bo, bc, bz := rows(b, 0, d), rows(b, d, 1), rows(b, d+1, 1)
	c := ac.Add(ctx, bc.Sub(ctx, ac).RELU(ctx)) // max(a.c, b.c)
	wa := az.Mul(ctx, ac.Sub(ctx, c).Exp(ctx))
	wb := bz.Mul(ctx, bc.Sub(ctx, c).Exp(ctx))
	z := wa.Add(ctx, wb)
	o := ao.Mul(ctx, wa).Add(ctx, bo.Mul(ctx, wb)).Div(ctx, z)
	return o.Concat(ctx, c, 0).Concat(ctx, z, 0)
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

// unmasked is the paper's algorithm without a mask for queries q
// [d, nq, B] (scaled) and qh (the same, unscaled, for the hash) over keys
// k and values v [d, nk, Bkv] (B heads: query heads, or query heads times
// segments; virtual head i reads KV head i/(B/Bkv)). samp[s][g] are the
// samples of segment s's KV head g (virtual KV head g + Bkv/len(samp)·s).
// It is exact with fewer than MinSeqLen queries (see ref.unmasked).
// Returns the pack [d+2, nq, B] in token order.
func (g *graph) unmasked(q, qh, k, v ml.Tensor, samp [][][]int32) ml.Tensor {
	nq, nk := q.Dim(1), k.Dim(1)
	if nq < g.c.MinSeqLen {
		return g.exact(q, k, v.Permute(g.ctx, 1, 0, 2, 3).Contiguous(g.ctx), nil)
	}
	ctx := g.ctx
	d, B, Bkv, b := g.d, q.Dim(2), k.Dim(2), g.c.BlockSize
	G := B / Bkv
	var flat [][]int32 // by virtual KV head
	for _, s := range samp {
		flat = append(flat, s...)
	}
	qidx := g.sortIndex(qh) // [nq, B]
	kidx := g.sortIndex(k)  // [nk, Bkv]
	qs := q.Rows(ctx, qidx) // [d, nq, B] in sorted order
	ks := k.Rows(ctx, kidx) // [d, nk, Bkv]
	vs := v.Rows(ctx, kidx) // [d, nk, Bkv]
	nb, bq := g.c.blocks(nq, nk)
	qp, kp, vp := qs, ks, vs
	if pad := nb*bq - nq; pad > 0 {
		qp = qs.Pad(ctx, 0, pad, 0, 0)
	}
	if pad := nb*b - nk; pad > 0 {
		kp = ks.Pad(ctx, 0, pad, 0, 0)
		vp = vs.Pad(ctx, 0, pad, 0, 0)
	}
	// Block i's keys [d, b, nb, Bkv] and values transposed [b, d, nb, Bkv];
	// with samples, each block's columns are its b keys then the m sampled
	// keys (the same for every block of a head): [d, b+m, nb, Bkv]. Then the
	// scores of block i of the sorted queries are one batched matmul
	// [b+m, bq, nb, B], and one softmax over them is the LSE merge of both.
	kb := kp.Reshape(ctx, d, b, nb, Bkv)
	vbT := vp.Reshape(ctx, d, b, nb, Bkv).Permute(ctx, 1, 0, 2, 3).Contiguous(ctx)
	m := g.c.Samples
	if m == 0 || nb == 1 {
		m = 0
	}
	cols := b + m
	var mask []float32 // [cols, 1, nb, B] (or [b, 1, nb, 1] without samples): hidden columns and sample weights
	if m > 0 {
		idx := make([]int32, 0, m*Bkv)
		for _, s := range flat {
			idx = append(idx, s...)
		}
		sidx := ctx.Input().FromInts(idx, m, Bkv)
		kb = kb.Concat(ctx, ks.Rows(ctx, sidx).Reshape(ctx, d, m, 1, Bkv).Repeat4D(ctx, d, m, nb, Bkv), 1)
		vsT := vs.Rows(ctx, sidx).Permute(ctx, 1, 0, 2, 3).Contiguous(ctx).Reshape(ctx, m, d, 1, Bkv)
		vbT = vbT.Concat(ctx, vsT.Repeat4D(ctx, m, d, nb, Bkv), 0)
		// Sampled columns weigh nk/m and are hidden from the queries of
		// their own block; padded keys are hidden.
		logw := float32(math.Log(float64(nk) / float64(m)))
		mask = make([]float32, cols*nb*B)
		for h := 0; h < B; h++ {
			for blk := 0; blk < nb; blk++ {
				row := mask[(h*nb+blk)*cols : (h*nb+blk+1)*cols]
				for j := max(0, nk-blk*b); j < b; j++ {
					row[j] = masked
				}
				for j, s := range flat[h/G] {
					w := logw
					if int(s)/b == blk {
						w = masked
					}
					row[b+j] = w
				}
			}
		}
	} else if pad := nb*b - nk; pad > 0 {
		mask = make([]float32, b*nb)
		for j := nk; j < nb*b; j++ {
			mask[j] = masked
		}
	}
	x := kb.MulmatFullPrec(ctx, qp.Reshape(ctx, d, bq, nb, B)) // [cols, bq, nb, B]
	if mask != nil {
		hs := B
		if m == 0 {
			hs = 1
		}
		x = x.Add(ctx, ctx.Input().FromFloats(mask, cols, 1, nb, hs))
	}
	p, c, z := g.soft(x)
	o := vbT.Mulmat(ctx, p) // [d, bq, nb, B]
	// Back to token order: rows [o; c; z] of sorted query i go to token qidx[i].
	pack := o.Reshape(ctx, d, bq*nb, B).Concat(ctx, c.Reshape(ctx, 1, bq*nb, B), 0).Concat(ctx, z.Reshape(ctx, 1, bq*nb, B), 0) // [d+2, nb*bq, B]
	dst := pack.Scale(ctx, 0)                                                                                                   // every row is written: only its shape matters
	if nb*bq > nq {
		pack = pack.View(ctx, 0, d+2, pack.Stride(1), nq, pack.Stride(2), B)
		dst = dst.View(ctx, 0, d+2, dst.Stride(1), nq, dst.Stride(2), B)
	}
	return dst.SetRows(ctx, pack, qidx)
}

// Causal builds exact causal attention as ggml graph ops in query chunks
// of at most chunk tokens, so that no [n, n] scores exist at once: each
// chunk's scores are [chunk end, chunk, heads]. Shapes as in Attention.
// It is the exact path of a one-batch prefill's other layers.
func Causal(ctx ml.Context, q, k, v ml.Tensor, scale float64, chunk int) ml.Tensor {
	return exactChunks(ctx, q, k, v, scale, chunk, func(g *graph, lo, hi int) (keys, vals, mask ml.Tensor) {
		keys, vals = tokens(ctx, g.k, lo, hi), tokensT(ctx, g.vt, lo, hi)
		mask = g.causalMask(hi - lo) // [c, c]
		if lo > 0 {
			// The chunk's own keys first, then the earlier ones: the
			// causal mask padded with zeros at its end covers them all.
			keys = keys.Concat(ctx, tokens(ctx, g.k, 0, lo), 1)   // [d, hi, kvHeads]
			vals = vals.Concat(ctx, tokensT(ctx, g.vt, 0, lo), 0) // [hi, d, kvHeads]
			mask = mask.Pad(ctx, lo, 0, 0, 0)                     // [hi, c]
		}
		return keys, vals, mask
	})
}

// CausalWindow is Causal for a sliding-window layer: query i sees keys
// i-window+1 .. i (the window of llama.cpp and of the paged cache), in
// query chunks of at most chunk tokens, each against keys [lo-window+1,
// hi) under a mask built on the host. Its cost is O(n·(chunk+window)), not
// quadratic. window <= 0 is Causal.
func CausalWindow(ctx ml.Context, q, k, v ml.Tensor, scale float64, chunk, window int) ml.Tensor {
	if window <= 0 {
		return Causal(ctx, q, k, v, scale, chunk)
	}
	masks := map[[3]int]ml.Tensor{} // by (lo-klo, hi-lo, keys)
	return exactChunks(ctx, q, k, v, scale, chunk, func(g *graph, lo, hi int) (keys, vals, mask ml.Tensor) {
		klo := max(0, lo-window+1)
		key := [3]int{lo - klo, hi - lo, hi - klo}
		mask, ok := masks[key]
		if !ok {
			// [hi-klo, hi-lo]: query lo+i sees keys lo+i-window+1 .. lo+i.
			nk, c := hi-klo, hi-lo
			m := make([]float32, nk*c)
			for i := 0; i < c; i++ {
				qi := lo + i
				for j := 0; j < nk; j++ {
					if kj := klo + j; kj > qi || kj <= qi-window {
						m[i*nk+j] = masked
					}
				}
			}
			mask = ctx.Input().FromFloats(m, nk, c)
			masks[key] = mask
		}
		return tokens(ctx, g.k, klo, hi), tokensT(ctx, g.vt, klo, hi), mask
	})
}

// exactChunks is exact attention in query chunks of at most chunk tokens:
// span gives chunk [lo, hi)'s keys [d, nk, kvHeads], values transposed
// [nk, d, kvHeads] and mask [nk, hi-lo]. Shapes as in Attention.
func exactChunks(ctx ml.Context, q, k, v ml.Tensor, scale float64, chunk int, span func(g *graph, lo, hi int) (keys, vals, mask ml.Tensor)) ml.Tensor {
	if chunk < 1 {
		panic(fmt.Sprintf("hyper: exact chunk %d: want at least 1", chunk))
	}
	d, H, n := q.Dim(0), q.Dim(1), q.Dim(2)
	g := newGraph(ctx, scale, d, H, k.Dim(1))
	g.q = q.Permute(ctx, 0, 2, 1, 3).Contiguous(ctx).Scale(ctx, scale) // [d, n, H], scaled
	g.k = k.Permute(ctx, 0, 2, 1, 3).Contiguous(ctx)                   // [d, n, kvHeads]
	g.vt = v.Permute(ctx, 1, 2, 0, 3).Contiguous(ctx)                  // [n, d, kvHeads]
	var out ml.Tensor
	for lo := 0; lo < n; lo += chunk {
		hi := min(lo+chunk, n)
		keys, vals, mask := span(g, lo, hi)
		// The chunk's queries contiguous, for ggml's sgemm (see leaves).
		qc := tokens(ctx, g.q, lo, hi)
		if n > hi-lo {
			qc = qc.Contiguous(ctx)
		}
		x := keys.MulmatFullPrec(ctx, qc).Add(ctx, mask) // [nk, c, H]
		o := vals.Mulmat(ctx, x.Softmax(ctx))            // [d, c, H]
		if out == nil {
			out = o
		} else {
			out = out.Concat(ctx, o, 1)
		}
	}
	return out.Permute(ctx, 0, 2, 1, 3).Contiguous(ctx) // [d, n, H] -> [d, H, n]
}

// GraphSize is an upper estimate of the ggml tensors that Attention (with
// chunk 0, causal) or Causal (with chunk > 0) creates for n tokens: a ggml
// context holds a fixed number (ml.Context.MaxGraphNodes), and running out
// aborts the process, so callers check before building. Attention builds
// the leaves once (about 21 tensors per query chunk of leafSpans) and
// about 110 tensors per level of the recursion (counted from the code;
// 150 allowed), so the count grows as log2(n/MinSeqLen).
func GraphSize(c Config, n, chunk int) int {
	if chunk > 0 { // Causal's or CausalWindow's chunks
		return 16 + 16*((n+chunk-1)/chunk)
	}
	N, leaf := c.Padded(n)
	size := stageBase + leafSize(leaf)
	for half := leaf; 2*half <= N; half *= 2 {
		size += levelSize
	}
	return size
}

// The parts of GraphSize's estimate: a graph's inputs, layout and output
// (stageBase), the leaves (leafSize) and a level (levelSize).
const (
	stageBase = 60
	levelSize = 150
)

func leafSize(leaf int) int { return 22 * len(leafSpans(leaf)) }
