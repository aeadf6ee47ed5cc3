package squeezed

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"

	"github.com/viterin/vek/vek32"
)

// KMeansOptions configure KMeans.
type KMeansOptions struct {
	K        int     // clusters (required, 1 ≤ K ≤ points)
	MaxIter  int     // Lloyd iterations at most (default 30)
	Tol      float64 // stop when an iteration lowers the inertia by less than this fraction (default 1e-4)
	Restarts int     // independent k-means++ starts; the lowest inertia wins (default 1)
	Seed     uint64  // the same seed and data give the same result
	// Sample, if in [K, points), fits the centroids on that many points
	// drawn without replacement (from Seed): k-means++ and Lloyd's
	// iterations run on the sample only. Then every point is assigned to
	// its nearest centroid (one scan each) and each centroid
	// becomes the mean of its points; FullIter more Lloyd iterations over
	// every point may follow. 0 (or ≥ points): every point, as plain
	// k-means.
	Sample int
	// FullIter is the Lloyd iterations over every point after a sampled
	// fit, the assignment included (default 1: the assignment and its
	// means).
	FullIter int
}

// Defaults for KMeansOptions fields left at zero.
const (
	DefaultMaxIter = 30
	DefaultTol     = 1e-4
)

// KMeansResult is a clustering of n points of dimension d.
type KMeansResult struct {
	Centroids []float32 // [K][d], the mean of each cluster's points
	Assign    []int32   // [n], the cluster of each point
	Sizes     []int32   // [K], points per cluster (never 0 when K ≤ n distinct points)
	Inertia   float64   // Σ squared distance of each point to its centroid
	Iters     int       // Lloyd iterations run (of the winning start; a sampled fit's and the full ones')
}

func (o KMeansOptions) fill(n int) (KMeansOptions, error) {
	if o.K <= 0 || o.K > n {
		return o, fmt.Errorf("squeezed: k-means K = %d clusters for %d points (want 1 ≤ K ≤ points)", o.K, n)
	}
	if o.MaxIter == 0 {
		o.MaxIter = DefaultMaxIter
	}
	if o.Tol == 0 {
		o.Tol = DefaultTol
	}
	if o.Restarts == 0 {
		o.Restarts = 1
	}
	if o.FullIter == 0 {
		o.FullIter = 1
	}
	if o.MaxIter < 0 || o.Tol < 0 || o.Restarts < 0 || o.Sample < 0 || o.FullIter < 0 {
		return o, fmt.Errorf("squeezed: k-means MaxIter %d, Tol %g, Restarts %d, Sample %d, FullIter %d must not be negative", o.MaxIter, o.Tol, o.Restarts, o.Sample, o.FullIter)
	}
	return o, nil
}

// KMeans clusters the rows of x ([n][d], row-major) into o.K clusters:
// k-means++ seeding (D² sampling), then Lloyd iterations until no point
// changes cluster, the inertia improves by less than o.Tol, or o.MaxIter.
// A cluster left empty by an iteration is given the point farthest from
// its centroid (taken from its cluster), so every cluster keeps a point.
// Single-threaded and deterministic for o.Seed; callers parallelise over
// independent problems (layers × KV heads).
func KMeans(x []float32, d int, o KMeansOptions) (KMeansResult, error) {
	if d <= 0 || len(x)%d != 0 {
		return KMeansResult{}, fmt.Errorf("squeezed: k-means over %d floats of dimension %d", len(x), d)
	}
	n := len(x) / d
	o, err := o.fill(n)
	if err != nil {
		return KMeansResult{}, err
	}
	km := newKM(x, n, d, o.K)
	var best KMeansResult
	for r := 0; r < o.Restarts; r++ {
		rng := rand.New(rand.NewPCG(o.Seed, uint64(r)))
		var iters int
		if o.Sample >= o.K && o.Sample < n {
			// Fit on the sample, then assign every point once (the
			// state seed leaves: nearest and second-nearest centroid)
			// and iterate over every point FullIter times.
			sub := newKM(sample(x, n, d, o.Sample, rng), o.Sample, d, o.K)
			sub.seed(rng)
			iters = sub.lloyd(o.MaxIter, o.Tol)
			copy(km.c, sub.c)
			km.assignNearest()
			iters += km.lloyd(o.FullIter, o.Tol)
		} else {
			km.seed(rng)
			iters = km.lloyd(o.MaxIter, o.Tol)
		}
		if r == 0 || km.inertia < best.Inertia {
			best = KMeansResult{
				Centroids: append(best.Centroids[:0], km.c...),
				Assign:    append(best.Assign[:0], km.assign...),
				Sizes:     append(best.Sizes[:0], km.size...),
				Inertia:   km.inertia, Iters: iters,
			}
		}
	}
	return best, nil
}

// km is the working state of one k-means problem; its buffers are reused
// across restarts and iterations, so the loops allocate nothing.
type km struct {
	x       []float32 // [n][d]
	n, d, k int
	xx      []float32 // [n] |x|²
	c       []float32 // [k][d] centroids
	cc      []float32 // [k] |c|²
	dots    []float32 // [k] x·c for one point
	dots2   []float32 // [n] x·c for one centroid
	l       []float32 // [n] lower bound of the distance to any centroid but the assigned one
	s       []float32 // [k] half the distance to the nearest other centroid
	prev    []float32 // [k][d] centroids before the last update
	assign  []int32   // [n]
	size    []int32   // [k]
	dist    []float32 // [n] squared distance to the assigned centroid
	sum     []float64 // [k][d] accumulator for the means
	inertia float64
}

func newKM(x []float32, n, d, k int) *km {
	m := &km{x: x, n: n, d: d, k: k,
		xx: make([]float32, n), c: make([]float32, k*d), cc: make([]float32, k), dots: make([]float32, k), dots2: make([]float32, n),
		l: make([]float32, n), s: make([]float32, k), prev: make([]float32, k*d),
		assign: make([]int32, n), size: make([]int32, k), dist: make([]float32, n), sum: make([]float64, k*d)}
	for i := 0; i < n; i++ {
		r := x[i*d : (i+1)*d]
		m.xx[i] = vek32.Dot(r, r)
	}
	return m
}

func (m *km) row(i int) []float32 { return m.x[i*m.d : (i+1)*m.d] }

// sqdist is |a-b|², never negative.
func sqdist(a, b []float32) float32 {
	var s float32
	for i := range a {
		t := a[i] - b[i]
		s += t * t
	}
	return s
}

// seed is k-means++: the first centroid a uniform point, each next one a
// point drawn with probability proportional to its squared distance to the
// nearest centroid so far. m.dist holds that distance. Distances to a new
// centroid c come from one matrix-vector product over every point,
// |x|² + |c|² − 2x·c (m.dots2 [n]).
func (m *km) seed(rng *rand.Rand) {
	d := m.d
	first := rng.IntN(m.n)
	copy(m.c[:d], m.row(first))
	for i := range m.dist {
		m.dist[i], m.l[i] = float32(math.Inf(1)), float32(math.Inf(1))
	}
	m.nearer(m.c[:d], 0)
	for j := 1; j < m.k; j++ {
		var total float64
		for _, v := range m.dist {
			total += float64(v)
		}
		pick := -1
		if total > 0 {
			u := rng.Float64() * total
			for i, v := range m.dist {
				u -= float64(v)
				if u < 0 && v > 0 {
					pick = i
					break
				}
			}
			if pick < 0 { // rounding at the end of the sum: the last point at a distance
				for i := m.n - 1; i >= 0; i-- {
					if m.dist[i] > 0 {
						pick = i
						break
					}
				}
			}
		}
		if pick < 0 { // every point coincides with a centroid: duplicates
			pick = rng.IntN(m.n)
		}
		cj := m.c[j*d : (j+1)*d]
		copy(cj, m.row(pick))
		m.nearer(cj, j)
	}
	// The seeding leaves every point with its nearest seed (m.assign,
	// m.dist): the first assignment, with m.l the distance to the second.
	for i, v := range m.l {
		m.l[i] = float32(math.Sqrt(float64(v)))
	}
}

// nearer takes seed j (c): each point nearer to it than to its nearest
// seed so far is assigned to it (m.dist its squared distance), and m.l
// keeps the squared distance to the second nearest. Cancellation in
// |x|² + |c|² − 2x·c leaves a tiny positive residue for a point equal to
// c; below a relative 1e-6 it is taken as 0, so duplicates of a chosen
// point are never drawn again.
func (m *km) nearer(c []float32, j int) {
	cc := vek32.Dot(c, c)
	matVec(m.dots2, m.x, c)
	for i, dot := range m.dots2 {
		v := m.xx[i] + cc - 2*dot
		if v <= 1e-6*(m.xx[i]+cc) {
			v = 0
		}
		switch {
		case v < m.dist[i]:
			m.l[i], m.dist[i], m.assign[i] = m.dist[i], v, int32(j)
		case v < m.l[i]:
			m.l[i] = v
		}
	}
}

// assignAll puts every point in its nearest cluster and returns how many
// points moved and the inertia, with Hamerly's bounds: the exact distance
// u to the assigned centroid a is computed (O(d)); if u ≤ max(s_a, l),
// where s_a is half the distance from a to its nearest other centroid and
// l a lower bound of the distance to any other centroid (kept across
// iterations, lowered by how far centroids moved), no other centroid can
// be nearer and the point stays. Otherwise a full scan scores it against
// every centroid (|x|² + |c|² − 2x·c, the dot products one matrix-vector
// product) and resets l. The assignment is the one a full scan of every
// point gives.
func (m *km) assignAll() (moved int, inertia float64) {
	d := m.d
	for j := 0; j < m.k; j++ {
		cj := m.c[j*d : (j+1)*d]
		m.cc[j] = vek32.Dot(cj, cj)
	}
	for j := 0; j < m.k; j++ {
		matVec(m.dots, m.c, m.c[j*d:(j+1)*d])
		near := float32(math.Inf(1))
		for o, dot := range m.dots {
			if o != j {
				near = min(near, m.cc[j]+m.cc[o]-2*dot)
			}
		}
		m.s[j] = 0.5 * float32(math.Sqrt(float64(max(0, near))))
	}
	for i := 0; i < m.n; i++ {
		x := m.row(i)
		a := int(m.assign[i])
		du := sqdist(x, m.c[a*d:(a+1)*d])
		if u := float32(math.Sqrt(float64(du))); u <= max(m.s[a], m.l[i]) {
			m.dist[i] = du
			inertia += float64(du)
			continue
		}
		bj, best, second := m.nearest(x)
		dist := max(0, m.xx[i]+best)
		m.l[i] = float32(math.Sqrt(float64(max(0, m.xx[i]+second))))
		if m.assign[i] != bj {
			moved++
		}
		m.assign[i], m.dist[i] = bj, dist
		inertia += float64(dist)
	}
	return moved, inertia
}

// nearest scans every centroid for point x: the nearest j and the two
// smallest |c|² − 2x·c (add |x|² for squared distances), the dot products
// one matrix–vector product. (A blocked product, 8 points against tiles of
// 96 transposed centroids through vek32.MatMul_Into, measured 30% slower
// here: vek's kernel for that shape is not register-blocked.)
func (m *km) nearest(x []float32) (bj int32, best, second float32) {
	matVec(m.dots, m.c, x)
	best, second = float32(math.Inf(1)), float32(math.Inf(1))
	for j, dot := range m.dots {
		v := m.cc[j] - 2*dot
		if v < best {
			best, second, bj = v, best, int32(j)
		} else if v < second {
			second = v
		}
	}
	return bj, best, second
}

// assignNearest assigns every point to its nearest centroid, with m.dist
// its squared distance and m.l the distance to the second nearest: the
// state seed leaves, for centroids fitted elsewhere (a sample).
func (m *km) assignNearest() {
	for j := 0; j < m.k; j++ {
		cj := m.c[j*m.d : (j+1)*m.d]
		m.cc[j] = vek32.Dot(cj, cj)
	}
	for i := 0; i < m.n; i++ {
		bj, best, second := m.nearest(m.row(i))
		m.assign[i] = bj
		m.dist[i] = max(0, m.xx[i]+best)
		m.l[i] = float32(math.Sqrt(float64(max(0, m.xx[i]+second))))
	}
}

// sample returns s of x's n rows ([n][d]), drawn without replacement
// (a partial Fisher–Yates shuffle), in their original order.
func sample(x []float32, n, d, s int, rng *rand.Rand) []float32 {
	perm := make([]int32, n)
	for i := range perm {
		perm[i] = int32(i)
	}
	for i := 0; i < s; i++ {
		j := i + rng.IntN(n-i)
		perm[i], perm[j] = perm[j], perm[i]
	}
	pick := perm[:s]
	slices.Sort(pick)
	out := make([]float32, 0, s*d)
	for _, i := range pick {
		out = append(out, x[int(i)*d:int(i+1)*d]...)
	}
	return out
}

// moveBounds lowers every lower bound by the farthest any other centroid
// moved in the last update (m.prev → m.c).
func (m *km) moveBounds() {
	d := m.d
	max1, max2, arg := float32(0), float32(0), -1
	for j := 0; j < m.k; j++ {
		v := float32(math.Sqrt(float64(sqdist(m.prev[j*d:(j+1)*d], m.c[j*d:(j+1)*d]))))
		// Round up: a bound lowered too little could skip a needed scan.
		v = v*(1+1e-5) + 1e-7
		if v > max1 {
			max1, max2, arg = v, max1, j
		} else if v > max2 {
			max2 = v
		}
	}
	for i, a := range m.assign {
		if int(a) == arg {
			m.l[i] -= max2
		} else {
			m.l[i] -= max1
		}
	}
}

// update sets each centroid to the mean of its points; an empty cluster
// takes the point farthest from its centroid.
func (m *km) update() {
	d := m.d
	copy(m.prev, m.c)
	clear(m.sum)
	clear(m.size)
	for i := 0; i < m.n; i++ {
		j := int(m.assign[i])
		m.size[j]++
		s := m.sum[j*d : (j+1)*d]
		for t, v := range m.row(i) {
			s[t] += float64(v)
		}
	}
	for j := 0; j < m.k; j++ {
		if m.size[j] > 0 {
			continue
		}
		// The farthest point of a cluster that can spare one.
		far := -1
		for i := 0; i < m.n; i++ {
			if m.size[m.assign[i]] > 1 && (far < 0 || m.dist[i] > m.dist[far]) {
				far = i
			}
		}
		if far < 0 {
			break // fewer distinct clusters than points allow: nothing to move
		}
		old := int(m.assign[far])
		so := m.sum[old*d : (old+1)*d]
		sj := m.sum[j*d : (j+1)*d]
		for t, v := range m.row(far) {
			so[t] -= float64(v)
			sj[t] = float64(v)
		}
		m.size[old]--
		m.size[j] = 1
		m.assign[far] = int32(j)
		m.dist[far] = 0
		m.l[far] = 0 // its old centroid is now an "other" one, at an unknown distance
	}
	for j := 0; j < m.k; j++ {
		if m.size[j] == 0 {
			continue
		}
		inv := 1 / float64(m.size[j])
		cj := m.c[j*d : (j+1)*d]
		for t, s := range m.sum[j*d : (j+1)*d] {
			cj[t] = float32(s * inv)
		}
	}
}

// lloyd iterates update and assignment from the seeding's assignment
// (iteration 1 is its update); it returns the iterations run and leaves
// m.assign, m.size, m.c consistent (c the means of the final assignment)
// and m.inertia its inertia.
func (m *km) lloyd(maxIter int, tol float64) int {
	var prev float64
	for _, v := range m.dist {
		prev += float64(v)
	}
	m.update()
	m.moveBounds()
	it := 1
	for it < maxIter {
		moved, inertia := m.assignAll()
		it++
		m.update()
		m.moveBounds()
		if moved == 0 || prev-inertia <= tol*prev {
			break
		}
		prev = inertia
	}
	// The inertia of the final centroids and assignment (update may have
	// moved points into empty clusters and moved the means).
	m.inertia = 0
	d := m.d
	for i := 0; i < m.n; i++ {
		j := int(m.assign[i])
		m.inertia += float64(sqdist(m.row(i), m.c[j*d:(j+1)*d]))
	}
	return it
}

// matVecRows keeps each vek32.MatMul_Into call below the size at which vek
// spreads it over goroutines (m·n·p ≥ 100 000): clustering is parallel over
// layers × KV heads already, and lookup runs on the decode thread.
const matVecRows = 256

// matVec sets dst = x·y for x [len(dst)][len(y)] (row-major).
func matVec(dst, x, y []float32) {
	n := len(y)
	rows := max(1, min(matVecRows, 90_000/n))
	for i := 0; i < len(dst); i += rows {
		j := min(i+rows, len(dst))
		vek32.MatMul_Into(dst[i:j], x[i*n:j*n], y, n)
	}
}
