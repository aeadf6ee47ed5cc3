//go:build !amd64

package squeezed

// useScore4 is false off amd64: Transposed.Scores uses vek32.
const useScore4 = false

func score4(dst, q, blk []float32, d, n, ldb, ldd int) { panic("squeezed: score4 off amd64") }
