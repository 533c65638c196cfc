"""The fused C decoder layers (kernels/cpu.py `decoder_layers`) against the same layers run op by op.

Both paths use the same C arithmetic, so logits and caches must agree bitwise, over the layer's
variants (biases, GQA, ALiBi, sliding window, logn scaling, dynamic NTK), fp32 / int4 / int8 weights,
batches and strided cache views; and against the pure-torch ops within fp32 tolerance."""

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmfn.backend import fused_forward
from llmfn.kernels import cpu
from llmfn.kernels import reference as ref
from llmfn.kernels.quant import Int4Weight, Int8Weight, is_quantized
from llmfn.loading.quantize import quantize_params
from llmfn.models import llama
from llmfn.models.llama import LlamaConfig

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C compiler to build the CPU kernels")

VARIANTS = {
    "llama-gqa": {},
    "biases-mha": dict(num_kv_heads=4, qkv_bias=True, o_bias=True, mlp_bias=True),
    "mistral-window": dict(sliding_window=3),
    "alibi-mqa": dict(num_kv_heads=1, position_encoding="alibi"),
    "qwen1-logn-ntk": dict(num_kv_heads=4, logn_length=6, dynamic_ntk_length=6),
}


def random_params(cfg: LlamaConfig, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    D, F, qkv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size + 2 * cfg.kv_size
    layers = []
    for _ in range(cfg.num_layers):
        layer = {"attn_norm": 1 + w(D), "wqkv": w(qkv, D), "wo": w(D, cfg.q_size), "mlp_norm": 1 + w(D),
                 "w_gate_up": w(2 * F, D), "w_down": w(D, F)}  # fmt: skip
        if cfg.qkv_bias:
            layer["bqkv"] = w(qkv)
        if cfg.o_bias:
            layer["bo"] = w(D)
        if cfg.mlp_bias:
            layer["b_gate_up"], layer["b_down"] = w(2 * F), w(D)
        layers.append(layer)
    params = {"embed": w(cfg.vocab_size, D, scale=1.0), "norm": 1 + w(D), "lm_head": w(cfg.vocab_size, D),
              "layers": layers}  # fmt: skip
    if cfg.position_encoding == "alibi":
        params["alibi_slopes"] = ref.alibi_slopes(cfg.num_heads)
    else:
        params["rope_inv_freq"] = llama.rope_inv_freq(cfg)
    return params


def config(**overrides) -> LlamaConfig:
    base = dict(model_type="llama", vocab_size=50, hidden_size=64, intermediate_size=96, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5)  # fmt: skip
    return LlamaConfig(**{**base, **overrides})


def fp16_scales(leaf):
    """The leaf with its scales (and offsets) rounded to fp16 and stored so."""
    if isinstance(leaf, Int4Weight):
        return replace(leaf, scales=leaf.scales.half(), offsets=leaf.offsets.half())
    return replace(leaf, scales=leaf.scales.half())


def run(params, cfg, steps, batch, fused: bool, monkeypatch, slot_len=16, view=12, first=0):
    """A 3-token prefill then decode steps, rows at different positions (row b from first + b), on a
    strided cache view."""
    with monkeypatch.context() as m:
        if not fused:
            m.setattr(cpu, "stack_fields", lambda layers, cfg: [None] * len(layers))
        full = llama.init_cache(cfg, batch, first + slot_len)
        cache = full.view(slots=first + view)
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, cfg.vocab_size, (batch, 3 + steps), generator=g)
        start = first + torch.arange(batch)[:, None]  # row b starts at position first + b
        outs = []
        logits, cache = fused_forward(params, cfg, tokens[:, :3], start + torch.arange(3), cache)
        outs.append(logits)
        for i in range(3, 3 + steps):
            logits, cache = fused_forward(params, cfg, tokens[:, i : i + 1], start + i, cache)
            outs.append(logits)
        return torch.cat(outs, dim=1), full


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("weights", ["fp32", "int4", "int8", "int4-fp32-act", "int8-fp32-act", "int4-fp16",
                                     "int8-fp16", "int4-fp16-fp32-act", "int8-fp16-fp32-act"])
def test_fused_layer_is_bitwise_the_op_by_op_layer(variant, weights, monkeypatch):
    """Quantized weights with int8 activations and with fp32 ones (LLMFN_QUANT_ACTIVATIONS), their
    scales stored fp32 or fp16 (as GGUF blocks load)."""
    cfg = config(**VARIANTS[variant])
    params = random_params(cfg, seed=len(variant))
    monkeypatch.setenv("LLMFN_QUANT_ACTIVATIONS", "fp32" if weights.endswith("fp32-act") else "int8")
    if weights != "fp32":
        params = quantize_params(params, weights.split("-")[0])
    if "-fp16" in weights:
        params = {**params, "layers": [{name: fp16_scales(v) if is_quantized(v) else v for name, v in layer.items()}
                                       for layer in params["layers"]]}
    calls = []
    real = cpu.decoder_layers
    monkeypatch.setattr(cpu, "decoder_layers", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    with torch.inference_mode():
        fused, fused_cache = run(params, cfg, steps=5, batch=2, fused=True, monkeypatch=monkeypatch)
        assert calls == [cfg.num_layers] * 6  # every step ran all layers in one fused call
        op_by_op, op_cache = run(params, cfg, steps=5, batch=2, fused=False, monkeypatch=monkeypatch)
    assert calls == [cfg.num_layers] * 6
    assert torch.equal(fused, op_by_op)
    assert torch.equal(fused_cache.k, op_cache.k) and torch.equal(fused_cache.v, op_cache.v)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_batched_step_of_group_32_weights_is_bitwise_the_op_by_op_one(bits, monkeypatch):
    """16 rows a step (the engine's batched decode): there the group-32 int4 / int8 layers take the
    weight-row tiles of csrc/ztile.h, in the fused layer as in the separate linears (tests/test_quant.py
    checks those rows against the one-row kernels)."""
    cfg = config()
    leaf = Int4Weight if bits == 4 else Int8Weight
    params = random_params(cfg, seed=5)
    params = {**params, "layers": [{n: leaf.quantize(v, 32) if n.startswith("w") else v for n, v in layer.items()}
                                   for layer in params["layers"]]}  # fmt: skip
    monkeypatch.setenv("LLMFN_QUANT_ACTIVATIONS", "fp32")
    with torch.inference_mode():
        fused, fused_cache = run(params, cfg, steps=3, batch=16, fused=True, monkeypatch=monkeypatch, slot_len=32,
                                 view=24)  # fmt: skip
        op_by_op, op_cache = run(params, cfg, steps=3, batch=16, fused=False, monkeypatch=monkeypatch, slot_len=32,
                                 view=24)  # fmt: skip
    assert torch.equal(fused, op_by_op)
    assert torch.equal(fused_cache.k, op_cache.k) and torch.equal(fused_cache.v, op_cache.v)


@pytest.mark.parametrize("ends", ["fp32", "int8", "int4", "int4-fp16", "int8-tied", "int4-tied-act8"])
def test_a_whole_step_with_its_embedding_and_head_is_bitwise_the_op_by_op_one(ends, monkeypatch):
    """The step in one C call (embedding rows, layers, final norm, lm_head) for each embedding / head
    a GGUF or a quantized load gives, tied or not, at 1 to 6 rows a step."""
    cfg = config()
    params = random_params(cfg, seed=11)
    monkeypatch.setenv("LLMFN_QUANT_ACTIVATIONS", "int8" if ends.endswith("act8") else "fp32")
    if ends != "fp32":
        leaf = Int4Weight if ends.startswith("int4") else Int8Weight
        embed = leaf.quantize(params["embed"], 32)
        embed = fp16_scales(embed) if "fp16" in ends else embed
        head = embed if "tied" in ends else leaf.quantize(params["lm_head"], 32)
        params = {**params, "embed": embed, "lm_head": head}
    steps = []
    real = cpu.decoder_layers
    monkeypatch.setattr(cpu, "decoder_layers", lambda *a, **k: steps.append(k.get("step") is not None) or real(*a, **k))
    with torch.inference_mode():
        fused, fused_cache = run(params, cfg, steps=4, batch=2, fused=True, monkeypatch=monkeypatch)
        assert steps == [True] * 5  # the prefill of 2 x 3 rows and each decode step
        op_by_op, op_cache = run(params, cfg, steps=4, batch=2, fused=False, monkeypatch=monkeypatch)
    assert torch.equal(fused, op_by_op)
    assert torch.equal(fused_cache.k, op_cache.k) and torch.equal(fused_cache.v, op_cache.v)


def test_a_whole_step_refuses_token_ids_outside_the_embedding():
    cfg = config()
    params = random_params(cfg, seed=0)
    cache = llama.init_cache(cfg, 1, 4)
    for bad in (cfg.vocab_size, -1):
        with pytest.raises(IndexError, match="token id"), torch.inference_mode():
            fused_forward(params, cfg, torch.tensor([[1, bad]]), torch.tensor([[0, 1]]), cache)
    assert not cache.k.any() and not cache.v.any()


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_layer_matches_the_torch_ops(variant, monkeypatch):
    """The C decode path against the pure-torch forward (C kernels off: LLMFN_CPU_KERNELS=torch)."""
    cfg = config(**VARIANTS[variant])
    params = random_params(cfg, seed=3)
    with torch.inference_mode():
        fused, _ = run(params, cfg, steps=5, batch=2, fused=True, monkeypatch=monkeypatch)
        monkeypatch.setattr(cpu, "_lib", None)  # as if the library could not be built
        torch_ops, _ = run(params, cfg, steps=5, batch=2, fused=False, monkeypatch=monkeypatch)
    scale = torch_ops.abs().max().item()
    assert math.isfinite(scale) and (fused - torch_ops).abs().max().item() <= 1e-5 * max(scale, 1.0)


def test_fused_layer_refuses_positions_outside_the_cache():
    cfg = config()
    params = random_params(cfg, seed=0)
    cache = llama.init_cache(cfg, 1, 4)
    with pytest.raises(IndexError, match="KV cache length"), torch.inference_mode():
        fused_forward(params, cfg, torch.tensor([[1]]), torch.tensor([[4]]), cache)
    assert not cache.k.any() and not cache.v.any()


def test_layer_structs_refuse_shapes_that_do_not_fit_the_config_and_follow_replaced_weights():
    """The C code trusts the shapes it is given, so a layer that does not fit cfg gets no struct (the
    op-by-op path runs and fails or works on its own); a replaced weight gets a new struct."""
    cfg = config()
    params = random_params(cfg, seed=0)
    layer = params["layers"][0]
    assert cpu.layer_fields(layer, cfg) is not None
    assert cpu.layer_fields(layer, config(intermediate_size=48)) is None  # same dict, other dims
    assert cpu.layer_fields({**layer, "w_down": layer["w_down"][:, :90]}, cfg) is None
    before = bytes(cpu.layer_fields(layer, cfg))
    layer["wo"] = layer["wo"].clone()
    assert bytes(cpu.layer_fields(layer, cfg)) != before


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fused_layers_match_the_torch_ops_over_random_shapes(data):
    """Odd sizes (tails of the 8-wide loops), GQA ratios, batches, prompt lengths and positions."""
    hk = data.draw(st.integers(1, 3))
    cfg = config(
        hidden_size=data.draw(st.integers(4, 70)), intermediate_size=data.draw(st.integers(1, 90)),
        num_kv_heads=hk, num_heads=hk * data.draw(st.integers(1, 3)), head_dim=2 * data.draw(st.integers(1, 10)),
        num_layers=data.draw(st.integers(1, 3)), qkv_bias=data.draw(st.booleans()),
        sliding_window=data.draw(st.sampled_from([None, 2, 5])),
    )  # fmt: skip
    params = random_params(cfg, seed=data.draw(st.integers(0, 100)))
    batch, steps = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    with torch.inference_mode(), pytest.MonkeyPatch.context() as mp:
        fused, fused_cache = run(params, cfg, steps=steps, batch=batch, fused=True, monkeypatch=mp)
        mp.setattr(cpu, "_lib", None)
        torch_ops, torch_cache = run(params, cfg, steps=steps, batch=batch, fused=False, monkeypatch=mp)
    assert (fused - torch_ops).abs().max().item() <= 1e-4 * max(torch_ops.abs().max().item(), 1.0)
    assert torch.allclose(fused_cache.k, torch_cache.k, atol=1e-5)


def test_a_callers_own_attention_op_is_used_not_replaced_by_the_c_path(monkeypatch):
    """forward(attention=op) calls op; only an op marked batch_invariant (the engine's) may be
    stood in for by the batch-invariant C kernels."""
    cfg = config()
    params = random_params(cfg, seed=0)
    calls = []

    def own(*args):
        calls.append(1)
        return ref.attention(*args)

    def marked(*args):
        calls.append(1)
        return ref.attention(*args)

    marked.batch_invariant = True
    with torch.inference_mode():
        for op, expect_calls in ((own, True), (marked, False)):
            calls.clear()
            cache = llama.init_cache(cfg, 1, 8)
            fused_forward(params, cfg, torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), cache, attention=op)
            assert bool(calls) == expect_calls


@pytest.mark.parametrize("weights", ["fp32", "int4"])
@pytest.mark.parametrize("first", [0, 1100])
def test_fused_layer_results_do_not_depend_on_the_thread_count(weights, first, monkeypatch):
    """DecodeThreads drops to one thread when the machine is contended: that must not change a bit.
    Rows from position 1100 on reach past csrc/attend_rows.h's SPLIT_KEYS and attend chunk by chunk, with
    a barrier between the chunks and their merge inside the fused call: the op-by-op layer's bits too."""
    cfg = config()
    params = random_params(cfg, seed=5)
    monkeypatch.setenv("LLMFN_QUANT_ACTIVATIONS", "fp32")
    if weights != "fp32":
        params = quantize_params(params, weights)
    outs = []
    with torch.inference_mode():
        for threads in (1, 2, 3):
            monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
            outs.append(run(params, cfg, steps=4, batch=3, fused=True, monkeypatch=monkeypatch, first=first))
        op_by_op = run(params, cfg, steps=4, batch=3, fused=False, monkeypatch=monkeypatch, first=first)
    for logits, cache in outs[1:] + [op_by_op]:
        assert torch.equal(logits, outs[0][0]) and torch.equal(cache.k, outs[0][1].k)
    assert 0 < cpu.library().llmfn_decode_occupancy() <= 1100  # thousandths of the threads' time, measured


def test_decode_threads_fall_back_to_one_thread_while_the_cores_are_taken(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    policy = cpu.DecodeThreads()
    assert policy.pick() == 2
    policy.observe(2, 0.3)  # the first step (OpenMP starting its threads) does not count
    assert policy.pick() == 2
    policy.observe(2, 0.95)  # had its cores: stays on 2
    assert policy.pick() == 2
    policy.observe(2, 0.4)  # lost them: 16 steps on one thread, the other kernels too
    assert policy.threads() == 1
    assert [policy.pick() for _ in range(17)] == [1] * 16 + [2]
    policy.observe(2, 0.4)  # again: twice as long
    assert [policy.pick() for _ in range(33)] == [1] * 32 + [2]
    for _ in range(6):
        policy.observe(2, 0.4)
        while policy.solo_left:
            policy.pick()
    assert policy.solo_next == cpu.DecodeThreads.MAX_SOLO
    policy.observe(2, 0.99)  # a step that had its cores resets the back-off
    assert policy.solo_next == cpu.DecodeThreads.FIRST_SOLO and policy.pick() == 2
