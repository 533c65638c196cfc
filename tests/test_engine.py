"""The continuous batching engine over a tiny random Llama: batch invariance (together == alone, token
for token), limits, cancellation, failures, prefix caching and the library helpers."""

import asyncio
import gc
import json
import re
import threading
import time
import weakref

import pytest
import torch

import llmfn
from constrained import constrained_requests
from llmfn.engine import Engine, GenerationRequest, QueueFullError
from llmfn.engine import core as engine_module
from llmfn.errors import RequestError
from llmfn.models import llama
from llmfn.sampling import SamplingParams as SP
from tiny import make_checkpoint

TIMEOUT = 120  # seconds; a hung engine fails the test instead of the run


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine-llama")
    make_checkpoint(folder, "llama", max_position_embeddings=512)
    return llmfn.load(folder)


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


async def collect(stream) -> list:
    return [event async for event in stream]


def summary(events) -> tuple:
    """What a client sees: every event's text, tokens, finish reason, counts and logprobs."""
    return tuple(
        (e.text, tuple(e.token_ids), e.finish_reason, e.completion_tokens, e.logprobs) for e in events
    )


def wait_until(predicate, timeout=TIMEOUT):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.002)


SYSTEM = ids(40, 99)  # a shared "system prompt": 2 whole prefill chunks of 16, reused by the prefix cache


def sixteen_requests(model) -> list[GenerationRequest]:
    """Different prompt lengths (1 .. 90, across chunk boundaries), greedy and seeded sampling with
    every knob, penalties, stop strings, EOS and logprobs."""
    settings = [
        SP(),
        SP(temperature=0.8, seed=1),
        SP(temperature=1.2, top_k=20, seed=2),
        SP(temperature=0.9, top_p=0.7, seed=3),
        SP(temperature=1.0, min_p=0.1, seed=4),
        SP(repetition_penalty=1.3),
        SP(temperature=0.7, presence_penalty=0.8, frequency_penalty=0.5, seed=5),
        SP(temperature=1.0, top_k=1, seed=6),
        SP(temperature=1.5, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.2, seed=7),
        SP(temperature=0.6, seed=2**40 + 3),
        SP(),
        SP(temperature=1.0, seed=8),
        SP(frequency_penalty=1.0),
        SP(temperature=0.5, top_p=0.5, seed=9),
        SP(temperature=2.0, seed=10),
        SP(repetition_penalty=0.8, temperature=0.9, seed=11),
    ]
    lengths = [1, 7, 15, 16, 17, 31, 33, 48, 63, 90, 3, 25, 2, 50, 12, 70]
    reqs = []
    for i, (sp, n) in enumerate(zip(settings, lengths, strict=True)):
        prompt = SYSTEM + ids(n, i) if i % 4 == 1 else ids(n, i)  # 4 share the system prompt
        reqs.append(GenerationRequest(prompt, max_tokens=12 + 3 * i, sampling=sp, stop_token_ids=(),
                                      logprobs=2 if i % 5 == 0 else None))  # fmt: skip
    # Stop conditions that are sure to fire: a stop string and a stop token taken from a probe run.
    probe = Engine(model, max_running=1, prefill_chunk=16).generate_many(reqs[2:4])
    text = probe[0].text
    reqs[2] = GenerationRequest(
        reqs[2].prompt_ids, reqs[2].max_tokens, reqs[2].sampling, stop=(text[6:9], "\x00")
    )
    reqs[3] = GenerationRequest(reqs[3].prompt_ids, reqs[3].max_tokens, reqs[3].sampling,
                                stop_token_ids=(probe[1].token_ids[5],))  # fmt: skip
    return reqs


# (max_running, WINDOW, rows the kernels keep row-invariant: None = the backend's answer). 6: steps of
# more busy places run in slices of 6 rows; 0: fixed-shape steps on torch's kernels, attention through
# gathered blocks.
@pytest.mark.parametrize("max_running, window, invariant_rows", [(5, 16, None), (16, 256, None), (16, 64, 6),
                                                                 (17, 64, 0)])  # fmt: skip
def test_sixteen_requests_together_equal_each_alone(model, max_running, window, invariant_rows, monkeypatch):
    """The batch-invariance guarantee: submitted together (queueing, place reuse, rows at every place,
    prefills interleaved with decodes, shared prefixes, block tables as wide as the longest row),
    each request streams exactly the events it streams alone in a fresh engine."""
    monkeypatch.setattr(engine_module, "WINDOW", window)
    if invariant_rows is not None:
        monkeypatch.setattr(engine_module, "row_invariant_rows", lambda model: invariant_rows)
    reqs = sixteen_requests(model)

    async def alone(req):
        with Engine(model, max_running=max_running, prefill_chunk=16) as engine:
            return await collect(engine.submit(req))

    async def together():
        with Engine(model, max_running=max_running, prefill_chunk=16) as engine:
            out = await asyncio.gather(*(collect(engine.submit(r)) for r in reqs))
            if max_running < len(reqs):  # later admissions find the shared chunks cached
                assert engine.stats()["prefix_cache_hit_tokens"] > 0
            return out

    solo = [run(alone(r)) for r in reqs]
    joint = run(together())
    for i, (a, b) in enumerate(zip(solo, joint, strict=True)):
        assert summary(a) == summary(b), f"request {i} differs"
    reasons = [events[-1].finish_reason for events in solo]
    assert reasons[2] == "stop" and reasons[3] == "stop" and reasons.count("length") == 14
    stop_token = reqs[3].stop_token_ids[0]
    tokens3 = [t for e in solo[3] for t in e.token_ids]
    assert tokens3[-1] == stop_token and tokens3.index(stop_token) == len(tokens3) - 1  # kept, first hit
    assert all(e.logprobs and len(e.logprobs[0].top) == 2 for e in solo[0])
    sampled = {tuple(t for e in events for t in e.token_ids) for events in solo}
    assert len(sampled) == 16


def test_greedy_and_seeded_engine_tokens_equal_generate(model):
    """The fixed-shape engine and the single-request path use different shapes, so only argmax and
    seeded draws (not the logits' last bits) can match; they do here, for prompts across chunks."""
    cases = [
        (ids(n, 50 + n), sp) for n in (1, 9, 40) for sp in (SP(), SP(temperature=0.9, top_p=0.8, seed=n))
    ]
    engine = Engine(model, max_running=3, prefill_chunk=16)
    got = engine.generate_many([GenerationRequest(p, 24, sp, stop_token_ids=()) for p, sp in cases])
    engine.shutdown()
    for (prompt, sp), result in zip(cases, got, strict=True):
        ref = llmfn.generate(model, prompt, max_tokens=24, temperature=sp.temperature, top_p=sp.top_p,
                             seed=sp.seed, stop_token_ids=[])  # fmt: skip
        assert result.token_ids == list(ref)


def test_constrained_requests_together_equal_each_alone(model):
    """Masks and biases are per row and depend on the row's own tokens: batch invariance holds."""
    reqs = constrained_requests(model, ids)

    async def alone(req):
        with Engine(model, max_running=3, prefill_chunk=16) as engine:
            return await collect(engine.submit(req))

    async def together():
        with Engine(model, max_running=3, prefill_chunk=16) as engine:
            return await asyncio.gather(*(collect(engine.submit(r)) for r in reqs))

    solo = [run(alone(r)) for r in reqs]
    assert [summary(a) for a in solo] == [summary(b) for b in run(together())]
    texts, reasons = ["".join(e.text for e in ev) for ev in solo], [ev[-1].finish_reason for ev in solo]
    assert reasons[0] == reasons[2] == reasons[3] == reasons[5] == reasons[6] == "stop"
    assert reasons[8] == "length" and len(solo[8]) == 6 and reasons[7] == "length"  # max_tokens mid-grammar
    assert json.loads(texts[0]).keys() == {"n", "tags"} and json.loads(texts[6]).keys() == {"n", "tags"}
    assert re.fullmatch("[a-f]{3,8}-[0-9]{2}", texts[2]) and re.fullmatch("<[a-z]{1,6}>", texts[5])
    assert texts[3] in ("red", "green", "blue")  # +100 on EOS cannot end it before the grammar does
    tokens = [[t for e in events for t in e.token_ids] for events in solo]
    assert tokens[7] == [200] * 120 and 9 not in tokens[6]  # +100 forces a token, -100 bans one


def test_text_stop_strings_eos_and_logprobs(model):
    prompt = ids(20, 1)
    engine = Engine(model, max_running=2)
    [full] = engine.generate_many([GenerationRequest(prompt, 30, stop_token_ids=(), logprobs=3)])
    assert full.finish_reason == "length" and full.completion_tokens == 30
    assert full.text == model.tokenizer.decode(full.token_ids)
    reference = llmfn.logits(model, torch.tensor([prompt + full.token_ids])).log_softmax(-1)[
        0, len(prompt) - 1 : -1
    ]
    for lp, token, ref in zip(full.logprobs, full.token_ids, reference, strict=True):
        assert lp.token_id == token == lp.top[0][0] and len(lp.top) == 3
        assert abs(lp.logprob - ref[token].item()) < 1e-4
    stop = full.text[10:13]
    eos = full.token_ids[7]
    cut, by_eos, default_eos = engine.generate_many([
        GenerationRequest(prompt, 30, stop=(stop,), stop_token_ids=()),
        GenerationRequest(prompt, 30, stop_token_ids=(eos,)),
        GenerationRequest(prompt, 30),  # the model's EOS ids (none is sampled here)
    ])  # fmt: skip
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    assert (
        by_eos.finish_reason == "stop" and by_eos.token_ids == full.token_ids[: full.token_ids.index(eos) + 1]
    )
    assert by_eos.text == model.tokenizer.decode(by_eos.token_ids[:-1])
    assert default_eos.token_ids == full.token_ids
    engine.shutdown()


def test_requests_are_validated_at_submit(model):
    engine = Engine(model, max_running=8, max_model_len=64)
    assert engine.max_model_len == engine.stats()["max_model_len"] == 64

    async def submit(req):
        engine.submit(req)

    cases = {
        "prompt": [GenerationRequest([], 4), GenerationRequest([1, 384], 4), GenerationRequest([-1], 4)],
        "max_tokens": [GenerationRequest([1], 0), GenerationRequest([1] * 10, 55)],
        "temperature": [GenerationRequest([1], 4, SP(temperature=-1.0))],
        "top_p": [GenerationRequest([1], 4, SP(top_p=0.0))],
        "top_k": [GenerationRequest([1], 4, SP(top_k=-2))],
        "min_p": [GenerationRequest([1], 4, SP(min_p=1.5))],
        "repetition_penalty": [GenerationRequest([1], 4, SP(repetition_penalty=0.0))],
        "seed": [GenerationRequest([1], 4, SP(seed=2**64))],
        "logprobs": [GenerationRequest([1], 4, logprobs=21)],
    }
    for param, reqs in cases.items():
        for req in reqs:
            with pytest.raises(RequestError) as err:
                run(submit(req))
            assert err.value.param == param
    with pytest.raises(RequestError) as err:  # over max_model_len: refused with the numbers, never truncated
        engine.generate_many([GenerationRequest([1] * 10, 55)])
    assert "10 tokens" in str(err.value) and "55" in str(err.value) and "max_model_len of 64" in str(err.value)
    with pytest.raises(RequestError) as err:  # over the model's context (512)
        Engine(model).generate_many([GenerationRequest([1] * 500, 13)])
    assert err.value.param == "max_tokens" and "512" in str(err.value)
    assert engine.stats()["queued"] == 0
    engine.shutdown()


def test_requests_wait_for_memory_and_complete_in_full(model):
    """2 slots, 6 requests: 4 wait in the queue, none is truncated."""

    async def main():
        with Engine(model, max_running=2, max_model_len=64, prefill_chunk=16) as engine:
            streams = [engine.submit(GenerationRequest(ids(20, i), 40, stop_token_ids=())) for i in range(6)]
            stats = engine.stats()
            assert stats["running"] <= 2 and stats["queued"] >= 3
            results = await asyncio.gather(*(collect(s) for s in streams))
            assert all(r[-1].finish_reason == "length" and r[-1].completion_tokens == 40 for r in results)
            return engine.stats()

    stats = run(main())
    assert stats["running"] == 0 and stats["queued"] == 0 and stats["slots_free"] == 2


def test_queue_limit_raises_queue_full(model, monkeypatch):
    gate = threading.Event()
    forward = llama.forward

    def gated(*args, **kwargs):
        assert gate.wait(TIMEOUT)
        return forward(*args, **kwargs)

    monkeypatch.setattr(llama, "forward", gated)

    async def main():
        with Engine(model, max_running=1, max_queued=2) as engine:
            first = engine.submit(GenerationRequest(ids(5, 1), 8))
            wait_until(lambda: engine.stats()["running"] == 1)  # admitted, held in prefill by the gate
            queued = [engine.submit(GenerationRequest(ids(5, i), 8)) for i in (2, 3)]
            with pytest.raises(QueueFullError) as err:
                engine.submit(GenerationRequest(ids(5, 4), 8))
            assert err.value.retry_after >= 1 and isinstance(err.value, llmfn.LlmfnError)
            assert engine.stats()["queued"] == 2
            gate.set()
            done = await asyncio.gather(*(collect(s) for s in [first, *queued]))
            assert [d[-1].completion_tokens for d in done] == [8, 8, 8]
            return engine.stats()

    stats = run(main())
    assert stats["running"] == 0 and stats["queued"] == 0


def test_fifty_cancelled_streams_then_a_request_completes(model):
    """50 streams cancelled mid-way (by aclose, by cancelling the consumer's task, some while still
    queued); then a new request completes normally and the engine is empty again."""
    reference = Engine(model, max_running=4).generate_many(
        [GenerationRequest(ids(9, 77), 20, stop_token_ids=())]
    )[0]

    async def main():
        with Engine(model, max_running=4, max_queued=64, prefill_chunk=16) as engine:
            got_some = [asyncio.Event() for _ in range(50)]

            async def consume(i, stream):
                n = 0
                async for _ in stream:
                    n += 1
                    if n == i % 4:
                        got_some[i].set()
                        if i % 2 == 0:
                            await stream.aclose()  # the client hangs up
                            return n
                return n

            streams = [
                engine.submit(GenerationRequest(ids(3 + i % 30, i), 200, stop_token_ids=()))
                for i in range(50)
            ]
            tasks = [asyncio.ensure_future(consume(i, s)) for i, s in enumerate(streams)]
            for i, task in enumerate(tasks):
                if i % 4 == 0:
                    streams[i].cancel() if i % 8 == 0 else task.cancel()  # cancelled before any token
                elif i % 2 == 1:
                    await got_some[i].wait()
                    task.cancel()  # a timeout / disconnect cancels the handler's task
            await asyncio.gather(*tasks, return_exceptions=True)
            del streams, tasks
            wait_until(lambda: engine.stats()["running"] == 0)
            stats = engine.stats()
            assert stats["cancelled"] == 50 and stats["queued"] == 0 and stats["slots_free"] == 4
            fresh = await collect(engine.submit(GenerationRequest(ids(9, 77), 20, stop_token_ids=())))
            assert fresh[-1].finish_reason == "length"
            assert [t for e in fresh for t in e.token_ids] == reference.token_ids
            return engine.stats()

    stats = run(main())
    assert stats["running"] == 0 and stats["finished"] == 1


def test_cancellation_frees_the_slot_within_one_step(model):
    async def main():
        with Engine(model, max_running=2) as engine:
            stream = engine.submit(GenerationRequest(ids(5, 3), 200, stop_token_ids=()))
            await anext(stream)
            await anext(stream)
            steps = engine.stats()["steps"]  # the step in flight may still finish
            await stream.aclose()
            wait_until(lambda: engine.stats()["slots_used"] == 0)
            assert engine.stats()["steps"] - steps <= 2

    run(main())


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(model, monkeypatch):
    forward = llama.forward
    poison = 383  # a prompt starting with this token fails in prefill

    def flaky(params, cfg, tokens, positions, cache, **kwargs):
        if tokens.shape[1] == 1 and fail_decode.is_set():
            fail_decode.clear()
            raise RuntimeError("device fell over")
        if tokens[0, 0].item() == poison and positions[0, 0].item() == 0:
            raise RuntimeError("bad prompt")
        return forward(params, cfg, tokens, positions, cache, **kwargs)

    fail_decode = threading.Event()
    monkeypatch.setattr(llama, "forward", flaky)
    good = GenerationRequest(ids(6, 5), 10, stop_token_ids=())
    engine = Engine(model, max_running=3)
    ok, bad = engine.generate_many([good, GenerationRequest([poison, 5, 6], 10)])
    assert ok.finish_reason == "length" and bad.finish_reason == "error" and "bad prompt" in bad.error
    fail_decode.set()
    [failed] = engine.generate_many([good])
    assert failed.finish_reason == "error" and "device fell over" in failed.error
    [again] = engine.generate_many([good])
    assert again.token_ids == ok.token_ids
    stats = engine.stats()
    assert stats["errors"] == 2 and stats["running"] == 0 and stats["slots_free"] == 3
    engine.shutdown()


@pytest.mark.parametrize("blocks", [None, 12])
def test_prefix_cache_reuses_shared_prompts_with_identical_output(model, blocks):
    """Reused prefixes give the same tokens as prefilling them; in a pool of 12 blocks of 16, cached
    blocks are evicted for new ones (and then recomputed, not reused)."""
    memory = None if blocks is None else blocks * 16 * llama.kv_bytes_per_token(model.cfg, torch.float32)
    prompts = [SYSTEM + ids(5 + i, 200 + i) for i in range(6)] + [SYSTEM[:12] + ids(30, 7), SYSTEM]
    reqs = [
        GenerationRequest(p, 15, SP(temperature=0.9, seed=i), stop_token_ids=())
        for i, p in enumerate(prompts)
    ]
    with Engine(model, max_running=2, prefill_chunk=16, prefix_cache=False) as plain:
        expected = plain.generate_many(reqs)
        assert plain.stats()["prefix_cache_hit_tokens"] == 0
    with Engine(model, max_running=2, prefill_chunk=16, kv_cache_memory=memory) as cached:
        got = cached.generate_many(reqs)
        # 2 whole chunks (32 tokens) of SYSTEM are reusable: requests 2-5 and 7 reuse them (shared with a
        # running sequence or kept after one ended); request 1 too if it was admitted after request 0's
        # prefill; request 6 shares less than a chunk.
        stats = cached.stats()
        hits = stats["prefix_cache_hit_tokens"]
        assert 5 * 32 <= hits <= 6 * 32 if blocks is None else 0 < hits <= 6 * 32
        assert [r.cached_tokens for r in got][2:6] == [32] * 4 if blocks is None else stats["blocks_total"] == 11
        again = cached.generate_many(reqs[:1])
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert again[0].token_ids == expected[0].token_ids


def test_many_requests_leave_the_engine_at_baseline(model):
    engine = Engine(model, max_running=4, max_queued=8, prefill_chunk=16)
    baseline = engine.stats()
    reqs = [GenerationRequest(ids(1 + 7 * i % 60, i), 5 + i % 17, SP(temperature=i % 3 * 0.5, seed=i))
            for i in range(40)]  # fmt: skip
    results = engine.generate_many(reqs)  # 40 requests through an 8-deep queue
    assert all(r.finish_reason in ("length", "stop") for r in results)
    refs = []

    async def more():
        streams = [engine.submit(GenerationRequest(ids(10, i), 30)) for i in range(12)]
        refs.extend(weakref.ref(s._seq) for s in streams)
        for s in streams[::3]:
            await anext(s)
            await s.aclose()
        await asyncio.gather(*(collect(s) for s in streams[1::3]))
        del streams

    run(more())
    wait_until(lambda: engine.stats()["running"] == 0)
    stats = engine.stats()
    for key in ("running", "prefilling", "queued", "slots_used"):
        assert stats[key] == 0 == baseline[key]
    assert stats["slots_free"] == baseline["slots_free"] == 4
    assert stats["kv_cache_bytes"] == baseline["kv_cache_bytes"] and stats["blocks_used"] == 0
    assert stats["finished"] + stats["cancelled"] == 52
    assert stats["tokens_generated"] >= sum(r.completion_tokens for r in results)
    assert not engine._prefilling and not engine._waiting and not any(engine._slots)
    gc.collect()
    assert all(ref() is None for ref in refs)  # the engine keeps nothing of finished requests
    engine.shutdown()


def test_library_helpers(model):
    """generate_many on plain prompts (text or ids, more than the queue holds), `await submit`,
    shutdown cancelling what is left."""
    engine = Engine(model, max_running=2, max_queued=1)
    texts = ["Hello world!", "The quick brown fox", "def main():", [5, 6, 7], "Paris"]
    results = engine.generate_many(texts, max_tokens=8, sampling=SP(temperature=0.7, seed=3))
    assert [r.prompt_tokens for r in results] == [len(model.tokenizer.encode(t)) if isinstance(t, str) else 3
                                                  for t in texts]  # fmt: skip
    assert all(r.finish_reason in ("length", "stop") and r.seed == 3 for r in results)
    with pytest.raises(RequestError):
        engine.generate_many(["no max_tokens"])

    async def awaited():
        stream = await engine.submit(GenerationRequest([1, 2, 3], 4, stop_token_ids=()))
        events = await collect(stream)
        assert [e.completion_tokens for e in events] == [1, 2, 3, 4]
        return stream

    assert run(awaited()).seed is not None

    async def interrupted():
        stream = engine.submit(GenerationRequest([1, 2, 3], 200, stop_token_ids=()))
        await anext(stream)
        await asyncio.to_thread(engine.shutdown)
        return await collect(stream)

    assert run(interrupted())[-1].finish_reason == "cancelled"
    with pytest.raises(llmfn.LlmfnError):
        engine.generate_many(["after shutdown"], max_tokens=2)


@pytest.mark.parametrize("hk, g, alibi, window", [(2, 2, False, None), (1, 4, True, None), (4, 1, False, 5)])
def test_batch_invariant_attention_matches_the_kernel_and_ignores_the_batch(hk, g, alibi, window):
    """The decode attention equals kernels.attention, and a row's result is bitwise the same at every
    place in batches of 8 and 16 whatever the other rows hold (the CPU flash kernel's is not)."""
    from llmfn.kernels import attention, batch_invariant_attention
    from llmfn.kernels.reference import alibi_slopes

    S, d = 64, 16
    gen = torch.Generator().manual_seed(0)
    slopes = alibi_slopes(hk * g) if alibi else None
    q1, k1, v1 = (torch.randn(h, 1, d, generator=gen) for h in (hk * g, hk, hk))
    k1, v1 = (torch.randn(hk, S, d, generator=gen) for _ in "kv")
    for rows in (8, 16):
        outs = []
        for p in range(rows):
            q, k, v = (torch.randn(rows, h, n, d, generator=gen) for h, n in ((hk * g, 1), (hk, S), (hk, S)))
            q[p], k[p], v[p] = q1, k1, v1
            pos = torch.randint(0, 48, (rows, 1), generator=gen)
            pos[p] = 40
            out = batch_invariant_attention(q, k, v, pos, d**-0.5, slopes, window)
            expected = attention(q, k, v, pos, d**-0.5, slopes, window)
            assert (out - expected).abs().max().item() < 1e-5
            outs.append(out[p])
            for w in (48, 56):  # fewer slots, still past every position: the same bits
                assert torch.equal(
                    batch_invariant_attention(q, k[:, :, :w], v[:, :, :w], pos, d**-0.5, slopes, window), out
                )
        assert all(torch.equal(outs[0], o) for o in outs)


def test_a_script_that_leaves_its_engine_running_exits_cleanly(model):
    """The step-loop thread is stopped at interpreter exit instead of being killed inside torch."""
    import subprocess
    import sys

    script = (
        "import llmfn\n"
        f"m = llmfn.load({str(model.path)!r})\n"
        "engine = llmfn.Engine(m)\n"
        "print(len(engine.generate_many([[5, 6, 7]], max_tokens=4)))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"
    assert "terminate called" not in done.stderr
