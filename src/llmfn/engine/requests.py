"""What goes into the engine and what comes out: requests, per-step events, results, and the
engine's record of a request in flight (`Sequence`). Requests are checked once, at submit
(`check_request`); the loop thread then trusts them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from llmfn import constraints
from llmfn.constraints import Constraint, Matcher
from llmfn.errors import LlmfnError, RequestError
from llmfn.generate import check_prompt
from llmfn.sampling import SamplingParams, check_logit_bias
from llmfn.sampling import check as check_sampling
from llmfn.stopping import StopStrings
from llmfn.tokenizer import Tokenizer

MAX_LOGPROBS = 20  # OpenAI's limit on top logprobs per token


class QueueFullError(LlmfnError):
    """The engine's queue is full; retry after `retry_after` seconds (HTTP 429 with Retry-After)."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()  # seed None -> fresh_seed(), reported in events
    stop: tuple[str, ...] = ()  # stop strings (never emitted)
    stop_token_ids: tuple[int, ...] | None = None  # None -> the model's EOS ids
    logprobs: int | None = None  # top-N logprobs per token (0: only the sampled token's)
    # {token id: bias in [-100, 100]} added to the logits (OpenAI's logit_bias)
    logit_bias: Mapping[int, float] | None = None
    # What the output must match: a llmfn.constraints.Constraint, or anything as_constraint takes (a
    # JSON schema dict, a pydantic model class, {"type": "json_object"}, ...). Compiled at submit.
    constraint: Constraint | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """The sampled token's log-probability under the model (raw logits, before penalties, logit_bias,
    a constraint's mask and temperature) and the `top` most likely tokens as (token id, logprob),
    most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class GenerationEvent:  # one per engine step for a request, streamed in order
    text: str  # new complete-UTF-8 text (may be "")
    token_ids: list[int]
    # None while running; "stop" (EOS, stop string, or a complete constraint) | "length" | "cancelled" | "error"
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    seed: int
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids, when requested
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


@dataclass
class GenerationResult:
    """A finished request from `generate_many`: all its text and tokens."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    seed: int
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None
    cached_tokens: int = 0


class Collector:
    """Gathers the events of sequences into GenerationResults, for the blocking `generate_many`."""

    def __init__(self, seqs: list[Sequence]):
        self._results = [GenerationResult("", [], "", len(s.prompt), 0, s.seed) for s in seqs]
        self._texts: list[list[str]] = [[] for _ in seqs]
        self._pending = len(seqs)
        self._done = threading.Condition()

    def sink(self, i: int) -> Callable[[GenerationEvent], None]:
        """The sink of sequence i (called on the engine's thread)."""

        def sink(event: GenerationEvent) -> None:
            r = self._results[i]
            self._texts[i].append(event.text)
            r.token_ids += event.token_ids
            r.completion_tokens = event.completion_tokens
            r.cached_tokens = event.cached_tokens
            if event.logprobs is not None:
                r.logprobs = (r.logprobs or []) + event.logprobs
            if event.finish_reason is not None:
                r.finish_reason, r.error = event.finish_reason, event.error
                r.text = "".join(self._texts[i])
                with self._done:
                    self._pending -= 1
                    self._done.notify_all()

        return sink

    def wait(self, timeout: float | None = None) -> None:
        """Until a sequence finishes (or the timeout passes)."""
        with self._done:
            self._done.wait(timeout)

    def results(self) -> list[GenerationResult]:
        """Every result, once all have finished."""
        with self._done:
            while self._pending:
                self._done.wait()
        return self._results


class Sequence:
    """A request inside the engine. The loop thread owns every field except `cancelled`."""
    def __init__(self, request: GenerationRequest, seed: int, stops: frozenset[int], detok,
                 bias: tuple[torch.Tensor, torch.Tensor] | None = None, guide: Matcher | None = None):
        self.request = request
        self.bias = bias  # (token ids [K], biases [K]) on the model's device
        self.guide = guide  # the constraint's matcher, advanced by the loop thread
        self.prompt = list(request.prompt_ids)
        self.seed = seed
        self.stops = stops
        self.detok = detok
        self.stop_strings = StopStrings(request.stop)
        self.sink: Callable[[GenerationEvent], None] = lambda event: None
        self.slot: int | None = None  # its place (row) in the decode batch while running
        self.blocks: list[int] = []  # its KV blocks, in position order
        self.prefilled = 0  # prompt tokens whose KV is in its blocks
        self.computed = 0  # positions whose KV is in its blocks (prompt and generated)
        self.tokens: list[int] = []  # generated so far
        self.cached_tokens: int | None = None  # prompt tokens taken from the prefix cache (first admission)
        self.arrival = 0  # queue order: the youngest running sequence is preempted first
        self.cancelled = False
        self.done = False

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt)

    def take(self, token: int, logprob: TokenLogprob | None) -> GenerationEvent:
        """Record a sampled token: advance the constraint, detokenize, check the stop conditions (EOS,
        stop strings, a complete constraint, max_tokens). Returns the event to send; its finish_reason
        is set when the sequence is done. LlmfnError when the constraint rejects the token."""
        if self.guide is not None and token not in self.stops:
            self.guide.advance(token)
        self.tokens.append(token)
        req, reason = self.request, None
        if token in self.stops:
            text, reason = "", "stop"
        else:
            text = self.stop_strings.push(self.detok.add(token))
            if self.stop_strings.stopped or self.guide is not None and self.guide.finished:
                reason = "stop"
        if reason is None and len(self.tokens) >= req.max_tokens:
            reason = "length"
        if reason is not None:
            text += self.stop_strings.push(self.detok.flush()) + self.stop_strings.flush()
        lps = None
        if logprob is not None and req.logprobs is not None:
            lps = [TokenLogprob(logprob.token_id, logprob.logprob, logprob.top[: req.logprobs])]
        return GenerationEvent(text, [token], reason, len(self.prompt), len(self.tokens), self.seed, None, lps,
                               self.cached_tokens or 0)  # fmt: skip

    def token_at(self, position: int) -> int:
        n = len(self.prompt)
        return self.prompt[position] if position < n else self.tokens[position - n]



def check_request(request: GenerationRequest, vocab: int, context: int, max_model_len: int) -> None:
    """RequestError (with .param) unless the request fits a model of `vocab` tokens and `context`
    positions and an engine serving at most `max_model_len` positions a sequence."""
    if not isinstance(request, GenerationRequest):
        raise RequestError(f"expected a GenerationRequest, got {type(request).__name__}", param="prompt")
    n = len(request.prompt_ids)
    if not isinstance(request.max_tokens, int):
        raise RequestError(f"max_tokens must be an integer, got {request.max_tokens!r}", param="max_tokens")
    check_prompt(n, request.max_tokens, context)
    if any(not isinstance(t, int) or not 0 <= t < vocab for t in request.prompt_ids):
        raise RequestError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
    if n + request.max_tokens > max_model_len:
        raise RequestError(
            f"the prompt has {n} tokens and max_tokens asks for {request.max_tokens} more "
            f"({n + request.max_tokens} in all), over this engine's max_model_len of {max_model_len} tokens",
            param="max_tokens",
        )
    check_sampling(request.sampling)
    if not all(isinstance(s, str) for s in request.stop):
        raise RequestError("stop must be a tuple of strings", param="stop")
    if request.stop_token_ids is not None and not all(isinstance(t, int) for t in request.stop_token_ids):
        raise RequestError("stop_token_ids must be integers", param="stop_token_ids")
    if request.logprobs is not None and not 0 <= request.logprobs <= min(MAX_LOGPROBS, vocab):
        raise RequestError(f"logprobs must be in [0, {min(MAX_LOGPROBS, vocab)}]", param="logprobs")
    check_logit_bias(request.logit_bias, vocab)


def prepare_sequence(request: GenerationRequest, seed: int, stops: frozenset[int], tokenizer: Tokenizer,
                     vocab: int, device: torch.device) -> Sequence:
    """A checked request as the loop's Sequence: its logit bias as tensors and its constraint compiled
    (here, on the caller's thread, never in the loop; RequestError naming the constraint's param)."""
    bias = check_logit_bias(request.logit_bias, vocab)
    if bias is not None:
        bias = (torch.tensor(list(bias), dtype=torch.int64, device=device),
                torch.tensor(list(bias.values()), dtype=torch.float32, device=device))  # fmt: skip
    constraint = constraints.as_constraint(request.constraint, param="constraint")
    guide = None if constraint is None else constraints.compile(constraint, tokenizer).matcher(stops)
    return Sequence(request, seed, stops, tokenizer.stream(), bias, guide)
