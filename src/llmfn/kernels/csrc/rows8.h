/* The AVX2 int8 weight row kernels of quant.h (GGUF Q8_0 / Q5_0 in groups of 32, Q6_K in groups of 16,
   other groups): one weight row against up to QUANT_PASS_ROWS activation rows. Included by quant.h
   inside its AVX2 part, after the prefetch_ahead and hsum it uses; moved out unchanged. */
#ifndef LLMFN_ROWS8_H
#define LLMFN_ROWS8_H

/* 8 int8 -> 8 floats (the sign extension reads straight from memory). */
static inline __m256 load8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

#define INT8_ROWS(NAME, R, NA)                                                                          \
static inline void NAME(const float* x, const int8_t* qr, const float* sr, float* y,                   \
                        int64_t n, int64_t k, int64_t g, int64_t G) {                                   \
    __m256 tot[R];                                                                                      \
    for (int r = 0; r < R; r++) tot[r] = _mm256_setzero_ps();                                          \
    for (int64_t gi = 0; gi < G; gi++) {                                                               \
        __m256 acc[R][NA];                                                                              \
        for (int r = 0; r < R; r++) for (int a = 0; a < NA; a++) acc[r][a] = _mm256_setzero_ps();      \
        int64_t c = gi * g, end = (gi + 1) * g;                                                        \
        for (; c + 32 <= end; c += 32) {                                                               \
            __m256 w[4];                                                                                \
            prefetch_ahead(qr + c);                                                                     \
            for (int v = 0; v < 4; v++) w[v] = load8(qr + c + 8 * v);                                  \
            for (int r = 0; r < R; r++)                                                                 \
                for (int v = 0; v < 4; v++)                                                             \
                    acc[r][v % NA] = _mm256_fmadd_ps(w[v], _mm256_loadu_ps(x + r * k + c + 8 * v), acc[r][v % NA]); \
        }                                                                                               \
        for (; c < end; c += 8) {                                                                       \
            __m256 w0 = load8(qr + c);                                                                  \
            for (int r = 0; r < R; r++)                                                                 \
                acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * k + c), acc[r][0]);            \
        }                                                                                               \
        __m256 sv = _mm256_set1_ps(sr[gi]);                                                            \
        for (int r = 0; r < R; r++) {                                                                   \
            __m256 a = acc[r][0];                                                                       \
            for (int i = 1; i < NA; i++) a = _mm256_add_ps(a, acc[r][i]);                               \
            tot[r] = _mm256_fmadd_ps(sv, a, tot[r]);                                                   \
        }                                                                                               \
    }                                                                                                   \
    for (int r = 0; r < R; r++) y[r * n] = hsum(tot[r]);                                               \
}

/* int8 groups of 32 (GGUF Q8_0): as INT4_G32, straight-line with even / odd running totals. */
#define INT8_G32(NAME, R)                                                                               \
static inline void NAME(const float* x, const int8_t* qr, const float* sr, float* y,                   \
                        int64_t n, int64_t k, int64_t G) {                                              \
    __m256 te[R], to[R];                                                                                \
    for (int r = 0; r < R; r++) te[r] = to[r] = _mm256_setzero_ps();                                   \
    for (int64_t gi = 0; gi < G; gi++) {                                                               \
        const int8_t* qb = qr + gi * 32;                                                                \
        prefetch_ahead(qb);                                                                             \
        __m256 w0 = load8(qb), w1 = load8(qb + 8), w2 = load8(qb + 16), w3 = load8(qb + 24);           \
        __m256 sv = _mm256_set1_ps(sr[gi]);                                                            \
        for (int r = 0; r < R; r++) {                                                                   \
            const float* p = x + r * k + gi * 32;                                                       \
            __m256 a0 = _mm256_mul_ps(w0, _mm256_loadu_ps(p));                                         \
            __m256 a1 = _mm256_mul_ps(w1, _mm256_loadu_ps(p + 8));                                     \
            a0 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(p + 16), a0);                                     \
            a1 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(p + 24), a1);                                     \
            if (gi & 1) to[r] = _mm256_fmadd_ps(sv, _mm256_add_ps(a0, a1), to[r]);                     \
            else te[r] = _mm256_fmadd_ps(sv, _mm256_add_ps(a0, a1), te[r]);                            \
        }                                                                                               \
    }                                                                                                   \
    for (int r = 0; r < R; r++) y[r * n] = hsum(_mm256_add_ps(te[r], to[r]));                          \
}

/* int8 groups of 16 (GGUF Q6_K) on a 32-weight stride: each 32's two halves are scaled once (w * s, shared
   by the pass's rows) and each row keeps one running sum per half, whatever the number of rows in its
   pass (batch-invariant). The generic INT8_ROWS below walked a group of 16 in two dependent 8-wide FMAs. */
static inline int int8_g16_takes(int64_t g, int64_t k) { return g == 16 && k % 32 == 0; }
#define INT8_G16(NAME, R)                                                                               \
static inline void NAME(const float* x, const int8_t* qr, const float* sr, float* y,                   \
                        int64_t n, int64_t k, int64_t G32) {                                            \
    __m256 al[R], ah[R];                                                                                \
    for (int r = 0; r < R; r++) al[r] = ah[r] = _mm256_setzero_ps();                                   \
    for (int64_t gi = 0; gi < G32; gi++) {                                                             \
        const int8_t* qb = qr + gi * 32;                                                                \
        prefetch_ahead(qb);                                                                             \
        const __m256 sl = _mm256_set1_ps(sr[2 * gi]), sh = _mm256_set1_ps(sr[2 * gi + 1]);              \
        const __m256 w0 = _mm256_mul_ps(load8(qb), sl), w1 = _mm256_mul_ps(load8(qb + 8), sl);         \
        const __m256 w2 = _mm256_mul_ps(load8(qb + 16), sh), w3 = _mm256_mul_ps(load8(qb + 24), sh);   \
        for (int r = 0; r < R; r++) {                                                                   \
            const float* p = x + r * k + gi * 32;                                                       \
            al[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(p), al[r]);                                    \
            ah[r] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(p + 16), ah[r]);                               \
            al[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(p + 8), al[r]);                                \
            ah[r] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(p + 24), ah[r]);                               \
        }                                                                                               \
    }                                                                                                   \
    for (int r = 0; r < R; r++) y[r * n] = hsum(_mm256_add_ps(al[r], ah[r]));                          \
}
INT8_G16(int8_g16_r1, 1) INT8_G16(int8_g16_r2, 2) INT8_G16(int8_g16_r3, 3) INT8_G16(int8_g16_r4, 4)
INT8_G32(int8_g32_r1, 1) INT8_G32(int8_g32_r2, 2) INT8_G32(int8_g32_r3, 3) INT8_G32(int8_g32_r4, 4)

/* Groups other than 32 or 16 take one or two rows a pass, each with the same four accumulators: a
   row's summation order must not depend on how many rows share its pass (batch invariance). */
INT8_ROWS(int8_r1, 1, 4) INT8_ROWS(int8_r2, 2, 4)
#endif
