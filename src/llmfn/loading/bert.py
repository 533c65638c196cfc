"""BertModel checkpoints (all-MiniLM-L6-v2, BGE, E5, ...) onto the params layout of models/bert.py.

Tensor names may carry any prefix (`bert.` from BertForMaskedLM, `model.`, none); heads and poolers
beside the encoder are never read, and TF-era LayerNorm names (gamma / beta) are accepted."""

from __future__ import annotations

from pathlib import Path

import torch

from llmfn.errors import CheckpointError, UnsupportedModelError
from llmfn.kernels.linear import pack
from llmfn.loading import checkpoint
from llmfn.loading.checkpoint import read_tensors, take
from llmfn.loading.config import read_json
from llmfn.loading.params import finish_params
from llmfn.models.bert import BertConfig, abstract

# hidden_act values of Hugging Face configs -> llmfn.kernels.linear.ACTIVATIONS names
_ACTS = {
    "gelu": "gelu",  # exact (erf)
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}


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


def read_config(folder: str | Path) -> BertConfig:
    file = Path(folder) / "config.json"
    raw = read_json(file)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: not a JSON object")
    return config_from_hf(raw, file)


def weight_files(folder: Path) -> list[Path]:
    """checkpoint.weight_files, or else every *.safetensors of the folder (exports name them freely)."""
    if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file():
        found = sorted(folder.glob("*.safetensors"))
        if found:
            return found
    return checkpoint.weight_files(folder)


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
    params = params_from_hf(read_tensors(files), cfg, files[0] if len(files) == 1 else folder, folder)
    return finish_params(params, dtype, device, layout=False)


def params_from_hf(tensors: dict[str, torch.Tensor], cfg: BertConfig, source: Path, folder: Path) -> dict:
    """Map BertModel tensor names (after the prefix) onto the llmfn layout, checking every shape."""
    pre = _prefix(tensors, source)
    shapes = abstract(cfg)

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        full = pre + name
        if full not in tensors and name.endswith((".weight", ".bias")) and ".LayerNorm." in name:
            legacy = full.replace(".weight", ".gamma") if name.endswith(".weight") else full.replace(".bias", ".beta")
            full = legacy if legacy in tensors else full  # TF-era names: LayerNorm.gamma / beta
        if full not in tensors:
            raise CheckpointError(f"{folder}: tensor {full!r} is missing")
        return take(tensors, full, shape, source)

    def norm(name: str, s: dict) -> dict:
        return {"w": get(f"{name}.weight", s["w"]), "b": get(f"{name}.bias", s["b"])}

    D = cfg.dim
    params = {
        "tok_embed": get("embeddings.word_embeddings.weight", shapes["tok_embed"]),
        "pos_embed": get("embeddings.position_embeddings.weight", shapes["pos_embed"]),
        "type_embed": get("embeddings.token_type_embeddings.weight", shapes["type_embed"]),
        "embed_norm": norm("embeddings.LayerNorm", shapes["embed_norm"]),
        "layers": [],
    }
    for i, s in enumerate(shapes["layers"]):
        p = f"encoder.layer.{i}."
        att = p + "attention."
        qkv = [get(f"{att}self.{n}.weight", (D, D)) for n in ("query", "key", "value")]
        bqkv = [get(f"{att}self.{n}.bias", (D,)) for n in ("query", "key", "value")]
        params["layers"].append({
            "wqkv": torch.cat(qkv, 0),
            "bqkv": torch.cat(bqkv, 0),
            "wo": get(f"{att}output.dense.weight", s["wo"]),
            "bo": get(f"{att}output.dense.bias", s["bo"]),
            "attn_norm": norm(f"{att}output.LayerNorm", s["attn_norm"]),
            "w_up": get(f"{p}intermediate.dense.weight", s["w_up"]),
            "b_up": get(f"{p}intermediate.dense.bias", s["b_up"]),
            "w_down": get(f"{p}output.dense.weight", s["w_down"]),
            "b_down": get(f"{p}output.dense.bias", s["b_down"]),
            "mlp_norm": norm(f"{p}output.LayerNorm", s["mlp_norm"]),
        })  # fmt: skip
    extra_layer = f"{pre}encoder.layer.{cfg.n_layers}."
    if any(n.startswith(extra_layer) for n in tensors):
        raise CheckpointError(f"{folder}: has more layers than num_hidden_layers={cfg.n_layers}")
    return params


def pack_params(params: dict) -> dict:
    """The params tree with each layer's matmul weights as llmfn.kernels.linear.PackedWeight leaves (fp32 CPU
    weights only; others are kept): batches of many tokens then skip repacking them per call."""
    packed = ("wqkv", "wo", "w_up", "w_down")
    layers = [{name: pack(w) if name in packed else w for name, w in layer.items()} for layer in params["layers"]]
    return {**params, "layers": layers}
