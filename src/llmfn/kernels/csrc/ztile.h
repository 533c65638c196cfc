/* Group-32 int4 / int8 weights against several fp32 activation rows on AVX-512 (batched decode,
   prefill): weight rows are dequantized once into a buffer (ZT_NB at a time, in L1 / L2), then tiles
   of ZT_W weight rows x ZT_R activation rows take each loaded vector into 3-4 FMAs. int4_z_rR and
   int8_z_rR (quant.h) load an activation vector for every FMA, and a core of the AVX-512 Xeon
   sustains about one 512-bit load from L1 a cycle: they ran at 32% of its two FMAs a cycle.
   Each output is int4_z_r1's / int8_z_r1's arithmetic: the same dequantized values, the same two
   16-lane accumulators summed over the groups in order, the same final sum. So a row's results do
   not depend on which kernel or tile computed it (batch invariance, fused == op by op).
   End to end (2 threads): SmolLM2 Q4_1 prefill of 32 / 64 tokens 450 / 474 -> 567 / 663 tok/s; its
   16-row decode step only ~3-5% (28.5 ms), whose 66 MB of weights come from memory each step.
   Included by quant.h inside its AVX-512 part (uses dequant32_z, dequant8x32_z and row_f32). */
#ifndef LLMFN_ZTILE_H
#define LLMFN_ZTILE_H

#define ZT_W 3
#define ZT_R 4
#define ZT_NB 6          /* most weight rows dequantized at a time: a multiple of ZT_W */
/* Whether m activation rows take the tiles: fewer keep the kernels of quant.h. SmolLM2, one thread,
   before -> after: int4 gate / up 8 rows 380 -> 328 us, but its down projection 167 -> 211; 12 rows
   537 -> 462 and 311 -> 257, 16 rows 1.18x / 1.28x, 32-64 rows 1.4-1.6x. The Q8_0 lm_head [49152,
   576] only from 16 rows (12 rows 8723 -> 9309 us, 16 rows equal, 32 rows 29.7 -> 20.4 ms). */
static inline int zt_takes(int bits, int64_t m) { return m >= (bits == 4 ? 12 : 16); }

/* Weight rows dequantized at a time for rows of k: ZT_NB while they fit 16 KiB (L1 keeps them
   beside the activation rows), else one tile's (SmolLM2's down, k = 1536: 4 activation rows 89 us
   with 3 rows a block, 138 with 6). */
static inline int64_t zt_block(int64_t k) { return (int64_t)sizeof(float) * ZT_NB * k <= 16384 ? ZT_NB : ZT_W; }

/* Activation rows the tiles read: m rounded up to ZT_R (the rows past m zero, their outputs unused). */
static inline int64_t zt_rows(int64_t m) { return (m + ZT_R - 1) / ZT_R * ZT_R; }

/* out[w][r] = row r of x (prep4 order for int4, as it is for int8) . weight row w of wb. */
static inline __attribute__((always_inline)) void zt_tile(const float* x, int64_t k, const float* wb, int64_t G,
                                                         float out[ZT_W][ZT_R]) {
    __m512 ae[ZT_W][ZT_R], ao[ZT_W][ZT_R];
    for (int w = 0; w < ZT_W; w++)
        for (int r = 0; r < ZT_R; r++) ae[w][r] = ao[w][r] = _mm512_setzero_ps();
    for (int64_t gi = 0; gi < G; gi++) {
        __m512 we[ZT_W], wo[ZT_W];
        for (int w = 0; w < ZT_W; w++) {
            we[w] = _mm512_load_ps(wb + w * k + gi * 32);
            wo[w] = _mm512_load_ps(wb + w * k + gi * 32 + 16);
        }
        for (int r = 0; r < ZT_R; r++) {
            const __m512 xe = _mm512_loadu_ps(x + r * k + gi * 32), xo = _mm512_loadu_ps(x + r * k + gi * 32 + 16);
            for (int w = 0; w < ZT_W; w++) {
                ae[w][r] = _mm512_fmadd_ps(we[w], xe, ae[w][r]);
                ao[w][r] = _mm512_fmadd_ps(wo[w], xo, ao[w][r]);
            }
        }
    }
    for (int w = 0; w < ZT_W; w++)
        for (int r = 0; r < ZT_R; r++) out[w][r] = _mm512_reduce_add_ps(_mm512_add_ps(ae[w][r], ao[w][r]));
}

/* wb [nb, k] <- weight rows j0 .. j0 + nr - 1 dequantized as dequant32_z (bits 4: q * s + o, each
   group's 16 even then 16 odd weights) or dequant8x32_z (bits 8: q * s) give them; rows past nr zero. */
static void zt_dequant(int bits, const void* q, const void* s, const void* o, int half, int64_t j0, int64_t nr,
                       int64_t nb, int64_t k, float* wb) {
    int64_t G = k / 32;
    float sb[G], ob[G];
    for (int64_t jj = 0; jj < nb; jj++) {
        float* dst = wb + jj * k;
        if (jj >= nr) {
            memset(dst, 0, sizeof(float) * k);
            continue;
        }
        const float* sr = row_f32(s, half, j0 + jj, G, sb);
        const float* orow = bits == 4 ? row_f32(o, half, j0 + jj, G, ob) : NULL;
        const uint8_t* qrow = (const uint8_t*)q + (j0 + jj) * (k * bits / 8);
        for (int64_t gi = 0; gi < G; gi++) {
            __m512 a, b;
            const uint8_t* qg = qrow + gi * 4 * bits;  /* a group of 32: 16 bytes of int4, 32 of int8 */
            prefetch_ahead(qg);  /* the next block's bytes */
            if (bits == 4) dequant32_z(qg, sr[gi], orow[gi], &a, &b);
            else dequant8x32_z((const int8_t*)qg, sr[gi], sr[gi], &a, &b);
            _mm512_store_ps(dst + gi * 32, a);
            _mm512_store_ps(dst + gi * 32 + 16, b);
        }
    }
}

/* y [m, n] (+)= x @ W^T (+ bias) for weight rows [jlo, jhi), stored as lin_store does (bias NULL and
   add 0: plain y = x @ W^T). x: zt_rows(m) rows of k; wb: ZT_NB * k floats, 64-byte aligned.
   Callers split the weight rows between threads in blocks of zt_block(k). */
static void zt_rows_range(int bits, const float* x, int64_t m, const void* q, const void* s, const void* o, int half,
                          const float* bias, float* y, int add, int64_t n, int64_t k, int64_t jlo, int64_t jhi,
                          float* wb) {
    int64_t G = k / 32, nb = zt_block(k);
    for (int64_t j0 = jlo; j0 < jhi; j0 += nb) {
        int64_t nr = jhi - j0 < nb ? jhi - j0 : nb;
        zt_dequant(bits, q, s, o, half, j0, nr, nb, k, wb);
        for (int64_t i0 = 0; i0 < m; i0 += ZT_R)
            for (int64_t jw = 0; jw < nr; jw += ZT_W) {
                float out[ZT_W][ZT_R];
                zt_tile(x + i0 * k, k, wb + jw * k, G, out);
                for (int w = 0; w < ZT_W && jw + w < nr; w++)
                    for (int r = 0; r < ZT_R && i0 + r < m; r++)
                        lin_store(y + (i0 + r) * n + j0 + jw + w, out[w][r], bias, j0 + jw + w, add);
            }
    }
}

/* xp [zt_rows(m), k] <- x [m, k] as the tiles read it (int4: reordered by prep4, its group sums at
   xp + zt_rows(m) * k; int8: as it is), the rows past m zero. */
static void zt_prepare(int bits, const float* x, float* xp, int64_t m, int64_t k) {
    int64_t mp = zt_rows(m);
    if (bits == 4) prep4(x, xp, xp + mp * k, m, k, 32);
    else memcpy(xp, x, sizeof(float) * m * k);
    memset(xp + m * k, 0, sizeof(float) * (mp - m) * k);
}

/* llmfn_int4_linear / llmfn_int8_linear's fp32-activation product on the tiles (zt_takes(bits, m),
   g == 32): x [m, k] as given (int4: reordered here as prep4 does). Returns -1 out of memory. */
static int zt_linear(int bits, const float* x, const void* q, const void* s, const void* o, int half, float* y,
                     int64_t m, int64_t n, int64_t k, int nthreads) {
    int64_t mp = zt_rows(m), G = k / 32;
    float* xp = (float*)scratch(sizeof(float) * (mp * k + m * G));
    if (!xp) return -1;
    zt_prepare(bits, x, xp, m, k);
    int64_t nb = zt_block(k), blocks = (n + nb - 1) / nb;
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        float* wb = (float*)scratch(sizeof(float) * ZT_NB * k);
        if (!wb) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++)
            if (wb) zt_rows_range(bits, xp, m, q, s, o, half, NULL, y, 0, n, k, b * nb, (b + 1) * nb < n ? (b + 1) * nb : n,
                                  wb);
        free(wb);
    }
    free(xp);
    return failed ? -1 : 0;
}
#endif
