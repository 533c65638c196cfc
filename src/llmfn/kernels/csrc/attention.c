/* Encoder attention on CPU (Python side and why: kernels/cpu_attention.py), with the GEMM that
   attention_block runs around it. */
#include "simd.h"
#include "gemm.h"
#include "attn_tile.h"  /* tile, softmax_row, TR / TC / TP / LANES */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

/* Scratch floats for one head: keys transposed in 16-key panels [tp / 16][hd][16], values [tp][hp],
   TR query rows k-major [hd][TR], scores [TR][tp], key bias [tp] (0 or -inf). */
static size_t head_scratch(int64_t t, int64_t hd) {
    int64_t tp = (t + TC - 1) / TC * TC, hp = (hd + TC - 1) / TC * TC;
    return (size_t)(tp * hd + tp * hp + hd * TR + TR * tp + tp);
}

/* One (sequence, head): out[i * ldo + c] = softmax(q_i k^T * scale, keys where mask) v, for the
   sequence's t rows of q, k, v at base, base + d, base + 2 * d (row stride ld = 3 * d); mask [t]
   (nonzero = attend) or NULL; buf: head_scratch(t, hd) floats. */
static void attend_head(const float* base, int64_t ld, int64_t d, const uint8_t* mask, float* out, int64_t ldo,
                        int64_t t, int64_t hd, float scale, float* buf) {
    int64_t tp = (t + TC - 1) / TC * TC, tk = (t + LANES - 1) / LANES * LANES, hp = (hd + TC - 1) / TC * TC;
    float *kt = buf, *vp = kt + tp * hd, *qb = vp + tp * hp, *s = qb + hd * TR, *bias = s + TR * tp;
    memset(vp, 0, sizeof(float) * tp * hp);
    for (int64_t j = 0; j < tp; j++) {
        /* rows are 3 * h * hd floats apart: the hardware prefetcher misses them, so fetch the
           k and v rows a few ahead and this row's q (read again per query block) now */
        for (int64_t c = 0; j + 4 < t && c < hd; c += 16) {
            __builtin_prefetch(base + (j + 4) * ld + d + c);
            __builtin_prefetch(base + (j + 4) * ld + 2 * d + c);
        }
        for (int64_t c = 0; j < t && c < hd; c += 16) __builtin_prefetch(base + j * ld + c);
        bias[j] = j < t && (!mask || mask[j]) ? 0.0f : -INFINITY;
        float* ktj = kt + (j / TC) * hd * TC + j % TC;
        if (j >= t) { for (int64_t c = 0; c < hd; c++) ktj[c * TC] = 0.0f; continue; }
        const float* kr = base + j * ld + d;
        for (int64_t c = 0; c < hd; c++) ktj[c * TC] = kr[c];
        memcpy(vp + j * hp, kr + d, sizeof(float) * hd);
    }
    for (int64_t i0 = 0; i0 < t; i0 += TR) {
        int rows = t - i0 < TR ? (int)(t - i0) : TR;
        for (int r = 0; r < TR; r++)
            for (int64_t c = 0; c < hd; c++) qb[c * TR + r] = r < rows ? base[(i0 + r) * ld + c] * scale : 0.0f;
        float rmax[TR][LANES];
        for (int r = 0; r < TR; r++)
            for (int l = 0; l < LANES; l++) rmax[r][l] = -INFINITY;
        for (int64_t jp = 0; jp < tp / TC; jp += TP) {
            int panels = tp / TC - jp < TP ? (int)(tp / TC - jp) : TP;
            tile(qb, 1, TR, kt + jp * hd * TC, hd * TC, panels, TC, hd, s + jp * TC, tp, bias + jp * TC, rmax);
        }
        /* keys from tk on are padding (weight 0): the softmax and the values stop there */
        float inv[TR];
        for (int r = 0; r < rows; r++) {
            float m = -INFINITY;
            for (int l = 0; l < LANES; l++) m = rmax[r][l] > m ? rmax[r][l] : m;
            float sum = softmax_row(s + r * tp, m, tk);
            inv[r] = sum > 0.0f ? 1.0f / sum : 0.0f;
        }
        for (int r = rows; r < TR; r++) memset(s + r * tp, 0, sizeof(float) * tk);
        weigh_values(s, tp, vp, hp, hd, tk, rows, inv, out + i0 * ldo, ldo);
    }
}

/* out [b, t, h * hd] = softmax(q k^T * scale, keys where mask) v per sequence and head, with q, k, v
   the three [h * hd] thirds of qkv [b, t, 3 * h * hd]; mask [b, t] (nonzero = attend) or NULL.
   Returns -1 when scratch memory cannot be allocated. */
int llmfn_encoder_attention(const float* qkv, const uint8_t* mask, float* out, int64_t b, int64_t t, int64_t h,
                            int64_t hd, float scale, int nthreads) {
    int64_t d = h * hd, ld = 3 * d;
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        float* buf = aligned_alloc(64, (sizeof(float) * head_scratch(t, hd) + 63) / 64 * 64);
        if (!buf) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < b * h; task++) {
            if (!buf) continue;
            int64_t bi = task / h, hi = task % h;
            attend_head(qkv + bi * t * ld + hi * hd, ld, d, mask ? mask + bi * t : NULL, out + bi * t * d + hi * hd, d,
                        t, hd, scale, buf);
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

/* y [rows, n] = epilogue(x [rows, k] @ w.T) on this thread, in row blocks of at most MC rows as equal
   as 6-row panels allow (x, y contiguous; row0: the first row's index for the epilogue's residual). */
static void gemm_rows(const float* x, const float* packed, int64_t n, int64_t k, float* y, int64_t row0,
                      int64_t rows, const Epilogue* e, float* xp) {
    int64_t blocks = row_blocks(rows, 1);
    for (int64_t ib = 0; ib < blocks; ib++) {
        int64_t i0 = first_row(ib, rows, blocks), mc = first_row(ib + 1, rows, blocks) - i0;
        gemm_block(x + i0 * k, k, packed, n, k, y + i0 * n, n, row0 + i0, mc, 0, (n + NR - 1) / NR, e, xp);
    }
}

/* A post-LN encoder layer's attention half, `group` sequences per task (their rows' [rows, 3d] projection
   and attention output stay in the thread's cache): y = norm(attention(x @ wqkv.T + bqkv) @ wo.T + bo + x)
   for x [rows, d], wqkv [3d, d] and wo [d, d] packed by llmfn_gemm_pack, bqkv / bo / ln_w NULL or given.
   Sequence s holds rows starts[s] .. starts[s + 1] - 1 and attends to them all (mask NULL), or, with
   starts NULL, rows s * t .. s * t + t - 1 and the keys where mask [b, t] is nonzero (mask NULL: all).
   Bitwise the result of llmfn_gemm, llmfn_encoder_attention and llmfn_gemm in turn. Returns -1 when
   scratch memory cannot be allocated. */
/* The first row of sequence s: starts[s] when packed, else s * t. */
static inline int64_t seq_row(const int64_t* starts, int64_t s, int64_t t) { return starts ? starts[s] : s * t; }

static int attention_half(const float* x, const float* wqkv, const float* bqkv, const float* wo, const float* bo,
                          const uint8_t* mask, const int64_t* starts, float* y, int64_t b, int64_t t, int64_t h,
                          int64_t hd, int64_t group, float scale, const float* ln_w, const float* ln_b, float eps,
                          int nthreads) {
    int64_t d = h * hd;
    if (b <= 0 || t <= 0 || d <= 0) return 0;
    if (group < 1) group = 1;
    if (group > b) group = b;
    Epilogue e_qkv = {bqkv, NULL, 0, ACT_NONE}, e_out = {bo, x, d, ACT_NONE};
    int64_t tasks = (b + group - 1) / group;
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        float* xp = aligned_alloc(64, sizeof(float) * MC * KC);
        float* qkv = aligned_alloc(64, (sizeof(float) * (group * t * 4 * d + head_scratch(t, hd)) + 63) / 64 * 64);
        if (!xp || !qkv) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < tasks; task++) {
            if (!xp || !qkv) continue;
            int64_t b0 = task * group, nb = b - b0 < group ? b - b0 : group;
            int64_t row0 = seq_row(starts, b0, t), rows = seq_row(starts, b0 + nb, t) - row0;
            float *a = qkv + rows * 3 * d, *scratch = a + rows * d;
            gemm_rows(x + row0 * d, wqkv, 3 * d, d, qkv, 0, rows, &e_qkv, xp);
            for (int64_t s = 0; s < nb; s++) {
                int64_t r = seq_row(starts, b0 + s, t) - row0, ts = seq_row(starts, b0 + s + 1, t) - row0 - r;
                for (int64_t hi = 0; hi < h; hi++)
                    attend_head(qkv + r * 3 * d + hi * hd, 3 * d, d, mask ? mask + (b0 + s) * t : NULL,
                                a + r * d + hi * hd, d, ts, hd, scale, scratch);
            }
            gemm_rows(a, wo, d, d, y + row0 * d, row0, rows, &e_out, xp);
            if (ln_w) layer_norm_rows(y, d, row0, row0 + rows, ln_w, ln_b, eps);
        }
        free(xp);
        free(qkv);
    }
    return failed ? -1 : 0;
}

/* The attention half for x, y [b, t, d] (padded sequences, mask [b, t] or NULL). */
int llmfn_encoder_attention_block(const float* x, const float* wqkv, const float* bqkv, const float* wo,
                                  const float* bo, const uint8_t* mask, float* y, int64_t b, int64_t t, int64_t h,
                                  int64_t hd, int64_t group, float scale, const float* ln_w, const float* ln_b,
                                  float eps, int nthreads) {
    return attention_half(x, wqkv, bqkv, wo, bo, mask, NULL, y, b, t, h, hd, group, scale, ln_w, ln_b, eps, nthreads);
}

/* The attention half for b sequences packed without padding: x, y [starts[b], d], sequence s in rows
   starts[s] .. starts[s + 1] - 1, none longer than t. */
int llmfn_encoder_attention_block_packed(const float* x, const float* wqkv, const float* bqkv, const float* wo,
                                         const float* bo, const int64_t* starts, float* y, int64_t b, int64_t t,
                                         int64_t h, int64_t hd, int64_t group, float scale, const float* ln_w,
                                         const float* ln_b, float eps, int nthreads) {
    return attention_half(x, wqkv, bqkv, wo, bo, NULL, starts, y, b, t, h, hd, group, scale, ln_w, ln_b, eps,
                          nthreads);
}
