"""C kernels for fp32 decode on CPU: matrix-vector products, RMSNorm, SiLU-gate and the fused
rope + KV-cache write + attention of a decode step. Each has a torch reference (kernels/reference.py
and the model code) that it is tested against; `llmfn.kernels.ops` picks these for fp32 CPU tensors
with at most MAX_ROWS rows, the torch path otherwise.

Why C: batch-1 decode is bound by streaming the weights. Over SmolLM2-135M's layer shapes (2 cores,
`python benchmarks/kernels.py --cpu`) MKL's sgemm reads them at ~18 GB/s (column-major, its best
layout; ~12 GB/s row-major), this kernel at ~29 GB/s: four weight rows stream at once against the
activation rows held in L1. The other ops replace chains of small torch calls (RMSNorm was five,
rope + cache write + attention about fifteen) whose per-call overhead, not their arithmetic, made
up a third of a decode step.

Every output element is one dot product summed in a fixed order that depends on its column only,
never on the number of rows or on the thread that computes it, so results are batch-invariant
(the engine relies on it) and deterministic.
"""

from __future__ import annotations

import ctypes
import os

import torch

from llmfn import cbuild

# Most activation rows the kernels take (decode steps, small engine batches); more go to torch.
MAX_ROWS = 16

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX2__
#include <immintrin.h>
static inline float hsum(__m256 t) {
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_shuffle_ps(v, v, 1));
    return _mm_cvtss_f32(v);
}
#endif

/* Dot products of four consecutive weight rows w (stride k) with x: out[0..3]. */
static inline void dot4(const float* x, const float* w, int64_t k, float* out) {
    const float *w0 = w, *w1 = w + k, *w2 = w + 2 * k, *w3 = w + 3 * k;
    int64_t c = 0;
    float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; c + 8 <= k; c += 8) {
        __m256 xv = _mm256_loadu_ps(x + c);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + c), xv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + c), xv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + c), xv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + c), xv, a3);
    }
    a[0] = hsum(a0); a[1] = hsum(a1); a[2] = hsum(a2); a[3] = hsum(a3);
#endif
    for (; c < k; c++) {
        a[0] += w0[c] * x[c]; a[1] += w1[c] * x[c]; a[2] += w2[c] * x[c]; a[3] += w3[c] * x[c];
    }
    for (int i = 0; i < 4; i++) out[i] = a[i];
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

/* y [m, n] = x [m, k] @ w [n, k]^T (+ b [n]). Weight rows go in blocks of four, each read from
   memory once and reused from L1 by every activation row. */
int llmfn_gemv(const float* x, const float* w, const float* b, float* y, int64_t m, int64_t n, int64_t k,
               int nthreads) {
    int64_t blocks = (n + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t bi = 0; bi < blocks; bi++) {
        int64_t j = bi * 4;
        for (int64_t r = 0; r < m; r++) {
            float out[4];
            if (j + 4 <= n) dot4(x + r * k, w + j * k, k, out);
            else for (int64_t i = 0; j + i < n; i++) out[i] = dot1(x + r * k, w + (j + i) * k, k);
            for (int64_t i = 0; i < 4 && j + i < n; i++) y[r * n + j + i] = b ? out[i] + b[j + i] : out[i];
        }
    }
    return 0;
}

/* y [m, d] = w * (x * rsqrt(mean(x^2) + eps)), the reference's fp32 order. */
int llmfn_rms_norm(const float* x, const float* w, float* y, int64_t m, int64_t d, float eps) {
    for (int64_t r = 0; r < m; r++) {
        const float* xr = x + r * d;
        float ss = 0.0f;
        for (int64_t i = 0; i < d; i++) ss += xr[i] * xr[i];
        float inv = 1.0f / sqrtf(ss / (float)d + eps);
        for (int64_t i = 0; i < d; i++) y[r * d + i] = w[i] * (xr[i] * inv);
    }
    return 0;
}

/* y [m, f] = silu(gu[:, :f]) * gu[:, f:] for gu [m, 2f] (the fused gate / up projection). */
int llmfn_silu_mul(const float* gu, float* y, int64_t m, int64_t f) {
    for (int64_t r = 0; r < m; r++)
        for (int64_t i = 0; i < f; i++) {
            float g = gu[r * 2 * f + i];
            y[r * f + i] = g / (1.0f + expf(-g)) * gu[r * 2 * f + f + i];
        }
    return 0;
}

static inline void rotate(const float* x, const float* cs, const float* sn, float* out, int64_t hd) {
    int64_t h = hd / 2;
    for (int64_t i = 0; i < h; i++) {
        float x1 = x[i], x2 = x[h + i];
        out[i] = x1 * cs[i] - x2 * sn[i];
        out[h + i] = x2 * cs[i] + x1 * sn[i];
    }
}

/* One decode step's attention for a layer, from the fused qkv projection:
   qkv [b, t, (hq + 2 hk) * hd]; cos, sin [b, t, hd/2] (NULL: no rope); qscale [b, t] (NULL: none);
   pos [b, t]; caches [b, hk, s, hd] with element strides cst[0..2] for b, hk, s and contiguous
   rows (slot j holds position j); slopes [hq] (NULL: no ALiBi);
   window 0 for none. Writes the rotated keys and the values into the caches at pos, then
   out [b, t, hq * hd] = softmax(scale * q.k + alibi, visible keys) . v. Returns -1, writing nothing,
   when a position is outside [0, s). */
int llmfn_qkv_attention(const float* qkv, const float* cs, const float* sn, const float* qscale,
                        const int64_t* pos, float* kc, float* vc, const int64_t* cst, const float* slopes,
                        float* out, int64_t b, int64_t t, int64_t hq, int64_t hk, int64_t hd, int64_t s,
                        float scale, int64_t window, int nthreads) {
    int64_t row = (hq + 2 * hk) * hd, half = hd / 2;
    for (int64_t i = 0; i < b * t; i++)
        if (pos[i] < 0 || pos[i] >= s) return -1;
    for (int64_t i = 0; i < b * t; i++) {
        int64_t bi = i / t, p = pos[i];
        for (int64_t h = 0; h < hk; h++) {
            const float* k = qkv + i * row + (hq + h) * hd;
            const float* v = k + hk * hd;
            float* kd = kc + bi * cst[0] + h * cst[1] + p * cst[2];
            float* vd = vc + bi * cst[0] + h * cst[1] + p * cst[2];
            if (cs) rotate(k, cs + i * half, sn + i * half, kd, hd);
            else for (int64_t d = 0; d < hd; d++) kd[d] = k[d];
            for (int64_t d = 0; d < hd; d++) vd[d] = v[d];
        }
    }
    int64_t tasks = b * t * hq;
    #pragma omp parallel num_threads(nthreads)
    {
        float* q = (float*)malloc(sizeof(float) * (hd + s));
        float* sc = q + hd;
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; task++) {
            int64_t i = task / hq, h = task % hq, bi = i / t, p = pos[i], kh = h / (hq / hk);
            const float* qs = qkv + i * row + h * hd;
            if (cs) rotate(qs, cs + i * half, sn + i * half, q, hd);
            else for (int64_t d = 0; d < hd; d++) q[d] = qs[d];
            if (qscale) for (int64_t d = 0; d < hd; d++) q[d] *= qscale[i];
            const float* kh_ = kc + bi * cst[0] + kh * cst[1];
            const float* vh = vc + bi * cst[0] + kh * cst[1];
            int64_t lo = (window > 0 && p - window + 1 > 0) ? p - window + 1 : 0;
            float mx = -INFINITY;
            for (int64_t j = lo; j <= p; j++) {
                float a = dot1(q, kh_ + j * cst[2], hd) * scale;
                if (slopes) a += slopes[h] * (float)(j - p);
                sc[j] = a;
                if (a > mx) mx = a;
            }
            float total = 0.0f;
            for (int64_t j = lo; j <= p; j++) { sc[j] = expf(sc[j] - mx); total += sc[j]; }
            float* o = out + i * hq * hd + h * hd;
            for (int64_t d = 0; d < hd; d++) o[d] = 0.0f;
            for (int64_t j = lo; j <= p; j++) {
                const float* vj = vh + j * cst[2];
                float wgt = sc[j] / total;
                int64_t d = 0;
#ifdef __AVX2__
                __m256 wv = _mm256_set1_ps(wgt);
                for (; d + 8 <= hd; d += 8)
                    _mm256_storeu_ps(o + d, _mm256_fmadd_ps(wv, _mm256_loadu_ps(vj + d), _mm256_loadu_ps(o + d)));
#endif
                for (; d < hd; d++) o[d] += wgt * vj[d];
            }
        }
        free(q);
    }
    return 0;
}
"""

_p, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "llmfn_gemv": [_p, _p, _p, _p, _i64, _i64, _i64, _i32],
    "llmfn_rms_norm": [_p, _p, _p, _i64, _i64, _f32],
    "llmfn_silu_mul": [_p, _p, _i64, _i64],
    "llmfn_qkv_attention": [_p, _p, _p, _p, _p, _p, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _i64, _i64, _f32, _i64, _i32],
}


_lib: ctypes.CDLL | None | bool = False  # False until the first _load


def _load() -> ctypes.CDLL | None:
    global _lib
    if _lib is False:
        _lib = None if os.environ.get("LLMFN_CPU_KERNELS", "c") == "torch" else cbuild.load("llmfn_cpu", SOURCE, _SIGNATURES)
    return _lib


def available() -> bool:
    """True when the compiled kernels load (compiling them on first use)."""
    return _load() is not None


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def takes(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether these kernels serve x (rows = all but the last dim) with the given operands: fp32 CPU
    tensors outside autograd and torch.compile, at most MAX_ROWS rows. Called per op: kept cheap."""
    if x.numel() > MAX_ROWS * x.shape[-1]:
        return False
    for t in (x, *others):
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.requires_grad:
            return False
    return not torch.compiler.is_compiling() and _load() is not None


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., k] @ w [n, k]^T (+ b [n]); w row-major contiguous."""
    n, k = w.shape
    x = x.contiguous()
    y = x.new_empty(*x.shape[:-1], n)
    b = None if b is None else b.contiguous()
    _load().llmfn_gemv(x.data_ptr(), w.data_ptr(), _ptr(b), y.data_ptr(), x.numel() // k, n, k, torch.get_num_threads())
    return y


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    d = x.shape[-1]
    _load().llmfn_rms_norm(x.data_ptr(), w.contiguous().data_ptr(), y.data_ptr(), x.numel() // d, d, eps)
    return y


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [..., 2f] = cat(gate, up)."""
    gate_up = gate_up.contiguous()
    f = gate_up.shape[-1] // 2
    y = gate_up.new_empty(*gate_up.shape[:-1], f)
    _load().llmfn_silu_mul(gate_up.data_ptr(), y.data_ptr(), gate_up.numel() // (2 * f), f)
    return y


def qkv_attention(qkv, cos, sin, q_scale, positions, k_cache, v_cache, num_heads, num_kv_heads, scale,
                  alibi_slopes=None, window=None) -> torch.Tensor:
    """See kernels.qkv_attention. The caches are donated (written in place); they may be views
    (the engine passes the first slots of each row) with the same strides and contiguous rows."""
    b, t, _ = qkv.shape
    hd = k_cache.shape[-1]
    out = qkv.new_empty(b, t, num_heads * hd)
    strides = (ctypes.c_int64 * 3)(*k_cache.stride()[:3])
    if q_scale is not None:
        q_scale = q_scale.reshape(b, t)
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.float()
    args = [None if a is None else a.contiguous() for a in (qkv, cos, sin, q_scale, positions, alibi_slopes)]
    status = _load().llmfn_qkv_attention(
        *(_ptr(a) for a in args[:5]), k_cache.data_ptr(), v_cache.data_ptr(), strides, _ptr(args[5]),
        out.data_ptr(),
        b, t, num_heads, num_kv_heads, hd, k_cache.shape[2], scale, window or 0, torch.get_num_threads(),
    )
    if status:
        raise IndexError(f"positions must lie in [0, {k_cache.shape[2]}) (the KV cache length)")
    return out

