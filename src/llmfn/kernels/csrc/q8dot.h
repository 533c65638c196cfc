/* int4 weights against int8 activations (llama.cpp's Q8 scheme; why and when: kernels/cpu_quant.py).
   Each activation row is quantized per block of 32: d = max|x| / 127, xq = round(x / d). A weight
   row's int4 block then meets it in an integer dot product (AVX-512 VNNI vpdpbusd, AVX2 vpmaddubsw
   + vpmaddwd, or plain C), scaled in fp32:

       y = sum_b s[b / bpg] * d_b * (q_b . xq_b) + sum_g o_g * xs_g,   xs_g = sum_{b in g} d_b * sum(xq_b)

   (xs from the quantized activations, as llama.cpp's Q8_1: the error is then sum_t w_t * (x_t - xq_t d),
   proportional to the weights; with the exact sums it is sum_t q_t s (x_t - xq_t d), several times
   larger where offsets are large, as in Q4_1's unsigned nibbles.)

   Layout of a quantized row, made for the weights' nibbles: blocks go in pairs (A, B), 64 bytes
   [A_lo, B_lo, A_hi, B_hi] where X_lo[t] = xq[2t] and X_hi[t] = xq[2t + 1] of block X (the low and
   high nibbles of its 16 weight bytes); an odd last block is [lo, hi]. So the 32 weight bytes of a
   pair, masked (low nibbles) and shifted (high), line up with the activations without a shuffle.
   On AVX-512 whole fours of blocks come first, [A_lo, B_lo, C_lo, D_lo, A_hi, B_hi, C_hi, D_hi]
   (q8_lo below), the same idea for 64 weight bytes.
   The scales dq: 4 copies of each block's d (a pair's 8 floats are the lanes its dot products land in). */
#ifndef LLMFN_Q8DOT_H
#define LLMFN_Q8DOT_H
#include <math.h>
#include <stdint.h>
#include "simd.h"

/* Where block b's low-nibble activations start in a row of nb blocks, in pairs (the high ones: +
   q8_pair_hi(b, nb)). */
static inline int64_t q8_pair_lo(int64_t b, int64_t nb) {
    return (b + 1 < nb || !(nb & 1)) ? (b / 2) * 64 + (b & 1) * 16 : b * 32;
}
static inline int64_t q8_pair_hi(int64_t b, int64_t nb) { return (b + 1 < nb || !(nb & 1)) ? 32 : 16; }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* AVX-512 takes blocks in fours, 128 bytes [A_lo, B_lo, C_lo, D_lo, A_hi, B_hi, C_hi, D_hi], so the
   64 weight bytes of four blocks meet their activations in two 64-byte dot products; the last
   nb % 4 blocks in pairs as above. */
static inline int64_t q8_lo(int64_t b, int64_t nb) {
    int64_t whole = nb / 4 * 4;
    return b < whole ? (b / 4) * 128 + (b % 4) * 16 : whole * 32 + q8_pair_lo(b - whole, nb - whole);
}
static inline int64_t q8_hi(int64_t b, int64_t nb) {
    int64_t whole = nb / 4 * 4;
    return b < whole ? 64 : q8_pair_hi(b - whole, nb - whole);
}
#else
static inline int64_t q8_lo(int64_t b, int64_t nb) { return q8_pair_lo(b, nb); }
static inline int64_t q8_hi(int64_t b, int64_t nb) { return q8_pair_hi(b, nb); }
#endif

/* fmaxf(a, |v|) for a never NaN, and fminf(fmaxf(v, -127), 127), as comparisons the compiler keeps
   inline (fmaxf went through libm's PLT): the same results, NaN included (|NaN| leaves a, a NaN
   clamps to -127). */
static inline float max_abs(float a, float v) { return fabsf(v) > a ? fabsf(v) : a; }
static inline float clamp127(float v) { return v > -127.0f ? (v < 127.0f ? v : 127.0f) : -127.0f; }

/* One block of 32 activations as every int8-activation kernel quantizes it (here and in amx.h):
   v[t] = round(x[t] / d) with d = max|x| / 127, returned; clamped, so that a NaN or inf input never
   reaches the cast. */
static inline float q8_block(const float* xb, int8_t v[32]) {
    float amax = 0.0f;
    for (int t = 0; t < 32; t++) amax = max_abs(amax, xb[t]);
    float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int t = 0; t < 32; t++) v[t] = (int8_t)nearbyintf(clamp127(xb[t] * id));
    return amax / 127.0f;
}

/* x [m, k] -> xq [m, k] int8, dq [m, k / 8] (4 copies of each block's scale), xs [m, k / g] the
   quantized activations' group sums. */
static void quantize_q8(const float* x, int8_t* xq, float* dq, float* xs, int64_t m, int64_t k, int64_t g) {
    int64_t nb = k / 32, G = k / g;
    for (int64_t i = 0; i < m; i++) {
        const float* xr = x + i * k;
        int8_t* qr = xq + i * k;
        for (int64_t b = 0; b < nb; b++) {
            int8_t v[32];
            float d = q8_block(xr + b * 32, v);
            int8_t* lo = qr + q8_lo(b, nb);
            int8_t* hi = lo + q8_hi(b, nb);
            for (int t = 0; t < 16; t++) {
                lo[t] = v[2 * t];
                hi[t] = v[2 * t + 1];
            }
            for (int c = 0; c < 4; c++) dq[i * (k / 8) + b * 4 + c] = d;
            int32_t qsum = 0;
            for (int t = 0; t < 16; t++) qsum += lo[t] + hi[t];
            if (b % (g / 32) == 0) xs[i * G + b / (g / 32)] = 0.0f;
            xs[i * G + b / (g / 32)] += d * (float)qsum;
        }
    }
}

/* sum_g o_g * xs_g, in one fixed order per path. */
static inline float q8_offsets(const float* orow, const float* xs, int64_t G) {
    float a = 0.0f;
    int64_t gi = 0;
#ifdef __AVX2__
    __m256 t = _mm256_setzero_ps();
    for (; gi + 8 <= G; gi += 8) t = _mm256_fmadd_ps(_mm256_loadu_ps(orow + gi), _mm256_loadu_ps(xs + gi), t);
    a = hsum(t);
#endif
    for (; gi < G; gi++) a += orow[gi] * xs[gi];
    return a;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* The dot products of a pair of int4 blocks (32 weight bytes) with their 64 activation bytes, as
   16 floats: lanes 0-3 and 8-11 block A's, 4-7 and 12-15 block B's (the layout above). */
static inline __m512 int4_pair_dot(const uint8_t* qb, const int8_t* xb) {
    __m256i raw = _mm256_loadu_si256((const __m256i*)qb);
    __m512i w = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1),
                                 _mm512_set1_epi8(0x0F));
    return _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(xb)));
}

/* One int4 weight row (nb blocks of 32, bpg blocks per scale group) against one quantized row. */
static inline __attribute__((always_inline)) float int4_q8_dot_bpg(const uint8_t* qr, const float* sr, const float* orow, const int8_t* xq,
                                const float* dq, const float* xs, int64_t nb, int64_t bpg, int64_t G) {
    const __m512i pair = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
    const __m512i quad = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
    int64_t b = 0, whole = nb / 4 * 4;
    for (; b < whole; b += 4) {  /* four blocks: 64 weight bytes, lanes 4i..4i+3 block b + i's */
        prefetch_ahead(qr + b * 16);
        __m512i raw = _mm512_loadu_si512(qr + b * 16);
        const int8_t* x = xq + b * 32;
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(raw, m4), _mm512_loadu_si512(x));
        dot = _mm512_dpbusd_epi32(dot, _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4), _mm512_loadu_si512(x + 64));
        __m128 s4 = bpg == 1 ? _mm_loadu_ps(sr + b)
                             : _mm_setr_ps(sr[b / bpg], sr[(b + 1) / bpg], sr[(b + 2) / bpg], sr[(b + 3) / bpg]);
        __m512 scale = _mm512_mul_ps(_mm512_permutexvar_ps(quad, _mm512_castps128_ps512(s4)), _mm512_loadu_ps(dq + b * 4));
        if (b & 4) acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc1);
        else acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc0);
    }
    for (; b + 2 <= nb; b += 2) {  /* then pairs: [A_lo, B_lo, A_hi, B_hi] */
        __m128 s2 = _mm_unpacklo_ps(_mm_set_ss(sr[b / bpg]), _mm_set_ss(sr[(b + 1) / bpg]));
        __m512 scale = _mm512_mul_ps(_mm512_permutexvar_ps(pair, _mm512_castps128_ps512(s2)),
                                     _mm512_broadcast_f32x8(_mm256_loadu_ps(dq + b * 4)));
        if (b & 2) acc1 = _mm512_fmadd_ps(int4_pair_dot(qr + b * 16, xq + b * 32), scale, acc1);
        else acc0 = _mm512_fmadd_ps(int4_pair_dot(qr + b * 16, xq + b * 32), scale, acc0);
    }
    if (b < nb) {  /* an odd last block: [lo, hi] */
        __m128i raw = _mm_loadu_si128((const __m128i*)(qr + b * 16));
        __m256i w = _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(raw), _mm_srli_epi16(raw, 4), 1),
                                     _mm256_set1_epi8(0x0F));
        __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, _mm256_loadu_si256((const __m256i*)(xq + b * 32)));
        __m256 part = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(sr[b / bpg] * dq[b * 4]));
        acc1 = _mm512_add_ps(acc1, _mm512_zextps256_ps512(part));
    }
    int64_t gi = 0;  /* + sum_g o_g * xs_g, 16 groups at a time, into the same total */
    for (; gi + 16 <= G; gi += 16) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(orow + gi), _mm512_loadu_ps(xs + gi), acc0);
    if (gi < G) {
        __mmask16 rest = (__mmask16)((1u << (G - gi)) - 1);
        acc1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(rest, orow + gi), _mm512_maskz_loadu_ps(rest, xs + gi), acc1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
#elif defined(__AVX2__)
static inline __attribute__((always_inline)) float int4_q8_dot_bpg(const uint8_t* qr, const float* sr, const float* orow, const int8_t* xq,
                                const float* dq, const float* xs, int64_t nb, int64_t bpg, int64_t G) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const __m256i pair = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        prefetch_ahead(qr + b * 16);
        __m256i raw = _mm256_loadu_si256((const __m256i*)(qr + b * 16));
        const int8_t* x = xq + b * 32;
        /* u4 * s8 pairs stay within int16 (2 * 15 * 127 per vpmaddubsw lane, twice that summed) */
        __m256i lo = _mm256_maddubs_epi16(_mm256_and_si256(raw, m4), _mm256_loadu_si256((const __m256i*)x));
        __m256i hi = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(raw, 4), m4),
                                          _mm256_loadu_si256((const __m256i*)(x + 32)));
        __m256i dot = _mm256_madd_epi16(_mm256_add_epi16(lo, hi), ones);
        __m128 s2 = _mm_unpacklo_ps(_mm_set_ss(sr[b / bpg]), _mm_set_ss(sr[(b + 1) / bpg]));
        __m256 scale = _mm256_mul_ps(_mm256_permutevar8x32_ps(_mm256_castps128_ps256(s2), pair), _mm256_loadu_ps(dq + b * 4));
        if (b & 2) acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc1);
        else acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc0);
    }
    if (b < nb) {
        __m128i raw = _mm_loadu_si128((const __m128i*)(qr + b * 16));
        __m256i w = _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(raw), _mm_srli_epi16(raw, 4), 1), m4);
        __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(w, _mm256_loadu_si256((const __m256i*)(xq + b * 32))), ones);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(sr[b / bpg] * dq[b * 4]), acc1);
    }
    return hsum(_mm256_add_ps(acc0, acc1)) + q8_offsets(orow, xs, G);
}
#else
static inline __attribute__((always_inline)) float int4_q8_dot_bpg(const uint8_t* qr, const float* sr, const float* orow, const int8_t* xq,
                                const float* dq, const float* xs, int64_t nb, int64_t bpg, int64_t G) {
    float a = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const int8_t* lo = xq + q8_lo(b, nb);
        const int8_t* hi = lo + q8_hi(b, nb);
        int32_t dot = 0;
        for (int t = 0; t < 16; t++) dot += (qr[b * 16 + t] & 15) * lo[t] + (qr[b * 16 + t] >> 4) * hi[t];
        a += sr[b / bpg] * dq[b * 4] * (float)dot;
    }
    return a + q8_offsets(orow, xs, G);
}
#endif

/* bpg blocks of 32 per scale group: the common ones (1: GGUF; 2, 4: groups of 64, 128; one group a
   row: per channel) compiled with bpg a constant, so a block's scale index is a shift, not a division. */
#define Q8_ONE_GROUP ((int64_t)1 << 40)  /* more blocks than a row has: b / Q8_ONE_GROUP == 0 */
#define Q8_BPG_DISPATCH(CALL)                                         \
    if (bpg == 1) return CALL(1);                                     \
    if (bpg == 2) return CALL(2);                                     \
    if (bpg == 4) return CALL(4);                                     \
    if (bpg >= nb) return CALL(Q8_ONE_GROUP);                         \
    return CALL(bpg);

static inline float int4_q8_dot(const uint8_t* qr, const float* sr, const float* orow, const int8_t* xq,
                                const float* dq, const float* xs, int64_t nb, int64_t bpg, int64_t G) {
#define INT4_Q8_CALL(B) int4_q8_dot_bpg(qr, sr, orow, xq, dq, xs, nb, B, G)
    Q8_BPG_DISPATCH(INT4_Q8_CALL)
#undef INT4_Q8_CALL
}

/* Rows [0, R) of y (stride n) at one weight row; xq, dq, xs as quantize_q8 wrote them. */
static inline void int4_q8_block(const int8_t* xq, const float* dq, const float* xs, const uint8_t* qr,
                                 const float* sr, const float* orow, float* y, int64_t n, int64_t k, int64_t g,
                                 int64_t R) {
    int64_t G = k / g;
    for (int64_t r = 0; r < R; r++)
        y[r * n] = int4_q8_dot(qr, sr, orow, xq + r * k, dq + r * (k / 8), xs + r * G, k / 32, g / 32, G);
}

/* ---- int8 weights (GGUF Q8_0, per-channel RTN) against int8 activations -----------------------
   The activations in their own order here; dq8 holds 8 copies of each block's scale; on AVX-512
   corr holds -128 * (the sum of each 4 activations): vpdpbusd multiplies unsigned by signed bytes,
   so the signed weights go in as w + 128 (w ^ 0x80) and corr, its accumulator's start, takes the
   128 * x back out, exactly, in the integers. */
static void quantize_q8_plain(const float* x, int8_t* xq, float* dq8, int32_t* corr, int64_t m, int64_t k) {
    for (int64_t i = 0; i < m * (k / 32); i++) {
        int8_t* qb = xq + i * 32;
        float d = q8_block(x + i * 32, qb);
        for (int l = 0; l < 8; l++) {
            dq8[i * 8 + l] = d;
            corr[i * 8 + l] = -128 * (qb[4 * l] + qb[4 * l + 1] + qb[4 * l + 2] + qb[4 * l + 3]);
        }
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
static inline __attribute__((always_inline)) float int8_q8_dot_bpg(const int8_t* qr, const float* sr, const int8_t* xq,
                                                                   const float* dq8, const int32_t* corr, int64_t nb,
                                                                   int64_t bpg) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const __m512i pair = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        prefetch_ahead(qr + b * 32);
        __m512i w = _mm512_xor_si512(_mm512_loadu_si512(qr + b * 32), flip);
        __m512i dot = _mm512_dpbusd_epi32(_mm512_loadu_si512(corr + b * 8), w, _mm512_loadu_si512(xq + b * 32));
        __m128 s2 = _mm_unpacklo_ps(_mm_set_ss(sr[b / bpg]), _mm_set_ss(sr[(b + 1) / bpg]));
        __m512 scale = _mm512_mul_ps(_mm512_permutexvar_ps(pair, _mm512_castps128_ps512(s2)), _mm512_loadu_ps(dq8 + b * 8));
        if (b & 2) acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc1);
        else acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc0);
    }
    if (b < nb) {
        __m256i w = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(qr + b * 32)), _mm256_set1_epi8((char)0x80));
        __m256i dot = _mm256_dpbusd_epi32(_mm256_loadu_si256((const __m256i*)(corr + b * 8)), w,
                                          _mm256_loadu_si256((const __m256i*)(xq + b * 32)));
        __m256 part = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(_mm256_set1_ps(sr[b / bpg]), _mm256_loadu_ps(dq8 + b * 8)));
        acc1 = _mm512_add_ps(acc1, _mm512_zextps256_ps512(part));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
#elif defined(__AVX2__)
static inline __attribute__((always_inline)) float int8_q8_dot_bpg(const int8_t* qr, const float* sr, const int8_t* xq,
                                                                   const float* dq8, const int32_t* corr, int64_t nb,
                                                                   int64_t bpg) {
    (void)corr;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    for (int64_t b = 0; b < nb; b++) {
        /* |w| * (x with w's sign): unsigned by signed, as vpmaddubsw takes them; 2 * 128 * 127 fits int16 */
        prefetch_ahead(qr + b * 32);
        __m256i w = _mm256_loadu_si256((const __m256i*)(qr + b * 32));
        __m256i x = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(xq + b * 32)), w);
        __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), x), ones);
        __m256 scale = _mm256_mul_ps(_mm256_set1_ps(sr[b / bpg]), _mm256_loadu_ps(dq8 + b * 8));
        if (b & 1) acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc1);
        else acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc0);
    }
    return hsum(_mm256_add_ps(acc0, acc1));
}
#else
static inline float int8_q8_dot_bpg(const int8_t* qr, const float* sr, const int8_t* xq, const float* dq8,
                                    const int32_t* corr, int64_t nb, int64_t bpg) {
    (void)corr;
    float a = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        int32_t dot = 0;
        for (int t = 0; t < 32; t++) dot += qr[b * 32 + t] * xq[b * 32 + t];
        a += sr[b / bpg] * dq8[b * 8] * (float)dot;
    }
    return a;
}
#endif

static inline float int8_q8_dot(const int8_t* qr, const float* sr, const int8_t* xq, const float* dq8,
                                const int32_t* corr, int64_t nb, int64_t bpg) {
#define INT8_Q8_CALL(B) int8_q8_dot_bpg(qr, sr, xq, dq8, corr, nb, B)
    Q8_BPG_DISPATCH(INT8_Q8_CALL)
#undef INT8_Q8_CALL
}

/* Rows [0, R) of y (stride n) at one int8 weight row; xq, dq8, corr as quantize_q8_plain wrote them. */
static inline void int8_q8_block(const int8_t* xq, const float* dq8, const int32_t* corr, const int8_t* qr,
                                 const float* sr, float* y, int64_t n, int64_t k, int64_t g, int64_t R) {
    for (int64_t r = 0; r < R; r++)
        y[r * n] = int8_q8_dot(qr, sr, xq + r * k, dq8 + r * (k / 4), corr + r * (k / 4), k / 32, g / 32);
}

/* The bytes of scratch quantize_q8_plain needs for m rows of k (xq, dq8, corr). */
static inline int64_t q8_plain_scratch_bytes(int64_t m, int64_t k) { return 3 * m * k; }

/* The bytes of scratch quantize_q8 needs for m rows of k. */
static inline int64_t q8_scratch_bytes(int64_t m, int64_t k) { return m * k + 4 * (m * (k / 8) + m * (k / 32)); }
#endif
