/* int4 / int8 weights against int8 activations on AMX tiles (Intel Sapphire Rapids and later; why:
   kernels/cpu_quant.py). Part of quant.h. The activations are quantized as q8dot.h does (per block of
   32, d = max|x| / 127, the same rounding); each block of 32 then meets 16 weight rows at once, from
   AMX_MIN_ROWS activation rows on in tile products (tdpbsud: signed activations by the int4 weights'
   unsigned nibbles; tdpbssd: by int8 weights; 16 activation rows a tile), below in VNNI dot
   products. Unlike q8dot.h's lanes, every output sums whole blocks, in one fixed order whatever the
   rows and weight rows beside it or the path that gave the (exact, integer) block sums:

       acc = 0;  for each block b:  acc = fma((float)(q_b . xq_b), s[b / bpg] * d_b, acc)
                 for each group g:   acc = fma(o_g, xs_g, acc)          (int4; xs as in q8dot.h)

   so a row's result is the same alone, in a batch, in the fused layer or in a tile's last rows.
   The weights stay in llmfn.kernels.quant's row layout: each tile's 16 weight rows are transposed
   into the B tile's layout (4 bytes of K per column) on the fly, 16 x 16 dwords at a time. A
   stand-alone prototype with a copy of the weights in tile layout was no faster for layers that
   stay in L2 (SmolLM2's gate/up, one thread, one row: 67 us vs 63 on the fly) and 20% faster for the
   49152-row lm_head streamed from memory; not worth a second copy of every weight. */
#ifndef LLMFN_AMX_H
#define LLMFN_AMX_H
#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
#include <omp.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#define LLMFN_AMX 1

/* Linux grants a process AMX's tile state on request (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA);
   without it (an old kernel, a sandbox) the q8dot.h kernels run instead. */
static int amx_ready(void) {
    static int state;  /* 0 not asked yet, 1 granted, -1 refused */
    int s = __atomic_load_n(&state, __ATOMIC_ACQUIRE);
    if (!s) {
        s = syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : -1;
        __atomic_store_n(&state, s, __ATOMIC_RELEASE);
    }
    return s > 0;
}

/* Fewest activation rows that take the tiles (fewer take VNNI, see amx_tile). */
#ifndef AMX_MIN_ROWS
#define AMX_MIN_ROWS 4
#endif

/* GCC 12's tile intrinsics are asm statements that take pointers without telling the compiler that
   they read or write memory (its _tile_loadconfig declares 8 bytes read of the 64): without this
   compiler barrier around them, stores to the tile config or to a B tile's buffer were dropped as
   dead (the fused layer died on SIGILL) and loads of stored results could be hoisted above the store. */
#define AMX_FENCE() __asm__ volatile("" ::: "memory")

/* Tiles 0-3: int32 results of four blocks [rows, 16]; 4 and 6: activations [rows, 32 bytes]; 5 and 7:
   weights [8, 64 bytes] (two pairs, so a block's loads need not wait for the last block's product).
   rows = min(m, 16); more rows go in passes of 16 (the last pass overlapping). */
static void amx_start(int64_t m) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } __attribute__((packed, aligned(64))) c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    uint8_t rows = (uint8_t)(m < 16 ? m : 16);
    for (int t = 0; t < 4; t++) { c.rows[t] = rows; c.colsb[t] = 64; }
    c.rows[4] = c.rows[6] = rows; c.colsb[4] = c.colsb[6] = 32;
    c.rows[5] = c.rows[7] = 8; c.colsb[5] = c.colsb[7] = 64;
    AMX_FENCE();
    _tile_loadconfig(&c);
    AMX_FENCE();
}

/* The 16 x 16 dwords of r transposed: lane j of r[i] becomes lane i of r[j]. */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
        r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
    }
}

/* Activation rows quantized for amx_tile (all [m, ...] row-major): xq [k] int8; d [k / 32] the blocks'
   scales; qs [k / 32] the blocks' sums of xq; for int4, xs [k / g] as quantize_q8 computes them. int4
   order: within each 8 activations of a block the even ones then the odd ones (the low and high
   nibbles of 4 weight bytes, one dword of the B tile); int8: as is. */
typedef struct { int8_t* xq; float* d; float* xs; int32_t* qs; } AmxActs;

/* The bytes of scratch amx_quantize needs for m rows of k. */
static inline int64_t amx_scratch_bytes(int64_t m, int64_t k) { return m * k + 4 * m * (k / 32) * 3; }

/* x [m, k] quantized into buf (amx_scratch_bytes) for bits-bit weights in groups of g. */
static AmxActs amx_quantize(const float* x, void* buf, int bits, int64_t m, int64_t k, int64_t g) {
    int64_t nb = k / 32, G = k / g;
    AmxActs a = {(int8_t*)buf, NULL, NULL, NULL};
    a.d = (float*)(a.xq + m * k);
    a.qs = (int32_t*)(a.d + m * nb);
    a.xs = bits == 4 ? (float*)(a.qs + m * nb) : NULL;
    for (int64_t i = 0; i < m * nb; i++) {
        int8_t v[32];
        a.d[i] = q8_block(x + i * 32, v);
        int32_t qsum = 0;
        for (int t = 0; t < 32; t++) {
            a.xq[i * 32 + (a.xs ? (t & ~7) + (t & 1) * 4 + ((t & 7) >> 1) : t)] = v[t];
            qsum += v[t];
        }
        a.qs[i] = qsum;
        if (a.xs) {
            int64_t row = i / nb, b = i % nb, gi = row * G + b / (g / 32);
            if (b % (g / 32) == 0) a.xs[gi] = 0.0f;
            a.xs[gi] += a.d[i] * (float)qsum;
        }
    }
    return a;
}

/* One block's tile product into tile T through activation tile A and weight tile B: activation rows
   [r0, r0 + 16) (fewer when m < 16) of block b. */
#define AMX_DOT(T, A, B, SIGNED_W, bt, xq, r0, b, k)                             \
    do {                                                                         \
        _tile_loadd(B, (bt), 64);                                                \
        _tile_loadd(A, (xq) + (r0) * (k) + (b) * 32, (k));                       \
        _tile_zero(T);                                                           \
        if (SIGNED_W) _tile_dpbssd(T, A, B); else _tile_dpbsud(T, A, B);         \
    } while (0)

/* Group gi's scales (or offsets) of weight rows [j0, j0 + nr) of p [n, G] (fp16 when half), one lane a
   row (0 past nr), by gathers: a 16-bit value is gathered as the 32 bits it starts, which past the
   last row's last value would read 2 bytes beyond the buffer, so the last tile's rows go one by one. */
static inline __m512 amx_column(const void* p, int half, int64_t j0, int64_t nr, int64_t n, int64_t G, int64_t gi) {
    __mmask16 rows = (__mmask16)((1u << nr) - 1);
    __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                     _mm512_set1_epi32((int)G));
    if (!half) return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), rows, idx, (const float*)p + j0 * G + gi, 4);
    const uint16_t* h = (const uint16_t*)p + j0 * G + gi;
    if (j0 + 16 >= n) {
        float v[16] = {0};
        for (int64_t c = 0; c < nr; c++) v[c] = f16_to_f32(h[c * G]);
        return _mm512_loadu_ps(v);
    }
    __m512i w = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), rows, idx, h, 2);
    return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(w));
}

/* out [m, 16] = rows [0, m) of the activations against weight rows [j0, j0 + nr) (nr <= 16; the rest
   of each out row is left as garbage): int4 (bits 4, o the offsets) or int8 (bits 8, o NULL) in
   llmfn.kernels.quant's layouts, s / o fp16 when half; a from amx_quantize;
   with tiles (m >= AMX_MIN_ROWS) amx_start(m) ran on this thread. Fewer rows take VNNI dot products
   against the same transposed weights (vpdpbusd with the activations' 4 bytes broadcast), which give
   the same int32 block sums: the results do not depend on which path a row took. */
static void amx_tile(int bits, const AmxActs* a, const void* q, const void* s, const void* o, int half, int64_t j0,
                     int64_t nr, int64_t m, int64_t n, int64_t k, int64_t g, float* out) {
    const int8_t* xq = a->xq;
    const float *d = a->d, *xs = a->xs;
    const int32_t* qs = a->qs;
    int64_t nb = k / 32, G = k / g, bpg = g / 32, rowb = bits == 4 ? k / 2 : k, step = bits == 4 ? 4 : 2;
    int tiles = m >= AMX_MIN_ROWS;
    __m512 acc[m];
    for (int64_t r = 0; r < m; r++) acc[r] = _mm512_setzero_ps();
    uint8_t bt[4][512] __attribute__((aligned(64)));
    int32_t ct[4][256] __attribute__((aligned(64)));
    const uint8_t* base = (const uint8_t*)q + j0 * rowb;
    const __m512i m4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8((char)0x80);
    for (int64_t b = 0; b < nb; b += step) {
        int nbl = nb - b < step ? (int)(nb - b) : (int)step;
        __mmask64 bytes = nbl * 32 * bits / 8 >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << (nbl * 32 * bits / 8)) - 1;
        __m512i r[16];
        for (int c = 0; c < 16; c++) {
            const uint8_t* p = base + c * rowb + b * 32 * bits / 8;
            _mm_prefetch((const char*)p + 16 * rowb, _MM_HINT_T0);  /* the next tile's same bytes */
            r[c] = c < nr ? _mm512_maskz_loadu_epi8(bytes, p) : _mm512_setzero_si512();
        }
        transpose16(r);
        __m512i wv[4][8];  /* B tile row p of block bl: int4 dword p / 2's low (even p) or high nibbles */
        for (int bl = 0; bl < nbl; bl++)
            for (int p = 0; p < 8; p++)
                wv[bl][p] = bits == 8 ? r[8 * bl + p]
                          : _mm512_and_si512(p & 1 ? _mm512_srli_epi16(r[4 * bl + p / 2], 4) : r[4 * bl + p / 2], m4);
        if (tiles)
            for (int bl = 0; bl < nbl; bl++)
                for (int p = 0; p < 8; p++) _mm512_store_si512(bt[bl] + 64 * p, wv[bl][p]);
        else if (bits == 8)  /* vpdpbusd takes unsigned weights: w + 128, and the block's 128 * sum(x) back out */
            for (int bl = 0; bl < nbl; bl++)
                for (int p = 0; p < 8; p++) wv[bl][p] = _mm512_xor_si512(wv[bl][p], flip);
        __m512 sv[4];
        for (int bl = 0; bl < nbl; bl++) sv[bl] = amx_column(s, half, j0, nr, n, G, (b + bl) / bpg);
        int64_t rows = m < 16 ? m : 16;
        for (int64_t done = 0; done < m;) {  /* passes of 16 rows; the last one ends at row m */
            int64_t r0 = done + rows <= m ? done : m - rows;
            if (tiles) {
                AMX_FENCE();
                AMX_DOT(0, 4, 5, bits == 8, bt[0], xq, r0, b, k);
                if (nbl > 1) AMX_DOT(1, 6, 7, bits == 8, bt[1], xq, r0, b + 1, k);
                if (nbl > 2) AMX_DOT(2, 4, 5, bits == 8, bt[2], xq, r0, b + 2, k);
                if (nbl > 3) AMX_DOT(3, 6, 7, bits == 8, bt[3], xq, r0, b + 3, k);
                _tile_stored(0, ct[0], 64);
                if (nbl > 1) _tile_stored(1, ct[1], 64);
                if (nbl > 2) _tile_stored(2, ct[2], 64);
                if (nbl > 3) _tile_stored(3, ct[3], 64);
                AMX_FENCE();
            }
            for (int64_t i = done - r0; i < rows; i++) {  /* rows an overlapping last pass already has: skipped */
                int64_t row = r0 + i;
                for (int bl = 0; bl < nbl; bl++) {
                    __m512i dot;
                    if (tiles) dot = _mm512_load_si512(ct[bl] + 16 * i);
                    else {
                        const int32_t* x4 = (const int32_t*)(xq + row * k + (b + bl) * 32);
                        dot = bits == 8 ? _mm512_set1_epi32(-128 * qs[row * nb + b + bl]) : _mm512_setzero_si512();
                        for (int p = 0; p < 8; p++) dot = _mm512_dpbusd_epi32(dot, wv[bl][p], _mm512_set1_epi32(x4[p]));
                    }
                    __m512 scale = _mm512_mul_ps(sv[bl], _mm512_set1_ps(d[row * nb + b + bl]));
                    acc[row] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[row]);
                }
            }
            done = r0 + rows;
        }
    }
    if (o)
        for (int64_t gi = 0; gi < G; gi++) {
            __m512 ov = amx_column(o, half, j0, nr, n, G, gi);
            for (int64_t r = 0; r < m; r++) acc[r] = _mm512_fmadd_ps(ov, _mm512_set1_ps(xs[r * G + gi]), acc[r]);
        }
    for (int64_t r = 0; r < m; r++) _mm512_storeu_ps(out + r * 16, acc[r]);
}
#undef AMX_DOT

/* y [m, n] (+)= x @ W^T + bias for weight rows [16 tlo, 16 thi): llmfn_int4_linear's and
   llmfn_int8_linear's act8 arithmetic on AMX (then "+ bias", then with add "y +", as the fused layer
   asks). Configures and releases this thread's tiles. */
static void amx_rows(int bits, const AmxActs* a, const void* q, const void* s, const void* o, int half,
                     const float* bias, float* y, int add, int64_t m, int64_t n, int64_t k, int64_t g, int64_t tlo,
                     int64_t thi) {
    float* out = (float*)scratch(sizeof(float) * m * 16);
    if (m >= AMX_MIN_ROWS) amx_start(m);
    for (int64_t t = tlo; t < thi; t++) {
        int64_t j0 = 16 * t, nr = n - j0 < 16 ? n - j0 : 16;
        amx_tile(bits, a, q, s, o, half, j0, nr, m, n, k, g, out);
        for (int64_t r = 0; r < m; r++)
            for (int64_t c = 0; c < nr; c++) {  /* lin_store's arithmetic; through it, 32 rows ran 12% slower */
                float v = bias ? out[r * 16 + c] + bias[j0 + c] : out[r * 16 + c];
                y[r * n + j0 + c] = add ? y[r * n + j0 + c] + v : v;
            }
    }
    if (m >= AMX_MIN_ROWS) _tile_release();
    free(out);
}

/* llmfn_int4_linear / llmfn_int8_linear with int8 activations on AMX. */
static int amx_linear(int bits, const float* x, const void* q, const void* s, const void* o, float* y, int64_t m,
                      int64_t n, int64_t k, int64_t g, int half, int nthreads) {
    void* buf = scratch(amx_scratch_bytes(m, k));
    AmxActs a = amx_quantize(x, buf, bits, m, k, g);
    #pragma omp parallel num_threads(nthreads)
    {
        int64_t tiles = (n + 15) / 16, tid = omp_get_thread_num(), nth = omp_get_num_threads();
        amx_rows(bits, &a, q, s, o, half, NULL, y, 0, m, n, k, g, tiles * tid / nth, tiles * (tid + 1) / nth);
    }
    free(buf);
    return 0;
}
#endif

/* Whether int8 activations run on AMX tiles here: built for it and granted by the kernel. */
int llmfn_amx_active(void) {
#ifdef LLMFN_AMX
    return amx_ready();
#else
    return 0;
#endif
}
#endif
