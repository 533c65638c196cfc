/* bf16-weight linears for decode (Python side and why: kernels/bf16.py). Part of the decode library:
   decode.c includes it, and its fused decoder layer runs bf16_blocks for Lin kind 5.

   The arithmetic: activations stay fp32; each bf16 weight is widened to fp32 exactly (its 16 bits
   shifted into the high half of a 32-bit lane) and multiplied into fp32 accumulators. So the result
   is the fp32 product with the bf16-rounded weights, x @ w.float()^T, summed in an order fixed by k
   alone (batch-invariant): 16 lanes on AVX-512, 8 on AVX2, one chain on the scalar path, then the
   lanes' sum and a sequential tail. Decode streams the weights, so the widening (two integer ops per
   16 weights) stays far below the memory's pace and halving the bytes is what counts. */
#ifndef LLMFN_BF16_H
#define LLMFN_BF16_H
#include <stdint.h>
#include <string.h>
#include "simd.h"

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#if defined(__AVX512F__)
static inline __m512 bf16_load16(const uint16_t* p) {
    __m256i h = _mm256_loadu_si256((const __m256i*)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#define BF16_LANES 16
#elif defined(__AVX2__)
static inline __m256 bf16_load8(const uint16_t* p) {
    __m128i h = _mm_loadu_si128((const __m128i*)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#define BF16_LANES 8
#else
#define BF16_LANES 1
#endif

/* Dot products of four consecutive bf16 weight rows w (stride k) with x: out[0..3]. */
static inline void bf16_dot4(const float* x, const uint16_t* w, int64_t k, float* out) {
    const uint16_t *w0 = w, *w1 = w + k, *w2 = w + 2 * k, *w3 = w + 3 * k;
    int64_t c = 0;
    float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; c + 16 <= k; c += 16) {
        __m512 xv = _mm512_loadu_ps(x + c);
        a0 = _mm512_fmadd_ps(bf16_load16(w0 + c), xv, a0);
        a1 = _mm512_fmadd_ps(bf16_load16(w1 + c), xv, a1);
        a2 = _mm512_fmadd_ps(bf16_load16(w2 + c), xv, a2);
        a3 = _mm512_fmadd_ps(bf16_load16(w3 + c), xv, a3);
    }
    a[0] = _mm512_reduce_add_ps(a0); a[1] = _mm512_reduce_add_ps(a1);
    a[2] = _mm512_reduce_add_ps(a2); a[3] = _mm512_reduce_add_ps(a3);
#elif defined(__AVX2__)
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; c + 8 <= k; c += 8) {
        __m256 xv = _mm256_loadu_ps(x + c);
        a0 = _mm256_fmadd_ps(bf16_load8(w0 + c), xv, a0);
        a1 = _mm256_fmadd_ps(bf16_load8(w1 + c), xv, a1);
        a2 = _mm256_fmadd_ps(bf16_load8(w2 + c), xv, a2);
        a3 = _mm256_fmadd_ps(bf16_load8(w3 + c), xv, a3);
    }
    a[0] = hsum(a0); a[1] = hsum(a1); a[2] = hsum(a2); a[3] = hsum(a3);
#endif
    for (; c < k; c++) {
        float xc = x[c];
        a[0] += bf16_to_f32(w0[c]) * xc; a[1] += bf16_to_f32(w1[c]) * xc;
        a[2] += bf16_to_f32(w2[c]) * xc; a[3] += bf16_to_f32(w3[c]) * xc;
    }
    for (int i = 0; i < 4; i++) out[i] = a[i];
}

/* One row's dot product: bf16_dot4's arithmetic for a single weight row (the last rows of n). */
static inline float bf16_dot1(const float* x, const uint16_t* w, int64_t k) {
    int64_t c = 0;
    float a = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; c + 16 <= k; c += 16) acc = _mm512_fmadd_ps(bf16_load16(w + c), _mm512_loadu_ps(x + c), acc);
    a = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    for (; c + 8 <= k; c += 8) acc = _mm256_fmadd_ps(bf16_load8(w + c), _mm256_loadu_ps(x + c), acc);
    a = hsum(acc);
#endif
    for (; c < k; c++) a += bf16_to_f32(w[c]) * x[c];
    return a;
}

/* y [m, n] (+)= x [m, k] @ w [n, k]^T (+ bias [n]) for the blocks of four weight rows [lo, hi): each
   block read from memory once and reused from L1 by every activation row. With add, y holds the
   residual and receives y + (x @ w^T + bias). */
static void bf16_blocks(const float* x, const uint16_t* w, const float* bias, float* y, int add, int64_t m,
                        int64_t n, int64_t k, int64_t lo, int64_t hi) {
    for (int64_t bi = lo; bi < hi; bi++) {
        int64_t j = bi * 4;
        for (int64_t r = 0; r < m; r++) {
            float out[4];
            if (j + 4 <= n) bf16_dot4(x + r * k, w + j * k, k, out);
            else for (int64_t i = 0; j + i < n; i++) out[i] = bf16_dot1(x + r * k, w + (j + i) * k, k);
            for (int64_t i = 0; i < 4 && j + i < n; i++) {
                float v = bias ? out[i] + bias[j + i] : out[i];
                y[r * n + j + i] = add ? y[r * n + j + i] + v : v;
            }
        }
    }
}

/* y [m, n] = x [m, k] @ w [n, k]^T (+ b [n]), w bf16 row-major. */
int llmfn_bf16_gemv(const float* x, const uint16_t* w, const float* b, float* y, int64_t m, int64_t n, int64_t k,
                    int nthreads) {
    int64_t blocks = (n + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t bi = 0; bi < blocks; bi++) bf16_blocks(x, w, b, y, 0, m, n, k, bi, bi + 1);
    return 0;
}

/* The widening path's ISA: 16, 8 or 1 lanes (what the tests and benchmarks report). */
int llmfn_bf16_lanes(void) { return BF16_LANES; }
#endif
