// A CPU attention kernel that reads host pages where they are (issue 14's
// "no copy" candidate, measured in kvcache/runs_test.go; not wired into
// Paged). See attend.go.
#include <stdint.h>
#include <math.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

// The kernel is compiled for AVX2, FMA and F16C whatever the build's flags
// (a plain go build has none); kvr_attend_supported says whether this CPU
// has them.
#define KVR_TARGET __attribute__((target("avx2,fma,f16c")))

int kvr_attend_supported(void) {
	__builtin_cpu_init();
	return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

// kvr_v_expf is ggml's AVX2 ggml_v_expf (ggml-cpu/vec.h, MIT), the exp
// ggml's own softmax uses, copied because vec.h is internal to ggml-cpu.
// adapted from arm limited optimized routine
// the maximum error is 1.45358 plus 0.5 ulps
// numbers above 88.38 will flush to infinity
// numbers beneath -103.97 will flush to zero
KVR_TARGET static inline __m256 kvr_v_expf(__m256 x) {
  const __m256 r = _mm256_set1_ps(0x1.8p23f);
  const __m256 z = _mm256_fmadd_ps(x, _mm256_set1_ps(0x1.715476p+0f), r);
  const __m256 n = _mm256_sub_ps(z, r);
  const __m256 b = _mm256_fnmadd_ps(n, _mm256_set1_ps(0x1.7f7d1cp-20f),
                                    _mm256_fnmadd_ps(n, _mm256_set1_ps(0x1.62e4p-1f), x));
  const __m256i e = _mm256_slli_epi32(_mm256_castps_si256(z), 23);
  const __m256 k = _mm256_castsi256_ps(
      _mm256_add_epi32(e, _mm256_castps_si256(_mm256_set1_ps(1))));
  const __m256i c = _mm256_castps_si256(
      _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.f), n),
                    _mm256_set1_ps(126), _CMP_GT_OQ));
  const __m256 u = _mm256_mul_ps(b, b);
  const __m256 j = _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_set1_ps(0x1.0e4020p-7f), b,
                                                                   _mm256_set1_ps(0x1.573e2ep-5f)), u,
                                                   _mm256_fmadd_ps(_mm256_set1_ps(0x1.555e66p-3f), b,
                                                                   _mm256_set1_ps(0x1.fffdb6p-2f))),
                                   u, _mm256_mul_ps(_mm256_set1_ps(0x1.ffffecp-1f), b));
  if (!_mm256_movemask_ps(_mm256_castsi256_ps(c)))
    return _mm256_fmadd_ps(j, k, k);
  const __m256i g = _mm256_and_si256(
      _mm256_castps_si256(_mm256_cmp_ps(n, _mm256_setzero_ps(), _CMP_LE_OQ)),
      _mm256_set1_epi32(0x82000000u));
  const __m256 s1 =
      _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f000000u)));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
  const __m256i d = _mm256_castps_si256(
      _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.f), n),
                    _mm256_set1_ps(192), _CMP_GT_OQ));
  return _mm256_or_ps(
      _mm256_and_ps(_mm256_castsi256_ps(d), _mm256_mul_ps(s1, s1)),
      _mm256_andnot_ps(
          _mm256_castsi256_ps(d),
          _mm256_or_ps(
              _mm256_and_ps(_mm256_castsi256_ps(c),
                            _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1)),
              _mm256_andnot_ps(_mm256_castsi256_ps(c), _mm256_fmadd_ps(k, j, k)))));
}

// kvr_attend_pages: one query token's attention over whole pages.
//   q:      [nq][hd] f32 query heads; query head h reads KV head h/(nq/nkv)
//   K[i]:   page i's keys, f16 [P][nkv*hd] (token-major, Page.K)
//   V[i]:   page i's values, f16 [nkv*hd][P] (channel-major, Page.V)
//   fill[i]: tokens of page i attended (its first fill[i])
//   scores: scratch, f32 [nq][cells] (cells = sum of fill)
//   out:    [nq][hd] f32
// hd must be a multiple of 8 (F16C converts 8 halves at a time).
KVR_TARGET void kvr_attend_pages(const float *q, int nq, int nkv, int hd, int P, int npages,
		const uint16_t *const *K, const uint16_t *const *V, const int *fill,
		float scale, float *scores, float *out) {
	const int G = nq / nkv, row = nkv * hd;
	int cells = 0;
	for (int i = 0; i < npages; i++) cells += fill[i];
	// Scores: each key row is converted once and used by its G query heads.
	int c = 0;
	for (int i = 0; i < npages; i++) {
		for (int t = 0; t < fill[i]; t++, c++) {
			const uint16_t *kr = K[i] + (size_t)t * row;
			for (int g = 0; g < nkv; g++) {
				__m256 acc[16];
				for (int j = 0; j < G && j < 16; j++) acc[j] = _mm256_setzero_ps();
				for (int d = 0; d < hd; d += 8) {
					__m256 k8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kr + g * hd + d)));
					for (int j = 0; j < G; j++)
						acc[j] = _mm256_fmadd_ps(k8, _mm256_loadu_ps(q + (size_t)(g * G + j) * hd + d), acc[j]);
				}
				for (int j = 0; j < G; j++) {
					__m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[j]), _mm256_extractf128_ps(acc[j], 1));
					s = _mm_hadd_ps(s, s);
					s = _mm_hadd_ps(s, s);
					scores[(size_t)(g * G + j) * cells + c] = _mm_cvtss_f32(s) * scale;
				}
			}
		}
	}
	// Softmax per query head.
	for (int h = 0; h < nq; h++) {
		float *s = scores + (size_t)h * cells, mx = -INFINITY, sum = 0;
		for (int i = 0; i < cells; i++) mx = s[i] > mx ? s[i] : mx;
		int i = 0;
		__m256 vsum = _mm256_setzero_ps();
		const __m256 vmx = _mm256_set1_ps(mx);
		for (; i + 8 <= cells; i += 8) {
			__m256 e = kvr_v_expf(_mm256_sub_ps(_mm256_loadu_ps(s + i), vmx));
			_mm256_storeu_ps(s + i, e);
			vsum = _mm256_add_ps(vsum, e);
		}
		__m128 s4 = _mm_add_ps(_mm256_castps256_ps128(vsum), _mm256_extractf128_ps(vsum, 1));
		s4 = _mm_hadd_ps(s4, s4);
		s4 = _mm_hadd_ps(s4, s4);
		sum = _mm_cvtss_f32(s4);
		for (; i < cells; i++) { s[i] = expf(s[i] - mx); sum += s[i]; }
		const float inv = 1.0f / sum;
		for (i = 0; i < cells; i++) s[i] *= inv;
	}
	// Values: channel rows of each page, weighted by the page's
	// probabilities, page after page (the rows are read in memory order).
	// A value row is converted once for the G query heads that read it.
	for (int h = 0; h < nq * hd; h++) out[h] = 0;
	c = 0;
	for (int i = 0; i < npages; i++) {
		const int n = fill[i], n8 = n & ~7;
		for (int g = 0; g < nkv; g++) {
			for (int d = 0; d < hd; d++) {
				const uint16_t *vr = V[i] + (size_t)(g * hd + d) * P;
				const float *p0 = scores + (size_t)(g * G) * cells + c;
				__m256 acc[16];
				for (int j = 0; j < G; j++) acc[j] = _mm256_setzero_ps();
				int t = 0;
				for (; t < n8; t += 8) {
					__m256 v8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vr + t)));
					for (int j = 0; j < G; j++)
						acc[j] = _mm256_fmadd_ps(v8, _mm256_loadu_ps(p0 + (size_t)j * cells + t), acc[j]);
				}
				for (int j = 0; j < G; j++) {
					__m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[j]), _mm256_extractf128_ps(acc[j], 1));
					s = _mm_hadd_ps(s, s);
					s = _mm_hadd_ps(s, s);
					float v = _mm_cvtss_f32(s);
					for (int u = t; u < n; u++) v += _cvtsh_ss(vr[u]) * p0[(size_t)j * cells + u];
					out[(size_t)(g * G + j) * hd + d] += v;
				}
			}
		}
		c += n;
	}
}

#else

int kvr_attend_supported(void) { return 0; }

void kvr_attend_pages(const float *q, int nq, int nkv, int hd, int P, int npages,
		const uint16_t *const *K, const uint16_t *const *V, const int *fill,
		float scale, float *scores, float *out) {}

#endif
