/* Helpers (mostly AVX2) shared by llmfn's CPU kernels (decode.c, quant.h, attention.c): one definition,
   so they behave the same wherever they are used. */
#ifndef LLMFN_SIMD_H
#define LLMFN_SIMD_H
#include <stdint.h>

/* How a linear of the fused layer stores output column j's value v (llmfn_decoder_layers): v + bias[j]
   (bias may be NULL), added to what *y holds (the residual) when add is set. */
static inline void lin_store(float* y, float v, const float* bias, int64_t j, int add) {
    float b = bias ? v + bias[j] : v;
    *y = add ? *y + b : b;
}

/* Decode streams each weight once from memory, and one core's hardware prefetchers keep too few
   lines in flight for it: the int4 decode step waited on its weight loads (perf: half the samples on
   the instruction after the nibble load). A software prefetch this far ahead of each weight stream
   (about seven weight rows of SmolLM2's int4 layers) made its one-thread int4 decode 60.5 -> 95
   tok/s on the AVX-512 Xeon (1 KiB ahead: 75, 4 KiB: 80; benchmarks/RESULTS.md). It only hints:
   results are unchanged, and a prefetch past the end of a buffer never faults. */
#define PREFETCH_AHEAD 2048
#define prefetch_ahead(p) __builtin_prefetch((const char*)(p) + PREFETCH_AHEAD, 0, 3)
#ifdef __AVX2__
#include <immintrin.h>

/* e^x for 8 floats: Cephes' expf (range reduction by ln 2 in two parts, degree-6 polynomial, about
   1 ulp). x is clamped to [-88.38, 88] (2^n must not reach the exponent bits 255): at the low end 2^n
   is the bits 0, so e^x for x <= -88.38 (-inf included) is exactly 0; from -88.38 to -87.3 it may be
   a denormal. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* The sum of the 8 lanes. */
static inline float hsum(__m256 t) {
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_shuffle_ps(v, v, 1));
    return _mm_cvtss_f32(v);
}
#endif
#endif
