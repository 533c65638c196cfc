/* int4 / int8 weight-only linears and dequantization (layouts in llmfn.kernels.quant; Python side and why:
   kernels/cpu_quant.py). Part of the decode library: decode.c includes it, and its fused decoder layer
   reuses prep4, int4_block and int8_block. */
#ifndef LLMFN_QUANT_H
#define LLMFN_QUANT_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include "simd.h"
#include "q8dot.h"
#include "kv16.h"  /* f16_to_f32 */

/* A weight row's G scales (or offsets) as fp32: where they are stored so, in place; where stored as
   fp16 (GGUF's own, llmfn.kernels.quant), widened into buf first. The values are then the same bits
   (fp16 -> fp32 is exact) and every kernel below reads fp32, while decode streams 20 bytes per 32
   int4 weights instead of 24. */
static inline const float* row_f32(const void* p, int half, int64_t j, int64_t G, float* buf) {
    if (!half) return (const float*)p + j * G;
    const uint16_t* h = (const uint16_t*)p + j * G;
    int64_t i = 0;
    __builtin_prefetch((const char*)h + PREFETCH_AHEAD / 8, 0, 3);
    __builtin_prefetch((const char*)h + PREFETCH_AHEAD / 8 + 64, 0, 3);
#ifdef __AVX2__
    for (; i + 8 <= G; i += 8) _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + i))));
#ifdef __AVX512F__
    if (i < G) {  /* the tail in one masked conversion (a scalar f16_to_f32 tail of 2 values cost SmolLM2's
                     [3072, 576] int4 decode ~8% in a kernel harness) */
        __mmask8 tail = (__mmask8)((1u << (G - i)) - 1);
        _mm256_mask_storeu_ps(buf + i, tail, _mm256_cvtph_ps(_mm_maskz_loadu_epi16(tail, h + i)));
        return buf;
    }
#endif
    /* the tail (G % 8: 2 of SmolLM2's 18 groups a row) by 4 and 2 values: _cvtsh_ss one at a time cost the
       AVX2 int4 decode ~5% (the EPYC, a kernel harness) */
    if (i + 4 <= G) { _mm_storeu_ps(buf + i, _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(h + i)))); i += 4; }
    if (i + 2 <= G) {
        int32_t two; memcpy(&two, h + i, 4);
        _mm_storel_pi((__m64*)(buf + i), _mm_cvtph_ps(_mm_cvtsi32_si128(two)));
        i += 2;
    }
    if (i < G) { buf[i] = _cvtsh_ss(h[i]); i++; }
#endif
    for (; i < G; i++) buf[i] = f16_to_f32(h[i]);
    return buf;
}

/* Scratch memory on 64-byte (cache-line) boundaries, freed with free(): malloc's 16-byte alignment
   split every other 64-byte load of the activation rows across two cache lines, which halved the
   multi-row AVX-512 kernels (8 rows of SmolLM2's gate / up, one thread: 505 -> 389 us). */
static inline void* scratch(size_t bytes) { return aligned_alloc(64, (bytes + 63) & ~(size_t)63); }
#include "amx.h"  /* uses row_f32 and scratch */
#include "dequant.h"  /* uses row_f32 */

/* x [m, k] -> xp [m, k]: each 32-wide chunk reordered to its 16 even then 16 odd elements
   (the order the low and high nibbles of 16 packed bytes come out in); xs [m, k/g] group sums. */
static void prep4(const float* x, float* xp, float* xs, int64_t m, int64_t k, int64_t g) {
    for (int64_t i = 0; i < m; i++) {
        const float* xr = x + i * k; float* pr = xp + i * k;
        for (int64_t c = 0; c < k; c += 32)
            for (int t = 0; t < 16; t++) { pr[c + t] = xr[c + 2 * t]; pr[c + 16 + t] = xr[c + 2 * t + 1]; }
        for (int64_t gi = 0; gi < k / g; gi++) {
            float a = 0.0f;
            for (int64_t t = 0; t < g; t++) a += xr[gi * g + t];
            xs[i * (k / g) + gi] = a;
        }
    }
}

#ifdef __AVX2__
/* 16 packed bytes -> 32 floats: w[0] = low nibbles of bytes 0..7, w[1] of bytes 8..15, w[2], w[3]
   the high nibbles. One broadcast load and two byte shuffles place each byte in its own 32-bit
   lane; a mask and a shift take the nibbles (fewer shuffles than zero-extending each half). */
static inline void unpack32(const uint8_t* qb, __m256* w) {
    const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)qb));
    const __m256i s0 = _mm256_setr_epi8(0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3, -1, -1, -1,
                                        4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7, -1, -1, -1);
    const __m256i s1 = _mm256_setr_epi8(8, -1, -1, -1, 9, -1, -1, -1, 10, -1, -1, -1, 11, -1, -1, -1,
                                        12, -1, -1, -1, 13, -1, -1, -1, 14, -1, -1, -1, 15, -1, -1, -1);
    const __m256i m = _mm256_set1_epi32(0x0F);
    __m256i v0 = _mm256_shuffle_epi8(b, s0), v1 = _mm256_shuffle_epi8(b, s1);
    w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(v0, m));
    w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(v1, m));
    w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4));
    w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4));
}

#include "rows8.h"  /* the int8 weight row kernels, with load8 */

/* One weight row against R activation rows (R fixed at compile time keeps accumulators in
   registers). NA independent accumulators per row hide the FMA latency: with one, every FMA
   waited on the previous one and the kernel ran at a third of its throughput. */
#define INT4_ROWS(NAME, R, NA)                                                                          \
static inline void NAME(const float* xp, const float* xs, const uint8_t* qr, const float* sr,          \
                        const float* orow, float* y, int64_t n, int64_t k, int64_t g, int64_t G) {     \
    __m256 tot[R];                                                                                      \
    for (int r = 0; r < R; r++) tot[r] = _mm256_setzero_ps();                                          \
    for (int64_t gi = 0; gi < G; gi++) {                                                               \
        __m256 acc[R][NA];                                                                              \
        for (int r = 0; r < R; r++) for (int a = 0; a < NA; a++) acc[r][a] = _mm256_setzero_ps();      \
        for (int64_t c = gi * g; c < (gi + 1) * g; c += 32) {                                          \
            __m256 w[4];                                                                                \
            prefetch_ahead(qr + c / 2);                                                                 \
            unpack32(qr + c / 2, w);                                                                    \
            for (int r = 0; r < R; r++)                                                                 \
                for (int v = 0; v < 4; v++)                                                             \
                    acc[r][v % NA] = _mm256_fmadd_ps(w[v], _mm256_loadu_ps(xp + r * k + c + 8 * v), acc[r][v % NA]); \
        }                                                                                               \
        __m256 sv = _mm256_set1_ps(sr[gi]);                                                            \
        for (int r = 0; r < R; r++) {                                                                   \
            __m256 a = acc[r][0];                                                                       \
            for (int i = 1; i < NA; i++) a = _mm256_add_ps(a, acc[r][i]);                               \
            tot[r] = _mm256_fmadd_ps(sv, a, tot[r]);                                                   \
        }                                                                                               \
    }                                                                                                   \
    for (int r = 0; r < R; r++) { /* + sum_g offsets[g] * xs[g], eight groups at a time */             \
        const float* xsr = xs + r * G;                                                                  \
        int64_t gi = 0;                                                                                 \
        for (; gi + 8 <= G; gi += 8)                                                                    \
            tot[r] = _mm256_fmadd_ps(_mm256_loadu_ps(orow + gi), _mm256_loadu_ps(xsr + gi), tot[r]);   \
        float a = hsum(tot[r]);                                                                         \
        for (; gi < G; gi++) a += orow[gi] * xsr[gi];                                                  \
        y[r * n] = a;                                                                                   \
    }                                                                                                   \
}

/* sum of a group-32 row's even / odd running totals, plus sum_g offsets[g] * xs[g] (eight groups
   at a time): the end of every int4 group-32 dot product. */
static inline float int4_g32_tail(__m256 te, __m256 to, const float* orow, const float* xs, int64_t G) {
    __m256 t = _mm256_add_ps(te, to);
    int64_t j = 0;
    for (; j + 8 <= G; j += 8) t = _mm256_fmadd_ps(_mm256_loadu_ps(orow + j), _mm256_loadu_ps(xs + j), t);
    float a = hsum(t);
    for (; j < G; j++) a += orow[j] * xs[j];
    return a;
}

/* Groups of 32 (GGUF Q4, llmfn's default): one 16-byte load per group, straight-line code, two
   running totals (even and odd groups) so consecutive groups do not wait on each other. */
#define INT4_G32(NAME, R)                                                                               \
static inline __m256 NAME##_group(const uint8_t* qb, const float* xp, int64_t k, int r_count, __m256* d) { \
    __m256 w[4];                                                                                        \
    unpack32(qb, w);                                                                                    \
    __m256 w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];                                                  \
    for (int r = 0; r < R; r++) {                                                                       \
        const float* p = xp + r * k;                                                                    \
        __m256 a0 = _mm256_mul_ps(w0, _mm256_loadu_ps(p));                                             \
        __m256 a1 = _mm256_mul_ps(w1, _mm256_loadu_ps(p + 8));                                         \
        a0 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(p + 16), a0);                                         \
        a1 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(p + 24), a1);                                         \
        d[r] = _mm256_add_ps(a0, a1);                                                                   \
    }                                                                                                   \
    return w0;                                                                                          \
}                                                                                                       \
static inline void NAME(const float* xp, const float* xs, const uint8_t* qr, const float* sr,          \
                        const float* orow, float* y, int64_t n, int64_t k, int64_t G) {                \
    __m256 te[R], to[R], d[R];                                                                          \
    for (int r = 0; r < R; r++) te[r] = to[r] = _mm256_setzero_ps();                                   \
    int64_t gi = 0;                                                                                     \
    for (; gi + 2 <= G; gi += 2) {                                                                      \
        prefetch_ahead(qr + gi * 16);                                                                   \
        NAME##_group(qr + gi * 16, xp + gi * 32, k, R, d);                                             \
        __m256 se = _mm256_set1_ps(sr[gi]);                                                             \
        for (int r = 0; r < R; r++) te[r] = _mm256_fmadd_ps(se, d[r], te[r]);                          \
        NAME##_group(qr + gi * 16 + 16, xp + gi * 32 + 32, k, R, d);                                   \
        __m256 so = _mm256_set1_ps(sr[gi + 1]);                                                         \
        for (int r = 0; r < R; r++) to[r] = _mm256_fmadd_ps(so, d[r], to[r]);                          \
    }                                                                                                   \
    if (gi < G) {                                                                                       \
        NAME##_group(qr + gi * 16, xp + gi * 32, k, R, d);                                             \
        __m256 se = _mm256_set1_ps(sr[gi]);                                                             \
        for (int r = 0; r < R; r++) te[r] = _mm256_fmadd_ps(se, d[r], te[r]);                          \
    }                                                                                                   \
    for (int r = 0; r < R; r++) y[r * n] = int4_g32_tail(te[r], to[r], orow, xs + r * G, G);            \
}

/* Groups other than 32 take one or two rows a pass, each with the same four accumulators: a row's
   summation order must not depend on how many rows share its pass (batch invariance). */
INT4_ROWS(int4_r1, 1, 4) INT4_ROWS(int4_r2, 2, 4)
INT4_G32(int4_g32_r1, 1) INT4_G32(int4_g32_r2, 2) INT4_G32(int4_g32_r3, 3) INT4_G32(int4_g32_r4, 4)

/* Two weight rows against one activation row (decode): each row's arithmetic is int4_g32_r1's,
   operation for operation, so results are bitwise the same; interleaving the rows shares the
   activation loads and doubles the independent work in flight (+8% in a kernel microbenchmark,
   ~3% of SmolLM2's int4 layers). */
static inline __m256 int4_g32_dot(const uint8_t* qb, __m256 x0, __m256 x1, __m256 x2, __m256 x3) {
    __m256 w[4];
    unpack32(qb, w);
    __m256 a0 = _mm256_mul_ps(w[0], x0);
    __m256 a1 = _mm256_mul_ps(w[1], x1);
    a0 = _mm256_fmadd_ps(w[2], x2, a0);
    a1 = _mm256_fmadd_ps(w[3], x3, a1);
    return _mm256_add_ps(a0, a1);
}
static inline void int4_g32_r1x2(const float* xp, const float* xs, const uint8_t* qa, const uint8_t* qb,
                                 const float* sa, const float* sb, const float* oa, const float* ob,
                                 float* ya, float* yb, int64_t G) {
    __m256 tea = _mm256_setzero_ps(), toa = tea, teb = tea, tob = tea;
    for (int64_t gi = 0; gi < G; gi++) {
        const float* p = xp + gi * 32;
        __m256 x0 = _mm256_loadu_ps(p), x1 = _mm256_loadu_ps(p + 8), x2 = _mm256_loadu_ps(p + 16), x3 = _mm256_loadu_ps(p + 24);
        prefetch_ahead(qa + gi * 16);
        prefetch_ahead(qb + gi * 16);
        __m256 da = int4_g32_dot(qa + gi * 16, x0, x1, x2, x3), db = int4_g32_dot(qb + gi * 16, x0, x1, x2, x3);
        if (gi & 1) {
            toa = _mm256_fmadd_ps(_mm256_set1_ps(sa[gi]), da, toa);
            tob = _mm256_fmadd_ps(_mm256_set1_ps(sb[gi]), db, tob);
        } else {
            tea = _mm256_fmadd_ps(_mm256_set1_ps(sa[gi]), da, tea);
            teb = _mm256_fmadd_ps(_mm256_set1_ps(sb[gi]), db, teb);
        }
    }
    *ya = int4_g32_tail(tea, toa, oa, xs, G);
    *yb = int4_g32_tail(teb, tob, ob, xs, G);
}
#ifdef __AVX512F__
#include "zrows.h"  /* a weight row against up to 8 activation rows, and the decode pairs */
#include "ztile.h"  /* several rows in tiles; uses zrows.h's dequantizers */
#else
#define QUANT_PASS_ROWS 4
#define int4_g32_decode_pair int4_g32_r1x2
#endif
#else
#define QUANT_PASS_ROWS 4
/* Portable versions (the compiler vectorizes what it can). */
static void int4_rows(const float* xp, const float* xs, const uint8_t* qr, const float* sr, const float* orow,
                      float* y, int64_t n, int64_t k, int64_t g, int64_t G, int R) {
    for (int r = 0; r < R; r++) {
        const float* p = xp + r * k; const float* xsr = xs + r * G; float a = 0.0f;
        for (int64_t gi = 0; gi < G; gi++) {
            float d = 0.0f;
            for (int64_t c = gi * g; c < (gi + 1) * g; c += 32)
                for (int t = 0; t < 16; t++) {
                    uint8_t b = qr[c / 2 + t];
                    d += (float)(b & 15) * p[c + t] + (float)(b >> 4) * p[c + 16 + t];
                }
            a += sr[gi] * d + orow[gi] * xsr[gi];
        }
        y[r * n] = a;
    }
}
static void int8_rows(const float* x, const int8_t* qr, const float* sr, float* y,
                      int64_t n, int64_t k, int64_t g, int64_t G, int R) {
    for (int r = 0; r < R; r++) {
        float a = 0.0f;
        for (int64_t gi = 0; gi < G; gi++) {
            float d = 0.0f;
            for (int64_t c = gi * g; c < (gi + 1) * g; c++) d += (float)qr[c] * x[r * k + c];
            a += sr[gi] * d;
        }
        y[r * n] = a;
    }
}
#endif

/* Rows i0 .. i0 + R - 1 (R <= QUANT_PASS_ROWS) of y = x @ w^T at column j, from one weight row: the dispatch on
   R and the group size shared by the linears below and the fused decoder layer (decode.c). */
static inline void int4_block(const float* xpi, const float* xsi, const uint8_t* qr, const float* sr,
                              const float* orow, float* yi, int64_t n, int64_t k, int64_t g, int64_t G, int64_t R) {
#ifdef __AVX2__
    if (g == 32) {
#ifdef __AVX512F__
        switch (R) {
        case 8: int4_z_r8(xpi, qr, sr, orow, yi, n, k, G); break;
        case 7: int4_z_r7(xpi, qr, sr, orow, yi, n, k, G); break;
        case 6: int4_z_r6(xpi, qr, sr, orow, yi, n, k, G); break;
        case 5: int4_z_r5(xpi, qr, sr, orow, yi, n, k, G); break;
        case 4: int4_z_r4(xpi, qr, sr, orow, yi, n, k, G); break;
        case 3: int4_z_r3(xpi, qr, sr, orow, yi, n, k, G); break;
        case 2: int4_z_r2(xpi, qr, sr, orow, yi, n, k, G); break;
        default: int4_z_r1(xpi, qr, sr, orow, yi, n, k, G);
        }
#else
        if (R == 4) int4_g32_r4(xpi, xsi, qr, sr, orow, yi, n, k, G);
        else if (R == 3) int4_g32_r3(xpi, xsi, qr, sr, orow, yi, n, k, G);
        else if (R == 2) int4_g32_r2(xpi, xsi, qr, sr, orow, yi, n, k, G);
        else int4_g32_r1(xpi, xsi, qr, sr, orow, yi, n, k, G);
#endif
        return;
    }
    for (int64_t r = 0; r < R; r += 2) {
        if (R - r >= 2) int4_r2(xpi + r * k, xsi + r * G, qr, sr, orow, yi + r * n, n, k, g, G);
        else int4_r1(xpi + r * k, xsi + r * G, qr, sr, orow, yi + r * n, n, k, g, G);
    }
#else
    int4_rows(xpi, xsi, qr, sr, orow, yi, n, k, g, G, (int)R);
#endif
}

static inline void int8_block(const float* xi, const int8_t* qr, const float* sr, float* yi,
                              int64_t n, int64_t k, int64_t g, int64_t G, int64_t R) {
#ifdef __AVX512F__
    if (int8_z_takes(g, k)) {
        const int64_t G32 = k / 32;
        const int sub = g == 16;
        switch (R) {
        case 8: int8_z_r8(xi, qr, sr, yi, n, k, G32, sub); break;
        case 7: int8_z_r7(xi, qr, sr, yi, n, k, G32, sub); break;
        case 6: int8_z_r6(xi, qr, sr, yi, n, k, G32, sub); break;
        case 5: int8_z_r5(xi, qr, sr, yi, n, k, G32, sub); break;
        case 4: int8_z_r4(xi, qr, sr, yi, n, k, G32, sub); break;
        case 3: int8_z_r3(xi, qr, sr, yi, n, k, G32, sub); break;
        case 2: int8_z_r2(xi, qr, sr, yi, n, k, G32, sub); break;
        default: int8_z_r1(xi, qr, sr, yi, n, k, G32, sub);
        }
        return;
    }
#endif
#ifdef __AVX2__
    if (g == 32) {
        if (R == 4) int8_g32_r4(xi, qr, sr, yi, n, k, G);
        else if (R == 3) int8_g32_r3(xi, qr, sr, yi, n, k, G);
        else if (R == 2) int8_g32_r2(xi, qr, sr, yi, n, k, G);
        else int8_g32_r1(xi, qr, sr, yi, n, k, G);
    }
    else if (int8_g16_takes(g, k)) {
        if (R == 4) int8_g16_r4(xi, qr, sr, yi, n, k, k / 32);
        else if (R == 3) int8_g16_r3(xi, qr, sr, yi, n, k, k / 32);
        else if (R == 2) int8_g16_r2(xi, qr, sr, yi, n, k, k / 32);
        else int8_g16_r1(xi, qr, sr, yi, n, k, k / 32);
    }
    else
        for (int64_t r = 0; r < R; r += 2) {
            if (R - r >= 2) int8_r2(xi + r * k, qr, sr, yi + r * n, n, k, g, G);
            else int8_r1(xi + r * k, qr, sr, yi + r * n, n, k, g, G);
        }
#else
    int8_rows(xi, qr, sr, yi, n, k, g, G, (int)R);
#endif
}

/* y [m, n] = x [m, k] @ int4 weight [n, k]^T; g % 32 == 0. act8: with int8 activations (q8dot.h). */
int llmfn_int4_linear(const float* x, const uint8_t* q, const void* s, const void* o, float* y,
                      int64_t m, int64_t n, int64_t k, int64_t g, int act8, int half, int nthreads) {
    int64_t G = k / g;
#ifdef LLMFN_AMX
    if (act8 && amx_ready()) return amx_linear(4, x, q, s, o, y, m, n, k, g, half, nthreads);
#endif
    if (act8) {
        int8_t* xq = (int8_t*)scratch(q8_scratch_bytes(m, k));
        float* dq = (float*)(xq + m * k);
        float* xs = dq + m * (k / 8);
        quantize_q8(x, xq, dq, xs, m, k, g);
        #pragma omp parallel num_threads(nthreads)
        {
            float sb[G], ob[G];
            #pragma omp for schedule(static)
            for (int64_t j = 0; j < n; j++)
                int4_q8_block(xq, dq, xs, q + j * (k / 2), row_f32(s, half, j, G, sb), row_f32(o, half, j, G, ob),
                              y + j, n, k, g, m);
        }
        free(xq);
        return 0;
    }
#ifdef LLMFN_ZTILE_H
    if (g == 32 && zt_takes(4, m)) return zt_linear(4, x, q, s, o, half, y, m, n, k, nthreads);
#endif
    float* xp = (float*)scratch(sizeof(float) * (m * k + m * G));
    float* xs = xp + m * k;
    prep4(x, xp, xs, m, k, g);
    #pragma omp parallel num_threads(nthreads)
    {
        float sb[G], ob[G];
        #pragma omp for schedule(static)
        for (int64_t j = 0; j < n; j++) {
            const float *sr = row_f32(s, half, j, G, sb), *orow = row_f32(o, half, j, G, ob);
            for (int64_t i0 = 0; i0 < m; i0 += QUANT_PASS_ROWS)
                int4_block(xp + i0 * k, xs + i0 * G, q + j * (k / 2), sr, orow, y + i0 * n + j, n, k, g, G,
                           (m - i0) < QUANT_PASS_ROWS ? (m - i0) : QUANT_PASS_ROWS);
        }
    }
    free(xp);
    return 0;
}

/* Whether this build has csrc/ztile.h's tiles (kernels/cpu_quant.py lets them take longer prompts). */
int llmfn_row_tiles(void) {
#ifdef LLMFN_ZTILE_H
    return 1;
#else
    return 0;
#endif
}

/* y [m, n] = x [m, k] @ int8 weight [n, k]^T; g % 8 == 0. act8 (k and g multiples of 32): with
   int8 activations (q8dot.h). */
int llmfn_int8_linear(const float* x, const int8_t* q, const void* s, float* y,
                      int64_t m, int64_t n, int64_t k, int64_t g, int act8, int half, int nthreads) {
    int64_t G = k / g;
#ifdef LLMFN_AMX
    if (act8 && amx_ready()) return amx_linear(8, x, q, s, NULL, y, m, n, k, g, half, nthreads);
#endif
    if (act8) {
        int8_t* xq = (int8_t*)scratch(q8_plain_scratch_bytes(m, k));
        float* dq8 = (float*)(xq + m * k);
        int32_t* corr = (int32_t*)(dq8 + m * (k / 4));
        quantize_q8_plain(x, xq, dq8, corr, m, k);
        #pragma omp parallel num_threads(nthreads)
        {
            float sb[G];
            #pragma omp for schedule(static)
            for (int64_t j = 0; j < n; j++)
                int8_q8_block(xq, dq8, corr, q + j * k, row_f32(s, half, j, G, sb), y + j, n, k, g, m);
        }
        free(xq);
        return 0;
    }
#ifdef LLMFN_ZTILE_H
    if (g == 32 && zt_takes(8, m)) return zt_linear(8, x, q, s, NULL, half, y, m, n, k, nthreads);
#endif
#ifdef int8_g32_decode_pair
    if (m == 1 && int8_z_takes(g, k)) {  /* decode: two weight rows at a time, same bits */
        #pragma omp parallel num_threads(nthreads)
        {
            float sa[G], sb[G];
            #pragma omp for schedule(static)
            for (int64_t p = 0; p < (n + 1) / 2; p++) {
                int64_t j = 2 * p;
                if (j + 1 < n)
                    int8_g32_decode_pair(x, q + j * k, q + (j + 1) * k, row_f32(s, half, j, G, sa),
                                         row_f32(s, half, j + 1, G, sb), y + j, y + j + 1, k / 32, g == 16);
                else int8_block(x, q + j * k, row_f32(s, half, j, G, sa), y + j, n, k, g, G, 1);
            }
        }
        return 0;
    }
#endif
    #pragma omp parallel num_threads(nthreads)
    {
        float sb[G];
        #pragma omp for schedule(static)
        for (int64_t j = 0; j < n; j++) {
            const float* sr = row_f32(s, half, j, G, sb);
            for (int64_t i0 = 0; i0 < m; i0 += QUANT_PASS_ROWS)
                int8_block(x + i0 * k, q + j * k, sr, y + i0 * n + j, n, k, g, G,
                           (m - i0) < QUANT_PASS_ROWS ? (m - i0) : QUANT_PASS_ROWS);
        }
    }
    return 0;
}

#endif
