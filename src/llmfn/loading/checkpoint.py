"""Reading safetensors checkpoints (single file or sharded index), mmap'd, never unpickled."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from llmfn.errors import CheckpointError
from llmfn.loading.config import read_json


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, from its index when sharded."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map")
        return [folder / name for name in sorted(set(weight_map.values()))]
    pickles = sorted(p.name for pattern in ("*.bin", "*.pt") for p in folder.glob(pattern))
    if pickles:
        raise CheckpointError(f"{folder}: only pickle weights ({', '.join(pickles)}) found; llmfn never unpickles "
                              "(it can run code), convert them to safetensors")
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def iter_tensors(files: list[Path], device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the given safetensors files, one at a time (mmap'd on CPU)."""
    for file in files:
        if not file.exists():
            raise CheckpointError(f"{file}: file not found")
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors reports truncation and bad headers this way
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None


def read_tensors(files: list[Path], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of the given safetensors files by name (mmap'd on CPU)."""
    return dict(iter_tensors(files, device))


def take(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], source: Path | str) -> torch.Tensor:
    """Pop a tensor by name and check its shape, naming it on failure."""
    if name not in tensors:
        raise CheckpointError(f"{source}: missing tensor {name!r}")
    t = tensors.pop(name)
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, config expects {tuple(shape)}")
    return t


def take_stacked(tensors: dict, names, out: int, inp: int, source: Path | str) -> torch.Tensor:
    """The `<name>.weight` of one linear [out, inp], or of several stacked along the output dim
    (fused q/k/v or gate/up), each checked as [out / len(names), inp]. Quantized checkpoints'
    Pending leaves (llmfn.loading.quantize) stack like tensors."""
    names = (names,) if isinstance(names, str) else tuple(names)
    parts = [take(tensors, n + ".weight", (out // len(names), inp), source) for n in names]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class TensorReader:
    """A checkpoint's tensors by name (with `prefix` dropped), each taken once with its shape checked;
    `check_all_taken` then names whatever the family's name map did not use."""

    def __init__(self, tensors: dict[str, torch.Tensor], source: Path | str, prefix: str = ""):
        self.original = {k.removeprefix(prefix): k for k in tensors}
        self.tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
        self.source = source

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return take(self.tensors, name, shape, self.source)

    def linear(self, names, out: int, inp: int) -> torch.Tensor:
        """One linear's weight [out, inp], or several stacked along the output dim (take_stacked)."""
        return take_stacked(self.tensors, names, out, inp, self.source)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def check_all_taken(self, buffers: tuple[str, ...] = ("rotary_emb",)) -> None:
        """CheckpointError naming tensors left over, but for buffers (names containing one of these)."""
        left = [self.original[k] for k in self.tensors if not any(b in k for b in buffers)]
        if left:
            raise CheckpointError(f"{self.source}: unexpected tensors {left[:5]}")
