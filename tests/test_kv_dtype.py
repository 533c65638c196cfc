"""A 16-bit KV cache (bf16 / fp16) under fp32 math: keys and values are rounded to nearest even once,
when written, and read back widened, by the C kernels, the fused layers, the torch reference and the
Triton kernels alike; the engine keeps batch invariance, preemption and prefix reuse exact with it,
and the same memory holds twice the blocks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmfn
from llmfn.backend import fused_forward
from llmfn.cli import commands as cli
from llmfn.engine import Engine, GenerationRequest
from llmfn.engine.paged import pool_dtype
from llmfn.errors import LlmfnError
from llmfn.kernels import cpu
from llmfn.kernels import reference as ref
from llmfn.models import llama
from llmfn.sampling import SamplingParams as SP
from llmfn.serve.config import load_config
from tiny import make_checkpoint

needs_c = pytest.mark.skipif(not cpu.available(), reason="needs a C compiler for llmfn's CPU kernels")
HALF = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kv16-llama")
    make_checkpoint(folder, "llama", max_position_embeddings=512)
    return llmfn.load(folder)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def paged_case(gen: torch.Generator, dtype, b: int, t: int, hk: int, g: int, hd: int, block: int, nb: int):
    """qkv for b rows of t new positions each, cos / sin, and a pool of 16-bit blocks with a table."""
    hq, s = hk * g, block * nb
    qkv = torch.randn(b, t, (hq + 2 * hk) * hd, generator=gen)
    positions = torch.stack([torch.randperm(s, generator=gen)[:t].sort().values for _ in range(b)])
    angles = torch.rand(b, t, hd // 2, generator=gen) * 6
    n = b * nb + 3
    pool = torch.randn(2, n, hk, block, hd, generator=gen).to(dtype)
    table = torch.randperm(n, generator=gen)[: b * nb].view(b, nb).to(torch.int32)
    return qkv, angles.cos(), angles.sin(), positions, pool, table, (hq, hk, hd**-0.5)


@needs_c
@pytest.mark.parametrize("dtype", HALF)
def test_the_c_kernel_writes_round_to_nearest_even_exactly_as_torch(dtype):
    """Keys and values the C kernel stores are torch's `.to(dtype)` of them, bit for bit, at ties,
    denormals (of fp32 and of the 16-bit type), overflow, infinities and signed zeros."""
    hk, hd = 1, 24
    info = torch.finfo(dtype)
    specials = [1e-40, -1e-40, info.tiny / 3, -info.tiny * 0.75, info.max * 1.01, -info.max * 2, float("inf"),
                -float("inf"), 0.0, -0.0, 1 + info.eps / 2, 1 + 1.5 * info.eps, -(1 + info.eps / 2), 3e38, 65519.0,
                65520.0, 1.00390625, 1.01171875]  # fmt: skip
    values = torch.tensor(specials + [0.0] * (2 * hd - len(specials)))
    noise = torch.randn(2 * hd, generator=torch.Generator().manual_seed(1)) * 1e-3
    for v in (values, values + noise, noise * 1e-36):
        qkv = torch.cat([torch.zeros(hd), v])[None, None]  # [1, 1, 3 * hd]: q, then the specials as k and v
        caches = {}
        for name, fn in (("c", cpu.qkv_attention), ("ref", ref.qkv_attention)):
            cache = torch.zeros(2, 1, hk, 4, hd, dtype=dtype)
            fn(qkv, None, None, None, torch.tensor([[2]]), cache[0], cache[1], 1, hk, 1.0)
            caches[name] = cache
        assert torch.equal(bits(caches["c"]), bits(caches["ref"]))
        assert torch.equal(bits(caches["c"][:, 0, 0, 2].flatten()), bits(v.to(dtype)))


@needs_c
@pytest.mark.parametrize("dtype", HALF)
@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 3), hk=st.sampled_from([1, 2]), g=st.sampled_from([1, 3]),
       hd=st.sampled_from([8, 12, 64, 128]), block=st.sampled_from([1, 4, 16]), nb=st.integers(1, 4),
       seed=st.integers(0, 999))  # fmt: skip
def test_c_attention_over_a_16bit_cache_is_the_fp32_attention_over_its_values(dtype, b, t, hk, g, hd, block, nb,
                                                                            seed):  # fmt: skip
    """The C kernel over a 16-bit pool: the cache it writes is the reference's bit for bit, its output
    within fp32 rounding of the reference's (different summation orders, as for an fp32 cache), and
    exactly the C kernel's over an fp32 cache holding the same values (widening is exact)."""
    gen = torch.Generator().manual_seed(seed)
    t = min(t, block * nb)
    qkv, cos, sin, positions, pool, table, args = paged_case(gen, dtype, b, t, hk, g, hd, block, nb)
    c_pool, ref_pool = pool.clone(), pool.clone()
    out = cpu.qkv_attention(qkv, cos, sin, None, positions, c_pool[0], c_pool[1], *args, blocks=table)
    want = ref.qkv_attention(qkv, cos, sin, None, positions, ref_pool[0], ref_pool[1], *args, blocks=table)
    assert torch.equal(bits(c_pool), bits(ref_pool))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # Rope off and k / v already representable: the 16-bit and fp32 caches then hold the same numbers.
    hq = args[0]
    qkv[..., hq * hd :] = qkv[..., hq * hd :].to(dtype).float()
    half_pool, fp32_pool = pool.clone(), pool.float()
    half = cpu.qkv_attention(qkv, None, None, None, positions, half_pool[0], half_pool[1], *args, blocks=table)
    full = cpu.qkv_attention(qkv, None, None, None, positions, fp32_pool[0], fp32_pool[1], *args, blocks=table)
    assert torch.equal(half, full) and torch.equal(half_pool.float(), fp32_pool)


@needs_c
@pytest.mark.parametrize("dtype", HALF)
def test_the_fused_layers_over_a_16bit_pool_are_bitwise_the_op_by_op_path(model, dtype, monkeypatch):
    """The fused C decode step and the model's own layers (C ops per op) over bf16 / fp16 pools: the
    same logits and caches, through block tables and a 33-position prefill (torch's linears, the C
    tiled attention) then decode steps (C)."""
    cfg, params = model.cfg, model.params
    calls = {"decoder_layers": 0, "qkv_attention": 0}

    def counting(name):
        fn = getattr(cpu, name)

        def counted(*args, **kw):
            calls[name] += 1
            return fn(*args, **kw)

        return counted

    for name in calls:
        monkeypatch.setattr(cpu, name, counting(name))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=gen)
    table = torch.tensor([[7, 2, 5], [1, 8, 3]], dtype=torch.int32)
    fused = llama.init_cache(cfg, 9, 16, dtype)._replace(blocks=table)
    plain = llama.init_cache(cfg, 9, 16, dtype)._replace(blocks=table)
    for lo, hi in ((0, 33), (33, 34), (34, 35), (35, 40)):
        pos = torch.arange(lo, hi).expand(2, -1)
        a, fused = fused_forward(params, cfg, tokens[:, lo:hi], pos, fused)
        b, plain = llama.forward(params, cfg, tokens[:, lo:hi], pos, plain)
        assert torch.equal(a, b), (lo, hi)
    assert torch.equal(bits(fused.k), bits(plain.k)) and torch.equal(bits(fused.v), bits(plain.v))
    assert fused.k.dtype == dtype and bool(fused.k.float().abs().sum() > 0)
    # the decode steps took the C paths (fused: decoder_layers; plain: qkv_attention), and both prefills
    # the tiled attention
    assert calls == {"decoder_layers": 3, "qkv_attention": (3 + 2) * cfg.num_layers}


def requests(n: int, max_tokens: int) -> list[GenerationRequest]:
    settings = [SP(), SP(temperature=0.9, seed=3), SP(repetition_penalty=1.3), SP(temperature=1.1, top_k=30, seed=9)]
    gen = torch.Generator().manual_seed(5)
    return [GenerationRequest(torch.randint(3, 384, (20 + 7 * i,), generator=gen).tolist(), max_tokens + 3 * i,
                              settings[i % 4], stop_token_ids=()) for i in range(n)]  # fmt: skip


@needs_c
@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_a_16bit_cache_keeps_requests_batch_invariant_through_preemption_and_prefix_reuse(model, name):
    """With a 16-bit pool: requests together (compact C decode steps, preemptions in a small pool)
    give exactly their solo outputs, a prompt whose prefix is cached gives a cold server's answer,
    and the same memory holds twice the fp32 pool's blocks."""
    per_token = llama.kv_bytes_per_token(model.cfg, torch.bfloat16)
    memory = 40 * 16 * per_token
    reqs = requests(8, 40)
    with Engine(model, max_running=8, kv_cache_memory=memory, prefill_chunk=16, kv_cache_dtype=name) as e:
        assert e.compact  # decode steps of only the busy rows, on the C kernels
        together = e.generate_many(reqs)
        stats = e.stats()
    assert stats["preemptions"] >= 1 and stats["kv_cache_dtype"] == name and stats["blocks_total"] == 39
    with Engine(model, max_running=1, kv_cache_memory=memory, prefill_chunk=16, kv_cache_dtype=name) as solo:
        alone = solo.generate_many(reqs)  # one at a time; each later prompt may reuse cached prefixes
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    prompt = reqs[3].prompt_ids
    with Engine(model, prefill_chunk=16, kv_cache_dtype=name) as e:
        [cold] = e.generate_many([prompt], max_tokens=12)
        [warm] = e.generate_many([prompt], max_tokens=12)
        assert warm.cached_tokens >= 32 and warm.token_ids == cold.token_ids
    fp32 = Engine(model, kv_cache_memory=memory)
    assert fp32.stats()["blocks_total"] + 1 == (stats["blocks_total"] + 1) // 2 and fp32.stats()["kv_cache_dtype"] == "float32"
    fp32.shutdown()


def test_kv_cache_dtype_names_and_the_models_it_applies_to():
    assert pool_dtype(None, torch.float32) == torch.float32 and pool_dtype(None, torch.bfloat16) == torch.bfloat16
    assert pool_dtype("bf16", torch.float32) == torch.bfloat16 and pool_dtype("float16", torch.float32) == torch.float16
    assert pool_dtype(torch.float16, torch.float32) == torch.float16
    with pytest.raises(LlmfnError, match="kv_cache_dtype must be one of"):
        pool_dtype("int8", torch.float32)
    with pytest.raises(LlmfnError, match="fp32 models"):
        pool_dtype("float16", torch.bfloat16)


def test_the_server_config_and_cli_set_the_kv_cache_dtype(tmp_path):
    file = tmp_path / "llmfn.toml"
    file.write_text('[limits]\nkv_cache_dtype = "bfloat16"\n')
    assert load_config(file).limits.kv_cache_dtype == "bfloat16"
    file.write_text('[limits]\nkv_cache_dtype = "int3"\n')
    with pytest.raises(LlmfnError, match="limits.kv_cache_dtype"):
        load_config(file)
    config = cli.serve_overrides(load_config(None), None, None, kv_cache_memory="64MiB", kv_cache_dtype="float16")
    assert (config.limits.kv_cache_dtype, config.limits.kv_cache_memory) == ("float16", "64MiB")


@pytest.mark.parametrize("dtype", HALF)
def test_triton_attention_reads_a_16bit_pool_as_its_widened_values(dtype):
    """The Triton kernels (interpreted on CPU) over a bf16 / fp16 pool with fp32 queries: exactly
    what they give over the fp32 pool of the same values (keys and values widened on load)."""
    triton_attention = pytest.importorskip("llmfn.kernels.triton_attention", reason="needs triton")
    gen = torch.Generator().manual_seed(3)
    b, hk, group, block, nb, s, dim = 2, 2, 2, 4, 3, 3, 16
    pool_k = torch.randn(b * nb + 2, hk, block, dim, generator=gen).to(dtype)
    pool_v = torch.randn(b * nb + 2, hk, block, dim, generator=gen).to(dtype)
    table = torch.randperm(b * nb + 2, generator=gen)[: b * nb].view(b, nb).to(torch.int32)
    t = block * nb
    pos = (t - s + torch.arange(s))[None].expand(b, -1).contiguous()
    q = torch.randn(b, hk * group, s, dim, generator=gen)
    for run, qq, pp in ((triton_attention.prefill, q, pos), (triton_attention.decode, q[:, :, -1:], pos[:, -1:])):
        half = run(qq, pool_k, pool_v, pp, dim**-0.5, None, None, blocks=table)
        full = run(qq, pool_k.float(), pool_v.float(), pp, dim**-0.5, None, None, blocks=table)
        assert half.dtype == torch.float32 and torch.equal(half, full)
