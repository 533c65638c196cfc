"""Qwen-1, Baichuan 2 and Llama 2 checkpoints in their original layouts, written here from tiny
random transformers models, against transformers and plain torch references."""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import llmfn
from llmfn.chat_template import apply_chat_template, render
from llmfn.kernels import reference as ref
from llmfn.loading import chat_formats
from llmfn.loading.baichuan import baichuan_config
from llmfn.loading.qwen import qwen_config
from llmfn.models import llama
from tiny import CORPUS, write_tokenizer

V, D, HEADS, FF, LAYERS = 384, 64, 4, 96, 2


def _tokens(b, t, seed=1):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def _hf(family, seed=0, **overrides):
    """A tiny random transformers model: Qwen2 (q/k/v bias) or Llama, multi-head (as Qwen-1 and Baichuan)."""
    import transformers

    kwargs = dict(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.2)
    kwargs.update(overrides)
    cfg_cls, model_cls = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "llama": ("LlamaConfig", "LlamaForCausalLM")}[family]
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kwargs)).eval()


def _write(folder, config, tensors):
    """config.json, model.safetensors and a byte-level BPE tokenizer.json without a chat template."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    write_tokenizer(folder, V)
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del tok_cfg["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return folder


# ---------------------------------------------------------------------------------------------
# Qwen-1: the QWenLMHeadModel layout made from a Qwen2 model (the same math within seq_length)
# ---------------------------------------------------------------------------------------------


def write_qwen1(folder, hf, *, seq_length=64, ntk=True, logn=True):
    """Qwen2 weights under Qwen-1's names: c_attn = [q; k; v] with its bias, w2 = gate, w1 = up."""
    sd = hf.state_dict()
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"], "transformer.ln_f.weight": sd["model.norm.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(hf.config.num_hidden_layers):
        a, p = f"model.layers.{i}.", f"transformer.h.{i}."
        out[p + "ln_1.weight"] = sd[a + "input_layernorm.weight"]
        out[p + "ln_2.weight"] = sd[a + "post_attention_layernorm.weight"]
        out[p + "attn.c_attn.weight"] = torch.cat([sd[a + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        out[p + "attn.c_attn.bias"] = torch.cat([sd[a + f"self_attn.{x}_proj.bias"] for x in "qkv"])
        out[p + "attn.c_proj.weight"] = sd[a + "self_attn.o_proj.weight"]
        out[p + "mlp.w1.weight"] = sd[a + "mlp.up_proj.weight"]
        out[p + "mlp.w2.weight"] = sd[a + "mlp.gate_proj.weight"]
        out[p + "mlp.c_proj.weight"] = sd[a + "mlp.down_proj.weight"]
    c = hf.config
    config = {
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers, "intermediate_size": 2 * c.intermediate_size,
        "kv_channels": c.hidden_size // c.num_attention_heads, "rotary_emb_base": 10000, "rotary_pct": 1.0,
        "layer_norm_epsilon": c.rms_norm_eps, "seq_length": seq_length, "max_position_embeddings": 4 * seq_length,
        "use_dynamic_ntk": ntk, "use_logn_attn": logn, "no_bias": True, "tie_word_embeddings": False,
    }
    return _write(folder, config, out)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    hf = _hf("qwen2")
    folder = write_qwen1(tmp_path_factory.mktemp("qwen1"), hf, seq_length=32)
    return hf, llmfn.load(folder)


def test_qwen1_layout_gives_qwen2_logits_within_trained_length(qwen):
    hf, model = qwen
    assert model.cfg.dynamic_ntk_length == 32 and model.cfg.logn_length == 32
    tokens = _tokens(2, 32)
    with torch.no_grad():
        expected = hf(tokens).logits
    assert (llmfn.logits(model, tokens) - expected).abs().max().item() <= 1e-4


def test_qwen1_greedy_decode_matches_qwen2(qwen):
    hf, model = qwen
    prompt = [5, 17, 100, 33, 250, 7]
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert list(llmfn.generate(model, prompt, max_tokens=20, stop_token_ids=[])) == want


def test_qwen1_chatml_fallback_and_stops(qwen):
    _, model = qwen
    assert model.chat_template == chat_formats.QWEN_CHATML
    tok = model.tokenizer
    assert {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|im_start|>")} <= set(model.generation.eos_ids)


def qwen1_reference(sd, config, tokens):
    """Qwen-1's forward for one whole sequence, written from its published formulas: dynamic NTK
    (alpha from the sequence length, rotary base * alpha ** (d / (d - 2))) and logn query scaling."""
    L, S, hd = tokens.shape[1], config["seq_length"], config["kv_channels"]
    H = config["num_attention_heads"]
    alpha = 1.0
    if config["use_dynamic_ntk"]:
        alpha = max(2 ** math.ceil(math.log(L / S, 2) + 1) - 1, 1)
    base = config["rotary_emb_base"] * alpha ** (hd / (hd - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2).float() / hd))
    emb = torch.outer(torch.arange(L).float(), inv_freq).repeat(1, 2)[None, :, None, :]  # [1, L, 1, hd]

    def rope(t):
        t1, t2 = t.chunk(2, dim=-1)
        return t * emb.cos() + torch.cat((-t2, t1), dim=-1) * emb.sin()

    logn = torch.tensor([math.log(i, S) if i > S else 1.0 for i in range(1, L + 1)])[None, :, None, None]

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config["layer_norm_epsilon"]))

    causal = torch.ones(L, L, dtype=torch.bool).tril()
    x = sd["transformer.wte.weight"][tokens]
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        h = rms(x, sd[p + "ln_1.weight"])
        q, k, v = F.linear(h, sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"]).view(*tokens.shape, 3, H, hd).unbind(2)
        q, k = rope(q), rope(k)
        if config["use_logn_attn"] and L > S:
            q = q * logn
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + F.linear(torch.einsum("bhqk,bkhd->bqhd", probs, v).flatten(2), sd[p + "attn.c_proj.weight"])
        h = rms(x, sd[p + "ln_2.weight"])
        a1, a2 = F.linear(h, sd[p + "mlp.w1.weight"]), F.linear(h, sd[p + "mlp.w2.weight"])
        x = x + F.linear(a1 * F.silu(a2), sd[p + "mlp.c_proj.weight"])
    return F.linear(rms(x, sd["transformer.ln_f.weight"]), sd["lm_head.weight"])


@pytest.mark.parametrize("length", [16, 17, 33, 70])
@pytest.mark.parametrize("ntk, logn", [(True, True), (True, False), (False, True)])
def test_qwen1_dynamic_ntk_and_logn_past_seq_length_match_reference(tmp_path, length, ntk, logn):
    from safetensors.torch import load_file

    folder = write_qwen1(tmp_path / "q", _hf("qwen2", seed=3), seq_length=16, ntk=ntk, logn=logn)
    model = llmfn.load(folder)
    config = json.loads((folder / "config.json").read_text())
    tokens = _tokens(1, length, seed=length)
    want = qwen1_reference(load_file(str(folder / "model.safetensors")), config, tokens)
    assert (llmfn.logits(model, tokens) - want).abs().max().item() <= 1e-4


def test_dynamic_ntk_alpha_and_logn_follow_the_formulas():
    cfg = qwen_config({"model_type": "qwen", "vocab_size": 8, "hidden_size": 64, "num_attention_heads": 4,
                       "num_hidden_layers": 1, "intermediate_size": 32, "seq_length": 16,
                       "use_dynamic_ntk": True, "use_logn_attn": True})
    hd = cfg.head_dim
    lengths = list(range(1, 300)) + [1024, 1025, 4096, 4097]
    positions = torch.tensor([[n - 1] for n in lengths])  # one decode step per row, at length n
    got = llama.dynamic_ntk_inv_freq(cfg, positions)[:, 0]  # [rows, hd/2]
    for n, row in zip(lengths, got, strict=True):
        alpha = max(2 ** math.ceil(math.log(n / 16, 2) + 1) - 1, 1)
        base = 10000.0 * alpha ** (hd / (hd - 2))
        torch.testing.assert_close(row, 1.0 / (base ** (torch.arange(0, hd, 2).float() / hd)), rtol=1e-6, atol=0)
    scale = llama.logn_scale(cfg, torch.arange(300)[None])[0, :, 0, 0]
    want = torch.tensor([math.log(i, 16) if i > 16 else 1.0 for i in range(1, 301)])
    torch.testing.assert_close(scale, want, rtol=1e-6, atol=0)
    assert (scale[:16] == 1).all()


def test_qwen1_config_mapping():
    raw = {"model_type": "qwen", "vocab_size": 151936, "hidden_size": 4096, "num_attention_heads": 32,
           "num_hidden_layers": 32, "intermediate_size": 22016, "kv_channels": 128, "rotary_emb_base": 10000,
           "rotary_pct": 1.0, "layer_norm_epsilon": 1e-6, "seq_length": 8192, "max_position_embeddings": 32768,
           "use_dynamic_ntk": True, "use_logn_attn": True, "no_bias": True}
    cfg = qwen_config(raw)
    assert (cfg.intermediate_size, cfg.head_dim, cfg.num_kv_heads) == (11008, 128, 32)
    assert (cfg.dynamic_ntk_length, cfg.logn_length, cfg.max_position_embeddings) == (8192, 8192, 32768)
    assert cfg.qkv_bias and not cfg.o_bias and not cfg.mlp_bias
    plain = qwen_config({**raw, "use_dynamic_ntk": False, "use_logn_attn": False})
    assert plain.dynamic_ntk_length is None and plain.logn_length is None
    with pytest.raises(llmfn.UnsupportedModelError, match="rotary_pct"):
        qwen_config({**raw, "rotary_pct": 0.5})


# ---------------------------------------------------------------------------------------------
# Baichuan 2: 7B layout (W_pack, RoPE) from a Llama; 13B layout (ALiBi) against a torch reference
# ---------------------------------------------------------------------------------------------


def baichuan_tensors(hf):
    """Llama weights under Baichuan's names: W_pack = [q; k; v]."""
    sd = hf.state_dict()
    out = {}
    for k, v in sd.items():
        if "k_proj" in k or "v_proj" in k or "rotary" in k:
            continue
        if "q_proj" in k:
            a = k.removesuffix("q_proj.weight")
            out[a + "W_pack.weight"] = torch.cat([sd[a + f"{x}_proj.weight"] for x in "qkv"])
        else:
            out[k] = v
    return out


def baichuan_config_json(hf, *, alibi, vocab=V):
    c = hf.config
    config = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "vocab_size": vocab,
              "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
              "num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers,
              "hidden_act": "silu", "model_max_length": 256, "rms_norm_eps": c.rms_norm_eps,
              "tie_word_embeddings": False, "z_loss_weight": 0, "norm_head": True}
    if not alibi:
        config["max_position_embeddings"] = 256
    return config


@pytest.fixture(scope="module")
def baichuan7b(tmp_path_factory):
    hf = _hf("llama", seed=5)
    folder = _write(tmp_path_factory.mktemp("baichuan7b"), baichuan_config_json(hf, alibi=False), baichuan_tensors(hf))
    return hf, llmfn.load(folder)


def test_baichuan2_7b_layout_gives_llama_logits_with_norm_head(baichuan7b):
    hf, model = baichuan7b
    assert model.cfg.position_encoding == "rope" and model.cfg.norm_head and "rope_inv_freq" in model.params
    tokens = _tokens(2, 23)
    with torch.no_grad():
        hidden = hf.model(tokens).last_hidden_state
        expected = F.linear(hidden, F.normalize(hf.lm_head.weight, dim=-1))
    assert (llmfn.logits(model, tokens) - expected).abs().max().item() <= 1e-4
    torch.testing.assert_close(model.params["lm_head"].norm(dim=-1), torch.ones(V))


def baichuan13b_reference(sd, config, tokens):
    """Baichuan 2 13B's forward written from its modeling code: ALiBi as its future mask
    (slope * key position, -inf above the diagonal), W_pack split in three, NormHead."""
    H, D_ = config["num_attention_heads"], config["hidden_size"]
    hd, L = D_ // H, tokens.shape[1]

    def interleave(n):  # Baichuan's _get_interleave
        if math.log2(n).is_integer():
            start = 2 ** (-(2 ** -(math.log2(n) - 3)))
            return [start * start**i for i in range(n)]
        closest = 2 ** math.floor(math.log2(n))
        return interleave(closest) + interleave(2 * closest)[0::2][: n - closest]

    slopes = torch.tensor(interleave(H))
    mask = torch.full((L, L), float("-inf")).triu(1)[None] + slopes[:, None, None] * torch.arange(L)[None, None, :]

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config["rms_norm_eps"]))

    x = sd["model.embed_tokens.weight"][tokens]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q, k, v = F.linear(h, sd[p + "self_attn.W_pack.weight"]).view(*tokens.shape, 3, H, hd).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + mask
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).flatten(2)
        x = x + F.linear(out, sd[p + "self_attn.o_proj.weight"])
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate, up = F.linear(h, sd[p + "mlp.gate_proj.weight"]), F.linear(h, sd[p + "mlp.up_proj.weight"])
        x = x + F.linear(F.silu(gate) * up, sd[p + "mlp.down_proj.weight"])
    return F.linear(rms(x, sd["model.norm.weight"]), F.normalize(sd["lm_head.weight"], dim=-1))


@pytest.fixture(scope="module", params=[4, 6])
def baichuan13b(request, tmp_path_factory):
    heads = request.param  # 6: not a power of two, as the real 13B's 40 heads
    hf = _hf("llama", seed=7, num_attention_heads=heads, num_key_value_heads=heads, hidden_size=16 * heads)
    tensors = baichuan_tensors(hf)
    folder = _write(tmp_path_factory.mktemp("baichuan13b"), baichuan_config_json(hf, alibi=True), tensors)
    return {k: v.clone() for k, v in tensors.items()}, json.loads((folder / "config.json").read_text()), llmfn.load(folder)


def test_baichuan2_13b_alibi_forward_matches_torch_reference(baichuan13b):
    sd, config, model = baichuan13b
    assert model.cfg.position_encoding == "alibi" and "rope_inv_freq" not in model.params
    tokens = _tokens(2, 29)
    want = baichuan13b_reference(sd, config, tokens)
    assert (llmfn.logits(model, tokens) - want).abs().max().item() <= 1e-4


def test_baichuan2_13b_cached_decode_equals_full_forward(baichuan13b):
    _, _, model = baichuan13b
    tokens = _tokens(1, 12, seed=4)
    full = llmfn.logits(model, tokens)
    cache = llama.init_cache(model.cfg, 1, 16)
    with torch.inference_mode():
        first, cache = llama.forward(model.params, model.cfg, tokens[:, :5], torch.arange(5)[None], cache)
        steps = [first]
        for p in range(5, 12):
            out, cache = llama.forward(model.params, model.cfg, tokens[:, p : p + 1], torch.tensor([[p]]), cache)
            steps.append(out)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


def test_baichuan_config_detection():
    base = {"model_type": "baichuan", "hidden_size": 5120, "intermediate_size": 13696, "num_attention_heads": 40,
            "num_hidden_layers": 40, "model_max_length": 4096, "rms_norm_eps": 1e-6, "vocab_size": 125696}
    b13 = baichuan_config(base)  # Baichuan2-13B: no rope fields
    assert (b13.position_encoding, b13.norm_head, b13.max_position_embeddings) == ("alibi", True, 4096)
    b7 = baichuan_config({**base, "hidden_size": 4096, "num_attention_heads": 32, "max_position_embeddings": 4096})
    assert (b7.position_encoding, b7.norm_head, b7.head_dim) == ("rope", True, 128)
    v1 = baichuan_config({**base, "vocab_size": 64000})  # Baichuan 1: plain lm_head
    assert not v1.norm_head
    forced = baichuan_config({**base, "max_position_embeddings": 4096, "position_encoding": "alibi", "norm_head": False})
    assert (forced.position_encoding, forced.norm_head) == ("alibi", False)


# ---------------------------------------------------------------------------------------------
# ALiBi: slopes and bias against transformers' BLOOM, through the kernels' bias path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 5, 6, 8, 12, 16, 20, 32, 40, 64, 80])
def test_alibi_slopes_equal_bloom(heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    bloom = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)  # [heads, 1, 2]: slope * key position
    torch.testing.assert_close(ref.alibi_slopes(heads), bloom[:, 0, 1], rtol=1e-5, atol=0)


def _bloom_attention(q, k, v, scale):
    """Plain softmax attention with BLOOM's ALiBi tensor (slope * key position) and a causal mask."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    b, h, s, _ = q.shape
    alibi = build_alibi_tensor(torch.ones(b, s), h, torch.float32).view(b, h, 1, s)
    scores = q @ k.transpose(-1, -2) * scale + alibi
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("heads", [5, 8])
def test_alibi_attention_bias_equals_bloom(heads):
    g = torch.Generator().manual_seed(heads)
    q, k, v = (torch.randn(2, heads, 19, 16, generator=g) for _ in range(3))
    pos = torch.arange(19).expand(2, 19)
    slopes = ref.alibi_slopes(heads)
    want = _bloom_attention(q, k, v, 0.25)
    torch.testing.assert_close(llmfn.kernels.attention(q, k, v, pos, 0.25, slopes), want, rtol=1e-5, atol=1e-5)
    from llmfn.kernels import triton_attention
    torch.testing.assert_close(triton_attention.prefill(q, k, v, pos, 0.25, slopes), want, rtol=1e-4, atol=1e-4)
    last = triton_attention.decode(q[:, :, -1:], k, v, pos[:, -1:], 0.25, slopes)
    torch.testing.assert_close(last, want[:, :, -1:], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Tokenizers of the original folders and the built-in chat formats
# ---------------------------------------------------------------------------------------------

CHAT_CORPUS = CORPUS + [
    "You are a helpful assistant. Answer briefly and politely.",
    "What is the capital of France? The capital of France is Paris.",
    "Tell me a joke about cats. Why did the cat sit on the computer? To keep an eye on the mouse!",
    "[INST] <<SYS>> system prompt <</SYS>> [/INST] user assistant",
] * 8
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "Tell me a joke about cats."},
]


def _needs_template_specials(tokenizer, *names):
    """chat_template matches special tokens through its own table; skip until it sees these."""
    from llmfn.chat_template import special_token_ids

    missing = [n for n in names if n not in special_token_ids(tokenizer)]
    assert not missing, f"llmfn.chat_template does not match {missing} of a {tokenizer.format} tokenizer"


def train_sentencepiece(path, **options):
    """A small SentencePiece BPE model with byte fallback trained on a few sentences."""
    import io

    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CHAT_CORPUS), model_writer=out, model_type="bpe", vocab_size=600,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, num_threads=1, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, **options,
    )
    path.write_bytes(out.getvalue())
    return spm.SentencePieceProcessor(model_proto=out.getvalue())


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    """A Llama 2 folder with only a SentencePiece tokenizer.model (no tokenizer.json, no template)."""
    folder = tmp_path_factory.mktemp("llama2")
    sp = train_sentencepiece(folder / "tokenizer.model", add_dummy_prefix=True)
    hf = _hf("llama", seed=11, vocab_size=sp.get_piece_size())
    hf.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    return sp, folder


def test_llama2_sentencepiece_folder_gets_the_llama2_chat_format(llama2):
    sp, folder = llama2
    model = llmfn.load(folder)
    assert model.tokenizer.format == "sentencepiece" and model.tokenizer.eos_ids == (2,)
    raw = json.loads((folder / "config.json").read_text())
    assert chat_formats.fallback_template(folder, raw, model.tokenizer) == chat_formats.LLAMA2
    assert model.chat_template == chat_formats.LLAMA2


def meta_llama2_dialog(messages):
    """The Llama 2 chat prompt as Meta's chat_completion() builds it: (text, [(bos?, text, eos?)])."""
    B_INST, E_INST, B_SYS, E_SYS = "[INST]", "[/INST]", "<<SYS>>\n", "\n<</SYS>>\n\n"
    if messages[0]["role"] == "system":
        messages = [{"role": messages[1]["role"], "content": B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"]}] + messages[2:]
    pieces = [f"{B_INST} {p['content'].strip()} {E_INST} {a['content'].strip()} " for p, a in zip(messages[::2], messages[1::2], strict=False)]
    last = f"{B_INST} {messages[-1]['content'].strip()} {E_INST}"
    return pieces, last


@pytest.mark.parametrize("system", [True, False])
def test_llama2_format_renders_as_meta_chat_completion(llama2, system):
    sp, folder = llama2
    messages = CONVERSATION if system else CONVERSATION[1:]
    pieces, last = meta_llama2_dialog(messages)
    text = render(chat_formats.LLAMA2, messages, bos_token="<s>", eos_token="</s>")
    assert text == "".join(f"<s>{p}</s>" for p in pieces) + f"<s>{last}"
    tokenizer = llmfn.load_tokenizer(folder)
    _needs_template_specials(tokenizer, "<s>", "</s>")
    want = sum(([1, *sp.encode(p), 2] for p in pieces), []) + [1, *sp.encode(last)]
    assert apply_chat_template(tokenizer, chat_formats.LLAMA2, messages) == want


def test_llama2_format_rejects_non_alternating_roles():
    with pytest.raises(llmfn.RequestError, match="alternate"):
        render(chat_formats.LLAMA2, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
               bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def baichuan2_chat(tmp_path_factory):
    """A Baichuan 2 7B-layout folder with a SentencePiece tokenizer whose user-defined
    <reserved_106> / <reserved_107> sit at ids 195 / 196, as in the original."""
    folder = tmp_path_factory.mktemp("baichuan2chat")
    reserved = [f"<filler_{i}>" for i in range(192)] + ["<reserved_106>", "<reserved_107>"]
    sp = train_sentencepiece(folder / "tokenizer.model", add_dummy_prefix=False, user_defined_symbols=reserved)
    assert (sp.piece_to_id("<reserved_106>"), sp.piece_to_id("<reserved_107>")) == (195, 196)
    hf = _hf("llama", seed=13, vocab_size=sp.get_piece_size())
    (folder / "config.json").write_text(json.dumps(baichuan_config_json(hf, alibi=False, vocab=sp.get_piece_size())))
    save_file({k: v.contiguous() for k, v in baichuan_tensors(hf).items()}, str(folder / "model.safetensors"))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "user_token_id": 195, "assistant_token_id": 196,
         "do_sample": True, "temperature": 0.3, "top_k": 5, "top_p": 0.85, "repetition_penalty": 1.05}))
    return sp, folder


def baichuan2_chat_input(sp, messages, user=195, assistant=196):
    """Baichuan 2's build_chat_input() without its token budget: the system text, then each turn's
    role token and content, then the assistant token unless the assistant spoke last."""
    system, turns = "", messages
    if messages[0]["role"] == "system":
        system, turns = messages[0]["content"], messages[1:]
    ids = sp.encode(system)
    for m in turns:
        ids += [user if m["role"] == "user" else assistant] + sp.encode(m["content"])
    return ids + ([assistant] if messages[-1]["role"] != "assistant" else [])


@pytest.mark.parametrize("turns", [1, 3, 4])
def test_baichuan2_chat_format_tokens_equal_build_chat_input(baichuan2_chat, turns):
    sp, folder = baichuan2_chat
    model = llmfn.load(folder)
    assert model.chat_template == chat_formats.BAICHUAN2 and model.cfg.norm_head
    assert model.generation.eos_ids == (2,) and model.generation.top_k == 5
    messages = CONVERSATION[: turns + 1] if turns > 1 else CONVERSATION[1:2]
    text = render(model.chat_template, messages)
    assert text.endswith("<reserved_107>") != (messages[-1]["role"] == "assistant")
    assert apply_chat_template(model.tokenizer, model.chat_template, messages) == baichuan2_chat_input(sp, messages)


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]


@pytest.fixture(scope="module")
def qwen_tiktoken(tmp_path_factory):
    """A Qwen-1 folder with a full-size qwen.tiktoken (151,643 ranks: every byte, every byte pair,
    then three-byte tokens; made up, but shaped as the original so it is recognised by name),
    generation_config as Qwen-7B-Chat's, and a small model over the 151,936-token vocabulary."""
    import base64
    import itertools

    folder = tmp_path_factory.mktemp("qwen_tiktoken")
    ranks = [bytes([b]) for b in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)]
    three = (bytes([a, b, c]) for a in range(97, 123) for b in range(256) for c in range(256))
    ranks += list(itertools.islice(three, 151643 - len(ranks)))
    (folder / "qwen.tiktoken").write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(ranks)))
    hf = _hf("qwen2", seed=17, vocab_size=151936, hidden_size=16, num_attention_heads=2, num_key_value_heads=2,
             intermediate_size=32, num_hidden_layers=1)
    write_qwen1(folder, hf, seq_length=64)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    (folder / "generation_config.json").write_text(json.dumps(
        {"chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643, "max_window_size": 6144,
         "do_sample": True, "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1}))
    return ranks, folder


def qwen_make_context(enc, messages):
    """Qwen-1's make_context() (chatml) without its window: (raw_text, tokens). Each role and content
    is encoded on its own, specials as text, and turns are joined by a newline token."""
    im_start, im_end, nl = [151644], [151645], enc.encode("\n")
    system, turns = "You are a helpful assistant.", messages
    if messages[0]["role"] == "system":
        system, turns = messages[0]["content"], messages[1:]

    def turn(role, content):
        return im_start + enc.encode(role, disallowed_special=()) + nl + enc.encode(content, disallowed_special=()) + im_end

    tokens = turn("system", system)
    text = f"<|im_start|>system\n{system}<|im_end|>"
    for m in turns:
        tokens += nl + turn(m["role"], m["content"])
        text += f"\n<|im_start|>{m['role']}\n{m['content']}<|im_end|>"
    return text + "\n<|im_start|>assistant\n", tokens + nl + im_start + enc.encode("assistant") + nl


@pytest.mark.parametrize("turns", [1, 3])
def test_qwen1_tiktoken_folder_chatml_equals_make_context(qwen_tiktoken, turns):
    import tiktoken

    from llmfn.tokenization.tiktoken_file import KNOWN

    ranks, folder = qwen_tiktoken
    model = llmfn.load(folder)
    assert model.tokenizer.format == "tiktoken" and model.chat_template == chat_formats.QWEN_CHATML
    assert {151643, 151644, 151645} <= set(model.generation.eos_ids)
    enc = tiktoken.Encoding("qwen", pat_str=KNOWN["qwen"].pattern, mergeable_ranks={t: i for i, t in enumerate(ranks)},
                            special_tokens={s: 151643 + i for i, s in enumerate(QWEN_SPECIALS)})
    messages = CONVERSATION[1:2] if turns == 1 else CONVERSATION[1:] if turns == 3 else CONVERSATION
    text, tokens = qwen_make_context(enc, messages)
    assert render(model.chat_template, messages) == text
    text_sys, _ = qwen_make_context(enc, CONVERSATION)
    assert render(model.chat_template, CONVERSATION) == text_sys
    _needs_template_specials(model.tokenizer, "<|im_start|>", "<|im_end|>")
    assert apply_chat_template(model.tokenizer, model.chat_template, messages) == tokens
    reply = list(llmfn.generate(model, tokens, max_tokens=4, stop_token_ids=[]))
    assert len(reply) == 4


# ---------------------------------------------------------------------------------------------
# AWQ checkpoints of each layout (llmfn.kernels.quant leaves), and GPTQ through `llmfn convert gptq-to-awq`
# ---------------------------------------------------------------------------------------------

QUANTIZED = re.compile(r"\.(c_attn|c_proj|w1|w2|W_pack|o_proj|gate_proj|up_proj|down_proj)\.weight$")


def quantized_variants(tensors, group_size=32, seed=0):
    """Random int4 weights (q, zero point z, fp16 scale s) for every decoder linear of `tensors`:
    (dense tensors holding (q - z) * s, the same as AutoAWQ GEMM tensors, the same as GPTQ tensors)."""
    from llmfn.kernels.quant import pack_awq
    from llmfn.loading.convert import pack_gptq

    g = torch.Generator().manual_seed(seed)
    dense, awq, gptq = {}, {}, {}
    for name, w in tensors.items():
        if not QUANTIZED.search(name) or "ln_" in name:
            dense[name] = awq[name] = gptq[name] = w
            continue
        n, k = w.shape
        q = torch.randint(0, 16, (n, k), generator=g)
        z = torch.randint(1, 16, (k // group_size, n), generator=g)  # GPTQ v1 stores z - 1: keep z >= 1
        s = (torch.rand(k // group_size, n, generator=g) * 0.02 + 0.005).half()
        dense[name] = ((q.view(n, -1, group_size) - z.t()[..., None]) * s.t().float()[..., None]).view(n, k)
        base = name.removesuffix(".weight")
        awq.update({base + ".qweight": pack_awq(q.t()), base + ".qzeros": pack_awq(z), base + ".scales": s})
        gptq.update({base + "." + key: v for key, v in pack_gptq(q, z, s).items()})
    return dense, awq, gptq


def _layout(kind, folder):
    """(config, float tensors) of a tiny checkpoint in one original layout."""
    if kind == "qwen1":
        write_qwen1(folder, _hf("qwen2", seed=21), seq_length=32)
    else:
        hf = _hf("llama", seed=23)
        _write(folder, baichuan_config_json(hf, alibi=kind == "baichuan13b"), baichuan_tensors(hf))
    from safetensors.torch import load_file

    return json.loads((folder / "config.json").read_text()), load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("kind", ["qwen1", "baichuan7b", "baichuan13b"])
def test_awq_and_converted_gptq_checkpoints_equal_their_dense_weights(tmp_path, kind):
    from llmfn.kernels.quant import Int4Weight
    from llmfn.loading.convert import convert_gptq_to_awq

    config, tensors = _layout(kind, tmp_path / "float")
    dense, awq, gptq = quantized_variants(tensors)
    dense_model = llmfn.load(_write(tmp_path / "dense", config, dense))
    awq_config = {**config, "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 32,
                                                    "zero_point": True, "version": "gemm"}}
    gptq_config = {**config, "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                                     "desc_act": False, "sym": False}}
    awq_model = llmfn.load(_write(tmp_path / "awq", awq_config, awq))
    tokens = _tokens(2, 21)
    want = llmfn.logits(dense_model, tokens)

    def check(model):
        layer = model.params["layers"][0]
        assert all(isinstance(layer[k], Int4Weight) for k in ("wqkv", "wo", "w_gate_up", "w_down"))
        assert isinstance(model.params["lm_head"], torch.Tensor)  # dense, and row-normalised for Baichuan 2
        assert (llmfn.logits(model, tokens) - want).abs().max().item() <= 1e-4

    check(awq_model)
    if kind != "qwen1":
        torch.testing.assert_close(awq_model.params["lm_head"].norm(dim=-1), torch.ones(V))
    converted = convert_gptq_to_awq(_write(tmp_path / "gptq", gptq_config, gptq), tmp_path / "gptq-awq")
    from safetensors.torch import load_file

    lost = sorted(set(gptq) - {n for n in gptq if n.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
                  - set(load_file(str(converted / "model.safetensors"))))
    assert not lost, f"llmfn convert gptq-to-awq dropped {lost[:2]}"
    check(llmfn.load(converted))
