/* Decode kernels on CPU (Python side and why: kernels/cpu.py), built as one library with the int4 /
   int8 code of quant.h and the bf16-weight code of bf16.h. */
#include "quant.h"
#include "bf16.h"
#include "kv16.h"
#include "simd.h"
#include <math.h>
#include <sched.h>
#include <time.h>
#include <omp.h>

/* Dot products of four consecutive weight rows w (stride k) with R activation rows x (stride k):
   out[r * 4 + i]. Each has its own 8-lane accumulator over the same steps, then the same sum and
   tail, whatever R: a row's results do not depend on the rows beside it. dot4 is R = 1; with one row
   only four FMA chains are in flight, half what two FMA ports at four cycles' latency need (a 16-row
   fp32 step ran at 3.5x its FMA bound), so dot4_rows takes rows in tiles. */
#define DOT4_ROWS(NAME, R)                                                                              \
static inline void NAME(const float* x, const float* w, int64_t k, float* out) {                       \
    const float *w0 = w, *w1 = w + k, *w2 = w + 2 * k, *w3 = w + 3 * k;                                 \
    int64_t c = 0;                                                                                      \
    float a[R][4];                                                                                      \
    for (int r = 0; r < R; r++) a[r][0] = a[r][1] = a[r][2] = a[r][3] = 0.0f;                          \
    DOT4_ROWS_SIMD(R)                                                                                   \
    for (; c < k; c++)                                                                                  \
        for (int r = 0; r < R; r++) {                                                                   \
            const float* xr = x + r * k;                                                                \
            a[r][0] += w0[c] * xr[c]; a[r][1] += w1[c] * xr[c]; a[r][2] += w2[c] * xr[c]; a[r][3] += w3[c] * xr[c]; \
        }                                                                                               \
    for (int r = 0; r < R; r++) for (int i = 0; i < 4; i++) out[r * 4 + i] = a[r][i];                  \
}
#ifdef __AVX2__
#define DOT4_ROWS_SIMD(R)                                                                               \
    __m256 acc[R][4];                                                                                   \
    for (int r = 0; r < R; r++) for (int i = 0; i < 4; i++) acc[r][i] = _mm256_setzero_ps();          \
    for (; c + 8 <= k; c += 8) {                                                                        \
        if (!(c & 15)) {                                                                                \
            __builtin_prefetch(w0 + 4 * k + c, 0, 3); __builtin_prefetch(w1 + 4 * k + c, 0, 3);        \
            __builtin_prefetch(w2 + 4 * k + c, 0, 3); __builtin_prefetch(w3 + 4 * k + c, 0, 3);        \
        }                                                                                               \
        __m256 v0 = _mm256_loadu_ps(w0 + c), v1 = _mm256_loadu_ps(w1 + c);                             \
        __m256 v2 = _mm256_loadu_ps(w2 + c), v3 = _mm256_loadu_ps(w3 + c);                              \
        for (int r = 0; r < R; r++) {                                                                   \
            __m256 xv = _mm256_loadu_ps(x + r * k + c);                                                 \
            acc[r][0] = _mm256_fmadd_ps(v0, xv, acc[r][0]); acc[r][1] = _mm256_fmadd_ps(v1, xv, acc[r][1]); \
            acc[r][2] = _mm256_fmadd_ps(v2, xv, acc[r][2]); acc[r][3] = _mm256_fmadd_ps(v3, xv, acc[r][3]); \
        }                                                                                               \
    }                                                                                                   \
    for (int r = 0; r < R; r++) for (int i = 0; i < 4; i++) a[r][i] = hsum(acc[r][i]);
#else
#define DOT4_ROWS_SIMD(R)
#endif
DOT4_ROWS(dot4, 1)
DOT4_ROWS(dot4_r2, 2)
#ifdef __AVX512F__
DOT4_ROWS(dot4_r4, 4)  /* 16 accumulators: AVX-512's 32 registers */
#endif

/* dot4 of rows [0, m) of x, out[r * 4 + i], in tiles of rows. */
static inline void dot4_rows(const float* x, int64_t m, const float* w, int64_t k, float* out) {
    int64_t r = 0;
#ifdef __AVX512F__
    for (; r + 4 <= m; r += 4) dot4_r4(x + r * k, w, k, out + r * 4);
#endif
    for (; r + 2 <= m; r += 2) dot4_r2(x + r * k, w, k, out + r * 4);
    for (; r < m; r++) dot4(x + r * k, w, k, out + r * 4);
}

static inline float dot1(const float* x, const float* w, int64_t k) {
    int64_t c = 0;
    float a = 0.0f;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    for (; c + 8 <= k; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + c), _mm256_loadu_ps(x + c), acc);
    a = hsum(acc);
#endif
    for (; c < k; c++) a += w[c] * x[c];
    return a;
}

/* dot4 and dot1 over rows of a 16-bit cache (kv16.h), widened as they are read: the same arithmetic
   as over an fp32 cache holding the widened values. */
static inline void dot4_kv16(const float* x, const uint16_t* w, int dt, int64_t k, float* out) {
    const uint16_t *w0 = w, *w1 = w + k, *w2 = w + 2 * k, *w3 = w + 3 * k;
    int64_t c = 0;
    float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; c + 8 <= k; c += 8) {
        __m256 xv = _mm256_loadu_ps(x + c);
        a0 = _mm256_fmadd_ps(kv_widen8(w0 + c, dt), xv, a0);
        a1 = _mm256_fmadd_ps(kv_widen8(w1 + c, dt), xv, a1);
        a2 = _mm256_fmadd_ps(kv_widen8(w2 + c, dt), xv, a2);
        a3 = _mm256_fmadd_ps(kv_widen8(w3 + c, dt), xv, a3);
    }
    a[0] = hsum(a0); a[1] = hsum(a1); a[2] = hsum(a2); a[3] = hsum(a3);
#endif
    for (; c < k; c++) {
        a[0] += kv_widen1(w0[c], dt) * x[c]; a[1] += kv_widen1(w1[c], dt) * x[c];
        a[2] += kv_widen1(w2[c], dt) * x[c]; a[3] += kv_widen1(w3[c], dt) * x[c];
    }
    for (int i = 0; i < 4; i++) out[i] = a[i];
}

static inline float dot1_kv16(const float* x, const uint16_t* w, int dt, int64_t k) {
    int64_t c = 0;
    float a = 0.0f;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    for (; c + 8 <= k; c += 8) acc = _mm256_fmadd_ps(kv_widen8(w + c, dt), _mm256_loadu_ps(x + c), acc);
    a = hsum(acc);
#endif
    for (; c < k; c++) a += kv_widen1(w[c], dt) * x[c];
    return a;
}

/* y [m, n] = x [m, k] @ w [n, k]^T (+ b [n]). Weight rows go in blocks of four, each read from
   memory once and reused from L1 by every activation row. */
int llmfn_gemv(const float* x, const float* w, const float* b, float* y, int64_t m, int64_t n, int64_t k,
               int nthreads) {
    int64_t blocks = (n + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t bi = 0; bi < blocks; bi++) {
        int64_t j = bi * 4;
        for (int64_t r0 = 0; r0 < m; r0 += 16) {
            int64_t rows = m - r0 < 16 ? m - r0 : 16;
            float out[16 * 4];
            if (j + 4 <= n) dot4_rows(x + r0 * k, rows, w + j * k, k, out);
            else for (int64_t r = 0; r < rows; r++)
                for (int64_t i = 0; j + i < n; i++) out[r * 4 + i] = dot1(x + (r0 + r) * k, w + (j + i) * k, k);
            for (int64_t r = 0; r < rows; r++)
                for (int64_t i = 0; i < 4 && j + i < n; i++)
                    y[(r0 + r) * n + j + i] = b ? out[r * 4 + i] + b[j + i] : out[r * 4 + i];
        }
    }
    return 0;
}

/* y [m, d] = w * (x * rsqrt(mean(x^2) + eps)). */
int llmfn_rms_norm(const float* x, const float* w, float* y, int64_t m, int64_t d, float eps) {
    #pragma omp parallel for schedule(static) if (m * d >= 65536)
    for (int64_t r = 0; r < m; r++) {
        const float* xr = x + r * d;
        float ss = dot1(xr, xr, d);  /* in vector lanes: one scalar chain took ~0.6 us a row of 576 */
        float inv = 1.0f / sqrtf(ss / (float)d + eps);
        for (int64_t i = 0; i < d; i++) y[r * d + i] = w[i] * (xr[i] * inv);
    }
    return 0;
}


/* y[i] = silu(g[i]) * u[i] for i in [lo, hi), lo a multiple of 8: whole groups of 8 (counted from
   0) take exp8, a last partial group expf, so an element's arithmetic depends on its index only. */
static inline void silu_mul_range(const float* g, const float* u, float* y, int64_t lo, int64_t hi) {
    int64_t i = lo;
#ifdef __AVX2__
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= hi; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i);
        __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < hi; i++) y[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* y [m, f] = silu(gu[:, :f]) * gu[:, f:] for gu [m, 2f] (the fused gate / up projection). */
int llmfn_silu_mul(const float* gu, float* y, int64_t m, int64_t f) {
    #pragma omp parallel for schedule(static) if (m * f >= 65536)
    for (int64_t r = 0; r < m; r++) silu_mul_range(gu + r * 2 * f, gu + r * 2 * f + f, y + r * f, 0, f);
    return 0;
}

#include "attend.h"  /* uses dot4 / dot1 / dot4_kv16 / dot1_kv16 above */

/* ---- The fused decoder layer -------------------------------------------------------------- */

/* One linear of a layer: kind 0 fp32 [n, k] row-major; 1 int4 and 2 int8 in llmfn.kernels.quant's layouts
   (q, scales, offsets, group); 3 int4 and 4 int8 with int8 activations (q8dot.h); 5 bf16 [n, k]
   row-major (bf16.h). bias may be NULL; half: scales / offsets stored fp16 (quant.h row_f32). */
typedef struct { const void* q; const void* scales; const void* offsets; const float* bias; int64_t kind, group, half; } Lin;
typedef struct { const float* attn_norm; Lin qkv, o; const float* mlp_norm; Lin gate_up, down; } Layer;

/* A spin barrier for the phases of one layer: OpenMP's own barrier spins briefly and then sleeps
   (llmfn sets GOMP_SPINCOUNT=2000, llmfn/_env.py), and each wake-up cost ~8 us, 7 times a layer. It
   yields the core after a while, so an oversubscribed machine does not stall. */
typedef struct { int count, sense; } Barrier;
static void barrier_wait(Barrier* b, int nth, int* local) {
    *local = !*local;
    if (__atomic_add_fetch(&b->count, 1, __ATOMIC_ACQ_REL) == nth) {
        __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&b->sense, *local, __ATOMIC_RELEASE);
    } else {
        for (int64_t spins = 0; __atomic_load_n(&b->sense, __ATOMIC_ACQUIRE) != *local; spins++) {
#ifdef __AVX2__
            _mm_pause();
#endif
            if (spins > 20000) sched_yield();
        }
    }
}

/* A barrier as run_attention (attend.h) waits on it between its tasks and its merges. */
typedef struct { Barrier* b; int nth; int* local; } BarrierAt;
static void wait_barrier(void* at) {
    BarrierAt* w = (BarrierAt*)at;
    barrier_wait(w->b, w->nth, w->local);
}

/* The CPU time the threads of the last llmfn_decoder_layers call got, in thousandths of the time
   they were in it (a thread spinning at a barrier counts as busy): near 1000 when every thread had
   its core, far lower when other processes took them (the caller, kernels/cpu.py, then runs the next
   steps on fewer threads). */
static int decode_occupancy = 1000;
int llmfn_decode_occupancy(void) { return __atomic_load_n(&decode_occupancy, __ATOMIC_RELAXED); }
static double seconds(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* This thread's share [lo, hi) of `count` items. */
static inline void share(int64_t count, int tid, int nth, int64_t* lo, int64_t* hi) {
    *lo = count * tid / nth; *hi = count * (tid + 1) / nth;
}

/* y [m, n] (+)= x [m, k] @ L^T + bias for this thread's share of the output columns: exactly the
   arithmetic of llmfn_gemv / llmfn_int4_linear / llmfn_int8_linear / llmfn_bf16_gemv then "+ bias"
   then "res +".
   With add, y holds the residual and receives res + (x @ L^T + bias). xp: scratch m * (k + k / 32). */
static void lin_part(const Lin* L, const float* x, float* y, int add, int64_t m, int64_t n, int64_t k,
                     int tid, int nth, float* xp, float* wb) {
    int64_t lo, hi;
    if (L->kind == 0) {
        const float* w = (const float*)L->q;
        share((n + 3) / 4, tid, nth, &lo, &hi);
        for (int64_t bi = lo; bi < hi; bi++) {  /* m <= 16 here (llmfn_decoder_layers) */
            int64_t j = bi * 4;
            float out[16 * 4];
            if (j + 4 <= n) dot4_rows(x, m, w + j * k, k, out);
            else for (int64_t r = 0; r < m; r++)
                for (int64_t i = 0; j + i < n; i++) out[r * 4 + i] = dot1(x + r * k, w + (j + i) * k, k);
            for (int64_t r = 0; r < m; r++)
                for (int64_t i = 0; i < 4 && j + i < n; i++)
                    lin_store(y + r * n + j + i, out[r * 4 + i], L->bias, j + i, add);
        }
        return;
    }
    if (L->kind == 5) {  /* each thread preps its own copy of the activations, as for int4 */
        bf16_prep(x, xp, m, k);
        share((n + 3) / 4, tid, nth, &lo, &hi);
        bf16_blocks(xp, (const uint16_t*)L->q, L->bias, y, add, m, n, k, lo, hi);
        return;
    }
    int64_t g = L->group, G = k / g;
#ifdef LLMFN_ZTILE_H
    if ((L->kind == 1 || L->kind == 2) && g == 32 && zt_takes(L->kind == 1 ? 4 : 8, m)) {  /* zt_linear's arithmetic */
        int bits = L->kind == 1 ? 4 : 8;
        int64_t nb = zt_block(k);
        zt_prepare(bits, x, xp, m, k);
        share((n + nb - 1) / nb, tid, nth, &lo, &hi);
        zt_rows_range(bits, xp, m, L->q, L->scales, L->offsets, L->half, L->bias, y, add, n, k, lo * nb,
                      hi * nb < n ? hi * nb : n, wb);
        return;
    }
#endif
#ifdef LLMFN_AMX
    if ((L->kind == 3 || L->kind == 4) && amx_ready()) {  /* amx_linear's arithmetic, in tiles of 16 weight rows */
        int bits = L->kind == 3 ? 4 : 8;
        AmxActs a = amx_quantize(x, xp, bits, m, k, g);  /* its scratch fits in xp's */
        share((n + 15) / 16, tid, nth, &lo, &hi);
        amx_rows(bits, &a, L->q, L->scales, bits == 4 ? L->offsets : NULL, L->half, L->bias, y, add, m, n, k, g, lo, hi);
        return;
    }
#endif
    if (L->kind == 3) {  /* llmfn_int4_linear's act8 arithmetic; its scratch fits in xp's */
        int8_t* xq = (int8_t*)xp;
        float* dq = (float*)(xq + m * k);
        float* xs8 = dq + m * (k / 8);
        quantize_q8(x, xq, dq, xs8, m, k, g);
        share(n, tid, nth, &lo, &hi);
        for (int64_t j = lo; j < hi; j++) {
            float out[16], sb[G], ob[G];
            int4_q8_block(xq, dq, xs8, (const uint8_t*)L->q + j * (k / 2), row_f32(L->scales, L->half, j, G, sb),
                          row_f32(L->offsets, L->half, j, G, ob), out, 1, k, g, m);
            for (int64_t r = 0; r < m; r++) lin_store(y + r * n + j, out[r], L->bias, j, add);
        }
        return;
    }
    if (L->kind == 4) {  /* llmfn_int8_linear's act8 arithmetic */
        int8_t* xq = (int8_t*)xp;
        float* dq8 = (float*)(xq + m * k);
        int32_t* corr = (int32_t*)(dq8 + m * (k / 4));
        quantize_q8_plain(x, xq, dq8, corr, m, k);
        share(n, tid, nth, &lo, &hi);
        for (int64_t j = lo; j < hi; j++) {
            float out[16], sb[G];
            int8_q8_block(xq, dq8, corr, (const int8_t*)L->q + j * k, row_f32(L->scales, L->half, j, G, sb), out, 1,
                          k, g, m);
            for (int64_t r = 0; r < m; r++) lin_store(y + r * n + j, out[r], L->bias, j, add);
        }
        return;
    }
    float* xs = xp + m * k;
    if (L->kind == 1) prep4(x, xp, xs, m, k, g);
    share(n, tid, nth, &lo, &hi);
#ifdef __AVX2__
    if (L->kind == 1 && m == 1 && g == 32) {  /* decode: two weight rows at a time, same bits */
        const uint8_t* q = (const uint8_t*)L->q;
        for (; lo + 2 <= hi; lo += 2) {
            float v[2], sa[G], sb[G], oa[G], ob[G];
            int4_g32_decode_pair(xp, xs, q + lo * (k / 2), q + (lo + 1) * (k / 2), row_f32(L->scales, L->half, lo, G, sa),
                                 row_f32(L->scales, L->half, lo + 1, G, sb), row_f32(L->offsets, L->half, lo, G, oa),
                                 row_f32(L->offsets, L->half, lo + 1, G, ob), v, v + 1, G);
            for (int i = 0; i < 2; i++) lin_store(y + lo + i, v[i], L->bias, lo + i, add);
        }
    }
#endif
#ifdef int8_g32_decode_pair
    if (L->kind == 2 && m == 1 && int8_z_takes(g, k)) {  /* the same for int8 weights (groups of 32 or 16) */
        const int8_t* q = (const int8_t*)L->q;
        for (; lo + 2 <= hi; lo += 2) {
            float v[2], sa[G], sb[G];
            int8_g32_decode_pair(x, q + lo * k, q + (lo + 1) * k, row_f32(L->scales, L->half, lo, G, sa),
                                 row_f32(L->scales, L->half, lo + 1, G, sb), v, v + 1, k / 32, g == 16);
            for (int i = 0; i < 2; i++) lin_store(y + lo + i, v[i], L->bias, lo + i, add);
        }
    }
#endif
    for (int64_t j = lo; j < hi; j++) {
        float out[16], sb[G], ob[G];
        const float* sr = row_f32(L->scales, L->half, j, G, sb);
        const float* orow = L->kind == 1 ? row_f32(L->offsets, L->half, j, G, ob) : NULL;
        for (int64_t i0 = 0; i0 < m; i0 += QUANT_PASS_ROWS) {
            int64_t R = (m - i0) < QUANT_PASS_ROWS ? (m - i0) : QUANT_PASS_ROWS;
            if (L->kind == 1)
                int4_block(xp + i0 * k, xs + i0 * G, (const uint8_t*)L->q + j * (k / 2), sr, orow, out + i0, 1, k, g,
                           G, R);
            else
                int8_block(x + i0 * k, (const int8_t*)L->q + j * k, sr, out + i0, 1, k, g, G, R);
        }
        for (int64_t r = 0; r < m; r++) lin_store(y + r * n + j, out[r], L->bias, j, add);
    }
}

/* Row j of an embedding table [V, k] laid out as a Lin of kind 0 (fp32), 1 / 3 (int4) or 2 / 4 (int8),
   dequantized as llmfn.kernels.quant's `embedding` does it (quant.h). */
static void lin_row(const Lin* L, int64_t j, int64_t k, float* out) {
    if (L->kind == 0) memcpy(out, (const float*)L->q + j * k, sizeof(float) * k);
    else if (L->kind == 1 || L->kind == 3) int4_dequant_row(L->q, L->scales, L->offsets, (int)L->half, j, k, L->group, out);
    else int8_dequant_row(L->q, L->scales, (int)L->half, j, k, L->group, out);
}

/* What a whole decode step adds around the layers (llmfn_decoder_layers' `step`, or NULL): x's rows
   from the embedding table at ids (each in [0, vocab)), and after the layers the logits [m, vocab] =
   head(rms(x, norm)), the head in the same OpenMP region as the layers. */
typedef struct { const int64_t* ids; Lin embed; const float* norm; Lin head; float* logits; int64_t vocab; } Step;

/* x [m, D] <- the pre-norm decoder layers Ls[0 .. nl-1] applied to x (the residual stream, updated
   in place), each  x = x + o(attention(rope(qkv(rms(x))))); x = x + down(silu(gate) * up)(rms(x)),
   with the cache arguments above (dt: the caches' element type); layer l's caches start l * cst[3]
   elements into kc / vc. One OpenMP region for all of them, its phases separated by spin barriers;
   each thread norms the rows itself (the same function, so the same bits), which spares two barriers
   a layer and the other threads' wait for one thread's norm. Bitwise what the separate kernels give.
   With a step (else NULL), x is first filled from the embedding and the logits follow. Returns -1
   for a position outside the cache, -4 for a token id outside the table (nothing written either way). */
int llmfn_decoder_layers(float* x, const Layer* const* Ls, int64_t nl, const float* cs, const float* sn,
                         const float* qscale, const int64_t* pos, void* kc, void* vc, int64_t dt, const int64_t* cst,
                         const int32_t* table, int64_t nb, int64_t bs, const float* slopes, int64_t m, int64_t t,
                         int64_t D, int64_t hq, int64_t hk, int64_t hd, int64_t F, float eps, float scale,
                         int64_t window, int nthreads, const Step* step) {
    if (m > 16) return -2;  /* lin_part keeps a row's outputs in float[16] */
    Blocks kv = {table, nb, bs, (int)dt};
    int64_t s = nb * bs;
    for (int64_t i = 0; i < m; i++) {
        if (pos[i] < 0 || pos[i] >= s) return -1;
        if (step && (step->ids[i] < 0 || step->ids[i] >= step->vocab)) return -4;
    }
    for (int64_t i = 0; step && i < m; i++) lin_row(&step->embed, step->ids[i], D, x + i * D);
    int64_t nqkv = (hq + 2 * hk) * hd, nq = hq * hd, kmax = D > F ? D : F, mrows = m;  /* mrows: xp's rows */
    kmax = kmax > nq ? kmax : nq;
#ifdef LLMFN_ZTILE_H
    mrows = zt_rows(m);  /* the tiles read whole tiles of rows */
#endif
    Plan plan;
    if (plan_attention(&plan, pos, m, hq, hd, window, nthreads)) return -3;
    float* buf = (float*)scratch(sizeof(float) * m * (nqkv + nq + 3 * F));
    float *qkv = buf, *att = qkv + m * nqkv, *gu = att + m * nq, *act = gu + 2 * m * F;
    Barrier bar = {0, 0};
    int64_t b = m / t;
#ifdef LLMFN_AMX
    amx_ready();  /* asked on this thread, before the region: a worker's first ask raced its own tile use */
#endif
    double busy = 0.0, present = 0.0;
    #pragma omp parallel num_threads(nthreads) reduction(+ : busy, present)
    {
        const double wall0 = seconds(CLOCK_MONOTONIC), cpu0 = seconds(CLOCK_THREAD_CPUTIME_ID);
        int tid = omp_get_thread_num(), nth = omp_get_num_threads(), local = 0;
        float* xp = (float*)scratch(sizeof(float) * (mrows * kmax + m * kmax / 32 + plan.heads * (hd + s) + m * D));
        float* q = xp + mrows * kmax + m * kmax / 32;
        float* h = q + plan.heads * (hd + s);  /* this thread's copy of the normed rows: no barrier after a norm */
        BarrierAt sync = {&bar, nth, &local};
#ifdef LLMFN_ZTILE_H
        float* wb = (float*)scratch(sizeof(float) * ZT_NB * kmax);
#else
        float* wb = NULL;
#endif
        int64_t lo, hi;
        for (int64_t l = 0; l < nl; l++) {
            const Layer* L = Ls[l];
            char *kl = (char*)kc + l * cst[3] * kv_size(kv.dt), *vl = (char*)vc + l * cst[3] * kv_size(kv.dt);
            llmfn_rms_norm(x, L->attn_norm, h, m, D, eps);
            lin_part(&L->qkv, h, qkv, 0, m, nqkv, D, tid, nth, xp, wb);
            barrier_wait(&bar, nth, &local);
            if (tid == 0) write_kv(qkv, cs, sn, pos, kl, vl, cst, &kv, b, t, hq, hk, hd);
            barrier_wait(&bar, nth, &local);
            run_attention(&plan, tid, nth, wait_barrier, &sync, qkv, cs, sn, qscale, pos, kl, vl, cst, &kv, slopes, att, t,
                          hq, hk, hd, scale, window, q, s);
            barrier_wait(&bar, nth, &local);
            lin_part(&L->o, att, x, 1, m, D, nq, tid, nth, xp, wb);
            barrier_wait(&bar, nth, &local);
            llmfn_rms_norm(x, L->mlp_norm, h, m, D, eps);
            lin_part(&L->gate_up, h, gu, 0, m, 2 * F, D, tid, nth, xp, wb);
            barrier_wait(&bar, nth, &local);
            share((F + 7) / 8, tid, nth, &lo, &hi);  /* in groups of 8, as llmfn_silu_mul takes them */
            for (int64_t r = 0; r < m; r++)
                silu_mul_range(gu + r * 2 * F, gu + r * 2 * F + F, act + r * F, lo * 8, hi * 8 < F ? hi * 8 : F);
            barrier_wait(&bar, nth, &local);
            lin_part(&L->down, act, x, 1, m, D, F, tid, nth, xp, wb);
            barrier_wait(&bar, nth, &local);
        }
        if (step) {
            llmfn_rms_norm(x, step->norm, h, m, D, eps);
            lin_part(&step->head, h, step->logits, 0, m, step->vocab, D, tid, nth, xp, wb);
        }
        free(xp);
        free(wb);
        busy += seconds(CLOCK_THREAD_CPUTIME_ID) - cpu0;
        present += seconds(CLOCK_MONOTONIC) - wall0;
    }
    free(buf);
    free_plan(&plan);
    __atomic_store_n(&decode_occupancy, present > 0.0 ? (int)(1000.0 * busy / present) : 1000, __ATOMIC_RELAXED);
    return 0;
}
