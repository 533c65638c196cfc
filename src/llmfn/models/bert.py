"""BERT-family encoders (post-LayerNorm, absolute + token-type embeddings, GELU FFN) as pure functions.

Covers BertModel checkpoints such as all-MiniLM-L6-v2, BGE and E5, with or without a prefix on the
tensor names (`bert.`, `model.`, ...). One entry point:

    forward(params, cfg, tokens[B, T], attention_mask[B, T] | None, token_type_ids[B, T] | None)
        -> hidden[B, T, D]

Params pytree (every Hugging Face layout is converted to it at load; q, k, v are fused):

    {"tok_embed": [V, D], "pos_embed": [P, D], "type_embed": [TV, D],
     "embed_norm": {"w": [D], "b": [D]},
     "layers": [{"wqkv": [3D, D], "bqkv": [3D],          # rows: q, then k, then v
                 "wo": [D, D], "bo": [D], "attn_norm": {"w": [D], "b": [D]},
                 "w_up": [F, D], "b_up": [F], "w_down": [D, F], "b_down": [D],
                 "mlp_norm": {"w": [D], "b": [D]}}, ...]}

`abstract(cfg)` is the same tree with shapes at the leaves; loading checks every tensor against it.
`pack_params` turns the four matmul weights into llmfn.kernels.linear.PackedWeight leaves for the CPU GEMM.
Weights are read from safetensors only (memory-mapped); pickle checkpoints are refused.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from llmfn.errors import CheckpointError, UnsupportedModelError
from llmfn.kernels.linear import attention_block, feed_forward, pack

# hidden_act values of Hugging Face configs -> llmfn.kernels.linear.ACTIVATIONS names
_ACTS = {
    "gelu": "gelu",  # exact (erf)
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    max_positions: int
    type_vocab_size: int
    norm_eps: float
    act: str = "gelu"  # "gelu" (erf), "gelu_tanh" or "relu"
    pad_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def config_from_hf(raw: dict, source: Path | str = "config.json") -> BertConfig:
    """BertConfig from a Hugging Face config.json dict; refuses what forward() does not implement."""
    if raw.get("model_type", "bert") != "bert":
        raise UnsupportedModelError(f"{source}: model_type {raw.get('model_type')!r} is not 'bert'")
    pos_type = raw.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
        raise UnsupportedModelError(f"{source}: position_embedding_type {pos_type!r} (only 'absolute')")
    if raw.get("is_decoder") or raw.get("add_cross_attention"):
        raise UnsupportedModelError(f"{source}: BERT decoders / cross-attention are not supported")
    act = raw.get("hidden_act", "gelu")
    if act not in _ACTS:
        raise UnsupportedModelError(f"{source}: hidden_act {act!r} (supported: {', '.join(_ACTS)})")
    try:
        cfg = BertConfig(
            vocab_size=int(raw["vocab_size"]),
            dim=int(raw["hidden_size"]),
            n_layers=int(raw["num_hidden_layers"]),
            n_heads=int(raw["num_attention_heads"]),
            ffn_dim=int(raw["intermediate_size"]),
            max_positions=int(raw.get("max_position_embeddings", 512)),
            type_vocab_size=int(raw.get("type_vocab_size", 2)),
            norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
            act=_ACTS[act],
            pad_id=int(raw.get("pad_token_id") or 0),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: missing or invalid field {e}") from None
    if cfg.dim % cfg.n_heads:
        raise CheckpointError(f"{source}: hidden_size {cfg.dim} is not a multiple of num_attention_heads {cfg.n_heads}")
    return cfg


def abstract(cfg: BertConfig) -> dict:
    """The params tree with shapes at the leaves."""
    D, Fd = cfg.dim, cfg.ffn_dim

    def norm():
        return {"w": (D,), "b": (D,)}

    layer = {
        "wqkv": (3 * D, D), "bqkv": (3 * D,), "wo": (D, D), "bo": (D,), "attn_norm": norm(),
        "w_up": (Fd, D), "b_up": (Fd,), "w_down": (D, Fd), "b_down": (D,), "mlp_norm": norm(),
    }  # fmt: skip
    return {
        "tok_embed": (cfg.vocab_size, D),
        "pos_embed": (cfg.max_positions, D),
        "type_embed": (cfg.type_vocab_size, D),
        "embed_norm": norm(),
        "layers": [dict(layer) for _ in range(cfg.n_layers)],
    }


# ---------------------------------------------------------------------------------------------- forward


def _norm(x: torch.Tensor, n: dict, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], n["w"], n["b"], eps)


def _norm_args(n: dict, cfg: BertConfig) -> tuple:
    """A LayerNorm as llmfn.kernels.linear's `norm` argument (fused into the matmul before it)."""
    return n["w"], n["b"], cfg.norm_eps


def forward(
    params: dict,
    cfg: BertConfig,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Last hidden states [B, T, D] of `tokens` [B, T].

    attention_mask [B, T]: 1 for real tokens, 0 for padding (None: no padding). Padded keys are masked
    out, so a row's real positions do not depend on how far it is padded. token_type_ids: None = 0."""
    B, T = tokens.shape
    if T > cfg.max_positions:
        raise ValueError(f"sequence of {T} tokens exceeds max_position_embeddings {cfg.max_positions}")
    if token_type_ids is None:
        extra = params["pos_embed"][:T] + params["type_embed"][0]  # [T, D]
    else:
        extra = params["pos_embed"][:T] + F.embedding(token_type_ids, params["type_embed"])  # [B, T, D]
    x = _norm(F.embedding(tokens, params["tok_embed"]) + extra, params["embed_norm"], cfg.norm_eps)  # [B, T, D]
    mask = None if attention_mask is None else attention_mask.bool()  # [B, T], True = attend
    for layer in params["layers"]:
        x = attention_block(x, layer["wqkv"], layer["bqkv"], layer["wo"], layer["bo"], cfg.n_heads, mask,
                            norm=_norm_args(layer["attn_norm"], cfg))  # fmt: skip
        x = feed_forward(x.view(B * T, cfg.dim), layer["w_up"], layer["b_up"], layer["w_down"], layer["b_down"],
                         act=cfg.act, norm=_norm_args(layer["mlp_norm"], cfg)).view(B, T, cfg.dim)  # fmt: skip
    return x


def pack_params(params: dict) -> dict:
    """The params tree with each layer's matmul weights as llmfn.kernels.linear.PackedWeight leaves (fp32 CPU
    weights only; others are kept): batches of many tokens then skip repacking them per call."""
    packed = ("wqkv", "wo", "w_up", "w_down")
    layers = [{name: pack(w) if name in packed else w for name, w in layer.items()} for layer in params["layers"]]
    return {**params, "layers": layers}


# ---------------------------------------------------------------------------------------------- loading


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder; refuses pickle-only folders."""
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        return [folder / n for n in names]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
    if pickles:
        raise CheckpointError(
            f"{folder}: only pickle weights ({', '.join(sorted(pickles))}); llmfn never unpickles "
            "(it can run code): convert them to model.safetensors first"
        )
    raise CheckpointError(f"{folder}: no model.safetensors")


class _Checkpoint:
    """The tensors of a checkpoint's safetensors files, memory-mapped and read on demand (a masked-LM
    head or a pooler is never read); errors name the file."""

    def __init__(self, files: list[Path]):
        self._stack = ExitStack()
        self.where: dict[str, tuple] = {}  # name -> (safe_open handle, file)
        for file in files:
            if not file.is_file():
                self.close()
                raise CheckpointError(f"{file}: missing weight file")
            try:
                f = self._stack.enter_context(safe_open(str(file), framework="pt"))
                self.where.update((name, (f, file)) for name in f.keys())  # noqa: SIM118
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                self.close()
                raise CheckpointError(f"{file}: cannot read safetensors ({e})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name][0].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        f, file = self.where[name]
        try:
            return f.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from None

    def close(self) -> None:
        self._stack.close()


def _prefix(names, source: Path) -> str:
    """The prefix before `embeddings.word_embeddings.weight` ('' or 'bert.' or 'model.' ...)."""
    anchor = "embeddings.word_embeddings.weight"
    found = sorted({n[: -len(anchor)] for n in names if n.endswith(anchor)})
    if len(found) != 1:
        what = "no" if not found else f"several ({found})"
        raise CheckpointError(f"{source}: {what} BERT embedding tensors ('{anchor}')")
    return found[0]


def load_params(
    folder: str | Path, cfg: BertConfig, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> dict:
    """Read a BertModel checkpoint (any prefix) into the params tree, checking every shape against cfg."""
    folder = Path(folder)
    files = weight_files(folder)
    ckpt = _Checkpoint(files)
    try:
        return _take_params(ckpt, cfg, folder, files, dtype, device)
    finally:
        ckpt.close()


def _take_params(ckpt: _Checkpoint, cfg: BertConfig, folder: Path, files: list[Path], dtype, device) -> dict:
    tensors = ckpt.where
    pre = _prefix(tensors, files[0] if len(files) == 1 else folder)
    shapes = abstract(cfg)

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        full = pre + name
        if full not in tensors and name.endswith((".weight", ".bias")) and ".LayerNorm." in name:
            legacy = full.replace(".weight", ".gamma") if name.endswith(".weight") else full.replace(".bias", ".beta")
            full = legacy if legacy in tensors else full  # TF-era names: LayerNorm.gamma / beta
        if full not in tensors:
            raise CheckpointError(f"{folder}: tensor {full!r} is missing")
        if ckpt.shape(full) != tuple(shape):
            raise CheckpointError(
                f"{tensors[full][1]}: tensor {full!r} has shape {ckpt.shape(full)}, config.json implies {tuple(shape)}"
            )
        return ckpt.get(full).to(device=device, dtype=dtype)

    def norm(name: str, s: dict) -> dict:
        return {"w": take(f"{name}.weight", s["w"]), "b": take(f"{name}.bias", s["b"])}

    D = cfg.dim
    params = {
        "tok_embed": take("embeddings.word_embeddings.weight", shapes["tok_embed"]),
        "pos_embed": take("embeddings.position_embeddings.weight", shapes["pos_embed"]),
        "type_embed": take("embeddings.token_type_embeddings.weight", shapes["type_embed"]),
        "embed_norm": norm("embeddings.LayerNorm", shapes["embed_norm"]),
        "layers": [],
    }
    for i, s in enumerate(shapes["layers"]):
        p = f"encoder.layer.{i}."
        att = p + "attention."
        qkv = [take(f"{att}self.{n}.weight", (D, D)) for n in ("query", "key", "value")]
        bqkv = [take(f"{att}self.{n}.bias", (D,)) for n in ("query", "key", "value")]
        params["layers"].append({
            "wqkv": torch.cat(qkv, 0),
            "bqkv": torch.cat(bqkv, 0),
            "wo": take(f"{att}output.dense.weight", s["wo"]),
            "bo": take(f"{att}output.dense.bias", s["bo"]),
            "attn_norm": norm(f"{att}output.LayerNorm", s["attn_norm"]),
            "w_up": take(f"{p}intermediate.dense.weight", s["w_up"]),
            "b_up": take(f"{p}intermediate.dense.bias", s["b_up"]),
            "w_down": take(f"{p}output.dense.weight", s["w_down"]),
            "b_down": take(f"{p}output.dense.bias", s["b_down"]),
            "mlp_norm": norm(f"{p}output.LayerNorm", s["mlp_norm"]),
        })  # fmt: skip
    extra_layer = f"{pre}encoder.layer.{cfg.n_layers}."
    if any(n.startswith(extra_layer) for n in tensors):
        raise CheckpointError(f"{folder}: has more layers than num_hidden_layers={cfg.n_layers}")
    return params


def read_config(folder: str | Path) -> BertConfig:
    file = Path(folder) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        raw = json.loads(file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: not a JSON object")
    return config_from_hf(raw, file)


__all__ = ["BertConfig", "abstract", "config_from_hf", "forward", "load_params", "pack_params", "read_config", "weight_files"]
