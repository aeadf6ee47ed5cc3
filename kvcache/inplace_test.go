package kvcache_test

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/kvcache"
	"github.com/kvrecall/kvrecall/runtime"
)

// TestInPlaceKernelMatchesFloat64 runs the in-place attention op alone
// (kvr_attn: staging cells, then runs of a token-major ordered copy)
// against float64 attention over the same f16 keys and values, for the
// head dims of its SIMD paths (8, 16, 32, 64 and 128 channels: blocks of
// 1, 2, 4 and 8 vectors) and one without them (12: scalar), one and two
// KV heads per group, 1 and 4 query heads per KV head, runs of 1 row to
// longer than the op's 64-row chunks (chunks that span several runs), a
// single staging cell and many, and queries scaled up so that the
// softmax's running max moves (the rescaling is exercised). Where the
// op's 512-bit path is compiled (an AVX-512 build), every case runs on
// it and on the 256-bit path (hd a multiple of 16 takes the 512-bit one;
// 8 and 12 never do).
func TestInPlaceKernelMatchesFloat64(t *testing.T) {
	m, err := runtime.Open(context.Background(), testmodels.Random(t, "llama", "tiny", foundry.F32, 4, false), runtime.Options{Threads: 2, ContextLength: 256})
	require.NoError(t, err)
	defer m.Close()
	be := m.Backend()
	paths := []bool{false}
	if kvcache.InPlace512() {
		paths = []bool{true, false}
	}
	t.Logf("512-bit path compiled: %v", kvcache.InPlace512())
	defer kvcache.SetInPlace512(kvcache.SetInPlace512(true))
	for _, wide := range paths {
		kvcache.SetInPlace512(wide)
		for _, tc := range []struct {
			hd, kv, g, cells int
			runs             []int32
		}{
			{8, 2, 2, 1, []int32{0, 1, 3, 4, 9, 30}},
			{12, 1, 4, 5, []int32{2, 3, 5, 90}},
			{16, 2, 1, 1, []int32{0, 200}},
			{32, 1, 4, 1, []int32{0, 1, 7, 27, 40, 41, 50, 150, 160, 163}},
			{32, 2, 4, 40, []int32{1, 2, 10, 80, 81, 95}},
			{64, 1, 4, 3, []int32{0, 4, 20, 21, 22, 40, 64, 129, 140, 200}},
			{64, 2, 2, 130, []int32{5, 6}},
			{128, 1, 8, 2, []int32{3, 70, 100, 101}},
			{64, 1, 4, 1, nil}, // no runs: the staging cells alone
		} {
			t.Run(fmt.Sprintf("512=%v/hd%d-kv%d-g%d-cells%d-runs%d", wide, tc.hd, tc.kv, tc.g, tc.cells, len(tc.runs)/2), func(t *testing.T) {
				r := rand.New(rand.NewPCG(uint64(tc.hd), uint64(tc.cells)))
				C, n := tc.kv*tc.hd, 200
				kc, vc := randoms(r, n*C), randoms(r, n*C)
				sk, sv := randoms(r, tc.cells*C), randoms(r, tc.cells*C)
				q := randoms(r, tc.kv*tc.g*tc.hd)
				for i := range q {
					q[i] *= 3 // sharper weights: the running max moves between chunks
				}
				scale := 1 / math.Sqrt(float64(tc.hd))
				got := kvcache.InPlaceKernel(be, tc.hd, tc.kv, tc.g, kc, vc, tc.runs, sk, sv, q, scale)
				require.Len(t, got, len(q))
				worst := 0.0
				for qh := range tc.kv * tc.g {
					h := qh / tc.g
					// The keys and values the head attends: the cells, then
					// the runs' rows.
					var ks, vs [][]float32
					for j := range tc.cells {
						ks = append(ks, sk[j*C+h*tc.hd:][:tc.hd])
						vs = append(vs, sv[j*C+h*tc.hd:][:tc.hd])
					}
					for i := 0; i < len(tc.runs); i += 2 {
						for row := tc.runs[i]; row < tc.runs[i+1]; row++ {
							ks = append(ks, kc[int(row)*C+h*tc.hd:][:tc.hd])
							vs = append(vs, vc[int(row)*C+h*tc.hd:][:tc.hd])
						}
					}
					s := make([]float64, len(ks))
					mx := math.Inf(-1)
					for j, k := range ks {
						for d := range tc.hd {
							s[j] += float64(q[qh*tc.hd+d]) * scale * f16(k[d]) // q stays f32 in the op
						}
						mx = math.Max(mx, s[j])
					}
					sum := 0.0
					for j := range s {
						s[j] = math.Exp(s[j] - mx)
						sum += s[j]
					}
					for d := range tc.hd {
						want := 0.0
						for j, v := range vs {
							want += s[j] / sum * f16(v[d])
						}
						worst = math.Max(worst, math.Abs(want-float64(got[qh*tc.hd+d])))
					}
				}
				t.Logf("max |op - float64| %.2g", worst)
				require.Less(t, worst, 2e-5) // f32 sums over the same f16 rows: ~1e-6 measured
			})
		}
	}
}
