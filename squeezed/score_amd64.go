package squeezed

import (
	"runtime"

	"golang.org/x/sys/cpu"
)

// score4AVX2 scores 4 query rows against a block of transposed centroids
// (score_amd64.s): dst[i·ldd+j] = Σ_k q[i·d+k]·blk[k·n+j], n a multiple
// of 8, d ≥ 1, bit for bit vek32.MatMul_Into's answer.
//
//go:noescape
func score4AVX2(dst, q, blk *float32, d, n, ldd int)

// useScore4 says score4AVX2 replaces vek32.MatMul_Into here: where vek
// runs its AVX2 kernel (vek's own condition: AVX2 and FMA, not darwin),
// whose answer score4AVX2 repeats. Elsewhere vek's pure-Go product
// rounds each product and sum apart, and Transposed.Scores keeps it.
var useScore4 = cpu.X86.HasAVX2 && cpu.X86.HasFMA && runtime.GOOS != "darwin"
