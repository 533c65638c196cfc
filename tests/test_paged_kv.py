"""The paged KV cache: attention through block tables (C kernels and torch reference) equals the
contiguous cache bit for bit, the block pool's accounting, the memory budget, and preemption that
changes nothing in a request's output."""

import asyncio
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmfn
from llmfn.backend import fused_forward
from llmfn.engine import Engine, GenerationRequest
from llmfn.engine.blocks import BlockPool, parse_bytes
from llmfn.errors import LlmfnError
from llmfn.kernels import cpu
from llmfn.kernels import reference as ref
from llmfn.models import llama
from llmfn.sampling import SamplingParams as SP
from tiny import make_checkpoint

needs_c = pytest.mark.skipif(not cpu.available(), reason="needs a C compiler for llmfn's CPU kernels")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("paged-llama")
    make_checkpoint(folder, "llama", max_position_embeddings=512)
    return llmfn.load(folder)


def scatter_into_blocks(contiguous: torch.Tensor, block: int, n_blocks: int, gen: torch.Generator):
    """A contiguous cache [b, hk, S, hd] laid into a pool [n_blocks, hk, block, hd] at random distinct
    blocks: (pool, table [b, S / block] int32)."""
    b, hk, s, hd = contiguous.shape
    nb = s // block
    order = torch.randperm(n_blocks, generator=gen)[: b * nb].view(b, nb).to(torch.int32)
    pool = torch.randn(n_blocks, hk, block, hd, generator=gen)  # junk in the blocks nobody owns
    for i in range(b):
        for j in range(nb):
            pool[order[i, j]] = contiguous[i, :, j * block : (j + 1) * block]
    return pool, order


@needs_c
@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 4), t=st.integers(1, 3), hk=st.sampled_from([1, 2]), g=st.sampled_from([1, 3]),
       block=st.sampled_from([1, 4, 16]), nb=st.integers(1, 12), rope=st.booleans(), seed=st.integers(0, 99))
def test_attention_through_a_block_table_is_the_contiguous_result(b, t, hk, g, block, nb, rope, seed):
    """C and reference alike: the same keys, values and outputs whichever blocks hold them, and the
    C kernel within fp32 rounding of the reference."""
    gen = torch.Generator().manual_seed(seed)
    hd, s = 8, block * nb
    hq, t = hk * g, min(t, block * nb)
    qkv = torch.randn(b, t, (hq + 2 * hk) * hd, generator=gen)
    positions = torch.stack([torch.randperm(s, generator=gen)[:t].sort().values for _ in range(b)])
    cos = sin = None
    if rope:
        angles = torch.rand(b, t, hd // 2, generator=gen) * 6
        cos, sin = angles.cos(), angles.sin()
    k0, v0 = torch.randn(b, hk, s, hd, generator=gen), torch.randn(b, hk, s, hd, generator=gen)
    pool_k, table = scatter_into_blocks(k0, block, b * nb + 3, torch.Generator().manual_seed(seed))
    pool_v, _ = scatter_into_blocks(v0, block, b * nb + 3, torch.Generator().manual_seed(seed))
    args = (hq, hk, hd**-0.5)
    outs = {}
    for name, fn in (("c", cpu.qkv_attention), ("ref", ref.qkv_attention)):
        kc, vc, pk, pv = k0.clone(), v0.clone(), pool_k.clone(), pool_v.clone()
        flat = fn(qkv, cos, sin, None, positions, kc, vc, *args)
        paged = fn(qkv, cos, sin, None, positions, pk, pv, *args, blocks=table)
        assert torch.equal(flat, paged), name
        assert torch.equal(ref.gather_blocks(pk, table), kc) and torch.equal(ref.gather_blocks(pv, table), vc)
        outs[name] = paged
    torch.testing.assert_close(outs["c"], outs["ref"], rtol=1e-5, atol=1e-5)


@needs_c
def test_the_fused_decode_step_reads_block_tables_bitwise(model):
    """The whole forward (the fused C layers for decode-sized steps) through a pool: the logits of a
    prefill and decode steps equal those of a contiguous cache."""
    cfg, params = model.cfg, model.params
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=gen)
    flat = llama.init_cache(cfg, 2, 48)
    pool = llama.init_cache(cfg, 9, 16)  # 2 rows x 3 blocks of 16 in a pool of 9
    paged = pool._replace(blocks=torch.tensor([[7, 2, 5], [1, 8, 3]], dtype=torch.int32))
    for lo, hi in ((0, 33), (33, 34), (34, 35), (35, 40)):  # prefill (C tiled attention), steps of 1 and 5 rows
        pos = torch.arange(lo, hi).expand(2, -1)
        a, flat = fused_forward(params, cfg, tokens[:, lo:hi], pos, flat)
        b, paged = fused_forward(params, cfg, tokens[:, lo:hi], pos, paged)
        assert torch.equal(a, b), (lo, hi)


def test_block_pool_counts_shares_and_evicts_least_recently_used_first():
    pool = BlockPool(5)  # block 0 is scratch: 4 to hand out
    a, b = pool.allocate(), pool.allocate()
    assert (a, b) == (1, 2) and pool.used() == 2 and pool.available() == 2
    pool.register(a, 0, (1, 2))
    pool.register(b, a, (3, 4))
    assert pool.match(0, (1, 2)) == a and pool.refs[a] == 2  # shared: a second reference
    assert pool.match(0, (3, 4)) is None  # the same tokens after another parent are another block
    pool.release([a])
    pool.release([a, b])  # the sequence's blocks, tail first
    assert pool.used() == 0 and pool.cached() == 2 and pool.available() == 4
    c, d = pool.allocate(), pool.allocate()  # the free blocks go first, cached ones are kept
    assert {c, d} == {3, 4} and pool.cached() == 2
    e = pool.allocate()  # then the least recently released cached block: the chain's tail, b
    assert e == b and pool.match(a, (3, 4)) is None and pool.match(0, (1, 2)) == a
    pool.release([a])
    pool.forget([a])  # e.g. after a failed forward: no longer offered, free again
    assert pool.match(0, (1, 2)) is None and pool.allocate() == a
    with pytest.raises(LlmfnError):
        pool.allocate()


def test_memory_sizes_parse_with_units_and_reject_nonsense():
    assert parse_bytes("512MiB") == 512 << 20 and parse_bytes("1.5 GiB") == 3 << 29
    assert parse_bytes(4096) == 4096 and parse_bytes("800MB") == 800 * 10**6 and parse_bytes("64kib") == 64 << 10
    for bad in ("lots", "-1GiB", "12 parsecs", 0, True, "0"):
        with pytest.raises(LlmfnError, match="kv_cache_memory"):
            parse_bytes(bad)


def test_the_budget_sets_the_pool_and_caps_the_context(model):
    per_token = llama.kv_bytes_per_token(model.cfg, torch.float32)
    engine = Engine(model, kv_cache_memory=20 * 16 * per_token, prefill_chunk=16)
    stats = engine.stats()
    assert stats["blocks_total"] == 19 and stats["max_model_len"] == 19 * 16  # one block is scratch
    assert stats["kv_cache_bytes"] == 20 * 16 * per_token
    with pytest.raises(LlmfnError, match="too few"):
        Engine(model, kv_cache_memory=per_token)
    with pytest.raises(LlmfnError, match="max_model_len"):
        Engine(model, max_model_len=10_000)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_resident_memory_follows_the_blocks_in_use(model):
    """A 1 GiB pool costs next to nothing until blocks are written, and only what they hold after."""
    before = rss()
    engine = Engine(model, kv_cache_memory="1GiB", prefill_chunk=16)
    assert rss() - before < 64 << 20
    engine.generate_many([list(range(3, 60))], max_tokens=8)
    assert rss() - before < 128 << 20
    engine.shutdown()


def long_requests() -> list[GenerationRequest]:
    settings = [SP(), SP(temperature=0.9, seed=3), SP(repetition_penalty=1.3),
                SP(temperature=1.1, top_k=30, presence_penalty=0.5, frequency_penalty=0.4, seed=9)]  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    return [
        GenerationRequest(torch.randint(3, 384, (20 + 7 * i,), generator=gen).tolist(), 70 + 5 * i,
                          settings[i % 4], stop_token_ids=())  # fmt: skip
        for i in range(16)
    ]


def test_preempted_requests_finish_with_the_output_they_would_have_had(model):
    """16 long generations in a pool far too small for them all: the youngest are preempted (freed,
    queued again, replayed) and every request's tokens equal its solo run's."""
    per_token = llama.kv_bytes_per_token(model.cfg, torch.float32)
    memory = 48 * 16 * per_token  # 47 usable blocks of 16; the 16 requests need ~120 at once
    reqs = long_requests()
    with Engine(model, max_running=8, kv_cache_memory=memory, prefill_chunk=16) as engine:
        together = engine.generate_many(reqs)
        stats = engine.stats()
    print(f"preemptions: {stats['preemptions']}")
    assert stats["preemptions"] >= 4 and stats["blocks_used"] == 0
    for i, req in enumerate(reqs):
        with Engine(model, max_running=1, kv_cache_memory=memory, prefill_chunk=16) as solo:
            [alone] = solo.generate_many([req])
            assert solo.stats()["preemptions"] == 0
        assert together[i].token_ids == alone.token_ids, f"request {i}"
        assert together[i].finish_reason == "length" and together[i].completion_tokens == req.max_tokens


def test_streams_report_cached_prompt_tokens(model):
    prompt = list(range(3, 3 + 40))

    async def main():
        with Engine(model, prefill_chunk=16) as engine:
            first = [e async for e in engine.submit(GenerationRequest(prompt, 3))]
            second = [e async for e in engine.submit(GenerationRequest(prompt + [7], 3))]
            return first, second

    first, second = asyncio.run(main())
    assert {e.cached_tokens for e in first} == {0}
    assert {e.cached_tokens for e in second} == {32}  # two whole chunks of 16
    assert [t for e in first for t in e.token_ids] != [] and second[-1].completion_tokens == 3


def test_thirty_two_concurrent_streams_are_all_served_by_default(model):
    """The default limits (16 decoding, 64 queued) take 32 concurrent streams without refusing one."""

    async def main():
        with Engine(model, prefill_chunk=16) as engine:
            streams = [engine.submit(GenerationRequest(list(range(3, 13 + i)), 16, stop_token_ids=()))
                       for i in range(32)]  # fmt: skip
            assert engine.stats()["running"] <= 16

            async def collect(stream):
                return [e async for e in stream]

            return await asyncio.gather(*(collect(s) for s in streams))

    results = asyncio.run(main())
    assert all(r[-1].finish_reason == "length" and r[-1].completion_tokens == 16 for r in results)


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_quantized_models_are_batch_invariant_in_the_engine(tmp_path, method):
    """Compact decode steps (only the busy rows) on the quantized C kernels: together == alone."""
    make_checkpoint(tmp_path, "llama", max_position_embeddings=256)
    model = llmfn.load(tmp_path, quantize=method)
    reqs = long_requests()[:8]
    reqs = [GenerationRequest(r.prompt_ids, 24, r.sampling, stop_token_ids=()) for r in reqs]
    with Engine(model, max_running=8, prefill_chunk=16) as engine:
        assert engine.compact
        together = engine.generate_many(reqs)
    with Engine(model, max_running=1, prefill_chunk=16) as engine:
        alone = engine.generate_many(reqs)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
