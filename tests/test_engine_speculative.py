"""Prompt-lookup speculation inside the engine's decode steps: every request's events are exactly
those without speculation, among other requests (with and without drafts) and alone, and drafts are
verified and kept."""

import asyncio

import pytest
import torch

import llmfn
from llmfn.engine import Engine, GenerationRequest
from llmfn.engine import core as engine_core
from llmfn.sampling import SamplingParams as SP
from tiny import make_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spec-llama")
    make_checkpoint(folder, "llama", max_position_embeddings=512)
    return llmfn.load(folder)


def repetitive(seed: int, n: int) -> list[int]:
    """A prompt that repeats a phrase: what prompt lookup drafts from."""
    gen = torch.Generator().manual_seed(seed)
    phrase = torch.randint(3, 384, (5 + seed % 4,), generator=gen).tolist()
    return (phrase * 12)[:n]


def requests() -> list[GenerationRequest]:
    settings = [SP(), SP(temperature=0.8, seed=4), SP(repetition_penalty=1.2),
                SP(temperature=1.0, top_k=20, presence_penalty=0.4, frequency_penalty=0.3, seed=7)]  # fmt: skip
    reqs = [GenerationRequest(repetitive(i, 30 + 5 * i), 40, settings[i % 4], stop_token_ids=(),
                              logprobs=1 if i == 2 else None) for i in range(6)]  # fmt: skip
    reqs.append(GenerationRequest(list(range(3, 40)), 30, SP(temperature=0.7, seed=1), stop=("\x00",)))
    return reqs


def events(engine, reqs):
    async def main():
        async def collect(stream):
            return [(e.text, tuple(e.token_ids), e.finish_reason, e.completion_tokens, e.logprobs) async for e in stream]

        return await asyncio.gather(*(collect(engine.submit(r)) for r in reqs))

    return asyncio.run(main())


def test_speculation_changes_no_event_together_or_alone(model):
    reqs = requests()
    with Engine(model, max_running=4, prefill_chunk=16) as plain:
        expected = events(plain, reqs)
    with Engine(model, max_running=4, prefill_chunk=16, speculative="ngram") as spec:
        together = events(spec, reqs)
        stats = spec.stats()
    assert together == expected
    assert stats["drafted_tokens"] > 0 and 0 < stats["accepted_tokens"] <= stats["drafted_tokens"]
    with Engine(model, max_running=1, prefill_chunk=16, speculative={"method": "ngram", "k": 4}) as alone:
        assert events(alone, reqs[:3]) == expected[:3]


def test_speculation_is_off_where_it_would_not_be_exact(model, monkeypatch):
    """Where the steps run torch's kernels (not row-invariant): plain decoding. On the C kernels, drafts
    take the rows the busy places leave free in a step's first 16, also with more places than that
    (whose steps run in slices of 16 rows)."""
    reqs = requests()[:3]
    with Engine(model, max_running=16, prefill_chunk=16) as plain, \
         Engine(model, max_running=16, prefill_chunk=16, speculative="ngram") as spec, \
         Engine(model, max_running=17, prefill_chunk=16, speculative="ngram") as wide:  # fmt: skip
        expected = events(plain, reqs)
        assert events(spec, reqs) == expected and spec.stats()["drafted_tokens"] > 0
        assert events(wide, reqs) == expected and wide.stats()["drafted_tokens"] > 0
    monkeypatch.setattr(engine_core, "row_invariant_rows", lambda model: 0)
    engine = Engine(model, max_running=17, speculative="ngram")
    assert engine._speculator is None
    engine.shutdown()
