package hyper_test

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"testing"

	"github.com/ollama/ollama/ml"
	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/hyper"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/runtime"
)

var backend ml.Backend

// TestMain opens a tiny random model once for its CPU backend.
func TestMain(m *testing.M) {
	testmodels.Quiet()
	os.Exit(func() int {
		t := &testing.T{}
		path := testmodels.Random(t, "llama", "tiny", foundry.F32, 4, false)
		mod, err := runtime.Open(context.Background(), path, runtime.Options{Threads: 2, ContextLength: 256})
		if err != nil {
			fmt.Fprintln(os.Stderr, "hyper tests: open model:", err)
			return 1
		}
		defer mod.Close()
		backend = mod.Backend()
		return m.Run()
	}())
}

func randoms(r *rand.Rand, n int) []float32 {
	x := make([]float32, n)
	for i := range x {
		x[i] = float32(r.NormFloat64())
	}
	return x
}

// clustered returns n tokens of heads vectors of dim d, each near one of
// the centres ([k][d], norm ~3) plus noise: structure that LSH finds.
func clustered(r *rand.Rand, centres []float32, spread float32, n, heads, d int) []float32 {
	k := len(centres) / d
	x := make([]float32, n*heads*d)
	for t := 0; t < n; t++ {
		for h := 0; h < heads; h++ {
			c := r.IntN(k)
			for i := 0; i < d; i++ {
				x[(t*heads+h)*d+i] = spread*centres[c*d+i]/float32(math.Sqrt(float64(d))) + 0.3*float32(r.NormFloat64())
			}
		}
	}
	return x
}

// run computes hyper.Attention on the CPU backend.
func run(t *testing.T, c hyper.Config, s hyper.Shape, q, k, v []float32, scale float64, causal bool) []float32 {
	t.Helper()
	n := len(q) / (s.Heads * s.HeadDim)
	ctx := backend.NewContext()
	defer ctx.Close()
	qt := ctx.Input().FromFloats(q, s.HeadDim, s.Heads, n)
	kt := ctx.Input().FromFloats(k, s.HeadDim, s.KVHeads, n)
	vt := ctx.Input().FromFloats(v, s.HeadDim, s.KVHeads, n)
	out := hyper.Attention(ctx, c, qt, kt, vt, scale, causal)
	res := ctx.Input().Empty(ml.DTypeF32, s.HeadDim, s.Heads, n)
	ctx.Forward(out.Copy(ctx, res)).Compute(res)
	return append([]float32(nil), res.Floats()...)
}

func maxAbs(a, b []float32) float64 {
	m := 0.0
	for i := range a {
		m = math.Max(m, math.Abs(float64(a[i])-float64(b[i])))
	}
	return m
}

// rmsErr is the root mean square of a-b (values have unit variance).
func rmsErr(a, b []float32) float64 {
	sum := 0.0
	for i := range a {
		d := float64(a[i]) - float64(b[i])
		sum += d * d
	}
	return math.Sqrt(sum / float64(len(a)))
}

func TestValidateNamesTheSetting(t *testing.T) {
	cases := []struct {
		name string
		edit func(*hyper.Config)
		want string
	}{
		{"no projections", func(c *hyper.Config) { c.Projections = 0 }, "projections"},
		{"too many projections", func(c *hyper.Config) { c.Projections = 8 }, "projections"},
		{"zero block", func(c *hyper.Config) { c.BlockSize = 0 }, "block size"},
		{"negative samples", func(c *hyper.Config) { c.Samples = -1 }, "samples"},
		{"zero min_seq_len", func(c *hyper.Config) { c.MinSeqLen = 0 }, "min_seq_len"},
	}
	require.NoError(t, hyper.Default().Validate())
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := hyper.Default()
			tc.edit(&c)
			err := c.Validate()
			require.Error(t, err)
			require.Contains(t, err.Error(), tc.want)
		})
	}
}

// With blocks as large as the sequence, or a sequence no longer than
// MinSeqLen, HyperAttention is exact attention: in the reference (float64,
// to 1e-9) and in the graph (float32 throughout: within 2e-5 of float64).
func TestExactWhenBlocksCoverOrShort(t *testing.T) {
	s := hyper.Shape{Heads: 4, KVHeads: 2, HeadDim: 16}
	cases := []struct {
		name   string
		c      hyper.Config
		n      int
		causal bool
	}{
		{"block >= n, unmasked", hyper.Config{Projections: 3, BlockSize: 200, Samples: 16, MinSeqLen: 8, Seed: 3}, 200, false},
		{"block >= n, causal recursion", hyper.Config{Projections: 3, BlockSize: 128, Samples: 16, MinSeqLen: 20, Seed: 3}, 150, true},
		{"n <= min_seq_len, causal", hyper.Config{Projections: 7, BlockSize: 8, Samples: 4, MinSeqLen: 180, Seed: 3}, 180, true},
		{"n < min_seq_len, unmasked", hyper.Config{Projections: 7, BlockSize: 8, Samples: 4, MinSeqLen: 181, Seed: 3}, 180, false},
		// Query chunks of 512 in the leaf's first half, 256 in its second (leafSpans).
		{"n <= min_seq_len, causal, leaf in 7 query chunks of 512 and 256", hyper.Config{Projections: 7, BlockSize: 8, Samples: 4, MinSeqLen: 2100, Seed: 3}, 2100, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := rand.New(rand.NewPCG(1, 2))
			q, k, v := randoms(r, tc.n*s.Heads*s.HeadDim), randoms(r, tc.n*s.KVHeads*s.HeadDim), randoms(r, tc.n*s.KVHeads*s.HeadDim)
			scale := 1 / math.Sqrt(float64(s.HeadDim))
			want, err := hyper.Exact(s, q, k, v, scale, tc.causal)
			require.NoError(t, err)
			ref, err := hyper.Reference(tc.c, s, q, k, v, scale, tc.causal)
			require.NoError(t, err)
			require.Less(t, maxAbs(ref, want), 1e-6, "reference vs exact")
			got := run(t, tc.c, s, q, k, v, scale, tc.causal)
			e := maxAbs(got, want)
			t.Logf("graph vs exact float64: max abs error %.2g", e)
			require.Less(t, e, 2e-5, "graph vs exact")
		})
	}
}

// The kernel check: the graph computes what the reference computes (same
// hash, sort and samples), on random inputs where the approximation is far
// from exact attention, with padding, GQA and several recursion levels.
func TestGraphMatchesReference(t *testing.T) {
	cases := []struct {
		name   string
		s      hyper.Shape
		c      hyper.Config
		n      int
		causal bool
	}{
		{"unmasked, blocks divide", hyper.Shape{Heads: 2, KVHeads: 2, HeadDim: 8}, hyper.Config{Projections: 3, BlockSize: 16, Samples: 8, MinSeqLen: 16, Seed: 5}, 128, false},
		{"unmasked, padded, gqa", hyper.Shape{Heads: 4, KVHeads: 2, HeadDim: 16}, hyper.Config{Projections: 5, BlockSize: 24, Samples: 12, MinSeqLen: 32, Seed: 6}, 203, false},
		{"causal, 3 levels, gqa", hyper.Shape{Heads: 4, KVHeads: 1, HeadDim: 16}, hyper.Config{Projections: 7, BlockSize: 16, Samples: 16, MinSeqLen: 40, Seed: 7}, 301, true},
		{"causal, leaves of 525 in 3 query chunks", hyper.Shape{Heads: 2, KVHeads: 1, HeadDim: 8}, hyper.Config{Projections: 6, BlockSize: 64, Samples: 32, MinSeqLen: 525, Seed: 9}, 2100, true},
		{"causal, no samples", hyper.Shape{Heads: 2, KVHeads: 2, HeadDim: 8}, hyper.Config{Projections: 4, BlockSize: 10, Samples: 0, MinSeqLen: 30, Seed: 8}, 130, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := tc.s
			r := rand.New(rand.NewPCG(9, uint64(tc.n)))
			q, k, v := randoms(r, tc.n*s.Heads*s.HeadDim), randoms(r, tc.n*s.KVHeads*s.HeadDim), randoms(r, tc.n*s.KVHeads*s.HeadDim)
			scale := 1 / math.Sqrt(float64(s.HeadDim))
			ref, err := hyper.Reference(tc.c, s, q, k, v, scale, tc.causal)
			require.NoError(t, err)
			exact, err := hyper.Exact(s, q, k, v, scale, tc.causal)
			require.NoError(t, err)
			got := run(t, tc.c, s, q, k, v, scale, tc.causal)
			e, far := maxAbs(got, ref), maxAbs(ref, exact)
			t.Logf("graph vs reference %.2g; reference vs exact %.2g", e, far)
			require.Greater(t, far, 0.05, "the approximation must differ from exact attention here, or the check proves nothing")
			require.Less(t, e, 2e-5)
		})
	}
}

// On clustered queries and keys (24 centres shared by both), the
// approximation error against exact attention falls as the blocks grow,
// and as the samples grow from 64. The numbers are in docs/hyper.md.
func TestErrorFallsWithBlocksAndSamples(t *testing.T) {
	const n, d = 2048, 32
	const spread = 3
	s := hyper.Shape{Heads: 2, KVHeads: 2, HeadDim: d}
	r := rand.New(rand.NewPCG(21, 22))
	centres := randoms(r, 24*d)
	q, k := clustered(r, centres, spread, n, s.Heads, d), clustered(r, centres, spread, n, s.KVHeads, d)
	v := randoms(r, n*s.KVHeads*d)
	scale := 1 / math.Sqrt(d)
	for _, causal := range []bool{false, true} {
		t.Run(fmt.Sprintf("causal=%v", causal), func(t *testing.T) {
			exact, err := hyper.Exact(s, q, k, v, scale, causal)
			require.NoError(t, err)
			blocks, samples := []int{32, 128, 512}, []int{0, 64, 256, 1024}
			errs := make([][]float64, len(blocks))
			for i, b := range blocks {
				errs[i] = make([]float64, len(samples))
				for j, m := range samples {
					c := hyper.Config{Projections: 7, BlockSize: b, Samples: m, MinSeqLen: 256, Seed: 1}
					errs[i][j] = rmsErr(run(t, c, s, q, k, v, scale, causal), exact)
					t.Logf("block %4d samples %4d: rms error %.4f", b, m, errs[i][j])
				}
			}
			for i := range blocks {
				for j := range samples {
					if i > 0 {
						require.Less(t, errs[i][j], errs[i-1][j], "larger blocks, samples %d", samples[j])
					}
					// From 64 samples on; a few samples weighted n/m add
					// more variance than the mass they recover (64 is
					// worse than none here), so 0 -> 64 is not asserted.
					if j > 1 {
						require.Less(t, errs[i][j], errs[i][j-1], "more samples, block %d", blocks[i])
					}
				}
			}
		})
	}
}

// The chunked exact path is exact causal attention, whatever the chunk.
func TestCausalChunksAreExact(t *testing.T) {
	s := hyper.Shape{Heads: 4, KVHeads: 2, HeadDim: 16}
	const n = 150
	r := rand.New(rand.NewPCG(3, 4))
	q, k, v := randoms(r, n*s.Heads*s.HeadDim), randoms(r, n*s.KVHeads*s.HeadDim), randoms(r, n*s.KVHeads*s.HeadDim)
	scale := 1 / math.Sqrt(float64(s.HeadDim))
	want, err := hyper.Exact(s, q, k, v, scale, true)
	require.NoError(t, err)
	for _, chunk := range []int{7, 64, 150, 400} {
		t.Run(fmt.Sprint(chunk), func(t *testing.T) {
			ctx := backend.NewContext()
			defer ctx.Close()
			out := hyper.Causal(ctx, ctx.Input().FromFloats(q, s.HeadDim, s.Heads, n),
				ctx.Input().FromFloats(k, s.HeadDim, s.KVHeads, n), ctx.Input().FromFloats(v, s.HeadDim, s.KVHeads, n), scale, chunk)
			res := ctx.Input().Empty(ml.DTypeF32, s.HeadDim, s.Heads, n)
			ctx.Forward(out.Copy(ctx, res)).Compute(res)
			require.Less(t, maxAbs(res.Floats(), want), 2e-5)
		})
	}
}

// Staged splits the causal pass across graphs of at most nodes tensors
// (the leaves, then levels, with the running pack carried through host
// memory) and gives Attention's values: the same ops on the same f32s.
func TestStagedMatchesOneGraph(t *testing.T) {
	s := hyper.Shape{Heads: 4, KVHeads: 2, HeadDim: 16}
	c := hyper.Config{Projections: 7, BlockSize: 16, Samples: 16, MinSeqLen: 40, Seed: 7}
	const n = 600 // leaves of 38, 4 levels
	N, leaf := c.Padded(n)
	require.Equal(t, 16*leaf, N)
	one := hyper.GraphSize(c, n, 0)
	cases := []struct {
		name   string
		nodes  int
		graphs int
	}{
		{"one graph", one, 1},
		{"two levels per graph", one - 150*2, 2},
		{"leaves alone, then a level per graph", one - 150*4 + 149, 5},
	}
	r := rand.New(rand.NewPCG(4, n))
	q, k, v := randoms(r, n*s.Heads*s.HeadDim), randoms(r, n*s.KVHeads*s.HeadDim), randoms(r, n*s.KVHeads*s.HeadDim)
	scale := 1 / math.Sqrt(float64(s.HeadDim))
	want := run(t, c, s, q, k, v, scale, true)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			plan, err := c.Stages(n, tc.nodes)
			require.NoError(t, err)
			require.Len(t, plan, tc.graphs)
			require.Equal(t, leaf, plan[0][0])
			require.Equal(t, N, plan[len(plan)-1][1])
			for i := 1; i < len(plan); i++ {
				require.Equal(t, plan[i-1][1], plan[i][0], "the stages cover the levels in order")
			}
			graphs := 0
			got, err := hyper.Staged(func() ml.Context { graphs++; return backend.NewContext() }, c, s, q, k, v, scale, tc.nodes)
			require.NoError(t, err)
			require.Equal(t, tc.graphs, graphs)
			require.Equal(t, want, got, "bit-exact with the one-graph pass")
		})
	}
	t.Run("too small", func(t *testing.T) {
		_, err := c.Stages(n, 150)
		require.ErrorContains(t, err, "graph nodes")
		_, err = hyper.Staged(backend.NewContext, c, s, q, k, v, scale, 150)
		require.ErrorContains(t, err, "graph nodes")
	})
}

// CausalWindow is exact sliding-window attention in any chunking, for
// windows shorter and longer than the chunk, and window 1 (only itself).
func TestCausalWindowIsExact(t *testing.T) {
	s := hyper.Shape{Heads: 4, KVHeads: 2, HeadDim: 16}
	const n = 150
	r := rand.New(rand.NewPCG(5, 6))
	q, k, v := randoms(r, n*s.Heads*s.HeadDim), randoms(r, n*s.KVHeads*s.HeadDim), randoms(r, n*s.KVHeads*s.HeadDim)
	scale := 1 / math.Sqrt(float64(s.HeadDim))
	full, err := hyper.Exact(s, q, k, v, scale, true)
	require.NoError(t, err)
	for _, tc := range []struct{ chunk, window int }{{7, 20}, {64, 20}, {16, 100}, {150, 33}, {400, 1}, {32, 1000}} {
		t.Run(fmt.Sprintf("chunk %d window %d", tc.chunk, tc.window), func(t *testing.T) {
			want, err := hyper.ExactWindow(s, q, k, v, scale, tc.window)
			require.NoError(t, err)
			if tc.window < n {
				require.Greater(t, maxAbs(want, full), 0.05, "the window must matter here")
			}
			ctx := backend.NewContext()
			defer ctx.Close()
			out := hyper.CausalWindow(ctx, ctx.Input().FromFloats(q, s.HeadDim, s.Heads, n),
				ctx.Input().FromFloats(k, s.HeadDim, s.KVHeads, n), ctx.Input().FromFloats(v, s.HeadDim, s.KVHeads, n), scale, tc.chunk, tc.window)
			res := ctx.Input().Empty(ml.DTypeF32, s.HeadDim, s.Heads, n)
			ctx.Forward(out.Copy(ctx, res)).Compute(res)
			require.Less(t, maxAbs(res.Floats(), want), 2e-5)
		})
	}
}
