"""Shared by the constraint tests: a small JSON Schema validator (jsonschema is not installed here; this
covers the keywords the tests use, with their standard meaning), schemas with every supported feature,
a random-schema generator for hypothesis, and a mixed batch of constrained engine requests."""

from __future__ import annotations

import math
import re

from hypothesis import strategies as st

from llmfn import constraints
from llmfn.engine import GenerationRequest
from llmfn.sampling import SamplingParams as SP

TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def errors(value, schema: dict, path: str = "$") -> list[str]:
    """The ways value breaks schema (empty: valid)."""
    out = []
    bad = lambda why: out.append(f"{path}: {why} ({value!r})")  # noqa: E731
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(TYPES[k](value) for k in kinds):
            bad(f"not {schema['type']}")
            return out
    if "enum" in schema and not any(_same(value, e) for e in schema["enum"]):
        bad("not in enum")
    if "const" in schema and not _same(value, schema["const"]):
        bad("not the const")
    if "anyOf" in schema and all(errors(value, s, path) for s in schema["anyOf"]):
        bad("matches no anyOf branch")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", math.inf):
            bad("length out of range")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            bad("pattern")
    if TYPES["number"](value):
        if value < schema.get("minimum", -math.inf) or value > schema.get("maximum", math.inf):
            bad("out of range")
        if value <= schema.get("exclusiveMinimum", -math.inf) or value >= schema.get("exclusiveMaximum", math.inf):
            bad("out of exclusive range")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", math.inf):
            bad("item count out of range")
        for i, item in enumerate(value):
            out += errors(item, schema.get("items", {}), f"{path}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        out += [f"{path}: missing {k}" for k in schema.get("required", []) if k not in value]
        for k, v in value.items():
            if k in props:
                out += errors(v, props[k], f"{path}.{k}")
            elif schema.get("additionalProperties") is False:
                bad(f"extra property {k}")
    return out


def _same(a, b) -> bool:
    return type(a) is type(b) and a == b or TYPES["number"](a) and TYPES["number"](b) and a == b


SCHEMAS = {
    "enum, const, nested, arrays, bounds": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 2, "maxLength": 8},
            "kind": {"enum": ["cat", "dog", 3, None]},
            "version": {"const": "v1"},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "score": {"type": "number", "minimum": -1, "maximum": 1},
            "ok": {"type": "boolean"},
            "nothing": {"type": "null"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "minItems": 2, "maxItems": 3},
            "inner": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                       "y": {"type": "boolean"}},
                      "required": ["x"], "additionalProperties": False},
        },
        "required": ["name", "kind", "version", "age", "score", "ok", "nothing", "tags", "inner"],
        "additionalProperties": False,
    },
    "anyOf": {"anyOf": [{"type": "integer", "minimum": 100, "maximum": 999}, {"type": "string", "pattern": "^[xyz]{3}$"},
                        {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}]},
    "string pattern": {"type": "string", "pattern": "^[a-c]{2,5}-[0-9]{2}$"},
    "optional properties": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                                             "b": {"type": "null"}},
                            "additionalProperties": False},
    "array of objects": {"type": "array", "minItems": 1, "maxItems": 2,
                         "items": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0,
                                                                           "maximum": 99}},
                                   "required": ["id"], "additionalProperties": False}},
}  # fmt: skip


names = st.sampled_from(["a", "b", "id", "name", "x_y"])
scalars = st.one_of(st.booleans(), st.none(), st.integers(-50, 50), st.sampled_from(["s", "t u", "é"]))
leaves = st.one_of(
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.tuples(st.integers(-100, 100), st.integers(0, 100)).map(
        lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}),
    st.tuples(st.integers(0, 3), st.integers(0, 4)).map(
        lambda t: {"type": "string", "minLength": t[0], "maxLength": t[0] + t[1]}),
    st.just({"type": "number", "minimum": -10, "maximum": 10}),
    st.lists(scalars, min_size=1, max_size=4, unique_by=lambda v: (type(v), v)).map(lambda e: {"enum": e}),
    scalars.map(lambda v: {"const": v}),
    st.sampled_from(["^[a-z]{1,4}$", "^[0-9]{3}$", "^(yes|no)$"]).map(lambda p: {"type": "string", "pattern": p}),
)  # fmt: skip


def _object(children):
    def build(props: dict, required: list[bool]) -> dict:
        return {"type": "object", "properties": props, "additionalProperties": False,
                "required": [k for k, r in zip(props, required, strict=False) if r]}  # fmt: skip

    return st.builds(build, st.dictionaries(names, children, min_size=1, max_size=3),
                     st.lists(st.booleans(), min_size=3, max_size=3))  # fmt: skip


def _array(children):
    return st.builds(lambda item, lo, extra: {"type": "array", "items": item, "minItems": lo, "maxItems": lo + extra},
                     children, st.integers(0, 2), st.integers(0, 2))  # fmt: skip


schemas = st.recursive(
    leaves,
    lambda children: st.one_of(_object(children), _array(children),
                               st.lists(children, min_size=2, max_size=3).map(lambda s: {"anyOf": s})),
    max_leaves=6,
)  # fmt: skip


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["n", "tags"],
          "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}}  # fmt: skip


def constrained_requests(model, ids) -> list[GenerationRequest]:
    """Constraints of every kind, logit biases and plain requests, greedy and sampled, one cut short."""
    c = constraints
    eos = model.tokenizer.eos_ids[0]
    kinds = [c.json_schema(SCHEMA), None, c.regex("[a-f]{3,8}-[0-9]{2}"), c.choice(["red", "green", "blue"]),
             c.json_object(), c.grammar('start: "<" /[a-z]{1,6}/ ">"'), SCHEMA, None, c.json_schema(SCHEMA)]
    settings = [SP(), SP(temperature=0.9, seed=1), SP(temperature=1.3, top_k=40, seed=2), SP(temperature=2.0, seed=3),
                SP(temperature=0.8, top_p=0.9, seed=4), SP(repetition_penalty=1.3), SP(temperature=1.0, seed=5),
                SP(temperature=1.0, seed=6), SP(temperature=0.7, seed=7)]  # fmt: skip
    biases = [None, {eos: -100, 7: 5.5}, None, {eos: 100}, None, None, {9: -100}, {200: 100}, None]
    return [GenerationRequest(ids(5 + 9 * i, 300 + i), max_tokens=6 if i == 8 else 120, sampling=sp,
                              logit_bias=bias, constraint=kind)
            for i, (kind, sp, bias) in enumerate(zip(kinds, settings, biases, strict=True))]  # fmt: skip
