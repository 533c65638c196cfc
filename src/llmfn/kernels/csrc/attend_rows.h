/* Decode-sized steps' attention, row by row (llmfn_qkv_attention's and the fused decoder layer's for
   steps of up to 16 positions a row): tasks of several query heads of a row, or of a 512-position chunk
   of a long row's keys, balanced between the threads by the keys they read. Included by attend.h after
   the cache helpers it uses (Blocks, kv_offset, rotate, window_start) and decode.c's dot products. */
#ifndef LLMFN_ATTEND_ROWS_H
#define LLMFN_ATTEND_ROWS_H

/* Runs of adjacent cache slots, block by block: values j0 .. j1 - 1 at at + j * stride (elements). */
typedef struct { int64_t at, j0, j1; } Run;
#define RUNS 8  /* runs weighed at a time: SmolLM2's 8 blocks of values of a kv head are 32 KB, in L1 */

/* weigh_runs: o[0 .. hd) += w[j] * value j over the runs, in position order, one FMA per element
   (without a vector unit: multiply, then add); vals: the cache (element type dt), plus off elements.
   For a head dim of NV vectors of W floats the accumulators stay in registers over the runs (the
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
/* The query heads of kv head kh (gq of them a kv head) within a task's [ha, hb), as [e0, e1) from ha. */
static inline void heads_of(int64_t kh, int64_t gq, int64_t ha, int64_t hb, int64_t* e0, int64_t* e1) {
    *e0 = (kh * gq > ha ? kh * gq : ha) - ha;
    *e1 = ((kh + 1) * gq < hb ? (kh + 1) * gq : hb) - ha;
}

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
        for (int64_t kh = ha / gq; kh * gq < hb; kh++) {
            int64_t e0, e1;
            heads_of(kh, gq, ha, hb, &e0, &e1);
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
            int64_t e0, e1;
            heads_of(kh, gq, ha, hb, &e0, &e1);
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

#endif
