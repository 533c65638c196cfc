/* The token choice of llmfn.sampling.sample for CPU rows: the nucleus (top_p), the min_p cut and the
   exponential race over what they allow: the token with the largest p / -log(u), u the row's hash
   noise for that token id. The torch version (sampling._allowed, sampling._race_torch) builds [B, V]
   masks and hashes, takes the log of and compares every allowed token: ~0.5-2 ms a row at V = 49152.
   Here the nucleus is sorted from its head only, and without a top_p cut the most likely token's race
   comes first: every other token can only beat it when its u >= exp(-p / best) > 1 - p / best, so
   most are dropped after the hash, before the log (a strict bound: no winner is ever dropped, and
   ties still go to the lowest id). */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

/* sampling._mix32 on uint32: the int64 version there keeps the same low 32 bits. */
static inline uint32_t mix32(uint32_t x) {
    x = (x ^ (x >> 16)) * 0x45D9F3Bu;
    x = (x ^ (x >> 16)) * 0x45D9F3Bu;
    return x ^ (x >> 16);
}

/* sampling._row_keys: the row's noise key from its seed (both 32-bit halves) and step. */
static inline uint32_t row_key(int64_t seed, int64_t step) {
    uint64_t s = (uint64_t)seed;
    return mix32((mix32((uint32_t)s) ^ mix32((uint32_t)(s >> 32))) + (uint32_t)(uint64_t)step);
}

/* sampling._noise: uniform in (0, 1), exact in double. */
static inline double noise(uint32_t key, uint32_t id) {
    return ((double)mix32(key + mix32(id) * 0x9E3779B1u) + 0.5) / 4294967296.0;
}

/* Token i's race: its probability over Exp(1) noise. */
static inline double race_of(const float* p, uint32_t key, int64_t i) {
    return (double)p[i] / -log(noise(key, (uint32_t)i));
}

/* Enters token i's race: the largest race wins, the lower id among equal ones (NaN never enters). */
static inline void enter(double race, int64_t i, double* best, int64_t* win) {
    if (race > *best || (race == *best && i < *win)) *best = race, *win = i;
}

typedef struct { float p; int32_t id; } Cand;

static int by_rank(const void* a, const void* b) {  /* more likely first, then the lower id */
    const Cand *x = (const Cand*)a, *y = (const Cand*)b;
    if (x->p != y->p) return x->p > y->p ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* The nucleus of row p: the most likely tokens (equal ones by lower id) while the mass ranked before
   a token, summed in double and rounded to float as torch's cumsum does, is < top_p. Written to
   cand[0, n), n returned. Sorts only the head: the tokens >= a bound that falls 64-fold until the
   nucleus ends inside it. */
static int64_t nucleus(const float* p, int64_t v, float pmax, float top_p, Cand* cand) {
    for (float bound = pmax / 64.0f;; bound = bound > 1e-30f ? bound / 64.0f : 0.0f) {
        int64_t n = 0;
        for (int64_t i = 0; i < v; i++)
            if (p[i] > 0.0f && p[i] >= bound) cand[n++] = (Cand){p[i], (int32_t)i};
        qsort(cand, (size_t)n, sizeof(Cand), by_rank);
        double mass = 0.0;
        for (int64_t k = 0; k < n; k++) {
            mass += cand[k].p;
            if (!((float)mass - cand[k].p < top_p)) return k;
        }
        if (bound == 0.0f) return n;
    }
}

#define CHUNK 64

/* The largest value of p (NaN skipped; -inf when all are), and whether p holds a NaN. Four
   independent maxima: one chain waited on each max's latency (~7 us for 49,152 values). */
static float max_of(const float* p, int64_t v, int* nan) {
    float mx = -INFINITY;
    int64_t i = 0;
    *nan = 0;
#ifdef __AVX2__
    __m256 m[4], unordered = _mm256_setzero_ps();
    for (int j = 0; j < 4; j++) m[j] = _mm256_set1_ps(-INFINITY);
    for (; i + 32 <= v; i += 32)
        for (int j = 0; j < 4; j++) {
            __m256 x = _mm256_loadu_ps(p + i + 8 * j);
            m[j] = _mm256_max_ps(x, m[j]);  /* a NaN x keeps m[j] */
            unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        }
    float l[8];
    _mm256_storeu_ps(l, _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3])));
    for (int j = 0; j < 8; j++) mx = l[j] > mx ? l[j] : mx;
    *nan = _mm256_movemask_ps(unordered) != 0;
#endif
    for (; i < v; i++) {
        mx = p[i] > mx ? p[i] : mx;
        *nan |= p[i] != p[i];
    }
    return mx;
}

/* The first index of p holding x (NaN: the first NaN); v when none does. */
static int64_t first_of(const float* p, int64_t v, float x) {
    int64_t i = 0;
    int any_nan = x != x;
#ifdef __AVX2__
    const __m256 xv = _mm256_set1_ps(x);
    for (; i + 8 <= v; i += 8) {
        __m256 y = _mm256_loadu_ps(p + i);
        int hit = _mm256_movemask_ps(any_nan ? _mm256_cmp_ps(y, y, _CMP_UNORD_Q) : _mm256_cmp_ps(y, xv, _CMP_EQ_OQ));
        if (hit) return i + __builtin_ctz((unsigned)hit);
    }
#endif
    for (; i < v; i++)
        if (any_nan ? p[i] != p[i] : p[i] == x) return i;
    return v;
}

/* The first index of the largest value, NaN skipped (torch's max; 0 in a row of NaN), or with
   nan_wins the first NaN's where there is one (torch's argmax). */
static int64_t first_max(const float* p, int64_t v, int nan_wins) {
    int nan;
    float mx = max_of(p, v, &nan);
    int64_t i = first_of(p, v, nan && nan_wins ? NAN : mx);
    return i < v ? i : 0;
}

/* The race over every token with p >= cut (and p > 0), and top: the winner, v when none compares. */
static int64_t race_all(const float* p, int64_t v, int64_t top, float cut, uint32_t key) {
    double best = -INFINITY;
    int64_t win = v;
    enter(race_of(p, key, top), top, &best, &win);
    int prune = best > 0.0 && best < INFINITY;
    for (int64_t i0 = 0; i0 < v; i0 += CHUNK) {
        int64_t n = v - i0 < CHUNK ? v - i0 : CHUNK;
        /* skip when u < 1 - 1e-9 - p / best: then race < best by a margin far above rounding */
        double inv = prune ? (1.0 + 1e-9) / best : 0.0, lim = prune ? 1.0 - 1e-9 : -INFINITY;
        uint8_t hit[CHUNK];
        int any = 0;
        for (int64_t j = 0; j < n; j++) {
            float pj = p[i0 + j];
            double u = noise(key, (uint32_t)(i0 + j));
            hit[j] = (uint8_t)((pj > 0.0f) & (pj >= cut) & !(u < lim - (double)pj * inv));  /* & not &&: vectorized */
        }
        for (int64_t j = 0; j < n; j++) any |= hit[j];
        if (!any) continue;
        for (int64_t j = 0; j < n; j++) {
            if (!hit[j]) continue;
            enter(race_of(p, key, i0 + j), i0 + j, &best, &win);
            prune = best > 0.0 && best < INFINITY;
        }
    }
    return win;
}

/* out[r] = torch.argmax(x[r]) for x [b, v], v >= 1 (greedy decoding: torch's argmax took 66 us for
   one 49,152-token row, this ~3 in C, 4-8 from Python). */
int llmfn_argmax(const float* x, int64_t* out, int64_t b, int64_t v) {
    for (int64_t r = 0; r < b; r++) out[r] = first_max(x + r * v, v, 1);
    return 0;
}

/* out[r]: the token row r of probs [b, v] draws, as sampling._race_torch(probs, sampling._allowed(
   probs, top_p, min_p), sampling._row_keys(seed, step)) (equal probabilities at the nucleus' edge taken
   by lower id); v when no race compares (NaN probabilities). -1 when out of memory. */
int llmfn_sample_race(const float* probs, const float* top_p, const float* min_p, const int64_t* seed,
                      const int64_t* step, int64_t* out, int64_t b, int64_t v) {
    Cand* cand = NULL;
    for (int64_t r = 0; r < b; r++) {
        const float* p = probs + r * v;
        const uint32_t key = row_key(seed[r], step[r]);
        int64_t top = first_max(p, v, 0);
        float cut = min_p[r] * p[top];
        if (!(top_p[r] < 1.0f)) {
            out[r] = race_all(p, v, top, cut, key);
            continue;
        }
        if (!cand && !(cand = (Cand*)malloc(sizeof(Cand) * (size_t)v))) return -1;
        int64_t n = nucleus(p, v, p[top], top_p[r], cand), win = v;
        double best = -INFINITY;
        for (int64_t k = -1; k < n; k++) {  /* -1: top, always allowed */
            int64_t i = k < 0 ? top : cand[k].id;
            if (k < 0 || p[i] >= cut) enter(race_of(p, key, i), i, &best, &win);
        }
        out[r] = win;
    }
    free(cand);
    return 0;
}
