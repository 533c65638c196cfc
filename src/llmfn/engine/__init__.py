"""Continuous batching: one engine thread serves many requests, one batched forward per step.

    engine = llmfn.Engine(model, max_running=16, kv_cache_memory="512MiB")
    async for event in engine.submit(GenerationRequest(prompt_ids, max_tokens=64)):
        print(event.text, end="")
    results = engine.generate_many(["Hello", "Once upon a time"], max_tokens=32)  # blocking, offline

Modules: requests.py (what goes in and comes out, checked once at submit), stream.py (the bridge
from the loop thread to asyncio), rows.py (per-row sampling state of the decode batch), blocks.py
(the KV block pool: reference counts, the prefix cache, LRU eviction), core.py (the Engine: places,
block tables and the step loop). The engine runs the model through the forward llmfn.backend picks.

A step (1) frees the places and blocks of cancelled requests, (2) admits waiting requests, oldest
first, while a place is free and the pool has blocks for their prompts, (3) decodes one position for
every decoding sequence in one `forward`, (4) prefills at most `prefill_chunk` prompt tokens, so a
long prompt never stalls the running decodes for more than one chunk, and (5) retires finished
sequences (eos / stop string / complete constraint / max_tokens), freeing their blocks.

KV memory: paged, as vLLM's. One pool of blocks of `block_size` (16) positions, sized by
`kv_cache_memory` (default: a tenth of the machine's memory, at most 1 GiB; allocated as untouched
zero pages, so resident memory follows the blocks written, not the budget), in the layout the model
already takes (models/llama.py KVCache: k, v [L, N, Hk, S, hd] read through a per-row block table),
in the model's dtype or, with `kv_cache_dtype="bfloat16"` / `"float16"` for an fp32 model, in 16 bits:
keys and values rounded to nearest even once, when written, read back widened (attention stays fp32),
twice the positions in the same memory, with every exactness property below kept.
A sequence holds only the blocks its positions fill and grows block by block. `max_model_len` (the
model's context, capped by what the pool holds) bounds prompt + max_tokens; a longer request is
refused at submit with a RequestError naming both numbers, never truncated.
Admission keeps a block free for every decoding sequence's next position; when the pool still runs
out, the youngest running sequence (latest arrival) is preempted: its blocks are freed and it goes
back to the front of the queue with its tokens. Readmitted, it prefills its prompt in the same chunks
and feeds its generated tokens back through decode steps without sampling them again (a replay), so
its KV and the tokens it samples afterwards are bitwise those of an uninterrupted run (vLLM
recomputes the whole text as one prefill, which is cheaper but not bitwise).

Batch invariance: a request's tokens are identical whether it runs alone or among other requests.
- Where the backend's kernels are row-invariant (llmfn's C kernels for fp32-activation CPU decode up
  to 16 rows: every output is summed in an order fixed by its column, whatever the row count) a decode
  step runs just the rows up to the last busy place (`compact`), in slices of 16 rows taken in row
  order when more places are busy (max_running above 16; those kernels cost per row: with 32 places a
  SmolLM2 Q4_1 step of 32 rows took 127 ms in two slices, 418 ms on the fixed-shape torch path below,
  which also held one request alone to ~2 tok/s instead of ~100). Elsewhere (torch's kernels: MKL's
  sgemm computes the tail rows of a short batch, M = 5, 6, 7, 9, ..., with another kernel than the
  rest) every step runs all `rows` rows (max_running rounded up to a multiple of ROW_ALIGN, 8) and
  reads block tables padded to a multiple of WINDOW positions, so a step's shapes depend on the
  longest row only in coarse steps; masked keys add exact zeros, so a row's result does not depend
  on them (the test checks it bitwise). Idle rows write a junk key into the scratch block 0.
- The C attention reads a row's keys block by block in position order, so where its blocks lie
  changes no bit; the torch path gathers the row's blocks into one [Hk, positions, hd] tensor first.
  Decode steps use `batch_invariant_attention` (passed to `forward`): torch's CPU flash-attention
  kernel gives rows handled by the calling thread and by an OpenMP worker different last bits.
- Prefill runs per request, alone, in chunks [k*C, (k+1)*C) of the prompt (C = prefill_chunk): its
  shapes depend only on the request's own prompt.
- Sampling keys noise by (request seed, position of the sampled token), as `llmfn.generate` does;
  the first token is sampled in a [1, V] call, later ones in the decode step's call. A request's
  logit_bias and its constraint's token mask (llmfn.constraints, compiled at submit on the caller's
  thread) touch only its own row and depend only on its own tokens.
tests/test_engine.py proves it: 16 mixed requests together give exactly the tokens each gives alone,
in compact and fixed-shape steps; tests/test_paged_kv.py does for preemption.

Prefix caching (blocks.py): a full block that prefill wrote is named by its tokens and its parent
block, kept after its sequence ends (reference-counted while shared, evicted least recently used).
A new prompt takes the cached blocks of its first whole prefill chunks and prefills the rest in the
same chunks a cold prefill uses, so the reused KV is bitwise what prefill would have written and
outputs stay identical. Only prefill-written, chunk-aligned blocks are shared: a chunk's GEMMs round
row by row according to the chunk's shape, so KV written by decode steps or by a differently cut
prefill is not bitwise the same. The chunk holding the last prompt token is always recomputed (its
logits are needed). Events report `cached_tokens`; stats() the blocks used / cached / free, the hit
rate and the preemptions.

Threads: the step loop runs in a daemon thread under torch.inference_mode. `submit` (called on an
asyncio loop) validates synchronously and returns a RequestStream fed through a per-request
asyncio.Queue with `loop.call_soon_threadsafe`. Closing the stream (aclose, task cancelled, garbage
collected) marks the request cancelled; the next step frees its slot. An exception in a step fails
the requests of that forward with finish_reason "error"; the loop keeps serving.
"""

from llmfn.engine.core import ROW_ALIGN, Engine
from llmfn.engine.requests import (
    GenerationEvent,
    GenerationRequest,
    GenerationResult,
    QueueFullError,
    TokenLogprob,
)
from llmfn.engine.stream import RequestStream

__all__ = ["ROW_ALIGN", "Engine", "GenerationEvent", "GenerationRequest", "GenerationResult", "QueueFullError",
           "RequestStream", "TokenLogprob"]
