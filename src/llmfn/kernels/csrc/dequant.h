/* int4 / int8 weights back to fp32, row by row (llmfn_int4_dequant / llmfn_int8_dequant for whole
   weights, and the fused decode step's embedding rows, decode.c). Included by quant.h after row_f32. */
#ifndef LLMFN_DEQUANT_H
#define LLMFN_DEQUANT_H

/* Row j of an int4 / int8 weight [n, k] in fp32: q * s + o (int4, two roundings) and q * s (int8), as
   llmfn.kernels.quant dequantizes; scale and offset hoisted per group, so the inner loops vectorize. */
static inline void int4_dequant_row(const uint8_t* q, const void* s, const void* o, int half, int64_t j, int64_t k,
                                    int64_t g, float* w) {
    int64_t G = k / g;
    float sb[G], ob[G];
    const float *sr = row_f32(s, half, j, G, sb), *orow = row_f32(o, half, j, G, ob);
    for (int64_t gi = 0; gi < G; gi++) {
        const uint8_t* qb = q + j * (k / 2) + gi * (g / 2);
        float* wg = w + gi * g;
        const float sc = sr[gi], of = orow[gi];
        for (int64_t t = 0; t < g / 2; t++) {
            wg[2 * t] = (float)(qb[t] & 15) * sc + of;
            wg[2 * t + 1] = (float)(qb[t] >> 4) * sc + of;
        }
    }
}

static inline void int8_dequant_row(const int8_t* q, const void* s, int half, int64_t j, int64_t k, int64_t g,
                                    float* w) {
    int64_t G = k / g;
    float sb[G];
    const float* sr = row_f32(s, half, j, G, sb);
    for (int64_t gi = 0; gi < G; gi++) {
        const float sc = sr[gi];
        for (int64_t t = gi * g; t < (gi + 1) * g; t++) w[t] = (float)q[j * k + t] * sc;
    }
}

/* w [n, k] fp32, row by row as above. */
int llmfn_int4_dequant(const uint8_t* q, const void* s, const void* o, float* w,
                        int64_t n, int64_t k, int64_t g, int half, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t j = 0; j < n; j++) int4_dequant_row(q, s, o, half, j, k, g, w + j * k);
    return 0;
}

int llmfn_int8_dequant(const int8_t* q, const void* s, float* w, int64_t n, int64_t k, int64_t g, int half,
                       int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t j = 0; j < n; j++) int8_dequant_row(q, s, half, j, k, g, w + j * k);
    return 0;
}
#endif
