/* The alternative to bf16.h's widening that benchmarks/bf16_gemv.py measures, not used by llmfn: x
   rounded to bf16 (nearest, ties to even) and vdpbf16ps (AVX-512 BF16), which multiplies 32 bf16
   pairs into 16 fp32 lanes per instruction, each lane adding its two products. Built only where the
   compiler and CPU have AVX-512 BF16 (llmfn_dpbf16_ok says so); the same four-rows layout as
   bf16_blocks so the two differ in the inner loop only. */
#include "bf16.h"
#include <stdlib.h>

#if defined(__AVX512F__) && defined(__GNUC__) && (__GNUC__ >= 10)
#define DPBF16 __attribute__((target("avx512bf16,avx512bw,avx512vl,avx512f")))

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

DPBF16 static inline void dp_dot4(const uint16_t* x, const uint16_t* w, int64_t k, float* out) {
    const uint16_t *w0 = w, *w1 = w + k, *w2 = w + 2 * k, *w3 = w + 3 * k;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t c = 0;
    for (; c + 32 <= k; c += 32) {
        __m512bh xv = (__m512bh)_mm512_loadu_si512(x + c);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w0 + c), xv);
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w1 + c), xv);
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w2 + c), xv);
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w3 + c), xv);
    }
    float a[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                  _mm512_reduce_add_ps(a3)};
    for (; c < k; c++) {
        float xc = bf16_to_f32(x[c]);
        a[0] += bf16_to_f32(w0[c]) * xc; a[1] += bf16_to_f32(w1[c]) * xc;
        a[2] += bf16_to_f32(w2[c]) * xc; a[3] += bf16_to_f32(w3[c]) * xc;
    }
    for (int i = 0; i < 4; i++) out[i] = a[i];
}

/* y [1, n] = bf16(x) [1, k] @ w [n, k]^T, n a multiple of 4 (the benchmark's shapes). */
int llmfn_dpbf16_gemv(const float* x, const uint16_t* w, float* y, int64_t n, int64_t k, int nthreads) {
    uint16_t* xb = (uint16_t*)malloc(sizeof(uint16_t) * k);
    for (int64_t c = 0; c < k; c++) xb[c] = f32_to_bf16(x[c]);
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t bi = 0; bi < n / 4; bi++) dp_dot4(xb, w + bi * 4 * k, k, y + bi * 4);
    free(xb);
    return 0;
}

int llmfn_dpbf16_ok(void) { return __builtin_cpu_supports("avx512bf16"); }
#else
int llmfn_dpbf16_gemv(const float* x, const uint16_t* w, float* y, int64_t n, int64_t k, int nthreads) {
    (void)x; (void)w; (void)y; (void)n; (void)k; (void)nthreads;
    return -1;
}
int llmfn_dpbf16_ok(void) { return 0; }
#endif
