"""Sampling as pure functions of logits, per-row parameters and an explicit (seed, step) key.

Noise is a counter-based hash of (seed, step, token id): the same seed gives the same tokens on
every run, no global RNG is touched, and a row's draw never depends on the other rows in a batch.
Sampling uses the exponential-race trick, argmax(probs / Exp(1) noise), over the tokens top_k /
top_p / min_p allow; on CPU the race runs in C (csrc/sample.c), which takes the log of the few tokens
that can still win instead of the whole vocabulary's.

Every sampling parameter is defined once, in KNOBS (type, default, range, meaning): the wire schemas
(serve/schemas.py), the CLI flags and chat /set (cli/), `generate`'s keywords and `check` derive
from it, so a range is stated in one place.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch

from llmfn import cbuild
from llmfn.errors import RequestError

_MASK32 = 0xFFFFFFFF
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class Knob:
    """One sampling parameter: its type, default, bounds (ge / gt below, le above; every knob has a
    lower bound, which also rejects NaN) and a one-line meaning."""

    kind: type  # float or int
    default: float | int | None
    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def ok(self, value) -> bool:
        if self.kind is int and (not isinstance(value, int) or isinstance(value, bool)):
            return False
        if self.kind is float and not isinstance(value, int | float):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le))  # fmt: skip

    def rule(self) -> str:
        """The range in words, for error messages: "in [0, 2]", "> 0", "a 64-bit integer"."""
        if self.kind is int and (self.ge, self.le) == (INT64_MIN, INT64_MAX):
            return "a 64-bit integer"
        if self.le is not None:
            low = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}"
            return f"in {low}, {_num(self.le)}]"
        return f">= {_num(self.ge)}" if self.ge is not None else f"> {_num(self.gt)}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


KNOBS: dict[str, Knob] = {
    "temperature": Knob(float, 0.0, "0 is greedy", ge=0.0, le=2.0),
    "top_p": Knob(float, 1.0, "nucleus sampling: keep the most likely tokens up to this mass", gt=0.0, le=1.0),
    "top_k": Knob(int, 0, "keep the k most likely tokens (0 or -1: no limit)", ge=-1, le=INT64_MAX),
    "min_p": Knob(float, 0.0, "drop tokens below min_p times the top probability", ge=0.0, le=1.0),
    "repetition_penalty": Knob(float, 1.0, "divide the logits of seen tokens (HF / vLLM meaning; 1 is off)", gt=0.0, le=10.0),
    "presence_penalty": Knob(float, 0.0, "OpenAI: subtracted once from every generated token's logit", ge=-2.0, le=2.0),
    "frequency_penalty": Knob(float, 0.0, "OpenAI: subtracted per occurrence in the generated text", ge=-2.0, le=2.0),
    "seed": Knob(int, None, "sampling seed (none: a fresh one per request, reported back)", ge=INT64_MIN, le=INT64_MAX),
}


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (OpenAI / vLLM meanings; ranges and defaults in KNOBS).
    temperature 0 is greedy. Build from untrusted values with `sampling_params`."""

    temperature: float = KNOBS["temperature"].default
    top_p: float = KNOBS["top_p"].default
    top_k: int = KNOBS["top_k"].default
    min_p: float = KNOBS["min_p"].default
    repetition_penalty: float = KNOBS["repetition_penalty"].default
    presence_penalty: float = KNOBS["presence_penalty"].default
    frequency_penalty: float = KNOBS["frequency_penalty"].default
    seed: int | None = KNOBS["seed"].default

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


assert [f.name for f in fields(SamplingParams)] == list(KNOBS), "SamplingParams and KNOBS must list the same fields"


def check(sp: SamplingParams) -> SamplingParams:
    """sp itself when every field is in its KNOBS range, else RequestError naming the field."""
    if not isinstance(sp, SamplingParams):
        raise RequestError("sampling must be a SamplingParams", param="sampling")
    for name, knob in KNOBS.items():
        value = getattr(sp, name)
        if not (value is None and knob.default is None or knob.ok(value)):
            raise RequestError(f"{name} must be {knob.rule()}, got {value!r}", param=name)
    return sp


def sampling_params(**values) -> SamplingParams:
    """SamplingParams from keyword values (None: the default), checked against KNOBS."""
    unknown = set(values) - set(KNOBS)
    if unknown:
        raise RequestError(f"unknown sampling parameter {sorted(unknown)[0]!r}", param=sorted(unknown)[0])
    return check(SamplingParams(**{k: v for k, v in values.items() if v is not None}))


def fresh_seed() -> int:
    """A seed from the OS, for requests that gave none (returned so callers can report it)."""
    return int.from_bytes(os.urandom(4), "little")


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser on int64 tensors holding values in [0, 2^32); stays below 2^63."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def _row_keys(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The noise key of each row [B]: a hash of its seed (both 32-bit halves) and step."""
    seed = seed.to(torch.int64)
    key = _mix32(seed & _MASK32) ^ _mix32((seed >> 32) & _MASK32)
    return _mix32((key + step.to(torch.int64)) & _MASK32)


def _noise(row_key: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) noise for token ids under row keys (broadcast together), as float64."""
    h = _mix32((row_key + _mix32(ids.to(torch.int64)) * 0x9E3779B1) & _MASK32)
    return (h.double() + 0.5) / 4294967296.0


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) noise [B, V], a pure function of seed [B], step [B] and the token id."""
    ids = torch.arange(vocab, device=seed.device)
    return _noise(_row_keys(seed, step)[:, None], ids[None, :])


def apply_penalties(
    logits: torch.Tensor,
    generated_counts: torch.Tensor,
    seen: torch.Tensor,
    repetition_penalty: torch.Tensor,
    presence_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
) -> torch.Tensor:
    """logits [B, V]; generated_counts [B, V] (occurrences in the output so far); seen [B, V] bool
    (in the prompt or the output); penalties [B]. Returns new logits."""
    rep = repetition_penalty[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    counts = generated_counts.to(logits.dtype)
    return logits - presence_penalty[:, None] * (counts > 0) - frequency_penalty[:, None] * counts


LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for a logit_bias value


def check_logit_bias(bias, vocab: int) -> dict[int, float] | None:
    """A logit_bias mapping (token id, or its decimal string as JSON sends it, -> bias in [-100, 100])
    as {int: float}, None when empty; RequestError (param "logit_bias") otherwise."""
    if bias is None:
        return None
    if not isinstance(bias, Mapping):
        raise RequestError("logit_bias must map token ids to biases", param="logit_bias")
    out = {}
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.strip().isdigit() else key
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab:
            raise RequestError(f"logit_bias: token id {key!r} is not an integer in [0, {vocab})", param="logit_bias")
        if (not isinstance(value, int | float) or isinstance(value, bool)
                or not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT):  # fmt: skip
            raise RequestError(f"logit_bias: the bias of token {token} must be a number in [-100, 100], "
                               f"got {value!r}", param="logit_bias")  # fmt: skip
        out[token] = float(value)
    return out or None


def apply_logit_bias(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """logits [B, V] with bias[k] added at (rows[k], ids[k]) (OpenAI's logit_bias; -100 all but bans a
    token, +100 all but forces it). Returns new logits."""
    return logits.index_put((rows, ids), bias.to(logits.dtype), accumulate=True)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [B, V] with the tokens a bitmask forbids at -inf. bitmask: int32 [B, W], bit j of word w
    allows token 32*w + j (llguidance's layout); ids past 32*W are forbidden. Returns new logits."""
    B, V = logits.shape
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    bits = (bitmask.to(logits.device, torch.int32)[:, :, None] >> shifts) & 1  # [B, W, 32]
    allowed = bits.reshape(B, -1)[:, :V].bool()  # [B, min(V, 32W)]
    if allowed.shape[1] < V:
        allowed = torch.nn.functional.pad(allowed, (0, V - allowed.shape[1]), value=False)
    return logits.masked_fill(~allowed, float("-inf"))


def _probabilities(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """softmax(logits / temperature) over each row's top_k tokens (all when top_k is 0; tokens tied
    with the k-th stay), 0 elsewhere: [B, V] fp32."""
    scaled = logits / temperature.clamp_min(1e-6)[:, None]
    V = logits.shape[-1]
    k = torch.where((top_k > 0) & (top_k < V), top_k, 0)
    if bool((k > 0).any()):
        top = scaled.topk(int(k.max()), dim=-1).values  # [B, max k], descending
        kth = top.gather(1, (k - 1).clamp_min(0)[:, None])
        scaled = torch.where((k[:, None] > 0) & (scaled < kth), float("-inf"), scaled)
    return torch.softmax(scaled, dim=-1)


def _nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The smallest set of most likely tokens whose mass reaches top_p, per row, as a bool mask
    [B, V] (every token where top_p >= 1). Only the head of each row is sorted: the k most likely
    tokens, k growing fourfold until every row's nucleus ends inside them (a few hundred at most for the
    peaked distributions of language models, instead of a sort of the whole vocabulary)."""
    B, V = probs.shape
    keep = (top_p >= 1.0)[:, None].expand(B, V).clone()
    open_rows = (top_p < 1.0).nonzero()[:, 0]
    k = min(V, 64)
    while open_rows.numel():
        head, order = probs[open_rows].topk(k, dim=-1)  # descending
        inside = (head.cumsum(-1) - head) < top_p[open_rows, None]  # mass before a token < top_p
        done = ~inside[:, -1] | (k == V)
        rows = open_rows[done]
        keep[rows] = torch.zeros(len(rows), V, dtype=torch.bool, device=probs.device).scatter(1, order[done], inside[done])
        open_rows, k = open_rows[~done], min(V, 4 * k)
    return keep


def allowed_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """The tokens each row may sample, as a bool mask [B, V]: top_k first, then top_p on the
    renormalised rest, then min_p relative to the most likely token. The top token is always kept."""
    return _allowed(_probabilities(logits, temperature, top_k), top_p, min_p)


def _allowed(probs: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    top = probs.max(dim=-1, keepdim=True)
    keep = _nucleus(probs, top_p) & (probs >= min_p[:, None] * top.values) & (probs > 0)
    return keep.scatter(1, top.indices, True)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seed: torch.Tensor,
    step: torch.Tensor,
) -> torch.Tensor:
    """Next token per row [B] from fp32 logits [B, V]. Rows with temperature 0 take the argmax; the
    others race the allowed tokens: argmax of probs / Exp(1) noise, the noise a pure function of
    (seed, step, token id), so a row's draw never depends on the rest of the batch."""
    hot = temperature > 0
    if not bool(hot.any()):
        return greedy(logits)
    every = bool(hot.all())
    picked = None if every else hot.nonzero()[:, 0]

    def rows(t: torch.Tensor) -> torch.Tensor:  # the hot rows (all of them: no copy)
        return t if picked is None else t[picked]

    probs = _probabilities(rows(logits), rows(temperature), rows(top_k))
    lib = _race_library() if probs.device.type == "cpu" else None
    if lib is None:
        drawn = _race_torch(probs, _allowed(probs, rows(top_p), rows(min_p)), _row_keys(rows(seed), rows(step)))
    else:
        drawn = _race_c(lib, probs, rows(top_p), rows(min_p), rows(seed), rows(step))
    V = logits.shape[-1]
    if every and bool((drawn < V).all()):
        return drawn
    # greedy rows, and rows without a winner (NaN logits: nothing compares), take the argmax
    tokens = greedy(logits)
    return tokens.masked_scatter(hot, torch.where(drawn < V, drawn, tokens[hot]))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1) for logits [B, V]: the first index of each row's largest value, or of
    its first NaN. fp32 rows on CPU go to csrc/sample.c, ~10x faster than torch's argmax (4-8 us
    against 66 for one 49,152-token row, a percent of a decode step)."""
    lib = _race_library() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
    if lib is None or logits.dim() != 2 or logits.shape[-1] == 0:
        return logits.argmax(dim=-1)
    x = logits.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.int64)
    lib.llmfn_argmax(x.data_ptr(), out.data_ptr(), *x.shape)
    return out


def _race_torch(probs: torch.Tensor, allowed: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Per row [B]: of the tokens allowed [B, V] marks, the one with the largest probs / -log(noise),
    the lowest id among equal races; V when no race compares (NaN probabilities)."""
    rows, ids = allowed.nonzero(as_tuple=True)
    race = probs[rows, ids].double() / -torch.log(_noise(keys[rows], ids))
    best = torch.zeros(len(probs), dtype=torch.float64, device=probs.device).scatter_reduce(0, rows, race, "amax")
    first = ids.new_full((len(probs),), probs.shape[-1])
    winner = race == best[rows]
    return first.scatter_reduce(0, rows[winner], ids[winner], "amin")


def _race_c(lib, probs: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, seed: torch.Tensor,
            step: torch.Tensor) -> torch.Tensor:
    """_race_torch(probs, _allowed(probs, top_p, min_p), _row_keys(seed, step)) from csrc/sample.c,
    ~10x faster: it sorts only the nucleus' head and skips the log of every token that cannot win.
    Equal probabilities at the nucleus' edge go by lower id (topk's order there is unspecified)."""
    probs = probs.float().contiguous()
    top_p, min_p = top_p.float().contiguous(), min_p.float().contiguous()
    seed, step = seed.to(torch.int64).contiguous(), step.to(torch.int64).contiguous()
    out = torch.empty(len(probs), dtype=torch.int64)
    if lib.llmfn_sample_race(probs.data_ptr(), top_p.data_ptr(), min_p.data_ptr(), seed.data_ptr(), step.data_ptr(),
                             out.data_ptr(), *probs.shape) != 0:  # fmt: skip
        raise MemoryError("sampling: out of memory")
    return out


_race_lib = False  # False until the first _race_library() call


def c_sampler_available() -> bool:
    """Whether CPU rows are sampled by csrc/sample.c here (built on first use; else by the torch race)."""
    return _race_library() is not None


def _race_library():
    """csrc/sample.c compiled (llmfn.cbuild), or None: no C compiler, or LLMFN_CPU_KERNELS=torch."""
    global _race_lib
    if _race_lib is False:
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        _race_lib = cbuild.cpu_kernels("llmfn_sample", "sample.c", {"llmfn_sample_race": [p, p, p, p, p, p, i64, i64],
                                                                    "llmfn_argmax": [p, p, i64, i64]})
    return _race_lib


def params_to_tensors(params: list[SamplingParams], seeds: list[int], device="cpu") -> dict[str, torch.Tensor]:
    """Stack per-request settings into the [B] tensors `sample` takes."""
    return {
        "temperature": torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
        "top_k": torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
        "top_p": torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
        "min_p": torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device),
        "seed": torch.tensor(seeds, dtype=torch.int64, device=device),
    }
