"""BERT encoders and sentence embeddings: parity with transformers' BertModel plus the pooling math,
on tiny random configs and on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from llmfn.embed import (
    POOLING_MODES,
    SPLIT_MIN_TOKENS,
    batches,
    embed,
    embed_with_usage,
    load_embedding_model,
    pool,
    to_base64,
    tokenize,
)
from llmfn.errors import CheckpointError, RequestError, UnsupportedModelError
from llmfn.kernels import cpu_attention, cpu_gemm
from llmfn.kernels import linear as llmfn_linear
from llmfn.kernels.linear import PackedWeight
from llmfn.loading import bert as bert_loading
from llmfn.loading import load
from llmfn.loading.registry import ALIASES, package_path
from llmfn.models import bert

WORDS = "the a cat dog sat on mat hello world quick brown fox jumps over lazy is was and of to in".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# ---------------------------------------------------------------------------------------------- fixtures


def write_wordpiece(folder: Path, post_processor: bool = True) -> int:
    """A small uncased WordPiece tokenizer.json (BERT normalizer and pre-tokenizer); returns its size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'[]()-")
    vocab = SPECIALS + WORDS + chars + ["##" + c for c in chars]
    ids = {t: i for i, t in enumerate(dict.fromkeys(vocab))}
    tok = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(SPECIALS)
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
         "mask_token": "[MASK]", "model_max_length": 512, "tokenizer_class": "BertTokenizer"}))  # fmt: skip
    return len(ids)


def tiny_hf(seed=0, act="gelu", masked_lm=False, **over):
    torch.manual_seed(seed)
    sizes = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 48, **over}
    cfg = transformers.BertConfig(
        vocab_size=128, num_hidden_layers=2, max_position_embeddings=64, type_vocab_size=2, hidden_act=act, **sizes
    )  # fmt: skip
    cls = transformers.BertForMaskedLM if masked_lm else transformers.BertModel
    m = cls(cfg).eval()
    with torch.no_grad():  # random LayerNorm affine too, so a swapped weight/bias shows
        for name, p in m.named_parameters():
            if "LayerNorm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    return m


def save_st_folder(hf_model, folder: Path, *, pooling=("mean",), normalize=True, max_seq_length=48, legacy=True):
    folder.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(folder, safe_serialization=True)
    write_wordpiece(folder)
    mods = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]  # fmt: skip
    if normalize:
        mods.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(mods))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    if legacy:
        legacy_keys = {v: k for k, v in {
            "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
            "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
            "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}.items()}  # fmt: skip
        pcfg = {"word_embedding_dimension": hf_model.config.hidden_size, **{legacy_keys[m]: True for m in pooling}}
    else:
        pcfg = {"embedding_dimension": hf_model.config.hidden_size, "pooling_mode": list(pooling)}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pcfg))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(llmfn model, transformers BertModel) for a tiny random BERT saved as a sentence-transformers folder."""
    hf = tiny_hf()
    folder = save_st_folder(hf, tmp_path_factory.mktemp("tiny") / "m")
    return load_embedding_model(folder), hf


def hf_hidden(hf, tokens, mask, types=None):
    with torch.no_grad():
        return hf(input_ids=tokens, attention_mask=mask, token_type_ids=types).last_hidden_state


def random_batch(vocab=128, B=4, T=17, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, vocab, (B, T), generator=g)
    lengths = torch.tensor([T, 1, T // 2, 3])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return tokens, mask, lengths


def ref_pool(hidden_row: torch.Tensor, mode: str) -> torch.Tensor:
    """Pooling of one unpadded sentence [L, D], written per sentence as the reference."""
    L = hidden_row.shape[0]
    if mode == "cls":
        return hidden_row[0]
    if mode == "lasttoken":
        return hidden_row[-1]
    if mode == "max":
        return hidden_row.max(dim=0).values
    if mode == "mean":
        return hidden_row.mean(dim=0)
    if mode == "mean_sqrt_len_tokens":
        return hidden_row.sum(dim=0) / L**0.5
    w = torch.arange(1, L + 1, dtype=hidden_row.dtype)[:, None]
    return (hidden_row * w).sum(0) / w.sum()


# ---------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("path", ["packed", "plain", "torch"])
@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
@pytest.mark.parametrize("sizes", [{}, {"hidden_size": 36, "num_attention_heads": 3, "intermediate_size": 50}])
def test_forward_matches_transformers_bertmodel(tmp_path, act, path, sizes, monkeypatch):
    """packed: matmuls in llmfn's C GEMM (bias, GELU, residual and LayerNorm fused), C attention;
    plain: unpacked weights (oneDNN), C attention; torch: torch's SDPA. Sizes off the kernels' tiles too."""
    hf = tiny_hf(act=act, **sizes)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg = bert_loading.read_config(tmp_path)
    params = bert_loading.load_params(tmp_path, cfg)
    if path == "packed":
        params = bert_loading.pack_params(params)
        assert all(isinstance(layer["w_up"], PackedWeight) for layer in params["layers"]) or not cpu_gemm.available()
    if path == "torch":
        monkeypatch.setattr(cpu_attention, "available", lambda: False)
    tokens, mask, lengths = random_batch()
    types = (torch.arange(tokens.shape[1])[None] >= 5).long().expand_as(tokens)
    with torch.inference_mode():
        for tt in (None, types):
            ours = bert.forward(params, cfg, tokens, mask, tt)
            ref = hf_hidden(hf, tokens, mask, tt)
            for b, n in enumerate(lengths.tolist()):
                torch.testing.assert_close(ours[b, :n], ref[b, :n], atol=2e-5, rtol=1e-5)
        # no padding: attention_mask=None is the same as all ones
        full = torch.ones_like(mask)
        torch.testing.assert_close(bert.forward(params, cfg, tokens, None), hf_hidden(hf, tokens, full), atol=2e-5, rtol=1e-5)


def test_loads_prefixed_checkpoints_and_ignores_heads(tmp_path):
    """BertForMaskedLM saves `bert.`-prefixed tensors plus a `cls.` head and a pooler is absent."""
    hf = tiny_hf(masked_lm=True)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg = bert_loading.read_config(tmp_path)
    params = bert_loading.load_params(tmp_path, cfg)
    tokens, mask, lengths = random_batch()
    with torch.inference_mode():
        ours = bert.forward(params, cfg, tokens, mask)
    ref = hf_hidden(hf.bert, tokens, mask)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(ours[b, :n], ref[b, :n], atol=2e-5, rtol=1e-5)
    assert params["layers"][0]["wqkv"].shape == (3 * 32, 32)


def test_params_tree_matches_abstract(tiny):
    model, _ = tiny
    shapes = bert.abstract(model.cfg)

    def check(p, s):
        if isinstance(s, tuple):
            assert tuple(p.shape) == s and p.dtype == torch.float32
        elif isinstance(s, dict):
            assert p.keys() == s.keys()
            for k in s:
                check(p[k], s[k])
        else:
            assert len(p) == len(s)
            for a, b in zip(p, s, strict=True):
                check(a, b)

    check(model.params, shapes)
    assert hash(model.cfg) == hash(bert_loading.read_config(model.path))


def test_padding_never_changes_hidden_states(tiny):
    model, _ = tiny
    tokens, _, _ = random_batch(B=1, T=9)
    with torch.inference_mode():
        alone = bert.forward(model.params, model.cfg, tokens, None)
        padded = torch.cat([tokens, torch.zeros(1, 20, dtype=torch.long)], 1)
        mask = (torch.arange(29)[None] < 9).long()
        in_pad = bert.forward(model.params, model.cfg, padded, mask)
    torch.testing.assert_close(in_pad[:, :9], alone, atol=1e-6, rtol=0)


def test_empty_batch(tiny):
    model, _ = tiny
    with torch.inference_mode():
        assert bert.forward(model.params, model.cfg, torch.zeros(0, 5, dtype=torch.long)).shape == (0, 5, 32)


def test_fused_attention_half_changes_nothing_and_matches_transformers(tmp_path, monkeypatch):
    """Batches of enough sequences run each layer's attention half as one C pass per group of sequences,
    on their real tokens packed together (skip_padding: cpu_attention.packed_attention_block) or padded
    (attention_block): the bits of the three calls they replace at every real position (padded: at
    every position), and transformers' hidden states."""
    hf = tiny_hf()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg = bert_loading.read_config(tmp_path)
    params = bert_loading.pack_params(bert_loading.load_params(tmp_path, cfg))
    B, T = 2 * llmfn_linear.BLOCK_MIN_PER_THREAD * torch.get_num_threads() + 1, 29  # 2 sequences a task
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(5, 128, (B, T), generator=g)
    mask = (torch.arange(T)[None] < torch.randint(1, T + 1, (B, 1), generator=g)).long()
    keep = mask.bool()
    calls = {"packed": [], "padded": []}
    for name, module in (("packed", cpu_attention.packed_attention_block), ("padded", cpu_attention.attention_block)):
        monkeypatch.setattr(cpu_attention, f"{name}_attention_block" if name == "packed" else "attention_block",
                            lambda *a, _f=module, _n=name, **k: calls[_n].append(1) or _f(*a, **k))  # fmt: skip
    with torch.inference_mode():
        packed = bert.forward(params, cfg, tokens, mask, skip_padding=True)
        assert calls == {"packed": [1] * cfg.n_layers, "padded": []} or not cpu_attention.available()
        assert torch.isfinite(packed).all() and not packed[~keep].any()  # padded positions: zeros here
        padded = bert.forward(params, cfg, tokens, mask)  # every position computed
        assert len(calls["padded"]) == cfg.n_layers or not cpu_attention.available()
        monkeypatch.setattr(llmfn_linear, "BLOCK_MIN_PER_THREAD", B)
        three = bert.forward(params, cfg, tokens, mask)
    assert torch.equal(packed[keep], three[keep]) and torch.equal(padded, three)
    hf_out = hf_hidden(hf, tokens, mask)
    assert (packed[keep] - hf_out[keep]).abs().max().item() <= 1e-5
    assert (padded - hf_out).abs().max().item() <= 1e-5  # without skip_padding, the padded positions too


def test_feed_forward_fused_and_chunked_change_nothing(tiny, monkeypatch):
    """Packed weights run the feed-forward fused (one C pass), plain ones in row chunks of at most
    linear.FFN_ROWS: the same bits either way, and whatever the chunking."""
    model, _ = tiny
    tokens, mask, _ = random_batch(B=4, T=17)
    plain = {**model.params, "layers": [{k: getattr(w, "w", w) for k, w in layer.items()} for layer in model.params["layers"]]}
    with torch.inference_mode():
        fused = bert.forward(model.params, model.cfg, tokens, mask)
        whole = bert.forward(plain, model.cfg, tokens, mask)
        monkeypatch.setattr(llmfn_linear, "FFN_ROWS", 20)  # 68 rows: 4 chunks of 17
        assert torch.equal(bert.forward(plain, model.cfg, tokens, mask), whole)
        assert torch.equal(bert.forward(model.params, model.cfg, tokens, mask), fused)
    assert (fused - whole).abs().max().item() <= 1e-5  # the C GEMM against oneDNN: rounding only


# ---------------------------------------------------------------------------------------------- pooling


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pooling_math_per_sentence(mode):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 11, 8, generator=g)
    lengths = torch.tensor([11, 1, 5, 2])
    hidden_padded = hidden.clone()
    hidden_padded[torch.arange(11)[None] >= lengths[:, None]] = 1e4  # garbage in padding must not leak
    out = pool(hidden_padded, lengths, (mode,))
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[b], ref_pool(hidden[b, :n], mode), atol=1e-5, rtol=1e-5)


def test_pooling_modes_concatenate_in_sentence_transformers_order(tmp_path):
    hf = tiny_hf(seed=4)
    folder = save_st_folder(hf, tmp_path / "m", pooling=("cls", "max", "mean"), normalize=False)
    model = load_embedding_model(folder)
    assert model.extra["pooling"] == ("cls", "max", "mean") and model.extra["normalize"] is False
    texts = ["hello world", "the quick brown fox jumps over the lazy dog"]
    vecs = embed(model, texts)
    assert vecs.shape == (2, 3 * 32)
    for i, ids in enumerate(tokenize(model, texts)):
        h = hf_hidden(hf, torch.tensor([ids]), None)[0]
        want = torch.cat([ref_pool(h, m) for m in ("cls", "max", "mean")])
        torch.testing.assert_close(vecs[i], want, atol=2e-5, rtol=1e-5)
    # the newer `pooling_mode` list key reads the same
    folder2 = save_st_folder(hf, tmp_path / "m2", pooling=("lasttoken", "weightedmean"), legacy=False)
    assert load_embedding_model(folder2).extra["pooling"] == ("lasttoken", "weightedmean")


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_embed_matches_bertmodel_plus_pooling(tmp_path, mode):
    hf = tiny_hf(seed=5)
    model = load_embedding_model(save_st_folder(hf, tmp_path / "m", pooling=(mode,)))
    texts = ["", "hello", "the cat sat on the mat", "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3]
    vecs = embed(model, texts, batch_size=3)
    for i, ids in enumerate(tokenize(model, texts)):
        h = hf_hidden(hf, torch.tensor([ids]), None)[0]
        want = F.normalize(ref_pool(h, mode), dim=0)
        assert F.cosine_similarity(vecs[i], want, dim=0) >= 0.99999
        torch.testing.assert_close(vecs[i], want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- embed


def test_bfloat16_weights_stay_close(tiny):
    model, _ = tiny
    low = load_embedding_model(model.path, dtype=torch.bfloat16)
    assert low.params["layers"][0]["wqkv"].dtype == torch.bfloat16
    texts = ["hello world", "the quick brown fox jumps over the lazy dog"]
    vecs = embed(low, texts)
    assert vecs.dtype == torch.float32 and F.cosine_similarity(vecs, embed(model, texts)).min() > 0.99


def test_special_tokens_wrap_truncation_and_usage(tiny):
    model, _ = tiny
    assert model.extra["prefix_ids"] == (2,) and model.extra["suffix_ids"] == (3,)
    (short,) = tokenize(model, "hello world")
    assert short[0] == 2 and short[-1] == 3 and len(short) == 4
    (long,) = tokenize(model, "hello " * 100)
    assert len(long) == model.extra["max_seq_length"] == 48 and long[0] == 2 and long[-1] == 3
    assert tokenize(model, [""]) == [[2, 3]]
    vecs, used = embed_with_usage(model, ["hello world", "hello " * 100, ""])
    assert vecs.shape == (3, 32) and vecs.dtype == torch.float32 and used == 4 + 48 + 2


def test_special_token_strings_in_text_stay_text(tiny):
    model, _ = tiny
    (ids,) = tokenize(model, "a [SEP] b [MASK] [CLS]")
    assert ids[0] == 2 and ids[-1] == 3
    assert not set(ids[1:-1]) & {0, 2, 3, 4}  # no [PAD], [CLS], [SEP], [MASK] from the text


def test_token_id_inputs_equal_text_inputs(tiny):
    model, _ = tiny
    texts = ["hello world", "the lazy dog"]
    plain = [ids[1:-1] for ids in tokenize(model, texts)]
    torch.testing.assert_close(embed(model, plain), embed(model, texts), atol=0, rtol=0)
    torch.testing.assert_close(embed(model, plain[0]), embed(model, texts[0]), atol=0, rtol=0)
    assert embed(model, []).shape == (0, 32)
    with pytest.raises(RequestError, match="out of range"):
        embed(model, [[1, 2, 999]])
    with pytest.raises(RequestError):
        embed(model, [3.5])
    with pytest.raises(RequestError):
        embed(model, "x", batch_size=0)


def test_normalize_override(tiny):
    model, _ = tiny
    raw = embed(model, ["hello world", "the cat"], normalize=False)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(F.normalize(raw, dim=1), embed(model, ["hello world", "the cat"]), atol=1e-6, rtol=0)


sentences = st.lists(st.lists(st.sampled_from(WORDS + ["[SEP]", "!", "x7"]), max_size=50).map(" ".join), min_size=1, max_size=8)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=sentences, batch_size=st.integers(1, 7))
def test_order_preserved_and_padding_invariant(tiny, texts, batch_size):
    """Length-sorted, per-batch padded embedding == embedding each sentence alone, in input order."""
    model, _ = tiny
    batched = embed(model, texts, batch_size=batch_size)
    alone = torch.cat([embed(model, [t]) for t in texts])
    torch.testing.assert_close(batched, alone, atol=2e-6, rtol=0)


@given(lengths=st.lists(st.integers(2, 300), max_size=40), batch_size=st.integers(1, 9))
def test_batches_cover_every_row_once_longest_first(lengths, batch_size):
    groups = batches(lengths, batch_size)
    flat = [i for g in groups for i in g]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    for g in groups:
        longest = lengths[g[0]]
        assert 1 <= len(g) <= batch_size
        assert longest < SPLIT_MIN_TOKENS or all(2 * lengths[i] >= longest for i in g)


def test_to_base64_is_little_endian_float32(tiny):
    model, _ = tiny
    vecs = embed(model, ["hello", "world"])
    for row, s in zip(vecs, to_base64(vecs), strict=True):
        assert np.array_equal(np.frombuffer(base64.b64decode(s), dtype="<f4"), row.numpy())


def test_plain_bertmodel_folder_and_no_post_processor(tmp_path):
    """Without modules.json: mean pooling, no normalization; without a post-processor: cls/sep from
    tokenizer_config.json, as BertTokenizer adds them."""
    hf = tiny_hf(seed=6)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    write_wordpiece(tmp_path, post_processor=False)
    model = load_embedding_model(tmp_path)
    assert model.extra["pooling"] == ("mean",) and model.extra["normalize"] is False
    assert model.extra["prefix_ids"] == (2,) and model.extra["suffix_ids"] == (3,)
    assert model.extra["max_seq_length"] == 64  # min(model_max_length, max_position_embeddings)
    (ids,) = tokenize(model, "hello world")
    torch.testing.assert_close(embed(model, "hello world")[0], hf_hidden(hf, torch.tensor([ids]), None)[0].mean(0), atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- errors


def test_checkpoint_errors_name_the_file_and_tensor(tmp_path):
    hf = tiny_hf()
    good = save_st_folder(hf, tmp_path / "good")

    with pytest.raises(CheckpointError, match="not a model folder"):
        load_embedding_model(tmp_path / "nope")

    pickled = tmp_path / "pickled"
    shutil.copytree(good, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*never unpickles"):
        load_embedding_model(pickled)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(good, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=r"corrupt[/\\]model\.safetensors"):
        load_embedding_model(corrupt)

    wrong = tmp_path / "wrong"
    shutil.copytree(good, wrong)
    from safetensors.torch import load_file

    tensors = load_file(wrong / "model.safetensors")
    tensors["encoder.layer.1.intermediate.dense.weight"] = torch.zeros(47, 32)
    save_file(tensors, wrong / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*encoder\.layer\.1\.intermediate\.dense\.weight.*\(47, 32\)"):
        load_embedding_model(wrong)

    del tensors["encoder.layer.1.intermediate.dense.weight"]
    save_file(tensors, wrong / "model.safetensors")
    with pytest.raises(CheckpointError, match="encoder.layer.1.intermediate.dense.weight.*missing"):
        load_embedding_model(wrong)


def test_unsupported_models_are_refused(tmp_path):
    hf = tiny_hf()
    folder = save_st_folder(hf, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "position_embedding_type": "relative_key"}))
    with pytest.raises(UnsupportedModelError, match="relative_key"):
        load_embedding_model(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "roberta"}))
    with pytest.raises(UnsupportedModelError, match="roberta"):
        load_embedding_model(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    mods = json.loads((folder / "modules.json").read_text())
    mods.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(mods))
    with pytest.raises(UnsupportedModelError, match="Dense"):
        load_embedding_model(folder)


# ---------------------------------------------------------------------------------------------- all-MiniLM-L6-v2


def varied_sentences() -> list[str]:
    base = [
        "", " ", "a", "Hello, world!", "The quick brown fox jumps over the lazy dog.",
        "How do I reset my password?", "What is the capital of Australia?", "I love pizza 🍕 and tacos 🌮!",
        "😀😃😄😁😆😅🤣😂", "👩‍👩‍👧‍👦 family emoji with ZWJ", "Le cœur a ses raisons que la raison ne connaît point.",
        "Straße, Größe, naïve café, résumé", "Москва — столица России.", "東京は日本の首都です。", "我喜欢学习机器学习和自然语言处理。",
        "한국어 문장도 처리할 수 있어야 합니다.", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "ภาษาไทยไม่มีช่องว่าง",
        "def f(x):\n    return x ** 2  # square", "SELECT * FROM users WHERE id = 42;", "https://example.com/path?q=1&r=2",
        "e-mail: someone@example.org", "3.14159 2.71828 1.41421 1e-12 -0.0", "ALL CAPS SENTENCE HERE", "MiXeD cAsE tExT",
        "tabs\tand\nnewlines\r\nmixed", "   leading and trailing spaces   ", "a [SEP] b [MASK] c [CLS] [PAD]", "[UNK]",
        "Ünïcödé àccénts éverywhere", "¿Dónde está la biblioteca?", "C'est la vie, n'est-ce pas?", "don't won't can't shouldn't",
        "!!!???...,,,;;;:::", "(parentheses) [brackets] {braces} <angles>", "The year 2024 had 366 days.",
        "Zero-width\u200bspace and\u00a0nbsp", "control\x07chars\x1b here", "supercalifragilisticexpialidocious " * 3,
        "word " * 300, " ".join(f"token{i}" for i in range(400)), "长文本" * 400, "🙂" * 300,
        "Photosynthesis converts light energy into chemical energy.", "The mitochondria is the powerhouse of the cell.",
        "Quantum entanglement links particle states.", "Stock markets rallied after the rate announcement.",
        "She sells seashells by the seashore.", "To be, or not to be, that is the question.",
        "Rain is expected later this week across the region.", "Embeddings map text to dense vectors.",
        "The Eiffel Tower is in Paris.", "Der schnelle braune Fuchs springt über den faulen Hund.",
        "El rápido zorro marrón salta sobre el perro perezoso.", "Ο γρήγορος καφέ αλεπού", "Tiếng Việt có dấu",
        "1 2 3 4 5 6 7 8 9 10", "αβγδε ζηθικ", "∑∫∂√∞≈≠≤≥", "newline\n\n\nparagraphs", "x" * 1000, "end.",
    ]  # fmt: skip
    assert len(base) == 64
    return base


@pytest.fixture(scope="module")
def minilm():
    try:
        folder = package_path(ALIASES["all-minilm-l6-v2"])
    except CheckpointError as e:
        pytest.fail(str(e))
    assert (folder / "model.safetensors").is_file(), f"{folder}: weights not present"
    return folder, load_embedding_model(folder)


@pytest.mark.slow
def test_minilm_matches_transformers_plus_pooling(minilm):
    folder, model = minilm
    via_core = load("all-minilm-l6-v2")  # llmfn.load dispatches model_type "bert" here
    assert via_core.kind == "embedding" and via_core.cfg == model.cfg and via_core.extra == model.extra
    assert model.extra == {"pooling": ("mean",), "normalize": True, "max_seq_length": 256, "do_lower_case": False,
                           "prefix_ids": (101,), "suffix_ids": (102,)}  # fmt: skip
    texts = varied_sentences()
    vecs, used = embed_with_usage(model, texts, batch_size=16)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    hf = transformers.BertModel.from_pretrained(str(folder)).eval()
    ids = tokenize(model, texts)
    assert used == sum(map(len, ids)) and max(map(len, ids)) == 256
    ref = torch.empty_like(vecs)
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), 8):  # the reference pads per batch of similar lengths too
        idx = order[start : start + 8]
        enc = hf_tok([texts[i] for i in idx], padding=True, truncation=True, max_length=256, return_tensors="pt",
                     split_special_tokens=True)  # fmt: skip
        for row, mask, i in zip(enc["input_ids"], enc["attention_mask"], idx, strict=True):
            assert row[mask.bool()].tolist() == ids[i], texts[i][:40]
        h = hf_hidden(hf, enc["input_ids"], enc["attention_mask"])
        m = enc["attention_mask"].unsqueeze(-1).float()
        ref[idx] = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    cos = F.cosine_similarity(vecs, ref)
    assert cos.min() >= 0.99999, [(texts[i][:30], float(cos[i])) for i in torch.nonzero(cos < 0.99999).flatten()]
    # batch composition never changes a vector (long and short texts mixed, other batch size)
    mixed = list(range(36, 48))
    torch.testing.assert_close(embed(model, [texts[i] for i in mixed[::-1]], batch_size=5).flip(0), vecs[mixed], atol=2e-6, rtol=0)


@pytest.mark.parametrize("fused_attention", [False, True])
def test_feed_forward_skips_padding_rows_bit_for_bit(tiny, fused_attention, monkeypatch):
    """skip_padding, where the C attention half does not take a batch packed: the feed-forward halves run
    on the real tokens only: every real position keeps the bits it gets when the padding rows run too,
    and the padding rows stay finite. Fused: the attention half as C passes per group of sequences."""
    model, _ = tiny
    monkeypatch.setattr(bert, "packed_attention_block", lambda *a, **k: None)
    B, T = 2 * llmfn_linear.BLOCK_MIN_PER_THREAD * torch.get_num_threads() + 1, 29  # 2 sequences a task
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(5, 128, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    if not fused_attention:
        monkeypatch.setattr(llmfn_linear, "BLOCK_MIN_PER_THREAD", 10 * B)
    rows = []
    skipping = bert._feed_forward
    monkeypatch.setattr(bert, "_feed_forward", lambda x, *a: rows.append(len(a[-1])) or skipping(x, *a))
    with torch.inference_mode():
        batch = bert.forward(model.params, model.cfg, tokens, mask.long(), skip_padding=True)
        assert rows == [int(lengths.sum())] * model.cfg.n_layers  # only the real tokens went through
        monkeypatch.setattr(bert, "_feed_forward", lambda x, layer, cfg, real: skipping(x, layer, cfg, None))
        padded = bert.forward(model.params, model.cfg, tokens, mask.long(), skip_padding=True)
    assert torch.isfinite(batch).all()
    assert torch.equal(batch[mask], padded[mask])
