"""Continuous batching: one engine thread serves many requests, one batched forward per step.

    engine = llmfn.Engine(model, max_running=8)
    async for event in engine.submit(GenerationRequest(prompt_ids, max_tokens=64)):
        print(event.text, end="")
    results = engine.generate_many(["Hello", "Once upon a time"], max_tokens=32)  # blocking, offline

Modules: requests.py (what goes in and comes out, checked once at submit), stream.py (the bridge
from the loop thread to asyncio), rows.py (per-row sampling state of the decode batch),
prefix_cache.py, core.py (the Engine: slots and the step loop). The engine runs any causal model
through its family's `init_cache` and the forward llmfn.backend picks for it.

A step (1) frees the slots of cancelled requests, (2) admits waiting requests into free slots,
(3) decodes one token for every decoding sequence in one `forward` of fixed shape, (4) prefills at
most `prefill_chunk` prompt tokens, so a long prompt never stalls the running decodes for more than
one chunk, and (5) retires finished sequences (eos / stop string / complete constraint / max_tokens),
freeing their slots.

KV memory: static slots, not paged blocks. The cache is the model's `init_cache(cfg, rows, slot_len)`,
the layout `forward` already takes (slot j of row b holds position j); a sequence owns one row for
its whole life. Chosen over paged blocks because it needs no block tables and no new attention
kernel, and because every decode step then has one fixed shape, which batch invariance needs (below).
The price: a sequence reserves slot_len positions whatever its length (paged blocks would pack more
short sequences into the same memory).
Budget: `max_cache_tokens` = rows * slot_len positions (default slot_len: the model's context), at
`kv_bytes_per_token` each. A request whose prompt + max_tokens exceeds slot_len is refused at submit
with a RequestError naming both numbers, never truncated; when every slot is busy requests wait.

Batch invariance: a request's tokens are identical whether it runs alone or among other requests.
- Decode always runs all `rows` rows (idle rows feed token 0 at a junk position of their own slot
  that nothing reads before it is rewritten), so its batch never depends on the traffic.
- rows is max_running rounded up to a multiple of ROW_ALIGN (8): MKL's sgemm computes the tail rows
  of a short batch (M = 5, 6, 7, 9, ...) with another kernel than the rest, so a row's result would
  depend on its place; with M a multiple of 8 every row takes the same path (the extra rows are
  scratch slots, counted in the memory budget).
- Attention is masked by position; masked keys add exact zeros, so a row never sees another row or
  the stale contents of its own slot. To cost what is used rather than slot_len, decode attends over
  the first W slots, W the longest live row rounded up to a multiple of WINDOW (256): W depends on
  the other rows, but with exact-zero tails the result does not (the test checks it bitwise for
  every W). Prefill attends over its own chunk end rounded up the same way. Decode steps use
  `batch_invariant_attention` (passed to `forward`): torch's CPU flash-attention kernel gives rows
  handled by the calling thread and by an OpenMP worker different last bits (its one-query products
  differ by thread; with MKL_NUM_THREADS=1 they do not), so a row's result would depend on its place.
- Prefill runs per request, alone, in chunks [k*C, (k+1)*C) of the prompt (C = prefill_chunk): its
  shapes depend only on the request's own prompt length.
- Sampling keys noise by (request seed, position of the sampled token), as `llmfn.generate` does;
  the first token is sampled in a [1, V] call, later ones in the fixed [rows, V] decode call.
  A request's logit_bias and its constraint's token mask (llmfn.constraints, compiled at submit on
  the caller's thread) touch only its own row and depend only on its own tokens.
tests/test_engine.py proves it: 16 mixed requests together give exactly the tokens each gives alone.

Prefix caching (prefix_cache.py): a prompt that starts with whole prefill chunks another row still
holds reuses their KV instead of prefilling them again, bitwise the same.

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
