package foundry

import "math"

// denseModel is a llama-architecture model held in memory, with a plain
// float64 forward pass. The recall builder uses it to measure activation
// scales while it constructs layers, and tests use it as an engine-free
// check that the construction works.
type denseModel struct {
	hidden, heads, kvHeads, headDim, ffn, vocab int
	ropeBase, eps                               float64
	invFreq                                     []float64

	embd    *Matrix // [hidden, vocab]: row t is token t's embedding
	layers  []denseLayer
	outNorm []float32
	out     *Matrix // [hidden, vocab]
}

type denseLayer struct {
	attnNorm, ffnNorm []float32
	wq, wk, wv, wo    *Matrix
	gate, up, down    *Matrix
	ffnZero           bool        // all FFN weights are zero: skip the block
	keys, values      [][]float64 // cache: per position [kvHeads*headDim]
	sq, sk, sv, so    *sparse
	sgate, sup, sdown *sparse
}

// refState evaluates tokens one at a time with a KV cache.
type refState struct {
	m   *denseModel
	out *sparse
	pos int
	// rms of each layer's input at each evaluated position (layer count + 1 for the final norm)
	rms [][]float64
	// attn[layer][head] = attention weights of the last evaluated position
	lastAttn [][][]float64
}

func newRefState(m *denseModel) *refState {
	for i := range m.layers {
		l := &m.layers[i]
		l.keys, l.values = nil, nil
		l.sq, l.sk, l.sv, l.so = toSparse(l.wq), toSparse(l.wk), toSparse(l.wv), toSparse(l.wo)
		if !l.ffnZero {
			l.sgate, l.sup, l.sdown = toSparse(l.gate), toSparse(l.up), toSparse(l.down)
		}
	}
	return &refState{m: m, out: toSparse(m.out), rms: make([][]float64, len(m.layers)+1), lastAttn: make([][][]float64, len(m.layers))}
}

func rmsNorm(x []float64, w []float32, eps float64) ([]float64, float64) {
	s := 0.0
	for _, v := range x {
		s += v * v
	}
	r := math.Sqrt(s/float64(len(x)) + eps)
	out := make([]float64, len(x))
	for i, v := range x {
		out[i] = v / r * float64(w[i])
	}
	return out, r
}

// sparse is a matrix as its non-zero entries per output row: constructed
// weights are almost all zero.
type sparse struct {
	out  int
	rows [][]int32
	vals [][]float64
}

func toSparse(m *Matrix) *sparse {
	s := &sparse{out: m.Out, rows: make([][]int32, m.Out), vals: make([][]float64, m.Out)}
	for o := 0; o < m.Out; o++ {
		for i, w := range m.Data[o*m.In : (o+1)*m.In] {
			if w != 0 {
				s.rows[o] = append(s.rows[o], int32(i))
				s.vals[o] = append(s.vals[o], float64(w))
			}
		}
	}
	return s
}

func matVec(m *sparse, x []float64) []float64 {
	out := make([]float64, m.out)
	for o, idx := range m.rows {
		s := 0.0
		for k, i := range idx {
			s += m.vals[o][k] * x[i]
		}
		out[o] = s
	}
	return out
}

// rope rotates adjacent pairs like ggml's normal (non-NeoX) mode.
func (m *denseModel) rope(x []float64, heads, pos int) {
	if len(m.invFreq) != m.headDim/2 {
		m.invFreq = make([]float64, m.headDim/2)
		for i := range m.invFreq {
			m.invFreq[i] = math.Pow(m.ropeBase, -float64(2*i)/float64(m.headDim))
		}
	}
	for h := 0; h < heads; h++ {
		v := x[h*m.headDim : (h+1)*m.headDim]
		for i, f := range m.invFreq {
			th := float64(pos) * f
			c, s := math.Cos(th), math.Sin(th)
			a, b := v[2*i], v[2*i+1]
			v[2*i], v[2*i+1] = a*c-b*s, a*s+b*c
		}
	}
}

// step evaluates one token and returns its logits if want is set.
func (st *refState) step(tok int32, want bool) []float64 {
	m := st.m
	x := make([]float64, m.hidden)
	for j := range x {
		x[j] = float64(m.embd.At(int(tok), j))
	}
	group := m.heads / m.kvHeads
	scale := 1 / math.Sqrt(float64(m.headDim))
	for li := range m.layers {
		l := &m.layers[li]
		xn, r := rmsNorm(x, l.attnNorm, m.eps)
		st.rms[li] = append(st.rms[li], r)
		q, k, v := matVec(l.sq, xn), matVec(l.sk, xn), matVec(l.sv, xn)
		m.rope(q, m.heads, st.pos)
		m.rope(k, m.kvHeads, st.pos)
		l.keys = append(l.keys, k)
		l.values = append(l.values, v)
		att := make([]float64, m.heads*m.headDim)
		st.lastAttn[li] = make([][]float64, m.heads)
		for h := 0; h < m.heads; h++ {
			g := h / group
			qh := q[h*m.headDim : (h+1)*m.headDim]
			sc := make([]float64, len(l.keys))
			mx := math.Inf(-1)
			for p, kp := range l.keys {
				kh := kp[g*m.headDim : (g+1)*m.headDim]
				s := 0.0
				for d := range qh {
					s += qh[d] * kh[d]
				}
				sc[p] = s * scale
				mx = math.Max(mx, sc[p])
			}
			z := 0.0
			for p := range sc {
				sc[p] = math.Exp(sc[p] - mx)
				z += sc[p]
			}
			out := att[h*m.headDim : (h+1)*m.headDim]
			for p := range sc {
				sc[p] /= z
				vh := l.values[p][g*m.headDim : (g+1)*m.headDim]
				for d := range out {
					out[d] += sc[p] * vh[d]
				}
			}
			st.lastAttn[li][h] = sc
		}
		o := matVec(l.so, att)
		for j := range x {
			x[j] += o[j]
		}
		if !l.ffnZero {
			xn, _ := rmsNorm(x, l.ffnNorm, m.eps)
			gt, up := matVec(l.sgate, xn), matVec(l.sup, xn)
			for i := range gt {
				gt[i] = gt[i] / (1 + math.Exp(-gt[i])) * up[i]
			}
			d := matVec(l.sdown, gt)
			for j := range x {
				x[j] += d[j]
			}
		}
	}
	xn, r := rmsNorm(x, m.outNorm, m.eps)
	st.rms[len(m.layers)] = append(st.rms[len(m.layers)], r)
	st.pos++
	if !want {
		return nil
	}
	return matVec(st.out, xn)
}

func argmax64(x []float64) int32 {
	best := 0
	for i, v := range x {
		if v > x[best] {
			best = i
		}
	}
	return int32(best)
}
