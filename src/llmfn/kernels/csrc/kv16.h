/* The KV cache's element types for decode.c's attention: fp32, or 16-bit floats (bf16 / fp16) that
   are widened to fp32 when read (exact) and rounded to nearest even when written, so the attention
   math is fp32 either way and only the stored keys and values lose bits (once, when written).

   Rounding is torch's, bit for bit (the reference stores with `Tensor.to`, the tests compare caches
   with torch.equal): bf16 by the integer round-half-to-even of c10::BFloat16 (NaN -> 0x7FC0), not
   AVX-512 BF16's VCVTNEPS2BF16, which flushes denormals to zero; fp16 by F16C's VCVTPS2PH in
   round-to-nearest-even (IEEE, denormals kept), and without F16C by the bit arithmetic of c10::Half. */
#ifndef LLMFN_KV16_H
#define LLMFN_KV16_H
#include <stdint.h>
#include <math.h>
#include <string.h>
#include "bf16.h"  /* bf16_to_f32 */
#ifdef __AVX2__
#include <immintrin.h>
#endif

enum { KV_F32 = 0, KV_BF16 = 1, KV_F16 = 2 };

static inline int64_t kv_size(int dt) { return dt == KV_F32 ? 4 : 2; }

static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if (f != f) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}


/* fp16 <-> fp32 without F16C (c10::Half's fp16_ieee_from_fp32_value / fp16_ieee_to_fp32_value:
   the rounding is done by an fp32 addition, hence round-to-nearest-even). */
static inline uint16_t f32_to_f16(float f) {
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    uint32_t w = f32_bits(f), shl1_w = w + w, sign = w & 0x80000000u, bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = bits_f32((bias >> 1) + 0x07800000u) + base;
    uint32_t bits = f32_bits(base);
    uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    float normalized = bits_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    float denormalized = bits_f32((two_w >> 17) | (126u << 23)) - 0.5f;
    return bits_f32(sign | (two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized)));
}

/* One element / eight / sixteen elements of a 16-bit cache, widened (exact). */
static inline float kv_widen1(uint16_t h, int dt) { return dt == KV_BF16 ? bf16_to_f32(h) : f16_to_f32(h); }
#ifdef __AVX2__
static inline __m256 kv_widen8(const uint16_t* p, int dt) {
    __m128i h = _mm_loadu_si128((const __m128i*)p);
    return dt == KV_BF16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}
#endif
#ifdef __AVX512F__
static inline __m512 kv_widen16(const uint16_t* p, int dt) {
    __m256i h = _mm256_loadu_si256((const __m256i*)p);
    return dt == KV_BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
}
#endif

/* dst[0..n) (a 16-bit cache) = x[0..n), rounded to nearest even. */
static inline void kv_round(const float* x, int dt, uint16_t* dst, int64_t n) {
    int64_t i = 0;
#ifdef __AVX2__
    if (dt == KV_BF16) {
        const __m256i half = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1), qnan = _mm256_set1_epi32(0x7FC0);
        for (; i + 8 <= n; i += 8) {
            __m256 v = _mm256_loadu_ps(x + i);
            __m256i u = _mm256_castps_si256(v);
            __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, half), _mm256_and_si256(_mm256_srli_epi32(u, 16), one));
            r = _mm256_srli_epi32(r, 16);
            r = _mm256_blendv_epi8(r, qnan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
            __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);  /* lanes 0, 2 */
            _mm_storeu_si128((__m128i*)(dst + i), _mm256_castsi256_si128(packed));
        }
    } else {
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i*)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    }
#endif
    if (dt == KV_BF16) for (; i < n; i++) dst[i] = f32_to_bf16(x[i]);
    else for (; i < n; i++) dst[i] = f32_to_f16(x[i]);
}

#endif
