"""llmfn's C GEMM (kernels/cpu_gemm.py) and encoder attention (kernels/cpu_attention.py) against
torch references in fp64, shapes from hypothesis, with the rule of the other kernel tests:
max|c - ref64| <= 2 * max|torch_fp32 - ref64| + eps. Plus what callers rely on: a row's result is
bitwise the same alone, in any batch and on any number of threads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmfn.kernels import cpu, cpu_attention, cpu_gemm
from llmfn.kernels import linear as lin
from test_cpu_kernels import assert_rule, randn

pytestmark = pytest.mark.skipif(
    not (cpu_gemm.available() and cpu_attention.available()), reason="no C compiler to build the CPU kernels"
)
EXAMPLES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference(x, w, b, act, residual, norm):
    """norm(act(x @ w.T + b) + residual) in torch, in the dtype of x."""
    y = F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
    if act is not None:
        y = lin.ACTIVATIONS[act](y)
    if residual is not None:
        y = y + residual.to(x.dtype)
    if norm is not None:
        y = F.layer_norm(y, y.shape[-1:], norm[0].to(x.dtype), norm[1].to(x.dtype), norm[2])
    return y


def operands(g, m, n, k, bias, residual, norm):
    x, w = randn(g, m, k), randn(g, n, k) / k**0.5
    b = randn(g, n) if bias else None
    res = randn(g, m, n) if residual else None
    ln = (randn(g, n) * 0.3 + 1, randn(g, n) * 0.3, 1e-5) if norm else None
    return x, w, b, res, ln


def on_one_thread(fn):
    """fn() with torch, and so the C kernels, on one thread."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return fn()
    finally:
        torch.set_num_threads(threads)


def as64(t):
    return None if t is None else t.double()


# ---------------------------------------------------------------------------------------------- GEMM


@EXAMPLES
@given(m=st.integers(1, 130), n=st.integers(1, 90), k=st.integers(1, 900), bias=st.booleans(),
       act=st.sampled_from([None, "gelu", "relu"]), residual=st.booleans(), norm=st.booleans(),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_gemm_matches_torch(m, n, k, bias, act, residual, norm, seed):
    """Every epilogue combination, k across several KC blocks, ragged row and column tiles. The fused
    LayerNorm is held to the rule on the values it normalises: a row of near-equal values (ReLU
    zeroing most of a few outputs) multiplies any rounding before it by 1 / std, so the end-to-end
    error is the matmul's rounding times that row's conditioning, which torch's own error only samples."""
    x, w, b, res, ln = operands(torch.Generator().manual_seed(seed), m, n, k, bias, residual, norm)
    packed = cpu_gemm.pack(w)
    pre = cpu_gemm.linear(x, packed, n, b, act, res)
    assert_rule(pre, reference(x, w, b, act, res, None), reference(x.double(), w, as64(b), act, as64(res), None))
    if ln is not None:
        out = cpu_gemm.linear(x, packed, n, b, act, res, ln)
        expected = F.layer_norm(pre.double(), (n,), ln[0].double(), ln[1].double(), ln[2])
        assert_rule(out, F.layer_norm(pre, (n,), ln[0], ln[1], ln[2]), expected)


@EXAMPLES
@given(m=st.integers(2, 150), n=st.integers(1, 70), k=st.integers(1, 500), norm=st.booleans(),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_gemm_rows_are_batch_and_thread_invariant(m, n, k, norm, seed):
    """Row i is bitwise the same computed alone, inside the batch (whose tasks may split the columns),
    reversed, and on one thread."""
    x, w, b, res, ln = operands(torch.Generator().manual_seed(seed), m, n, k, True, True, norm)
    packed = cpu_gemm.pack(w)
    out = cpu_gemm.linear(x, packed, n, b, "gelu", res, ln)
    for i in {0, m // 2, m - 1}:
        assert torch.equal(out[i : i + 1], cpu_gemm.linear(x[i : i + 1], packed, n, b, "gelu", res[i : i + 1], ln))
    assert torch.equal(cpu_gemm.linear(x.flip(0), packed, n, b, "gelu", res.flip(0), ln), out.flip(0))
    assert torch.equal(on_one_thread(lambda: cpu_gemm.linear(x, packed, n, b, "gelu", res, ln)), out)


def test_gemm_gelu_at_the_ends_of_the_float_range():
    """The erf rational is clamped: huge, tiny and infinite pre-activations give GELU's limits, in the
    vector path (16 columns) and the scalar tail (the 17th)."""
    v = torch.tensor([-3e38, -1e4, -10.0, -4.0, -1e-30, 0.0, 1e-30, 4.0, 10.0, 1e4, 3e38, float("-inf"), float("inf")])
    out = cpu_gemm.linear(v[:, None], cpu_gemm.pack(torch.ones(17, 1)), 17, act="gelu")  # column j = v
    for col in out.T:
        torch.testing.assert_close(col[:-2].double(), F.gelu(v[:-2].double()), atol=5e-7, rtol=1e-6)
        assert col[-2] == 0 or torch.isnan(col[-2])  # -inf * 0
        assert col[-1] == float("inf")


def test_gemm_gelu_is_within_a_few_ulp_of_exact():
    """Over [-12, 12] (2M points) the fused GELU is within 1.5e-6 + 1e-6 * |gelu| of fp64's (torch's
    fp32 GELU: within 4e-7; the difference is a few ulp of erf near -1, scaled by |x| <= 6)."""
    v = torch.linspace(-12, 12, 2_000_001)
    out = cpu_gemm.linear(v[:, None], cpu_gemm.pack(torch.ones(16, 1)), 16, act="gelu")[:, 0]
    torch.testing.assert_close(out.double(), F.gelu(v.double()), atol=1.5e-6, rtol=1e-6)


def test_gemm_and_attention_take_empty_dimensions():
    """No rows, no outputs, or k = 0 (x @ w.T is then 0: the epilogue of zeros) as torch gives."""
    g = torch.Generator().manual_seed(0)
    b, res, ln = randn(g, 5), randn(g, 3, 5), (randn(g, 5), randn(g, 5), 1e-5)
    assert cpu_gemm.linear(randn(g, 0, 4), cpu_gemm.pack(randn(g, 5, 4)), 5, b).shape == (0, 5)
    assert cpu_gemm.linear(randn(g, 3, 4), cpu_gemm.pack(randn(g, 0, 4)), 0).shape == (3, 0)
    out = cpu_gemm.linear(randn(g, 3, 0), cpu_gemm.pack(randn(g, 5, 0)), 5, b, "gelu", res, ln)
    torch.testing.assert_close(out, reference(torch.zeros(3, 0), torch.zeros(5, 0), b, "gelu", res, ln))
    assert cpu_attention.attention(randn(g, 2, 0, 3 * 8), 2).shape == (2, 0, 8)
    assert cpu_attention.attention(randn(g, 0, 4, 3 * 8), 2).shape == (0, 4, 8)


def test_gemm_shape_mismatches_are_errors_not_memory_reads():
    g = torch.Generator().manual_seed(0)
    packed = cpu_gemm.pack(randn(g, 8, 16))
    with pytest.raises(ValueError, match="linear: shapes"):
        cpu_gemm.linear(randn(g, 3, 15), packed, 8)
    with pytest.raises(ValueError, match="linear: shapes"):
        cpu_gemm.linear(randn(g, 3, 16), packed, 8, randn(g, 7))
    with pytest.raises(ValueError, match="linear: shapes"):
        cpu_gemm.linear(randn(g, 3, 16), packed, 8, residual=randn(g, 2, 8))
    with pytest.raises(ValueError, match="linear: shapes"):
        cpu_gemm.linear(randn(g, 3, 16), packed, 8, norm=(randn(g, 8), randn(g, 9), 1e-5))


# ---------------------------------------------------------------------------------------------- fused FFN


def two_calls(x, up, b_up, down, b_down, f, act, ln):
    """The feed-forward as two GEMM calls: the order of sums the fused kernel must keep."""
    d = x.shape[-1]
    return cpu_gemm.linear(cpu_gemm.linear(x, up, f, b_up, act), down, d, b_down, None, x, ln)


@EXAMPLES
@given(m=st.integers(1, 200), d=st.integers(1, 80), f=st.integers(1, 900), bias=st.booleans(),
       act=st.sampled_from([None, "gelu", "relu"]), norm=st.booleans(), seed=st.integers(0, 2**16))  # fmt: skip
def test_ffn_is_bitwise_the_two_gemm_calls(m, d, f, bias, act, norm, seed):
    """Hidden widths across several KC blocks and ragged tiles, rows across several row blocks: the
    fused pass gives the two calls' bits (and those are held to torch by the GEMM tests), whatever
    the number of threads."""
    g = torch.Generator().manual_seed(seed)
    _, w_down, b_down, _, ln = operands(g, m, d, f, bias, False, norm)
    x, w_up, b_up = randn(g, m, d), randn(g, f, d) / d**0.5, randn(g, f) if bias else None
    up, down = cpu_gemm.pack(w_up), cpu_gemm.pack(w_down)
    want = two_calls(x, up, b_up, down, b_down, f, act, ln)
    assert torch.equal(cpu_gemm.ffn(x, up, b_up, down, b_down, f, act, ln), want)
    assert torch.equal(on_one_thread(lambda: cpu_gemm.ffn(x, up, b_up, down, b_down, f, act, ln)), want)


def test_ffn_takes_empty_dimensions_and_checks_shapes():
    g = torch.Generator().manual_seed(0)
    x, b_down, ln = randn(g, 7, 5), randn(g, 5), (randn(g, 5), randn(g, 5), 1e-5)
    no_hidden = cpu_gemm.ffn(x, cpu_gemm.pack(randn(g, 0, 5)), None, cpu_gemm.pack(randn(g, 5, 0)), b_down, 0, "gelu", ln)
    torch.testing.assert_close(no_hidden, F.layer_norm(x + b_down, (5,), ln[0], ln[1], ln[2]))  # the hidden is empty
    up, down = cpu_gemm.pack(randn(g, 9, 5)), cpu_gemm.pack(randn(g, 5, 9))
    assert cpu_gemm.ffn(randn(g, 0, 5), up, None, down, None, 9).shape == (0, 5)
    with pytest.raises(ValueError, match="ffn: shapes"):
        cpu_gemm.ffn(randn(g, 3, 4), up, None, down, None, 9)
    with pytest.raises(ValueError, match="ffn: shapes"):
        cpu_gemm.ffn(x, up, randn(g, 5), down, None, 9)
    with pytest.raises(ValueError, match="ffn: shapes"):
        cpu_gemm.ffn(x, up, None, down, None, 9, norm=(randn(g, 9), randn(g, 9), 1e-5))


@pytest.mark.parametrize("rows", [1, cpu.MAX_ROWS + 1, 300])
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_feed_forward_with_packed_weights_matches_plain_weights(rows, act):
    """llmfn.kernels.linear.feed_forward: fused for packed weights on the GEMM's path, else two linears (the
    decode kernel for few rows; an activation C does not fuse)."""
    g = torch.Generator().manual_seed(rows)
    _, w_down, b_down, _, ln = operands(g, rows, 40, 96, True, False, True)
    x, w_up, b_up = randn(g, rows, 40), randn(g, 96, 40) / 40**0.5, randn(g, 96)
    plain = lin.feed_forward(x, w_up, b_up, w_down, b_down, act=act, norm=ln)
    packed = lin.feed_forward(x, lin.pack(w_up), b_up, lin.pack(w_down), b_down, act=act, norm=ln)
    torch.testing.assert_close(packed, plain, atol=2e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- llmfn.kernels.linear


@pytest.mark.parametrize("rows", [1, lin.GEMM_MIN_ROWS, cpu.MAX_ROWS, cpu.MAX_ROWS + 1, 300])
@pytest.mark.parametrize("act", [None, "gelu", "gelu_tanh", "relu"])
def test_linear_with_a_packed_weight_matches_the_plain_weight(rows, act):
    """A PackedWeight behaves as its tensor on every path: the decode kernel up to MAX_ROWS rows, the
    C GEMM above, an activation C does not fuse (gelu_tanh) applied after it."""
    g = torch.Generator().manual_seed(rows)
    x, w, b, res, ln = operands(g, rows, 40, 72, True, True, True)
    packed = lin.pack(w)
    assert isinstance(packed, lin.PackedWeight) and packed.shape == w.shape and packed.numel() == w.numel()
    ln64 = (ln[0].double(), ln[1].double(), ln[2])
    for res_, ln_ in ((None, None), (res, None), (res, ln)):
        out = lin.linear(x[None], packed, b, act=act, residual=None if res_ is None else res_[None], norm=ln_)[0]
        expected = reference(x.double(), w, b.double(), act, as64(res_), None if ln_ is None else ln64)
        assert_rule(out, reference(x, w, b, act, res_, ln_), expected)
    torch.testing.assert_close(lin.embedding(packed, torch.tensor([3, 0])), w[[3, 0]])


def test_pack_keeps_what_the_gemm_cannot_take():
    w = torch.randn(8, 16)
    assert lin.pack(w.bfloat16()).dtype == torch.bfloat16 and not isinstance(lin.pack(w.bfloat16()), lin.PackedWeight)
    assert not isinstance(lin.pack(torch.randn(16)), lin.PackedWeight)
    moved = lin.pack(w).to(dtype=torch.bfloat16)
    assert isinstance(moved, torch.Tensor) and moved.dtype == torch.bfloat16
    assert isinstance(lin.pack(w).to("cpu"), lin.PackedWeight)
    with torch.enable_grad():  # autograd takes the tensor, and gradients flow
        x = torch.randn(40, 16, requires_grad=True)
        lin.linear(x, lin.pack(w), act="gelu").sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape


# ---------------------------------------------------------------------------------------------- attention


def sdpa_reference(qkv: torch.Tensor, heads: int, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    B, T, d3 = qkv.shape
    q, k, v = qkv.view(B, T, 3, heads, d3 // 3 // heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :], scale=scale)
    return out.transpose(1, 2).reshape(B, T, d3 // 3)


def attention_conditioning(qkv: torch.Tensor, heads: int, scale: float) -> float:
    """What fp32 rounding alone may cost an attention output: scores carry an absolute error of a few
    ulp of max|score|, which exp turns into that relative error on weights of values up to max|v|.
    Peaked inputs (scores in the hundreds) make it dominate; torch's own error is one draw of it."""
    B, T, d3 = qkv.shape
    q, k, v = qkv.double().view(B, T, 3, heads, d3 // 3 // heads).permute(2, 0, 3, 1, 4)
    smax = (q @ k.transpose(-1, -2)).abs().max().item() * scale
    return 8 * 2**-24 * smax * v.abs().max().item()


@EXAMPLES
@given(data=st.data(), b=st.integers(1, 4), t=st.integers(1, 70), heads=st.integers(1, 4), hd=st.integers(1, 72),
       masked=st.booleans(), seed=st.integers(0, 2**16))  # fmt: skip
def test_attention_matches_sdpa(data, b, t, heads, hd, masked, seed):
    """Any key mask (holes, fully masked sequences), head sizes off the 16-float panels, long rows."""
    g = torch.Generator().manual_seed(seed)
    qkv = randn(g, b, t, 3 * heads * hd) * data.draw(st.sampled_from([0.5, 2.0, 8.0]))
    mask = torch.rand(b, t, generator=g) < data.draw(st.sampled_from([0.0, 0.3, 0.9])) if masked else None
    if mask is not None:
        mask = ~mask
    scale = data.draw(st.sampled_from([None, 0.05]))
    s = hd**-0.5 if scale is None else scale
    out = cpu_attention.attention(qkv, heads, mask, scale)
    assert_rule(out, sdpa_reference(qkv, heads, mask, s), sdpa_reference(qkv.double(), heads, mask, s),
                eps=1e-5 + attention_conditioning(qkv, heads, s))  # fmt: skip
    if mask is not None:  # no key to attend: zeros, as torch's CPU kernel gives
        assert not out[~mask.any(1)].any()


def test_attention_padding_never_changes_a_sequence():
    """A sequence attends only to its unmasked keys: padding it, or its neighbours, changes nothing."""
    g = torch.Generator().manual_seed(0)
    qkv = randn(g, 1, 9, 3 * 2 * 16)
    alone = cpu_attention.attention(qkv, 2)
    padded = torch.cat([qkv, randn(g, 1, 30, 3 * 2 * 16) * 50], 1)
    mask = torch.arange(39)[None] < 9
    assert torch.equal(cpu_attention.attention(padded, 2, mask)[:, :9], alone)
    two = torch.cat([padded, randn(g, 1, 39, 3 * 2 * 16)], 0)
    assert torch.equal(cpu_attention.attention(two, 2, torch.cat([mask, torch.ones_like(mask)]))[:1, :9], alone)


def test_attention_shape_mismatches_are_errors():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="attention: shapes"):
        cpu_attention.attention(randn(g, 1, 4, 3 * 10), 3)
    with pytest.raises(ValueError, match="attention: shapes"):
        cpu_attention.attention(randn(g, 2, 4, 3 * 8), 2, torch.ones(2, 5, dtype=torch.bool))


@EXAMPLES
@given(b=st.integers(1, 7), t=st.integers(1, 110), heads=st.integers(1, 4), hd=st.integers(1, 40),
       group=st.integers(0, 4), masked=st.booleans(), bias=st.booleans(), norm=st.booleans(),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_attention_block_is_bitwise_the_three_calls(b, t, heads, hd, group, masked, bias, norm, seed):
    """One pass per group of sequences (projection, attention, output projection, residual, LayerNorm)
    gives the bits of the three calls it replaces, which the tests above hold to torch; on one thread
    too. Groups that do not divide the batch leave a smaller last task; group 0 counts as 1."""
    g = torch.Generator().manual_seed(seed)
    d = heads * hd
    _, wo, bo, _, ln = operands(g, 1, d, d, bias, False, norm)
    x, wqkv, bqkv = randn(g, b, t, d), randn(g, 3 * d, d) / d**0.5, randn(g, 3 * d) if bias else None
    mask = torch.rand(b, t, generator=g) > 0.3 if masked else None
    pq, po = cpu_gemm.pack(wqkv), cpu_gemm.pack(wo)
    a = cpu_attention.attention(cpu_gemm.linear(x, pq, 3 * d, bqkv), heads, mask)
    want = cpu_gemm.linear(a, po, d, bo, None, x, ln)
    block = lambda: cpu_attention.attention_block(x, pq, bqkv, po, bo, heads, mask, ln, group=group)
    assert torch.equal(block(), want)
    assert torch.equal(on_one_thread(block), want)


@EXAMPLES
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=7), heads=st.integers(1, 4), hd=st.integers(1, 24),
       group=st.integers(1, 4), norm=st.booleans(), seed=st.integers(0, 2**16))  # fmt: skip
def test_packed_attention_block_is_the_padded_block_at_every_real_row(lengths, heads, hd, group, norm, seed):
    """Sequences packed without padding (rows starts[s] .. starts[s + 1] - 1, empty ones too) get, row
    for row, the bits the padded block with a key mask gives their real positions; on one thread too."""
    g = torch.Generator().manual_seed(seed)
    d, b, t = heads * hd, len(lengths), max(max(lengths), 1)
    _, wo, bo, _, ln = operands(g, 1, d, d, True, False, norm)
    wqkv, bqkv = randn(g, 3 * d, d) / d**0.5, randn(g, 3 * d)
    pq, po = cpu_gemm.pack(wqkv), cpu_gemm.pack(wo)
    x = randn(g, b, t, d)
    mask = torch.arange(t)[None] < torch.tensor(lengths)[:, None]
    want = cpu_attention.attention_block(x, pq, bqkv, po, bo, heads, mask, ln, group=group)[mask]
    starts = torch.tensor([0, *lengths]).cumsum(0)
    block = lambda: cpu_attention.packed_attention_block(x[mask], starts, t, pq, bqkv, po, bo, heads, ln, group=group)
    assert torch.equal(block(), want)
    assert torch.equal(on_one_thread(block), want)


def test_packed_attention_block_checks_its_starts():
    g = torch.Generator().manual_seed(0)
    pq, po = cpu_gemm.pack(randn(g, 24, 8)), cpu_gemm.pack(randn(g, 8, 8))
    x = randn(g, 7, 8)
    for starts, longest in (([0, 3, 6], 4), ([0, 4, 7], 3), ([1, 3, 7], 4), ([0, 5, 3, 7], 5)):  # short of x, too
        with pytest.raises(ValueError, match="packed_attention_block: shapes"):  # long, not from 0, backwards
            cpu_attention.packed_attention_block(x, torch.tensor(starts), longest, pq, None, po, None, 2)
    assert cpu_attention.packed_attention_block(x[:0], torch.tensor([0, 0]), 4, pq, None, po, None, 2).shape == (0, 8)


def test_attention_block_empty_inputs_and_shape_errors():
    g = torch.Generator().manual_seed(0)
    pq, po = cpu_gemm.pack(randn(g, 24, 8)), cpu_gemm.pack(randn(g, 8, 8))
    assert cpu_attention.attention_block(randn(g, 0, 5, 8), pq, None, po, None, 2).shape == (0, 5, 8)
    assert cpu_attention.attention_block(randn(g, 3, 0, 8), pq, None, po, None, 2).shape == (3, 0, 8)
    with pytest.raises(ValueError, match="attention_block: shapes"):
        cpu_attention.attention_block(randn(g, 2, 5, 8), pq, None, po, None, 3)  # 8 is no multiple of 3 heads
    with pytest.raises(ValueError, match="attention_block: shapes"):
        cpu_attention.attention_block(randn(g, 2, 5, 8), po, None, po, None, 2)  # wqkv packed as [8, 8]
    with pytest.raises(ValueError, match="attention_block: shapes"):
        cpu_attention.attention_block(randn(g, 2, 5, 8), pq, None, po, None, 2, torch.ones(2, 4, dtype=torch.bool))


def test_fused_passes_take_strided_operands():
    """Biases and LayerNorm weights that are strided views (every other float of a tensor) give the
    results of their contiguous copies: the wrappers copy them before taking their addresses."""
    g = torch.Generator().manual_seed(5)
    d, f, heads = 16, 40, 2
    x = randn(g, 2, 9, d)
    strided = lambda n: randn(g, 2 * n)[::2]
    b_up, b_down, bqkv, bo = strided(f), strided(d), strided(3 * d), strided(d)
    ln = (strided(d), strided(d), 1e-5)
    flat = lambda t: t.contiguous()
    ln_flat = (flat(ln[0]), flat(ln[1]), 1e-5)
    up, down = cpu_gemm.pack(randn(g, f, d)), cpu_gemm.pack(randn(g, d, f))
    assert torch.equal(cpu_gemm.ffn(x, up, b_up, down, b_down, f, "gelu", ln),
                       cpu_gemm.ffn(x, up, flat(b_up), down, flat(b_down), f, "gelu", ln_flat))  # fmt: skip
    pq, po = cpu_gemm.pack(randn(g, 3 * d, d)), cpu_gemm.pack(randn(g, d, d))
    assert torch.equal(cpu_attention.attention_block(x, pq, bqkv, po, bo, heads, None, ln),
                       cpu_attention.attention_block(x, pq, flat(bqkv), po, flat(bo), heads, None, ln_flat))  # fmt: skip
