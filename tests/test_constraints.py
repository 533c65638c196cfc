"""Grammar-constrained decoding (llmfn.constraints) and logit_bias, in llmfn.generate / llmfn.chat, on a
tiny random Llama (random weights produce garbage, which makes every constraint visible) and, marked
slow, on the real SmolLM2. The engine's side (batch invariance with constraints) is in test_engine.py."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import threading
import weakref

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmfn
from constrained import SCHEMAS, constrained_requests, errors, schemas
from llmfn import constraints
from llmfn.constraints import Constraint
from llmfn.engine import Engine, GenerationRequest
from llmfn.errors import RequestError
from llmfn.generate import eos_ids
from llmfn.sampling import apply_token_bitmask
from tiny import make_checkpoint, write_tokenizer

CONTEXT = 1024


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("constrain-llama")
    make_checkpoint(folder, "llama", max_position_embeddings=CONTEXT)
    return llmfn.load(folder)


def engine_ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def collect(stream) -> list:
    return [event async for event in stream]


def ask(model, response_format, max_tokens=CONTEXT - 40, **sampling):
    """(text, finish_reason, token ids) of a constrained chat reply."""
    messages = [{"role": "user", "content": "Answer in JSON, please."}]
    stream = llmfn.chat(model, messages, max_tokens=max_tokens, response_format=response_format, **sampling)
    return stream.text(), stream.finish_reason, stream.completion_tokens


def test_the_validator_rejects_what_it_should():
    schema = {"type": "object", "properties": {"a": {"type": "integer", "maximum": 3}}, "required": ["a"],
              "additionalProperties": False}  # fmt: skip
    assert errors({"a": 3}, schema) == []
    assert errors({"a": 4}, schema) and errors({}, schema) and errors({"a": 1, "b": 2}, schema)
    assert errors({"a": True}, schema) and errors("x", {"enum": ["y"]}) and errors("ab", {"pattern": "^a$"})


# ------------------------------------------------------------------------ building constraints


def test_response_format_shapes_become_constraints():
    from pydantic import BaseModel

    class Point(BaseModel):
        x: int
        y: int

    schema = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}}
    assert constraints.as_constraint(None) is None
    assert constraints.as_constraint({"type": "text"}) is None
    assert constraints.as_constraint({"type": "json_object"}) == Constraint("json_object")
    from_dict = constraints.as_constraint(schema)
    assert from_dict.kind == "json_schema" and list(json.loads(from_dict.spec)["properties"]) == ["b", "a"]
    openai = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}
    assert constraints.as_constraint(openai) == from_dict
    assert constraints.json_schema(json.dumps(schema)) == from_dict
    assert json.loads(constraints.as_constraint(Point).spec) == Point.model_json_schema()
    c = constraints.regex("[0-9]+", param="guided_regex")
    assert constraints.as_constraint(c) is c and c == constraints.regex("[0-9]+")  # param is not the value
    assert hash(constraints.choice(["a", "b"])) == hash(constraints.choice(("a", "b")))
    for bad in (42, [1], {"type": "json_schema"}, int):
        with pytest.raises(RequestError) as e:
            constraints.as_constraint(bad, param="guided_json")
        assert e.value.param == "guided_json"
    with pytest.raises(RequestError, match="non-empty list"):
        constraints.choice([])


@pytest.mark.parametrize("constraint, words", [
    (constraints.regex("[a-z", param="guided_regex"), "unclosed character class"),
    (constraints.json_schema({"type": "array", "uniqueItems": True}), "uniqueItems"),
    (constraints.json_schema({"if": {"type": "string"}, "then": {}}), "if"),
    (constraints.json_schema({"type": "object", "dependentRequired": {"a": ["b"]},
                              "x-guidance": {"lenient": True}}), "dependentRequired"),  # a warning
    (constraints.json_schema({"type": "string", "format": "no-such-format"}), "no-such-format"),
    (constraints.json_schema({"type": "string", "pattern": "a(?=b)"}), "look-around"),
    (constraints.grammar("start: missing_rule", param="guided_grammar"), "missing_rule"),
])  # fmt: skip
def test_invalid_or_unsupported_constraints_are_request_errors_naming_them(model, constraint, words):
    with pytest.raises(RequestError, match=re.escape(words)) as e:
        constraints.compile(constraint, model.tokenizer)
    assert e.value.param == constraint.param
    with pytest.raises(RequestError):  # generate() compiles before it returns: no silent fallback
        llmfn.generate(model, [5, 6], max_tokens=4, response_format=constraint)


def test_tokenizer_adapter_and_grammars_are_cached(model, monkeypatch):
    tok = model.tokenizer
    assert constraints.ll_tokenizer(tok) is constraints.ll_tokenizer(tok)
    g = constraints.compile(constraints.regex("[ab]+"), tok)
    assert constraints.compile(constraints.regex("[ab]+", param="other"), tok) is g
    monkeypatch.setattr(constraints, "CACHE_SIZE", 2)
    for n in range(3):
        constraints.compile(constraints.regex(f"x{{{n + 1}}}"), tok)
    assert constraints.compile(constraints.regex("[ab]+"), tok) is not g  # evicted, least recently used


def test_the_adapter_does_not_keep_its_tokenizer_alive(tmp_path):
    write_tokenizer(tmp_path)
    tok = llmfn.load_tokenizer(tmp_path)
    constraints.compile(constraints.regex("a"), tok)
    ref = weakref.ref(tok)
    del tok
    gc.collect()
    assert ref() is None


# ------------------------------------------------------------------------ masks


def allowed_ids(row: torch.Tensor) -> set[int]:
    bits = (row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return set(torch.nonzero(bits.reshape(-1)).flatten().tolist())


def test_masks_never_allow_special_tokens_or_ids_past_the_tokenizer(model):
    tok = model.tokenizer
    specials = set(tok.special_tokens.values())
    eos = set(tok.eos_ids)
    words = constraints.bitmask_words(len(tok))
    m = constraints.compile(constraints.regex(r"[\s\S]{0,8}"), tok).matcher(stop_ids=eos)
    row = m.allowed(torch.full((words + 3,), -1, dtype=torch.int32))  # a model with 96 more ids
    ids = allowed_ids(row)
    assert max(ids) < len(tok) and ids & specials == eos  # accepting already: EOS may end it
    assert len(ids) > len(tok) // 2
    m.advance(next(i for i in sorted(ids) if i not in eos))
    none = constraints.compile(constraints.regex("ab"), tok).matcher(stop_ids=eos)
    assert allowed_ids(none.allowed(torch.zeros(words, dtype=torch.int32))) & specials == set()  # not accepting
    assert allowed_ids(none.allowed(torch.zeros(words - 1, dtype=torch.int32))) <= set(range(32 * (words - 1)))


def test_a_tokenizer_without_eos_gets_a_stand_in_that_is_never_allowed(tmp_path):
    from tokenizers import Tokenizer as HF

    write_tokenizer(tmp_path)
    tok = llmfn.Tokenizer(HF.from_file(str(tmp_path / "tokenizer.json")))
    assert tok.eos_ids == ()
    m = constraints.compile(constraints.regex("[a-z]{0,3}"), tok).matcher()
    ids = allowed_ids(m.allowed(torch.zeros(constraints.bitmask_words(len(tok)) + 1, dtype=torch.int32)))
    assert ids and max(ids) < len(tok) and not ids & set(tok.special_tokens.values())


def test_apply_token_bitmask_is_masked_fill():
    torch.manual_seed(0)
    logits = torch.randn(3, 70)
    allow = torch.rand(3, 70) < 0.3
    allow[:, 0] = True
    bitmask = torch.zeros(3, 2, dtype=torch.int32)  # covers ids 0..63: 64..69 are never allowed
    for b, t in allow[:, :64].nonzero().tolist():
        word = int(bitmask[b, t // 32]) & 0xFFFFFFFF | (1 << (t % 32))
        bitmask[b, t // 32] = word - (1 << 32) if word >= 1 << 31 else word
    allow[:, 64:] = False
    expected = logits.masked_fill(~allow, float("-inf"))
    assert torch.equal(apply_token_bitmask(logits, bitmask), expected)


def test_sentencepiece_tokens_with_a_dummy_prefix_space_are_not_allowed_first(tmp_path):
    pytest.importorskip("sentencepiece")
    from fixtures_tokenizers import train_sentencepiece

    tok = llmfn.load_tokenizer(train_sentencepiece(tmp_path, "bpe"))
    spaced = {i for i in range(len(tok)) if tok.first_token_bytes(i) != tok.token_bytes(i)}
    assert spaced
    m = constraints.compile(constraints.regex("[a-z ]{1,20}"), tok).matcher()
    row = torch.zeros(constraints.bitmask_words(len(tok)), dtype=torch.int32)
    first = allowed_ids(m.allowed(row))
    assert first and not first & spaced  # the text the user sees is what the grammar saw
    assert not first & (set(tok.special_tokens.values()) | {tok.bos_id, *tok.eos_ids})
    m.advance(min(first))
    assert allowed_ids(m.allowed(row)) & spaced  # mid-text they read as the grammar reads them


# ------------------------------------------------------------------------ generation on the tiny model

@pytest.mark.parametrize("name", list(SCHEMAS))
@pytest.mark.parametrize("temperature, seed", [(0.0, None), (1.0, 1), (2.0, 2)])
def test_json_schema_outputs_parse_and_validate(model, name, temperature, seed):
    schema = SCHEMAS[name]
    text, reason, _ = ask(model, schema, temperature=temperature, seed=seed)
    assert reason == "stop"
    assert errors(json.loads(text), schema) == [], text


def test_json_object_regex_and_choice(model):
    for seed in range(3):
        text, reason, _ = ask(model, {"type": "json_object"}, max_tokens=150, temperature=1.0, seed=seed, top_k=20)
        if reason == "stop":  # random keys may run past max_tokens; a stopped answer must be an object
            assert isinstance(json.loads(text), dict)
        pattern = r"(ab|c)[0-9]{2,4}\.[a-z]{1,8}( [xyz]+)?"
        text, reason, _ = ask(model, constraints.regex(pattern), max_tokens=200, temperature=1.5, seed=seed)
        assert re.fullmatch(pattern, text) and reason == "stop"
        options = ["yes", "no", "maybe so", 'with "quotes"', "日本"]
        text, reason, _ = ask(model, constraints.choice(options), temperature=2.0, seed=seed)
        assert text in options and reason == "stop"
    text, reason, _ = ask(model, constraints.grammar('start: "(" item ("," item)* ")"\nitem: /[0-9]/ | "x"'),
                          temperature=1.0, seed=4)  # fmt: skip
    assert re.fullmatch(r"\(([0-9x])(,[0-9x])*\)", text) and reason == "stop"


def test_a_complete_grammar_stops_without_eos_and_max_tokens_gives_length(model):
    eos = set(eos_ids(model))
    ids = list(llmfn.generate(model, [5, 6, 7], max_tokens=50, response_format=constraints.choice(["abc", "xyz"])))
    assert model.tokenizer.decode(ids) in ("abc", "xyz") and not set(ids) & eos  # ended by the grammar
    full, reason, n = ask(model, SCHEMAS["array of objects"])
    partial, short_reason, m = ask(model, SCHEMAS["array of objects"], max_tokens=n - 2)
    assert reason == "stop" and short_reason == "length" and m == n - 2
    assert full.startswith(partial) and partial != full


def test_eos_comes_only_where_the_grammar_accepts(model):
    """A +100 bias on EOS ends an unconstrained reply at once; under a constraint EOS stays masked
    until the output is complete, and then it is taken."""
    eos = model.tokenizer.eos_ids[0]
    plain = llmfn.chat(model, [{"role": "user", "content": "hi"}], max_tokens=20, logit_bias={eos: 100})
    assert plain.text() == "" and plain.finish_reason == "stop" and plain.completion_tokens == 1
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 5}
    text, reason, _ = ask(model, schema, logit_bias={eos: 100}, temperature=1.0, seed=0)
    assert reason == "stop" and errors(json.loads(text), schema) == []


def test_constrained_greedy_is_the_argmax_of_the_masked_logits(model):
    prompt = model.tokenizer.encode("Some JSON: ")
    schema = SCHEMAS["enum, const, nested, arrays, bounds"]
    out = list(llmfn.generate(model, prompt, max_tokens=300, response_format=schema))
    assert errors(json.loads(model.tokenizer.decode(out)), schema) == []
    full = llmfn.logits(model, torch.tensor([prompt + out]))[0, len(prompt) - 1 :]  # [T + 1, V]
    m = constraints.compile(constraints.json_schema(schema), model.tokenizer).matcher(model.tokenizer.eos_ids)
    row = torch.zeros(constraints.bitmask_words(model.cfg.vocab_size), dtype=torch.int32)
    steered = 0
    for i, token in enumerate(out):
        masked = apply_token_bitmask(full[i : i + 1], m.allowed(row)[None])[0]
        assert masked[token] >= masked.max() - 1e-4  # the argmax (up to full-vs-incremental rounding)
        steered += int(full[i].argmax()) != token
        m.advance(token)
    assert m.finished and steered > len(out) // 2  # the grammar, not the model, chose most tokens


# ------------------------------------------------------------------------ random schemas (hypothesis)

@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=schemas, seed=st.integers(0, 2**32 - 1), temperature=st.floats(0.0, 2.0), top_p=st.sampled_from([1.0, 0.8]))
def test_random_schemas_always_yield_valid_outputs(model, schema, seed, temperature, top_p):
    text, reason, _ = ask(model, schema, temperature=temperature, seed=seed, top_p=top_p)
    assert reason == "stop", (schema, text)
    assert errors(json.loads(text), schema) == [], (schema, text)


# ------------------------------------------------------------------------ logit_bias


def test_logit_bias_bans_and_forces_tokens(model):
    prompt = [5, 17, 42, 99]
    plain = list(llmfn.generate(model, prompt, max_tokens=8, stop_token_ids=[]))
    banned = list(llmfn.generate(model, prompt, max_tokens=8, stop_token_ids=[], logit_bias={plain[0]: -100}))
    assert banned[0] != plain[0] and plain[0] not in banned
    for temperature in (0.0, 1.0):
        forced = list(llmfn.generate(model, prompt, max_tokens=8, stop_token_ids=[], temperature=temperature,
                                     seed=3, logit_bias={"77": 100}))  # fmt: skip
        assert forced == [77] * 8  # JSON's string keys work too
    letter = model.tokenizer.encode("q")[0]
    both = list(llmfn.generate(model, prompt, max_tokens=6, logit_bias={letter: 100},
                               response_format=constraints.regex("[0-9]{6}")))  # fmt: skip
    assert re.fullmatch("[0-9]{6}", model.tokenizer.decode(both))  # the grammar wins over the bias


@pytest.mark.parametrize("bias, words", [
    ({384: 1}, "not an integer in [0, 384)"), ({-1: 1}, "not an integer"), ({"x": 1}, "'x'"),
    ({5: 101}, "[-100, 100]"), ({5: "1"}, "[-100, 100]"), ({5: float("nan")}, "[-100, 100]"), ([5], "map"),
])  # fmt: skip
def test_bad_logit_bias_is_a_request_error(model, bias, words):
    with pytest.raises(RequestError, match=re.escape(words)) as e:
        llmfn.generate(model, [5], max_tokens=2, logit_bias=bias)
    assert e.value.param == "logit_bias"


def test_matchers_are_independent_across_threads(model):
    """Sequences compiled from one cached grammar never share state, whatever thread runs them."""
    schema = SCHEMAS["array of objects"]
    expected = ask(model, schema, temperature=1.0, seed=11)
    got = []
    threads = [threading.Thread(target=lambda: got.append(ask(model, schema, temperature=1.0, seed=11)))
               for _ in range(3)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [expected] * 3


# ------------------------------------------------------------------------ the engine


def test_constrained_engine_tokens_equal_generate(model):
    reqs = [r for r in constrained_requests(model, engine_ids) if r.sampling.repetition_penalty == 1.0]
    with Engine(model, max_running=4, prefill_chunk=16) as engine:
        got = engine.generate_many(reqs)
    for req, result in zip(reqs, got, strict=True):
        sp = req.sampling
        ref = llmfn.generate(model, req.prompt_ids, max_tokens=req.max_tokens, temperature=sp.temperature,
                             top_k=sp.top_k, top_p=sp.top_p, seed=sp.seed, logit_bias=req.logit_bias,
                             response_format=req.constraint)  # fmt: skip
        assert result.token_ids == list(ref)


def test_constraints_compile_at_submit_and_a_bad_one_fails_only_its_request(model, monkeypatch):
    threads = []
    compile_ = constraints.compile
    monkeypatch.setattr(llmfn.constraints, "compile", lambda *a: threads.append(threading.current_thread()) or compile_(*a))
    good = GenerationRequest(engine_ids(6, 1), 40, constraint=constraints.choice(["yes", "no"]))
    bad = [GenerationRequest(engine_ids(6, 2), 8, constraint=constraints.regex("(", param="guided_regex")),
           GenerationRequest(engine_ids(6, 2), 8, constraint={"type": "array", "uniqueItems": True}),
           GenerationRequest(engine_ids(6, 2), 8, constraint="[0-9]"),
           GenerationRequest(engine_ids(6, 2), 8, logit_bias={384: 1})]  # fmt: skip

    async def main():
        with Engine(model, max_running=2) as engine:
            stream = engine.submit(good)
            params = []
            for req in bad:
                with pytest.raises(RequestError) as err:
                    engine.submit(req)
                params.append(err.value.param)
            return params, await collect(stream)

    params, events = run(main())
    assert params == ["guided_regex", "constraint", "constraint", "logit_bias"]
    assert "".join(e.text for e in events) in ("yes", "no") and events[-1].finish_reason == "stop"
    assert threads and all(t is threading.main_thread() for t in threads)  # never the loop thread


# ------------------------------------------------------------------------ the real model


@pytest.fixture(scope="module")
def smollm2():
    return llmfn.load("smollm2-135m-instruct")


@pytest.mark.slow
def test_smollm2_answers_in_a_pydantic_model_and_other_constraints(smollm2):
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        country: str
        population: int

    ask_ = lambda text, **kw: llmfn.chat(smollm2, [{"role": "user", "content": text}], **{"temperature": 0.0, **kw})  # noqa: E731
    reply = ask_("Describe Paris as JSON with name, country and population.", max_tokens=80, response_format=City)
    city = City.model_validate_json(reply.text())
    assert reply.finish_reason == "stop" and city.name
    reply = ask_("List three colors as a JSON object.", max_tokens=80, response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.text()), dict) and reply.finish_reason == "stop"
    reply = ask_("Is Paris in France? Answer yes or no.", max_tokens=8, response_format=constraints.choice(["yes", "no"]))
    assert reply.text() in ("yes", "no") and reply.finish_reason == "stop"
    date = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"  # (\d is any Unicode digit, in Rust's regex as in Python's)
    reply = ask_("Give a date.", max_tokens=20, response_format=constraints.regex(date), temperature=0.8, seed=1)
    assert re.fullmatch(date, reply.text()) and reply.finish_reason == "stop"
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}, "unit": {"enum": ["m", "km"]}},
              "required": ["answer", "unit"], "additionalProperties": False}  # fmt: skip
    for seed in range(3):
        reply = ask_("How far is the moon?", max_tokens=60, temperature=1.0, seed=seed,
                     response_format={"type": "json_schema", "json_schema": {"name": "d", "schema": schema}})
        assert errors(json.loads(reply.text()), schema) == [] and reply.finish_reason == "stop"
