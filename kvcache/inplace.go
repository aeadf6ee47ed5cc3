package kvcache

/*
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "ggml.h"
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define KVR_SIMD 1
#endif

// kvr_no512, set, makes kvr_rows take its 256-bit path where the 512-bit
// one is compiled (SetInPlace512): a knob for tests, which check both
// paths against each other on a machine that has AVX-512.
static int kvr_no512;
static int kvr_get_no512(void) { return kvr_no512; }
static void kvr_set_no512(int no) { kvr_no512 = no; }
static int kvr_has512(void) {
#if defined(KVR_SIMD) && defined(__AVX512F__)
	return 1;
#else
	return 0;
#endif
}

// kvr_params is one staged group's in-place attention for one pass
// (userdata of its ggml custom op): the group's ordered copy (f16,
// token-major: K rows [n][c] at k, V rows [n][c] at v), its c (the
// group's heads·headDim) and headDim, the query heads per KV head, the
// scale, the rows to prefetch ahead (0: none), and the pass's runs: per run 2 int32, its rows [a, e) of the
// copy. Written by Go before the graph is computed, read by the op.
//
// Read by the layer op (kvr_layer_attn) only: the group's nloose loose
// tokens, staged on the host as the staging buffer lays them out: K
// token-major, rows [nloose][lc] at lk (lc the group's heads·headDim), V
// channel-major, channel ch's nloose values at lv + ch·lvs.
typedef struct {
	const uint16_t *k, *v;
	int c, hd, g, ahead;
	float scale;
	int nruns, cap;
	int32_t *runs;
	const uint16_t *lk, *lv;
	int lc, nloose;
	size_t lvs;
} kvr_params;

static kvr_params *kvr_params_new(void) { return (kvr_params *)calloc(1, sizeof(kvr_params)); }
static void kvr_params_free(kvr_params *p) { if (p) { free(p->runs); free(p); } }
static int kvr_params_reserve(kvr_params *p, int runs) {
	if (runs <= p->cap) return 1;
	int32_t *r = (int32_t *)realloc(p->runs, (size_t)runs * 2 * sizeof(int32_t));
	if (!r) return 0;
	p->runs = r;
	p->cap = runs;
	return 1;
}
// kvr_alloc16 is n f16 values (an ordered copy).
static uint16_t *kvr_alloc16(size_t n) { return (uint16_t *)malloc((n > 0 ? n : 1) * sizeof(uint16_t)); }

#ifdef KVR_SIMD
static inline float kvr_h2f(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float kvr_h2f(uint16_t h) { return ggml_fp16_to_fp32((ggml_fp16_t)h); }
#endif

// q·k over hd channels (q f32, k f16).
static inline float kvr_qk(const float *q, const uint16_t *k, int hd) {
	int d = 0;
	float s = 0;
#ifdef KVR_SIMD
	__m256 acc = _mm256_setzero_ps();
	for (; d + 8 <= hd; d += 8)
		acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + d))), acc);
	__m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
	h = _mm_add_ps(h, _mm_movehl_ps(h, h));
	h = _mm_add_ss(h, _mm_movehdup_ps(h));
	s = _mm_cvtss_f32(h);
#endif
	for (; d < hd; d++) s += q[d] * kvr_h2f(k[d]);
	return s;
}

// p·v over w values (p f32, v f16 contiguous).
static inline float kvr_pv(const float *p, const uint16_t *v, int w) {
	int j = 0;
	float s = 0;
#ifdef KVR_SIMD
	__m256 acc = _mm256_setzero_ps();
	for (; j + 8 <= w; j += 8)
		acc = _mm256_fmadd_ps(_mm256_loadu_ps(p + j), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + j))), acc);
	__m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
	h = _mm_add_ps(h, _mm_movehl_ps(h, h));
	h = _mm_add_ss(h, _mm_movehdup_ps(h));
	s = _mm_cvtss_f32(h);
#endif
	for (; j < w; j++) s += p[j] * kvr_h2f(v[j]);
	return s;
}

#define KVR_CHUNK 128

#ifdef KVR_SIMD
// kvr_sum8 returns the horizontal sums of a0..a7 as one vector.
static inline __m256 kvr_sum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
	__m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
	__m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
	return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#define KVR_H(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#endif

// kvr_span folds the staging buffer's w cells into one query head's
// online softmax state (running max m, sum l, unnormalised output
// acc[hd]): k's rows are kstride elements apart, v's channels vstride
// elements apart (each channel's w values contiguous: the buffer's
// channel-major V). q is already scaled. These are the batch's token and
// the tokens past the order (tens to a few hundred); the copy's runs go
// through kvr_rows.
static void kvr_span(const float *q, int hd, const uint16_t *k, size_t kstride, const uint16_t *v, size_t vstride, int w, float *m, float *l, float *acc) {
	float s[KVR_CHUNK + 8];
	for (int j0 = 0; j0 < w; j0 += KVR_CHUNK) {
		int cw = w - j0 < KVR_CHUNK ? w - j0 : KVR_CHUNK;
		float mx = -INFINITY;
		int j = 0;
#ifdef KVR_SIMD
		if (hd % 8 == 0) {
			// Eight keys at a time, their sums reduced together.
			for (; j + 8 <= cw; j += 8) {
				const uint16_t *kr = k + (size_t)(j0 + j) * kstride;
				__m256 a[8];
				for (int r = 0; r < 8; r++) a[r] = _mm256_setzero_ps();
				for (int d = 0; d < hd; d += 8) {
					__m256 qd = _mm256_loadu_ps(q + d);
					for (int r = 0; r < 8; r++) a[r] = _mm256_fmadd_ps(qd, KVR_H(kr + r * kstride + d), a[r]);
				}
				_mm256_storeu_ps(s + j, kvr_sum8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]));
			}
		}
#endif
		for (; j < cw; j++) s[j] = kvr_qk(q, k + (size_t)(j0 + j) * kstride, hd);
		for (j = 0; j < cw; j++)
			if (s[j] > mx) mx = s[j];
		if (mx > *m) {
			float corr = expf(*m - mx); // 0 for the first span (m = -inf)
			*l *= corr;
			for (int d = 0; d < hd; d++) acc[d] *= corr;
			*m = mx;
		}
		float sum = 0;
		for (j = 0; j < cw; j++) {
			s[j] = expf(s[j] - *m);
			sum += s[j];
		}
		*l += sum;
		for (int d = 0; d < hd; d++) acc[d] += kvr_pv(s, v + (size_t)d * vstride + j0, cw);
	}
}

// KVR_ROWS is the rows kvr_rows folds at once: their K and V slices
// (at 1b, 64 rows × 2 × 128 bytes = 16 KiB) stay in L1 while every
// query head of the KV head reads them.
#define KVR_ROWS 64
#define KVR_SLOT (KVR_ROWS + 8)

#ifdef KVR_SIMD
// kvr_axpy_nb is kvr_axpy with the channels in blocks of NB vectors
// (8·NB channels) held in registers over all the rows; inlined with a
// constant NB.
static inline __attribute__((always_inline)) void kvr_axpy_nb(const int NB, const float *p, const uint16_t *v, size_t c, const int32_t *rows, int cw, int hd, float *acc) {
	for (int d0 = 0; d0 < hd; d0 += 8 * NB) {
		__m256 a[8];
		for (int b = 0; b < NB; b++) a[b] = _mm256_loadu_ps(acc + d0 + 8 * b);
		for (int j = 0; j < cw; j++) {
			__m256 pj = _mm256_set1_ps(p[j]);
			const uint16_t *vr = v + (size_t)rows[j] * c + d0;
			for (int b = 0; b < NB; b++) a[b] = _mm256_fmadd_ps(pj, KVR_H(vr + 8 * b), a[b]);
		}
		for (int b = 0; b < NB; b++) _mm256_storeu_ps(acc + d0 + 8 * b, a[b]);
	}
}
#endif

// kvr_axpy is acc[hd] += Σ_j p[j]·v_j over the token-major value rows
// v + rows[j]·c (f16, hd each): one fused multiply-add per channel and
// row, no horizontal sums.
static void kvr_axpy(const float *p, const uint16_t *v, size_t c, const int32_t *rows, int cw, int hd, float *acc) {
#ifdef KVR_SIMD
	if (hd % 64 == 0) { kvr_axpy_nb(8, p, v, c, rows, cw, hd, acc); return; }
	if (hd % 32 == 0) { kvr_axpy_nb(4, p, v, c, rows, cw, hd, acc); return; }
	if (hd % 16 == 0) { kvr_axpy_nb(2, p, v, c, rows, cw, hd, acc); return; }
	if (hd % 8 == 0) { kvr_axpy_nb(1, p, v, c, rows, cw, hd, acc); return; }
#endif
	for (int j = 0; j < cw; j++) {
		const uint16_t *vr = v + (size_t)rows[j] * c;
		float pj = p[j];
		for (int d = 0; d < hd; d++) acc[d] += pj * kvr_h2f(vr[d]);
	}
}

#if defined(KVR_SIMD) && defined(__AVX512F__)
#define KVR_SIMD512 1

// kvr_sum16 returns the sixteen horizontal sums of a[0..15] as one
// vector, in order: pairs interleaved and added within 128-bit lanes,
// then the lanes' four partial sums added across them.
static inline __m512 kvr_sum16(const __m512 *a) {
	__m512 b[8], c[4];
	for (int i = 0; i < 8; i++)
		b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
	for (int i = 0; i < 4; i++)
		c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44), _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
	// c[i]'s 128-bit lane L holds rows 4i..4i+3's partial sums over lane L.
	__m512 u0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x44), _mm512_shuffle_f32x4(c[0], c[1], 0xEE));
	__m512 u1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x44), _mm512_shuffle_f32x4(c[2], c[3], 0xEE));
	return _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x88), _mm512_shuffle_f32x4(u0, u1, 0xDD));
}

// kvr_exp16 is e^x for x <= 0, sixteen at a time (x below -87 gives
// ~0): 2^n·p(r), x = n·ln2 + r, |r| <= ln2/2, p Cephes' expf polynomial.
static inline __m512 kvr_exp16(__m512 x) {
	x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x); // this order keeps a NaN (max returns its second operand)
	__m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
	__m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
	r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
	__m512 p = _mm512_set1_ps(1.9875691500E-4f);
	p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
	p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
	p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
	p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
	p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
	p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
	return _mm512_scalef_ps(p, n);
}

// kvr_pv512 is acc[h] += Σ_j p[h][j]·v_j for NH heads (p rows KVR_SLOT
// apart, acc rows hd apart) over the value rows v + rows[j]·c, the
// channels in blocks of 16·NB held in registers for all NH heads: each
// row's values are converted once for the NH heads. Inlined with
// constant NH and NB.
static inline __attribute__((always_inline)) void kvr_pv512(const int NH, const int NB, const float *p, const uint16_t *v, size_t c, const int32_t *rows, int cw, int hd, float *acc) {
	for (int d0 = 0; d0 < hd; d0 += 16 * NB) {
		__m512 a[4][4];
		for (int h = 0; h < NH; h++)
			for (int b = 0; b < NB; b++) a[h][b] = _mm512_loadu_ps(acc + (size_t)h * hd + d0 + 16 * b);
		for (int j = 0; j < cw; j++) {
			const uint16_t *vr = v + (size_t)rows[j] * c + d0;
			__m512 vv[4];
			for (int b = 0; b < NB; b++) vv[b] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(vr + 16 * b)));
			for (int h = 0; h < NH; h++) {
				__m512 ph = _mm512_set1_ps(p[(size_t)h * KVR_SLOT + j]);
				for (int b = 0; b < NB; b++) a[h][b] = _mm512_fmadd_ps(ph, vv[b], a[h][b]);
			}
		}
		for (int h = 0; h < NH; h++)
			for (int b = 0; b < NB; b++) _mm512_storeu_ps(acc + (size_t)h * hd + d0 + 16 * b, a[h][b]);
	}
}

#define KVR_PV512_NB(NH) \
	do { \
		if (hd % 64 == 0) kvr_pv512(NH, 4, p, v, c, rows, cw, hd, acc); \
		else if (hd % 32 == 0) kvr_pv512(NH, 2, p, v, c, rows, cw, hd, acc); \
		else kvr_pv512(NH, 1, p, v, c, rows, cw, hd, acc); \
	} while (0)

// kvr_pv512_heads runs kvr_pv512 over nh heads, four at a time.
static void kvr_pv512_heads(int nh, const float *p, const uint16_t *v, size_t c, const int32_t *rows, int cw, int hd, float *acc) {
	for (; nh > 0; nh -= 4, p += 4 * KVR_SLOT, acc += (size_t)4 * hd) {
		switch (nh >= 4 ? 4 : nh) {
		case 4: KVR_PV512_NB(4); break;
		case 3: KVR_PV512_NB(3); break;
		case 2: KVR_PV512_NB(2); break;
		default: KVR_PV512_NB(1); break;
		}
	}
}

// kvr_rows512 is kvr_rows with 512-bit vectors (hd a multiple of 16): the
// rows' keys converted to f32 once into kf [KVR_ROWS][hd] (scratch) and
// read from L1 by every head, sixteen rows' dot products reduced
// together (kvr_sum16), the exponentials sixteen at a time, and each
// row's values converted once for four heads (kvr_pv512).
static void kvr_rows512(const float *q, int nh, int hd, const uint16_t *k, const uint16_t *v, size_t c, const int32_t *rows, int cw, float *s, float *m, float *l, float *acc, float *kf) {
	const int cw16 = (cw + 15) & ~15;
	for (int r = 0; r < cw; r++) {
		const uint16_t *kr = k + (size_t)rows[r] * c;
		for (int d = 0; d < hd; d += 16) _mm512_storeu_ps(kf + (size_t)r * hd + d, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kr + d))));
	}
	if (cw16 > cw) memset(kf + (size_t)cw * hd, 0, (size_t)(cw16 - cw) * hd * sizeof(float));
	for (int i = 0; i < nh; i++) {
		const float *qi = q + (size_t)i * hd;
		float *si = s + (size_t)i * KVR_SLOT;
		for (int j0 = 0; j0 < cw16; j0 += 16) {
			__m512 a[16];
			const float *kr = kf + (size_t)j0 * hd;
			for (int r = 0; r < 16; r++) a[r] = _mm512_mul_ps(_mm512_loadu_ps(qi), _mm512_loadu_ps(kr + (size_t)r * hd));
			for (int d = 16; d < hd; d += 16) {
				__m512 qd = _mm512_loadu_ps(qi + d);
				for (int r = 0; r < 16; r++) a[r] = _mm512_fmadd_ps(qd, _mm512_loadu_ps(kr + (size_t)r * hd + d), a[r]);
			}
			_mm512_storeu_ps(si + j0, kvr_sum16(a));
		}
		const __mmask16 tail = (__mmask16)((1u << (cw - (cw16 - 16))) - 1);
		__m512 mx = _mm512_set1_ps(-INFINITY);
		for (int j0 = 0; j0 < cw16; j0 += 16)
			mx = _mm512_max_ps(mx, j0 + 16 > cw ? _mm512_mask_loadu_ps(mx, tail, si + j0) : _mm512_loadu_ps(si + j0));
		const float mxs = _mm512_reduce_max_ps(mx);
		if (mxs > m[i]) {
			float corr = expf(m[i] - mxs); // 0 for the first rows (m = -inf)
			l[i] *= corr;
			float *ai = acc + (size_t)i * hd;
			for (int d = 0; d < hd; d++) ai[d] *= corr;
			m[i] = mxs;
		}
		const __m512 mm = _mm512_set1_ps(m[i]);
		__m512 sum = _mm512_setzero_ps();
		for (int j0 = 0; j0 < cw16; j0 += 16) {
			__m512 e = kvr_exp16(_mm512_sub_ps(_mm512_loadu_ps(si + j0), mm));
			if (j0 + 16 > cw) e = _mm512_maskz_mov_ps(tail, e);
			_mm512_storeu_ps(si + j0, e);
			sum = _mm512_add_ps(sum, e);
		}
		l[i] += _mm512_reduce_add_ps(sum);
	}
	kvr_pv512_heads(nh, s, v, c, rows, cw, hd, acc);
}
#endif

// kvr_rows folds cw rows of the ordered copy (rows[j]'s keys at
// k + rows[j]·c, its values at v + rows[j]·c, hd f16 each: one KV head's
// slice of the token-major rows) into the online softmax states of the
// nh query heads of that KV head: q [nh][hd] (scaled), m and l [nh], acc
// [nh][hd]; s is scratch [nh][KVR_SLOT], kf scratch [KVR_ROWS][hd]
// (kvr_rows512's). The rows' lines come from memory for the first head
// and from L1 for the others.
static void kvr_rows(const float *q, int nh, int hd, const uint16_t *k, const uint16_t *v, size_t c, const int32_t *rows, int cw, float *s, float *m, float *l, float *acc, float *kf) {
#ifdef KVR_SIMD512
	if (hd % 16 == 0 && !kvr_no512) {
		kvr_rows512(q, nh, hd, k, v, c, rows, cw, s, m, l, acc, kf);
		return;
	}
#endif
	(void)kf;
	int j = 0;
#ifdef KVR_SIMD
	if (hd % 8 == 0) {
		// Eight keys at a time, each head's eight sums reduced together.
		for (; j + 8 <= cw; j += 8) {
			const uint16_t *kr[8];
			for (int r = 0; r < 8; r++) kr[r] = k + (size_t)rows[j + r] * c;
			for (int i = 0; i < nh; i++) {
				const float *qi = q + (size_t)i * hd;
				__m256 a[8];
				for (int r = 0; r < 8; r++) a[r] = _mm256_setzero_ps();
				for (int d = 0; d < hd; d += 8) {
					__m256 qd = _mm256_loadu_ps(qi + d);
					for (int r = 0; r < 8; r++) a[r] = _mm256_fmadd_ps(qd, KVR_H(kr[r] + d), a[r]);
				}
				_mm256_storeu_ps(s + (size_t)i * KVR_SLOT + j, kvr_sum8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]));
			}
		}
	}
#endif
	for (; j < cw; j++)
		for (int i = 0; i < nh; i++) s[(size_t)i * KVR_SLOT + j] = kvr_qk(q + (size_t)i * hd, k + (size_t)rows[j] * c, hd);
	for (int i = 0; i < nh; i++) {
		float *si = s + (size_t)i * KVR_SLOT, *ai = acc + (size_t)i * hd;
		float mx = -INFINITY;
		for (j = 0; j < cw; j++)
			if (si[j] > mx) mx = si[j];
		if (mx > m[i]) {
			float corr = expf(m[i] - mx); // 0 for the first rows (m = -inf)
			l[i] *= corr;
			for (int d = 0; d < hd; d++) ai[d] *= corr;
			m[i] = mx;
		}
		float sum = 0;
		for (j = 0; j < cw; j++) {
			si[j] = expf(si[j] - m[i]);
			sum += si[j];
		}
		l[i] += sum;
		kvr_axpy(si, v, c, rows, cw, hd, ai);
	}
}

// kvr_cursor is a row of a pass's runs: run r, row row.
typedef struct { int r; int32_t row; } kvr_cursor;

// kvr_prefetch_next prefetches the lines of cursor c's row (one KV
// head's hd keys at kb + row·c and values at vb + row·c) and moves it to
// the next row of the runs; past the last run it does nothing.
static inline void kvr_prefetch_next(const kvr_params *P, kvr_cursor *c, const uint16_t *kb, const uint16_t *vb, int hd) {
	if (c->r >= P->nruns) return;
	const char *k = (const char *)(kb + (size_t)c->row * P->c), *v = (const char *)(vb + (size_t)c->row * P->c);
	for (int o = 0; o < hd * 2; o += 64) {
		__builtin_prefetch(k + o);
		__builtin_prefetch(v + o);
	}
	__builtin_prefetch(k + hd * 2 - 1);
	__builtin_prefetch(v + hd * 2 - 1);
	if (++c->row >= P->runs[2 * c->r + 1] && ++c->r < P->nruns) c->row = P->runs[2 * c->r];
}

// kvr_heads_start readies the online softmax states of query heads
// q0..q0+mine-1 of q (f32 [hd, heads, 1]): qs [mine][hd] the scaled
// queries, acc [mine][hd] zero, m -inf, l 0.
static void kvr_heads_start(const struct ggml_tensor *q, int q0, int mine, int hd, float scale, float *qs, float *acc, float *m, float *l) {
	for (int i = 0; i < mine; i++) {
		const float *qr = (const float *)((const char *)q->data + (size_t)(q0 + i) * q->nb[1]);
		for (int d = 0; d < hd; d++) qs[i * hd + d] = qr[d] * scale;
		memset(acc + (size_t)i * hd, 0, hd * sizeof(float));
		m[i] = -INFINITY;
		l[i] = 0;
	}
}

// kvr_heads_end writes the normalised outputs of query heads
// q0..q0+mine-1 into dst (f32 [hd, heads, 1]).
static void kvr_heads_end(struct ggml_tensor *dst, int q0, int mine, int hd, const float *acc, const float *l) {
	for (int i = 0; i < mine; i++) {
		float *o = (float *)((char *)dst->data + (size_t)(q0 + i) * dst->nb[1]);
		float inv = l[i] > 0 ? 1.0f / l[i] : 0;
		for (int d = 0; d < hd; d++) o[d] = acc[(size_t)i * hd + d] * inv;
	}
}

// kvr_fold_runs walks P's runs of its ordered copy (one KV head's slice
// at kb and vb) in chunks of KVR_ROWS rows across runs, folding them into
// the nh query heads' states (qh [nh][hd], mh, lh, ah [nh][hd]) with
// kvr_rows; rows [KVR_ROWS], s and kf are scratch. A second cursor P->ahead
// rows ahead prefetches the rows' K and V lines: the runs are random
// places in the copy (each start a cache and TLB miss), and the op's sums
// alone leave only a few of them in flight.
static void kvr_fold_runs(const kvr_params *P, const uint16_t *kb, const uint16_t *vb, int hd, const float *qh, int nh, int32_t *rows, float *s, float *mh, float *lh, float *ah, float *kf) {
	if (P->nruns == 0) return;
	int cw = 0;
	kvr_cursor pf = {P->ahead > 0 ? 0 : P->nruns, P->runs[0]};
	for (int i = 0; i < P->ahead; i++) kvr_prefetch_next(P, &pf, kb, vb, hd);
	for (int r = 0; r < P->nruns; r++) {
		for (int32_t row = P->runs[2 * r]; row < P->runs[2 * r + 1]; row++) {
			kvr_prefetch_next(P, &pf, kb, vb, hd);
			rows[cw++] = row;
			if (cw == KVR_ROWS) {
				kvr_rows(qh, nh, hd, kb, vb, P->c, rows, cw, s, mh, lh, ah, kf);
				cw = 0;
			}
		}
	}
	if (cw > 0) kvr_rows(qh, nh, hd, kb, vb, P->c, rows, cw, s, mh, lh, ah, kf);
}

// kvr_attn is the custom op: dst f32 [hd, nq, 1], src[0] the queries f32
// [hd, nq, 1], src[1] the staging buffer's keys f16 [hd, heads, cells]
// (the batch's token and the tokens past the order), src[2] its values
// f16 [cells, hd, heads]. Query head qh reads KV head qh/g. Each thread
// takes a contiguous range of query heads (with one thread, a KV head's g
// heads together), folds the staging cells into each head's online
// softmax, then walks the runs of the ordered copy once per KV head, in
// chunks of KVR_ROWS rows across runs, for all of its heads at once.
static void kvr_attn(struct ggml_tensor *dst, int ith, int nth, void *ud) {
	const kvr_params *P = (const kvr_params *)ud;
	const struct ggml_tensor *q = dst->src[0], *k = dst->src[1], *v = dst->src[2];
	const int hd = P->hd, nq = (int)dst->ne[1], cells = (int)k->ne[2], G = P->g;
	const int q0 = (int)((long)nq * ith / nth), q1 = (int)((long)nq * (ith + 1) / nth);
	if (q0 >= q1) return;
	const int mine = q1 - q0;
	float *st = (float *)malloc(((size_t)mine * (2 * hd + 2 + KVR_SLOT) + KVR_ROWS + (size_t)KVR_ROWS * hd) * sizeof(float));
	if (!st) abort();
	float *qs = st, *acc = qs + (size_t)mine * hd, *m = acc + (size_t)mine * hd, *l = m + mine, *s = l + mine;
	int32_t *rows = (int32_t *)(s + (size_t)mine * KVR_SLOT);
	float *kf = (float *)(rows + KVR_ROWS);
	kvr_heads_start(q, q0, mine, hd, P->scale, qs, acc, m, l);
	// The staging cells: keys token-major rows nb[2] bytes apart, values
	// one row of cells per channel.
	if (cells > 0) {
		for (int i = 0; i < mine; i++) {
			int h = (q0 + i) / G;
			const uint16_t *kb = (const uint16_t *)((const char *)k->data + (size_t)h * k->nb[1]);
			const uint16_t *vb = (const uint16_t *)((const char *)v->data + (size_t)h * v->nb[2]);
			kvr_span(qs + (size_t)i * hd, hd, kb, k->nb[2] / 2, vb, v->nb[1] / 2, cells, &m[i], &l[i], acc + (size_t)i * hd);
		}
	}
	for (int h = q0 / G; h * G < q1; h++) {
		const int a = h * G > q0 ? h * G : q0, b = (h + 1) * G < q1 ? (h + 1) * G : q1, i0 = a - q0, nh = b - a;
		kvr_fold_runs(P, P->k + (size_t)h * hd, P->v + (size_t)h * hd, hd, qs + (size_t)i0 * hd, nh, rows, s, m + i0, l + i0, acc + (size_t)i0 * hd, kf);
	}
	kvr_heads_end(dst, q0, mine, hd, acc, l);
	free(st);
}

// kvr_layer is a layer's one-token attention over staged groups (userdata
// of kvr_layer_attn): per KV head h its group's params grp[h] (runs of the
// ordered copy, loose tokens) and its index hi[h] in the group (its
// channels are [hi·hd, (hi+1)·hd) of the group's rows); hd, the query
// heads per KV head g, and the scale. Written by Go before the graph is
// computed.
typedef struct {
	int hd, g, kvh;
	float scale;
	const kvr_params **grp;
	int32_t *hi;
} kvr_layer;

static void kvr_layer_free(kvr_layer *L) {
	if (L) { free(L->grp); free(L->hi); free(L); }
}
static kvr_layer *kvr_layer_new(int kvh) {
	kvr_layer *L = (kvr_layer *)calloc(1, sizeof(kvr_layer));
	if (!L) return NULL;
	L->grp = (const kvr_params **)calloc(kvh > 0 ? kvh : 1, sizeof(kvr_params *));
	L->hi = (int32_t *)calloc(kvh > 0 ? kvh : 1, sizeof(int32_t));
	if (!L->grp || !L->hi) { kvr_layer_free(L); return NULL; }
	L->kvh = kvh;
	return L;
}

#ifdef KVR_SIMD
static inline uint16_t kvr_f2h(float x) { return _cvtss_sh(x, 0); }
#else
static inline uint16_t kvr_f2h(float x) { return (uint16_t)ggml_fp32_to_fp16(x); }
#endif

// kvr_layer_attn is the layer op: dst f32 [hd, nq, 1] in the queries'
// head order, src[0] the queries f32 [hd, nq, 1]; src[1] and src[2], if
// given, the batch's token's keys and values f32 [hd, kvh, 1] (the
// layer's key and value in this graph; without them the token is one of
// the loose ones, staged from the pages a split pass's first graph wrote).
// Query head qh reads KV head qh/g, which reads (1) the batch's token,
// rounded to f16 as the pages hold it, (2) its group's loose tokens
// (kvr_span, one query head at a time: their V is channel-major) and (3)
// the runs of its group's ordered copy, all folded into one online
// softmax per query head; (1) and (3) by kvr_rows, a KV head's query
// heads together (its rows are read from memory once, then from L1). Each thread takes a
// contiguous range of query heads, so with nth dividing the KV heads each
// thread takes whole KV heads (at 1b, 8 KV heads of 4: two threads, four
// each).
static void kvr_layer_attn(struct ggml_tensor *dst, int ith, int nth, void *ud) {
	const kvr_layer *L = (const kvr_layer *)ud;
	const struct ggml_tensor *q = dst->src[0], *kn = dst->src[1], *vn = dst->src[2];
	const int hd = L->hd, nq = (int)dst->ne[1], G = L->g;
	const int q0 = (int)((long)nq * ith / nth), q1 = (int)((long)nq * (ith + 1) / nth);
	if (q0 >= q1) return;
	const int mine = q1 - q0;
	float *st = (float *)malloc(((size_t)mine * (2 * hd + 2 + KVR_SLOT) + KVR_ROWS + hd + (size_t)KVR_ROWS * hd) * sizeof(float));
	if (!st) abort();
	float *qs = st, *acc = qs + (size_t)mine * hd, *m = acc + (size_t)mine * hd, *l = m + mine, *s = l + mine;
	int32_t *rows = (int32_t *)(s + (size_t)mine * KVR_SLOT);
	uint16_t *nk = (uint16_t *)(rows + KVR_ROWS), *nv = nk + hd; // the batch token's f16 K and V of one head
	float *kf = (float *)(nk + 2 * hd);
	kvr_heads_start(q, q0, mine, hd, L->scale, qs, acc, m, l);
	for (int h = q0 / G; h * G < q1; h++) {
		const int a = h * G > q0 ? h * G : q0, b = (h + 1) * G < q1 ? (h + 1) * G : q1, i0 = a - q0, nh = b - a;
		const kvr_params *P = L->grp[h];
		const size_t off = (size_t)L->hi[h] * hd;
		float *qh = qs + (size_t)i0 * hd, *mh = m + i0, *lh = l + i0, *ah = acc + (size_t)i0 * hd;
		if (kn) {
			const float *kr = (const float *)((const char *)kn->data + (size_t)h * kn->nb[1]);
			const float *vr = (const float *)((const char *)vn->data + (size_t)h * vn->nb[1]);
			for (int d = 0; d < hd; d++) {
				nk[d] = kvr_f2h(kr[d]);
				nv[d] = kvr_f2h(vr[d]);
			}
			rows[0] = 0;
			kvr_rows(qh, nh, hd, nk, nv, hd, rows, 1, s, mh, lh, ah, kf);
		}
		// The loose tokens (tens to a few hundred), per query head as
		// kvr_attn folds its staging cells: their V is channel-major.
		if (P->nloose > 0)
			for (int i = 0; i < nh; i++)
				kvr_span(qh + (size_t)i * hd, hd, P->lk + off, P->lc, P->lv + off * P->lvs, P->lvs, P->nloose, mh + i, lh + i, ah + (size_t)i * hd);
		kvr_fold_runs(P, P->k + off, P->v + off, hd, qh, nh, rows, s, mh, lh, ah, kf);
	}
	kvr_heads_end(dst, q0, mine, hd, acc, l);
	free(st);
}

// kvr_layer_attn_op adds the layer op; k and v NULL: no batch token in the
// graph. sel, if given (with k and v), is the layer's selection op
// (kvr_select_op), which the graph must compute first: a fourth source,
// which the op does not read.
static struct ggml_tensor *kvr_layer_attn_op(struct ggml_context *ctx, struct ggml_tensor *q, struct ggml_tensor *k, struct ggml_tensor *v, struct ggml_tensor *sel, kvr_layer *L) {
	struct ggml_tensor *args[4] = {q, k, v, sel};
	return ggml_custom_4d(ctx, GGML_TYPE_F32, q->ne[0], q->ne[1], 1, 1, args, sel ? 4 : (k ? 3 : 1), kvr_layer_attn, GGML_N_TASKS_MAX, L);
}

// kvrSelect is Go's (selectgraph.go): the selection of a layer's one-token
// pass from its queries (and, if not NULL, their centroid scores), run
// inside the graph. key names the cache and the layer; returns 0, or 1 if
// it failed (the cache keeps the error).
extern int kvrSelect(uint64_t key, struct ggml_tensor *q, struct ggml_tensor *scores);

// kvr_select is the selection op: on thread 0 (the thread that computes
// the graph, which is in a cgo call: an ordinary callback into Go) it
// hands the layer's roped queries (src[0], f32 [hd, heads, 1]) to Go,
// which selects the layer's tokens and fills the layer op's params before
// the layer op (which depends on it) runs. The other threads wait at the
// graph's barrier. src[1], if given, is the queries' centroid scores
// (kvr_step_scores), computed before by every thread. dst is a
// placeholder f32 [1].
static void kvr_select(struct ggml_tensor *dst, int ith, int nth, void *ud) {
	(void)nth;
	if (ith != 0) return;
	((float *)dst->data)[0] = (float)kvrSelect((uint64_t)(uintptr_t)ud, dst->src[0], dst->src[1]);
}

static struct ggml_tensor *kvr_select_op(struct ggml_context *ctx, struct ggml_tensor *q, struct ggml_tensor *scores, uint64_t key) {
	struct ggml_tensor *args[2] = {q, scores};
	return ggml_custom_4d(ctx, GGML_TYPE_F32, 1, 1, 1, 1, args, scores ? 2 : 1, kvr_select, 1, (void *)(uintptr_t)key);
}

// kvr_step_scores is every query head's product with its KV head's
// centroids: q f32 [hd, heads, 1], cents f32 [hd, k, kvh] (query head h
// reads KV head h / (heads/kvh)); f32 [k, heads/kvh, kvh], one mul_mat
// that ggml splits across the graph's threads.
static struct ggml_tensor *kvr_step_scores(struct ggml_context *ctx, struct ggml_tensor *q, struct ggml_tensor *cents) {
	struct ggml_tensor *qq = ggml_is_contiguous(q) ? q : ggml_cont(ctx, q);
	qq = ggml_reshape_3d(ctx, qq, q->ne[0], q->ne[1] / cents->ne[2], cents->ne[2]);
	return ggml_mul_mat(ctx, cents, qq);
}

static struct ggml_tensor *kvr_attn_op(struct ggml_context *ctx, struct ggml_tensor *q, struct ggml_tensor *k, struct ggml_tensor *v, kvr_params *p) {
	struct ggml_tensor *args[3] = {q, k, v};
	return ggml_custom_4d(ctx, GGML_TYPE_F32, q->ne[0], q->ne[1], 1, 1, args, 3, kvr_attn, GGML_N_TASKS_MAX, p);
}
*/
import "C"

import (
	"fmt"
	"runtime"
	"slices"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/ml/backend/ggml"
)

// InPlaceRuns makes a staged group's one-token passes (decode steps)
// attend the runs of its ordered copy in place, in a ggml custom op
// (kvr_attn above), instead of copying them into the staging buffer
// first (issue 14: at 1b/32k that copy is 64 MiB a step, read once more
// by attention). The staging buffer then holds only the batch's token
// and the tokens past the order (from the pages); the op folds those
// cells and every run into one online softmax per query head (f32 sums),
// reading each run's token-major K and V rows where they lie. On by
// default; batches of more than one token (the question), softcapped
// attention and an ordered copy that did not get C memory keep the
// staging copy; non-host backends have no staged groups.
//
// A layer whose groups are all staged (squeezed: one group per KV head)
// goes further on one-token passes: one op for the whole layer
// (kvr_layer_attn, layerAttention), which reads each group's runs in
// place, its loose tokens from its staging buffer, and the batch's token
// straight from the layer's key and value tensors (or, on a split pass,
// from the pages), for every query head in natural order. Put then
// writes nothing into the staging buffers (V's cells are channel-major:
// one isolated store per channel), and the layer's graph has no
// per-group query views, ops, concatenation or reordering.
var InPlaceRuns = true

// InPlaceLayerOp turns the layer op on one-token passes of all-staged
// layers on (the default); off, they take the per-group graph (kvr_attn
// per group, set_rows into the staging cells). A knob for measuring it
// (BenchmarkQuestFromDisk's squeezed-pergroup engine).
var InPlaceLayerOp = true

// InPlacePrefetch is how many rows ahead of those it sums the in-place
// op prefetches their K and V lines (0: none); one chunk (64 rows), so
// that the next chunk's lines (random places in the copy: a cache and a
// TLB miss per run) arrive while this one is summed. A knob for
// measuring it.
var InPlacePrefetch = 64

// InPlace512 reports whether the in-place ops fold rows with 512-bit
// vectors (kvr_rows512): built for a CPU with AVX-512F (the default
// -march=native on one) and not turned off by SetInPlace512.
func InPlace512() bool { return C.kvr_has512() != 0 && C.kvr_get_no512() == 0 }

// SetInPlace512 turns the 512-bit path on or off (where it is compiled)
// and returns the previous setting. For tests, which compare the two
// paths; not safe while a graph computes.
func SetInPlace512(on bool) bool {
	was := C.kvr_get_no512() == 0
	no := C.int(1)
	if on {
		no = 0
	}
	C.kvr_set_no512(no)
	return was
}

// ggmlContext mirrors the first fields of ollama's ggml.Context (v0.17.4,
// unexported): its backend and the ggml context new tensors go in.
type ggmlContext struct {
	b   unsafe.Pointer
	ctx *C.struct_ggml_context
}

// inplaceParams is a group's kvr_params (C memory: ggml reads it while
// the graph computes), freed with the group's holder.
type inplaceParams struct{ p *C.kvr_params }

func newInplaceParams() *inplaceParams {
	ip := &inplaceParams{p: C.kvr_params_new()}
	runtime.SetFinalizer(ip, func(ip *inplaceParams) { C.kvr_params_free(ip.p) })
	return ip
}

// cAlloc16 returns n f16 elements of C memory, freed when the returned
// holder is collected: an ordered copy the in-place op reads (ggml's C
// code may only read memory Go does not manage or move).
func cAlloc16(n int) ([]uint16, *cMem) {
	// The collector does not see C memory: copies dropped with their
	// document (eviction, a detached fork) stay allocated until a cycle
	// runs their finalizers, which Go's heap growth alone may not
	// trigger for minutes (a 1b document's copies are ~1 GiB). So after
	// every cMemGCBytes allocated, collect first: dropped copies are then
	// freed before more are made.
	if cAllocated.Add(int64(2*n)) > cMemGCBytes {
		cAllocated.Store(int64(2 * n))
		runtime.GC()
	}
	p := C.kvr_alloc16(C.size_t(n))
	if p == nil {
		return nil, nil
	}
	m := &cMem{p: unsafe.Pointer(p)}
	runtime.SetFinalizer(m, func(m *cMem) { C.free(m.p) })
	return unsafe.Slice((*uint16)(unsafe.Pointer(p)), n), m
}

type cMem struct{ p unsafe.Pointer }

// cAllocated is the C memory cAlloc16 handed out since it last ran a
// collection; cMemGCBytes the amount after which it runs one.
var cAllocated atomic.Int64

const cMemGCBytes = 1 << 30

// inplaceRuns lists in g's params this pass's runs of its ordered copy
// (g.rows, [a, e) pairs of rows) for the op, which reads them in place,
// and returns the rows listed.
func (c *Paged) inplaceRuns(g *group) int {
	oc := g.ocopy
	if g.iparams == nil {
		g.iparams = newInplaceParams()
	}
	p := g.iparams.p
	rows := runRows(g.rows)
	if C.kvr_params_reserve(p, C.int(len(g.rows)/2)) == 0 {
		panic("kvcache: out of C memory for the in-place attention's runs")
	}
	if len(g.rows) > 0 {
		copy(unsafe.Slice((*int32)(unsafe.Pointer(p.runs)), len(g.rows)), g.rows)
	}
	p.nruns = C.int(len(g.rows) / 2)
	p.k = (*C.uint16_t)(unsafe.Pointer(&oc.kv[oc.kRow(0)]))
	p.v = (*C.uint16_t)(unsafe.Pointer(&oc.kv[oc.vRow(0)]))
	p.c = C.int(oc.c)
	p.hd = C.int(c.L.HeadDim)
	p.ahead = C.int(max(0, InPlacePrefetch))
	return rows
}

// inplaceParamsErr reports params of g that do not describe this pass's
// runs of its ordered copy, as inplaceRuns lists them (CheckInvariants:
// stale params would otherwise only show as wrong attention).
func (c *Paged) inplaceParamsErr(g *group) error {
	oc := g.ocopy
	if g.iparams == nil || oc == nil || len(oc.kv) == 0 {
		return fmt.Errorf("a group read in place without params or an ordered copy")
	}
	p := g.iparams.p
	if int(p.nruns) != len(g.rows)/2 {
		return fmt.Errorf("the in-place params list %d runs, the pass %d", int(p.nruns), len(g.rows)/2)
	}
	if len(g.rows) > 0 && !slices.Equal(unsafe.Slice((*int32)(unsafe.Pointer(p.runs)), len(g.rows)), g.rows) {
		return fmt.Errorf("the in-place params' runs are not the pass's rows")
	}
	if unsafe.Pointer(p.k) != unsafe.Pointer(&oc.kv[oc.kRow(0)]) || unsafe.Pointer(p.v) != unsafe.Pointer(&oc.kv[oc.vRow(0)]) ||
		int(p.c) != oc.c || int(p.hd) != c.L.HeadDim {
		return fmt.Errorf("the in-place params read another copy or shape (C %d, headDim %d) than the group's (C %d, headDim %d)", int(p.c), int(p.hd), oc.c, c.L.HeadDim)
	}
	return nil
}

// inplaceAttention is the custom op for a group filled by inplaceRuns: q
// f32 [headDim, qheads, 1], key and value the staging buffer's views of
// its filled cells (the batch's token and the loose tokens). Returns f32
// [headDim, qheads, 1], what ScaledDotProductAttention returns.
func (c *Paged) inplaceAttention(ctx ml.Context, q, key, value ml.Tensor, g *group, scale float64) ml.Tensor {
	gc, ok := ctx.(*ggml.Context)
	qt, ok1 := q.(*ggml.Tensor)
	kt, ok2 := key.(*ggml.Tensor)
	vt, ok3 := value.(*ggml.Tensor)
	if !ok || !ok1 || !ok2 || !ok3 || q.DType() != ml.DTypeF32 || q.Dim(2) != 1 || q.Dim(0) != c.L.HeadDim || q.Stride(0) != 4 || q.Dim(1)%len(g.heads) != 0 {
		panic(fmt.Sprintf("kvcache: in-place attention wants ggml tensors and f32 queries [%d, heads, 1], got %v", c.L.HeadDim, q.Shape()))
	}
	p := g.iparams.p
	p.g = C.int(q.Dim(1) / len(g.heads))
	p.scale = C.float(float32(scale))
	cq := (*ggmlTensor)(unsafe.Pointer(qt))
	out := C.kvr_attn_op((*ggmlContext)(unsafe.Pointer(gc)).ctx, cq.t,
		(*ggmlTensor)(unsafe.Pointer(kt)).t, (*ggmlTensor)(unsafe.Pointer(vt)).t, p)
	res := &ggml.Tensor{}
	rt := (*ggmlTensor)(unsafe.Pointer(res))
	rt.b, rt.t = cq.b, out
	return res
}

// layerParams is a layer's kvr_layer (C memory: ggml reads it while the
// graph computes), freed when collected.
type layerParams struct{ p *C.kvr_layer }

func newLayerParams(kvHeads int) *layerParams {
	lp := &layerParams{p: C.kvr_layer_new(C.int(kvHeads))}
	if lp.p == nil {
		panic("kvcache: out of C memory for the layer op's params")
	}
	runtime.SetFinalizer(lp, func(lp *layerParams) { C.kvr_layer_free(lp.p) })
	return lp
}

// layerOp reports whether layer's one-token pass is attended by the layer
// op (kvr_layer_attn): InPlaceRuns, a one-token pass, and every group of
// the layer staged (a layer that mixes page pools and staged groups keeps
// the per-group graph), and no group's ordered copy in Go memory.
// Softcapped attention is excluded by its caller.
func (c *Paged) layerOp(layer int) bool {
	if !InPlaceRuns || !InPlaceLayerOp || c.n != 1 {
		return false
	}
	for _, g := range c.layers[layer].groups {
		// An ordered copy in Go memory is not read by C: its runs are
		// staged by the per-group path (a rows-only selection lists no
		// other tokens for them).
		if !g.staged || (g.ocopy != nil && g.ocopy.cmem == nil) {
			return false
		}
	}
	return true
}

// layerAttention is a one-token pass of a layer whose groups are all
// staged, in one custom op (kvr_layer_attn): each group's loose tokens are
// staged token-major (fillLoose), its runs of the ordered copy listed in
// its params, and the batch's token read from k and v (f32 [headDim,
// kvHeads, 1], this graph's) or, when they are nil (a split pass: Put ran
// in the previous graph, whose keys and values are on the host pages
// now), staged with the loose tokens. q f32 [headDim, heads, 1]; returns
// f32 [headDim, heads, 1] in q's head order: no set_rows into the staging
// buffers, no per-group query views, no concatenation or reordering.
func (c *Paged) layerAttention(ctx ml.Context, layer int, q, k, v ml.Tensor, scale float64) ml.Tensor {
	gc, ok := ctx.(*ggml.Context)
	qt, ok1 := q.(*ggml.Tensor)
	if !ok || !ok1 || q.DType() != ml.DTypeF32 || q.Dim(2) != 1 || q.Dim(0) != c.L.HeadDim || q.Stride(0) != 4 || q.Dim(1)%c.L.KVHeads != 0 {
		panic(fmt.Sprintf("kvcache: the layer op wants ggml tensors and f32 queries [%d, heads, 1], got %v", c.L.HeadDim, q.Shape()))
	}
	ls := &c.layers[layer]
	if ls.lparams == nil {
		ls.lparams = newLayerParams(c.L.KVHeads)
	}
	lp := ls.lparams.p
	fromPages := k == nil
	if fromPages && !c.batchOnPages(layer) {
		panic(fmt.Sprintf("kvcache: layer %d's one-token pass has neither the batch's keys in its graph nor on the host pages", layer))
	}
	// The selection still to come (selectInGraph: no split before this
	// layer): made in the graph by the selection op, which then fills the
	// params the layer op reads; the params' addresses are fixed now.
	pending := k != nil && c.selectInGraph(layer) && c.opt.Selector.NeedQueries(layer, c.n) && ls.groups[0].tok == nil
	if pending {
		grp, hi := c.layerTables(layer)
		for _, g := range ls.groups {
			if g.iparams == nil {
				g.iparams = newInplaceParams()
			}
			for i, h := range g.heads {
				grp[h], hi[h] = g.iparams.p, int32(i)
			}
		}
		c.emptyLayer(layer) // until the selection op fills them
	} else {
		c.prepareLayer(layer, fromPages)
	}
	lp.hd, lp.g, lp.scale = C.int(c.L.HeadDim), C.int(q.Dim(1)/c.L.KVHeads), C.float(float32(scale))
	cq := (*ggmlTensor)(unsafe.Pointer(qt))
	var ck, cv *C.struct_ggml_tensor
	if !fromPages {
		// The op reads rows of f32 channels: the model's roped keys and
		// projected values are that already (a cast or a copy otherwise).
		if k.DType() != ml.DTypeF32 {
			k = k.Cast(ctx, ml.DTypeF32)
		}
		if v.DType() != ml.DTypeF32 {
			v = v.Cast(ctx, ml.DTypeF32)
		}
		if k.Stride(0) != 4 {
			k = k.Contiguous(ctx)
		}
		if v.Stride(0) != 4 {
			v = v.Contiguous(ctx)
		}
		kt, ok2 := k.(*ggml.Tensor)
		vt, ok3 := v.(*ggml.Tensor)
		if !ok2 || !ok3 || k.Dim(0) != c.L.HeadDim || k.Dim(1) != c.L.KVHeads || k.Dim(2) != 1 || v.Dim(0) != c.L.HeadDim || v.Dim(1) != c.L.KVHeads {
			panic(fmt.Sprintf("kvcache: the layer op wants the batch's keys and values [%d, %d, 1], got %v and %v", c.L.HeadDim, c.L.KVHeads, k.Shape(), v.Shape()))
		}
		ck, cv = (*ggmlTensor)(unsafe.Pointer(kt)).t, (*ggmlTensor)(unsafe.Pointer(vt)).t
	}
	gctx := (*ggmlContext)(unsafe.Pointer(gc)).ctx
	var sel *C.struct_ggml_tensor
	if pending {
		var scores *C.struct_ggml_tensor
		if cents := c.stepCentroids(layer); cents != nil {
			scores = C.kvr_step_scores(gctx, cq.t, cents)
		}
		sel = C.kvr_select_op(gctx, cq.t, scores, C.uint64_t(c.selectKey(layer)))
	}
	out := C.kvr_layer_attn_op(gctx, cq.t, ck, cv, sel, lp)
	res := &ggml.Tensor{}
	rt := (*ggmlTensor)(unsafe.Pointer(res))
	rt.b, rt.t = cq.b, out
	return res
}

// prepareLayer readies every group of layer for the layer op (fillLoose)
// and points the op's params at them. At build time, or in the graph
// after the selection op (selectgraph.go).
func (c *Paged) prepareLayer(layer int, fromPages bool) {
	ls := &c.layers[layer]
	t0 := time.Now()
	grp, hi := c.layerTables(layer)
	for _, g := range ls.groups {
		c.fillLoose(layer, g, fromPages)
		for i, h := range g.heads {
			grp[h], hi[h] = g.iparams.p, int32(i)
		}
	}
	c.hostWrites.Add(int64(time.Since(t0)))
}

// layerTables returns layer's per-KV-head tables of the layer op's params
// (C memory written from Go, no cgo call per head): each KV head's group
// params and its index in the group.
func (c *Paged) layerTables(layer int) ([]*C.kvr_params, []int32) {
	ls := &c.layers[layer]
	if ls.lparams == nil {
		ls.lparams = newLayerParams(c.L.KVHeads)
	}
	lp := ls.lparams.p
	return unsafe.Slice(lp.grp, c.L.KVHeads), unsafe.Slice((*int32)(unsafe.Pointer(lp.hi)), c.L.KVHeads)
}

// emptyLayer makes the layer op's params of layer's groups list nothing
// (no runs, no loose tokens): the op then attends the batch's token only.
// For a selection still to come, or one that failed in the graph (whose
// error the pass returns).
func (c *Paged) emptyLayer(layer int) {
	for _, g := range c.layers[layer].groups {
		if g.iparams != nil {
			g.iparams.p.nruns, g.iparams.p.nloose = 0, 0
		}
	}
}

// fillLoose readies staged group g for the layer op: its runs of the
// ordered copy listed in its params (inplaceRuns; none if it has no copy
// in C memory), and its loose tokens (those at or past the order's end,
// or every selected token without a readable copy; and the batch's, when
// fromPages) staged from the host pages into cells [0, m) of its staging
// buffer (stageFromPages: K token-major, V channel-major, a memmove per
// channel and run of positions). Returns m.
func (c *Paged) fillLoose(l int, g *group, fromPages bool) int {
	if g.tok == nil {
		panic(fmt.Sprintf("kvcache: layer %d has no token selection (queries were not given)", l))
	}
	if g.iparams == nil {
		g.iparams = newInplaceParams()
	}
	p := g.iparams.p
	pl := g.pool
	loose := g.tok
	g.inplace = false
	if oc := g.ocopy; oc != nil && oc.cmem != nil {
		c.inplaceRows.Add(int64(c.inplaceRuns(g)))
		g.inplace = true
		loose = g.tok[countBelow(g.tok, len(oc.order)):]
	} else {
		if oc != nil && g.rowsOnly {
			// A copy in Go memory (the op reads only C memory) under a
			// rows-only selection: every token comes from the pages, so
			// the group needs its full list back (setStaged's fallback),
			// and no longer reads the copy.
			g.ftok, g.fsel = fullTokens(g.ftok[:0], g.fsel[:0], oc.order, g.rows, g.tok, c.L.PageSize)
			g.tok, g.sel, g.rows, g.ocopy, g.rowsOnly = g.ftok, g.fsel, nil, nil, false
			loose = g.tok
		}
		p.nruns, p.k, p.v = 0, nil, nil
		p.c, p.hd = C.int(pl.row), C.int(c.L.HeadDim)
	}
	at := c.stageFromPages(l, g, loose, 0, c.pos0)
	if fromPages {
		at = c.stageFromPages(l, g, c.batchPositions(), at, c.pos0+c.n)
	}
	c.stagedPages.Add(int64(at))
	p.lk = (*C.uint16_t)(unsafe.Pointer(&pl.hk[0]))
	p.lv = (*C.uint16_t)(unsafe.Pointer(&pl.hv[0]))
	p.lc, p.nloose, p.lvs = C.int(pl.row), C.int(at), C.size_t(pl.slots*c.L.PageSize)
	g.layerOp, g.batchLoose, g.filled = true, fromPages, at
	return at
}

// batchPositions is pos0..pos0+n-1 (reused).
func (c *Paged) batchPositions() []int32 {
	c.batchPos = c.batchPos[:0]
	for i := range c.n {
		c.batchPos = append(c.batchPos, int32(c.pos0+i))
	}
	return c.batchPos
}

// batchOnPages reports whether layer's host pages hold the batch's keys
// and values already (a split pass's first graph was computed).
func (c *Paged) batchOnPages(layer int) bool {
	P := c.L.PageSize
	for i := range c.n {
		pos := c.pos0 + i
		if pos/P >= len(c.store.pages[layer]) {
			return false
		}
		if pg := c.store.pages[layer][pos/P]; pg == nil || pg.N <= pos%P {
			return false
		}
	}
	return true
}
