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

/* Runs of adjacent cache slots, block by block: values j0 .. j1 - 1 at at + j * stride (elements). */
typedef struct { int64_t at, j0, j1; } Run;
#define RUNS 8  /* runs weighed at a time: SmolLM2's 8 blocks of values of a kv head are 32 KB, in L1 */

/* o[0 .. hd) += w[j] * value j over the runs, in position order, one FMA per element (without a
   vector unit: multiply, then add); vals: the cache (element type dt), plus off elements. */
/* For a head dim of NV vectors of W floats the accumulators stay in registers over the runs (the
   generic loop reloads o at every position, a store-to-load chain per value): the same FMA per
   element in the same order, the same bits, whatever the vector width. */
#define WEIGH_RUNS(NAME, NV, W, VEC, LOAD, STORE, SET1, FMA, WIDEN)                                        \
static inline void NAME(float* o, const float* w, const void* vals, int64_t off, const Run* runs, int nr, int64_t stride, \
                        int dt) {                                                                         \
    VEC acc[NV];                                                                                          \
    for (int v = 0; v < NV; v++) acc[v] = LOAD(o + W * v);                                               \
    for (int r = 0; r < nr; r++) {                                                                        \
        int64_t at = runs[r].at + off;                                                                    \
        if (dt == KV_F32)                                                                                 \
            for (int64_t j = runs[r].j0; j < runs[r].j1; j++) {                                           \
                const float* vj = (const float*)vals + at + j * stride;                                   \
                VEC wv = SET1(w[j]);                                                                      \
                for (int v = 0; v < NV; v++) acc[v] = FMA(wv, LOAD(vj + W * v), acc[v]);                  \
            }                                                                                             \
        else                                                                                              \
            for (int64_t j = runs[r].j0; j < runs[r].j1; j++) {                                           \
                const uint16_t* vj = (const uint16_t*)vals + at + j * stride;                             \
                VEC wv = SET1(w[j]);                                                                      \
                for (int v = 0; v < NV; v++) acc[v] = FMA(wv, WIDEN(vj + W * v, dt), acc[v]);             \
            }                                                                                             \
    }                                                                                                     \
    for (int v = 0; v < NV; v++) STORE(o + W * v, acc[v]);                                               \
}
#if defined(__AVX512F__)
WEIGH_RUNS(weigh_runs_64, 4, 16, __m512, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps, _mm512_fmadd_ps, kv_widen16)
WEIGH_RUNS(weigh_runs_128, 8, 16, __m512, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps, _mm512_fmadd_ps, kv_widen16)
#elif defined(__AVX2__)
WEIGH_RUNS(weigh_runs_64, 8, 8, __m256, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps, _mm256_fmadd_ps, kv_widen8)
#endif
static void weigh_runs(float* o, const float* w, const void* vals, int64_t off, const Run* runs, int nr, int64_t stride,
                       int dt, int64_t hd) {
#ifdef __AVX2__
    if (hd == 64) { weigh_runs_64(o, w, vals, off, runs, nr, stride, dt); return; }
#ifdef __AVX512F__
    if (hd == 128) { weigh_runs_128(o, w, vals, off, runs, nr, stride, dt); return; }
#endif
#endif
    for (int r = 0; r < nr; r++)
        for (int64_t j = runs[r].j0; j < runs[r].j1; j++) {
            int64_t at = runs[r].at + off + j * stride, d = 0;
            float wgt = w[j];
            if (dt != KV_F32) {  /* the loop below on the widened values */
                const uint16_t* vj = (const uint16_t*)vals + at;
#ifdef __AVX2__
                __m256 wv = _mm256_set1_ps(wgt);
                for (; d + 8 <= hd; d += 8)
                    _mm256_storeu_ps(o + d, _mm256_fmadd_ps(wv, kv_widen8(vj + d, dt), _mm256_loadu_ps(o + d)));
#endif
                for (; d < hd; d++) o[d] += wgt * kv_widen1(vj[d], dt);
                continue;
            }
            const float* vj = (const float*)vals + at;
#ifdef __AVX2__
            __m256 wv = _mm256_set1_ps(wgt);
            for (; d + 8 <= hd; d += 8)
                _mm256_storeu_ps(o + d, _mm256_fmadd_ps(wv, _mm256_loadu_ps(vj + d), _mm256_loadu_ps(o + d)));
#endif
            for (; d < hd; d++) o[d] += wgt * vj[d];
        }
}

/* Row-by-row attention (decode steps, speculative verification): a task is row i's query heads
   [ha, hb) over their visible cached keys, read block by block in position order (so a row's result
   does not depend on where its blocks lie): out[i, h] = softmax(scale * q.k + alibi) . v for each.
   The heads share each block's keys and values while they are in L1 (with GQA each query head read
   its kv head's whole cache again: 16 rows at 2,048 positions through 16-slot blocks took 145 ms for
   SmolLM2's 30 layers, now 107-114); each head's arithmetic is its own, whatever the heads beside
   it, and the weighted values keep their accumulators in registers over RUNS blocks. Only keys in
   [k0, k1) are read; with part (a chunk of a split row, plan_attention), each head leaves its maximum
   score, its sum of exponentials and its unnormalized weighted values at part + e * (hd + 2) instead
   of writing out. q: scratch [hb - ha][hd], sc: scratch [hb - ha][s] (s: the positions a row's table
   covers). A 16-bit cache is widened as it is read: the same arithmetic as over an fp32 cache holding
   its values. */
static void attend(const float* qkv, const float* cs, const float* sn, const float* qscale, const int64_t* pos,
                   const void* kc, const void* vc, const int64_t* cst, const Blocks* kv, const float* slopes,
                   float* out, int64_t i, int64_t ha, int64_t hb, int64_t t, int64_t hq, int64_t hk, int64_t hd,
                   float scale, int64_t window, int64_t k0, int64_t k1, float* part, float* q, float* sc, int64_t s) {
    int64_t row = (hq + 2 * hk) * hd, half = hd / 2, bi = i / t, p = pos[i], gq = hq / hk, g = hb - ha;
    for (int64_t e = 0; e < g; e++) {
        const float* qs = qkv + i * row + (ha + e) * hd;
        float* qe = q + e * hd;
        if (cs) rotate(qs, cs + i * half, sn + i * half, qe, hd);
        else for (int64_t d = 0; d < hd; d++) qe[d] = qs[d];
        if (qscale) for (int64_t d = 0; d < hd; d++) qe[d] *= qscale[i];
    }
    int64_t lo = window_start(p, window), last = p < k1 - 1 ? p : k1 - 1;  /* the keys: [lo, last] */
    lo = lo > k0 ? lo : k0;
    float mx[g];
    for (int64_t e = 0; e < g; e++) mx[e] = -INFINITY;
    for (int64_t j0 = lo; j0 <= last;) {  /* one run of adjacent slots (a block's part in [lo, last]) per pass */
        int64_t end = (j0 / kv->bs + 1) * kv->bs;
        if (end > last + 1) end = last + 1;
        for (int64_t kh = ha / gq; kh * gq < hb; kh++) {  /* the task's heads of kv head kh: [e0, e1) */
            int64_t e0 = (kh * gq > ha ? kh * gq : ha) - ha, e1 = ((kh + 1) * gq < hb ? (kh + 1) * gq : hb) - ha;
            int64_t at = kv_offset(kv, cst, bi, j0) + kh * cst[1] - j0 * cst[2];  /* + j * cst[2]: key j */
            const float* keys = (const float*)kc + at;
            const uint16_t* keys16 = (const uint16_t*)kc + at;
            /* Keys four at a time when slots are adjacent: dot4's rows are dot1's arithmetic, in four
               independent chains instead of one (the dot products were latency-bound), and an fp32
               cache's keys against all the kv head's heads at once (dot4_rows: each dot4's bits). */
            int64_t jq = j0;
            if (kv->dt == KV_F32 && cst[2] == hd && e1 - e0 <= 16)
                for (; jq + 4 <= end; jq += 4) {
                    float d4[16 * 4];
                    dot4_rows(q + e0 * hd, e1 - e0, keys + jq * hd, hd, d4);
                    for (int64_t e = e0; e < e1; e++)
                        for (int r = 0; r < 4; r++) {
                            float a = d4[(e - e0) * 4 + r] * scale;
                            if (slopes) a += slopes[ha + e] * (float)(jq + r - p);
                            sc[e * s + jq + r] = a;
                            if (a > mx[e]) mx[e] = a;
                        }
                }
            for (int64_t e = e0; e < e1; e++) {
                const float* qe = q + e * hd;
                float* sce = sc + e * s;
                float m = mx[e], slope = slopes ? slopes[ha + e] : 0.0f;
                int64_t j = jq;
                for (; cst[2] == hd && j + 4 <= end; j += 4) {
                    float d4[4];
                    if (kv->dt == KV_F32) dot4(qe, keys + j * hd, hd, d4);
                    else dot4_kv16(qe, keys16 + j * hd, kv->dt, hd, d4);
                    for (int r = 0; r < 4; r++) {
                        float a = d4[r] * scale;
                        if (slopes) a += slope * (float)(j + r - p);
                        sce[j + r] = a;
                        if (a > m) m = a;
                    }
                }
                for (; j < end; j++) {
                    float a = (kv->dt == KV_F32 ? dot1(qe, keys + j * cst[2], hd)
                                                : dot1_kv16(qe, keys16 + j * cst[2], kv->dt, hd)) * scale;
                    if (slopes) a += slope * (float)(j - p);
                    sce[j] = a;
                    if (a > m) m = a;
                }
                mx[e] = m;
            }
        }
        j0 = end;
    }
    for (int64_t e = 0; e < g; e++) {
        float* sce = sc + e * s;
        float total = 0.0f;
        int64_t j = lo;
#ifdef __AVX2__
        __m256 tv = _mm256_setzero_ps(), mv = _mm256_set1_ps(mx[e]);
        for (; j + 8 <= last + 1; j += 8) {
            __m256 ex = exp8(_mm256_sub_ps(_mm256_loadu_ps(sce + j), mv));
            _mm256_storeu_ps(sce + j, ex);
            tv = _mm256_add_ps(tv, ex);
        }
        total = hsum(tv);
#endif
        for (; j <= last; j++) { sce[j] = expf(sce[j] - mx[e]); total += sce[j]; }
        float* o = part ? part + e * (hd + 2) : out + i * hq * hd + (ha + e) * hd;
        if (part) {  /* a chunk of a split row: its maximum, sum and unnormalized weighted values */
            o[0] = mx[e], o[1] = total, o += 2;
            for (int64_t d = 0; d < hd; d++) o[d] = 0.0f;
            continue;
        }
        /* the weights sc / total, divided here in vectors (the same quotients) and not once a position in
           the weighted sum: a scalar division's latency per value */
        j = lo;
#ifdef __AVX2__
        const __m256 tv8 = _mm256_set1_ps(total);
        for (; j + 8 <= last + 1; j += 8) _mm256_storeu_ps(sce + j, _mm256_div_ps(_mm256_loadu_ps(sce + j), tv8));
#endif
        for (; j <= last; j++) sce[j] /= total;
        for (int64_t d = 0; d < hd; d++) o[d] = 0.0f;
    }
    for (int64_t j0 = lo; j0 <= last;) {  /* RUNS blocks at a time: one table look-up per block, not per value */
        Run runs[RUNS];
        int nr = 0;
        for (; nr < RUNS && j0 <= last; nr++) {
            int64_t end = (j0 / kv->bs + 1) * kv->bs;
            if (end > last + 1) end = last + 1;
            runs[nr] = (Run){kv_offset(kv, cst, bi, j0) - j0 * cst[2], j0, end};  /* + j * cst[2]: value j */
            j0 = end;
        }
        for (int64_t kh = ha / gq; kh * gq < hb; kh++) {
            int64_t e0 = (kh * gq > ha ? kh * gq : ha) - ha, e1 = ((kh + 1) * gq < hb ? (kh + 1) * gq : hb) - ha;
            for (int64_t e = e0; e < e1; e++)
                weigh_runs(part ? part + e * (hd + 2) + 2 : out + i * hq * hd + (ha + e) * hd, sc + e * s, vc, kh * cst[1],
                           runs, nr, cst[2], kv->dt, hd);
        }
    }
}

/* Query heads a row-by-row attention task takes: a whole row's, or fewer when the rows are too few
   to give each thread two tasks (one row on 2 threads: tasks of 2 heads). */
static inline int64_t heads_per_task(int64_t n, int64_t hq, int nth) {
    int64_t gt = hq * n / (2 * nth);
    return gt < 1 ? 1 : (gt > hq ? hq : gt);
}

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

/* A step's row-by-row attention as tasks, planned once per call (the rows' positions are the same
   for every layer). A row whose visible keys reach past one SPLIT_KEYS-position chunk attends chunk
   by chunk, each chunk (all its heads) a task that leaves the chunk's maximum, sum and unnormalized
   weighted values per head, merged in chunk order after a barrier: one long row alone gave its 9
   query heads to 2 threads (5 and 4), both reading the kv head between them (SmolLM2, one row at
   2,048 positions through 16-slot blocks: 10.6-12.4 -> 6.4-7.7 ms for the 30 layers; 16 such rows
   level). The chunks are cut at fixed positions, so a row's bits depend on its own position only,
   not on the threads or the rows beside it; rows within one chunk keep the single pass. */
#define SPLIT_KEYS 512
static inline int64_t attention_cost(int64_t p, int64_t window) {
    return p + 1 - window_start(p, window) + 16;  /* a task's keys, + its fixed work */
}
static inline int64_t first_chunk(int64_t p, int64_t window) { return window_start(p, window) / SPLIT_KEYS; }
static inline int64_t key_chunks(int64_t p, int64_t window) { return p / SPLIT_KEYS - first_chunk(p, window) + 1; }

typedef struct { int64_t i, ha, hb, k0, k1, cost; float* part; } Task;  /* keys [k0, k1); part NULL: the whole row */
typedef struct { int64_t i, chunks; float* part; } Split;              /* a split row's partial results */
typedef struct { Task* tasks; Split* splits; float* parts; int64_t ntasks, nsplits, heads; } Plan;

static void free_plan(Plan* pl) { free(pl->tasks); free(pl->splits); free(pl->parts); }

/* Plans the attention of n rows at pos (nth threads); -1 when memory cannot be allocated. pl->heads:
   the most query heads a task takes (its scratch: heads * (hd + positions) floats). */
static int plan_attention(Plan* pl, const int64_t* pos, int64_t n, int64_t hq, int64_t hd, int64_t window,
                          int nth) {
    int64_t gt = heads_per_task(n, hq, nth), count = 0, nparts = 0, k = 0, off = 0;
    *pl = (Plan){NULL, NULL, NULL, 0, 0, gt};
    for (int64_t i = 0; i < n; i++) {
        int64_t c = key_chunks(pos[i], window);
        if (c > 1) count += c, nparts += c * hq * (hd + 2), pl->nsplits++;
        else count += (hq + gt - 1) / gt;
    }
    pl->tasks = (Task*)malloc(sizeof(Task) * (count + 1));
    pl->splits = (Split*)malloc(sizeof(Split) * (pl->nsplits + 1));
    pl->parts = (float*)malloc(sizeof(float) * (nparts + 1));
    if (!pl->tasks || !pl->splits || !pl->parts) { free_plan(pl); return -1; }
    if (pl->nsplits) pl->heads = hq;
    pl->nsplits = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t p = pos[i], lo = window_start(p, window), c = key_chunks(p, window), c0 = first_chunk(p, window);
        if (c == 1) {
            for (int64_t ha = 0; ha < hq; ha += gt)
                pl->tasks[k++] = (Task){i, ha, ha + gt < hq ? ha + gt : hq, 0, INT64_MAX,
                                        (ha + gt < hq ? gt : hq - ha) * attention_cost(p, window), NULL};
            continue;
        }
        pl->splits[pl->nsplits++] = (Split){i, c, pl->parts + off};
        for (int64_t r = 0; r < c; r++) {
            int64_t k0 = (c0 + r) * SPLIT_KEYS, k1 = k0 + SPLIT_KEYS;
            int64_t keys = (p < k1 - 1 ? p : k1 - 1) - (lo > k0 ? lo : k0) + 1;
            pl->tasks[k++] = (Task){i, 0, hq, k0, k1, hq * (keys + 16), pl->parts + off + r * hq * (hd + 2)};
        }
        off += c * hq * (hd + 2);
    }
    pl->ntasks = k;
    return 0;
}

/* This thread's share [lo, hi) of the tasks, balanced by their cost (the keys they read, + 16 for a
   task's fixed work) rather than by count: rows of an engine step sit at different positions, and
   equal counts left one thread waiting for the other (16 rows at positions 16-170: 3.1 against 5.3 ms
   a step). Which thread runs a task changes none of its bits. */
static void share_tasks(const Task* tasks, int64_t n, int tid, int nth, int64_t* lo, int64_t* hi) {
    int64_t total = 0, done = 0;
    for (int64_t k = 0; k < n; k++) total += tasks[k].cost;
    *lo = *hi = n;
    for (int64_t k = 0; k < n; k++) {
        int64_t owner = (2 * done + tasks[k].cost) * nth / (2 * total);  /* whose part holds the task's middle */
        done += tasks[k].cost;
        if (owner >= tid && *lo == n) *lo = k;
        if (owner > tid) { *hi = k; return; }
    }
}

/* Split row sp's head h: out = sum over chunks of exp(m_c - M) * acc_c / sum of exp(m_c - M) * l_c,
   in chunk order. */
static void merge_chunks(const Split* sp, int64_t h, int64_t hq, int64_t hd, float* out) {
    float mmax = -INFINITY, total = 0.0f;
    for (int64_t c = 0; c < sp->chunks; c++) {
        float m = sp->part[(c * hq + h) * (hd + 2)];
        mmax = m > mmax ? m : mmax;
    }
    for (int64_t c = 0; c < sp->chunks; c++) {
        const float* pc = sp->part + (c * hq + h) * (hd + 2);
        total += expf(pc[0] - mmax) * pc[1];
    }
    float* o = out + sp->i * hq * hd + h * hd;
    for (int64_t d = 0; d < hd; d++) o[d] = 0.0f;
    for (int64_t c = 0; c < sp->chunks; c++) {
        const float* pc = sp->part + (c * hq + h) * (hd + 2);
        float w = expf(pc[0] - mmax) / total;
        int64_t d = 0;
#ifdef __AVX2__
        __m256 wv = _mm256_set1_ps(w);
        for (; d + 8 <= hd; d += 8)
            _mm256_storeu_ps(o + d, _mm256_fmadd_ps(wv, _mm256_loadu_ps(pc + 2 + d), _mm256_loadu_ps(o + d)));
#endif
        for (; d < hd; d++) o[d] += w * pc[2 + d];
    }
}

/* This thread's part of a planned attention: its tasks, then (after wait(arg), a barrier of the
   caller's: omp's or the fused layer's) its share of the split rows' merges. */
static void run_attention(const Plan* pl, int tid, int nth, void (*wait)(void*), void* arg, const float* qkv,
                          const float* cs, const float* sn, const float* qscale, const int64_t* pos, const void* kc,
                          const void* vc, const int64_t* cst, const Blocks* kv, const float* slopes, float* out, int64_t t,
                          int64_t hq, int64_t hk, int64_t hd, float scale, int64_t window, float* q, int64_t s) {
    int64_t lo, hi;
    share_tasks(pl->tasks, pl->ntasks, tid, nth, &lo, &hi);
    for (int64_t k = lo; k < hi; k++) {
        const Task* tk = pl->tasks + k;
        attend(qkv, cs, sn, qscale, pos, kc, vc, cst, kv, slopes, out, tk->i, tk->ha, tk->hb, t, hq, hk, hd, scale, window,
               tk->k0, tk->k1, tk->part, q, q + pl->heads * hd, s);
    }
    if (!pl->nsplits) return;
    wait(arg);
    for (int64_t k = pl->nsplits * hq * tid / nth; k < pl->nsplits * hq * (tid + 1) / nth; k++)
        merge_chunks(pl->splits + k / hq, k % hq, hq, hd, out);
}

static void omp_wait(void* unused) {
    (void)unused;
    #pragma omp barrier
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
