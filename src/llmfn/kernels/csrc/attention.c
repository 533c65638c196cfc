/* Encoder attention on CPU (Python side and why: kernels/cpu_attention.py), with the GEMM that
   attention_block runs around it. */
#include "simd.h"
#include "gemm.h"
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

/* the attention tile: TR query rows x TC keys (scores) or value columns; the GEMM has its own MR x NR */
#define TR 6
#define TC 16


/* out[r * ldo + c] = sum over k of a[r * ar + k * ak] * b[k * bk + c], k ascending, (+ bias[c]);
   r < 6, c < 16. With a bias (the scores' key mask), each row's running maximum rmax[r] (8 lanes)
   takes in the new scores too, so the softmax needs no pass of its own for it. */
static inline void tile(const float* a, int64_t ar, int64_t ak, const float* b, int64_t bk, int64_t kn,
                        float* out, int64_t ldo, const float* bias, float rmax[TR][8]) {
#ifdef __AVX2__
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
           c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    const float *a0 = a, *a1 = a + ar, *a2 = a + 2 * ar, *a3 = a + 3 * ar, *a4 = a + 4 * ar, *a5 = a + 5 * ar;
    for (int64_t k = 0, ko = 0; k < kn; k++, ko += ak, b += bk) {
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8), av;
        av = _mm256_broadcast_ss(a0 + ko); c00 = _mm256_fmadd_ps(av, b0, c00); c01 = _mm256_fmadd_ps(av, b1, c01);
        av = _mm256_broadcast_ss(a1 + ko); c10 = _mm256_fmadd_ps(av, b0, c10); c11 = _mm256_fmadd_ps(av, b1, c11);
        av = _mm256_broadcast_ss(a2 + ko); c20 = _mm256_fmadd_ps(av, b0, c20); c21 = _mm256_fmadd_ps(av, b1, c21);
        av = _mm256_broadcast_ss(a3 + ko); c30 = _mm256_fmadd_ps(av, b0, c30); c31 = _mm256_fmadd_ps(av, b1, c31);
        av = _mm256_broadcast_ss(a4 + ko); c40 = _mm256_fmadd_ps(av, b0, c40); c41 = _mm256_fmadd_ps(av, b1, c41);
        av = _mm256_broadcast_ss(a5 + ko); c50 = _mm256_fmadd_ps(av, b0, c50); c51 = _mm256_fmadd_ps(av, b1, c51);
    }
    __m256 all[TR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    for (int r = 0; r < TR; r++) {
        __m256 v0 = all[r][0], v1 = all[r][1];
        if (bias) {
            v0 = _mm256_add_ps(v0, _mm256_loadu_ps(bias));
            v1 = _mm256_add_ps(v1, _mm256_loadu_ps(bias + 8));
            _mm256_storeu_ps(rmax[r], _mm256_max_ps(_mm256_loadu_ps(rmax[r]), _mm256_max_ps(v0, v1)));
        }
        _mm256_storeu_ps(out + r * ldo, v0);
        _mm256_storeu_ps(out + r * ldo + 8, v1);
    }
#else  /* without FMA each product would round twice: sum in double instead */
    double sum[TR][TC] = {{0.0}};
    for (int64_t k = 0; k < kn; k++, b += bk)
        for (int r = 0; r < TR; r++)
            for (int c = 0; c < TC; c++) sum[r][c] += (double)a[r * ar + k * ak] * b[c];
    for (int r = 0; r < TR; r++)
        for (int c = 0; c < TC; c++) {
            float v = (float)sum[r][c] + (bias ? bias[c] : 0.0f);
            if (bias && v > rmax[r][c % 8]) rmax[r][c % 8] = v;
            out[r * ldo + c] = v;
        }
#endif
}

/* s[0..tp) = exp(s - m), masked keys (-inf) giving 0; returns the sum (0: all masked, m = -inf).
   tp is a multiple of 8. */
static float softmax_row(float* s, float m, int64_t tp) {
    if (m == -INFINITY) { memset(s, 0, sizeof(float) * tp); return 0.0f; }
    int64_t j = 0;
    float sum = 0.0f;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps(), mv = _mm256_set1_ps(m);
    for (; j < tp; j += 8) {  /* exp8(-inf) is exactly 0 (simd.h) */
        __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
        _mm256_storeu_ps(s + j, p);
        acc = _mm256_add_ps(acc, p);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    for (int l = 0; l < 8; l++) sum += lanes[l];
#endif
    for (; j < tp; j++) { s[j] = expf(s[j] - m); sum += s[j]; }
    return sum;
}

/* Scratch floats for one head: keys transposed in 16-key panels [tp / 16][hd][16], values [tp][hp],
   6 query rows k-major [hd][6], scores [6][tp], key bias [tp] (0 or -inf). */
static size_t head_scratch(int64_t t, int64_t hd) {
    int64_t tp = (t + TC - 1) / TC * TC, hp = (hd + TC - 1) / TC * TC;
    return (size_t)(tp * hd + tp * hp + hd * TR + TR * tp + tp);
}

/* One (sequence, head): out[i * ldo + c] = softmax(q_i k^T * scale, keys where mask) v, for the
   sequence's t rows of q, k, v at base, base + d, base + 2 * d (row stride ld = 3 * d); mask [t]
   (nonzero = attend) or NULL; buf: head_scratch(t, hd) floats. */
static void attend_head(const float* base, int64_t ld, int64_t d, const uint8_t* mask, float* out, int64_t ldo,
                        int64_t t, int64_t hd, float scale, float* buf) {
    int64_t tp = (t + TC - 1) / TC * TC, t8 = (t + 7) / 8 * 8, hp = (hd + TC - 1) / TC * TC;
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
        float rmax[TR][8];
        for (int r = 0; r < TR; r++)
            for (int l = 0; l < 8; l++) rmax[r][l] = -INFINITY;
        for (int64_t jp = 0; jp < tp / TC; jp++)
            tile(qb, 1, TR, kt + jp * hd * TC, TC, hd, s + jp * TC, tp, bias + jp * TC, rmax);
        /* keys from t8 on are padding (weight 0): the softmax and the values stop there */
        float inv[TR];
        for (int r = 0; r < rows; r++) {
            float m = -INFINITY;
            for (int l = 0; l < 8; l++) m = rmax[r][l] > m ? rmax[r][l] : m;
            float sum = softmax_row(s + r * tp, m, t8);
            inv[r] = sum > 0.0f ? 1.0f / sum : 0.0f;
        }
        for (int r = rows; r < TR; r++) memset(s + r * tp, 0, sizeof(float) * t8);
        float acc[TR][TC];
        for (int64_t c0 = 0; c0 < hd; c0 += TC) {
            tile(s, tp, 1, vp + c0, hp, t8, acc[0], TC, NULL, NULL);
            int cols = hd - c0 < TC ? (int)(hd - c0) : TC;
            for (int r = 0; r < rows; r++) {
                float* o = out + (i0 + r) * ldo + c0;
                for (int c = 0; c < cols; c++) o[c] = acc[r][c] * inv[r];
            }
        }
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

/* A post-LN encoder layer's attention half, `group` sequences per task (their [group * t, 3d] projection
   and attention output stay in the thread's cache): y [b, t, d] = norm(attention(x @ wqkv.T + bqkv) @
   wo.T + bo + x), wqkv [3d, d] and wo [d, d] packed by llmfn_gemm_pack, bqkv / bo / ln_w NULL or
   given, mask as llmfn_encoder_attention's. Bitwise the result of llmfn_gemm, llmfn_encoder_attention
   and llmfn_gemm in turn. Returns -1 when scratch memory cannot be allocated. */
int llmfn_encoder_attention_block(const float* x, const float* wqkv, const float* bqkv, const float* wo,
                                  const float* bo, const uint8_t* mask, float* y, int64_t b, int64_t t, int64_t h,
                                  int64_t hd, int64_t group, float scale, const float* ln_w, const float* ln_b,
                                  float eps, int nthreads) {
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
            int64_t b0 = task * group, nb = b - b0 < group ? b - b0 : group, rows = nb * t, row0 = b0 * t;
            float *a = qkv + rows * 3 * d, *scratch = a + rows * d;
            gemm_rows(x + row0 * d, wqkv, 3 * d, d, qkv, 0, rows, &e_qkv, xp);
            for (int64_t s = 0; s < nb; s++)
                for (int64_t hi = 0; hi < h; hi++)
                    attend_head(qkv + s * t * 3 * d + hi * hd, 3 * d, d, mask ? mask + (b0 + s) * t : NULL,
                                a + s * t * d + hi * hd, d, t, hd, scale, scratch);
            gemm_rows(a, wo, d, d, y + row0 * d, row0, rows, &e_out, xp);
            if (ln_w) layer_norm_rows(y, d, row0, row0 + rows, ln_w, ln_b, eps);
        }
        free(xp);
        free(qkv);
    }
    return failed ? -1 : 0;
}
