/* The fp32 GEMM with its fused write-back (Python side and why: kernels/cpu_gemm.py). Compiled alone
   by gemm.c and into attention.c's library, whose attention_block runs its products. */
#ifndef LLMFN_GEMM_H
#define LLMFN_GEMM_H
#if !defined(MR) || !defined(NR) || !defined(KC) || !defined(MC)
#error "MR, NR, KC and MC are set in kernels/cpu_gemm.py (passed as -D by cbuild)"
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

enum { ACT_NONE = 0, ACT_GELU = 1, ACT_RELU = 2 };

/* erf as a rational function of x, clamped to [-4, 4] (Eigen's fast erf: a few ulp; erf(4) rounds to
   1 in fp32). The GELU built on it is within 1.5e-6 + 1e-6 * |gelu| of the exact one (the tests check
   2M points; torch's fp32 GELU: 4e-7): a few ulp of erf near -1, times |x| <= 6. */
static inline float erf1(float x) {
    x = x < -4.0f ? -4.0f : (x > 4.0f ? 4.0f : x);
    float x2 = x * x;
    float p = -2.72614225801306e-10f;
    p = p * x2 + 2.77068142495902e-08f;
    p = p * x2 - 2.10102402082508e-06f;
    p = p * x2 - 5.69250639462346e-05f;
    p = p * x2 - 7.34990630326855e-04f;
    p = p * x2 - 2.95459980854025e-03f;
    p = p * x2 - 1.60960333262415e-02f;
    float q = -1.45660718464996e-05f;
    q = q * x2 - 2.13374055278905e-04f;
    q = q * x2 - 1.68282697438203e-03f;
    q = q * x2 - 7.37332916720468e-03f;
    q = q * x2 - 1.42647390514189e-02f;
    return x * p / q;
}

static inline float act1(float v, int act) {
    if (act == ACT_GELU) return 0.5f * v * (1.0f + erf1(v * 0.70710678118654752f));
    if (act == ACT_RELU) return v > 0.0f ? v : 0.0f;
    return v;
}

#ifdef __AVX2__
static inline __m256 erf8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-4.0f)), _mm256_set1_ps(4.0f));
    __m256 x2 = _mm256_mul_ps(x, x);
    __m256 p = _mm256_set1_ps(-2.72614225801306e-10f);
    p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(2.77068142495902e-08f));
    p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-2.10102402082508e-06f));
    p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-5.69250639462346e-05f));
    p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-7.34990630326855e-04f));
    p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-2.95459980854025e-03f));
    p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-1.60960333262415e-02f));
    __m256 q = _mm256_set1_ps(-1.45660718464996e-05f);
    q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-2.13374055278905e-04f));
    q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-1.68282697438203e-03f));
    q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-7.37332916720468e-03f));
    q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-1.42647390514189e-02f));
    return _mm256_div_ps(_mm256_mul_ps(x, p), q);
}

static inline __m256 act8(__m256 v, int act) {
    if (act == ACT_GELU) {
        __m256 e = erf8(_mm256_mul_ps(v, _mm256_set1_ps(0.70710678118654752f)));
        return _mm256_mul_ps(_mm256_mul_ps(v, _mm256_set1_ps(0.5f)), _mm256_add_ps(e, _mm256_set1_ps(1.0f)));
    }
    if (act == ACT_RELU) return _mm256_max_ps(v, _mm256_setzero_ps());
    return v;
}
#endif

#ifdef __AVX512F__
/* erf8 / act8 on 16 lanes: the same operations in the same order, so the same bits per element. */
static inline __m512 erf16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-4.0f)), _mm512_set1_ps(4.0f));
    __m512 x2 = _mm512_mul_ps(x, x);
    __m512 p = _mm512_set1_ps(-2.72614225801306e-10f);
    p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(2.77068142495902e-08f));
    p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-2.10102402082508e-06f));
    p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-5.69250639462346e-05f));
    p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-7.34990630326855e-04f));
    p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-2.95459980854025e-03f));
    p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-1.60960333262415e-02f));
    __m512 q = _mm512_set1_ps(-1.45660718464996e-05f);
    q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(-2.13374055278905e-04f));
    q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(-1.68282697438203e-03f));
    q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(-7.37332916720468e-03f));
    q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(-1.42647390514189e-02f));
    return _mm512_div_ps(_mm512_mul_ps(x, p), q);
}

static inline __m512 act16(__m512 v, int act) {
    if (act == ACT_GELU) {
        __m512 e = erf16(_mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f)));
        return _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(0.5f)), _mm512_add_ps(e, _mm512_set1_ps(1.0f)));
    }
    if (act == ACT_RELU) return _mm512_max_ps(v, _mm512_setzero_ps());
    return v;
}
#endif

/* w [n, k] row-major -> packed: per KC block of k, per NR-column panel (zero-padded past n), kc x NR
   floats k-major. Size: k * ceil(n / NR) * NR floats. */
int llmfn_gemm_pack(const float* w, float* packed, int64_t n, int64_t k) {
    int64_t np = (n + NR - 1) / NR;
    for (int64_t p0 = 0; p0 < k; p0 += KC) {
        int64_t kc = k - p0 < KC ? k - p0 : KC;
        for (int64_t j = 0; j < np; j++) {
            float* dst = packed + p0 * np * NR + j * kc * NR;
            for (int64_t kk = 0; kk < kc; kk++)
                for (int c = 0; c < NR; c++) {
                    int64_t col = j * NR + c;
                    dst[kk * NR + c] = col < n ? w[col * k + p0 + kk] : 0.0f;
                }
        }
    }
    return 0;
}

/* rows [mc, kc] of x (stride ldx) -> MR-row panels, kc x MR floats k-major, zero-padded past mc. */
static void pack_rows(const float* x, int64_t ldx, float* dst, int64_t mc, int64_t kc) {
    for (int64_t i0 = 0; i0 < mc; i0 += MR, dst += MR * kc) {
        int rows = mc - i0 < MR ? (int)(mc - i0) : MR;
        for (int r = 0; r < MR; r++) {
            const float* src = x + (i0 + r) * ldx;
            for (int64_t kk = 0; kk < kc; kk++) dst[kk * MR + r] = r < rows ? src[kk] : 0.0f;
        }
    }
}

typedef struct { const float* bias; const float* res; int64_t ldr; int act; } Epilogue;

/* A micro-tile spans TP weight panels, TW = TP * NR columns: on AVX-512 two 16-column panels (MR x 32
   in 2 * MR zmm accumulators; MR <= 14 leaves registers for the two weight vectors), elsewhere one. The
   packed layout stays 16 columns wide on every level. */
#if defined(__AVX512F__)
#define TP 2
#if NR != 16 || MR > 14
#error "the AVX-512 micro-kernel is MR x 2 panels of 16, MR <= 14 (kernels/cpu_gemm.py)"
#endif
#else
#define TP 1
#if defined(__AVX2__) && (NR != 16 || MR != 6)
#error "the AVX2 micro-kernel is 6 x 16 (kernels/cpu_gemm.py)"
#endif
#endif
#define TW (TP * NR)

#if defined(__AVX512F__)
/* acc[MR][TW] (its first `rows` rows and panels * 16 columns) = a panel (kc x MR) times `panels` (1 or
   2) weight panels (kc x 16 each, the second at b + pstride); rows is MR or, for a few rows, MR / 2. */
static inline __attribute__((always_inline)) void micro_tile_512(const float* a, const float* b, int64_t pstride,
                                                                 int64_t kc, float acc[MR][TW], const int panels,
                                                                 const int rows) {
    __m512 c[MR][2];
    #pragma GCC unroll 16
    for (int r = 0; r < rows; r++) c[r][0] = c[r][1] = _mm512_setzero_ps();
    const float* b2 = b + pstride;
    for (int64_t kk = 0; kk < kc; kk++, a += MR, b += NR, b2 += NR) {
        __m512 b0 = _mm512_loadu_ps(b), b1 = panels == 2 ? _mm512_loadu_ps(b2) : b0;
        #pragma GCC unroll 16
        for (int r = 0; r < rows; r++) {
            __m512 av = _mm512_set1_ps(a[r]);
            c[r][0] = _mm512_fmadd_ps(av, b0, c[r][0]);
            if (panels == 2) c[r][1] = _mm512_fmadd_ps(av, b1, c[r][1]);
        }
    }
    #pragma GCC unroll 16
    for (int r = 0; r < rows; r++) {
        _mm512_storeu_ps(acc[r], c[r][0]);
        if (panels == 2) _mm512_storeu_ps(acc[r] + 16, c[r][1]);
    }
}
#endif

/* acc[MR][TW] (at least its first `rows` rows) = a panel (kc x MR) times `panels` <= TP weight panels
   (kc x NR each, pstride floats apart), each element one chain of FMAs in k order (without FMA,
   multiply then add): whatever the vector width or tile, the same bits per element. */
static inline void micro_tile(const float* a, const float* b, int64_t pstride, int panels, int rows, int64_t kc,
                              float acc[MR][TW]) {
#if defined(__AVX512F__)
    if (rows > MR / 2) {
        if (panels == 2) micro_tile_512(a, b, pstride, kc, acc, 2, MR);
        else micro_tile_512(a, b, pstride, kc, acc, 1, MR);
    } else {
        if (panels == 2) micro_tile_512(a, b, pstride, kc, acc, 2, MR / 2);
        else micro_tile_512(a, b, pstride, kc, acc, 1, MR / 2);
    }
#elif defined(__AVX2__)
    (void)pstride, (void)panels, (void)rows;
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
           c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int64_t kk = 0; kk < kc; kk++, a += MR, b += NR) {
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8), av;
        av = _mm256_broadcast_ss(a + 0); c00 = _mm256_fmadd_ps(av, b0, c00); c01 = _mm256_fmadd_ps(av, b1, c01);
        av = _mm256_broadcast_ss(a + 1); c10 = _mm256_fmadd_ps(av, b0, c10); c11 = _mm256_fmadd_ps(av, b1, c11);
        av = _mm256_broadcast_ss(a + 2); c20 = _mm256_fmadd_ps(av, b0, c20); c21 = _mm256_fmadd_ps(av, b1, c21);
        av = _mm256_broadcast_ss(a + 3); c30 = _mm256_fmadd_ps(av, b0, c30); c31 = _mm256_fmadd_ps(av, b1, c31);
        av = _mm256_broadcast_ss(a + 4); c40 = _mm256_fmadd_ps(av, b0, c40); c41 = _mm256_fmadd_ps(av, b1, c41);
        av = _mm256_broadcast_ss(a + 5); c50 = _mm256_fmadd_ps(av, b0, c50); c51 = _mm256_fmadd_ps(av, b1, c51);
    }
    __m256 all[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    for (int r = 0; r < MR; r++) { _mm256_storeu_ps(acc[r], all[r][0]); _mm256_storeu_ps(acc[r] + 8, all[r][1]); }
#else
    (void)rows;
    for (int p = 0; p < panels; p++, b += pstride) {
        const float* ak = a;
        const float* bk = b;
        for (int r = 0; r < MR; r++)
            for (int c = 0; c < NR; c++) acc[r][p * NR + c] = 0.0f;
        for (int64_t kk = 0; kk < kc; kk++, ak += MR, bk += NR)
            for (int r = 0; r < MR; r++)
                for (int c = 0; c < NR; c++) acc[r][p * NR + c] += ak[r] * bk[c];
    }
#endif
}

/* Adds acc to the [rows, cols] tile of y (stride ldy) or, on the first k block, stores it; on the
   last k block applies bias, activation and residual. Whole 16- (8-) float runs take the vector path. */
static inline void write_tile(float acc[MR][TW], float* y, int64_t ldy, int rows, int cols, int first, int last,
                              const Epilogue* e, int64_t row, int64_t col) {
    for (int r = 0; r < rows; r++) {
        float* yr = y + r * ldy;
        const float* res = e->res ? e->res + (row + r) * e->ldr + col : NULL;
        int c = 0;
#if defined(__AVX512F__)
            for (; c + 16 <= cols; c += 16) {
                __m512 v = _mm512_loadu_ps(acc[r] + c);
                if (!first) v = _mm512_add_ps(v, _mm512_loadu_ps(yr + c));
                if (last) {
                    if (e->bias) v = _mm512_add_ps(v, _mm512_loadu_ps(e->bias + col + c));
                    v = act16(v, e->act);
                    if (res) v = _mm512_add_ps(v, _mm512_loadu_ps(res + c));
                }
                _mm512_storeu_ps(yr + c, v);
            }
#elif defined(__AVX2__)
            for (; c + 8 <= cols; c += 8) {
                __m256 v = _mm256_loadu_ps(acc[r] + c);
                if (!first) v = _mm256_add_ps(v, _mm256_loadu_ps(yr + c));
                if (last) {
                    if (e->bias) v = _mm256_add_ps(v, _mm256_loadu_ps(e->bias + col + c));
                    v = act8(v, e->act);
                    if (res) v = _mm256_add_ps(v, _mm256_loadu_ps(res + c));
                }
                _mm256_storeu_ps(yr + c, v);
            }
#endif
        for (; c < cols; c++) {
            float v = acc[r][c];
            if (!first) v += yr[c];
            if (last) {
                if (e->bias) v += e->bias[col + c];
                v = act1(v, e->act);
                if (res) v += res[c];
            }
            yr[c] = v;
        }
    }
}

static inline float sum8(const float* v, int64_t n, float shift, int squares) {
    int64_t c = 0;
    float total = 0.0f;
#ifdef __AVX2__
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, sh = _mm256_set1_ps(shift);
    for (; c + 16 <= n; c += 16) {
        __m256 a = _mm256_sub_ps(_mm256_loadu_ps(v + c), sh), b = _mm256_sub_ps(_mm256_loadu_ps(v + c + 8), sh);
        acc0 = squares ? _mm256_fmadd_ps(a, a, acc0) : _mm256_add_ps(acc0, a);
        acc1 = squares ? _mm256_fmadd_ps(b, b, acc1) : _mm256_add_ps(acc1, b);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_add_ps(acc0, acc1));
    for (int l = 0; l < 8; l++) total += lanes[l];
#endif
    for (; c < n; c++) { float d = v[c] - shift; total += squares ? d * d : d; }
    return total;
}

/* LayerNorm of rows [r0, r1) of y [., n] in place: (v - mean) / sqrt(var + eps) * w + b, the variance
   from a second pass over the deviations (each row is in cache: the GEMM just wrote it). */
static void layer_norm_rows(float* y, int64_t n, int64_t r0, int64_t r1, const float* w, const float* b, float eps) {
    for (int64_t r = r0; r < r1; r++) {
        float* v = y + r * n;
        float mean = sum8(v, n, 0.0f, 0) / (float)n;
        float rstd = 1.0f / sqrtf(sum8(v, n, mean, 1) / (float)n + eps);
        int64_t c = 0;
#ifdef __AVX2__
        __m256 mv = _mm256_set1_ps(mean), rv = _mm256_set1_ps(rstd);
        for (; c + 8 <= n; c += 8) {
            __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(v + c), mv), rv);
            _mm256_storeu_ps(v + c, _mm256_fmadd_ps(d, _mm256_loadu_ps(w + c), _mm256_loadu_ps(b + c)));
        }
#endif
        for (; c < n; c++) v[c] = (v[c] - mean) * rstd * w[c] + b[c];
    }
}

/* One task's share of y = act(x @ w.T + bias) + res: rows [row0, row0 + mc) of x (x points at row
   row0, stride ldx) and columns panels [j0, j1), into y (pointing at row row0, stride ldy); the
   epilogue's residual is indexed by the global row. xp: MC x KC floats of scratch. */
static void gemm_block(const float* x, int64_t ldx, const float* packed, int64_t n, int64_t k, float* y,
                       int64_t ldy, int64_t row0, int64_t mc, int64_t j0, int64_t j1, const Epilogue* e, float* xp) {
    int64_t np = (n + NR - 1) / NR;
    for (int64_t p0 = 0; p0 < k || p0 == 0; p0 += KC) {  /* k = 0: one pass, y = epilogue of 0 */
        int64_t kc = k - p0 < KC ? k - p0 : KC;
        pack_rows(x + p0, ldx, xp, mc, kc);
        for (int64_t j = j0; j < j1; j += TP) {
            const float* wp = packed + p0 * np * NR + j * kc * NR;
            int panels = j1 - j < TP ? (int)(j1 - j) : TP;
            int cols = n - j * NR < panels * NR ? (int)(n - j * NR) : panels * NR;
            for (int64_t ir = 0; ir < mc; ir += MR) {
                float acc[MR][TW];
                int rows = mc - ir < MR ? (int)(mc - ir) : MR;
                micro_tile(xp + ir * kc, wp, kc * NR, panels, rows, kc, acc);
                write_tile(acc, y + ir * ldy + j * NR, ldy, rows, cols, p0 == 0, p0 + kc >= k, e, row0 + ir, j * NR);
            }
        }
    }
}

/* Row blocks of at most MC rows, as equal as MR-row panels allow and a multiple of the threads in
   number (at most one per panel). Block ib covers rows [first_row(ib), first_row(ib + 1)). */
static int64_t row_blocks(int64_t m, int nthreads) {
    int64_t panels = (m + MR - 1) / MR, per = MC / MR;
    int64_t mblocks = ((panels + per - 1) / per + nthreads - 1) / nthreads * nthreads;
    return mblocks > panels ? panels : mblocks;
}

static inline int64_t first_row(int64_t ib, int64_t m, int64_t mblocks) {
    int64_t r = ib * ((m + MR - 1) / MR) / mblocks * MR;
    return r < m ? r : m;
}

/* y [m, n] = norm(act(x [m, k] @ w.T + bias) + res) with res [m, n] (row stride ldr) or NULL, bias or
   NULL, norm a LayerNorm (ln_w, ln_b [n], eps) or none (ln_w NULL); w packed by llmfn_gemm_pack.
   Returns -1 when scratch memory cannot be allocated. */
int llmfn_gemm(const float* x, const float* packed, const float* bias, const float* res, int64_t ldr, float* y,
               int64_t m, int64_t n, int64_t k, int act, const float* ln_w, const float* ln_b, float eps,
               int nthreads) {
    /* With few rows, tasks split the columns too (8 tasks a thread) so that all threads work. */
    if (m <= 0 || n <= 0) return 0;
    int64_t np = (n + NR - 1) / NR, mblocks = row_blocks(m, nthreads);
    int64_t want = 8 * (int64_t)nthreads;
    int64_t nblocks = mblocks >= want ? 1 : (want + mblocks - 1) / mblocks;
    if (nblocks > np) nblocks = np;
    int64_t per_block = (np + nblocks - 1) / nblocks;
    per_block = (per_block + TP - 1) / TP * TP;  /* whole micro-tiles */
    nblocks = (np + per_block - 1) / per_block;
    int64_t tasks = mblocks * nblocks;
    Epilogue e = {bias, res, ldr, act};
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        float* xp = aligned_alloc(64, sizeof(float) * MC * KC);
        if (!xp) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic)
        for (int64_t t = 0; t < tasks; t++) {
            if (!xp) continue;
            int64_t ib = t / nblocks, i0 = first_row(ib, m, mblocks), mc = first_row(ib + 1, m, mblocks) - i0;
            int64_t j0 = (t % nblocks) * per_block, j1 = j0 + per_block < np ? j0 + per_block : np;
            gemm_block(x + i0 * k, k, packed, n, k, y + i0 * n, n, i0, mc, j0, j1, &e, xp);
            if (ln_w && nblocks == 1) layer_norm_rows(y, n, i0, i0 + mc, ln_w, ln_b, eps);  /* rows still in L2 */
        }
        free(xp);
        if (ln_w && nblocks > 1) {  /* tasks split the columns: normalise once all are written */
            #pragma omp barrier
            #pragma omp for schedule(static)
            for (int64_t r = 0; r < m; r++) layer_norm_rows(y, n, r, r + 1, ln_w, ln_b, eps);
        }
    }
    return failed ? -1 : 0;
}

/* A transformer feed-forward block in one pass over the rows:
   y [m, d] = norm(act(x @ w_up.T + b_up) @ w_down.T + b_down + x), x [m, d], w_up [f, d] and
   w_down [d, f] packed by llmfn_gemm_pack, norm as in llmfn_gemm. Each task's [MC, f] hidden block
   stays in its thread's cache between the two products instead of going through memory, and each
   output is summed in the same order as llmfn_gemm's two calls: the results are bitwise theirs.
   Returns -1 when scratch memory cannot be allocated. */
int llmfn_ffn(const float* x, const float* up, const float* b_up, const float* down, const float* b_down, float* y,
              int64_t m, int64_t d, int64_t f, int act, const float* ln_w, const float* ln_b, float eps,
              int nthreads) {
    if (m <= 0 || d <= 0) return 0;
    int64_t mblocks = row_blocks(m, nthreads), fp = (f + NR - 1) / NR * NR;
    Epilogue e_up = {b_up, NULL, 0, act}, e_down = {b_down, x, d, 0};
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        float* xp = aligned_alloc(64, sizeof(float) * MC * KC);
        float* h = aligned_alloc(64, sizeof(float) * MC * (fp > 0 ? fp : NR));
        if (!xp || !h) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic)
        for (int64_t ib = 0; ib < mblocks; ib++) {
            if (!xp || !h) continue;
            int64_t i0 = first_row(ib, m, mblocks), mc = first_row(ib + 1, m, mblocks) - i0;
            gemm_block(x + i0 * d, d, up, f, d, h, fp, 0, mc, 0, fp / NR, &e_up, xp);
            gemm_block(h, fp, down, d, f, y + i0 * d, d, i0, mc, 0, (d + NR - 1) / NR, &e_down, xp);
            if (ln_w) layer_norm_rows(y, d, i0, i0 + mc, ln_w, ln_b, eps);
        }
        free(xp);
        free(h);
    }
    return failed ? -1 : 0;
}
#endif
