/* bf16-weight linears for decode (Python side and why: kernels/bf16.py). Part of the decode library:
   decode.c includes it, and its fused decoder layer runs bf16_blocks for Lin kind 5.

   The arithmetic: activations stay fp32; each bf16 weight is widened to fp32 exactly (its 16 bits
   shifted into the high half of a 32-bit lane) and multiplied into fp32 accumulators. So the result
   is the fp32 product with the bf16-rounded weights, x @ w.float()^T, summed in an order fixed by k
   alone (batch-invariant): even and odd elements in 16 lanes each on AVX-512, 8 on AVX2, one chain on
   the scalar path, then the lanes' sum and a sequential tail. Decode streams the weights, so the widening (two integer ops per
   16 weights) stays far below the memory's pace and halving the bytes is what counts. */
#ifndef LLMFN_BF16_H
#define LLMFN_BF16_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "simd.h"

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* A SIMD step takes a chunk of 2 * lanes weights as lanes 32-bit words, each holding an even weight
   (low half: shifted up it is that weight's fp32) and the next odd one (high half: masked, likewise),
   against the activations' matching chunk prepared by bf16_prep as its even then its odd elements.
   Two integer ops widen 2 * lanes weights (zero-extending each half instead took three); even and
   odd elements go into accumulators of their own, added before the lanes are summed. */
#if defined(__AVX512F__)
#define BF16_LANES 16
#define BF16_STEP(xp, w, ae, ao) do {                                                                  \
        __m512i d_ = _mm512_loadu_si512((const void*)(w));                                            \
        ae = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(d_, 16)), _mm512_loadu_ps(xp), ae); \
        ao = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(d_, _mm512_set1_epi32((int)0xFFFF0000u))), \
                             _mm512_loadu_ps((xp) + 16), ao);                                          \
    } while (0)
#define BF16_ZERO _mm512_setzero_ps()
#define BF16_SUM(ae, ao) _mm512_reduce_add_ps(_mm512_add_ps(ae, ao))
typedef __m512 bf16_acc;
#elif defined(__AVX2__)
#define BF16_LANES 8
#define BF16_STEP(xp, w, ae, ao) do {                                                                  \
        __m256i d_ = _mm256_loadu_si256((const __m256i*)(w));                                         \
        ae = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(d_, 16)), _mm256_loadu_ps(xp), ae); \
        ao = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(d_, _mm256_set1_epi32((int)0xFFFF0000u))), \
                             _mm256_loadu_ps((xp) + 8), ao);                                           \
    } while (0)
#define BF16_ZERO _mm256_setzero_ps()
#define BF16_SUM(ae, ao) hsum(_mm256_add_ps(ae, ao))
typedef __m256 bf16_acc;
#else
#define BF16_LANES 1
#endif
#define BF16_CHUNK (2 * BF16_LANES)

/* xp [m, k] <- x [m, k] with each whole chunk of BF16_CHUNK elements reordered to its even then its
   odd elements (the SIMD steps' order); the tail, and the scalar path's x, as they are. */
static void bf16_prep(const float* x, float* xp, int64_t m, int64_t k) {
    int64_t full = BF16_LANES > 1 ? k / BF16_CHUNK * BF16_CHUNK : 0;
    for (int64_t r = 0; r < m; r++) {
        const float* xr = x + r * k;
        float* pr = xp + r * k;
        for (int64_t c = 0; c < full; c += BF16_CHUNK)
            for (int t = 0; t < BF16_LANES; t++) { pr[c + t] = xr[c + 2 * t]; pr[c + BF16_LANES + t] = xr[c + 2 * t + 1]; }
        for (int64_t c = full; c < k; c++) pr[c] = xr[c];
    }
}

/* Dot products of four consecutive bf16 weight rows w (stride k) with xp (bf16_prep'd): out[0..3]. */
static inline void bf16_dot4(const float* xp, const uint16_t* w, int64_t k, float* out) {
    const uint16_t *w0 = w, *w1 = w + k, *w2 = w + 2 * k, *w3 = w + 3 * k;
    int64_t c = 0;
    float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#if BF16_LANES > 1
    bf16_acc e0 = BF16_ZERO, e1 = e0, e2 = e0, e3 = e0, o0 = e0, o1 = e0, o2 = e0, o3 = e0;
    for (; c + BF16_CHUNK <= k; c += BF16_CHUNK) {
        /* The next block's matching bytes into L2: a core then keeps more lines in flight than its
           prefetchers alone do (one thread, SmolLM2's shapes: 28.1 -> 25.6 ms a token's weights). */
        const char* next = (const char*)(w + 4 * k) + c * 8;
        for (int l = 0; l < BF16_CHUNK * 8; l += 64) _mm_prefetch(next + l, _MM_HINT_T1);
        BF16_STEP(xp + c, w0 + c, e0, o0);
        BF16_STEP(xp + c, w1 + c, e1, o1);
        BF16_STEP(xp + c, w2 + c, e2, o2);
        BF16_STEP(xp + c, w3 + c, e3, o3);
    }
    a[0] = BF16_SUM(e0, o0); a[1] = BF16_SUM(e1, o1); a[2] = BF16_SUM(e2, o2); a[3] = BF16_SUM(e3, o3);
#endif
    for (; c < k; c++) {
        float xc = xp[c];
        a[0] += bf16_to_f32(w0[c]) * xc; a[1] += bf16_to_f32(w1[c]) * xc;
        a[2] += bf16_to_f32(w2[c]) * xc; a[3] += bf16_to_f32(w3[c]) * xc;
    }
    for (int i = 0; i < 4; i++) out[i] = a[i];
}

/* One row's dot product: bf16_dot4's arithmetic for a single weight row (the last rows of n). */
static inline float bf16_dot1(const float* xp, const uint16_t* w, int64_t k) {
    int64_t c = 0;
    float a = 0.0f;
#if BF16_LANES > 1
    bf16_acc e = BF16_ZERO, o = e;
    for (; c + BF16_CHUNK <= k; c += BF16_CHUNK) BF16_STEP(xp + c, w + c, e, o);
    a = BF16_SUM(e, o);
#endif
    for (; c < k; c++) a += bf16_to_f32(w[c]) * xp[c];
    return a;
}

/* y [m, n] (+)= x [m, k] @ w [n, k]^T (+ bias [n]) for the blocks of four weight rows [lo, hi), xp
   the activations bf16_prep'd: each block read from memory once and reused from L1 by every
   activation row. With add, y holds the residual and receives y + (x @ w^T + bias). */
static void bf16_blocks(const float* xp, const uint16_t* w, const float* bias, float* y, int add, int64_t m,
                        int64_t n, int64_t k, int64_t lo, int64_t hi) {
    for (int64_t bi = lo; bi < hi; bi++) {
        int64_t j = bi * 4;
        for (int64_t r = 0; r < m; r++) {
            float out[4];
            if (j + 4 <= n) bf16_dot4(xp + r * k, w + j * k, k, out);
            else for (int64_t i = 0; j + i < n; i++) out[i] = bf16_dot1(xp + r * k, w + (j + i) * k, k);
            for (int64_t i = 0; i < 4 && j + i < n; i++) lin_store(y + r * n + j + i, out[i], bias, j + i, add);
        }
    }
}

/* y [m, n] = x [m, k] @ w [n, k]^T (+ b [n]), w bf16 row-major. */
int llmfn_bf16_gemv(const float* x, const uint16_t* w, const float* b, float* y, int64_t m, int64_t n, int64_t k,
                    int nthreads) {
    float* xp = (float*)malloc(sizeof(float) * (m * k > 0 ? m * k : 1));
    bf16_prep(x, xp, m, k);
    int64_t blocks = (n + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t bi = 0; bi < blocks; bi++) bf16_blocks(xp, w, b, y, 0, m, n, k, bi, bi + 1);
    free(xp);
    return 0;
}

/* The widening path's ISA: 16, 8 or 1 lanes (what the tests and benchmarks report). */
int llmfn_bf16_lanes(void) { return BF16_LANES; }
#endif
