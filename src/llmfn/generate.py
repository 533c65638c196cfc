"""Library entry points over a loaded Model: scoring, token generation and chat."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from llmfn import constraints
from llmfn.backend import forward_for
from llmfn.chat_template import apply_chat_template
from llmfn.errors import RequestError
from llmfn.model import Model
from llmfn.models import family
from llmfn.sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_penalties,
    apply_token_bitmask,
    check_logit_bias,
    fresh_seed,
    sample,
)
from llmfn.stopping import StopStrings


def _device(model: Model) -> torch.device:
    return model.params["norm"].device


def _dtype(model: Model) -> torch.dtype:
    return model.params["norm"].dtype


def logits(model: Model, tokens: torch.Tensor) -> torch.Tensor:
    """A full forward without a prior cache. tokens: [B, T] -> fp32 logits [B, T, V]."""
    _require_causal(model)
    b, t = tokens.shape
    cache = family(model.cfg).init_cache(model.cfg, b, t, _dtype(model), _device(model))
    positions = torch.arange(t, device=_device(model)).expand(b, t)
    with torch.inference_mode():
        out, _ = forward_for(model)(model.params, model.cfg, tokens.to(_device(model)), positions, cache)
    return out


def _require_causal(model: Model) -> None:
    if model.kind != "causal-lm":
        raise RequestError(f"model is a {model.kind} model, not a causal language model", param="model")


def check_prompt(n_prompt: int, max_tokens: int, context: int) -> None:
    """Raise RequestError when the prompt is empty or prompt + max_tokens exceeds the context."""
    if n_prompt == 0:
        raise RequestError("the prompt is empty", param="prompt")
    if max_tokens < 1:
        raise RequestError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    if n_prompt + max_tokens > context:
        raise RequestError(
            f"this model's maximum context length is {context} tokens; the prompt has {n_prompt} tokens "
            f"and max_tokens asks for {max_tokens} more",
            param="max_tokens",
        )


def generate(
    model: Model,
    prompt_ids: list[int],
    *,
    max_tokens: int,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    stop_token_ids: list[int] | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    logit_bias: dict[int, float] | None = None,
    response_format=None,
) -> Iterator[int]:
    """Yield generated token ids; stops after an EOS id (yielded) or max_tokens.

    The token at position p is sampled with key (seed, p), so a seeded run is reproducible. A sampling
    keyword left None takes the model's default (model.generation: generation_config.json, or the
    settings recorded beside a built-in alias), then llmfn.sampling's (KNOBS).
    logit_bias: {token id: bias in [-100, 100]} added to the logits (OpenAI's meaning).
    response_format: the output's constraint (see llmfn.constraints.as_constraint: a JSON schema dict,
    a pydantic model class, {"type": "json_object"}, OpenAI's {"type": "json_schema", ...}, or a
    Constraint); EOS is then allowed only where the grammar accepts, and generation also ends when the
    grammar is complete. The constraint compiles here, so an invalid one raises RequestError at once."""
    return _generate(*_prepare(model, prompt_ids, max_tokens, stop_token_ids, logit_bias, response_format,
                               temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
                               repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                               frequency_penalty=frequency_penalty))  # fmt: skip


def _prepare(model, prompt_ids, max_tokens, stop_token_ids, logit_bias, response_format, **sampling) -> tuple:
    """Check a generate() call; returns _generate's arguments."""
    _require_causal(model)
    params = model.generation.sampling(**sampling)
    stops = set(stop_token_ids if stop_token_ids is not None else eos_ids(model))
    prompt = list(prompt_ids)
    check_prompt(len(prompt), max_tokens, model.cfg.max_position_embeddings)
    if any(not 0 <= t < model.cfg.vocab_size for t in prompt):
        raise RequestError(f"prompt token ids must be in [0, {model.cfg.vocab_size})", param="prompt")
    bias = check_logit_bias(logit_bias, model.cfg.vocab_size)
    constraint = constraints.as_constraint(response_format)
    guide = None if constraint is None else constraints.compile(constraint, model.tokenizer).matcher(stops)
    return model, prompt, max_tokens, params, stops, bias, guide


def cache_length(needed: int, context: int) -> int:
    """KV cache length for `needed` positions: the next power of two (at least 64), capped at the
    context. Few distinct shapes means a compiled decode step is reused across requests."""
    return min(max(64, 1 << (needed - 1).bit_length()), max(context, needed))


def eos_ids(model: Model) -> tuple[int, ...]:
    return tuple(dict.fromkeys(model.generation.eos_ids + model.tokenizer.eos_ids))


def _generate(model: Model, prompt: list[int], max_tokens: int, sp: SamplingParams, stops: set[int],
              bias: dict[int, float] | None = None, guide: constraints.Matcher | None = None) -> Iterator[int]:
    cfg, params, device = model.cfg, model.params, _device(model)
    n = len(prompt)
    row = lambda v, dt: torch.tensor([v], dtype=dt, device=device)
    knobs = dict(
        temperature=row(sp.temperature, torch.float32), top_k=row(sp.top_k, torch.int64),
        top_p=row(sp.top_p, torch.float32), min_p=row(sp.min_p, torch.float32),
        seed=row(fresh_seed() if sp.seed is None else sp.seed, torch.int64),
    )
    penalties = [row(x, torch.float32) for x in (sp.repetition_penalty, sp.presence_penalty, sp.frequency_penalty)]
    counts = torch.zeros(1, cfg.vocab_size, dtype=torch.int64, device=device)
    seen = torch.zeros(1, cfg.vocab_size, dtype=torch.bool, device=device)
    seen[0, torch.tensor(prompt, device=device)] = True
    if bias is not None:
        bias_at = (torch.zeros(len(bias), dtype=torch.int64, device=device), torch.tensor(list(bias), device=device),
                   torch.tensor(list(bias.values()), dtype=torch.float32, device=device))  # fmt: skip
    bitmask = torch.zeros(1, constraints.bitmask_words(cfg.vocab_size), dtype=torch.int32)
    prefill_forward, step_forward = forward_for(model), forward_for(model, decode=True)
    with torch.inference_mode():
        cache = family(cfg).init_cache(cfg, 1, cache_length(n + max_tokens, cfg.max_position_embeddings), _dtype(model), device)
        tokens = torch.tensor([prompt], device=device)
        positions = torch.arange(n, device=device)[None]
        out, cache = prefill_forward(params, cfg, tokens, positions, cache, logit_index=row(n - 1, torch.int64))
        for step in range(max_tokens):
            next_logits = out[:, -1]
            if sp.penalized:
                next_logits = apply_penalties(next_logits, counts, seen, *penalties)
            if bias is not None:
                next_logits = apply_logit_bias(next_logits, *bias_at)
            if guide is not None:
                next_logits = apply_token_bitmask(next_logits, guide.allowed(bitmask[0])[None])
            if sp.greedy:
                token = next_logits.argmax(-1)
            else:
                token = sample(next_logits, step=row(n + step, torch.int64), **knobs)
            token_id = int(token)
            yield token_id
            if token_id in stops:
                return
            if guide is not None:
                guide.advance(token_id)
                if guide.finished:
                    return
            if step == max_tokens - 1:
                return
            counts[0, token_id] += 1
            seen[0, token_id] = True
            out, cache = step_forward(params, cfg, token[:, None], row(n + step, torch.int64)[:, None], cache)


class ChatStream:
    """Iterate for text deltas (never a split UTF-8 character); afterwards `finish_reason`
    ("stop" or "length"), `prompt_tokens` and `completion_tokens` are set."""

    def __init__(self, model: Model, prompt_ids: list[int], max_tokens: int, stop: list[str], sampling: dict):
        self.model = model
        self.prompt_ids = prompt_ids
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        sampling = dict(sampling)
        extra = {k: sampling.pop(k, None) for k in ("stop_token_ids", "logit_bias", "response_format")}
        args = _prepare(model, prompt_ids, max_tokens, *extra.values(), **sampling)
        self._guide = args[-1]  # a finished grammar ends the reply with "stop"
        self._tokens = _generate(*args)
        self._max_tokens = max_tokens
        self._stop = stop

    def __iter__(self) -> Iterator[str]:
        detok = self.model.tokenizer.stream()
        stops = StopStrings(self._stop)
        eos = set(eos_ids(self.model))
        for token in self._tokens:
            self.completion_tokens += 1
            if token in eos:
                self.finish_reason = "stop"
                break
            text = stops.push(detok.add(token))
            if text:
                yield text
            if stops.stopped:
                self.finish_reason = "stop"
                return
        tail = stops.push(detok.flush()) + stops.flush()
        if tail:
            yield tail
        if self.finish_reason is None:
            grammar_done = self._guide is not None and self._guide.finished
            self.finish_reason = "stop" if stops.stopped or grammar_done else "length"

    def text(self) -> str:
        return "".join(self)


def chat(model: Model, messages: list[dict], *, max_tokens: int, stop: list[str] | str | None = None, **sampling) -> ChatStream:
    """Stream the assistant's reply to messages, rendered with the model's own chat template. `sampling`
    takes generate()'s keywords, response_format and logit_bias included."""
    _require_causal(model)
    if not model.chat_template:
        raise RequestError("this model has no chat template; use generate() with a prompt", param="messages")
    prompt = apply_chat_template(model.tokenizer, model.chat_template, messages)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    return ChatStream(model, prompt, max_tokens, stops, sampling)
