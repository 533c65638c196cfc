"""Library entry points over a loaded Model: scoring, token generation and chat."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from llmfn import constraints, speculative
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
    greedy,
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
    speculative=None,
    stats: dict | None = None,
) -> Iterator[int]:
    """Yield generated token ids; stops after an EOS id (yielded) or max_tokens.

    The token at position p is sampled with key (seed, p), so a seeded run is reproducible. A sampling
    keyword left None takes the model's default (model.generation: generation_config.json, or the
    settings recorded beside a built-in alias), then llmfn.sampling's (KNOBS).
    logit_bias: {token id: bias in [-100, 100]} added to the logits (OpenAI's meaning).
    response_format: the output's constraint (see llmfn.constraints.as_constraint: a JSON schema dict,
    a pydantic model class, {"type": "json_object"}, OpenAI's {"type": "json_schema", ...}, or a
    Constraint); EOS is then allowed only where the grammar accepts, and generation also ends when the
    grammar is complete. The constraint compiles here, so an invalid one raises RequestError at once.
    speculative: None, "ngram" (prompt lookup), or a dict / llmfn.speculative.SpeculativeConfig
    (method "ngram" or "draft" with a draft model, k, ...): drafted tokens are checked in one forward
    and kept only where they are the tokens drawn anyway, so the output is exactly that without it.
    stats: a dict that generation keeps up to date with "forwards" (decode forwards run), "drafted"
    (tokens drafted and verified) and "accepted" (drafted tokens kept)."""
    return _generate(*_prepare(model, prompt_ids, max_tokens, stop_token_ids, logit_bias, response_format, speculative,
                               temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
                               repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                               frequency_penalty=frequency_penalty), stats=stats)  # fmt: skip


def _prepare(model, prompt_ids, max_tokens, stop_token_ids, logit_bias, response_format, spec=None,
             **sampling) -> tuple:
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
    return model, prompt, max_tokens, params, stops, bias, guide, speculative.as_config(spec, model)


def cache_length(needed: int, context: int) -> int:
    """KV cache length for `needed` positions: the next power of two (at least 64), capped at the
    context. Few distinct shapes means a compiled decode step is reused across requests."""
    return min(max(64, 1 << (needed - 1).bit_length()), max(context, needed))


def eos_ids(model: Model) -> tuple[int, ...]:
    return tuple(dict.fromkeys(model.generation.eos_ids + model.tokenizer.eos_ids))


def _generate(model: Model, prompt: list[int], max_tokens: int, sp: SamplingParams, stops: set[int],
              bias: dict[int, float] | None = None, guide: constraints.Matcher | None = None,
              spec: speculative.SpeculativeConfig | None = None, stats: dict | None = None) -> Iterator[int]:
    """The decode loop. Each forward yields one row of logits per token fed: the last token, then
    the drafted ones (none without speculation). Tokens are drawn from the rows in turn, each with the
    penalties, bias and grammar state of the tokens before it, and a row is used only while the token
    fed after the previous row is the one drawn there: the output is that of plain decode steps."""
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

    def pick(logits_row: torch.Tensor, position: int, grammar: bool = True) -> int:
        """The token the sampler draws at `position` (key (seed, position)) from fp32 logits [V]."""
        next_logits = logits_row[None]
        if sp.penalized:
            next_logits = apply_penalties(next_logits, counts, seen, *penalties)
        if bias is not None:
            next_logits = apply_logit_bias(next_logits, *bias_at)
        if grammar and guide is not None:
            next_logits = apply_token_bitmask(next_logits, guide.allowed(bitmask[0])[None])
        if sp.greedy:
            return int(greedy(next_logits))
        return int(sample(next_logits, step=row(position, torch.int64), **knobs))

    length = cache_length(n + max_tokens, cfg.max_position_embeddings)
    rows_cap = speculative.verify_rows(model) if spec is not None else 0
    drafter, draft_length = (None, None) if rows_cap == 0 else speculative.drafter_for(
        spec, model, length, lambda logits_row, position: pick(logits_row, position, grammar=False))
    prefill_forward = forward_for(model)
    step_forward = forward_for(model, decode=True)  # the fused forward whenever rows_cap > 0
    history = list(prompt)  # the prompt and the tokens yielded so far
    stats = {} if stats is None else stats
    stats.update(forwards=0, drafted=0, accepted=0)
    with torch.inference_mode():
        cache = family(cfg).init_cache(cfg, 1, length, _dtype(model), device)
        tokens = torch.tensor([prompt], device=device)
        positions = torch.arange(n, device=device)[None]
        out, cache = prefill_forward(params, cfg, tokens, positions, cache, logit_index=row(n - 1, torch.int64))
        drafts: list[int] = []  # out[0, i + 1] holds the logits after drafts[i]
        step = 0
        while True:
            kept = 0
            for i in range(len(drafts) + 1):
                token_id = pick(out[0, i], n + step)
                yield token_id
                if token_id in stops:
                    return
                if guide is not None:
                    guide.advance(token_id)
                    if guide.finished:
                        return
                if step == max_tokens - 1:
                    return
                if sp.penalized:  # only the penalties read them
                    counts[0, token_id] += 1
                    seen[0, token_id] = True
                history.append(token_id)
                step += 1
                if i == len(drafts) or drafts[i] != token_id:
                    break
                kept += 1
            if drafter is not None:
                draft_length.observe(len(drafts), kept)
                stats["accepted"] += kept
            drafts = []
            feed = [history[-1]]
            start = n + step - 1  # the last token's position
            if drafter is not None:
                k = draft_length.next(min(max_tokens - 1 - step, rows_cap - 1))
                drafts = drafter.propose(history, k) if k else []
                while drafts and not speculative.same_rope(cfg, start, start + len(drafts)):
                    drafts.pop()
                feed += drafts
                stats["drafted"] += len(drafts)
            positions = torch.arange(start, start + len(feed), device=device)[None]
            out, cache = step_forward(params, cfg, torch.tensor([feed], device=device), positions, cache)
            stats["forwards"] += 1


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
        extra = {k: sampling.pop(k, None) for k in ("stop_token_ids", "logit_bias", "response_format", "speculative")}
        args = _prepare(model, prompt_ids, max_tokens, *extra.values(), **sampling)
        self._guide = args[-2]  # a finished grammar ends the reply with "stop"
        self.stats: dict = {}  # decode forwards, drafted and accepted tokens (see generate)
        self._tokens = _generate(*args, stats=self.stats)
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
    takes generate()'s keywords, response_format, logit_bias and speculative included."""
    _require_causal(model)
    if not model.chat_template:
        raise RequestError("this model has no chat template; use generate() with a prompt", param="messages")
    prompt = apply_chat_template(model.tokenizer, model.chat_template, messages)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    return ChatStream(model, prompt, max_tokens, stops, sampling)
