#include "textflag.h"

// func score4AVX2(dst, q, blk *float32, d, n, ldb, ldd int)
//
// dst[i·ldd + j] = Σ_k q[i·d + k]·blk[k·ldb + j] for the 4 rows i and the
// n columns j (n a multiple of 8), each sum one fused multiply-add per k
// in ascending k from +0: the operations, in the same order, that
// vek32.MatMul_Into's AVX2 kernel does for each element, so the scores
// are bit for bit its own. A tile of 4 rows × 16 columns keeps its 8
// accumulators in registers across k (vek's kernel loads and stores its
// destination row at every k).
TEXT ·score4AVX2(SB), NOSPLIT, $0-56
	MOVQ dst+0(FP), DI
	MOVQ q+8(FP), SI
	MOVQ blk+16(FP), DX
	MOVQ d+24(FP), CX
	MOVQ n+32(FP), R8
	MOVQ ldb+40(FP), R10
	MOVQ ldd+48(FP), R9
	SHLQ $2, R9         // dst row stride, bytes
	SHLQ $2, R10        // blk row stride, bytes
	MOVQ CX, R11
	SHLQ $2, R11        // q row stride, bytes
	XORQ BX, BX         // column

cols16:
	MOVQ R8, AX
	SUBQ BX, AX
	CMPQ AX, $16
	JLT  cols8
	VXORPS Y0, Y0, Y0
	VXORPS Y1, Y1, Y1
	VXORPS Y2, Y2, Y2
	VXORPS Y3, Y3, Y3
	VXORPS Y4, Y4, Y4
	VXORPS Y5, Y5, Y5
	VXORPS Y6, Y6, Y6
	VXORPS Y7, Y7, Y7
	LEAQ (DX)(BX*4), R12  // blk[0][col]
	MOVQ SI, R13          // q[0][0]
	LEAQ (SI)(R11*2), R15 // q[2][0]
	MOVQ CX, R14

k16:
	VMOVUPS      (R12), Y8
	VMOVUPS      32(R12), Y9
	VBROADCASTSS (R13), Y10
	VBROADCASTSS (R13)(R11*1), Y11
	VBROADCASTSS (R15), Y12
	VBROADCASTSS (R15)(R11*1), Y13
	VFMADD231PS  Y8, Y10, Y0
	VFMADD231PS  Y9, Y10, Y1
	VFMADD231PS  Y8, Y11, Y2
	VFMADD231PS  Y9, Y11, Y3
	VFMADD231PS  Y8, Y12, Y4
	VFMADD231PS  Y9, Y12, Y5
	VFMADD231PS  Y8, Y13, Y6
	VFMADD231PS  Y9, Y13, Y7
	ADDQ         R10, R12
	ADDQ         $4, R13
	ADDQ         $4, R15
	DECQ         R14
	JNZ          k16

	LEAQ    (DI)(BX*4), R12
	VMOVUPS Y0, (R12)
	VMOVUPS Y1, 32(R12)
	ADDQ    R9, R12
	VMOVUPS Y2, (R12)
	VMOVUPS Y3, 32(R12)
	ADDQ    R9, R12
	VMOVUPS Y4, (R12)
	VMOVUPS Y5, 32(R12)
	ADDQ    R9, R12
	VMOVUPS Y6, (R12)
	VMOVUPS Y7, 32(R12)
	ADDQ    $16, BX
	JMP     cols16

cols8:
	CMPQ AX, $8
	JLT  done
	VXORPS Y0, Y0, Y0
	VXORPS Y2, Y2, Y2
	VXORPS Y4, Y4, Y4
	VXORPS Y6, Y6, Y6
	LEAQ (DX)(BX*4), R12
	MOVQ SI, R13
	LEAQ (SI)(R11*2), R15
	MOVQ CX, R14

k8:
	VMOVUPS      (R12), Y8
	VBROADCASTSS (R13), Y10
	VBROADCASTSS (R13)(R11*1), Y11
	VBROADCASTSS (R15), Y12
	VBROADCASTSS (R15)(R11*1), Y13
	VFMADD231PS  Y8, Y10, Y0
	VFMADD231PS  Y8, Y11, Y2
	VFMADD231PS  Y8, Y12, Y4
	VFMADD231PS  Y8, Y13, Y6
	ADDQ         R10, R12
	ADDQ         $4, R13
	ADDQ         $4, R15
	DECQ         R14
	JNZ          k8

	LEAQ    (DI)(BX*4), R12
	VMOVUPS Y0, (R12)
	ADDQ    R9, R12
	VMOVUPS Y2, (R12)
	ADDQ    R9, R12
	VMOVUPS Y4, (R12)
	ADDQ    R9, R12
	VMOVUPS Y6, (R12)

done:
	VZEROUPPER
	RET

// func score4AVX512(dst, q, blk *float32, d, n, ldb, ldd int)
//
// score4AVX2 with AVX-512 registers: tiles of 4 rows × 32 columns, n a
// multiple of 32. The same operations per element, so the same scores.
TEXT ·score4AVX512(SB), NOSPLIT, $0-56
	MOVQ dst+0(FP), DI
	MOVQ q+8(FP), SI
	MOVQ blk+16(FP), DX
	MOVQ d+24(FP), CX
	MOVQ n+32(FP), R8
	MOVQ ldb+40(FP), R10
	MOVQ ldd+48(FP), R9
	SHLQ $2, R9
	SHLQ $2, R10
	MOVQ CX, R11
	SHLQ $2, R11
	XORQ BX, BX

cols32:
	MOVQ R8, AX
	SUBQ BX, AX
	CMPQ AX, $32
	JLT  done512
	VPXORD Z0, Z0, Z0
	VPXORD Z1, Z1, Z1
	VPXORD Z2, Z2, Z2
	VPXORD Z3, Z3, Z3
	VPXORD Z4, Z4, Z4
	VPXORD Z5, Z5, Z5
	VPXORD Z6, Z6, Z6
	VPXORD Z7, Z7, Z7
	LEAQ (DX)(BX*4), R12
	MOVQ SI, R13
	LEAQ (SI)(R11*2), R15
	MOVQ CX, R14

k32:
	VMOVUPS      (R12), Z8
	VMOVUPS      64(R12), Z9
	VBROADCASTSS (R13), Z10
	VBROADCASTSS (R13)(R11*1), Z11
	VBROADCASTSS (R15), Z12
	VBROADCASTSS (R15)(R11*1), Z13
	VFMADD231PS  Z8, Z10, Z0
	VFMADD231PS  Z9, Z10, Z1
	VFMADD231PS  Z8, Z11, Z2
	VFMADD231PS  Z9, Z11, Z3
	VFMADD231PS  Z8, Z12, Z4
	VFMADD231PS  Z9, Z12, Z5
	VFMADD231PS  Z8, Z13, Z6
	VFMADD231PS  Z9, Z13, Z7
	ADDQ         R10, R12
	ADDQ         $4, R13
	ADDQ         $4, R15
	DECQ         R14
	JNZ          k32

	LEAQ    (DI)(BX*4), R12
	VMOVUPS Z0, (R12)
	VMOVUPS Z1, 64(R12)
	ADDQ    R9, R12
	VMOVUPS Z2, (R12)
	VMOVUPS Z3, 64(R12)
	ADDQ    R9, R12
	VMOVUPS Z4, (R12)
	VMOVUPS Z5, 64(R12)
	ADDQ    R9, R12
	VMOVUPS Z6, (R12)
	VMOVUPS Z7, 64(R12)
	ADDQ    $32, BX
	JMP     cols32

done512:
	VZEROUPPER
	RET
