/* The AVX-512 group-32 kernels of quant.h (GGUF Q4 / Q8_0, llmfn's default group): one weight row
   against up to QUANT_PASS_ROWS activation rows, and two weight rows against one (decode). Included
   by quant.h inside its AVX-512 part, after the AVX2 code and row_f32 / prefetch_ahead it uses;
   ztile.h, included next, uses the dequantizers here. */
#ifndef LLMFN_ZROWS_H
#define LLMFN_ZROWS_H

/* AVX-512, groups of 32: a group's 16 bytes widen to 16 int32 lanes in one instruction, whose low
   nibbles are the group's 16 even weights and high nibbles its 16 odd ones (prep4's order of x).
   The group is dequantized once, w = q * s + o (one FMA per 16 weights), and shared by up to
   QUANT_PASS_ROWS activation rows, each of which then costs two FMAs a group (the AVX2 kernel: six
   operations a row and group, and the unpacking shared by at most 4 rows). Each row keeps two running
   sums (even / odd lanes) whatever the number of rows in its pass: batch-invariant. */
#define QUANT_PASS_ROWS 8
/* The 16 values a nibble can stand for, q * s + o for q = 0..15 (one FMA), then each weight picked
   from them by its nibble: vpermps reads only an index's low 4 bits, so the low nibbles index the
   bytes as they are and the high ones after a shift. The same bits as fma(float(q), s, o) per
   weight, in 7 instructions a group instead of 9. */
static inline void dequant32_z(const uint8_t* qb, float s, float o, __m512* even, __m512* odd) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)qb));
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 values = _mm512_fmadd_ps(iota, _mm512_set1_ps(s), _mm512_set1_ps(o));
    *even = _mm512_permutexvar_ps(b, values);
    *odd = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), values);
}
#define INT4_Z(NAME, R)                                                                                 \
static inline void NAME(const float* xp, const uint8_t* qr, const float* sr, const float* orow,         \
                        float* y, int64_t n, int64_t k, int64_t G) {                                    \
    __m512 ae[R], ao[R], we, wo;                                                                        \
    for (int r = 0; r < R; r++) ae[r] = ao[r] = _mm512_setzero_ps();                                   \
    for (int64_t gi = 0; gi < G; gi++) {                                                               \
        prefetch_ahead(qr + gi * 16);                                                                   \
        dequant32_z(qr + gi * 16, sr[gi], orow[gi], &we, &wo);                                          \
        for (int r = 0; r < R; r++) {                                                                   \
            const float* p = xp + r * k + gi * 32;                                                      \
            ae[r] = _mm512_fmadd_ps(we, _mm512_loadu_ps(p), ae[r]);                                    \
            ao[r] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(p + 16), ao[r]);                               \
        }                                                                                               \
    }                                                                                                   \
    for (int r = 0; r < R; r++) y[r * n] = _mm512_reduce_add_ps(_mm512_add_ps(ae[r], ao[r]));          \
}
INT4_Z(int4_z_r1, 1) INT4_Z(int4_z_r2, 2) INT4_Z(int4_z_r3, 3) INT4_Z(int4_z_r4, 4)
INT4_Z(int4_z_r5, 5) INT4_Z(int4_z_r6, 6) INT4_Z(int4_z_r7, 7) INT4_Z(int4_z_r8, 8)

/* int8 groups of 32 (GGUF Q8_0) the same way: w = q * s once a group, two FMAs a row. Groups of 16
   (GGUF Q6_K) too, each half of a 32 with its own scale: sub = 1 takes sr[2 gi] and sr[2 gi + 1], sub
   = 0 sr[gi] for both (G counts 32s either way). */
static inline int int8_z_takes(int64_t g, int64_t k) { return g == 32 || int8_g16_takes(g, k); }
static inline void dequant8x32_z(const int8_t* qb, float s_lo, float s_hi, __m512* lo, __m512* hi) {
    *lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)qb))), _mm512_set1_ps(s_lo));
    *hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(qb + 16)))),
                        _mm512_set1_ps(s_hi));
}
#define INT8_Z(NAME, R)                                                                                 \
static inline void NAME(const float* x, const int8_t* qr, const float* sr, float* y,                   \
                        int64_t n, int64_t k, int64_t G, int sub) {                                     \
    __m512 al[R], ah[R], wl, wh;                                                                        \
    for (int r = 0; r < R; r++) al[r] = ah[r] = _mm512_setzero_ps();                                   \
    for (int64_t gi = 0; gi < G; gi++) {                                                               \
        prefetch_ahead(qr + gi * 32);                                                                   \
        dequant8x32_z(qr + gi * 32, sr[gi << sub], sr[(gi << sub) + sub], &wl, &wh);                    \
        for (int r = 0; r < R; r++) {                                                                   \
            const float* p = x + r * k + gi * 32;                                                       \
            al[r] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(p), al[r]);                                    \
            ah[r] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(p + 16), ah[r]);                               \
        }                                                                                               \
    }                                                                                                   \
    for (int r = 0; r < R; r++) y[r * n] = _mm512_reduce_add_ps(_mm512_add_ps(al[r], ah[r]));          \
}
INT8_Z(int8_z_r1, 1) INT8_Z(int8_z_r2, 2) INT8_Z(int8_z_r3, 3) INT8_Z(int8_z_r4, 4)
INT8_Z(int8_z_r5, 5) INT8_Z(int8_z_r6, 6) INT8_Z(int8_z_r7, 7) INT8_Z(int8_z_r8, 8)

/* Two weight rows against one activation row (decode), each row int4_z_r1's arithmetic. */
static inline void int4_z_r1x2(const float* xp, const float* xs, const uint8_t* qa, const uint8_t* qb,
                               const float* sa, const float* sb, const float* oa, const float* ob,
                               float* ya, float* yb, int64_t G) {
    (void)xs;
    __m512 aae = _mm512_setzero_ps(), aao = aae, abe = aae, abo = aae, wae, wao, wbe, wbo;
    for (int64_t gi = 0; gi < G; gi++) {
        prefetch_ahead(qa + gi * 16);
        prefetch_ahead(qb + gi * 16);
        dequant32_z(qa + gi * 16, sa[gi], oa[gi], &wae, &wao);
        dequant32_z(qb + gi * 16, sb[gi], ob[gi], &wbe, &wbo);
        const __m512 xe = _mm512_loadu_ps(xp + gi * 32), xo = _mm512_loadu_ps(xp + gi * 32 + 16);
        aae = _mm512_fmadd_ps(wae, xe, aae);
        aao = _mm512_fmadd_ps(wao, xo, aao);
        abe = _mm512_fmadd_ps(wbe, xe, abe);
        abo = _mm512_fmadd_ps(wbo, xo, abo);
    }
    *ya = _mm512_reduce_add_ps(_mm512_add_ps(aae, aao));
    *yb = _mm512_reduce_add_ps(_mm512_add_ps(abe, abo));
}
#define int4_g32_decode_pair int4_z_r1x2
/* Two int8 weight rows against one activation row (decode), each row int8_z_r1's arithmetic: a row's
   two FMA chains each wait on their own last sum (4 cycles a group), two rows keep four in flight
   (SmolLM2's Q8_0 lm_head, weights from memory, 2 threads: 1.28-1.48 -> 1.19-1.39 ms a row). */
static inline void int8_z_r1x2(const float* x, const int8_t* qa, const int8_t* qb, const float* sa, const float* sb,
                               float* ya, float* yb, int64_t G, int sub) {
    __m512 aal = _mm512_setzero_ps(), aah = aal, abl = aal, abh = aal, wal, wah, wbl, wbh;
    for (int64_t gi = 0; gi < G; gi++) {
        prefetch_ahead(qa + gi * 32);
        prefetch_ahead(qb + gi * 32);
        dequant8x32_z(qa + gi * 32, sa[gi << sub], sa[(gi << sub) + sub], &wal, &wah);
        dequant8x32_z(qb + gi * 32, sb[gi << sub], sb[(gi << sub) + sub], &wbl, &wbh);
        const __m512 xl = _mm512_loadu_ps(x + gi * 32), xh = _mm512_loadu_ps(x + gi * 32 + 16);
        aal = _mm512_fmadd_ps(wal, xl, aal);
        aah = _mm512_fmadd_ps(wah, xh, aah);
        abl = _mm512_fmadd_ps(wbl, xl, abl);
        abh = _mm512_fmadd_ps(wbh, xh, abh);
    }
    *ya = _mm512_reduce_add_ps(_mm512_add_ps(aal, aah));
    *yb = _mm512_reduce_add_ps(_mm512_add_ps(abl, abh));
}
#define int8_g32_decode_pair int8_z_r1x2
#endif
