"""C kernels for decode on CPU: matrix-vector products, RMSNorm, SiLU-gate, the fused rope +
KV-cache write + attention of a step, and all decoder layers of a step in one call (fp32, int4,
int8 or bf16 weights; one library from csrc/decode.c, with the attention of csrc/attend.h (and attend_rows.h), the
int4 / int8 matrix code of csrc/quant.h that kernels/cpu_quant.py calls and the bf16 code of
csrc/bf16.h that kernels/bf16.py calls). Each has a torch reference (kernels/reference.py and the model code)
that it is tested against; `llmfn.kernels.ops`, `llmfn.linear` and `models/llama.py` pick these for
fp32 CPU inputs of at most MAX_ROWS rows (qkv_attention also for prompt chunks of TILED_ROWS positions
or more, in tiles), the torch path otherwise.

Why C: batch-1 decode is bound by streaming the weights. Over SmolLM2-135M's layer shapes (2 cores,
`make bench-kernels`) MKL's sgemm reads them at ~18 GB/s (column-major, its best layout; ~12 GB/s
row-major), this kernel at ~27-29 GB/s, the machine's peak: four weight rows stream at once against
the activation rows held in L1. The other ops replace chains of small torch calls (RMSNorm was five,
rope + cache write + attention about fifteen) whose per-call overhead, not their arithmetic, made
up a third of a decode step; `decoder_layers` then removes the per-layer calls and OpenMP wake-ups.

Every output element is one dot product summed in a fixed order that depends on its column only,
never on the number of rows or on the thread that computes it, so results are batch-invariant
(the engine relies on it) and deterministic. The C code trusts the shapes it gets: every wrapper
below checks them first.
"""

from __future__ import annotations

import ctypes
import math
import os
import weakref

import torch
import torch.nn.functional as F

from llmfn import cbuild

# Most activation rows the kernels take (decode steps, small engine batches); more go to torch.
MAX_ROWS = 16  # at most 16: the fused layers keep a row's outputs in float[16]
# Prompt chunks of at least this many positions per sequence take qkv_attention's tiles (csrc/attend.h
# TILED_ROWS, llmfn_tiled_rows()), whatever their number of rows.
TILED_ROWS = MAX_ROWS + 1

_p, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
# The whole library's functions, csrc/quant.h's int4 / int8 ones (kernels/cpu_quant.py) included.
_SIGNATURES = {
    "llmfn_int4_linear": [_p, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _i32, _i32, _i32],
    "llmfn_int8_linear": [_p, _p, _p, _p, _i64, _i64, _i64, _i64, _i32, _i32, _i32],
    "llmfn_int4_dequant": [_p, _p, _p, _p, _i64, _i64, _i64, _i32, _i32],
    "llmfn_int8_dequant": [_p, _p, _p, _i64, _i64, _i64, _i32, _i32],
    "llmfn_decoder_layers": [_p, _p, _i64, _p, _p, _p, _p, _p, _p, _i64, _p, _p, _i64, _i64, _p, *[_i64] * 7, _f32,
                             _f32, _i64, _i32, _p],
    "llmfn_gemv": [_p, _p, _p, _p, _i64, _i64, _i64, _i32],
    "llmfn_bf16_gemv": [_p, _p, _p, _p, _i64, _i64, _i64, _i32],
    "llmfn_bf16_lanes": [],
    "llmfn_rms_norm": [_p, _p, _p, _i64, _i64, _f32],
    "llmfn_silu_mul": [_p, _p, _i64, _i64],
    "llmfn_qkv_attention": [_p, _p, _p, _p, _p, _p, _p, _i64, _p, _p, _i64, _i64, _p, _p, *[_i64] * 5, _f32, _i64,
                            _i32],
    "llmfn_decode_occupancy": [],
    "llmfn_amx_active": [],
    "llmfn_row_tiles": [],
    "llmfn_tiled_rows": [],
}


_lib: ctypes.CDLL | None | bool = False  # False until the first library() call


def library() -> ctypes.CDLL | None:
    """The compiled kernels (csrc/decode.c, built on first use by llmfn.cbuild), or None: no C
    compiler, or LLMFN_CPU_KERNELS=torch."""
    global _lib
    if _lib is False:
        _lib = cbuild.cpu_kernels("llmfn_cpu", "decode.c", _SIGNATURES)
    return _lib


def available() -> bool:
    """True when the compiled kernels load (compiling them on first use)."""
    return library() is not None


def ptr(t: torch.Tensor | None):
    """The address the C code reads (None for an absent operand). t must outlive the call: pass a
    contiguous tensor held by a name, never `x.contiguous()` made inline (its copy may be freed first)."""
    return None if t is None else t.data_ptr()


def takes(x: torch.Tensor, *others: torch.Tensor, max_rows: int | None = MAX_ROWS) -> bool:
    """Whether these kernels serve x (rows = all but the last dim) with the given operands: fp32 CPU
    tensors outside autograd and torch.compile, at most max_rows rows (None: any number, for the
    row-wise ops). Called per op: kept cheap."""
    if (max_rows is not None and x.numel() > max_rows * x.shape[-1]) or not fp32_cpu(x, *others):
        return False
    return not torch.compiler.is_compiling() and library() is not None


def takes_qkv_attention(qkv: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether qkv_attention serves qkv [b, t, ...]: a decode-sized step (at most MAX_ROWS rows, each
    query row by row) or prompt chunks of TILED_ROWS positions or more (in tiles)."""
    return takes(qkv, *others, max_rows=None if qkv.shape[1] >= TILED_ROWS else MAX_ROWS)


def check_shapes(ok: bool, op: str, *ts: torch.Tensor | None, detail: str = "") -> None:
    """The C code trusts its shapes: a mismatch is an error here, as in the torch op it replaces."""
    if not ok:
        shapes = ", ".join(["None" if t is None else str(list(t.shape)) for t in ts] + ([detail] if detail else []))
        raise ValueError(f"{op}: shapes do not fit ({shapes})")


# The KV cache element types the C attention reads and writes (csrc/kv16.h): a 16-bit cache is widened
# to fp32 when read and rounded to nearest even when written; the attention math is fp32.
KV_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def cache_layout_ok(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """K and V caches the C attention reads: CPU tensors of one KV_DTYPES dtype outside autograd, same
    shape and strides, contiguous head rows (views of the first slots, as the engine passes, are fine)."""
    return (
        k_cache.shape == v_cache.shape
        and k_cache.stride() == v_cache.stride()
        and k_cache.stride(-1) == 1
        and k_cache.dtype == v_cache.dtype
        and k_cache.dtype in KV_DTYPES
        and k_cache.device.type == v_cache.device.type == "cpu"
        and not (k_cache.requires_grad or v_cache.requires_grad)
    )


def fp32_cpu(*ts: torch.Tensor) -> bool:
    """fp32 CPU tensors outside autograd."""
    for t in ts:
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.requires_grad:
            return False
    return True


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def dense_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w^T (+ b) in torch, for the rows these kernels do not take: oneDNN's linear for fp32 CPU
    operands and a contiguous w (prefill: 8% faster than MKL's sgemm end to end), else F.linear."""
    operands = (w,) if b is None else (w, b)
    if _ONEDNN and w.is_contiguous() and fp32_cpu(x, *operands) and not torch.compiler.is_compiling():
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., k] @ w [n, k]^T (+ b [n]); w row-major contiguous."""
    n, k = w.shape
    check_shapes(x.shape[-1] == k and (b is None or tuple(b.shape) == (n,)), "linear", x, w, b)
    x = x.contiguous()
    y = x.new_empty(*x.shape[:-1], n)
    b = None if b is None else b.contiguous()
    library().llmfn_gemv(x.data_ptr(), w.data_ptr(), ptr(b), y.data_ptr(), x.numel() // k, n, k, decode_threads.threads())
    return y


def bf16_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., k] fp32 @ w [n, k]^T (+ b [n] fp32) for a bf16 w, row-major contiguous: fp32 results,
    the weights widened exactly (csrc/bf16.h)."""
    n, k = w.shape
    ok = w.dtype == torch.bfloat16 and w.is_contiguous() and x.shape[-1] == k
    check_shapes(ok and (b is None or tuple(b.shape) == (n,)), "bf16_linear", x, w, b)
    x = x.contiguous()
    y = x.new_empty(*x.shape[:-1], n)
    b = None if b is None else b.contiguous()
    library().llmfn_bf16_gemv(x.data_ptr(), w.data_ptr(), ptr(b), y.data_ptr(), x.numel() // k, n, k,
                              decode_threads.threads())
    return y


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    check_shapes(tuple(w.shape) == (x.shape[-1],), "rms_norm", x, w)
    x = x.contiguous()
    y = torch.empty_like(x)
    d = x.shape[-1]
    library().llmfn_rms_norm(x.data_ptr(), w.contiguous().data_ptr(), y.data_ptr(), x.numel() // d, d, eps)
    return y


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [..., 2f] = cat(gate, up)."""
    check_shapes(gate_up.shape[-1] % 2 == 0, "silu_mul", gate_up)
    gate_up = gate_up.contiguous()
    f = gate_up.shape[-1] // 2
    y = gate_up.new_empty(*gate_up.shape[:-1], f)
    library().llmfn_silu_mul(gate_up.data_ptr(), y.data_ptr(), gate_up.numel() // (2 * f), f)
    return y


def _step_args(op: str, cos, sin, q_scale, positions, alibi_slopes, b: int, t: int, hd: int, num_heads: int):
    """The per-step tensors both attention entry points hand to C, shape-checked and contiguous:
    (cos, sin, q_scale [b, t], positions, alibi_slopes fp32), None where absent."""
    check_shapes(
        tuple(positions.shape) == (b, t)
        and all(c is None or tuple(c.shape) == (b, t, hd // 2) for c in (cos, sin))
        and (q_scale is None or q_scale.numel() == b * t)
        and (alibi_slopes is None or tuple(alibi_slopes.shape) == (num_heads,)),
        op, positions, cos, q_scale, alibi_slopes,
    )
    q_scale = None if q_scale is None else q_scale.reshape(b, t)
    alibi_slopes = None if alibi_slopes is None else alibi_slopes.float()
    return tuple(None if a is None else a.contiguous() for a in (cos, sin, q_scale, positions, alibi_slopes))


def _block_args(op: str, k_cache: torch.Tensor, blocks: torch.Tensor | None, b: int):
    """(table, blocks per row, block length) for C: a cache of blocks [N, hk, S, hd] read through
    blocks [b, nb] (int32 block ids < N), or without a table one block of S slots per row (N == b)."""
    n, s = k_cache.shape[-4], k_cache.shape[-2]
    if blocks is None:
        check_shapes(n == b, op, k_cache, detail=f"{b} rows and no block table")
        return None, 1, s
    ok = blocks.dtype == torch.int32 and blocks.dim() == 2 and blocks.shape[0] == b and blocks.is_contiguous()
    check_shapes(ok and blocks.device.type == "cpu", op, k_cache, blocks, detail="blocks: int32 [rows, nb]")
    if blocks.numel() and not 0 <= int(blocks.min()) <= int(blocks.max()) < n:
        raise IndexError(f"{op}: block ids must lie in [0, {n}) (the cache's blocks)")
    return blocks, blocks.shape[1], s


def _position_error(status: int, slots: int) -> None:
    if status == -2:
        raise MemoryError("qkv_attention: out of memory for the attention's scratch")
    if status:
        raise IndexError(f"positions must lie in [0, {slots}) (the KV cache length)")


def qkv_attention(qkv, cos, sin, q_scale, positions, k_cache, v_cache, num_heads, num_kv_heads, scale,
                  alibi_slopes=None, window=None, blocks=None) -> torch.Tensor:
    """See kernels.qkv_attention. The caches [N, hk, S, hd] are donated (written in place); they may
    be views with the same strides and contiguous rows; blocks [b, nb] int32 or None as there."""
    b, t, _ = qkv.shape
    hd = k_cache.shape[-1]
    check_shapes(
        qkv.shape[2] == (num_heads + 2 * num_kv_heads) * hd
        and num_heads % num_kv_heads == 0
        and cache_layout_ok(k_cache, v_cache)
        and k_cache.dim() == 4
        and k_cache.shape[1] == num_kv_heads,
        "qkv_attention", qkv, k_cache,
    )
    table, nb, bs = _block_args("qkv_attention", k_cache, blocks, b)
    cos, sin, q_scale, positions, alibi_slopes = _step_args(
        "qkv_attention", cos, sin, q_scale, positions, alibi_slopes, b, t, hd, num_heads
    )
    qkv = qkv.contiguous()
    out = qkv.new_empty(b, t, num_heads * hd)
    strides = (ctypes.c_int64 * 3)(*k_cache.stride()[:3])
    status = library().llmfn_qkv_attention(
        qkv.data_ptr(), ptr(cos), ptr(sin), ptr(q_scale), positions.data_ptr(), k_cache.data_ptr(),
        v_cache.data_ptr(), KV_DTYPES[k_cache.dtype], strides, ptr(table), nb, bs, ptr(alibi_slopes), out.data_ptr(), b, t, num_heads,
        num_kv_heads, hd, scale, window or 0, decode_threads.threads(),
    )
    _position_error(status, nb * bs)
    return out


def _lin_fields(w, b: torch.Tensor | None) -> list[int] | None:
    """A linear's Lin struct fields [q, scales, offsets, bias, kind, group, half], or None when the fused
    layer cannot take the weight (quantized leaves describe themselves: llmfn.kernels.quant `fused_args`)."""
    if b is not None and not (b.dtype == torch.float32 and b.device.type == "cpu" and b.is_contiguous()):
        return None
    bias = 0 if b is None else b.data_ptr()
    if isinstance(w, torch.Tensor):
        if w.dtype != torch.float32 or w.device.type != "cpu" or not w.is_contiguous() or w.requires_grad:
            return None
        return [w.data_ptr(), 0, 0, bias, 0, 0, 0]
    args = w.fused_args() if hasattr(w, "fused_args") else None
    return None if args is None else [args[1], args[2], args[3], bias, args[0], args[4], args[5]]


def _norm_ptr(w: torch.Tensor) -> int | None:
    ok = w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous()
    return w.data_ptr() if ok else None


# id(layer) -> (weak references to its values, its Layer struct): building the struct costs ~50 us a
# layer (a third of a int4 decode step's overhead), so it is built once per layer dict. A hit must
# find the very same value objects (weights are immutable pytree leaves, never resized in place).
_LAYER_CACHE: dict[int, tuple[tuple, tuple, ctypes.Array | None]] = {}


def layer_fields(layer: dict, cfg) -> ctypes.Array | None:
    """The C Layer struct of a Llama-layout layer (models/llama.py), or None when a weight is of a
    kind or shape the fused layer does not take (the C code trusts the shapes: checked here)."""
    return stack_fields([layer], cfg)[0]


def stack_fields(layers: list[dict], cfg) -> list[ctypes.Array | None]:
    """`layer_fields` of each layer of a stack, reading the settings once (a decode step asks for all)."""
    dims = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    mode = os.environ.get("LLMFN_QUANT_ACTIVATIONS")  # picks the int4 kind (cpu_quant.int8_activations)
    return [_cached_fields(layer, (dims, mode)) for layer in layers]


def _cached_fields(layer: dict, key: tuple) -> ctypes.Array | None:
    hit = _LAYER_CACHE.get(id(layer))
    if hit is not None and hit[1] == key and len(hit[0]) == len(layer) and all(map(_is, hit[0], layer.values())):
        return hit[2]
    fields = _layer_fields(layer, *key[0])
    try:
        refs = tuple(weakref.ref(v) for v in layer.values())
    except TypeError:  # a value that cannot be weakly referenced: not cached
        return fields
    if len(_LAYER_CACHE) > 4096:  # entries of dropped models
        _LAYER_CACHE.clear()
    _LAYER_CACHE[id(layer)] = (refs, key, fields)
    return fields


def _is(ref: weakref.ref, value) -> bool:
    return ref() is value


def _layer_fields(layer: dict, d: int, f: int, hq: int, hk: int, hd: int) -> ctypes.Array | None:
    shapes = {"attn_norm": (d,), "mlp_norm": (d,), "wqkv": ((hq + 2 * hk) * hd, d), "bqkv": ((hq + 2 * hk) * hd,),
              "wo": (d, hq * hd), "bo": (d,), "w_gate_up": (2 * f, d), "b_gate_up": (2 * f,), "w_down": (d, f),
              "b_down": (d,)}  # fmt: skip
    if any(name in layer and tuple(layer[name].shape) != shape for name, shape in shapes.items()):
        return None
    parts = [
        _norm_ptr(layer["attn_norm"]),
        _lin_fields(layer["wqkv"], layer.get("bqkv")),
        _lin_fields(layer["wo"], layer.get("bo")),
        _norm_ptr(layer["mlp_norm"]),
        _lin_fields(layer["w_gate_up"], layer.get("b_gate_up")),
        _lin_fields(layer["w_down"], layer.get("b_down")),
    ]
    if any(p is None for p in parts):
        return None
    flat = [parts[0], *parts[1], *parts[2], parts[3], *parts[4], *parts[5]]
    return (ctypes.c_int64 * len(flat))(*flat)


class DecodeThreads:
    """How many threads the fused decode step runs on: torch's count, except after a step in which
    the threads got less than OCCUPIED of the time they were in it as CPU time (other processes took
    their cores), when the next steps run on one thread: 16 steps, twice as many each time it happens
    again (up to 256), before all threads are tried again. The step's phases meet at ~210 barriers,
    each waiting for the slowest thread: on 2 cores shared with other work, 2 threads decoded SmolLM2
    int4 at ~5 tok/s where 1 thread made ~18-35. The thread count never changes results (each output
    has one owner and one summation order). OCCUPIED: with another process spinning on one of the two
    cores a step's occupancy is 0.5; on a quiet machine its median is 1.0 (5th percentile 0.99), with
    rare steps at 0.71-0.8 (3 in 838 on the 2-core VM), which at 0.8 sent 16 steps to one thread each
    time (3-8% of a quiet decode's speed)."""

    OCCUPIED, FIRST_SOLO, MAX_SOLO = 0.65, 16, 256

    def __init__(self):
        self.solo_left, self.solo_next = 0, self.FIRST_SOLO
        self.started = False  # the first step also starts OpenMP's threads: its occupancy says nothing

    def threads(self) -> int:
        """The count for the decode step's other kernels (the lm_head, a gemv): this step's."""
        return 1 if self.solo_left > 0 else torch.get_num_threads()

    def pick(self) -> int:
        """The count for a fused decode step (one step of the solo stretch used up)."""
        threads = self.threads()
        self.solo_left = max(0, self.solo_left - 1)
        return threads

    def observe(self, threads: int, occupancy: float) -> None:
        """After a step on `threads` threads that had `occupancy` of their time as CPU time."""
        if threads == 1 or not self.started:
            self.started = self.started or threads > 1
            return
        if occupancy < self.OCCUPIED:
            self.solo_left, self.solo_next = self.solo_next, min(2 * self.solo_next, self.MAX_SOLO)
        else:
            self.solo_next = self.FIRST_SOLO


decode_threads = DecodeThreads()


def step_fields(embed, norm: torch.Tensor, head) -> list[int] | None:
    """A whole decode step's ends for `decoder_layers(step=...)`: the embedding table (fp32, or an int4 /
    int8 leaf of fp32 rows), the final norm and the head (the lm_head, any weight the fused layer
    takes, over the embedding's vocabulary); None when the C code cannot take them."""
    e, n, h = _lin_fields(embed, None), _norm_ptr(norm), _lin_fields(head, None)
    if e is None or n is None or h is None or e[4] not in (0, 1, 2, 3, 4) or embed.dtype != torch.float32:
        return None
    return [*e, n, *h] if tuple(embed.shape) == tuple(head.shape) == (head.shape[0], norm.shape[0]) else None


def decoder_layers(x: torch.Tensor, fields: list, cfg, cos, sin, q_scale, positions, k_cache, v_cache,
                   alibi_slopes=None, blocks=None, step: tuple | None = None) -> torch.Tensor:
    """Pre-norm Llama decoder layers (fields: their `layer_fields`) applied to x [b, t, D] in one C call.

    x is donated: the residual stream is updated in place and returned. The caches [L, N, hk, S, hd]
    (read through blocks [b, nb] int32, or one block per row when None) are written in place as in
    qkv_attention. Bitwise what the separate kernels (linear, rms_norm, qkv_attention, silu_mul) give,
    with one OpenMP region per step instead of eight per layer. step: (ids [b, t] int64 contiguous,
    `step_fields`, logits [b, t, V] fp32 contiguous) runs the whole step: x is first filled with the
    embedding rows at ids and logits receive head(rms(x)) (as llama.forward computes them)."""
    b, t, d = x.shape
    hd = k_cache.shape[-1]
    if (d, hd) != (cfg.hidden_size, cfg.head_dim) or (k_cache.shape[0], k_cache.shape[2]) != (len(fields), cfg.num_kv_heads):
        raise ValueError(f"decoder_layers: x {list(x.shape)} / cache {list(k_cache.shape)} do not fit the config")
    if not x.is_contiguous():
        raise ValueError("decoder_layers: x must be contiguous (it is updated in place)")
    check_shapes(cache_layout_ok(k_cache, v_cache), "decoder_layers", k_cache, v_cache)
    table, nb, bs = _block_args("decoder_layers", k_cache, blocks, b)
    cos, sin, q_scale, positions, alibi_slopes = _step_args(
        "decoder_layers", cos, sin, q_scale, positions, alibi_slopes, b, t, hd, cfg.num_heads
    )
    strides = (ctypes.c_int64 * 4)(*k_cache.stride()[1:4], k_cache.stride(0))
    layers = (ctypes.c_void_p * len(fields))(*(ctypes.addressof(f) for f in fields))
    ends = None
    if step is not None:
        ids, ends_fields, logits = step
        vocab = logits.shape[-1]
        check_shapes(ids.shape == x.shape[:2] and ids.dtype == torch.int64 and ids.is_contiguous()
                     and logits.shape == (b, t, vocab) and logits.is_contiguous(), "decoder_layers", ids, logits)
        ends = (ctypes.c_int64 * 18)(ids.data_ptr(), *ends_fields, logits.data_ptr(), vocab)
    threads = decode_threads.pick()
    status = library().llmfn_decoder_layers(
        x.data_ptr(), layers, len(fields), ptr(cos), ptr(sin), ptr(q_scale), positions.data_ptr(),
        k_cache.data_ptr(), v_cache.data_ptr(), KV_DTYPES[k_cache.dtype], strides, ptr(table), nb, bs, ptr(alibi_slopes), b * t, t, d,
        cfg.num_heads, cfg.num_kv_heads, hd, cfg.intermediate_size, cfg.rms_norm_eps, 1.0 / math.sqrt(hd),
        cfg.sliding_window or 0, threads, ends,
    )
    decode_threads.observe(threads, library().llmfn_decode_occupancy() / 1000)
    if status == -4:
        raise IndexError("decoder_layers: a token id is outside the embedding table")
    if status == -2:
        raise ValueError(f"decoder_layers takes at most 16 rows, got {b * t}")
    if status == -3:
        raise MemoryError("decoder_layers: out of memory for the attention's plan")
    _position_error(status, nb * bs)
    return x
