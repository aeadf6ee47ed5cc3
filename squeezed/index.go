package squeezed

import (
	"fmt"
	"math"
	"slices"

	"github.com/viterin/vek/vek32"
)

// Head is the clustering of one KV head's keys in one layer: fine
// centroids over the document's tokens (the observation window left out),
// and coarse centroids over the fine ones.
type Head struct {
	D         int
	Centroids []float32 // [K][D], each the mean of its cluster's un-normalised keys
	Sizes     []int32   // [K], tokens per cluster
	Assign    []int32   // [T], the cluster of token t (tokens t ≥ T, the window, are in none)

	// The hierarchy: coarse cluster c holds the fine clusters
	// Members[Offsets[c]:Offsets[c+1]]; Coarse[c] is the size-weighted mean
	// of their centroids (the mean of every key under it) and Radius[c] the
	// largest distance from it to one of them.
	Coarse  []float32 // [C][D]
	Radius  []float32 // [C]
	Members []int32   // [K], fine clusters grouped by coarse cluster
	Offsets []int32   // [C+1]

	// tokens lists each cluster's tokens: tokens[tokOff[j]:tokOff[j+1]],
	// ascending (derived from Assign when the Head is built or read, not
	// stored; read-only after, so sessions share a Head safely).
	tokens, tokOff []int32
}

// K is the number of fine clusters.
func (h *Head) K() int { return len(h.Sizes) }

// Tokens returns the positions of cluster j's tokens, ascending.
func (h *Head) Tokens(j int) []int32 { return h.tokens[h.tokOff[j]:h.tokOff[j+1]] }

func (h *Head) index() {
	off := make([]int32, h.K()+1)
	for _, a := range h.Assign {
		off[a+1]++
	}
	for j := 1; j < len(off); j++ {
		off[j] += off[j-1]
	}
	toks := make([]int32, len(h.Assign))
	next := slices.Clone(off[:len(off)-1])
	for t, a := range h.Assign {
		toks[next[a]] = int32(t)
		next[a]++
	}
	h.tokens, h.tokOff = toks, off
}

// cluster builds a Head from keys [T][d] (un-normalised, roped): k-means on
// the L2-normalised keys (their direction is what q·k ranks among keys of
// similar norm), centroids the means of the raw keys, then the hierarchy.
func cluster(keys []float32, d, k, coarse int, o KMeansOptions) (*Head, error) {
	n := len(keys) / d
	xn := make([]float32, len(keys))
	for i := 0; i < n; i++ {
		r := keys[i*d : (i+1)*d]
		nr := xn[i*d : (i+1)*d]
		if norm := vek32.Norm(r); norm > 0 {
			vek32.MulNumber_Into(nr, r, 1/norm)
		}
	}
	o.K = k
	res, err := KMeans(xn, d, o)
	if err != nil {
		return nil, err
	}
	h := &Head{D: d, Sizes: res.Sizes, Assign: res.Assign, Centroids: make([]float32, k*d)}
	sum := make([]float64, k*d)
	for i, a := range res.Assign {
		s := sum[int(a)*d : int(a+1)*d]
		for t, v := range keys[i*d : (i+1)*d] {
			s[t] += float64(v)
		}
	}
	for j := 0; j < k; j++ {
		if h.Sizes[j] == 0 {
			continue
		}
		for t := 0; t < d; t++ {
			h.Centroids[j*d+t] = float32(sum[j*d+t] / float64(h.Sizes[j]))
		}
	}
	if err := h.buildHierarchy(coarse, o); err != nil {
		return nil, err
	}
	h.index()
	return h, nil
}

// buildHierarchy clusters the fine centroids (normalised, as the keys
// were) into c coarse clusters.
func (h *Head) buildHierarchy(c int, o KMeansOptions) error {
	d, k := h.D, h.K()
	c = max(1, min(c, k))
	cn := make([]float32, k*d)
	for j := 0; j < k; j++ {
		r := h.Centroids[j*d : (j+1)*d]
		if norm := vek32.Norm(r); norm > 0 {
			vek32.MulNumber_Into(cn[j*d:(j+1)*d], r, 1/norm)
		}
	}
	o.K = c
	o.Seed ^= 0x5eed
	o.Sample = 0 // a few hundred centroids: every one
	res, err := KMeans(cn, d, o)
	if err != nil {
		return err
	}
	h.renumber(res.Assign)
	h.setHierarchy(res.Assign, c)
	return nil
}

// renumber orders the fine clusters by coarse cluster (stably), so that
// each coarse cluster's members are consecutive rows of Centroids and a
// lookup scores them with one matrix-vector product. parent is permuted
// along.
func (h *Head) renumber(parent []int32) {
	d, k := h.D, h.K()
	order := make([]int32, k) // new id -> old id
	for j := range order {
		order[j] = int32(j)
	}
	slices.SortStableFunc(order, func(a, b int32) int { return int(parent[a] - parent[b]) })
	newID := make([]int32, k)
	for nj, oj := range order {
		newID[oj] = int32(nj)
	}
	cen := make([]float32, k*d)
	sizes := make([]int32, k)
	par := make([]int32, k)
	for nj, oj := range order {
		copy(cen[nj*d:(nj+1)*d], h.Centroids[int(oj)*d:int(oj+1)*d])
		sizes[nj], par[nj] = h.Sizes[oj], parent[oj]
	}
	for t, a := range h.Assign {
		h.Assign[t] = newID[a]
	}
	h.Centroids, h.Sizes = cen, sizes
	copy(parent, par)
}

// setHierarchy fills Coarse, Radius, Members and Offsets from the coarse
// cluster of each fine cluster.
func (h *Head) setHierarchy(parent []int32, c int) {
	d, k := h.D, h.K()
	h.Offsets = make([]int32, c+1)
	for _, p := range parent {
		h.Offsets[p+1]++
	}
	for i := 1; i <= c; i++ {
		h.Offsets[i] += h.Offsets[i-1]
	}
	h.Members = make([]int32, k)
	next := slices.Clone(h.Offsets[:c])
	for j, p := range parent {
		h.Members[next[p]] = int32(j)
		next[p]++
	}
	h.Coarse = make([]float32, c*d)
	h.Radius = make([]float32, c)
	sum := make([]float64, d)
	for p := 0; p < c; p++ {
		clear(sum)
		var n int64
		for _, j := range h.Members[h.Offsets[p]:h.Offsets[p+1]] {
			w := int64(h.Sizes[j])
			n += w
			for t, v := range h.Centroids[int(j)*d : int(j+1)*d] {
				sum[t] += float64(w) * float64(v)
			}
		}
		cp := h.Coarse[p*d : (p+1)*d]
		if n > 0 {
			for t := range cp {
				cp[t] = float32(sum[t] / float64(n))
			}
		}
		var r float32
		for _, j := range h.Members[h.Offsets[p]:h.Offsets[p+1]] {
			r = max(r, float32(math.Sqrt(float64(sqdist(cp, h.Centroids[int(j)*d:int(j+1)*d])))))
		}
		// Round up so that float error never makes the bound exclude a
		// member it should admit.
		h.Radius[p] = r*(1+1e-5) + 1e-6
	}
}

// check reports a Head whose parts disagree (a corrupt or foreign file).
func (h *Head) check(tokens int) error {
	k := h.K()
	switch {
	case h.D <= 0 || len(h.Centroids) != k*h.D:
		return fmt.Errorf("%d centroid floats for %d clusters of dimension %d", len(h.Centroids), k, h.D)
	case len(h.Assign) > tokens:
		return fmt.Errorf("%d assigned tokens in a document of %d", len(h.Assign), tokens)
	case len(h.Offsets) == 0 || len(h.Coarse) != (len(h.Offsets)-1)*h.D || len(h.Radius) != len(h.Offsets)-1 || len(h.Members) != k:
		return fmt.Errorf("malformed hierarchy")
	}
	count := make([]int32, k)
	for _, a := range h.Assign {
		if a < 0 || int(a) >= k {
			return fmt.Errorf("token assigned to cluster %d of %d", a, k)
		}
		count[a]++
	}
	if !slices.Equal(count, h.Sizes) {
		return fmt.Errorf("cluster sizes disagree with the assignments")
	}
	seen := make([]bool, k)
	for i, o := range h.Offsets {
		if o < 0 || int(o) > k || (i > 0 && o < h.Offsets[i-1]) {
			return fmt.Errorf("bad coarse offsets")
		}
	}
	if int(h.Offsets[len(h.Offsets)-1]) != k {
		return fmt.Errorf("bad coarse offsets")
	}
	for _, j := range h.Members {
		if j < 0 || int(j) >= k || seen[j] {
			return fmt.Errorf("fine cluster %d under two coarse clusters or out of range", j)
		}
		seen[j] = true
	}
	return nil
}

// Scratch holds a lookup's buffers; reuse one per goroutine so lookups
// allocate nothing.
type Scratch struct {
	fine, coarse []float32
	cand         []int32
	keys         []uint64       // TopRanked's packed (score, cluster) keys
	keysTmp      []uint64       // radixSortHi's other buffer
	mask         []uint64       // TopRanked's [K]bool of score ≥ cut (boolMask)
	idx          []int32        // collectAbove's clusters above a cut
	smask        []bool         // sampleCut's mask of the sample
	top          []float32      // sampleCut's copy of the sample (an infinite bound)
	hist         [2][256]uint32 // radixSortHi's digit counts
	order        []int32
	// Scored counts the centroids (fine and coarse) lookups have scored:
	// the work a lookup does, for benchmarks.
	Scored int
}

func grow(s []float32, n int) []float32 {
	if cap(s) < n {
		return make([]float32, n)
	}
	return s[:n]
}

// score sets fine[j] = q·c_j for the members j of coarse cluster p and
// returns them. Members built by Build are consecutive (renumber): one
// matrix-vector product; otherwise one dot product each.
func (h *Head) score(q []float32, p int, fine []float32) []int32 {
	d := h.D
	mem := h.Members[h.Offsets[p]:h.Offsets[p+1]]
	if len(mem) > 0 && int(mem[len(mem)-1]-mem[0]) == len(mem)-1 && slices.IsSorted(mem) {
		lo, hi := int(mem[0]), int(mem[len(mem)-1])+1
		matVec(fine[lo:hi], h.Centroids[lo*d:hi*d], q)
		return mem
	}
	for _, j := range mem {
		fine[j] = vek32.Dot(q, h.Centroids[int(j)*d:int(j+1)*d])
	}
	return mem
}

// FlatAbove appends to out the clusters j with q·c_j ≥ tau, scanning every
// centroid (one matrix-vector product over [K][D]).
func (h *Head) FlatAbove(q []float32, tau float32, sc *Scratch, out []int32) []int32 {
	sc.fine = grow(sc.fine, h.K())
	matVec(sc.fine, h.Centroids, q)
	sc.Scored += h.K()
	for j, v := range sc.fine {
		if v >= tau {
			out = append(out, int32(j))
		}
	}
	return out
}

// Above appends to out the clusters j with q·c_j ≥ tau, in ascending order
// of j, through the hierarchy: coarse cluster c can hold such a j only if
// q·C_c + |q|·R_c ≥ tau (Cauchy–Schwarz), so only those coarse clusters'
// members are scored. The answer is exactly FlatAbove's; the cost is the
// coarse scan plus the members of the coarse clusters that pass.
func (h *Head) Above(q []float32, tau float32, sc *Scratch, out []int32) []int32 {
	c := len(h.Radius)
	sc.coarse = grow(sc.coarse, c)
	sc.fine = grow(sc.fine, h.K())
	matVec(sc.coarse, h.Coarse, q)
	sc.Scored += c
	qn := vek32.Norm(q)
	start := len(out)
	for p := 0; p < c; p++ {
		if sc.coarse[p]+qn*h.Radius[p] < tau {
			continue
		}
		sc.Scored += int(h.Offsets[p+1] - h.Offsets[p])
		for _, j := range h.score(q, p, sc.fine) {
			if sc.fine[j] >= tau {
				out = append(out, j)
			}
		}
	}
	slices.Sort(out[start:])
	return out
}

// FlatTop appends to out the clusters of highest q·c_j, best first (ties:
// lower j), until their tokens reach budget.
func (h *Head) FlatTop(q []float32, budget int, sc *Scratch, out []int32) []int32 {
	k := h.K()
	sc.fine = grow(sc.fine, k)
	matVec(sc.fine, h.Centroids, q)
	sc.Scored += k
	sc.cand = sc.cand[:0]
	for j := 0; j < k; j++ {
		sc.cand = append(sc.cand, int32(j))
	}
	return h.fill(sc.fine, sc.cand, budget, out)
}

// TopScores is FlatTop from scores already computed (score[j] = q·c_j, j <
// K): the clusters of highest score, best first (ties: lower j), until
// their tokens reach budget. The same answer as fill over every cluster,
// found without ordering all K: the m-th best score (m an estimate of the
// clusters the budget takes, from the mean cluster size, with a margin) is
// found by quickselect on a copy, only the clusters at or above it are
// sorted, and m doubles in the rare case their tokens fall short. A decode
// step scored in the graph ranks 4 lists per KV head and layer this way:
// fill's heap over all K was 0.9 ms of a 7.9 ms step at 16k (K = 819) and
// grows with K.
func (h *Head) TopScores(score []float32, budget int, sc *Scratch, out []int32) []int32 {
	k := h.K()
	if budget <= 0 || k == 0 {
		return out
	}
	score = score[:k]
	mean := max(1, len(h.Assign)/k)
	m := min(k, 2*budget/mean+16)
	for {
		if m >= k {
			sc.cand = sc.cand[:0]
			for j := 0; j < k; j++ {
				sc.cand = append(sc.cand, int32(j))
			}
			return h.fill(score, sc.cand, budget, out)
		}
		sc.fine = append(sc.fine[:0], score...)
		t := nthLargest(sc.fine, m)
		sc.cand = sc.cand[:0]
		for j, v := range score {
			if v >= t {
				sc.cand = append(sc.cand, int32(j))
			}
		}
		slices.SortFunc(sc.cand, func(a, b int32) int {
			switch sa, sb := score[a], score[b]; {
			case sa > sb:
				return -1
			case sa < sb:
				return 1
			}
			return int(a - b)
		})
		tok, start := 0, len(out)
		for _, j := range sc.cand {
			if tok >= budget {
				return out
			}
			out = append(out, j)
			tok += int(h.Sizes[j])
		}
		if tok >= budget || len(sc.cand) == k {
			return out
		}
		out = out[:start] // every cluster above the cut taken, budget not reached: more
		m *= 2
	}
}

// nthLargest returns the m-th largest of x (1-based), reordering x:
// nth's quickselect, from the other end.
func nthLargest(x []float32, m int) float32 {
	return nth(x, len(x)-m)
}

// fill appends cand to out by score (best first, ties by lower cluster)
// until their tokens reach budget. cand is reordered.
//
// It pops a binary max-heap rather than sorting: a budget takes the best
// ~budget/20 of K candidates (≈100 of 3276 at 64k), so heapifying (O(K))
// and popping those (O(m log K)) replaces an O(K log K) sort that was a
// sixth of a squeezed decode step at 16k (4 query heads × 2 KV heads ×
// 4 layers of lookups per token). The order is the sort's: the same
// comparison, a total order on distinct ids.
func (h *Head) fill(score []float32, cand []int32, budget int, out []int32) []int32 {
	better := func(a, b int32) bool {
		sa, sb := score[a], score[b]
		return sa > sb || sa == sb && a < b
	}
	down := func(i, n int) {
		for {
			l := 2*i + 1
			if l >= n {
				return
			}
			if r := l + 1; r < n && better(cand[r], cand[l]) {
				l = r
			}
			if !better(cand[l], cand[i]) {
				return
			}
			cand[i], cand[l] = cand[l], cand[i]
			i = l
		}
	}
	n := len(cand)
	for i := n/2 - 1; i >= 0; i-- {
		down(i, n)
	}
	tok := 0
	for n > 0 && tok < budget {
		j := cand[0]
		out = append(out, j)
		tok += int(h.Sizes[j])
		n--
		cand[0], cand[n] = cand[n], cand[0]
		down(0, n)
	}
	return out
}

// Top is FlatTop through the hierarchy, with the same answer: coarse
// clusters are opened in descending order of their bound q·C + |q|·R;
// once the clusters chosen so far fill the budget and the next bound is
// strictly below the worst chosen score, no unopened cluster can displace
// a chosen one (ties would go to the lower cluster id, so a bound equal to
// it still opens).
//
// The chosen clusters are kept as they come, in a heap with the worst on
// top: the shortest best-first prefix of the clusters scored so far whose
// tokens reach the budget. A cluster better than the worst goes in, and
// then the worst leave while the rest still fill the budget; a worse one
// is one comparison. (Re-sorting all candidates whenever they doubled, to
// refresh the cut-off, was a fifth of a squeezed decode step at 32k on
// keys where no bound prunes, and grew with the document.)
func (h *Head) Top(q []float32, budget int, sc *Scratch, out []int32) []int32 {
	if budget <= 0 {
		return out // as FlatTop: no cluster is needed
	}
	c, k := len(h.Radius), h.K()
	sc.coarse = grow(sc.coarse, c)
	matVec(sc.coarse, h.Coarse, q)
	sc.Scored += c
	qn := vek32.Norm(q)
	for p := range sc.coarse {
		sc.coarse[p] += qn * h.Radius[p]
	}
	sc.order = sc.order[:0]
	for p := 0; p < c; p++ {
		sc.order = append(sc.order, int32(p))
	}
	slices.SortFunc(sc.order, func(a, b int32) int {
		switch {
		case sc.coarse[a] > sc.coarse[b]:
			return -1
		case sc.coarse[a] < sc.coarse[b]:
			return 1
		}
		return int(a - b)
	})
	sc.fine = grow(sc.fine, k)
	score := sc.fine
	better := func(a, b int32) bool {
		sa, sb := score[a], score[b]
		return sa > sb || sa == sb && a < b
	}
	// chosen: a binary heap, the worst cluster at chosen[0].
	chosen := sc.cand[:0]
	up := func(i int) {
		for i > 0 {
			p := (i - 1) / 2
			if !better(chosen[p], chosen[i]) {
				return
			}
			chosen[p], chosen[i] = chosen[i], chosen[p]
			i = p
		}
	}
	down := func(i int) {
		n := len(chosen)
		for {
			l := 2*i + 1
			if l >= n {
				return
			}
			if r := l + 1; r < n && better(chosen[l], chosen[r]) {
				l = r
			}
			if !better(chosen[i], chosen[l]) {
				return
			}
			chosen[i], chosen[l] = chosen[l], chosen[i]
			i = l
		}
	}
	tok := 0
	for _, p := range sc.order {
		if tok >= budget && sc.coarse[p] < score[chosen[0]] {
			break // bounds descend: nothing unopened can reach the worst chosen
		}
		sc.Scored += int(h.Offsets[p+1] - h.Offsets[p])
		for _, j := range h.score(q, int(p), score) {
			if tok >= budget && !better(j, chosen[0]) {
				continue
			}
			chosen = append(chosen, j)
			up(len(chosen) - 1)
			tok += int(h.Sizes[j])
			for tok-int(h.Sizes[chosen[0]]) >= budget {
				tok -= int(h.Sizes[chosen[0]])
				last := len(chosen) - 1
				chosen[0] = chosen[last]
				chosen = chosen[:last]
				down(0)
			}
		}
	}
	sc.cand = chosen
	start := len(out)
	out = append(out, chosen...)
	slices.SortFunc(out[start:], func(a, b int32) int {
		if better(a, b) {
			return -1
		}
		return 1
	})
	return out
}
