"""pytest-benchmark micro-suite: llmfn's CPU kernels beside the torch ops a user would run instead,
at SmolLM2-135M's shapes, on this machine. Not part of `make test` (pytest's testpaths is tests/).

    .venv/bin/python -m pytest benchmarks/test_bench_cpu.py --benchmark-only --benchmark-group-by=group

Decode matmuls cycle through more weight copies than the L3 cache holds, as a forward does (each
weight is read once per token), so they measure streaming from memory, not cache hits.
"""

from __future__ import annotations

# isort: off
import llmfn  # before torch: llmfn's OpenMP defaults apply
import torch

# isort: on
import itertools

import pytest
import torch.nn.functional as F

from llmfn.kernels import cpu, cpu_quant, quant
from llmfn.loading import decode_layout
from llmfn.models import llama

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C compiler to build the CPU kernels")
COPIES = 24  # 24 x 7 MB of [3072, 576] fp32 weights: well past the 16 MB L3


def cycling(weights):
    """A callable that takes the next weight each call."""
    it = itertools.cycle(weights)
    return lambda: next(it)


@pytest.fixture(scope="module")
def gate_up():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3072, 576, generator=g) for _ in range(COPIES)]


@pytest.mark.benchmark(group="decode matmul [1, 576] x [3072, 576] fp32, from memory")
@pytest.mark.parametrize("impl", ["llmfn C", "torch MKL row-major", "torch MKL column-major", "torch oneDNN"])
def test_decode_matmul(benchmark, gate_up, impl):
    x = torch.randn(1, 576)
    if impl == "torch MKL column-major":
        gate_up = [w.t().contiguous().t() for w in gate_up]
    nxt = cycling(gate_up)
    op = {
        "llmfn C": lambda: cpu.linear(x, nxt()),
        "torch MKL row-major": lambda: F.linear(x, nxt()),
        "torch MKL column-major": lambda: F.linear(x, nxt()),
        "torch oneDNN": lambda: torch.ops.mkldnn._linear_pointwise(x, nxt(), None, "none", [], ""),
    }[impl]
    benchmark(op)


@pytest.mark.benchmark(group="prefill matmul [128, 576] x [3072, 576] fp32")
@pytest.mark.parametrize("impl", ["llmfn linear (oneDNN)", "torch MKL"])
def test_prefill_matmul(benchmark, gate_up, impl):
    from llmfn.kernels.linear import linear

    x, w = torch.randn(128, 576), gate_up[0]
    benchmark(lambda: linear(x, w) if impl.startswith("llmfn") else F.linear(x, w))


@pytest.mark.benchmark(group="decode matmul [1, 576] x int4 [3072, 576], from memory")
@pytest.mark.parametrize("impl", ["llmfn C int4", "dequantize + F.linear"])
def test_decode_int4_matmul(benchmark, gate_up, impl):
    leaves = [quant.Int4Weight.quantize(w, 32) for w in gate_up]
    x = torch.randn(1, 576)
    nxt = cycling(leaves)
    def kernel():
        w = nxt()
        return cpu_quant.int4_linear(x, w.qweight, w.scales, w.offsets, w.group_size)

    benchmark(kernel if impl == "llmfn C int4" else lambda: F.linear(x, nxt().dequantize()))


@pytest.fixture(scope="module")
def smollm2():
    return llmfn.load("smollm2-135m-instruct", quantize=None)  # the dense fp32 model these benchmarks time


@pytest.mark.benchmark(group="SmolLM2-135M fp32 decode step (position 100, batch 1)")
@pytest.mark.parametrize("impl", ["llmfn fused C layers", "llmfn torch ops (no C compiler)"])
def test_decode_step(benchmark, smollm2, impl, monkeypatch):
    """Without a C compiler llmfn runs the torch ops on column-major weights (MKL's best layout)."""
    cfg, params = smollm2.cfg, smollm2.params
    if impl != "llmfn fused C layers":
        monkeypatch.setattr(cpu, "_lib", None)
        params = decode_layout(params, column_major=True)
    cache = llama.init_cache(cfg, 1, 256)
    token, pos, last = torch.tensor([[42]]), torch.tensor([[100]]), torch.tensor([0])
    with torch.inference_mode():
        benchmark(lambda: llama.forward(params, cfg, token, pos, cache, logit_index=last))


# ---------------------------------------------------------------------------------------------- encoder (MiniLM)
# all-MiniLM-L6-v2's layer at 32 sentences x 200 tokens (6400 rows, d = 384, ffn = 1536, 12 heads of 32)

MINILM_GEMMS = {"qkv": (1152, 384), "out": (384, 384), "up + GELU": (1536, 384), "down": (384, 1536)}


@pytest.mark.benchmark(group="encoder matmul [6400, k] x [n, k] fp32 + bias (MiniLM, 32 x 200 tokens)")
@pytest.mark.parametrize("impl", ["llmfn C GEMM", "torch oneDNN", "torch MKL"])
@pytest.mark.parametrize("shape", list(MINILM_GEMMS))
def test_encoder_matmul(benchmark, impl, shape):
    from llmfn.kernels import cpu_gemm

    n, k = MINILM_GEMMS[shape]
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(6400, k, generator=g), torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)
    act = "gelu" if "GELU" in shape else None
    then = F.gelu if act else (lambda y: y)
    if impl == "llmfn C GEMM":
        packed = cpu_gemm.pack(w)
        benchmark(lambda: cpu_gemm.linear(x, packed, n, b, act))
    elif impl == "torch oneDNN":
        benchmark(lambda: then(torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")))
    else:
        benchmark(lambda: then(F.linear(x, w, b)))


@pytest.mark.benchmark(group="encoder attention [32, 200, 3 x 384] fp32, 12 heads (MiniLM)")
@pytest.mark.parametrize("impl", ["llmfn C", "torch SDPA (+ permutes)"])
def test_encoder_attention(benchmark, impl):
    from llmfn.kernels import cpu_attention

    qkv = torch.randn(32, 200, 3 * 384)

    def sdpa():
        q, k, v = qkv.view(32, 200, 3, 12, 32).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(32, 200, 384)

    benchmark(lambda: cpu_attention.attention(qkv, 12) if impl == "llmfn C" else sdpa())


def minilm_layer(seed: int = 0) -> dict:
    """Random weights of MiniLM's layer shapes, plain and packed for the C GEMM."""
    from llmfn.kernels import cpu_gemm

    g = torch.Generator().manual_seed(seed)
    shapes = {"wqkv": (1152, 384), "wo": (384, 384), "w_up": (1536, 384), "w_down": (384, 1536)}
    layer = {name: torch.randn(*shape, generator=g) * 0.05 for name, shape in shapes.items()}
    layer |= {"b" + name[1:]: torch.randn(shape[0], generator=g) for name, shape in shapes.items()}
    layer |= {name + "_packed": cpu_gemm.pack(layer[name]) for name in shapes}
    layer["norm"] = (torch.rand(384, generator=g) + 0.5, torch.randn(384, generator=g), 1e-12)
    return layer


@pytest.mark.benchmark(group="encoder feed-forward [6400, 384] -> 1536 -> 384 + LayerNorm (MiniLM, 32 x 200 tokens)")
@pytest.mark.parametrize("impl", ["llmfn C, one pass", "llmfn C, two GEMM calls", "torch oneDNN + ops"])
def test_encoder_feed_forward(benchmark, impl):
    from llmfn.kernels import cpu_gemm

    L, x = minilm_layer(), torch.randn(6400, 384)
    if impl == "llmfn C, one pass":
        benchmark(lambda: cpu_gemm.ffn(x, L["w_up_packed"], L["b_up"], L["w_down_packed"], L["b_down"], 1536, "gelu",
                                       L["norm"]))  # fmt: skip
    elif impl == "llmfn C, two GEMM calls":
        h = lambda: cpu_gemm.linear(x, L["w_up_packed"], 1536, L["b_up"], "gelu")
        benchmark(lambda: cpu_gemm.linear(h(), L["w_down_packed"], 384, L["b_down"], None, x, L["norm"]))
    else:
        def torch_ffn():
            h = F.gelu(torch.ops.mkldnn._linear_pointwise(x, L["w_up"], L["b_up"], "none", [], ""))
            y = torch.ops.mkldnn._linear_pointwise(h, L["w_down"], L["b_down"], "none", [], "") + x
            return F.layer_norm(y, (384,), *L["norm"][:2], L["norm"][2])

        benchmark(torch_ffn)


@pytest.mark.benchmark(group="encoder attention half [32, 200, 384]: qkv, attention, out + LayerNorm (MiniLM)")
@pytest.mark.parametrize("impl", ["llmfn C, one pass per sequence", "llmfn C, three calls"])
def test_encoder_attention_half(benchmark, impl):
    from llmfn.kernels import cpu_attention, cpu_gemm

    L, x = minilm_layer(), torch.randn(32, 200, 384)
    if impl == "llmfn C, one pass per sequence":
        benchmark(lambda: cpu_attention.attention_block(x, L["wqkv_packed"], L["bqkv"], L["wo_packed"], L["bo"], 12,
                                                        None, L["norm"]))  # fmt: skip
    else:
        def three():
            a = cpu_attention.attention(cpu_gemm.linear(x, L["wqkv_packed"], 1152, L["bqkv"]), 12)
            return cpu_gemm.linear(a, L["wo_packed"], 384, L["bo"], None, x, L["norm"])

        benchmark(three)
