"""Sampling: pure, seeded, and never outside the allowed set."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmfn import sampling
from llmfn.sampling import allowed_tokens, apply_penalties, sample, uniform_noise


def _row(v, dtype):
    return torch.tensor([v], dtype=dtype)


def _knobs(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0):
    return dict(temperature=_row(temperature, torch.float32), top_k=_row(top_k, torch.int64),
                top_p=_row(top_p, torch.float32), min_p=_row(min_p, torch.float32), seed=_row(seed, torch.int64))


logits_strategy = st.integers(2, 64).flatmap(
    lambda v: st.lists(st.floats(-20, 20, allow_nan=False), min_size=v, max_size=v)
)


def test_noise_is_a_pure_function_of_seed_and_step():
    a = uniform_noise(torch.tensor([7, 7, 8]), torch.tensor([3, 4, 3]), 1000)
    b = uniform_noise(torch.tensor([7, 7, 8]), torch.tensor([3, 4, 3]), 1000)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert 0 < a.min() and a.max() < 1
    assert abs(a.mean().item() - 0.5) < 0.02


def test_fixed_seed_reproduces_and_seeds_differ():
    logits = torch.randn(1, 500, generator=torch.Generator().manual_seed(0))
    draws = lambda seed: [int(sample(logits, step=_row(s, torch.int64), **_knobs(seed=seed))) for s in range(40)]
    assert draws(11) == draws(11)
    assert draws(11) != draws(12)


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    picks = [int(sample(logits, step=_row(s, torch.int64), **_knobs(seed=3))) for s in range(3000)]
    freq = torch.bincount(torch.tensor(picks), minlength=3).float() / len(picks)
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


@settings(max_examples=200, deadline=None)
@given(logits_strategy, st.integers(0, 5))
def test_top_k_one_is_greedy(values, seed):
    logits = torch.tensor([values])
    got = sample(logits, step=_row(seed, torch.int64), **_knobs(top_k=1, seed=seed, temperature=0.8))
    assert logits[0, got].item() == logits.max().item()


@settings(max_examples=200, deadline=None)
@given(logits_strategy, st.floats(0.05, 1.0), st.floats(0.0, 0.9), st.floats(0.1, 2.0), st.integers(0, 1000))
def test_top_p_and_min_p_never_pick_outside_the_allowed_set(values, top_p, min_p, temperature, seed):
    logits = torch.tensor([values])
    probs = torch.softmax(logits / temperature, -1)[0].double()
    # Independent statement of the allowed set: the smallest prefix (by probability) whose mass
    # reaches top_p, intersected with tokens whose probability is at least min_p * max.
    order = probs.argsort(descending=True)
    cum, nucleus = 0.0, set()
    for i in order.tolist():
        if cum >= top_p and nucleus:
            break
        nucleus.add(i)
        cum += probs[i].item()
    for s in range(5):
        token = int(sample(logits, step=_row(s, torch.int64), **_knobs(temperature, 0, top_p, min_p, seed)))
        # a token tied with the nucleus' least likely one is as good as it (the sort may order ties either way)
        assert token in nucleus or probs[token] >= min(probs[i] for i in nucleus) * (1 - 1e-12)
        assert probs[token] >= min_p * probs.max() * (1 - 1e-6)


def test_top_k_limits_the_set():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    mask = allowed_tokens(logits, _row(1.0, torch.float32), _row(2, torch.int64), _row(1.0, torch.float32), _row(0.0, torch.float32))
    assert mask.tolist() == [[True, True, False, False, False]]


def test_greedy_rows_take_argmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    knobs = _knobs()
    knobs = {k: v.repeat(3) for k, v in knobs.items()}
    knobs["temperature"] = torch.tensor([0.0, 1.0, 0.0])
    out = sample(logits, step=torch.tensor([0, 0, 0]), **knobs)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()
    alone = sample(logits[1:2], step=torch.tensor([0]), **{k: v[1:2] for k, v in knobs.items()})
    assert out[1] == alone[0]  # the sampled row draws as it would alone


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    counts = torch.tensor([[2, 0, 1, 0]])
    seen = torch.tensor([[True, True, True, False]])
    out = apply_penalties(logits, counts, seen, _row(2.0, torch.float32), _row(0.5, torch.float32), _row(0.25, torch.float32))
    assert torch.allclose(out, torch.tensor([[1.0 - 0.5 - 0.5, -4.0, 0.5 - 0.5 - 0.25, 0.5]]))


@settings(max_examples=40, deadline=None)
@given(st.integers(100, 5000), st.floats(0.5, 8.0), st.floats(0.05, 0.999), st.integers(0, 2**31))
def test_nucleus_of_wide_distributions_equals_a_full_sort(vocab, spread, top_p, seed):
    # Flat rows put thousands of tokens in the nucleus: the head-only sort must widen until it ends.
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(seed)) * spread
    ones = torch.ones(3)
    got = allowed_tokens(logits, ones, torch.zeros(3, dtype=torch.int64), ones * top_p, torch.zeros(3))
    probs = torch.softmax(logits, -1)
    for row in range(3):
        ranked, order = probs[row].sort(descending=True)
        inside = (ranked.cumsum(0) - ranked) < top_p
        inside[0] = True
        want = torch.zeros(vocab, dtype=torch.bool)
        want[order[inside]] = True
        assert torch.equal(got[row], want)


def test_rows_of_nan_or_all_banned_logits_still_give_a_valid_token():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    logits[0] = float("nan")
    logits[1] = float("-inf")
    knobs = {k: v.repeat(3) for k, v in _knobs(temperature=0.8, top_p=0.9).items()}
    out = sample(logits, step=torch.tensor([1, 2, 3]), **knobs)
    assert ((0 <= out) & (out < 40)).all()


@pytest.mark.skipif(sampling._race_library() is None, reason="no C compiler to build the CPU kernels")
@settings(max_examples=150, deadline=None)
@given(rows=st.integers(1, 4), vocab=st.sampled_from([1, 2, 7, 8, 9, 64, 300, 49152]), seed=st.integers(0, 2**31 - 1),
       ties=st.booleans(), specials=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["nan", "inf", "-inf"])),
                                             max_size=4))  # fmt: skip
def test_the_c_sampler_greedy_pick_is_torch_argmax(rows, vocab, seed, ties, specials):
    # csrc/sample.c's argmax must give torch's answer: the first of equal maxima, the first NaN if any
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 5
    if ties:
        logits = logits.round()
    for at, value in specials:
        logits.view(-1)[at % logits.numel()] = float(value)
    assert torch.equal(sampling.greedy(logits), logits.argmax(dim=-1))


def _allowed_by_full_sort(probs, top_p, min_p):
    """sampling._allowed stated with a full stable sort: equal probabilities rank by lower id."""
    ranked, order = probs.sort(dim=-1, descending=True, stable=True)
    inside = (ranked.cumsum(-1) - ranked) < top_p[:, None]
    nucleus = torch.zeros_like(inside).scatter(1, order, inside | (top_p[:, None] >= 1))
    top = probs.max(dim=-1, keepdim=True)
    keep = nucleus & (probs >= min_p[:, None] * top.values) & (probs > 0)
    return keep.scatter(1, top.indices, True)


@pytest.mark.skipif(sampling._race_library() is None, reason="no C compiler to build the CPU kernels")
@settings(max_examples=150, deadline=None)
@given(rows=st.integers(1, 4), vocab=st.sampled_from([2, 7, 64, 65, 300, 5000, 49152]), spread=st.floats(0.0, 30.0),
       ties=st.booleans(), top_p=st.sampled_from([1.0, 0.95, 0.5, 0.05]), min_p=st.sampled_from([0.0, 0.05, 1.0]),
       top_k=st.sampled_from([0, 1, 5]), seed=st.integers(-(2**63), 2**63 - 1), step=st.integers(0, 2**40),
       nan_row=st.booleans())  # fmt: skip
def test_the_c_sampler_draws_the_torch_race_token(rows, vocab, spread, ties, top_p, min_p, top_k, seed, step, nan_row):
    # csrc/sample.c sorts only the nucleus' head and skips the log of tokens that cannot win: it must
    # still draw the very token the full torch race does over the same allowed set.
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(abs(seed) % 2**31)) * spread
    if ties:
        logits = logits.round()
    if nan_row:
        logits[-1, vocab // 2] = float("nan")
    full = lambda v, dtype: torch.full((rows,), v, dtype=dtype)  # noqa: E731
    probs = sampling._probabilities(logits, full(0.8, torch.float32), full(top_k, torch.int64))
    top_p, min_p = full(top_p, torch.float32), full(min_p, torch.float32)
    seeds, steps = full(seed, torch.int64), torch.arange(rows) + step
    keys = sampling._row_keys(seeds, steps)
    want = sampling._race_torch(probs, _allowed_by_full_sort(probs, top_p, min_p), keys)
    assert torch.equal(sampling._race_c(sampling._race_library(), probs, top_p, min_p, seeds, steps), want)
    if all(len(set(row.tolist())) == vocab for row in probs):  # torch's own mask agrees where no two are equal
        assert torch.equal(sampling._race_torch(probs, sampling._allowed(probs, top_p, min_p), keys), want)
