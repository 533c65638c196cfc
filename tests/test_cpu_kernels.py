"""The C CPU kernels (llmfn.kernels.cpu) against their torch references, shapes from hypothesis.

The same rule as the Triton tests: max|c - ref64| <= 2 * max|torch_fp32 - ref64| + eps, where ref64
is the reference in fp64. Plus what the engine relies on: a row's result is bitwise the same alone
and inside any batch, and out-of-range positions raise without writing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmfn import cbuild
from llmfn.kernels import cpu, ops
from llmfn.kernels import reference as ref

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C compiler to build the CPU kernels")
EXAMPLES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def assert_rule(out: torch.Tensor, fp32: torch.Tensor, fp64: torch.Tensor, eps: float = 1e-5) -> None:
    assert out.shape == fp64.shape and out.dtype == torch.float32
    err = (out.double() - fp64).abs().max().item() if out.numel() else 0.0
    base = (fp32.double() - fp64).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * base + eps, f"C kernel error {err:.3g} > 2 * torch error {base:.3g} + {eps:g}"


@EXAMPLES
@given(m=st.integers(1, cpu.MAX_ROWS), n=st.integers(1, 70), k=st.integers(1, 90), bias=st.booleans(),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_linear_matches_f_linear(m, n, k, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x, w = randn(g, m, k), randn(g, n, k)
    b = randn(g, n) if bias else None
    out = cpu.linear(x, w, b)
    assert_rule(out, F.linear(x, w, b), F.linear(x.double(), w.double(), None if b is None else b.double()))


@EXAMPLES
@given(m=st.integers(2, cpu.MAX_ROWS), n=st.integers(1, 40), k=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_linear_rows_are_batch_invariant(m, n, k, seed):
    """Row i of a batch is bitwise row i computed alone, wherever it sits and whatever its neighbours."""
    g = torch.Generator().manual_seed(seed)
    x, w = randn(g, m, k), randn(g, n, k)
    out = cpu.linear(x, w)
    for i in range(m):
        assert torch.equal(out[i : i + 1], cpu.linear(x[i : i + 1], w))
    assert torch.equal(cpu.linear(x.flip(0), w), out.flip(0))


def test_linear_takes_leading_dims_and_linear_dispatch():
    g = torch.Generator().manual_seed(0)
    x, w, b = randn(g, 2, 3, 24), randn(g, 10, 24), randn(g, 10)
    assert torch.allclose(cpu.linear(x, w, b), F.linear(x, w, b), atol=1e-5)
    assert cpu.takes(x, w) and not cpu.takes(randn(g, cpu.MAX_ROWS + 1, 24), w)
    assert not cpu.takes(x.bfloat16(), w) and not cpu.takes(x, w.requires_grad_())


@EXAMPLES
@given(m=st.integers(1, cpu.MAX_ROWS), d=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_rms_norm_matches_reference(m, d, seed):
    g = torch.Generator().manual_seed(seed)
    x, w = randn(g, m, d) * 3, randn(g, d)
    assert_rule(cpu.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), ref.rms_norm(x.double(), w.double(), 1e-6))


@EXAMPLES
@given(m=st.integers(1, 40), f=st.integers(1, 200), scale=st.sampled_from([1.0, 4.0, 30.0]), seed=st.integers(0, 2**16))
def test_silu_mul_matches_reference(m, f, scale, seed):
    """Rows of any length: groups of 8 take the vector exp, the rest the scalar one."""
    g = torch.Generator().manual_seed(seed)
    gu = randn(g, m, 2 * f) * scale
    assert_rule(cpu.silu_mul(gu), ref.silu_mul(gu), ref.silu_mul(gu.double()))


def test_silu_mul_at_the_ends_of_the_float_range():
    gate = torch.tensor([-1e4, -200.0, -88.5, -87.0, -20.0, 0.0, 20.0, 87.0, 88.5, 200.0, 1e4, 3.0, -3.0, 1e-30,
                         -1e-30, 50.0])  # fmt: skip
    gu = torch.cat([gate, torch.full_like(gate, 2.0)])[None]
    out = cpu.silu_mul(gu)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref.silu_mul(gu), rtol=1e-6, atol=1e-30)


def attention_case(data, g, longest: int = 40):
    """A random qkv_attention call: rows at different positions of a (maybe strided) cache of at most
    `longest` positions."""
    b = data.draw(st.integers(1, 3))
    t = data.draw(st.integers(1, 4))
    hk = data.draw(st.integers(1, 3))
    hq = hk * data.draw(st.integers(1, 3))
    hd = data.draw(st.one_of(st.integers(1, 12).map(lambda n: 2 * n), st.sampled_from([64, 128])))  # 64, 128: own paths
    s = data.draw(st.integers(t, longest))
    starts = [data.draw(st.integers(0, s - t)) for _ in range(b)]
    positions = torch.tensor([[p + i for i in range(t)] for p in starts])  # [b, t]
    qkv = randn(g, b, t, (hq + 2 * hk) * hd)
    rope = data.draw(st.booleans())
    freqs = positions[..., None].float() * (1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd))
    cos, sin = (freqs.cos(), freqs.sin()) if rope else (None, None)
    q_scale = (1 + torch.rand(b, t, 1, 1, generator=g)) if data.draw(st.booleans()) else None
    slopes = ref.alibi_slopes(hq) if data.draw(st.booleans()) else None
    window = data.draw(st.sampled_from([None, 1, 3, 8, longest // 3]))
    extra = data.draw(st.integers(0, 5))  # a view of the first s slots of longer rows, as the engine passes
    cache = randn(g, 2, b, hk, s + extra, hd)[..., :s, :]
    args = (qkv, cos, sin, q_scale, positions)
    kw = dict(num_heads=hq, num_kv_heads=hk, scale=hd**-0.5, alibi_slopes=slopes, window=window)
    return args, cache, kw


def as_double(t):
    return None if t is None else t.double()


@EXAMPLES
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_qkv_attention_matches_reference(data, seed):
    """Output and the cache writes against split + rope + index writes + SDPA, in fp32 and fp64."""
    g = torch.Generator().manual_seed(seed)
    (qkv, cos, sin, q_scale, positions), cache, kw = attention_case(data, g)
    c_cache, f_cache, d_cache = cache.clone(), cache.clone(), cache.double()
    out = cpu.qkv_attention(qkv, cos, sin, q_scale, positions, c_cache[0], c_cache[1], **kw)
    fp32 = ref.qkv_attention(qkv, cos, sin, q_scale, positions, f_cache[0], f_cache[1], **kw)
    fp64 = ref.qkv_attention(qkv.double(), as_double(cos), as_double(sin), as_double(q_scale), positions,
                             d_cache[0], d_cache[1], **kw)  # fmt: skip
    assert_rule(out, fp32, fp64)
    assert_rule(c_cache, f_cache, d_cache)


@EXAMPLES
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_qkv_attention_rows_are_batch_invariant(data, seed):
    g = torch.Generator().manual_seed(seed)
    (qkv, cos, sin, q_scale, positions), cache, kw = attention_case(data, g)
    joint = cache.clone()
    out = cpu.qkv_attention(qkv, cos, sin, q_scale, positions, joint[0], joint[1], **kw)
    for i in range(qkv.shape[0]):
        alone = cache[:, i : i + 1].clone()
        pick = [None if a is None else a[i : i + 1] for a in (qkv, cos, sin, q_scale, positions)]
        assert torch.equal(out[i : i + 1], cpu.qkv_attention(*pick, alone[0], alone[1], **kw))
        assert torch.equal(alone, joint[:, i : i + 1])


@EXAMPLES
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_qkv_attention_rows_are_the_same_on_any_number_of_threads(data, seed):
    """How many query heads a task takes, and which thread runs it, follows the rows and the threads
    (csrc/attend_rows.h heads_per_task, share_tasks); a head's bits do not: decode falls back to one
    thread under load (kernels/cpu.py DecodeThreads) in the middle of a generation."""
    g = torch.Generator().manual_seed(seed)
    (qkv, cos, sin, q_scale, positions), cache, kw = attention_case(data, g)
    many, one = cache.clone(), cache.clone()
    out = cpu.qkv_attention(qkv, cos, sin, q_scale, positions, many[0], many[1], **kw)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = cpu.qkv_attention(qkv, cos, sin, q_scale, positions, one[0], one[1], **kw)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out, alone) and torch.equal(many, one)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_rows_past_a_key_chunk_attend_chunk_by_chunk_as_the_reference(data, seed):
    """Rows whose visible keys reach past csrc/attend_rows.h's SPLIT_KEYS (512) positions attend chunk by
    chunk and merge the chunks: within the rule of the fp32 / fp64 references, and with the same bits
    on one thread or many and beside other rows or alone."""
    g = torch.Generator().manual_seed(seed)
    (qkv, cos, sin, q_scale, positions), cache, kw = attention_case(data, g, longest=1600)
    c_cache, f_cache, d_cache, one = cache.clone(), cache.clone(), cache.double(), cache.clone()
    out = cpu.qkv_attention(qkv, cos, sin, q_scale, positions, c_cache[0], c_cache[1], **kw)
    fp32 = ref.qkv_attention(qkv, cos, sin, q_scale, positions, f_cache[0], f_cache[1], **kw)
    fp64 = ref.qkv_attention(qkv.double(), as_double(cos), as_double(sin), as_double(q_scale), positions,
                             d_cache[0], d_cache[1], **kw)  # fmt: skip
    assert_rule(out, fp32, fp64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(out, cpu.qkv_attention(qkv, cos, sin, q_scale, positions, one[0], one[1], **kw))
    finally:
        torch.set_num_threads(threads)
    for i in range(qkv.shape[0]):
        alone = cache[:, i : i + 1].clone()
        pick = [None if a is None else a[i : i + 1] for a in (qkv, cos, sin, q_scale, positions)]
        assert torch.equal(out[i : i + 1], cpu.qkv_attention(*pick, alone[0], alone[1], **kw))


def prompt_chunk_case(data, g):
    """A qkv_attention call over prompt chunks long enough for the tiles (cpu.TILED_ROWS positions or
    more): b sequences, each from its own start, their blocks in random order in a pool of fp32 or
    16-bit blocks (or each row's own cache, no table, a view of its first slots). Returns the call's
    arguments, the pool [2, N, hk, S + extra, hd] (K and V), S and the keywords."""
    b = data.draw(st.integers(1, 2))
    t = data.draw(st.integers(cpu.TILED_ROWS, cpu.TILED_ROWS + 30))
    hk = data.draw(st.integers(1, 2))
    hq = hk * data.draw(st.integers(1, 3))
    hd = data.draw(st.one_of(st.integers(1, 12).map(lambda n: 2 * n), st.sampled_from([64, 128])))
    bs = data.draw(st.sampled_from([1, 5, 16]))
    starts = [data.draw(st.integers(0, 40)) for _ in range(b)]
    nb = -(-(max(starts) + t) // bs)
    table = torch.randperm(b * nb + 2, generator=g)[: b * nb].view(b, nb).int()
    positions = torch.tensor([[p + i for i in range(t)] for p in starts])  # [b, t]
    qkv = randn(g, b, t, (hq + 2 * hk) * hd)
    freqs = positions[..., None].float() * (1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd))
    cos, sin = (freqs.cos(), freqs.sin()) if data.draw(st.booleans()) else (None, None)
    q_scale = (1 + torch.rand(b, t, 1, 1, generator=g)) if data.draw(st.booleans()) else None
    slopes = ref.alibi_slopes(hq) if data.draw(st.booleans()) else None
    window = data.draw(st.sampled_from([None, 1, 7, 40]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16]))
    pool, slots = randn(g, 2, b * nb + 2, hk, bs, hd).to(dtype), bs
    if data.draw(st.booleans()):  # no table: row i's cache is block i, the first slots of a longer row
        pool, slots, table = randn(g, 2, b, hk, nb * bs + 3, hd).to(dtype), nb * bs, None
    kw = dict(num_heads=hq, num_kv_heads=hk, scale=hd**-0.5, alibi_slopes=slopes, window=window, blocks=table)
    return (qkv, cos, sin, q_scale, positions), pool, slots, kw


@EXAMPLES
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_prompt_chunks_attend_in_tiles_as_the_reference(data, seed):
    """Chunks of TILED_ROWS positions or more (csrc/attend.h's tiles) against split + rope + index
    writes + SDPA over the gathered blocks: in fp32 and fp64 over an fp32 pool, and against the fp32
    reference over a 16-bit one; the cache writes are the reference's bit for bit."""
    g = torch.Generator().manual_seed(seed)
    (qkv, cos, sin, q_scale, positions), pool, slots, kw = prompt_chunk_case(data, g)
    c_pool, f_pool = pool.clone(), pool.clone()
    out = cpu.qkv_attention(qkv, cos, sin, q_scale, positions, *c_pool[..., :slots, :], **kw)
    fp32 = ref.qkv_attention(qkv, cos, sin, q_scale, positions, *f_pool[..., :slots, :], **kw)
    assert torch.equal(c_pool, f_pool)
    if pool.dtype == torch.float32:
        d_pool = pool.double()
        fp64 = ref.qkv_attention(qkv.double(), as_double(cos), as_double(sin), as_double(q_scale), positions,
                                 *d_pool[..., :slots, :], **kw)  # fmt: skip
        assert_rule(out, fp32, fp64)
    else:
        torch.testing.assert_close(out, fp32, rtol=1e-5, atol=2e-5)


@EXAMPLES
@given(data=st.data(), cut=st.integers(1, 60), seed=st.integers(0, 2**16))
def test_a_prompt_row_attends_the_same_in_any_chunk(data, cut, seed):
    """A row's attention depends on its query and the cache only: the same rows cut into two calls
    (the second of TILED_ROWS rows or more; the first in tiles or row by row) give the whole call's
    bits, and so does each sequence alone."""
    g = torch.Generator().manual_seed(seed)
    (qkv, cos, sin, q_scale, positions), pool, slots, kw = prompt_chunk_case(data, g)
    t = qkv.shape[1]
    cut = min(cut, t - cpu.TILED_ROWS)
    whole = pool.clone()
    out = cpu.qkv_attention(qkv, cos, sin, q_scale, positions, *whole[..., :slots, :], **kw)
    parts = pool.clone()
    pieces = [
        cpu.qkv_attention(*[None if a is None else a[:, lo:hi] for a in (qkv, cos, sin, q_scale, positions)],
                          *parts[..., :slots, :], **kw)
        for lo, hi in ((0, cut), (cut, t)) if hi > lo
    ]  # fmt: skip
    assert torch.equal(parts, whole)
    assert torch.equal(torch.cat(pieces, 1)[:, cut if cut < cpu.TILED_ROWS else 0 :],
                       out[:, cut if cut < cpu.TILED_ROWS else 0 :])  # fmt: skip
    for i in range(qkv.shape[0]):
        alone = pool.clone()
        pick = [None if a is None else a[i : i + 1] for a in (qkv, cos, sin, q_scale, positions)]
        if kw["blocks"] is None:  # row i's own cache
            alone, kw_i = pool[:, i : i + 1].clone(), kw
        else:
            kw_i = {**kw, "blocks": kw["blocks"][i : i + 1]}
        assert torch.equal(out[i : i + 1], cpu.qkv_attention(*pick, *alone[..., :slots, :], **kw_i))


def test_prompt_chunks_take_the_c_attention_and_decode_sized_steps_too():
    """ops.qkv_attention's choice: up to MAX_ROWS rows, or chunks of TILED_ROWS positions or more, in
    C; wider steps of few positions each (an engine step over many rows) in torch."""
    g = torch.Generator().manual_seed(0)
    take = lambda b, t: cpu.takes_qkv_attention(randn(g, b, t, 24))  # noqa: E731
    assert take(1, 1) and take(cpu.MAX_ROWS, 1) and take(1, cpu.TILED_ROWS) and take(3, 5 * cpu.TILED_ROWS)
    assert not take(cpu.MAX_ROWS + 1, 1) and not take(2, cpu.TILED_ROWS - 1)
    assert cpu.library().llmfn_tiled_rows() == cpu.TILED_ROWS  # the C side picks the tiles at the same length


def test_qkv_attention_rejects_positions_outside_the_cache_and_writes_nothing():
    g = torch.Generator().manual_seed(0)
    cache = randn(g, 2, 1, 1, 4, 8)
    before = cache.clone()
    qkv = randn(g, 1, 1, 3 * 8)
    for p in (4, -1):
        with pytest.raises(IndexError, match="KV cache length"):
            cpu.qkv_attention(qkv, None, None, None, torch.tensor([[p]]), cache[0], cache[1], num_heads=1,
                              num_kv_heads=1, scale=1.0)  # fmt: skip
    assert torch.equal(cache, before)


def test_ops_take_the_c_path_for_decode_and_the_reference_for_long_inputs(monkeypatch):
    """Matrix products take the C kernel up to MAX_ROWS rows only, row-wise ops for any number of
    fp32 rows, neither for other dtypes (a counted call proves the choice)."""
    from llmfn.kernels.linear import linear

    calls = []
    monkeypatch.setattr(cpu, "rms_norm", lambda *a: calls.append("norm") or ref.rms_norm(*a))
    monkeypatch.setattr(cpu, "linear", lambda *a: calls.append("linear") or F.linear(*a))
    g = torch.Generator().manual_seed(0)
    w, m = randn(g, 8), randn(g, 4, 8)
    ops.rms_norm(randn(g, 1, 8), w, 1e-6)
    ops.rms_norm(randn(g, cpu.MAX_ROWS + 1, 8), w, 1e-6)
    ops.rms_norm(randn(g, 1, 8).double(), w.double(), 1e-6)
    linear(randn(g, cpu.MAX_ROWS, 8), m)
    linear(randn(g, cpu.MAX_ROWS + 1, 8), m)
    linear(randn(g, 1, 8).double(), m.double())
    assert calls == ["norm", "norm", "linear"]


@EXAMPLES
@given(b=st.integers(1, 2), t=st.integers(1, 24), hk=st.integers(1, 2), group=st.integers(1, 3),
       extra=st.integers(0, 9), from_zero=st.booleans(), seed=st.integers(0, 2**16))  # fmt: skip
def test_cpu_attention_over_used_slots_matches_reference(b, t, hk, group, extra, from_zero, seed):
    """ops.attention on CPU reads only the slots up to the last position, and takes SDPA's causal
    kernel for a prompt from position 0: same result as the reference over the whole cache."""
    g = torch.Generator().manual_seed(seed)
    hd, hq = 8, hk * group
    starts = [0] * b if from_zero else [int(torch.randint(0, 6, (1,), generator=g)) for _ in range(b)]
    positions = torch.tensor([[p + i for i in range(t)] for p in starts])
    s = int(positions.max()) + 1 + extra
    q, k, v = randn(g, b, hq, t, hd), randn(g, b, hk, s, hd), randn(g, b, hk, s, hd)
    out = ops.attention(q, k, v, positions, hd**-0.5)
    fp32 = ref.attention(q, k, v, positions, hd**-0.5)
    fp64 = ref.attention(q.double(), k.double(), v.double(), positions, hd**-0.5)
    assert_rule(out, fp32, fp64)


def test_linear_above_max_rows_matches_f_linear():
    """Prefill-sized fp32 inputs take oneDNN's linear (llmfn.kernels.linear): F.linear's result to fp32 rounding."""
    from llmfn.kernels.linear import linear

    g = torch.Generator().manual_seed(0)
    x, w, b = randn(g, 3, 40, 64), randn(g, 96, 64), randn(g, 96)
    expected = F.linear(x.double(), w.double(), b.double())
    assert_rule(linear(x, w, b), F.linear(x, w, b), expected)
    assert_rule(linear(x[:, ::2], w), F.linear(x[:, ::2], w), F.linear(x[:, ::2].double(), w.double()))


def test_shape_mismatches_are_errors_not_memory_reads():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="linear: shapes"):
        cpu.linear(randn(g, 1, 8), randn(g, 4, 9))
    with pytest.raises(ValueError, match="rms_norm: shapes"):
        cpu.rms_norm(randn(g, 1, 8), randn(g, 7), 1e-6)
    cache = randn(g, 2, 1, 1, 4, 8)
    with pytest.raises(ValueError, match="qkv_attention: shapes"):
        cpu.qkv_attention(randn(g, 1, 1, 2 * 8), None, None, None, torch.tensor([[0]]), cache[0], cache[1],
                          num_heads=1, num_kv_heads=1, scale=1.0)  # fmt: skip


# The best level runs in this process; each lower one this CPU supports (scalar always: what a CPU
# without AVX2, or another architecture, runs) in a subprocess of its own.
LOWER_LEVELS = cbuild.supported_levels()[:-1]


@pytest.mark.slow
@pytest.mark.parametrize("level", LOWER_LEVELS or [pytest.param("scalar", marks=pytest.mark.skip(
    reason="not an x86 CPU: the kernels build with -march=native only"))])  # fmt: skip
def test_every_lower_isa_level_matches_too(tmp_path, level):
    """The C paths of a lower ISA level (LLMFN_CPU_ISA) built into a fresh LLMFN_HOME: the fused
    layers against the torch ops, bitwise against the op-by-op C path, the matrix and quantized
    kernels, the GEMM, the encoder attention, the 16-bit KV cache and the sampler, in a subprocess."""
    env = {**os.environ, "LLMFN_CPU_ISA": level, "LLMFN_HOME": str(tmp_path)}
    tests = Path(__file__).parent
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(tests / "test_fused_layer.py"),
         str(tests / "test_cpu_kernels.py"), str(tests / "test_cpu_gemm.py"), str(tests / "test_quant.py"),
         str(tests / "test_kv_dtype.py"), str(tests / "test_sampling.py"),
         "-k", "not lower_isa and (cpu or fused or gemm or ffn or attention or linear or kernel or int8_act or c_sampler)"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1]
    for lib in ("llmfn_cpu", "llmfn_gemm", "llmfn_attention", "llmfn_sample"):
        assert list((tmp_path / "kernels").glob(f"{lib}_{level}_*.so")), lib


def test_isa_level_is_the_best_supported_unless_asked_lower(monkeypatch):
    levels = cbuild.supported_levels()
    monkeypatch.delenv("LLMFN_CPU_ISA", raising=False)
    assert cbuild.isa()[0] == levels[-1]
    monkeypatch.setenv("LLMFN_CPU_ISA", levels[0])
    assert cbuild.isa() == (levels[0], "LLMFN_CPU_ISA")
    monkeypatch.setenv("LLMFN_CPU_ISA", "avx9000")
    level, why = cbuild.isa()
    assert level == levels[-1] and "ignored" in why
    if levels != ["native"] and len(levels) < len(cbuild.X86_LEVELS):  # a level above this CPU's
        monkeypatch.setenv("LLMFN_CPU_ISA", cbuild.X86_LEVELS[-1][0])
        assert cbuild.isa()[0] == levels[-1] and "lacks" in cbuild.isa()[1]


def test_amx_level_needs_the_cpu_flags_and_a_compiler_that_takes_them(monkeypatch):
    """A Xeon's AMX flags make the amx level only when the C compiler builds AMX code; an older
    compiler leaves the machine on avx512 rather than on no C kernels at all."""
    every_flag = " ".join(flag for _, needs, _ in cbuild.X86_LEVELS for flag in needs)
    monkeypatch.setattr(cbuild.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cbuild, "_cpu_flags", lambda: "flags : " + every_flag)
    monkeypatch.setattr(cbuild, "_compiler_takes", lambda flags: True)
    assert cbuild.supported_levels() == ["scalar", "avx2", "avx512", "amx"]
    monkeypatch.setattr(cbuild, "_compiler_takes", lambda flags: "-mamx-tile" not in flags)
    assert cbuild.supported_levels() == ["scalar", "avx2", "avx512"]
    monkeypatch.setattr(cbuild, "_cpu_flags", lambda: "flags : " + every_flag.replace("amx_int8", ""))
    monkeypatch.setattr(cbuild, "_compiler_takes", lambda flags: True)
    assert cbuild.supported_levels() == ["scalar", "avx2", "avx512"]
