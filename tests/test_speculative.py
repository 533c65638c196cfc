"""Speculative decoding changes nothing but the speed: with n-gram or draft-model drafting, generate
and chat give token for token the output of plain decoding, greedy and seeded sampling with
penalties alike, over tiny random models of every family and SmolLM2."""

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmfn
from llmfn import speculative
from llmfn.backend import forward_for
from llmfn.models import family
from llmfn.speculative import DraftLength, NgramDrafter, SpeculativeConfig
from test_families import _hf, _write, baichuan_config_json, baichuan_tensors, write_qwen1
from tiny import make_checkpoint

GREEDY = dict(temperature=0.0)
SAMPLED = dict(temperature=0.9, top_p=0.95, top_k=40, seed=11, repetition_penalty=1.2, presence_penalty=0.4,
               frequency_penalty=0.3)  # fmt: skip
# A prompt that repeats itself, so prompt lookup finds matches from the first step on.
PROMPT = [5, 17, 100, 33, 250, 7, 91, 12] * 3 + [5, 17, 100]


def _run(model, prompt, spec=None, max_tokens=48, stats=None, **kw):
    kw = {"stop_token_ids": [], **kw}
    return list(llmfn.generate(model, prompt, max_tokens=max_tokens, speculative=spec, stats=stats, **kw))


_PLAIN = {}


def _plain(model, sampling, max_tokens=48):
    """Plain decoding of PROMPT, computed once per model and settings (the tests compare against it)."""
    key = (id(model), tuple(sampling.items()), max_tokens)
    if key not in _PLAIN:
        _PLAIN[key] = _run(model, PROMPT, max_tokens=max_tokens, **sampling)
    return _PLAIN[key]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny random models of every Llama-layout family llmfn reads (by name)."""
    root = tmp_path_factory.mktemp("spec")
    models = {}
    for name, fam, extra in (("llama", "llama", {}), ("mistral", "mistral", {"sliding_window": 9}),
                             ("qwen2", "qwen2", {})):  # fmt: skip
        make_checkpoint(root / name, fam, **extra)
        models[name] = llmfn.load(root / name)
    # Qwen-1 with dynamic NTK and logn past its 32-token trained length: generations run past 64 tokens.
    models["qwen1"] = llmfn.load(write_qwen1(root / "qwen1", _hf("qwen2"), seq_length=32))
    hf = _hf("llama", seed=7, num_attention_heads=4, num_key_value_heads=4, hidden_size=64)
    models["baichuan13b"] = llmfn.load(_write(root / "baichuan", baichuan_config_json(hf, alibi=True), baichuan_tensors(hf)))
    return models


FAMILIES = ["llama", "mistral", "qwen2", "qwen1", "baichuan13b"]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_ngram_output_equals_plain_decoding(tiny, name, sampling):
    model = tiny[name]
    stats = {}
    spec = {"method": "ngram", "min_ngram": 1}  # random models' text repeats single tokens more than pairs
    assert _run(model, PROMPT, spec, max_tokens=60, stats=stats, **sampling) == _plain(model, sampling, 60)
    assert stats["drafted"] > 0  # speculation ran, not a fallback to plain steps


@pytest.mark.parametrize("name", FAMILIES)
def test_draft_model_output_equals_plain_decoding(tiny, name):
    """Drafts from the model itself (all kept), from its int8 copy (mostly kept) and from another
    family's random model (mostly rejected): every drafted run equals the plain one."""
    model = tiny[name]
    other = tiny["qwen2" if name == "llama" else "llama"]
    for sampling, draft in ((GREEDY, model), (SAMPLED, model), (GREEDY, other), (SAMPLED, other)):
        stats = {}
        spec = SpeculativeConfig(method="draft", draft=draft, k=5)
        assert _run(model, PROMPT, spec, stats=stats, **sampling) == _plain(model, sampling)
        assert stats["drafted"] > 0
        if draft is model and sampling is GREEDY and name != "qwen1":
                # A model drafting for itself is always right (Qwen-1's drafts may span a change of its
            # dynamic rope base, which the target's verify passes never do).
            assert stats["accepted"] == stats["drafted"]


def test_verify_pass_logits_equal_single_steps_bitwise(tiny):
    """The crux: a forward over k + 1 positions gives bitwise the logits of k + 1 decode steps."""
    for name in FAMILIES:
        model = tiny[name]
        cfg, params, forward = model.cfg, model.params, forward_for(model, decode=True)
        assert speculative.verify_rows(model) == 16
        tokens = torch.randint(0, cfg.vocab_size, (1, 80), generator=torch.Generator().manual_seed(3))
        runs = []
        for chunk in (1, 5, 16):
            with torch.inference_mode():
                cache = family(cfg).init_cache(cfg, 1, 128)
                _, cache = forward(params, cfg, tokens[:, :40], torch.arange(40)[None], cache)
                outs, s = [], 40
                while s < 80:
                    e = min(s + chunk, 80)
                    while not speculative.same_rope(cfg, s, e - 1):  # Qwen-1's rope base changes at 64
                        e -= 1
                    out, cache = forward(params, cfg, tokens[:, s:e], torch.arange(s, e)[None], cache)
                    outs.append(out[0])
                    s = e
            runs.append(torch.cat(outs))
        assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2]), name


def test_max_tokens_and_stop_ids_end_a_verified_chunk(tiny):
    """No token past max_tokens or a stop id is yielded, wherever it falls in a verified chunk."""
    model = tiny["llama"]
    full = _plain(model, GREEDY)
    for max_tokens in (1, 2, 3, 7, 16, 17):
        assert _run(model, PROMPT, "ngram", max_tokens=max_tokens) == full[:max_tokens]
        assert _run(model, PROMPT, SpeculativeConfig(method="draft", draft=model), max_tokens=max_tokens) == full[:max_tokens]
    for stop in sorted(set(full[1:30]))[:6]:
        want = full[: full.index(stop) + 1]
        assert _run(model, PROMPT, "ngram", stop_token_ids=[stop]) == want
        assert _run(model, PROMPT, {"method": "draft", "draft": model}, stop_token_ids=[stop]) == want


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    unit=st.lists(st.integers(3, 383), min_size=1, max_size=6),
    repeats=st.integers(1, 6),
    tail=st.lists(st.integers(3, 383), max_size=4),
    max_tokens=st.integers(1, 32),
    seed=st.integers(0, 2**31),
    sampled=st.booleans(),
)
def test_prompts_with_repeats_give_the_plain_output(tiny, unit, repeats, tail, max_tokens, seed, sampled):
    model = tiny["llama"]
    prompt = unit * repeats + tail
    sampling = {**SAMPLED, "seed": seed} if sampled else GREEDY
    plain = _run(model, prompt, max_tokens=max_tokens, **sampling)
    spec = SpeculativeConfig(min_ngram=1, max_ngram=2, k=15)
    assert _run(model, prompt, spec, max_tokens=max_tokens, **sampling) == plain


def test_chat_stop_strings_logit_bias_and_grammar_behave_as_without(tiny):
    model = tiny["llama"]
    messages = [{"role": "user", "content": "one two three one two three one two three one two"}]

    def reply(**kw):
        stream = llmfn.chat(model, messages, max_tokens=48, **kw)
        return list(stream), stream.finish_reason, stream.completion_tokens

    plain = reply(**SAMPLED)
    text = "".join(plain[0])
    for stop in sorted({text[i : i + 2] for i in range(0, min(len(text) - 2, 30), 6)} | {text[-1:]}):
        for spec in ("ngram", {"method": "draft", "draft": model, "k": 7}):
            assert reply(stop=stop, speculative=spec, **SAMPLED) == reply(stop=stop, **SAMPLED)
    bias = {t: 5.0 for t in PROMPT[:4]}
    assert reply(logit_bias=bias, speculative="ngram", **GREEDY) == reply(logit_bias=bias, **GREEDY)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    with_grammar = reply(response_format=schema, speculative="ngram", **SAMPLED)
    assert with_grammar == reply(response_format=schema, **SAMPLED)
    json.loads("".join(with_grammar[0]))


def test_bad_speculative_arguments_are_request_errors(tiny):
    model = tiny["llama"]
    for bad in ("medusa", {"method": "draft"}, {"k": 0}, {"k": 16}, {"min_ngram": 3, "max_ngram": 2}, {"width": 3}, 7,
                {"method": "draft", "draft": tiny["llama"].tokenizer}):  # fmt: skip
        with pytest.raises(llmfn.RequestError) as err:
            llmfn.generate(model, PROMPT, max_tokens=4, speculative=bad)
        assert err.value.param == "speculative"


def test_without_exact_verification_speculation_falls_back_to_plain_steps(tiny, tmp_path):
    """fp16 steps take torch's kernels, whose results may depend on the rows beside them: no drafts.
    (bf16 models now decode on the C kernels: tests/test_bf16_decode.py.)"""
    make_checkpoint(tmp_path / "fp16", "llama")
    model = llmfn.load(tmp_path / "fp16", dtype="float16")
    assert speculative.verify_rows(model) == 0
    stats = {}
    assert _run(model, PROMPT, "ngram", max_tokens=12, stats=stats) == _run(model, PROMPT, max_tokens=12)
    assert stats["drafted"] == 0


def _brute_force_ngram(tokens, k, min_n, max_n):
    """The most recent earlier occurrence of the longest matching suffix n-gram, by a plain scan."""
    for n in range(max_n, min_n - 1, -1):
        if n > len(tokens):
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(st.integers(0, 4), min_size=1, max_size=40), k=st.integers(1, 8), split=st.integers(0, 40),
       sizes=st.sampled_from([(1, 1), (1, 3), (2, 4)]))  # fmt: skip
def test_ngram_drafter_proposes_what_a_scan_finds(tokens, k, split, sizes):
    drafter = NgramDrafter(*sizes)
    drafter.propose(tokens[: max(1, min(split, len(tokens)))], k)  # the index grows incrementally
    assert drafter.propose(tokens, k) == _brute_force_ngram(tokens, k, *sizes)


def test_draft_length_grows_with_acceptance_and_falls_to_zero():
    length = DraftLength(k_max=10, cost=0.2)
    for _ in range(40):
        length.observe(8, 8)
    assert length.next(15) >= 6
    assert length.next(2) == 2  # capped by the tokens left
    for _ in range(40):
        length.observe(3, 0)
    drafts = [length.next(15) for _ in range(64)]
    assert drafts.count(0) == 63 and drafts[-1] == 1  # failed probes: one probe in 8 * 8 steps
    length.observe(1, 1)  # a probe was kept: probes come every 8 steps again
    drafts = [length.next(15) for _ in range(8)]
    assert drafts.count(0) == 7 and drafts[-1] == 1


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "int4"])
def test_smollm2_chat_with_speculation_equals_without(quantize):
    model = llmfn.load("smollm2-135m-instruct", compile=False, quantize=quantize)
    code = "def area(width, height):\n    result = width * height\n    return result\n"
    messages = [{"role": "user", "content": f"Rename `result` to `total` in this code:\n{code}"}]
    mild = dict(temperature=0.5, top_p=0.9, seed=5, repetition_penalty=1.05, frequency_penalty=0.1)
    for sampling in (GREEDY, mild):
        plain = llmfn.chat(model, messages, max_tokens=40, **sampling)
        text = plain.text()
        fast = llmfn.chat(model, messages, max_tokens=40, speculative="ngram", **sampling)
        assert fast.text() == text and fast.completion_tokens == plain.completion_tokens
        if sampling is GREEDY:
            assert fast.stats["accepted"] > 0  # the answer copies the code: drafts were kept
