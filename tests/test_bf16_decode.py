"""bf16 weights with fp32 activations (kernels/bf16.py, csrc/bf16.h): the C matrix kernel against
the torch op of the same arithmetic, F.linear(x, w.float()), and fp64 (the rule of test_cpu_kernels);
rows bitwise batch-invariant; the fused decoder layer bitwise the op-by-op layer; loading with
dtype=bfloat16; SmolLM2's logits against its fp32 and torch-bf16 forms and its greedy tokens. Every
ISA level this CPU runs (LLMFN_CPU_ISA) is tested, the lower ones in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmfn
from llmfn import cbuild
from llmfn.backend import fused_forward
from llmfn.kernels import bf16, cpu
from llmfn.loading.params import map_leaves
from llmfn.models import llama
from test_cpu_kernels import assert_rule, randn
from test_fused_layer import VARIANTS, config, random_params, run

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C compiler to build the CPU kernels")
EXAMPLES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def bf16_params(params: dict) -> dict:
    """2-D weights as Bf16Weight leaves, everything else as it was (fp32)."""
    return map_leaves(params, lambda w: bf16.wrap(w.bfloat16()) if w.dim() == 2 else w)


def rounded_params(params: dict) -> dict:
    """The fp32 params whose 2-D weights are the bf16-rounded values: the same arithmetic in fp32."""
    return map_leaves(params, lambda w: w.bfloat16().float() if w.dim() == 2 else w)


def test_the_widening_path_matches_the_isa_level():
    lanes = {"avx512": 16, "avx2": 8, "scalar": 1}.get(cbuild.isa()[0])
    assert lanes is None or cpu.library().llmfn_bf16_lanes() == lanes


@EXAMPLES
@given(m=st.integers(1, cpu.MAX_ROWS), n=st.integers(1, 70), k=st.integers(1, 90), bias=st.booleans(),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_bf16_linear_matches_the_torch_op_of_the_same_arithmetic(m, n, k, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x, w = randn(g, m, k), randn(g, n, k).bfloat16()
    b = randn(g, n) if bias else None
    out = cpu.bf16_linear(x, w, b)
    wd, bd = w.double(), None if b is None else b.double()
    assert_rule(out, F.linear(x, w.float(), b), F.linear(x.double(), wd, bd))


@EXAMPLES
@given(m=st.integers(2, cpu.MAX_ROWS), n=st.integers(1, 40), k=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_bf16_linear_rows_are_batch_invariant(m, n, k, seed):
    """Row i of a batch is bitwise row i computed alone, wherever it sits and whatever its neighbours."""
    g = torch.Generator().manual_seed(seed)
    x, w = randn(g, m, k), randn(g, n, k).bfloat16()
    out = cpu.bf16_linear(x, w)
    for i in range(m):
        assert torch.equal(out[i : i + 1], cpu.bf16_linear(x[i : i + 1], w))
    assert torch.equal(cpu.bf16_linear(x.flip(0), w), out.flip(0))


def test_bf16_weight_leaf_serves_linear_embedding_and_refuses_bad_shapes():
    g = torch.Generator().manual_seed(0)
    w = randn(g, 30, 40).bfloat16()
    leaf = bf16.wrap(w)
    assert isinstance(leaf, bf16.Bf16Weight) and leaf.dtype == torch.bfloat16 and leaf.shape == (30, 40)
    assert bf16.wrap(w.float()) is not leaf and not isinstance(bf16.wrap(w.float()), bf16.Bf16Weight)
    ids = torch.tensor([[3, 0, 29]])
    assert leaf.embedding(ids).dtype == torch.float32 and torch.equal(leaf.embedding(ids), w.float()[ids])
    x = randn(g, 2, 3, 40)
    assert torch.equal(leaf.linear(x), cpu.bf16_linear(x, w))  # decode rows: the C kernel
    many = randn(g, cpu.MAX_ROWS + 1, 40)  # prefill rows: torch, the same products
    assert torch.allclose(leaf.linear(many), cpu.bf16_linear(many, w), atol=1e-5)
    assert torch.equal(llmfn.kernels.linear.linear(x, leaf), leaf.linear(x))
    with pytest.raises(ValueError, match="bf16_linear"):
        cpu.bf16_linear(randn(g, 1, 39), w)
    leaves, spec = torch.utils._pytree.tree_flatten({"w": leaf})  # a pytree node, as the quantized leaves
    assert len(leaves) == 1 and leaves[0] is w and torch.utils._pytree.tree_unflatten(leaves, spec)["w"].w is w


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_bf16_layer_is_bitwise_the_op_by_op_layer(variant, monkeypatch):
    cfg = config(**VARIANTS[variant])
    params = bf16_params(random_params(cfg, seed=len(variant)))
    calls = []
    real = cpu.decoder_layers
    monkeypatch.setattr(cpu, "decoder_layers", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    with torch.inference_mode():
        fused, fused_cache = run(params, cfg, steps=5, batch=2, fused=True, monkeypatch=monkeypatch)
        assert calls == [cfg.num_layers] * 6  # every step ran all layers in one fused call
        op_by_op, op_cache = run(params, cfg, steps=5, batch=2, fused=False, monkeypatch=monkeypatch)
    assert torch.equal(fused, op_by_op)
    assert torch.equal(fused_cache.k, op_cache.k) and torch.equal(fused_cache.v, op_cache.v)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_bf16_decode_matches_the_torch_ops_on_the_rounded_weights(data):
    """The C path (bf16 weights widened) against the pure-torch forward of the fp32 model whose
    weights are the bf16 values, over odd sizes (the 16- and 8-wide loops' tails) and batches."""
    hk = data.draw(st.integers(1, 3))
    cfg = config(
        hidden_size=data.draw(st.integers(4, 70)), intermediate_size=data.draw(st.integers(1, 90)),
        num_kv_heads=hk, num_heads=hk * data.draw(st.integers(1, 3)), head_dim=2 * data.draw(st.integers(1, 10)),
        num_layers=data.draw(st.integers(1, 3)), qkv_bias=data.draw(st.booleans()),
    )  # fmt: skip
    params = random_params(cfg, seed=data.draw(st.integers(0, 100)))
    batch, steps = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    with torch.inference_mode(), pytest.MonkeyPatch.context() as mp:
        ours, _ = run(bf16_params(params), cfg, steps=steps, batch=batch, fused=True, monkeypatch=mp)
        mp.setattr(cpu, "_lib", None)
        torch_ops, _ = run(rounded_params(params), cfg, steps=steps, batch=batch, fused=False, monkeypatch=mp)
    assert (ours - torch_ops).abs().max().item() <= 1e-4 * max(torch_ops.abs().max().item(), 1.0)


def test_bf16_decode_rows_are_batch_invariant():
    """A row's logits are bitwise the same alone and in a batch of rows at other positions."""
    cfg = config()
    params = bf16_params(random_params(cfg, seed=5))
    tokens = torch.tensor([[7], [3], [11]])
    positions = torch.tensor([[2], [5], [0]])
    with torch.inference_mode():
        batch, _ = fused_forward(params, cfg, tokens, positions, llama.init_cache(cfg, 3, 8))
        for i in range(3):
            alone, _ = fused_forward(params, cfg, tokens[i : i + 1], positions[i : i + 1], llama.init_cache(cfg, 1, 8))
            assert torch.equal(alone, batch[i : i + 1])


def test_loading_bfloat16_gives_bf16_weights_and_fp32_activations(tmp_path):
    from tiny import make_checkpoint

    make_checkpoint(tmp_path / "m", "llama")
    model = llmfn.load(tmp_path / "m", dtype="bfloat16")
    fp32 = llmfn.load(tmp_path / "m")
    layer = model.params["layers"][0]
    assert isinstance(layer["wqkv"], bf16.Bf16Weight) and layer["wqkv"].dtype == torch.bfloat16
    assert model.params["norm"].dtype == torch.float32 and layer["attn_norm"].dtype == torch.float32
    assert torch.equal(layer["wqkv"].w.float(), fp32.params["layers"][0]["wqkv"].bfloat16().float())
    tokens = torch.tensor([[1, 2, 3, 4]])
    want = llmfn.logits(llmfn.Model(**{**fp32.__dict__, "params": rounded_params(fp32.params)}), tokens)
    assert (llmfn.logits(model, tokens) - want).abs().max() <= 1e-4 * max(want.abs().max().item(), 1.0)


@pytest.mark.slow
def test_smollm2_bf16_logits_and_greedy_tokens():
    """SmolLM2-135M with bf16 weights: logits within 0.05 * their spread of fp32's and closer to
    them than torch's bf16 model (which also rounds every activation to bf16), and the same greedy
    tokens as fp32 for a short prompt."""
    fp32 = llmfn.load("smollm2-135m-instruct", quantize=None)  # the dense fp32 model
    ours = llmfn.load("smollm2-135m-instruct", dtype="bfloat16")
    torch_bf16 = {**map_leaves(fp32.params, lambda w: w.bfloat16()), "rope_inv_freq": fp32.params["rope_inv_freq"]}
    ids = fp32.tokenizer.encode("The capital of France is")
    tokens = torch.tensor([ids])
    want = llmfn.logits(fp32, tokens)[0, -1]
    got = llmfn.logits(ours, tokens)[0, -1]
    with torch.inference_mode():
        cache = llama.init_cache(fp32.cfg, 1, len(ids), torch.bfloat16)
        theirs = llama.forward(torch_bf16, fp32.cfg, tokens, torch.arange(len(ids))[None], cache)[0][0, -1]
    spread = want.std().item()
    ours_err, theirs_err = (got - want).abs().max().item(), (theirs - want).abs().max().item()
    assert ours_err <= 0.05 * spread and ours_err < theirs_err, (ours_err, theirs_err, spread)
    greedy = [list(llmfn.generate(m, ids, max_tokens=12, temperature=0.0)) for m in (fp32, ours)]
    assert len(greedy[0]) == 12 and greedy[0] == greedy[1]


# The best level runs in this process; each lower one this CPU supports in a subprocess of its own.
LOWER_LEVELS = cbuild.supported_levels()[:-1]


@pytest.mark.slow
@pytest.mark.parametrize("level", LOWER_LEVELS or [pytest.param("scalar", marks=pytest.mark.skip(
    reason="not an x86 CPU: the kernels build with -march=native only"))])  # fmt: skip
def test_every_lower_isa_level_passes_too(tmp_path, level):
    env = {**os.environ, "LLMFN_CPU_ISA": level, "LLMFN_HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(Path(__file__)),
         "-k", "not lower_isa and not smollm2"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1]
    assert list((tmp_path / "kernels").glob(f"llmfn_cpu_{level}_*.so"))
