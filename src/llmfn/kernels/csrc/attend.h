/* Attention on CPU for a step or a prompt chunk: rope, the KV-cache write and attention over a row's blocks
   (llmfn_qkv_attention, and the fused decoder layer's phases). Part of decode.c's library, included
   there after the dot products it uses (dot4, dot1 and their 16-bit-cache versions). */
#ifndef LLMFN_ATTEND_H
#define LLMFN_ATTEND_H
#include "attn_tile.h"  /* tile, softmax_row, weigh_values: the prefill's tiles */

static inline void rotate(const float* x, const float* cs, const float* sn, float* out, int64_t hd) {
    int64_t h = hd / 2;
    for (int64_t i = 0; i < h; i++) {
        float x1 = x[i], x2 = x[h + i];
        out[i] = x1 * cs[i] - x2 * sn[i];
        out[h + i] = x2 * cs[i] + x1 * sn[i];
    }
}

/* The cache arguments: qkv [b, t, (hq + 2 hk) * hd]; cos, sin [b, t, hd/2] (NULL: no rope);
   qscale [b, t] (NULL: none); pos [b, t]; caches of blocks [N, hk, bs, hd] of element type kv->dt
   (kv16.h: fp32, bf16 or fp16) with element strides cst[0..2] for block, head and slot, and
   contiguous rows; kv->table [b, nb] (int32) maps row bi's position p to block
   table[bi * nb + p / bs], slot p % bs (table NULL: block bi is row bi's whole cache, bs = its
   length); slopes [hq] (NULL: no ALiBi); window 0 for none. */
typedef struct { const int32_t* table; int64_t nb, bs; int dt; } Blocks;

/* Offset of row bi's position p (block and slot) in a cache. */
static inline int64_t kv_offset(const Blocks* kv, const int64_t* cst, int64_t bi, int64_t p) {
    int64_t block = kv->table ? kv->table[bi * kv->nb + p / kv->bs] : bi;
    return block * cst[0] + (p % kv->bs) * cst[2];
}

/* Rotated keys and the values of every row into the caches at pos. */
static void write_kv(const float* qkv, const float* cs, const float* sn, const int64_t* pos, void* kc,
                     void* vc, const int64_t* cst, const Blocks* kv, int64_t b, int64_t t, int64_t hq,
                     int64_t hk, int64_t hd) {
    int64_t row = (hq + 2 * hk) * hd, half = hd / 2;
    float rotated[hd];
    for (int64_t i = 0; i < b * t; i++) {
        int64_t at = kv_offset(kv, cst, i / t, pos[i]);
        for (int64_t h = 0; h < hk; h++) {
            const float* k = qkv + i * row + (hq + h) * hd;
            const float* v = k + hk * hd;
            if (kv->dt != KV_F32) {  /* rounded once, here: what attention reads back */
                if (cs) rotate(k, cs + i * half, sn + i * half, rotated, hd);
                kv_round(cs ? rotated : k, kv->dt, (uint16_t*)kc + at + h * cst[1], hd);
                kv_round(v, kv->dt, (uint16_t*)vc + at + h * cst[1], hd);
                continue;
            }
            float* kd = (float*)kc + at + h * cst[1];
            float* vd = (float*)vc + at + h * cst[1];
            if (cs) rotate(k, cs + i * half, sn + i * half, kd, hd);
            else for (int64_t d = 0; d < hd; d++) kd[d] = k[d];
            for (int64_t d = 0; d < hd; d++) vd[d] = v[d];
        }
    }
}

/* The first key a query at position p sees: p - window + 1 with a sliding window (window > 0), else 0. */
static inline int64_t window_start(int64_t p, int64_t window) { return window > 0 && p - window + 1 > 0 ? p - window + 1 : 0; }

#include "attend_rows.h"  /* attend, plan_attention, run_attention: decode steps, row by row */

/* Prompt chunks longer than a decode-sized step (TILED_ROWS positions or more) attend in tiles
   (attn_tile.h), the encoder's way. Row by row, every query re-reads all its keys: at 256 rows over
   2,304 keys ~5x slower than torch's SDPA; in tiles each key and value load feeds TR query rows
   (SmolLM2's shapes, 2 threads, rope and the cache writes included: 256 rows at 2,048 6.8 ms against
   11.4 for split + rope + index writes + SDPA). For each sequence the keys and values its rows can
   see are packed once per kv head (keys transposed into 16-key panels, values [keys][hp], a 16-bit
   cache widened, zeros past the last position), shared by the hq / hk query heads of the group;
   then each (query head, TR rows) task takes scores = (q * scale) k^T over the keys up to its last
   row's position, masks each row's invisible keys (later positions, outside the window) with -inf,
   adds ALiBi and multiplies softmax(scores) by the values. A row's result depends on its own query
   and the cache only (masked keys weigh exactly 0), not on the rows or chunk beside it. Steps of at
   most 16 positions (kernels/cpu.py MAX_ROWS) keep the row-by-row arithmetic: speculative
   verification relies on it being the decode step's. kernels/cpu.py TILED_ROWS is this number. */
#define TILED_ROWS 17
int llmfn_tiled_rows(void) { return TILED_ROWS; }


/* Visible keys of a score row at position p: everything in [from, n) outside [lo, p] -inf, ALiBi
   added; returns the row's maximum. [from, n): the row's computed scores (from <= lo). */
static float mask_row(float* s, int64_t from, int64_t n, int64_t lo, int64_t p, const float* slope) {
    int64_t hi = p + 1 < n ? p + 1 : n;
    for (int64_t j = from; j < lo; j++) s[j] = -INFINITY;
    for (int64_t j = hi; j < n; j++) s[j] = -INFINITY;
    if (slope) for (int64_t j = lo; j < hi; j++) s[j] += *slope * (float)(j - p);
    float m = -INFINITY;
    int64_t j = lo;
#if defined(__AVX512F__)
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (; j + 16 <= hi; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + j));
    m = _mm512_reduce_max_ps(mv);
#elif defined(__AVX2__)
    __m256 mv = _mm256_set1_ps(-INFINITY);
    for (; j + 8 <= hi; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + j));
    float lanes[8];
    _mm256_storeu_ps(lanes, mv);
    for (int l = 0; l < 8; l++) m = lanes[l] > m ? lanes[l] : m;
#endif
    for (; j < hi; j++) m = s[j] > m ? s[j] : m;
    return m;
}

/* Sequence bi's keys [j0, j1) of kv head kh, packed for the tiles: kt [n / TC][hd][TC], vp [n][hp]
   (n a multiple of TC; keys from `used` on zero). */
static void pack_kv(const void* kc, const void* vc, const int64_t* cst, const Blocks* kv, int64_t bi, int64_t kh,
                    int64_t used, int64_t j0, int64_t j1, int64_t hd, int64_t hp, float* kt, float* vp) {
    for (int64_t j = j0; j < j1; j++) {
        float* ktj = kt + (j / TC) * hd * TC + j % TC;
        float* vpj = vp + j * hp;
        memset(vpj, 0, sizeof(float) * hp);
        if (j >= used) { for (int64_t c = 0; c < hd; c++) ktj[c * TC] = 0.0f; continue; }
        int64_t at = kv_offset(kv, cst, bi, j) + kh * cst[1];
        if (kv->dt == KV_F32) {
            const float *kr = (const float*)kc + at, *vr = (const float*)vc + at;
            for (int64_t c = 0; c < hd; c++) ktj[c * TC] = kr[c];
            memcpy(vpj, vr, sizeof(float) * hd);
        } else {
            const uint16_t *kr = (const uint16_t*)kc + at, *vr = (const uint16_t*)vc + at;
            for (int64_t c = 0; c < hd; c++) { ktj[c * TC] = kv_widen1(kr[c], kv->dt); vpj[c] = kv_widen1(vr[c], kv->dt); }
        }
    }
}

/* The tiled attention of sequence bi's t rows (after write_kv): out as llmfn_qkv_attention's. Returns
   -1 when scratch memory cannot be allocated. */
static int tiled_attention(const float* qkv, const float* cs, const float* sn, const float* qscale, const int64_t* pos,
                           const void* kc, const void* vc, const int64_t* cst, const Blocks* kv, const float* slopes,
                           float* out, int64_t bi, int64_t t, int64_t hq, int64_t hk, int64_t hd, float scale,
                           int64_t window, int nthreads) {
    const int64_t* ps = pos + bi * t;
    int64_t used = 0, first = INT64_MAX, row = (hq + 2 * hk) * hd, half = hd / 2, blocks = (t + TR - 1) / TR;
    for (int64_t i = 0; i < t; i++) {
        used = ps[i] + 1 > used ? ps[i] + 1 : used;
        first = window_start(ps[i], window) < first ? window_start(ps[i], window) : first;
    }
    first = first / TC * TC;  /* keys before every row's window are neither packed nor scored */
    int64_t tp = (used + TC - 1) / TC * TC, hp = (hd + TC - 1) / TC * TC;
    float* packed = (float*)scratch(sizeof(float) * hk * (tp * hd + tp * hp));
    if (!packed) return -1;
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        int64_t chunks = (tp + 255) / 256;  /* pack in runs of 256 keys, spread over the threads */
        #pragma omp for schedule(static)
        for (int64_t c = 0; c < hk * chunks; c++) {
            int64_t kh = c / chunks, j0 = (c % chunks) * 256, j1 = j0 + 256 < tp ? j0 + 256 : tp;
            j0 = j0 > first ? j0 : first;
            float* kt = packed + kh * (tp * hd + tp * hp);
            pack_kv(kc, vc, cst, kv, bi, kh, used, j0, j1, hd, hp, kt, kt + tp * hd);
        }
        float* buf = (float*)scratch(sizeof(float) * (hd * TR + TR * tp + hd));
        if (!buf) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < hq * blocks; task++) {
            if (!buf) continue;
            int64_t h = task / blocks, i0 = (task % blocks) * TR, kh = h / (hq / hk);
            int rows = t - i0 < TR ? (int)(t - i0) : TR;
            const float* kt = packed + kh * (tp * hd + tp * hp);
            const float* vp = kt + tp * hd;
            float *qb = buf, *s = qb + hd * TR, *q = s + TR * tp;
            int64_t kmax = 0, j0 = INT64_MAX;  /* the task's keys: [j0, kmax) */
            for (int r = 0; r < TR; r++) {  /* the rows' queries, rotated and scaled, k-major [hd][TR] */
                if (r >= rows) { for (int64_t c = 0; c < hd; c++) qb[c * TR + r] = 0.0f; continue; }
                int64_t i = bi * t + i0 + r;
                const float* qs = qkv + i * row + h * hd;
                if (cs) rotate(qs, cs + i * half, sn + i * half, q, hd);
                else memcpy(q, qs, sizeof(float) * hd);
                float f = qscale ? qscale[i] * scale : scale;
                for (int64_t c = 0; c < hd; c++) qb[c * TR + r] = q[c] * f;
                kmax = ps[i0 + r] + 1 > kmax ? ps[i0 + r] + 1 : kmax;
                j0 = window_start(ps[i0 + r], window) < j0 ? window_start(ps[i0 + r], window) : j0;
            }
            j0 = j0 / TC * TC;  /* a whole panel, and a multiple of LANES: softmax_row's lanes keep their keys */
            int64_t n = (kmax + TC - 1) / TC * TC, tk = (kmax + LANES - 1) / LANES * LANES;
            for (int64_t jp = j0 / TC; jp < n / TC; jp += TP) {
                int panels = n / TC - jp < TP ? (int)(n / TC - jp) : TP;
                tile(qb, 1, TR, kt + jp * hd * TC, hd * TC, panels, TC, hd, s + jp * TC, tp, NULL, NULL);
            }
            float inv[TR];
            /* Keys before j0 would weigh exactly 0 (-inf scores): leaving them out changes no bit of the
               sums, which run over keys in order (and in softmax_row's lanes, j0 a multiple of LANES). */
            for (int r = 0; r < rows; r++) {
                int64_t p = ps[i0 + r];
                float m = mask_row(s + r * tp, j0, n, window_start(p, window), p, slopes ? slopes + h : NULL);
                inv[r] = 1.0f / softmax_row(s + r * tp + j0, m, tk - j0);  /* key p is visible: the sum is >= 1 */
            }
            for (int r = rows; r < TR; r++) memset(s + r * tp + j0, 0, sizeof(float) * (tk - j0));
            weigh_values(s + j0, tp, vp + j0 * hp, hp, hd, tk - j0, rows, inv, out + (bi * t + i0) * hq * hd + h * hd,
                         hq * hd);
        }
        free(buf);
    }
    free(packed);
    return failed ? -1 : 0;
}

/* One step's attention for a layer from its fused qkv projection: writes the keys and values,
   then out [b, t, hq * hd]. Returns -1, writing nothing, when a position is outside [0, s), s the
   positions a row's table covers (nb * bs); -2 when scratch memory cannot be allocated. */
int llmfn_qkv_attention(const float* qkv, const float* cs, const float* sn, const float* qscale,
                        const int64_t* pos, void* kc, void* vc, int64_t dt, const int64_t* cst, const int32_t* table,
                        int64_t nb, int64_t bs, const float* slopes, float* out, int64_t b, int64_t t, int64_t hq,
                        int64_t hk, int64_t hd, float scale, int64_t window, int nthreads) {
    Blocks kv = {table, nb, bs, (int)dt};
    int64_t s = nb * bs;
    for (int64_t i = 0; i < b * t; i++)
        if (pos[i] < 0 || pos[i] >= s) return -1;
    write_kv(qkv, cs, sn, pos, kc, vc, cst, &kv, b, t, hq, hk, hd);
    if (t >= TILED_ROWS) {
        for (int64_t bi = 0; bi < b; bi++)
            if (tiled_attention(qkv, cs, sn, qscale, pos, kc, vc, cst, &kv, slopes, out, bi, t, hq, hk, hd, scale, window,
                                nthreads))
                return -2;
        return 0;
    }
    Plan pl;
    if (plan_attention(&pl, pos, b * t, hq, hd, window, nthreads)) return -2;
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        float* q = (float*)malloc(sizeof(float) * pl.heads * (hd + s));
        if (!q) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp barrier
        if (!failed)
            run_attention(&pl, tid, nth, omp_wait, NULL, qkv, cs, sn, qscale, pos, kc, vc, cst, &kv, slopes, out, t, hq, hk,
                          hd, scale, window, q, s);
        free(q);
    }
    free_plan(&pl);
    if (failed) return -2;
    return 0;
}
#endif
