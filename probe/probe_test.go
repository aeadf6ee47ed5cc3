package probe

import (
	"errors"
	"math"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/kvrecall/kvrecall/heads"
	"github.com/kvrecall/kvrecall/paging"
)

// fakeSeq is a sequence's keys for tests: keys[layer][pos][kvHead][headDim].
type fakeSeq struct {
	keys       [][][][]float32
	kvh, hd, P int
	upto       int
}

func newFakeSeq(rng *rand.Rand, layers, n, kvh, hd, P int) *fakeSeq {
	f := &fakeSeq{kvh: kvh, hd: hd, P: P, upto: n}
	f.keys = make([][][][]float32, layers)
	for l := range f.keys {
		f.keys[l] = make([][][]float32, n)
		for p := range f.keys[l] {
			f.keys[l][p] = make([][]float32, kvh)
			for g := range f.keys[l][p] {
				k := make([]float32, hd)
				for i := range k {
					k[i] = float32(rng.NormFloat64())
				}
				f.keys[l][p][g] = k
			}
		}
	}
	return f
}

// view is one layer of a fakeSeq as paging.Summaries, KeyReader and LayerKeys.
type view struct {
	f     *fakeSeq
	layer int
}

func (v view) Pages() int                           { return paging.PagesOf(v.f.upto, v.f.P) }
func (v view) Len(p int) int                        { return min(v.f.P, v.f.upto-p*v.f.P) }
func (v view) KVHeads() int                         { return v.f.kvh }
func (v view) HeadDim() int                         { return v.f.hd }
func (v view) Mean(int, int) []float32              { return make([]float32, v.f.hd) }
func (v view) Min(int, int) []float32               { return make([]float32, v.f.hd) }
func (v view) Max(int, int) []float32               { return make([]float32, v.f.hd) }
func (v view) Box(int, int) ([]float32, []float32)  { return v.Min(0, 0), v.Max(0, 0) }
func (v view) Reps(int, int) [][]float32            { return nil }
func (v view) Key(pos, g int, dst []float32)        { copy(dst, v.f.keys[v.layer][pos][g]) }
func (v view) LayerKeys(layer int) paging.KeyReader { return view{v.f, layer} }

func randQueries(rng *rand.Rand, n, width int) [][]float32 {
	q := make([][]float32, n)
	for t := range q {
		q[t] = make([]float32, width)
		for i := range q[t] {
			q[t][i] = float32(rng.NormFloat64())
		}
	}
	return q
}

func TestActivationWeights(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	for _, tc := range []struct {
		name    string
		tokens  int
		outlier []int   // tokens given a large activation in channel 3
		size    float32 // its size
	}{
		{"one outlier first", 20, []int{0}, 30},
		{"one outlier middle", 20, []int{11}, 30},
		{"one outlier last", 40, []int{39}, 30},
		{"two outliers", 40, []int{5, 30}, 30},
		{"no outlier", 20, nil, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ordinary := func(n int) [][]float32 {
				q := make([][]float32, n)
				for i := range q {
					q[i] = make([]float32, 16)
					for c := range q[i] {
						q[i][c] = 1 + 0.1*float32(rng.NormFloat64()) // small spread
					}
				}
				return q
			}
			// Earlier windows (the document's) set the statistics.
			var warm [][][]float32
			for range 10 {
				warm = append(warm, ordinary(tc.tokens))
			}
			q := ordinary(tc.tokens)
			for _, o := range tc.outlier {
				q[o][3] += tc.size
			}
			w := ActivationWeights(warm, q)
			var sum float64
			for _, v := range w {
				sum += float64(v)
			}
			if math.Abs(sum-1) > 1e-5 {
				t.Fatalf("weights sum to %v, want 1", sum)
			}
			if len(tc.outlier) == 0 {
				for i, v := range w {
					if v > 5/float32(tc.tokens) {
						t.Fatalf("token %d weighs %v among %d ordinary tokens", i, v, tc.tokens)
					}
				}
				return
			}
			// Each outlier outweighs every ordinary token several times over.
			for _, o := range tc.outlier {
				for i, v := range w {
					if !slices.Contains(tc.outlier, i) && 5*v >= w[o] {
						t.Fatalf("ordinary token %d weighs %v, more than a fifth of outlier %d's %v", i, v, o, w[o])
					}
				}
			}
		})
	}
}

func TestShareFormula(t *testing.T) {
	for _, tc := range []struct {
		name         string
		means        []float64
		remaining    int
		lo, hi, want int
	}{
		{"equal", []float64{0.5, 0.5, 0.5, 0.5}, 40, 1, 100, 10},
		{"first higher", []float64{0.9, 0.3, 0.3}, 30, 1, 100, 18},    // 0.9/1.5·30
		{"first lower", []float64{0.1, 0.6, 0.3}, 50, 1, 100, 5},      // 0.1/1.0·50
		{"last layer takes the rest", []float64{0.2}, 17, 1, 100, 17}, // 0.2/0.2
		{"unknown later layer: equal shares", []float64{0.9, math.NaN(), 0.1}, 30, 1, 100, 10},
		{"all zero: equal shares", []float64{0, 0}, 10, 1, 100, 5},
		{"clamped to max", []float64{0.9, 0.1}, 100, 1, 20, 20},
		{"clamped to min", []float64{0.01, 0.99}, 100, 8, 20, 8},
		{"pool spent: min", []float64{0.5, 0.5}, 0, 3, 20, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Share(tc.means, tc.remaining, tc.lo, tc.hi); got != tc.want {
				t.Fatalf("Share(%v, %d, [%d, %d]) = %d, want %d", tc.means, tc.remaining, tc.lo, tc.hi, got, tc.want)
			}
		})
	}
}

// TestSplitAcrossLayers runs the whole cut-off over a pass with fixed
// entropies: layer n gets mean_H[n]/Σ_{m≥n} mean_H[m] of what remains.
func TestSplitAcrossLayers(t *testing.T) {
	H := []float64{0.8, 0.2, 0.5, 0.5}
	remaining := 40
	var got []int
	for n := range H {
		k := Share(H[n:], remaining, 0, 1000)
		got = append(got, k)
		remaining -= k
	}
	// 0.8/2.0·40 = 16; 0.2/1.2·24 = 4; 0.5/1.0·20 = 10; 10.
	if want := []int{16, 4, 10, 10}; !slices.Equal(got, want) {
		t.Fatalf("split %v, want %v", got, want)
	}
}

func TestNormEntropy(t *testing.T) {
	for _, tc := range []struct {
		name   string
		scores []float32
		lo, hi float64
	}{
		{"equal", []float32{0.3, 0.3, 0.3, 0.3}, 1 - 1e-9, 1 + 1e-9},
		{"one dominates", []float32{50, 0, 0, 0}, 0, 1e-9},
		{"one block", []float32{1}, 0, 0},
		{"mixed", []float32{1, 0, 0, 0}, 0.5, 0.99},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if h := NormEntropy(tc.scores); h < tc.lo || h > tc.hi {
				t.Fatalf("NormEntropy(%v) = %v, want in [%v, %v]", tc.scores, h, tc.lo, tc.hi)
			}
		})
	}
}

// refReps computes representatives in float64 from scratch.
func refReps(f *fakeSeq, q [][][]float32, heads, block, topk, window int) [][][][]float64 {
	layers, n, kvh, hd := len(f.keys), f.upto, f.kvh, f.hd
	group := heads / kvh
	nb := (n + block - 1) / block
	out := make([][][][]float64, layers)
	for l := range out {
		score := make([][]float64, kvh)
		for g := range score {
			score[g] = make([]float64, n)
		}
		for pos := 0; pos < n; pos++ {
			first := max(0, pos-window+1)
			for h := 0; h < heads; h++ {
				g := h / group
				lg := make([]float64, pos-first+1)
				m := math.Inf(-1)
				for j := range lg {
					var d float64
					for i := 0; i < hd; i++ {
						d += float64(q[l][pos][h*hd+i]) * float64(f.keys[l][first+j][g][i])
					}
					lg[j] = d / math.Sqrt(float64(hd))
					m = max(m, lg[j])
				}
				var z float64
				for j := range lg {
					lg[j] = math.Exp(lg[j] - m)
					z += lg[j]
				}
				for j := range lg {
					score[g][first+j] += lg[j] / z
				}
			}
		}
		out[l] = make([][][]float64, nb)
		for b := range out[l] {
			out[l][b] = make([][]float64, kvh)
			for g := 0; g < kvh; g++ {
				lo, hi := b*block, min(n, (b+1)*block)
				idx := make([]int, 0, hi-lo)
				for i := lo; i < hi; i++ {
					idx = append(idx, i)
				}
				slices.SortStableFunc(idx, func(a, c int) int {
					switch {
					case score[g][a] > score[g][c]:
						return -1
					case score[g][a] < score[g][c]:
						return 1
					}
					return 0
				})
				idx = idx[:min(topk, len(idx))]
				rep := make([]float64, hd)
				for _, i := range idx {
					for d := range rep {
						rep[d] += float64(f.keys[l][i][g][d]) / float64(len(idx))
					}
				}
				out[l][b][g] = rep
			}
		}
	}
	return out
}

func TestRepsMatchFloat64(t *testing.T) {
	for _, tc := range []struct {
		name                             string
		layers, n, kvh, heads, hd, block int
		topk, window                     int
		batches                          []int
	}{
		{"gqa, two batches", 2, 200, 2, 4, 16, 32, 4, 48, []int{120, 80}},
		{"mha, single tokens at the end", 1, 100, 2, 2, 8, 16, 3, 20, []int{90, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}},
		{"window longer than the sequence", 1, 70, 1, 2, 8, 32, 2, 256, []int{70}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rng := rand.New(rand.NewSource(7))
			f := newFakeSeq(rng, tc.layers, tc.n, tc.kvh, tc.hd, 16)
			q := make([][][]float32, tc.layers)
			for l := range q {
				q[l] = randQueries(rng, tc.n, tc.heads*tc.hd)
			}
			b := NewBuilder(tc.layers, tc.kvh, tc.hd, tc.block, tc.topk, tc.window, 256, 0)
			pos := 0
			for _, n := range tc.batches {
				for l := 0; l < tc.layers; l++ {
					b.Add(l, view{f, l}, &paging.Queries{Q: q[l][pos : pos+n], Heads: tc.heads}, pos)
				}
				pos += n
			}
			r, err := b.Reps(tc.n, func(l int) paging.KeyReader { return view{f, l} })
			if err != nil {
				t.Fatal(err)
			}
			ref := refReps(f, q, tc.heads, tc.block, tc.topk, tc.window)
			if r.Blocks != len(ref[0]) {
				t.Fatalf("%d blocks, want %d", r.Blocks, len(ref[0]))
			}
			for l := range ref {
				for blk := range ref[l] {
					for g := range ref[l][blk] {
						got := r.Rep(l, blk, g)
						for d, want := range ref[l][blk][g] {
							if math.Abs(float64(got[d])-want) > 1e-4 {
								t.Fatalf("layer %d block %d head %d dim %d: %v, float64 reference %v", l, blk, g, d, got[d], want)
							}
						}
					}
				}
			}
		})
	}
}

func TestRepsFile(t *testing.T) {
	rng := rand.New(rand.NewSource(3))
	r := &Reps{Layers: 2, KVHeads: 2, HeadDim: 4, BlockSize: 64, RepTopK: 4, Window: 256, Blocks: 3}
	r.R = make([]float32, 2*3*2*4)
	for i := range r.R {
		r.R[i] = float32(rng.NormFloat64())
	}
	for l := 0; l < 2; l++ {
		var st actStats
		st.update(randQueries(rng, 5, 8), DefaultStatCap)
		r.Stats = append(r.Stats, st)
	}
	r.Entropy = [][]float64{{0.5, 0.25, 0.125}, {0.75}}
	var fp [32]byte
	fp[0] = 9
	path := filepath.Join(t.TempDir(), "probe.kvr")
	if err := r.WriteFile(path, 150, fp); err != nil {
		t.Fatal(err)
	}
	got, err := ReadFile(path, 150, fp, 2, 2, 4)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got.R, r.R) || got.Blocks != 3 || got.BlockSize != 64 ||
		!slices.Equal(got.Stats[1].vars, r.Stats[1].vars) || got.Stats[1].Count != 1 ||
		!slices.EqualFunc(got.Entropy, r.Entropy, slices.Equal) {
		t.Fatalf("read back %+v", got)
	}
	t.Run("other document", func(t *testing.T) {
		if _, err := ReadFile(path, 151, fp, 2, 2, 4); !errors.Is(err, ErrStale) {
			t.Fatalf("representatives of a 150-token document for 151 tokens: err = %v, want ErrStale", err)
		}
		other := fp
		other[1] = 1
		if _, err := ReadFile(path, 150, other, 2, 2, 4); !errors.Is(err, ErrStale) {
			t.Fatalf("representatives of another fingerprint: err = %v, want ErrStale", err)
		}
	})
	t.Run("other model shape", func(t *testing.T) {
		if _, err := ReadFile(path, 150, fp, 3, 2, 4); err == nil || !strings.Contains(err.Error(), "layers") {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("flipped byte", func(t *testing.T) {
		b := readBytes(t, path)
		b[len(b)-10] ^= 1
		bad := filepath.Join(t.TempDir(), "bad.kvr")
		writeBytes(t, bad, b)
		if _, err := ReadFile(bad, 150, fp, 2, 2, 4); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("err = %v, want ErrCorrupt", err)
		}
	})
	t.Run("settings mismatch names the setting", func(t *testing.T) {
		if err := got.Matches(128, 4, 256); err == nil || !strings.Contains(err.Error(), "block_size") {
			t.Fatalf("err = %v", err)
		}
		if err := got.Matches(64, 2, 256); err == nil || !strings.Contains(err.Error(), "repr_topk") {
			t.Fatalf("err = %v", err)
		}
	})
}

func TestSettingsOutOfRange(t *testing.T) {
	base := paging.Config{PageSize: 64, Budget: 1024, Sinks: 64, Window: 256, Layers: 2, KVHeads: 2}
	for _, tc := range []struct {
		name string
		c    func(c paging.Config) paging.Config
		s    Settings
		want string
	}{
		{"block not a page multiple", nil, Settings{BlockSize: 96}, "block_size"},
		{"negative block", nil, Settings{BlockSize: -64}, "block_size"},
		{"block larger than the free budget", nil, Settings{BlockSize: 768}, "block"},
		{"repr_topk above block", nil, Settings{RepTopK: 65}, "repr_topk"},
		{"negative repr_topk", nil, Settings{RepTopK: -1}, "repr_topk"},
		{"exc_block_size past the window", nil, Settings{ExcBlockSize: 512}, "exc_block_size"},
		{"negative question weight", nil, Settings{QuestionWeight: -1}, "question_weight"},
		{"min above max", nil, Settings{MinBlocks: 9, MaxBlocks: 3}, "min_blocks"},
		{"negative history", nil, Settings{History: -2}, "history"},
		{"budget below sinks+window+page", func(c paging.Config) paging.Config { c.Budget = 300; return c }, Settings{}, "budget"},
		{"no budget", func(c paging.Config) paging.Config { c.Budget = 0; return c }, Settings{}, "budget"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := base
			if tc.c != nil {
				c = tc.c(c)
			}
			c.Options = map[string]any{OptionKey: tc.s}
			_, err := paging.New("probe", c)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one naming %q", err, tc.want)
			}
		})
	}
	t.Run("defaults", func(t *testing.T) {
		s, err := paging.New("probe", base)
		if err != nil {
			t.Fatal(err)
		}
		got := s.(*Selector).Settings()
		// 1024 - 64 - 256 = 704 tokens = 11 blocks of 64.
		if got.BlockSize != 64 || got.RepTopK != 4 || got.MinBlocks != 8 || got.MaxBlocks != 22 || got.ExcBlockSize != 256 {
			t.Fatalf("defaults %+v", got)
		}
	})
}

// runSession drives a selector like kvcache does: a question batch of
// qlen tokens after a document of f.upto-qlen tokens, then decode steps.
func runSession(t *testing.T, sel paging.Selector, f *fakeSeq, q [][][]float32, qlen, steps int) ([][]int, []int) {
	t.Helper()
	ps := sel.(paging.PassStarter)
	layers := len(f.keys)
	doc := f.upto - qlen - steps
	var out [][]int
	pos := doc
	for pass := 0; pass <= steps; pass++ {
		n := 1
		if pass == 0 {
			n = qlen
		}
		ps.StartPass(pos, n)
		for l := 0; l < layers; l++ {
			var qs *paging.Queries
			if sel.NeedQueries(l, n) {
				qs = &paging.Queries{Q: q[l][pos : pos+n], Heads: len(q[l][0]) / f.hd}
			}
			v := view{f, l}
			sel.Select(l, v, qs, pos+n)
			if pass == 0 {
				out = append(out, sel.Select(l, v, nil, pos+n).Groups[0])
			}
		}
		pos += n
	}
	return out, sel.(*Selector).LayerBudgets()
}

// TestSessionsDoNotShareStatistics runs two sessions concurrently, each
// with its own queries, and checks that each chooses what it chooses
// alone (run with -race).
func TestSessionsDoNotShareStatistics(t *testing.T) {
	rng := rand.New(rand.NewSource(5))
	const layers, kvh, heads, hd, n, qlen = 3, 2, 4, 16, 2048, 40
	f := newFakeSeq(rng, layers, n, kvh, hd, 64)
	doc := n - qlen - 4
	b := NewBuilder(layers, kvh, hd, 64, 4, 256, 256, 0)
	dq := make([][][]float32, layers)
	for l := range dq {
		dq[l] = randQueries(rng, n, heads*hd)
		b.Add(l, view{f, l}, &paging.Queries{Q: dq[l][:doc], Heads: heads}, 0)
	}
	reps, err := b.Reps(doc, func(l int) paging.KeyReader { return view{f, l} })
	if err != nil {
		t.Fatal(err)
	}
	c := paging.Config{PageSize: 64, Budget: 1024, Sinks: 64, Window: 256, Layers: layers, KVHeads: kvh,
		Options: map[string]any{OptionKey: Settings{Reps: reps}}}
	queries := [2][][][]float32{}
	for i := range queries {
		queries[i] = make([][][]float32, layers)
		for l := range queries[i] {
			queries[i][l] = randQueries(rng, n, heads*hd)
		}
	}
	var alone [2][][]int
	var budgets [2][]int
	for i := range queries {
		s, err := paging.New("probe", c)
		if err != nil {
			t.Fatal(err)
		}
		alone[i], budgets[i] = runSession(t, s, f, queries[i], qlen, 4)
	}
	if slices.EqualFunc(alone[0], alone[1], slices.Equal) {
		t.Fatal("different questions chose the same blocks: the test cannot tell sessions apart")
	}
	var wg sync.WaitGroup
	for rep := 0; rep < 4; rep++ {
		for i := range queries {
			wg.Add(1)
			go func() {
				defer wg.Done()
				s, err := paging.New("probe", c)
				if err != nil {
					t.Error(err)
					return
				}
				got, bud := runSession(t, s, f, queries[i], qlen, 4)
				if !slices.EqualFunc(got, alone[i], slices.Equal) || !slices.Equal(bud, budgets[i]) {
					t.Errorf("session %d chose %v (budgets %v) concurrently, %v (%v) alone", i, got, bud, alone[i], budgets[i])
				}
			}()
		}
	}
	wg.Wait()
}

// TestBudgetsSizeLayers checks that a probing pass asks for MaxBlocks in
// every layer, the passes after it for the per-layer cut-off, and that the
// cut-off spends the pool.
func TestBudgetsSizeLayers(t *testing.T) {
	rng := rand.New(rand.NewSource(11))
	const layers, kvh, heads, hd, n, qlen = 4, 2, 4, 16, 4096, 32
	f := newFakeSeq(rng, layers, n, kvh, hd, 64)
	doc := n - qlen - 2
	b := NewBuilder(layers, kvh, hd, 64, 4, 256, 256, 0)
	q := make([][][]float32, layers)
	for l := range q {
		q[l] = randQueries(rng, n, heads*hd)
		b.Add(l, view{f, l}, &paging.Queries{Q: q[l][:doc], Heads: heads}, 0)
	}
	reps, _ := b.Reps(doc, func(l int) paging.KeyReader { return view{f, l} })
	c := paging.Config{PageSize: 64, Budget: 1024, Sinks: 64, Window: 256, DenseLayers: 1, Layers: layers, KVHeads: kvh,
		Options: map[string]any{OptionKey: Settings{Reps: reps}}}
	s, err := paging.New("probe", c)
	if err != nil {
		t.Fatal(err)
	}
	p := s.(*Selector)
	p.StartPass(doc, qlen)
	if g := p.Groups(0)[0]; g.Budget != 0 {
		t.Fatalf("dense layer 0 has budget %d", g.Budget)
	}
	for l := 1; l < layers; l++ {
		if g := p.Groups(l)[0]; g.Budget != 64+256+22*64 {
			t.Fatalf("probing pass: layer %d budget %d, want MaxBlocks' %d", l, g.Budget, 64+256+22*64)
		}
	}
	sels, bud := runSession(t, s, f, q, qlen, 2)
	total := 0
	for l := 1; l < layers; l++ {
		if g := p.Groups(l)[0]; g.Budget != bud[l] {
			t.Fatalf("decode pass: layer %d pool budget %d, cut-off %d", l, g.Budget, bud[l])
		}
		blocks := (bud[l] - 64 - 256) / 64
		if blocks < 8 || blocks > 22 {
			t.Fatalf("layer %d: %d blocks outside the clamps [8, 22]", l, blocks)
		}
		total += blocks
		req, _ := c.Required(doc + qlen)
		if extra := len(sels[l]) - len(req); extra != blocks {
			t.Fatalf("layer %d selected %d pages beyond sinks and window, budget says %d blocks", l, extra, blocks)
		}
	}
	if total != 11*(layers-1) {
		t.Fatalf("layers took %d blocks of a pool of %d", total, 11*(layers-1))
	}
}

func readBytes(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func writeBytes(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// probe+heads: the heads modifier wraps probe (one group per layer) and
// its streaming heads keep sinks + window while the retrieval heads follow
// probe's per-layer budget.
func TestProbeWithHeads(t *testing.T) {
	c := paging.Config{PageSize: 64, Budget: 1024, Sinks: 64, Window: 256, Layers: 2, KVHeads: 2,
		Options: map[string]any{"heads": heads.Mask{{false, true}, {false, true}}}}
	s, err := paging.New("probe+heads", c)
	if err != nil {
		t.Fatal(err)
	}
	if s.Name() != "probe+heads" {
		t.Fatalf("name %q", s.Name())
	}
	ps, ok := s.(paging.PassStarter)
	if !ok {
		t.Fatal("probe+heads does not pass StartPass on")
	}
	ps.StartPass(1000, 10)
	gs := s.Groups(1)
	if len(gs) != 2 || gs[0].Budget != 64+256+22*64 || gs[1].Budget != 64+256 {
		t.Fatalf("probing pass groups %+v", gs)
	}
}

// In decode, a probe runs again once ExcBlockSize tokens have passed since
// the last one: only then does the selector ask for queries and size its
// pools for MaxBlocks again.
func TestDecodeReprobesEveryWindow(t *testing.T) {
	rng := rand.New(rand.NewSource(13))
	const layers, kvh, heads, hd, n, qlen, exc = 2, 2, 4, 16, 2048, 16, 8
	f := newFakeSeq(rng, layers, n, kvh, hd, 64)
	doc := n - qlen - 3*exc
	b := NewBuilder(layers, kvh, hd, 64, 4, 256, exc, 0)
	q := make([][][]float32, layers)
	for l := range q {
		q[l] = randQueries(rng, n, heads*hd)
		b.Add(l, view{f, l}, &paging.Queries{Q: q[l][:doc], Heads: heads}, 0)
	}
	reps, _ := b.Reps(doc, func(l int) paging.KeyReader { return view{f, l} })
	s, err := paging.New("probe", paging.Config{PageSize: 64, Budget: 1024, Sinks: 64, Window: 256, Layers: layers, KVHeads: kvh,
		Options: map[string]any{OptionKey: Settings{Reps: reps, ExcBlockSize: exc}}})
	if err != nil {
		t.Fatal(err)
	}
	p := s.(*Selector)
	pos := doc
	var probed []int
	for step := 0; step <= 3*exc; step++ {
		batch := 1
		if step == 0 {
			batch = qlen
		}
		p.StartPass(pos, batch)
		need := p.NeedQueries(0, batch)
		if need {
			probed = append(probed, step)
			if p.Groups(0)[0].Budget != p.maxBudget() {
				t.Fatalf("step %d probes with a pool of %d, want %d", step, p.Groups(0)[0].Budget, p.maxBudget())
			}
		} else if p.Groups(0)[0].Budget != p.LayerBudgets()[0] {
			t.Fatalf("step %d: pool %d, cut-off %d", step, p.Groups(0)[0].Budget, p.LayerBudgets()[0])
		}
		for l := 0; l < layers; l++ {
			var qs *paging.Queries
			if need {
				qs = &paging.Queries{Q: q[l][pos : pos+batch], Heads: heads}
			}
			p.Select(l, view{f, l}, qs, pos+batch)
		}
		pos += batch
	}
	// The question (step 0, ending at doc+qlen), then every exc tokens.
	if want := []int{0, exc, 2 * exc, 3 * exc}; !slices.Equal(probed, want) {
		t.Fatalf("probed at steps %v, want %v", probed, want)
	}
}

// The document's entropy history (kept by the builder while it reads the
// document) starts each session's cut-off: the first question already
// splits the pool by the formula, not in equal shares.
func TestDocumentHistoryDrivesFirstCutoff(t *testing.T) {
	rng := rand.New(rand.NewSource(17))
	const layers, kvh, heads, hd, n, qlen = 3, 2, 4, 16, 4096, 32
	f := newFakeSeq(rng, layers, n, kvh, hd, 64)
	doc := n - qlen
	c := paging.Config{PageSize: 64, Budget: 1024, Sinks: 64, Window: 256, Layers: layers, KVHeads: kvh}
	b := NewBuilder(layers, kvh, hd, 64, 4, 256, 256, 0)
	b.SetHistory(c, 5)
	q := make([][][]float32, layers)
	for l := range q {
		q[l] = randQueries(rng, n, heads*hd)
		for pos := 0; pos < doc; pos += 512 {
			b.Add(l, view{f, l}, &paging.Queries{Q: q[l][pos:min(doc, pos+512)], Heads: heads}, pos)
		}
	}
	reps, err := b.Reps(doc, func(l int) paging.KeyReader { return view{f, l} })
	if err != nil {
		t.Fatal(err)
	}
	for l, h := range reps.Entropy {
		if len(h) != 5 {
			t.Fatalf("layer %d kept %d entropies, want the last 5 windows", l, len(h))
		}
		for _, v := range h {
			if v <= 0 || v > 1 {
				t.Fatalf("layer %d entropy %v outside (0, 1]", l, v)
			}
		}
	}
	// Skewed histories, so that the formula and equal shares differ.
	reps.Entropy = [][]float64{{0.9, 0.9}, {0.1, 0.1}, {0.5, 0.5}}
	c.Options = map[string]any{OptionKey: Settings{Reps: reps, MinBlocks: 1, MaxBlocks: 30}}
	s, err := paging.New("probe", c)
	if err != nil {
		t.Fatal(err)
	}
	_, bud := runSession(t, s, f, q, qlen, 0)
	H := s.(*Selector).LayerEntropies()
	remaining := 11 * layers
	for l := 0; l < layers; l++ {
		var means []float64
		for m := l; m < layers; m++ {
			h := slices.Clone(reps.Entropy[m])
			if m <= l {
				h = append(h, H[m]) // a layer's own entropy joins its history first
			}
			var sum float64
			for _, v := range h {
				sum += v
			}
			means = append(means, sum/float64(len(h)))
		}
		k := Share(means, remaining, 1, 30)
		remaining -= k
		if want := 64 + 256 + k*64; bud[l] != want {
			t.Fatalf("layer %d budget %d, the formula gives %d (%d blocks; budgets %v)", l, bud[l], want, k, bud)
		}
	}
	if bud[0] == bud[1] {
		t.Fatalf("skewed histories gave equal budgets %v", bud)
	}
}

// The best blocks bring the candidate after them, within the layer's
// share; blocks that are not candidates (window, sinks, no representative)
// are not added, and the best blocks come first.
func TestPickBlocksWithNeighbors(t *testing.T) {
	cand := []int{2, 3, 4, 7, 9, 10}
	scores := []float32{0.1, 0.2, 0.3, 0.9, 0.8, 0.5}
	for _, c := range []struct {
		name         string
		k, neighbors int
		want         []int
	}{
		{"none", 3, 0, []int{7, 9, 10}},
		{"best one, next not a candidate", 1, 1, []int{7}},
		{"best two", 3, 2, []int{7, 9, 10}},
		{"fills after neighbours", 4, 2, []int{4, 7, 9, 10}},
		{"share cuts a neighbour", 2, 2, []int{7, 9}},
		{"a best block without a candidate after it brings none", 4, 1, []int{4, 7, 9, 10}},
		{"every block", 6, 6, []int{2, 3, 4, 7, 9, 10}},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := pickBlocks(nil, cand, scores, c.k, c.neighbors); !slices.Equal(got, c.want) {
				t.Fatalf("got %v, want %v", got, c.want)
			}
		})
	}
	// Only the best block brings its successor: 2 (best) brings 3, then 9
	// and 7 by score; 9's successor 10 does not come.
	scores = []float32{0.9, 0.1, 0.2, 0.5, 0.8, 0.3}
	if got := pickBlocks(nil, cand, scores, 4, 1); !slices.Equal(got, []int{2, 3, 7, 9}) {
		t.Fatalf("only the best: got %v", got)
	}
}
