"""Continuous batching: one engine thread serves many requests, one batched forward per step.

    engine = llmfn.Engine(model, max_running=8)
    async for event in engine.submit(GenerationRequest(prompt_ids, max_tokens=64)):
        print(event.text, end="")
    results = engine.generate_many(["Hello", "Once upon a time"], max_tokens=32)  # blocking, offline

Modules: requests.py (what goes in and comes out, checked once at submit), stream.py (the bridge
from the loop thread to asyncio), rows.py (per-row sampling state of the decode batch), core.py
(the Engine: slots, prefix cache, the step loop; its docstring explains scheduling, memory and
batch invariance). The engine runs any causal model through its family's `init_cache` and the
forward llmfn.backend picks for it.
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
