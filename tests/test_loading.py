"""Broken checkpoints give one clear llmfn error naming the file and the problem."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmfn
from llmfn.errors import CheckpointError, UnsupportedModelError
from tiny import make_checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    make_checkpoint(folder, "llama")
    return folder


def _copy(good, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(good, out)
    return out


def test_loads_and_documents_layout(good):
    model = llmfn.load(good)
    assert model.kind == "causal-lm"
    layer = model.params["layers"][0]
    assert layer["wqkv"].shape == ((4 + 2 * 2) * 16, 64)
    assert layer["w_gate_up"].shape == (2 * 96, 64)
    assert model.chat_template and model.tokenizer.eos_ids


def test_missing_folder():
    with pytest.raises(CheckpointError, match="no such model"):
        llmfn.load("/nonexistent/model")


def test_missing_config(good, tmp_path):
    folder = _copy(good, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        llmfn.load(folder)


def test_corrupt_config(good, tmp_path):
    folder = _copy(good, tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        llmfn.load(folder)


def test_truncated_safetensors(good, tmp_path):
    folder = _copy(good, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        llmfn.load(folder)


def test_garbage_safetensors(good, tmp_path):
    folder = _copy(good, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        llmfn.load(folder)


def test_wrong_shape_names_the_tensor(good, tmp_path):
    folder = _copy(good, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.up_proj\.weight.*\(95, 64\).*\(96, 64\)"):
        llmfn.load(folder)


def test_missing_tensor(good, tmp_path):
    folder = _copy(good, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor 'norm.weight'"):
        llmfn.load(folder)


def test_unsupported_architecture(good, tmp_path):
    folder = _copy(good, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="mamba"):
        llmfn.load(folder)


def test_pickle_weights_are_refused(good, tmp_path):
    folder = _copy(good, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="never unpickles"):
        llmfn.load(folder)


def test_sharded_checkpoint(good, tmp_path):
    folder = _copy(good, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / file)
    (folder / "model.safetensors").unlink()
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    a, b = llmfn.load(good), llmfn.load(folder)
    tokens = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(llmfn.logits(a, tokens), llmfn.logits(b, tokens))


def test_bfloat16_load(good):
    model = llmfn.load(good, dtype="bfloat16")
    assert model.params["layers"][0]["wqkv"].dtype == torch.bfloat16
    out = llmfn.logits(model, torch.tensor([[1, 2, 3]]))
    ref = llmfn.logits(llmfn.load(good), torch.tensor([[1, 2, 3]]))
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.1


def test_sentence_transformers_folder_with_a_transformer_subfolder(tmp_path):
    from llmfn.loading.registry import ALIASES, package_path

    minilm = package_path(ALIASES["all-minilm-l6-v2"])
    root = tmp_path / "st"
    shutil.copytree(minilm / "1_Pooling", root / "1_Pooling")
    (root / "0_Transformer").mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json", "sentence_bert_config.json"):
        shutil.copy(minilm / name, root / "0_Transformer" / name)
    modules = json.loads((minilm / "modules.json").read_text())
    for m in modules:
        if m["type"].endswith("Transformer"):
            m["path"] = "0_Transformer"
    (root / "modules.json").write_text(json.dumps(modules))
    nested, flat = llmfn.load(root), llmfn.load(minilm)
    texts = ["a sentence about cats", "another one"]
    assert torch.allclose(llmfn.embed(nested, texts), llmfn.embed(flat, texts), atol=1e-6)


@pytest.mark.parametrize("column_major", [False, True])
def test_decode_weights_are_carved_from_shared_mappings_without_overlap(column_major, monkeypatch):
    """decode_layout's copies (carved from huge-page mappings, loading/params.py) hold the same values and
    layout, stay tied where the tree ties them, sit 64-byte aligned and never overlap, also where a
    weight outgrows a mapping and where one is empty."""
    from llmfn.loading import params

    monkeypatch.setattr(params, "ARENA_BYTES", 1 << 20)  # a 1 MiB mapping: the [700, 700] weight needs its own
    gen = torch.Generator().manual_seed(0)
    tree = {"a": torch.randn(300, 70, generator=gen), "b": [torch.randn(5, 3, generator=gen), torch.randn(0, 4)],
            "c": torch.randn(700, 700, generator=gen), "d": torch.randn(200, 300, generator=gen)}
    tree["tied"] = tree["a"]
    out = params.decode_layout(tree, column_major)
    leaves = [("a", out["a"], tree["a"]), ("b0", out["b"][0], tree["b"][0]), ("b1", out["b"][1], tree["b"][1]),
              ("c", out["c"], tree["c"]), ("d", out["d"], tree["d"])]
    assert out["tied"] is out["a"]
    spans = []
    for name, got, want in leaves:
        assert torch.equal(got, want), name
        assert got.t().is_contiguous() if column_major and got.numel() else got.is_contiguous(), name
        if got.numel():
            assert got.data_ptr() % 64 == 0, name
            spans.append((got.data_ptr(), got.data_ptr() + got.numel() * got.element_size(), name))
    spans.sort()
    assert all(end <= nxt for (_, end, _), (nxt, _, _) in zip(spans, spans[1:], strict=False)), spans
    out["d"].fill_(1.0)  # writing one copy leaves the others as they were
    assert torch.equal(out["a"], tree["a"]) and torch.equal(out["c"], tree["c"])


def test_quantized_leaves_are_carved_with_the_dense_weights(monkeypatch):
    """finish_params copies a quantized leaf's tensors into the huge-page arena beside the dense weights:
    the same values and results, 64-byte aligned, no overlap, a leaf tied by reference still one leaf."""
    from llmfn.kernels import quant
    from llmfn.loading import params

    taken = []
    take = params._HugeArena.take
    monkeypatch.setattr(params._HugeArena, "take", lambda self, shape, dtype: taken.append(t := take(self, shape, dtype)) or t)
    gen = torch.Generator().manual_seed(1)
    int4 = quant.Int4Weight.quantize(torch.randn(48, 64, generator=gen), 32, torch.float16)
    int8 = quant.Int8Weight.quantize(torch.randn(40, 64, generator=gen), 32)
    tree = {"w4": int4, "w8": int8, "tied": int8, "dense": torch.randn(8, 64, generator=gen)}
    out = params.finish_params(tree, torch.float32, "cpu")
    assert out["tied"] is out["w8"]
    x = torch.randn(3, 64, generator=gen)
    for name, leaf in (("w4", int4), ("w8", int8)):
        assert torch.equal(out[name].linear(x), leaf.linear(x)), name
        assert out[name].qweight.data_ptr() != leaf.qweight.data_ptr(), name
    carved = [out["w4"].qweight, out["w4"].scales, out["w4"].offsets, out["w8"].qweight, out["w8"].scales, out["dense"]]
    assert {t.data_ptr() for t in carved} == {t.data_ptr() for t in taken if t.numel()}
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in carved)
    assert all(p % 64 == 0 for p, _ in spans)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False)), spans
