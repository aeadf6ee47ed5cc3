// Package squeezed is Squeezed Attention (arXiv 2411.09688) for kvrecall's
// documents: offline, once per document, the keys of every layer and KV
// head are clustered (k-means on the L2-normalised keys, centroids the
// means of the raw keys), with coarse centroids over the fine ones; a
// threshold on the clusters' share of attention is calibrated from the
// queries of the document's last tokens. Online, the "squeezed" method
// scores the centroids against each step's queries and attends to the
// tokens of the clusters that pass, plus sinks and the recent window.
package squeezed

import (
	"fmt"
	"math"
	"runtime"
	"sync"

	"github.com/viterin/vek/vek32"
)

// Options configure clustering and calibration. Zero fields take the
// defaults below (the paper's).
type Options struct {
	Fraction float64 // fine clusters per clustered token (default 0.05)
	Window   int     // the document's last tokens, left out of the clusters and used to calibrate (default 100)
	// CoarseRatio is fine clusters per coarse cluster (default: √K, so both levels have √K entries).
	CoarseRatio int
	Quantile    float64 // the global quantile of S_j that becomes the threshold (default 0.9)
	MaxIter     int     // Lloyd iterations at most (default 30)
	// Sample is the fraction of a KV head's clustered tokens k-means fits
	// its centroids on (default 0.125), before SampledFullIter Lloyd
	// iterations over every token, starting with its assignment to the
	// nearest fitted centroid (KMeansOptions.Sample, FullIter). The
	// sample keeps at least SampleMinPoints tokens and
	// SampleMinPerCluster per cluster; 1 fits on every token.
	Sample  float64
	Seed    uint64
	Workers int // parallel clusterings (default GOMAXPROCS)
}

// Defaults of Options.
const (
	DefaultFraction = 0.05
	DefaultWindow   = 100
	DefaultQuantile = 0.9
	DefaultSample   = 0.125
	// A sampled fit keeps at least this many tokens (smaller documents
	// are clustered whole) and this many per cluster.
	SampleMinPoints     = 2048
	SampleMinPerCluster = 2
	// SampledFullIter is the Lloyd iterations over every token after a
	// sampled fit: on the recall model's keys at 16k, 2 instead of 1 cut
	// the inertia's excess over plain k-means from 10% to 4% (1/8 sample).
	SampledFullIter = 2
)

// Fill applies the defaults and checks the settings.
func (o Options) Fill() (Options, error) {
	if o.Fraction == 0 {
		o.Fraction = DefaultFraction
	}
	if o.Window == 0 {
		o.Window = DefaultWindow
	}
	if o.Quantile == 0 {
		o.Quantile = DefaultQuantile
	}
	if o.Sample == 0 {
		o.Sample = DefaultSample
	}
	if o.Workers <= 0 {
		o.Workers = runtime.GOMAXPROCS(0)
	}
	switch {
	case o.Fraction < 0 || o.Fraction > 1:
		return o, fmt.Errorf("squeezed: cluster fraction %g must be in (0, 1]", o.Fraction)
	case o.Window < 0:
		return o, fmt.Errorf("squeezed: observation window %d must not be negative", o.Window)
	case o.Quantile <= 0 || o.Quantile >= 1:
		return o, fmt.Errorf("squeezed: quantile %g must be in (0, 1)", o.Quantile)
	case o.Sample < 0 || o.Sample > 1:
		return o, fmt.Errorf("squeezed: sample fraction %g must be in (0, 1]", o.Sample)
	case o.CoarseRatio < 0 || o.MaxIter < 0:
		return o, fmt.Errorf("squeezed: coarse ratio %d and max iterations %d must not be negative", o.CoarseRatio, o.MaxIter)
	}
	return o, nil
}

// Index is a document's clustering: one Head per layer and KV head, and
// the calibrated threshold.
type Index struct {
	Layers, KVHeads, HeadDim int
	Tokens                   int       // the document's tokens
	Clustered                int       // tokens 0..Clustered-1 are in clusters; the rest (the window) in none
	Heads                    [][]*Head // [layer][kvHead]
	Quantile                 float64
	Threshold                float32 // the global Quantile of S_j over the window's queries (0: not calibrated)
}

// Head returns the clustering of layer's KV head g.
func (ix *Index) Head(layer, g int) *Head { return ix.Heads[layer][g] }

// KeySource gives the roped keys of the first n tokens of one layer and KV
// head as [n][headDim] float32, written into dst (resized as needed).
type KeySource func(layer, kvHead, n int, dst []float32) []float32

// Build clusters the keys of a document of tokens tokens: every layer and
// KV head in parallel (o.Workers at once), each deterministic for o.Seed,
// layer and head whatever the scheduling.
func Build(keys KeySource, layers, kvHeads, headDim, tokens int, o Options) (*Index, error) {
	o, err := o.Fill()
	if err != nil {
		return nil, err
	}
	n := tokens - o.Window
	if n < 1 {
		return nil, fmt.Errorf("squeezed: a document of %d tokens leaves none to cluster outside the %d-token observation window", tokens, o.Window)
	}
	k := max(1, int(math.Round(o.Fraction*float64(n))))
	ratio := o.CoarseRatio
	if ratio == 0 {
		ratio = max(1, int(math.Sqrt(float64(k))))
	}
	coarse := max(1, (k+ratio-1)/ratio)
	ix := &Index{Layers: layers, KVHeads: kvHeads, HeadDim: headDim, Tokens: tokens, Clustered: n, Quantile: o.Quantile,
		Heads: make([][]*Head, layers)}
	for l := range ix.Heads {
		ix.Heads[l] = make([]*Head, kvHeads)
	}
	jobs := make(chan [2]int)
	errs := make([]error, layers*kvHeads)
	var wg sync.WaitGroup
	for w := 0; w < min(o.Workers, layers*kvHeads); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var buf []float32
			for j := range jobs {
				l, g := j[0], j[1]
				buf = keys(l, g, n, buf)
				km := KMeansOptions{MaxIter: o.MaxIter, Seed: o.Seed ^ uint64(l)<<32 ^ uint64(g)<<16, Sample: sampleSize(n, k, o.Sample), FullIter: SampledFullIter}
				h, err := cluster(buf, headDim, k, coarse, km)
				if err != nil {
					errs[l*kvHeads+g] = fmt.Errorf("squeezed: layer %d, KV head %d: %w", l, g, err)
					continue
				}
				ix.Heads[l][g] = h
			}
		}()
	}
	for l := 0; l < layers; l++ {
		for g := 0; g < kvHeads; g++ {
			jobs <- [2]int{l, g}
		}
	}
	close(jobs)
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return nil, err
		}
	}
	return ix, nil
}

// sampleSize is the points a sampled k-means fit of k clusters over n
// points uses: the fraction f of them, at least SampleMinPoints and
// SampleMinPerCluster per cluster, at most n (then every point).
func sampleSize(n, k int, f float64) int {
	return min(n, max(int(math.Ceil(f*float64(n))), SampleMinPoints, SampleMinPerCluster*k))
}

// logits sets dst[j] = q·c_j/√d + log N_j for every cluster and returns
// log Z = log Σ_j N_j exp(q·c_j/√d); then S_j = exp(dst[j] − log N_j − log Z).
func (h *Head) logits(q []float32, dst []float32) float64 {
	matVec(dst, h.Centroids, q)
	inv := float32(1 / math.Sqrt(float64(h.D)))
	vek32.MulNumber_Inplace(dst, inv)
	m := float32(math.Inf(-1))
	for j, v := range dst {
		dst[j] = v + float32(math.Log(float64(h.Sizes[j])))
		m = max(m, dst[j])
	}
	var z float64
	for _, v := range dst {
		z += math.Exp(float64(v - m))
	}
	return float64(m) + math.Log(z)
}

// Shares returns S_j = exp(q·c_j/√d) / Σ_k N_k exp(q·c_k/√d) for every
// cluster: the attention a key of cluster j gets from q if every key
// scored like its centroid.
func (h *Head) Shares(q []float32, dst []float32) []float32 {
	dst = grow(dst, h.K())
	lz := h.logits(q, dst)
	for j, v := range dst {
		if h.Sizes[j] == 0 {
			dst[j] = 0 // an empty cluster (only with duplicate keys) holds no attention
			continue
		}
		dst[j] = float32(math.Exp(float64(v) - math.Log(float64(h.Sizes[j])) - lz))
	}
	return dst
}

// Calibrate sets the threshold from the observation window's queries:
// queries[layer] is [token][heads·headDim] (the roped queries of the
// document's last tokens, query head h reading KV head h/(heads/kvHeads)).
// Every S_j of every layer, head and query goes into one list, whose
// ix.Quantile is the threshold.
func (ix *Index) Calibrate(queries [][][]float32, heads int) error {
	if len(queries) != ix.Layers {
		return fmt.Errorf("squeezed: calibration queries for %d layers, the index has %d", len(queries), ix.Layers)
	}
	if heads <= 0 || heads%ix.KVHeads != 0 {
		return fmt.Errorf("squeezed: %d query heads for %d KV heads", heads, ix.KVHeads)
	}
	G, d := heads/ix.KVHeads, ix.HeadDim
	var all, s []float32
	for l, qs := range queries {
		for _, q := range qs {
			if len(q) != heads*d {
				return fmt.Errorf("squeezed: calibration query of %d floats in layer %d, want %d", len(q), l, heads*d)
			}
			for h := 0; h < heads; h++ {
				s = ix.Heads[l][h/G].Shares(q[h*d:(h+1)*d], s)
				all = append(all, s...)
			}
		}
	}
	if len(all) == 0 {
		return fmt.Errorf("squeezed: no calibration queries")
	}
	ix.Threshold = nth(all, min(len(all)-1, int(ix.Quantile*float64(len(all)))))
	return nil
}

// nth returns the element that would be at index i of x sorted ascending
// (x is reordered): quickselect, linear on average, where a sort of the
// millions of shares a document's calibration gives takes longer than
// computing them.
func nth(x []float32, i int) float32 {
	lo, hi := 0, len(x)-1
	for lo < hi {
		// Median of three as the pivot; Hoare partition.
		mid := lo + (hi-lo)/2
		a, b, c := x[lo], x[mid], x[hi]
		p := max(min(a, b), min(max(a, b), c))
		l, r := lo, hi
		for l <= r {
			for x[l] < p {
				l++
			}
			for x[r] > p {
				r--
			}
			if l <= r {
				x[l], x[r] = x[r], x[l]
				l++
				r--
			}
		}
		switch {
		case i <= r:
			hi = r
		case i >= l:
			lo = l
		default:
			return x[i] // between r and l: equal to the pivot
		}
	}
	return x[i]
}
