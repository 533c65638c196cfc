"""GGUF files (llama.cpp), read with the `gguf` package: one reader of the tensors under Hugging Face
names (`gguf_tensors`: Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K / Q5_0 blocks kept as quantized leaves or dequantized, as the
caller asks) and one cache folder per converted model (`converted_folder`).

    load("model.gguf")                      load_gguf: the Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K / Q5_0 blocks straight into
                                            Int4Weight / Int8Weight leaves (quantize="auto" = "int4"),
                                            config and tokenizer from converted_folder
    load("model.gguf", quantize=None)       converted_folder: config, tokenizer and fp32 weights
                                            written once, then read like any Hugging Face folder
    llmfn convert gguf IN OUT               convert_gguf: the same folder written where asked
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from llmfn.errors import CheckpointError, UnsupportedModelError
from llmfn.kernels.quant import Int4Weight, Int8Weight, QuantizedWeight, compact_scales
from llmfn.loading.causal_lm import causal_lm_model
from llmfn.loading.config import llama_config_from_hf
from llmfn.loading.llama import params_from_hf
from llmfn.loading.params import finish_params
from llmfn.loading.quantize import Pending, quantize_tensor, unwrap
from llmfn.loading.registry import converted_path, publish_folder, published_stamp
from llmfn.model import Model
from llmfn.models.llama import RopeScaling, base_inv_freq, scaled_inv_freq
from llmfn.tokenization.gguf import tokenizer_files_from_gguf

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
SUPPORTED_ARCHS = ("llama", "qwen2")
CONFIG_VERSION = 2  # in the cache folders' stamp: 2 reads rope scaling (a config.json of 1 lacks it)
ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling, as per-frequency divisors (read into the config)
log = logging.getLogger("llmfn.loading")


def open_gguf(path: str | Path):
    """A gguf.GGUFReader over path, with llmfn errors for missing or corrupt files."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None


def metadata(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader, source: Path | str = "model.gguf") -> dict:
    """An HF config.json dict for a llama or qwen2 GGUF."""
    arch = metadata(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(f"{source}: GGUF architecture {arch!r} is not supported ({', '.join(SUPPORTED_ARCHS)} are)")
    names = {t.name for t in reader.tensors}

    def m(key, default=None):
        return metadata(reader, f"{arch}.{key}", default)

    heads = int(m("attention.head_count"))
    hidden = int(m("embedding_length"))
    head_dim = int(m("attention.key_length") or m("rope.dimension_count") or hidden // heads)
    theta = float(m("rope.freq_base", 10000.0))
    vocab = m("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    config = {
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(m("feed_forward_length")),
        "num_hidden_layers": int(m("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(m("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(m("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "max_position_embeddings": int(m("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "bos_token_id": metadata(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata(reader, "tokenizer.ggml.eos_token_id"),
    }
    scaling = rope_scaling_from_gguf(reader, arch, head_dim, theta, source)
    return config if scaling is None else {**config, "rope_scaling": scaling}


def rope_scaling_from_gguf(reader, arch: str, head_dim: int, theta: float, source) -> dict | None:
    """The HF rope_scaling of a GGUF, or None: llama.cpp keeps linear scaling in the metadata, and
    llama3 scaling (Llama 3.1+) as the rope_freqs tensor, each frequency's divisor, which
    convert_hf_to_gguf.py computes from factor, low / high_freq_factor and the original context."""
    kind = metadata(reader, f"{arch}.rope.scaling.type", "none")
    factor = float(metadata(reader, f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    if kind == "linear" and factor != 1.0:
        return {"rope_type": "linear", "factor": factor}
    if kind not in ("none", "linear"):
        raise UnsupportedModelError(f"{source}: GGUF rope scaling {kind!r} is not supported (linear and llama3 are)")
    tensor = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if tensor is None:
        return None
    original = int(metadata(reader, f"{arch}.rope.scaling.original_context_length", 0) or 8192)
    return llama3_scaling(np.asarray(tensor.data, dtype=np.float64).ravel(), theta, head_dim, original, source)


def llama3_scaling(divisors: np.ndarray, theta: float, head_dim: int, original: int, source) -> dict | None:
    """The llama3 rope_scaling whose inverse frequencies are HF's base ones over `divisors`: factor is
    the largest divisor; low / high_freq_factor are Llama 3's 1 / 4 when those give the divisors, else
    fitted to the smoothed band (divisors strictly between 1 and factor), where
    1 / divisor = (1 - s) / factor + s and s = (original / wavelength - low) / (high - low) is linear
    in 1 / wavelength. A fit that does not give the divisors back (1e-5) is an error, never a guess."""
    inv_freq = base_inv_freq(theta, head_dim)
    if divisors.shape != tuple(inv_freq.shape) or not np.all(np.isfinite(divisors)) or divisors.min() <= 0:
        raise CheckpointError(f"{source}: {ROPE_FREQS} holds {divisors.size} values, not {inv_freq.numel()} positive ones")
    factor = float(divisors.max())
    if factor == 1.0:
        return None
    candidates = [(1.0, 4.0)]
    band = (divisors != 1.0) & (divisors != factor)
    if band.sum() >= 2:
        s = (1 / divisors[band] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(inv_freq.double().numpy()[band] / (2 * np.pi), s, 1)  # s = a / wavelength + b
        if a > 0:
            low, high = float(-b * original / a), float(-b * original / a + original / a)
            candidates += [(round(low, 3), round(high, 3)), (low, high)]  # the file's own values, if round
    want = inv_freq.double() / torch.from_numpy(divisors)
    for low, high in candidates:
        scaling = RopeScaling("llama3", factor, low, high, original)
        if torch.allclose(scaled_inv_freq(inv_freq, scaling).double(), want, rtol=1e-5, atol=0.0):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": original}
    raise UnsupportedModelError(f"{source}: its {ROPE_FREQS} do not follow llama3 rope scaling (the only kind supported)")


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rope -> half-split rope)."""
    dim = w.shape[0] // heads // 2
    return w.reshape(heads, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight")."""
    if gguf_name.startswith("blk."):
        _, layer, rest = gguf_name.split(".", 2)
        if rest in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"
    elif gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    raise UnsupportedModelError(f"unexpected GGUF tensor {gguf_name!r}")


def permuted_heads(config: dict, gguf_name: str) -> int | None:
    """The head count whose rows llama.cpp permuted in this tensor (q and k of llama GGUFs), or None."""
    if config["model_type"] != "llama" or not gguf_name.startswith("blk."):
        return None
    kind = gguf_name.split(".")[2]
    return {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}.get(kind)


# ---------------------------------------------------------------------------------------------
# The tensors: one reader, blocks kept quantized or dequantized

GGUF_KEPT = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K", "Q5_0")
_BLOCK = 32


def gguf_leaf(tensor) -> QuantizedWeight:
    """A GGUF Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K / Q5_0 tensor (rows = output features) as an Int4Weight /
    Int8Weight holding exactly the values the gguf package dequantizes it to."""
    kind = tensor.tensor_type.name
    k, n = int(tensor.shape[0]), int(np.prod(tensor.shape[1:]))
    raw = np.ascontiguousarray(tensor.data).view(np.uint8)
    if kind == "Q4_K":
        return _q4_k_leaf(raw.reshape(n * (k // 256), -1), n, k)
    if kind == "Q6_K":
        return _q6_k_leaf(raw.reshape(n * (k // 256), -1), n, k)
    if kind == "Q5_0":
        return _q5_0_leaf(raw.reshape(n * (k // _BLOCK), -1), n, k)
    blocks = raw.reshape(n, k // _BLOCK, -1)  # [n, G, bytes per block]
    d = torch.from_numpy(_half(blocks[..., 0:2])[..., 0])  # [n, G]
    if kind == "Q8_0":
        q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(n, k)
        return Int8Weight.from_q(q, d, _BLOCK)
    if kind == "Q4_0":
        packed, offsets = blocks[..., 2:], -8 * d
    elif kind == "Q4_1":
        packed = blocks[..., 4:]
        offsets = torch.from_numpy(_half(blocks[..., 2:4])[..., 0])
    else:
        raise UnsupportedModelError(f"GGUF type {kind} is not kept quantized ({', '.join(GGUF_KEPT)} are)")
    # GGUF byte i of a block holds q[i] (low nibble) and q[i + 16] (high); ours holds q[2i] and q[2i + 1].
    even, odd = packed[..., 0::2], packed[..., 1::2]  # [n, G, 8]
    ours = np.concatenate([(even & 0xF) | (odd << 4), (even >> 4) | (odd & 0xF0)], axis=-1)  # [n, G, 16]
    qweight = torch.from_numpy(ours.reshape(n, k // 2))
    return Int4Weight(qweight, *compact_scales(d, offsets), _BLOCK)  # fp16, as the file holds them


def _half(column: np.ndarray) -> np.ndarray:
    return column.copy().view(np.float16).astype(np.float32)  # [..., 2] bytes -> [..., 1] fp32


def _q4_k_leaf(blocks: np.ndarray, n: int, k: int) -> Int4Weight:
    """Q4_K super-blocks of 256 (d, dmin, 6-bit scales and mins of 8 sub-blocks, 4-bit q) are int4
    groups of 32: w = q * (d * scale) - dmin * min, where both products are exact in fp32."""
    from gguf.quants import Q4_K

    d, dmin = _half(blocks[:, 0:2]), _half(blocks[:, 2:4])
    scales, mins = Q4_K.get_scale_min(blocks[:, 4:16])  # [B, 8] each
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)  # sub-blocks 2c, 2c+1
    q = torch.from_numpy((qs & 0xF).reshape(n, k))
    return Int4Weight.from_q(q, torch.from_numpy((d * scales).reshape(n, k // 32)),
                             torch.from_numpy((-(dmin * mins)).reshape(n, k // 32)), 32)


def _q5_0_leaf(blocks: np.ndarray, n: int, k: int) -> Int8Weight:
    """Q5_0 blocks of 32 (d, the fifth bits, 4-bit low parts; w = d * (q - 16)) are int8 groups of 32 (k-quant
    files hold them where a row is not whole 256-blocks)."""
    high = blocks[:, 2:6].copy().view(np.uint32) >> np.arange(32, dtype=np.uint32)  # [B, 32]: bit i is q[i]'s
    low = blocks[:, 6:].reshape(-1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)  # q[0..15], q[16..31]
    q = ((low & 0xF).reshape(-1, 32) | ((high & 1).astype(np.uint8) << 4)).astype(np.int8) - np.int8(16)
    return Int8Weight.from_q(torch.from_numpy(q.reshape(n, k)), torch.from_numpy(_half(blocks[:, 0:2]).reshape(n, k // 32)), 32)


def _q6_k_leaf(blocks: np.ndarray, n: int, k: int) -> Int8Weight:
    """Q6_K super-blocks of 256 (4 + 2 bit q - 32, an int8 scale per 16, d) are int8 groups of 16:
    w = q * (d * scale), the product exact in fp32."""
    low = blocks[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    high = blocks[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    q = ((low & 0xF).reshape(-1, 256) | ((high & 0x3).reshape(-1, 256) << 4)).astype(np.int8) - np.int8(32)
    scales = _half(blocks[:, 208:210]) * blocks[:, 192:208].view(np.int8).astype(np.float32)  # [B, 16]
    return Int8Weight.from_q(torch.from_numpy(q.reshape(n, k)), torch.from_numpy(scales.reshape(n, k // 16)), 16)


def _rows(leaf: QuantizedWeight, index: torch.Tensor) -> QuantizedWeight:
    if isinstance(leaf, Int4Weight):
        return replace(leaf, qweight=leaf.qweight[index], scales=leaf.scales[index], offsets=leaf.offsets[index])
    return replace(leaf, qweight=leaf.qweight[index], scales=leaf.scales[index])


def gguf_tensors(reader, config: dict, keep: tuple[str, ...] = GGUF_KEPT, transform=None, progress=None) -> dict:
    """All tensors of a GGUF under HF names: types in `keep` as Pending quantized leaves (the name map
    fuses them), the rest dequantized to fp32 with the gguf package and passed through
    transform(name, tensor) when given (one tensor at a time, to bound memory); q / k rows
    un-permuted either way. progress(done, total, gguf name), if given, follows each tensor."""
    from gguf.quants import dequantize

    out = {}
    tensors = [t for t in reader.tensors if t.name != ROPE_FREQS]  # rope_freqs: in the config (config_from_gguf)
    for done, t in enumerate(tensors, 1):
        name, heads = hf_name(t.name), permuted_heads(config, t.name)
        if t.tensor_type.name in keep and len(t.shape) == 2:
            leaf = gguf_leaf(t)
            if heads is not None:
                leaf = _rows(leaf, torch.from_numpy(_unpermute(np.arange(leaf.shape[0]), heads).copy()))
            out[name] = Pending(leaf)
        else:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            if heads is not None:
                w = _unpermute(w, heads)
            w = torch.from_numpy(np.array(w))
            out[name] = transform(name, w) if transform is not None else w
        if progress is not None:
            progress(done, len(tensors), t.name)
    return out


# ---------------------------------------------------------------------------------------------
# The folder: config, tokenizer and (dense route) weights


def write_folder(gguf_path: Path, out: Path, dtype: torch.dtype = torch.float32, *, weights: bool = True,
                 progress=None) -> Path:
    """Write a Hugging Face-style folder for gguf_path into out and return out: config.json,
    generation_config.json, tokenizer files and, with weights, model.safetensors dequantized to dtype.
    progress(done, total, name), if given, reports each tensor as it is dequantized."""
    reader = open_gguf(gguf_path)
    config = config_from_gguf(reader, gguf_path)
    tokenizer_files = tokenizer_files_from_gguf(reader)
    tensors = gguf_tensors(reader, config, (), lambda _, w: w.to(dtype), progress) if weights else None
    out.mkdir(parents=True, exist_ok=True)
    if weights:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    for name, text in tokenizer_files.items():
        (out / name).write_text(text, encoding="utf-8")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tensors is not None:
        partial = out / "model.safetensors.partial"
        save_file(tensors, str(partial), metadata={"format": "pt", "source": Path(gguf_path).name})
        partial.replace(out / "model.safetensors")
    # config.json last: its presence marks a complete folder.
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32, progress=None) -> Path:
    """`llmfn convert gguf IN OUT`: the folder of write_folder, weights included, where asked."""
    return write_folder(Path(gguf_path), Path(out_dir), dtype, progress=progress)


def converted_folder(gguf_file: Path, name: str, *, weights: bool = True) -> Path:
    """The one cache folder of a GGUF (registry.converted_path(name)): its config, tokenizer and
    generation files, plus model.safetensors dequantized to fp32 once a dense load asks for weights
    (a quantized load, the default, reads the GGUF's blocks instead, so it writes none; a later
    dense load rebuilds the folder with them). Built once per source file (size and mtime); see registry.publish_folder."""
    if not gguf_file.is_file():
        raise CheckpointError(f"{gguf_file}: file not found")
    out = converted_path(name)
    stamp = f"{gguf_file.stat().st_size}-{int(gguf_file.stat().st_mtime)} config {CONFIG_VERSION}"
    if not weights and published_stamp(out) == stamp:  # a folder with weights serves a quantized load too
        return out
    if not weights:
        stamp += " (config and tokenizer only)"
    if published_stamp(out) == stamp:
        return out
    return publish_folder(out, stamp, lambda tmp: _write_logged(gguf_file, tmp, out, weights))


def _write_logged(gguf_file: Path, tmp: Path, out: Path, weights: bool) -> None:
    """write_folder with its first use in the log: what is converted where, progress, duration."""
    what = "dequantizing every tensor to float32" if weights else "its config and tokenizer"
    log.info("first use of %s: converting %s into %s", gguf_file.name, what, out)
    t0 = time.perf_counter()
    write_folder(gguf_file, tmp, weights=weights, progress=LogProgress(f"converting {gguf_file.name}") if weights else None)
    log.info("converted %s in %.1fs", gguf_file.name, time.perf_counter() - t0)


class LogProgress:
    """A progress(done, total, item) callback that logs each quarter of the way, for the server log
    (the CLI draws bars instead)."""

    def __init__(self, desc: str, steps: int = 4):
        self.desc, self.steps, self.logged = desc, steps, 0

    def __call__(self, done: int, total: int | None = None, item: str | None = None, **_) -> None:
        if not total:
            return
        reached = done * self.steps // total
        if reached > self.logged and done < total:
            self.logged = reached
            log.info("%s: %d%% (%d/%d tensors)", self.desc, 100 * done // total, done, total)


def load_gguf(gguf_file: Path, name: str, dtype: torch.dtype, device: str, quantize: str) -> Model:
    """load(gguf, quantize=...) for a llama / qwen2 GGUF: "int4" keeps Q4_0 / Q4_1 tensors as
    Int4Weight and Q8_0 as Int8Weight (exactly the gguf package's dequantized values) and dequantizes
    other types; "int8" keeps Q8_0 only and rounds the other linears to int8 (per channel) as they load."""
    reader = open_gguf(gguf_file)
    config = config_from_gguf(reader, gguf_file)
    folder = converted_folder(gguf_file, name, weights=False)
    cfg = llama_config_from_hf(config, gguf_file)
    if quantize == "int8":
        tensors = gguf_tensors(reader, config, ("Q8_0",), lambda n, t: quantize_tensor(n, t, "int8"))
    else:
        tensors = gguf_tensors(reader, config, GGUF_KEPT)
    params = unwrap(params_from_hf(tensors, cfg, source=gguf_file))
    return causal_lm_model(folder, config, cfg, finish_params(params, dtype, device))
