"""The Engine: KV slots, the prefix cache and the step loop (the scheduling, memory and batch
invariance it keeps are described in llmfn/engine/__init__.py)."""

from __future__ import annotations

import asyncio
import atexit
import logging
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable

import torch

from llmfn.backend import forward_for
from llmfn.engine.prefix_cache import PrefixCache
from llmfn.engine.requests import (
    GenerationEvent,
    GenerationRequest,
    GenerationResult,
    QueueFullError,
    Sequence,
    TokenLogprob,
    check_request,
    prepare_sequence,
)
from llmfn.engine.rows import RowSampler
from llmfn.engine.stream import RequestStream
from llmfn.errors import LlmfnError, RequestError
from llmfn.generate import eos_ids
from llmfn.kernels import batch_invariant_attention
from llmfn.model import Model
from llmfn.models import family
from llmfn.sampling import SamplingParams, fresh_seed

log = logging.getLogger("llmfn.engine")

ROW_ALIGN = 8  # decode batch rows are a multiple of this (see the module docstring)
WINDOW = 256  # decode attention covers a multiple of this many slots (see the module docstring)
GREEDY = SamplingParams()


class Engine:
    """Owns a causal LM, its KV slots and the step-loop thread. See the module docstring.

    max_running: sequences decoded together (each holds a KV slot); max_queued: requests that may wait
    for a slot beyond the free ones (more raise QueueFullError); max_cache_tokens: KV positions in all,
    split into equal slots over max_running rounded up to a multiple of 8 (default: one full context
    per slot); prefill_chunk: prompt tokens prefilled per step; prefix_cache: reuse shared prompt
    prefixes. Decode runs eager (generate's torch.compile'd step is not used here yet)."""

    def __init__(
        self,
        model: Model,
        *,
        max_running: int = 8,
        max_queued: int = 64,
        max_cache_tokens: int | None = None,
        prefill_chunk: int = 256,
        prefix_cache: bool = True,
    ):
        if model.kind != "causal-lm":
            raise LlmfnError(f"the engine needs a causal language model, got a {model.kind} model")
        if max_running < 1 or max_queued < 0 or prefill_chunk < 1:
            raise LlmfnError(
                f"need max_running >= 1, max_queued >= 0, prefill_chunk >= 1; got {max_running}, {max_queued}, {prefill_chunk}"
            )
        cfg = model.cfg
        self.model = model
        self.max_running = max_running
        self.max_queued = max_queued
        self.prefill_chunk = prefill_chunk
        self.prefix_cache = prefix_cache
        self.rows = -(-max_running // ROW_ALIGN) * ROW_ALIGN
        context = cfg.max_position_embeddings
        self.slot_len = context if max_cache_tokens is None else min(context, max_cache_tokens // self.rows)
        if self.slot_len < 2:
            raise LlmfnError(
                f"max_cache_tokens={max_cache_tokens} leaves {self.slot_len} positions per slot for {self.rows} "
                f"rows (max_running={max_running} rounded up to a multiple of {ROW_ALIGN}); need at least 2"
            )
        self._device = model.params["norm"].device
        dtype = model.params["norm"].dtype
        arch = family(cfg)  # the model's math: init_cache, forward (run through backend.forward_for)
        self.kv_bytes_per_token = arch.kv_bytes_per_token(cfg, dtype)
        self._forward = forward_for(model)  # eager: generate's torch.compile'd step is not used here yet
        self._eos = frozenset(eos_ids(model))
        R = self.rows
        with torch.inference_mode():
            self._cache = arch.init_cache(cfg, R, self.slot_len, dtype, self._device)
            self._sampler = RowSampler(R, cfg.vocab_size, self._device)
        self._slots: list[Sequence | None] = [None] * R  # rows >= max_running stay None: scratch
        self._prefix = PrefixCache(R, prefill_chunk, prefix_cache)
        self._prefilling: deque[Sequence] = deque()
        self._waiting: deque[Sequence] = deque()  # guarded by _cv
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._step_s = 0.0  # moving average of a step's wall time, for Retry-After
        self._n = {"steps": 0, "tokens_generated": 0, "prompt_tokens": 0, "prefix_cache_hit_tokens": 0,
                   "finished": 0, "cancelled": 0, "errors": 0}  # fmt: skip

    # ----------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the step-loop thread (idempotent; submit and generate_many call it)."""
        with self._cv:
            if self._closed:
                raise LlmfnError("the engine is shut down")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="llmfn-engine", daemon=True)
                self._thread.start()
                # Stop the loop before the interpreter tears down: a daemon thread killed inside
                # torch/OpenMP aborts the process ("terminate called without an active exception").
                ref = weakref.ref(self)
                atexit.register(lambda: (engine := ref()) is not None and engine.shutdown())

    def shutdown(self) -> None:
        """Stop the loop; requests still queued or running finish with "cancelled"."""
        with self._cv:
            self._closed = self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        if thread is None:
            self._cancel_all()

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # ----------------------------------------------------------------------------------- submitting

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; its events arrive through the returned async iterator. Call it on a running
        asyncio loop. Raises RequestError (with .param) for an invalid request and QueueFullError when
        max_queued requests already wait."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise LlmfnError(
                "submit() needs a running asyncio loop; use generate_many() from plain code"
            ) from None
        seq = self._prepare(request)
        queue: asyncio.Queue = asyncio.Queue()
        seq.sink = lambda event: loop.call_soon_threadsafe(queue.put_nowait, event)
        stream = RequestStream(seq, queue, self._wake)
        self._enqueue(seq)
        return stream

    def generate_many(
        self,
        requests: Iterable[GenerationRequest | str | list[int]],
        *,
        max_tokens: int | None = None,
        sampling: SamplingParams = GREEDY,
        stop: tuple[str, ...] = (),
    ) -> list[GenerationResult]:
        """Generate for every request, batched, and block until all finish; results in input order.
        Plain prompts (text, encoded with the model's tokenizer, or token ids) take max_tokens,
        sampling and stop from the keywords. All requests are validated before any is queued; when
        the queue is full the rest wait for room instead of failing."""
        reqs = [self._as_request(r, max_tokens, sampling, stop) for r in requests]
        seqs = [self._prepare(r) for r in reqs]
        results = [GenerationResult("", [], "", len(s.prompt), 0, s.seed) for s in seqs]
        texts: list[list[str]] = [[] for _ in seqs]
        done = threading.Condition()
        pending = [len(seqs)]

        def sink_for(i: int) -> Callable[[GenerationEvent], None]:
            def sink(event: GenerationEvent) -> None:
                r = results[i]
                texts[i].append(event.text)
                r.token_ids += event.token_ids
                r.completion_tokens = event.completion_tokens
                if event.logprobs is not None:
                    r.logprobs = (r.logprobs or []) + event.logprobs
                if event.finish_reason is not None:
                    r.finish_reason, r.error = event.finish_reason, event.error
                    r.text = "".join(texts[i])
                    with done:
                        pending[0] -= 1
                        done.notify_all()

            return sink

        for i, seq in enumerate(seqs):
            seq.sink = sink_for(i)
            while True:
                try:
                    self._enqueue(seq)
                    break
                except QueueFullError:
                    with done:
                        done.wait(0.05)
        with done:
            while pending[0]:
                done.wait()
        return results

    def _as_request(self, item, max_tokens, sampling, stop) -> GenerationRequest:
        if isinstance(item, GenerationRequest):
            return item
        if max_tokens is None:
            raise RequestError("generate_many needs max_tokens for plain prompts", param="max_tokens")
        ids = self.model.tokenizer.encode_prompt(item) if isinstance(item, str) else list(item)
        return GenerationRequest(ids, max_tokens, sampling, tuple(stop))

    def _prepare(self, request: GenerationRequest) -> Sequence:
        """Validate a request (RequestError with .param) and wrap it for the loop."""
        check_request(request, self.model.cfg.vocab_size, self.model.cfg.max_position_embeddings, self.slot_len)
        seed = fresh_seed() if request.sampling.seed is None else request.sampling.seed
        stops = self._eos if request.stop_token_ids is None else frozenset(request.stop_token_ids)
        return prepare_sequence(request, seed, stops, self.model.tokenizer, self.model.cfg.vocab_size, self._device)

    def _enqueue(self, seq: Sequence) -> None:
        self.start()
        with self._cv:
            if self._closed:
                raise LlmfnError("the engine is shut down")
            free = self.max_running - sum(s is not None for s in self._slots[: self.max_running])
            if len(self._waiting) - free >= self.max_queued:  # it would wait behind max_queued others
                raise QueueFullError(
                    f"{len(self._waiting) - free} requests already wait for a slot (max_queued={self.max_queued})",
                    retry_after=self._retry_after(),
                )
            self._waiting.append(seq)
            self._cv.notify_all()

    def _retry_after(self) -> int:
        """Seconds until a running sequence should finish and let the queue move, at the recent pace."""
        left = [s.request.max_tokens - len(s.tokens) for s in list(self._slots) if s is not None]
        return max(1, min(60, math.ceil(min(left, default=1) * max(self._step_s, 0.01))))

    # ----------------------------------------------------------------------------------- stats

    def stats(self) -> dict:
        """A snapshot: running (holding a slot), queued, slots used / free / total, tokens, ..."""
        with self._cv:
            queued = len(self._waiting)
        used = sum(s is not None for s in list(self._slots))
        return {
            "running": used,
            "prefilling": sum(1 for s in list(self._slots) if s is not None and not s.decoding),
            "queued": queued,
            "slots_total": self.max_running,
            "slots_used": used,
            "slots_free": self.max_running - used,
            "slot_len": self.slot_len,
            "rows": self.rows,
            "cache_tokens": self.rows * self.slot_len,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "cache_bytes": sum(t.numel() * t.element_size() for t in self._cache),
            **self._n,
        }

    # ----------------------------------------------------------------------------------- the loop

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stopping and not self._waiting and not any(self._slots):
                        self._cv.wait()
                    if self._stopping:
                        break
                t0 = time.perf_counter()
                try:
                    self._step()
                except Exception as exc:  # a bug outside the per-forward guards: fail what is in flight
                    log.exception("engine step failed")
                    for s in [s for s in self._slots if s is not None]:
                        self._finish(s, "error", _describe(exc))
                self._n["steps"] += 1
                self._step_s = 0.9 * self._step_s + 0.1 * (time.perf_counter() - t0)
            self._cancel_all()

    def _cancel_all(self) -> None:
        for s in [s for s in self._slots if s is not None]:
            self._finish(s, "cancelled")
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        for s in waiting:
            self._finish(s, "cancelled")

    def _step(self) -> None:
        self._reap()
        self._admit()
        self._decode()
        self._prefill()

    def _reap(self) -> None:
        """Free the slots of cancelled sequences and drop cancelled waiting ones."""
        for s in [s for s in self._slots if s is not None and s.cancelled]:
            self._finish(s, "cancelled")
        with self._cv:
            gone = [s for s in self._waiting if s.cancelled]
            if gone:
                self._waiting = deque(s for s in self._waiting if not s.cancelled)
        for s in gone:
            self._finish(s, "cancelled")

    def _admit(self) -> None:
        """Move waiting sequences into free slots, reusing cached prompt prefixes."""
        while True:
            free = [j for j in range(self.max_running) if self._slots[j] is None]
            with self._cv:
                if not free or not self._waiting:
                    return
                s = self._waiting.popleft()
            j, reused = self._place(s.prompt, free)
            s.slot, s.prefilled = j, reused
            self._slots[j] = s
            self._prefilling.append(s)
            self._n["prefix_cache_hit_tokens"] += reused
            self._n["prompt_tokens"] += len(s.prompt)
            self._sampler.assign(j, s)

    def _place(self, prompt: list[int], free: list[int]) -> tuple[int, int]:
        """(slot, prompt tokens whose KV is already there), copying a cached prefix between rows."""
        target, source, m = self._prefix.place(prompt, free, self.max_running)
        if source is not None:
            for t in self._cache:  # [L, rows, Hk, S, hd]: copy positions [0, m) of the source row
                t[:, target, :, :m].copy_(t[:, source, :, :m])
        return target, m

    def _window(self) -> int:
        """Decode attends over the first W slots of every row: W covers every active position and the
        prefilled part of every prefilling row, rounded up to a multiple of WINDOW (or slot_len)."""
        need = max(len(s.prompt) + len(s.tokens) if s.decoding else s.prefilled + 1
                   for s in self._slots if s is not None)  # fmt: skip
        return min(self.slot_len, -(-need // WINDOW) * WINDOW)

    def _decode(self) -> None:
        """One token for every decoding sequence, in one forward over all rows."""
        active = [s for s in self._slots if s is not None and s.decoding]
        if not active:
            return
        w = self._window()
        # Idle rows (free, prefilling, scratch) write a junk key at w - 1: beyond what a prefilling row
        # holds (its own prefill or decode rewrites it before any read); a freed row's cached prefix
        # loses the chunks from there on.
        tokens, positions = [0] * self.rows, [w - 1] * self.rows
        for s in active:
            tokens[s.slot] = s.tokens[-1]
            positions[s.slot] = len(s.prompt) + len(s.tokens) - 1
        for j in range(self.rows):
            if self._slots[j] is None:
                self._prefix.overwritten_from(j, w - 1)
        try:
            tok = torch.tensor(tokens, device=self._device)[:, None]  # [R, 1]
            pos = torch.tensor(positions, device=self._device)[:, None]  # [R, 1]
            view = self._cache.view(slots=w)  # [L, R, Hk, w, hd]
            logits, _ = self._forward(
                self.model.params, self.model.cfg, tok, pos, view, attention=batch_invariant_attention
            )  # [R, 1, V]
            picked = self._sampler.pick(logits[:, 0], slice(None), pos[:, 0] + 1, active)
        except Exception as exc:
            log.exception("decode step failed")
            for s in active:
                self._finish(s, "error", _describe(exc))
            return
        for s in active:
            self._accept(s, *picked[s.slot])

    def _prefill(self) -> None:
        """Prefill prompt chunks, oldest admission first, up to prefill_chunk tokens in all (at least one
        chunk). Chunk k of a prompt always covers [k*C, (k+1)*C), whoever else is running."""
        budget = self.prefill_chunk
        while self._prefilling and budget > 0:
            s = self._prefilling[0]
            start = s.prefilled
            end = min(len(s.prompt), start + self.prefill_chunk)
            if end - start > budget and budget < self.prefill_chunk:
                return
            budget -= end - start
            if not self._prefill_chunk(s, start, end):
                continue
            if s.decoding and not s.done:  # done: finished on its first token, already removed
                self._prefilling.popleft()

    def _prefill_chunk(self, s: Sequence, start: int, end: int) -> bool:
        j, n = s.slot, len(s.prompt)
        w = min(self.slot_len, -(-end // WINDOW) * WINDOW)  # depends on this prompt only
        view = self._cache.view(slice(j, j + 1), w)  # [L, 1, Hk, w, hd], shares memory
        try:
            tok = torch.tensor([s.prompt[start:end]], device=self._device)  # [1, T]
            pos = torch.arange(start, end, device=self._device)[None]  # [1, T]
            last = torch.tensor([end - start - 1], device=self._device)
            logits, _ = self._forward(self.model.params, self.model.cfg, tok, pos, view, logit_index=last)
            picked = self._sampler.pick(logits[:, 0], slice(j, j + 1), pos[:, -1] + 1, [s]) if end == n else None
        except Exception as exc:
            log.exception("prefill failed")
            self._finish(s, "error", _describe(exc))
            return False
        s.prefilled = end
        self._prefix.prefilled(j, s.prompt, end)
        if picked is not None:
            self._accept(s, *picked[0])
        return True

    # ----------------------------------------------------------------------------------- retiring

    def _accept(self, s: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        """Record a sampled token, detokenize, check the stop conditions, emit the event."""
        if s.done:
            return
        if s.guide is not None and token not in s.stops:
            try:
                s.guide.advance(token)
            except LlmfnError as exc:  # the mask allowed only grammar tokens: a bug if it happens
                self._finish(s, "error", str(exc))
                return
        s.tokens.append(token)
        self._n["tokens_generated"] += 1
        req = s.request
        reason = None
        if token in s.stops:
            text, reason = "", "stop"
        else:
            text = s.stop_strings.push(s.detok.add(token))
            if s.stop_strings.stopped or s.guide is not None and s.guide.finished:
                reason = "stop"
        if reason is None and len(s.tokens) >= req.max_tokens:
            reason = "length"
        if reason is not None:
            text += s.stop_strings.push(s.detok.flush()) + s.stop_strings.flush()
            self._release(s)
            self._n["finished"] += 1
        if logprob is not None and req.logprobs is not None:
            logprob = TokenLogprob(logprob.token_id, logprob.logprob, logprob.top[: req.logprobs])
        lps = [logprob] if logprob is not None and req.logprobs is not None else None
        self._send(s, GenerationEvent(text, [token], reason, len(s.prompt), len(s.tokens), s.seed, None, lps))

    def _finish(self, s: Sequence, reason: str, error: str | None = None) -> None:
        """End a sequence early ("cancelled" / "error"): free its slot, send the final event."""
        if s.done:
            return
        if s.slot is not None and error is not None:
            self._prefix.forget(s.slot)  # a failed forward may have left partial writes
        self._release(s)
        self._n["errors" if reason == "error" else "cancelled"] += 1
        self._send(s, GenerationEvent("", [], reason, len(s.prompt), len(s.tokens), s.seed, error))

    def _release(self, s: Sequence) -> None:
        s.done = True
        if s.slot is not None:
            self._slots[s.slot] = None
            self._prefix.freed_at[s.slot] = self._n["steps"]
            s.slot = None
        if s in self._prefilling:
            self._prefilling.remove(s)

    def _send(self, s: Sequence, event: GenerationEvent) -> None:
        try:
            s.sink(event)
        except Exception:  # the consumer's event loop is gone: nobody listens any more
            s.cancelled = True


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
