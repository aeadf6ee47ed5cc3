package foundry

import "math"

// positionalProfile finds pair weights w (w >= 0, sum 1) for a positional
// attention head whose score at offset Δ = query - key is
//
//	lam * Σ_i w_i cos((Δ - target) θ_i)
//
// so that it peaks at Δ = target and every other offset in [0, maxDelta] is
// as far below as possible. It minimises the log of the total off-target
// softmax mass,
//
//	F(w) = log Σ_{Δ≠target} exp(-lam Σ_i w_i (1 - cos((Δ-target) θ_i))),
//
// which is convex in w, by mirror descent (exponentiated gradient) on the
// simplex. It returns w and the smallest score gap in nats.
func positionalProfile(theta []float64, lam float64, target, maxDelta, iters int) ([]float64, float64) {
	n := len(theta)
	// oneMinusCos[Δ*n+i] = 1 - cos((Δ-target) θ_i); the target row is skipped.
	rows := maxDelta + 1
	omc := make([]float64, rows*n)
	for d := 0; d < rows; d++ {
		for i, t := range theta {
			omc[d*n+i] = 1 - math.Cos(float64(d-target)*t)
		}
	}
	w := make([]float64, n)
	for i := range w {
		w[i] = 1 / float64(n)
	}
	g := make([]float64, rows)
	grad := make([]float64, n)
	gaps := func() {
		for d := 0; d < rows; d++ {
			s := 0.0
			row := omc[d*n : d*n+n]
			for i, x := range row {
				s += w[i] * x
			}
			g[d] = lam * s
		}
	}
	const step = 1.0 // mirror-descent step on E_p[1-cos] (in [0, 2])
	for it := 0; it < iters; it++ {
		gaps()
		// softmax of -g over off-target offsets
		minG := math.Inf(1)
		for d := 0; d < rows; d++ {
			if d != target && g[d] < minG {
				minG = g[d]
			}
		}
		z := 0.0
		for i := range grad {
			grad[i] = 0
		}
		for d := 0; d < rows; d++ {
			if d == target {
				continue
			}
			p := math.Exp(-(g[d] - minG))
			z += p
			row := omc[d*n : d*n+n]
			for i, x := range row {
				grad[i] += p * x
			}
		}
		// dF/dw_i = -lam E_p[1-cos_i]: move weight towards the pairs that
		// separate the offsets the softmax still puts mass on.
		sum := 0.0
		for i := range w {
			w[i] *= math.Exp(step * grad[i] / z)
			sum += w[i]
		}
		for i := range w {
			w[i] /= sum
		}
	}
	gaps()
	minGap := math.Inf(1)
	for d := 0; d < rows; d++ {
		if d != target && g[d] < minGap {
			minGap = g[d]
		}
	}
	return w, minGap
}
