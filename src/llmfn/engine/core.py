"""The Engine: the paged KV pool, the prefix cache and the step loop (the scheduling, memory and
batch invariance it keeps are described in llmfn/engine/__init__.py)."""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable

import torch

from llmfn.backend import forward_for, row_invariant_rows
from llmfn.engine.drafts import Speculator
from llmfn.engine.paged import PagedKV, pool_dtype, size_pool
from llmfn.engine.requests import (
    Collector,
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
from llmfn.speculative import as_config

log = logging.getLogger("llmfn.engine")

ROW_ALIGN = 8  # fixed-shape decode batches have a multiple of this many rows (see the module docstring)
WINDOW = 256  # fixed-shape decode steps read a multiple of this many positions per row (ditto)
GREEDY = SamplingParams()


class Engine:
    """Owns a causal LM, its paged KV cache and the step-loop thread. See the module docstring.

    max_running: sequences decoded together; max_queued: requests that may wait beyond the free places
    (more raise QueueFullError); kv_cache_memory: the KV pool's size in bytes or as "512MiB" (default:
    blocks.default_kv_cache_memory); kv_cache_dtype: None (the model's dtype) or, for an fp32 model,
    "bfloat16" / "float16": twice the positions in the same memory (paged.pool_dtype); max_model_len:
    the longest prompt + max_tokens a request may ask for (default: the model's context, capped by what
    the pool holds); block_size: positions per KV block; prefill_chunk: prompt tokens prefilled per step
    (a multiple of block_size); prefix_cache: reuse the KV of shared prompt prefixes; speculative:
    "ngram" (or llmfn.speculative's config) to verify prompt-lookup drafts in the decode steps
    (engine/drafts.py), where it is exact."""

    def __init__(
        self,
        model: Model,
        *,
        max_running: int = 16,
        max_queued: int = 64,
        kv_cache_memory: int | str | None = None,
        kv_cache_dtype: str | torch.dtype | None = None,
        max_model_len: int | None = None,
        block_size: int = 16,
        prefill_chunk: int = 256,
        prefix_cache: bool = True,
        speculative=None,
    ):
        if model.kind != "causal-lm":
            raise LlmfnError(f"the engine needs a causal language model, got a {model.kind} model")
        if max_running < 1 or max_queued < 0 or block_size < 1 or prefill_chunk < 1 or prefill_chunk % block_size:
            raise LlmfnError(
                f"need max_running >= 1, max_queued >= 0, block_size >= 1 and prefill_chunk a multiple of "
                f"block_size; got {max_running}, {max_queued}, {block_size}, {prefill_chunk}"
            )
        cfg = model.cfg
        self.model = model
        self.max_running = max_running
        self.max_queued = max_queued
        self.prefill_chunk = prefill_chunk
        self.block_size = block_size
        self._device = model.params["norm"].device
        dtype = pool_dtype(kv_cache_dtype, model.params["norm"].dtype)  # the KV pool's
        arch = family(cfg)  # the model's math: forward (run through backend.forward_for)
        self.kv_bytes_per_token = arch.kv_bytes_per_token(cfg, dtype)
        num_blocks, self.max_model_len = size_pool(kv_cache_memory, self.kv_bytes_per_token, block_size,
                                                   cfg.max_position_embeddings, max_model_len, self._device)  # fmt: skip
        # Decode steps: where the backend's kernels are row-invariant, only the rows up to the last busy place
        # run, in slices of the kernels' row limit; elsewhere every step runs the same `rows` rows (module doc).
        invariant_rows = row_invariant_rows(model)
        self.compact = invariant_rows > 0
        self.slice_rows = invariant_rows or None
        self.rows = max_running if self.compact else -(-max_running // ROW_ALIGN) * ROW_ALIGN
        self._forward = forward_for(model)  # eager: generate's torch.compile'd step is not used here yet
        self._eos = frozenset(eos_ids(model))
        with torch.inference_mode():
            self._kv = PagedKV(cfg, num_blocks, block_size, prefill_chunk, prefix_cache, dtype, self._device)
            self._sampler = RowSampler(self.rows, cfg.vocab_size, self._device)
        spec = as_config(speculative, model)  # prompt lookup where the kernels make it exact (drafts.py)
        exact = self.compact and not getattr(cfg, "dynamic_ntk_length", None)  # drafts use the free rows
        self._speculator = Speculator(spec, model, self._kv, self._sampler, invariant_rows) if spec and exact else None
        self._slots: list[Sequence | None] = [None] * self.rows  # places >= max_running stay None: scratch
        self._prefilling: deque[Sequence] = deque()
        self._waiting: deque[Sequence] = deque()  # guarded by _cv
        self._arrivals = itertools.count()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._step_s = 0.0  # moving average of a step's wall time, for Retry-After
        self._n = {"steps": 0, "tokens_generated": 0, "prompt_tokens": 0, "prefix_cache_hit_tokens": 0,
                   "finished": 0, "cancelled": 0, "errors": 0, "preemptions": 0}  # fmt: skip

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
            raise LlmfnError("submit() needs a running asyncio loop; use generate_many() from plain code") from None
        seq = self._prepare(request)
        queue: asyncio.Queue = asyncio.Queue()
        seq.sink = lambda event: loop.call_soon_threadsafe(queue.put_nowait, event)
        stream = RequestStream(seq, queue, self._wake)
        self._enqueue(seq)
        return stream

    def generate_many(self, requests: Iterable[GenerationRequest | str | list[int]], *, max_tokens: int | None = None,
                      sampling: SamplingParams = GREEDY, stop: tuple[str, ...] = ()) -> list[GenerationResult]:
        """Generate for every request, batched, and block until all finish; results in input order.
        Plain prompts (text, encoded with the model's tokenizer, or token ids) take max_tokens,
        sampling and stop from the keywords. All requests are validated before any is queued; when
        the queue is full the rest wait for room instead of failing."""
        reqs = [self._as_request(r, max_tokens, sampling, stop) for r in requests]
        seqs = [self._prepare(r) for r in reqs]
        collected = Collector(seqs)
        for i, seq in enumerate(seqs):
            seq.sink = collected.sink(i)
            while True:
                try:
                    self._enqueue(seq)
                    break
                except QueueFullError:
                    collected.wait(0.05)
        return collected.results()

    def _as_request(self, item, max_tokens, sampling, stop) -> GenerationRequest:
        if isinstance(item, GenerationRequest):
            return item
        if max_tokens is None:
            raise RequestError("generate_many needs max_tokens for plain prompts", param="max_tokens")
        ids = self.model.tokenizer.encode_prompt(item) if isinstance(item, str) else list(item)
        return GenerationRequest(ids, max_tokens, sampling, tuple(stop))

    def _prepare(self, request: GenerationRequest) -> Sequence:
        """Validate a request (RequestError with .param) and wrap it for the loop."""
        cfg = self.model.cfg
        check_request(request, cfg.vocab_size, cfg.max_position_embeddings, self.max_model_len)
        seed = fresh_seed() if request.sampling.seed is None else request.sampling.seed
        stops = self._eos if request.stop_token_ids is None else frozenset(request.stop_token_ids)
        return prepare_sequence(request, seed, stops, self.model.tokenizer, cfg.vocab_size, self._device)

    def _enqueue(self, seq: Sequence) -> None:
        self.start()
        with self._cv:
            if self._closed:
                raise LlmfnError("the engine is shut down")
            free = self.max_running - sum(s is not None for s in self._slots[: self.max_running])
            behind = max(0, len(self._waiting) - free)  # requests that would wait ahead of this one
            if behind >= self.max_queued:
                raise QueueFullError(f"{behind} requests already wait for a place (max_queued={self.max_queued})",
                                     retry_after=self._retry_after())
            seq.arrival = next(self._arrivals)
            self._waiting.append(seq)
            self._cv.notify_all()

    def _retry_after(self) -> int:
        """Seconds until a running sequence should finish and let the queue move, at the recent pace."""
        left = [s.request.max_tokens - len(s.tokens) for s in list(self._slots) if s is not None]
        return max(1, min(60, math.ceil(min(left, default=1) * max(self._step_s, 0.01))))

    # ----------------------------------------------------------------------------------- stats

    def stats(self) -> dict:
        """A snapshot: running, queued, places, KV blocks (used / cached / free), tokens, prefix hits, ..."""
        with self._cv:
            queued = len(self._waiting)
        used = sum(s is not None for s in list(self._slots))
        pool = self._kv.pool
        prompt = self._n["prompt_tokens"]
        return {
            "running": used,
            "prefilling": sum(1 for s in list(self._slots) if s is not None and not s.decoding),
            "queued": queued,
            "slots_total": self.max_running,
            "slots_used": used,
            "slots_free": self.max_running - used,
            "max_model_len": self.max_model_len,
            "block_size": self.block_size,
            "blocks_total": pool.num_blocks - 1,
            "blocks_used": pool.used(),
            "blocks_cached": pool.cached(),
            "blocks_free": pool.available(),
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_cache_dtype": str(self._kv.cache.k.dtype).removeprefix("torch."),
            "kv_cache_bytes": self._kv.nbytes(),
            "prefix_hit_rate": self._n["prefix_cache_hit_tokens"] / prompt if prompt else 0.0,
            "drafted_tokens": self._speculator.drafted if self._speculator else 0,
            "accepted_tokens": self._speculator.accepted if self._speculator else 0,
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
        """Free the places and blocks of cancelled sequences and drop cancelled waiting ones."""
        for s in [s for s in self._slots if s is not None and s.cancelled]:
            self._finish(s, "cancelled")
        with self._cv:
            gone = [s for s in self._waiting if s.cancelled]
            if gone:
                self._waiting = deque(s for s in self._waiting if not s.cancelled)
        for s in gone:
            self._finish(s, "cancelled")

    def _admit(self) -> None:
        """Move waiting sequences, oldest first, into free places while the pool has blocks for their
        prompts (beyond a block for every decoding sequence's next token), reusing cached prefixes."""
        while True:
            free = [j for j in range(self.max_running) if self._slots[j] is None]
            with self._cv:
                if not free or not self._waiting:
                    return
                s = self._waiting[0]
            matched = self._kv.match(s.prompt)
            need = self._kv.blocks_for(len(s.prompt)) - len(matched)
            growing = sum(1 for r in self._slots if r is not None and r.decoding)
            if self._kv.pool.available() < need + growing:
                self._kv.pool.release(matched)
                return  # wait for blocks to free (finishing sequences, or preemption of younger ones)
            with self._cv:
                self._waiting.popleft()
            s.prefilled = s.computed = len(matched) * self.block_size
            s.blocks = matched
            self._kv.grow(s.blocks, len(s.prompt))
            s.slot = free[0]
            self._slots[s.slot] = s
            self._prefilling.append(s)
            if s.cached_tokens is None:  # first admission (not a return after preemption)
                s.cached_tokens = s.prefilled
                self._n["prefix_cache_hit_tokens"] += s.prefilled
                self._n["prompt_tokens"] += len(s.prompt)
            self._sampler.assign(s.slot, s)

    def _grow(self, active: list[Sequence]) -> list[Sequence]:
        """A block for every decoding sequence whose next position starts one, oldest first; when the
        pool is out, the youngest running sequence is preempted (and may be the one that asked).
        Returns the sequences still decoding."""
        for s in sorted(active, key=lambda s: s.arrival):
            while s.slot is not None and not self._kv.grow(s.blocks, s.computed + 1):
                self._preempt(max((r for r in self._slots if r is not None), key=lambda r: r.arrival))
        return [s for s in active if s.slot is not None]

    def _preempt(self, s: Sequence) -> None:
        """Free a running sequence's place and blocks and queue it first again. Its tokens stay: when it
        is admitted again its prompt is prefilled in the same chunks and its generated tokens are fed
        back through decode steps (not sampled again), so its KV, and its output, are bitwise what they
        would have been (a decode row's KV does not depend on the batch)."""
        log.info("preempting a sequence of %d tokens: the KV pool is full", len(s.prompt) + len(s.tokens))
        self._n["preemptions"] += 1
        self._vacate(s)
        with self._cv:
            self._waiting.appendleft(s)

    def _decode(self) -> None:
        """One position for every decoding sequence, in one forward: the next token of those caught
        up, a generated token fed back for those replaying after a preemption."""
        active = self._grow([s for s in self._slots if s is not None and s.decoding])
        if not active:
            return
        rows = max(s.slot for s in active) + 1 if self.compact else self.rows
        tokens, positions = [0] * rows, [0] * rows  # idle rows write position 0 of the scratch block
        for s in active:
            tokens[s.slot] = s.token_at(s.computed)
            positions[s.slot] = s.computed
        sampling = [s for s in active if s.computed == len(s.prompt) + len(s.tokens) - 1]
        drafts = self._speculator.plan(sampling, rows) if self._speculator else {}
        held = [s.blocks if s is not None and s.decoding else None for s in self._slots[:rows]]
        for s, ds in drafts.items():  # a row per drafted token, after the places' rows
            tokens += ds
            positions += range(s.computed + 1, s.computed + 1 + len(ds))
            held += [s.blocks] * len(ds)
        width = max(len(s.blocks) for s in active)
        if not self.compact:  # a fixed shape: the width depends on the longest row only in WINDOW steps
            width = self._kv.blocks_for(-(-width * self.block_size // WINDOW) * WINDOW)
        plain = [s for s in sampling if s not in drafts]
        try:
            tok = torch.tensor(tokens, device=self._device)[:, None]  # [rows + drafted, 1]
            pos = torch.tensor(positions, device=self._device)[:, None]
            logits = self._decode_forward(tok, pos, held, width)  # [rows + drafted, 1, V]
            picked = self._sampler.pick(logits[:rows, 0], slice(0, rows), pos[:rows, 0] + 1, plain) if plain else []
        except Exception as exc:
            log.exception("decode step failed")
            for s in active:
                self._finish(s, "error", _describe(exc))
            return
        for s in active:
            s.computed += 1
        for s in plain:
            self._accept(s, *picked[s.slot])
        row = rows
        for s, ds in drafts.items():
            self._speculator.verify(s, ds, logits[[s.slot, *range(row, row + len(ds))], 0], self._accept)
            row += len(ds)

    def _decode_forward(self, tok: torch.Tensor, pos: torch.Tensor, held: list, width: int) -> torch.Tensor:
        """The decode step's forward, in slices of at most slice_rows rows taken in row order: every row
        writes its key and value before any row of its slice attends, so a drafted row still reads the
        keys of its sequence's rows before it, and each row's result is that of a step of its own."""
        step = self.slice_rows or tok.shape[0]
        out = []
        for lo in range(0, tok.shape[0], step):
            cache = self._kv.view(held[lo : lo + step], width)
            logits, _ = self._forward(self.model.params, self.model.cfg, tok[lo : lo + step], pos[lo : lo + step],
                                      cache, attention=batch_invariant_attention)  # fmt: skip
            out.append(logits)
        return out[0] if len(out) == 1 else torch.cat(out)

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
        try:
            tok = torch.tensor([s.prompt[start:end]], device=self._device)  # [1, T]
            pos = torch.arange(start, end, device=self._device)[None]  # [1, T]
            last = torch.tensor([end - start - 1], device=self._device)
            cache = self._kv.view([s.blocks[: self._kv.blocks_for(end)]])
            logits, _ = self._forward(self.model.params, self.model.cfg, tok, pos, cache, logit_index=last)
            first = end == n and not s.tokens  # not when coming back from a preemption: that token is known
            picked = self._sampler.pick(logits[:, 0], slice(j, j + 1), pos[:, -1] + 1, [s]) if first else None
        except Exception as exc:
            log.exception("prefill failed")
            self._finish(s, "error", _describe(exc))
            return False
        s.prefilled = s.computed = end
        self._kv.register(s.prompt, s.blocks, start, end)
        if picked is not None:
            self._accept(s, *picked[0])
        return True

    # ----------------------------------------------------------------------------------- retiring

    def _accept(self, s: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        """Record a sampled token (Sequence.take), free the sequence when it finished, emit the event."""
        if s.done:
            return
        try:
            event = s.take(token, logprob)
        except LlmfnError as exc:  # the constraint's mask allowed only grammar tokens: a bug if it happens
            self._finish(s, "error", str(exc))
            return
        self._n["tokens_generated"] += 1
        if event.finish_reason is not None:
            self._release(s)
            self._n["finished"] += 1
        self._send(s, event)

    def _finish(self, s: Sequence, reason: str, error: str | None = None) -> None:
        """End a sequence early ("cancelled" / "error"): free its slot, send the final event."""
        if s.done:
            return
        if error is not None:  # a failed forward may have left partial writes in its own blocks
            self._kv.pool.forget(s.blocks[(s.cached_tokens or 0) // self.block_size :])
        self._release(s)
        self._n["errors" if reason == "error" else "cancelled"] += 1
        self._send(s, GenerationEvent("", [], reason, len(s.prompt), len(s.tokens), s.seed, error, None,
                                      s.cached_tokens or 0))  # fmt: skip

    def _release(self, s: Sequence) -> None:
        s.done = True
        self._vacate(s)
        if self._speculator:
            self._speculator.forget(s)

    def _vacate(self, s: Sequence) -> None:
        """Give back a sequence's place and blocks (it may come back: preemption)."""
        self._kv.pool.release(s.blocks)
        s.blocks = []
        s.prefilled = s.computed = 0
        if s.slot is not None:
            self._slots[s.slot] = None
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
