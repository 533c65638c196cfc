"""Each Triton kernel against its torch reference, over hypothesis-chosen small shapes.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (conftest sets
TRITON_INTERPRET=1), called through their triton_* launchers. The rule, per output:

    max|triton - ref| <= 2 * max|torch_lowp - ref| + eps

where ref is the reference on upcast inputs (fp64 for fp32 tests, so the fp32 torch version has an
error to compare with; fp32 for fp16 / bf16) and torch_lowp is the reference in the test dtype.
bf16 runs on GPU only: the interpreter truncates fp32 -> bf16 instead of rounding, and
multiplies bf16 wrongly inside tl.dot (the kernels cast to fp32 there)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmfn.kernels import KernelError, ops, triton_attention, triton_int4, triton_norm, triton_rope
from llmfn.kernels import reference as ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
GPU_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=GPU_ONLY)]
EPS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def examples(n: int):
    """Few examples (the interpreter is slow), no deadline (its speed varies with the load)."""
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ref_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float32 else torch.float32


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def assert_rule(triton_out: torch.Tensor, lowp: torch.Tensor, expected: torch.Tensor, eps: float) -> None:
    assert triton_out.shape == expected.shape and triton_out.dtype == lowp.dtype
    err = (triton_out.double() - expected.double()).abs().max().item()
    base = (lowp.double() - expected.double()).abs().max().item()
    assert err <= 2 * base + eps, f"triton error {err:.3g} > 2 * torch error {base:.3g} + {eps:g}"


# ---------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", DTYPES)
@examples(25)
@given(
    rows=st.integers(1, 7),
    dim=st.sampled_from([16, 33, 64, 96, 100, 256]),
    residual=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rms_norm(dtype, rows, dim, residual, seed):
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, 2, rows, dim, dtype=dtype) * 3
    r = randn(gen, 2, rows, dim, dtype=dtype)
    w = 1 + 0.1 * randn(gen, dim, dtype=dtype)
    up = ref_dtype(dtype)
    if residual:
        expected, expected_sum = ref.add_rms_norm(x.to(up), r.to(up), w.to(up), 1e-6)
        lowp, lowp_sum = ref.add_rms_norm(x, r, w, 1e-6)
        out, summed = triton_norm.add_rms_norm(x, r, w, 1e-6)
        assert_rule(summed, lowp_sum, expected_sum, EPS[dtype])
    else:
        expected = ref.rms_norm(x.to(up), w.to(up), 1e-6)
        lowp = ref.rms_norm(x, w, 1e-6)
        out = triton_norm.rms_norm(x, w, 1e-6)
    assert_rule(out, lowp, expected, EPS[dtype])


def test_rms_norm_strided_rows_and_fp32_weight():
    """A row-strided input and an fp32 weight (output promotes to fp32, as in the reference)."""
    gen = torch.Generator().manual_seed(0)
    base = randn(gen, 5, 80, dtype=torch.float16)
    x = base[:, :48]  # rows 80 apart
    w = 1 + 0.1 * randn(gen, 48)
    out = triton_norm.rms_norm(x, w, 1e-5)
    expected = ref.rms_norm(x, w, 1e-5)
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- RoPE


def rope_tables(pos: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = pos.float()[..., None] * inv_freq  # [b, s, d/2]
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@examples(25)
@given(
    b=st.integers(1, 2),
    s=st.integers(1, 7),
    hk=st.integers(1, 3),
    group=st.sampled_from([1, 2, 3]),
    dim=st.sampled_from([16, 48, 64, 80]),
    seed=st.integers(0, 2**16),
)
def test_rope_in_place(dtype, b, s, hk, group, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    hq = hk * group
    qkv = randn(gen, b, s, (hq + 2 * hk) * dim, dtype=dtype)  # q, k: strided views, like the model's
    q = qkv[..., : hq * dim].view(b, s, hq, dim)
    k = qkv[..., hq * dim : (hq + hk) * dim].view(b, s, hk, dim)
    v_before = qkv[..., (hq + hk) * dim :].clone()
    pos = torch.randint(0, 4096, (b, s), generator=gen)
    cos, sin = rope_tables(pos, dim)
    up = ref_dtype(dtype)
    eq, ek = ref.apply_rope(q.to(up), k.to(up), cos.to(up), sin.to(up))
    lq, lk = ref.apply_rope(q, k, cos, sin)
    triton_rope.rope_(q, k, cos, sin)  # in place
    assert_rule(q, lq, eq, EPS[dtype])
    assert_rule(k, lk, ek, EPS[dtype])
    assert torch.equal(qkv[..., (hq + hk) * dim :], v_before)  # v untouched


# ---------------------------------------------------------------- attention


def attention_case(gen, dtype, b, hk, group, s, t, dim, pos):
    """q as a transposed view of [b, s, hq, d] and k/v as one layer of a bigger cache."""
    hq = hk * group
    q = randn(gen, b, s, hq, dim, dtype=dtype).transpose(1, 2)  # [b, hq, s, d], strided
    cache = randn(gen, 2, 2, b, hk, t, dim, dtype=dtype)  # [kv, layer, b, hk, t, d]
    return q, cache[0, 1], cache[1, 1], pos.to(DEVICE)


def check_attention(run, q, k, v, pos, alibi, window, dtype):
    hq, dim = q.shape[1], q.shape[3]
    scale = dim**-0.5
    slopes = ref.alibi_slopes(hq).to(DEVICE) if alibi else None
    up = ref_dtype(dtype)
    expected = ref.attention(
        q.to(up), k.to(up), v.to(up), pos, scale, slopes.to(up) if alibi else None, window
    )
    lowp = ref.attention(q, k, v, pos, scale, slopes, window)
    out = run(q, k, v, pos, scale, slopes, window)
    assert_rule(out, lowp, expected, EPS[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@examples(30)
@given(
    b=st.integers(1, 2),
    hk=st.integers(1, 2),
    group=st.sampled_from([1, 2, 3]),
    s=st.integers(1, 21),
    starts=st.lists(st.integers(0, 12), min_size=2, max_size=2),
    slack=st.integers(0, 5),
    shuffle=st.booleans(),
    dim=st.sampled_from([16, 32, 64, 80, 96, 128]),
    alibi=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 9)),
    seed=st.integers(0, 2**16),
)
def test_attention_prefill(dtype, b, hk, group, s, starts, slack, shuffle, dim, alibi, window, seed):
    """Chunked prefill: row i holds positions starts[i] .. starts[i] + s - 1 of a cache of t slots
    (in a random order with shuffle: the kernel must not assume sorted positions)."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.tensor(starts[:b])
    t = int(starts.max()) + s + slack
    pos = starts[:, None] + torch.arange(s)[None, :]  # [b, s]
    if shuffle:
        pos = pos[:, torch.randperm(s, generator=gen)]
    q, k, v, pos = attention_case(gen, dtype, b, hk, group, s, t, dim, pos)
    check_attention(triton_attention.prefill, q, k, v, pos, alibi, window, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@examples(25)
@given(
    b=st.integers(1, 3),
    hk=st.integers(1, 2),
    group=st.sampled_from([1, 2, 4, 5]),
    t=st.integers(1, 70),
    fracs=st.lists(st.floats(0, 1), min_size=3, max_size=3),
    splits=st.sampled_from([0, 1, 2, 3, 5]),
    dim=st.sampled_from([16, 32, 64, 80, 128]),
    alibi=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 20)),
    seed=st.integers(0, 2**16),
)
def test_attention_decode(dtype, b, hk, group, t, fracs, splits, dim, alibi, window, seed):
    """M=1 decode: each row at its own position in a cache of t slots, split-KV then merge."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.tensor([[int(f * (t - 1))] for f in fracs[:b]])  # [b, 1]
    q, k, v, pos = attention_case(gen, dtype, b, hk, group, 1, t, dim, pos)

    def run(*args):
        return triton_attention.decode(*args, num_splits=splits)

    check_attention(run, q, k, v, pos, alibi, window, dtype)


def test_attention_query_that_sees_no_key_gives_zeros():
    """Position -1 (a padding row) sees no key: zeros, as torch's SDPA gives for a fully masked row."""
    gen = torch.Generator().manual_seed(2)
    pos = torch.tensor([[-1, 0, 1], [4, -1, 5]])
    q, k, v, pos = attention_case(gen, torch.float32, 2, 1, 2, 3, 7, 16, pos)
    expected = ref.attention(q, k, v, pos, 0.25)
    assert expected[0, :, 0].abs().max() == 0 and expected[1, :, 1].abs().max() == 0
    torch.testing.assert_close(triton_attention.prefill(q, k, v, pos, 0.25), expected)
    one = pos[:, :1] * 0 - 1  # every row at -1
    out = triton_attention.decode(q[:, :, :1], k, v, one, 0.25, num_splits=2)
    assert out.abs().max() == 0


def test_attention_bad_shapes_raise():
    q, k, v = torch.zeros(1, 3, 2, 16), torch.zeros(1, 2, 5, 16), torch.zeros(1, 2, 5, 16)
    with pytest.raises(KernelError, match="attention"):  # 3 q heads over 2 kv heads
        triton_attention.prefill(q, k, v, torch.zeros(1, 2, dtype=torch.long), 0.25)
    with pytest.raises(KernelError, match="q_pos"):
        triton_attention.prefill(q[:, :2], k, v, torch.zeros(1, 3, dtype=torch.long), 0.25)
    with pytest.raises(KernelError, match="one query"):
        triton_attention.decode(q[:, :2], k, v, torch.zeros(1, 2, dtype=torch.long), 0.25)


def test_attention_op_picks_decode_for_one_query():
    """The registered op (torch.ops.llmfn.attention) agrees with the reference for s == 1 and s > 1."""
    gen = torch.Generator().manual_seed(1)
    for s in (1, 5):
        pos = torch.arange(s)[None, :] + 3
        q, k, v, pos = attention_case(gen, torch.float32, 1, 2, 2, s, 9, 32, pos)
        out = torch.ops.llmfn.attention(q, k, v, pos, 0.2, None, None)
        torch.testing.assert_close(out, ref.attention(q, k, v, pos, 0.2), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- int4 matmul


@examples(30)
@given(n=st.integers(1, 9), half_k=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_int4_pack_roundtrip(n, half_k, seed):
    q = torch.randint(0, 16, (n, 2 * half_k), generator=torch.Generator().manual_seed(seed))
    packed = ref.pack_int4(q)
    assert packed.shape == (n, half_k) and packed.dtype == torch.uint8
    assert torch.equal(ref.unpack_int4(packed), q.to(torch.uint8))
    assert torch.equal(packed[0, 0], (q[0, 0] | (q[0, 1] << 4)).to(torch.uint8))  # low nibble = even k


def test_int4_layout_means_awq():
    """w[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g]."""
    q = torch.tensor([[0, 15, 3, 4], [7, 8, 9, 1]])
    s = torch.tensor([[0.5, 2.0], [1.0, 0.25]])
    z = torch.tensor([[8.0, 0.0], [7.0, 1.0]])
    w = ref.dequantize_int4(ref.pack_int4(q), s, z, 2, torch.float32)
    assert torch.equal(w, torch.tensor([[-4.0, 3.5, 6.0, 8.0], [0.0, 1.0, 2.0, 0.0]]))


def test_int4_quantize_error_is_half_a_step():
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    qw, s, z = ref.quantize_int4(w, 32)
    back = ref.dequantize_int4(qw, s, z, 32, torch.float32)
    step = s.repeat_interleave(32, dim=1)
    assert ((back - w).abs() <= step * 0.51 + 1e-6).all()


def test_int4_bad_layout_raises():
    qw, s, z = ref.quantize_int4(torch.randn(4, 64), 32)
    with pytest.raises(KernelError, match="group_size"):
        triton_int4.int4_matmul(torch.randn(1, 64), qw, s, z, 48)
    with pytest.raises(KernelError, match="scales"):
        triton_int4.int4_matmul(torch.randn(1, 64), qw, s[:, :1], z, 32)


@pytest.mark.parametrize("dtype", DTYPES)
@examples(25)
@given(
    m=st.sampled_from([1, 2, 5, 17]),
    n=st.integers(1, 70),
    group=st.sampled_from([16, 32, 48, 64, 128]),
    groups=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_int4_matmul(dtype, m, n, group, groups, seed):
    gen = torch.Generator().manual_seed(seed)
    k = group * groups
    qw, s, z = ref.quantize_int4(randn(gen, n, k, dtype=dtype), group)
    x = randn(gen, m, k, dtype=dtype)
    up = ref_dtype(dtype)
    expected = ref.int4_matmul(x.to(up), qw, s.to(up), z.to(up), group)
    lowp = ref.int4_matmul(x, qw, s, z, group)
    out = triton_int4.int4_matmul(x, qw, s, z, group)
    # eps: fp32 accumulation order over k, scaled by the output magnitude
    assert_rule(out, lowp, expected, EPS[dtype] * max(1.0, expected.abs().max().item()))


def test_int4_matmul_leading_dims():
    gen = torch.Generator().manual_seed(5)
    qw, s, z = ref.quantize_int4(randn(gen, 24, 64), 32)
    x = randn(gen, 2, 3, 64)
    out = triton_int4.int4_matmul(x, qw, s, z, 32)
    torch.testing.assert_close(out, ref.int4_matmul(x, qw, s, z, 32), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- public ops and torch.compile


def model_step(x, res, w, q, k, v_cache, k_cache, cos, sin, pos, qw, s, z):
    """The ops in the order a decoder layer calls them."""
    h, res = ops.add_rms_norm(x, res, w, 1e-6)
    q, k = ops.apply_rope(q, k, cos, sin)
    att = ops.attention(q.transpose(1, 2), k_cache, v_cache, pos, 0.25)  # [b, hq, s, d]
    return ops.int4_matmul(h, qw, s, z, 32) + att.transpose(1, 2).flatten(2).sum(-1, keepdim=True), res


def step_inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(7)
    b, s, hq, hk, d, t = 1, 3, 4, 2, 16, 8
    pos = torch.arange(s)[None] + 2
    cos, sin = rope_tables(pos, d)
    qw, sc, z = ref.quantize_int4(randn(gen, 24, 64, dtype=dtype), 32)
    return (
        randn(gen, b, s, 64, dtype=dtype),
        randn(gen, b, s, 64, dtype=dtype),
        randn(gen, 64, dtype=dtype),
        randn(gen, b, s, hq, d, dtype=dtype),
        randn(gen, b, s, hk, d, dtype=dtype),
        randn(gen, b, hk, t, d, dtype=dtype),
        randn(gen, b, hk, t, d, dtype=dtype),
        cos,
        sin,
        pos.to(DEVICE),
        qw,
        sc,
        z,
    )


@pytest.mark.skipif(CUDA, reason="checks the CPU path")
def test_public_ops_compile_on_cpu_without_graph_breaks():
    """On CPU the public ops are the references, which torch.compile must trace in one graph."""
    args = step_inputs()
    eager = model_step(*(a.clone() for a in args))
    compiled = torch.compile(model_step, fullgraph=True, backend="aot_eager")(*(a.clone() for a in args))
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_ops_compile_on_cuda_without_graph_breaks(dtype):
    """On CUDA the public ops are triton_ops: one graph under torch.compile, same numbers as eager."""
    args = step_inputs(dtype)
    eager = model_step(*(a.clone() for a in args))
    compiled = torch.compile(model_step, fullgraph=True)(*(a.clone() for a in args))
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e, atol=2e-2, rtol=2e-2)


@examples(12)
@given(
    b=st.integers(1, 3),
    hk=st.integers(1, 2),
    group=st.sampled_from([1, 3]),
    block_len=st.sampled_from([4, 16]),
    nb=st.integers(1, 4),
    s=st.integers(1, 9),
    window=st.one_of(st.none(), st.integers(1, 12)),
    seed=st.integers(0, 2**16),
)
def test_attention_through_a_block_table_equals_the_gathered_cache(b, hk, group, block_len, nb, s, window, seed):
    """Paged KV: prefill and decode read a pool of blocks [N, hk, S, d] through a block table in place
    and give exactly what they give on the same keys gathered into one cache per row."""
    gen = torch.Generator().manual_seed(seed)
    t, dim = block_len * nb, 16
    n_blocks = b * nb + 2
    pool_k, pool_v = randn(gen, n_blocks, hk, block_len, dim), randn(gen, n_blocks, hk, block_len, dim)
    table = torch.randperm(n_blocks, generator=gen)[: b * nb].view(b, nb).to(torch.int32).to(DEVICE)
    k, v = ref.gather_blocks(pool_k, table), ref.gather_blocks(pool_v, table)  # [b, hk, t, d]
    s = min(s, t)
    pos = (t - s + torch.arange(s))[None].expand(b, -1).contiguous().to(DEVICE)  # the last s positions
    q = randn(gen, b, hk * group, s, dim)
    for run in (triton_attention.prefill, triton_attention.decode):
        qq, pp = (q, pos) if run is triton_attention.prefill else (q[:, :, -1:], pos[:, -1:])
        flat = run(qq, k, v, pp, dim**-0.5, None, window)
        paged = run(qq, pool_k, pool_v, pp, dim**-0.5, None, window, blocks=table)
        assert torch.equal(flat, paged)
    torch.testing.assert_close(flat, ref.attention(q[:, :, -1:], k, v, pos[:, -1:], dim**-0.5, None, window),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
