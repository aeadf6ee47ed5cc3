package squeezed

import (
	"runtime"

	"golang.org/x/sys/cpu"
)

// score4AVX2 scores 4 query rows against a block of transposed centroids
// (score_amd64.s): dst[i·ldd+j] = Σ_k q[i·d+k]·blk[k·ldb+j] for j < n,
// n a multiple of 8, d ≥ 1, bit for bit vek32.MatMul_Into's answer.
//
//go:noescape
func score4AVX2(dst, q, blk *float32, d, n, ldb, ldd int)

// score4AVX512 is score4AVX2 for n a multiple of 32, in AVX-512
// registers (twice the columns per instruction).
//
//go:noescape
func score4AVX512(dst, q, blk *float32, d, n, ldb, ldd int)

// useAVX512 says score4AVX512 runs here (base AVX-512F instructions
// only: its zeroing is VPXORD, not AVX512DQ's 512-bit VXORPS).
var useAVX512 = useScore4 && cpu.X86.HasAVX512F

// score4 is score4AVX2 for n a multiple of 8, the columns below n&^31
// through score4AVX512 where it runs.
func score4(dst, q, blk []float32, d, n, ldb, ldd int) {
	done := 0
	if useAVX512 {
		if done = n &^ 31; done > 0 {
			score4AVX512(&dst[0], &q[0], &blk[0], d, done, ldb, ldd)
		}
	}
	if done < n {
		score4AVX2(&dst[done], &q[0], &blk[done], d, n-done, ldb, ldd)
	}
}

// useScore4 says score4AVX2 replaces vek32.MatMul_Into here: where vek
// runs its AVX2 kernel (vek's own condition: AVX2 and FMA, not darwin),
// whose answer score4AVX2 repeats. Elsewhere vek's pure-Go product
// rounds each product and sum apart, and Transposed.Scores keeps it.
// Fixed at start: vek.SetAcceleration(false) later would make vek's
// scores differ from score4's (nothing here calls it).
var useScore4 = cpu.X86.HasAVX2 && cpu.X86.HasFMA && runtime.GOOS != "darwin"
