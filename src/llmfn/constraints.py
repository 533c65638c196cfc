"""Grammar-constrained decoding: the output of a request stays inside a JSON schema, a regex, a list of
choices or a Lark grammar, enforced token by token with llguidance (github.com/guidance-ai/llguidance).

    c = constraints.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    grammar = constraints.compile(c, model.tokenizer)       # checked and cached; RequestError if invalid
    m = grammar.matcher(stop_ids=eos)                       # one per sequence
    m.allowed(row)                                          # int32 bitmask [ceil(V/32)] of the next tokens
    m.advance(token)                                        # after sampling; m.finished: nothing can follow

A `Constraint` is a small frozen value (kind + spec), so it hashes and compiled grammars are cached by
(tokenizer, constraint). Compiling happens where a request is checked, on the caller's thread; the
engine's loop only asks matchers for masks (tens of microseconds each) and advances them.

The mask is a pure function of the sequence's own tokens, so constrained sampling keeps the engine's
batch invariance. Special tokens (chat markers, EOS) are never produced as grammar text; a stop id
(the model's EOS or the request's stop_token_ids) is allowed exactly when the grammar accepts.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import llguidance
import numpy as np
import torch

from llmfn.errors import LlmfnError, RequestError
from llmfn.tokenizer import Tokenizer

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
# JSON output on one line with json.dumps' separators; a schema's "x-guidance" overrides these.
# Flexible whitespace lets weak models loop on newlines without ever closing the object.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 64  # compiled grammars kept per tokenizer
_UNSUPPORTED = ("unsupported", "unimplemented", "not supported", "unknown format", "ignor")


@dataclass(frozen=True)
class Constraint:
    """What the output must match. kind: "json_schema" (spec: the schema as JSON text),
    "json_object" (any JSON object), "regex" (the whole output matches), "choice" (spec: the
    alternatives; the output is exactly one of them) or "grammar" (a Lark grammar, llguidance's
    dialect). `param` names the request field it came from, for error messages; it is not part of
    the value (equal constraints share one compiled grammar). Build one with the helpers below."""

    kind: str
    spec: str | tuple[str, ...] = ""
    param: str = field(default="response_format", compare=False)


def json_schema(schema, *, param: str = "response_format") -> Constraint:
    """A JSON schema: a dict, its JSON text, or a pydantic model class (its model_json_schema())."""
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        schema = schema.model_json_schema()
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise RequestError(f"{param}: the JSON schema is not valid JSON ({exc})", param=param) from None
    if not isinstance(schema, dict):
        raise RequestError(f"{param}: a JSON schema must be an object, got {type(schema).__name__}", param=param)
    try:
        text = json.dumps(schema, ensure_ascii=False, allow_nan=False)  # key order kept: it orders the output
    except (TypeError, ValueError) as exc:
        raise RequestError(f"{param}: the JSON schema is not JSON-serializable ({exc})", param=param) from None
    return Constraint("json_schema", text, param)


def json_object(*, param: str = "response_format") -> Constraint:
    """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
    return Constraint("json_object", "", param)


def regex(pattern: str, *, param: str = "response_format") -> Constraint:
    """The whole output matches the regex (Rust regex syntax: no look-around or backreferences)."""
    if not isinstance(pattern, str):
        raise RequestError(f"{param}: a regex must be a string", param=param)
    return Constraint("regex", pattern, param)


def choice(options: Sequence[str], *, param: str = "response_format") -> Constraint:
    """The output is exactly one of the strings."""
    if isinstance(options, str) or not options or not all(isinstance(o, str) for o in options):
        raise RequestError(f"{param}: choices must be a non-empty list of strings", param=param)
    return Constraint("choice", tuple(options), param)


def grammar(lark: str, *, param: str = "response_format") -> Constraint:
    """A Lark grammar in llguidance's dialect (`start` is the root rule; `%json {...}` inlines a schema)."""
    if not isinstance(lark, str):
        raise RequestError(f"{param}: a grammar must be a string", param=param)
    return Constraint("grammar", lark, param)


def as_constraint(value, *, param: str = "response_format") -> Constraint | None:
    """A Constraint from what `response_format=` accepts: None or {"type": "text"} (none), a Constraint,
    {"type": "json_object"}, OpenAI's {"type": "json_schema", "json_schema": {"schema": ...}}, a JSON
    schema dict, or a pydantic model class."""
    if value is None or isinstance(value, Constraint):
        return value
    if isinstance(value, type):
        if hasattr(value, "model_json_schema"):
            return json_schema(value, param=param)
        raise RequestError(f"{param}: expected a pydantic model class, got {value.__name__}", param=param)
    if not isinstance(value, dict):
        raise RequestError(f"{param}: expected a JSON schema, a response_format object or a Constraint, "
                           f"got {type(value).__name__}", param=param)  # fmt: skip
    kind = value.get("type")
    if kind == "text" and len(value) == 1:
        return None
    if kind == "json_object":
        return json_object(param=param)
    if kind == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, dict) or "schema" not in inner:
            raise RequestError(f'{param}: "json_schema" needs a "json_schema" object with a "schema"', param=param)
        return json_schema(inner["schema"], param=param)
    return json_schema(value, param=param)


# ------------------------------------------------------------------------------------------ compiling


class _Adapter:
    """llguidance's view of one llmfn Tokenizer (built once per tokenizer): every token's bytes, with
    special tokens marked by a leading 0xFF byte so grammar text never produces them."""

    def __init__(self, tok: Tokenizer):
        n = len(tok)
        specials = set(tok.special_tokens.values()) | set(tok.eos_ids)
        if tok.bos_id is not None:
            specials.add(tok.bos_id)
        tokens = [b"\xff" + tok.token_bytes(i) if i in specials else tok.token_bytes(i) for i in range(n)]
        self.fake_eos: int | None = None
        eos = tok.eos_ids[0] if tok.eos_ids else None
        if eos is None:  # llguidance needs an EOS id: one past the vocabulary, never let through
            eos = self.fake_eos = n
            tokens.append(b"\xff<|llmfn-eos|>")
        ref = weakref.ref(tok)  # the cache is keyed weakly by the tokenizer: hold it weakly too

        class _Source:  # what llguidance.TokenizerWrapper reads
            eos_token_id, bos_token_id, special_token_ids = eos, tok.bos_id, sorted(specials)

            def __init__(self):
                self.tokens = tokens

            def __call__(self, text):
                if not isinstance(text, str):  # bytes: TokenizerWrapper then passes str
                    raise TypeError("text only")
                return ref().encode(text)

        self.ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Source()))
        self.words = bitmask_words(len(tokens))
        # A SentencePiece token with a dummy-prefix space reads without it at the start of a text:
        # the grammar sees the mid-text bytes, so such tokens are not allowed first.
        first = [i for i in range(n) if tok.first_token_bytes(i) != tok.token_bytes(i)]
        self.start_ok: np.ndarray | None = None
        if first:
            ok = np.full(self.words * 32, 1, dtype=np.uint8)
            ok[first] = 0
            self.start_ok = np.packbits(ok, bitorder="little").view(np.uint32)
        self.cache: OrderedDict[Constraint, Grammar] = OrderedDict()
        self.lock = threading.Lock()


_ADAPTERS: weakref.WeakKeyDictionary[Tokenizer, _Adapter] = weakref.WeakKeyDictionary()
_ADAPTERS_LOCK = threading.Lock()


def ll_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's tokenizer for an llmfn Tokenizer (built once, ~0.1 s for 50k tokens, then cached)."""
    return _adapter(tokenizer).ll


def _adapter(tokenizer: Tokenizer) -> _Adapter:
    with _ADAPTERS_LOCK:
        adapter = _ADAPTERS.get(tokenizer)
        if adapter is None:
            adapter = _ADAPTERS[tokenizer] = _Adapter(tokenizer)
        return adapter


def bitmask_words(vocab: int) -> int:
    """int32 words in a token bitmask row for `vocab` tokens (bit j of word w: token 32*w + j)."""
    return (vocab + 31) // 32


def _grammar_text(c: Constraint) -> str:
    if c.kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(c.spec, defaults=JSON_OPTIONS)
    if c.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if c.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(c.spec)
    if c.kind == "choice":  # Lark string literals take JSON's escapes
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(o, ensure_ascii=False) for o in c.spec))
    if c.kind == "grammar":
        return llguidance.LLMatcher.grammar_from_lark(c.spec)
    raise RequestError(f"{c.param}: unknown constraint kind {c.kind!r} (one of {', '.join(KINDS)})", param=c.param)


class Grammar:
    """A constraint compiled for one tokenizer: hands out a fresh Matcher per sequence."""

    def __init__(self, constraint: Constraint, adapter: _Adapter, pristine: llguidance.LLMatcher):
        self.constraint = constraint
        self._adapter = adapter
        self._pristine = pristine  # never advanced; copied (a few microseconds) per sequence

    def matcher(self, stop_ids: Iterable[int] = ()) -> Matcher:
        with self._adapter.lock:
            m = self._pristine.deep_copy()
        return Matcher(m, self._adapter, stop_ids)


def compile(constraint: Constraint, tokenizer: Tokenizer) -> Grammar:
    """Compile a constraint for a tokenizer, or take it from the cache. RequestError (naming
    constraint.param) when the schema, regex or grammar is invalid or uses something llguidance does
    not support: never a silently looser constraint."""
    if not isinstance(constraint, Constraint):
        raise RequestError(f"expected a Constraint, got {type(constraint).__name__}", param="response_format")
    adapter = _adapter(tokenizer)
    with adapter.lock:
        hit = adapter.cache.get(constraint)
        if hit is not None:
            adapter.cache.move_to_end(constraint)
            return hit
    param = constraint.param
    try:
        text = _grammar_text(constraint)
    except ValueError as exc:
        raise RequestError(f"{param}: {exc}", param=param) from None
    m = llguidance.LLMatcher(adapter.ll, text, log_level=0)  # builds the lexer; drops the GIL
    problems = [m.get_error()] if m.is_error() else []
    problems += [w for w in m.get_grammar_warnings() if _unsupported(w)]  # e.g. keys a lenient schema skips
    if problems:
        what = "not supported" if any(map(_unsupported, problems)) else f"invalid {constraint.kind.replace('_', ' ')}"
        raise RequestError(f"{param}: {what}: {'; '.join(map(_brief, problems))}", param=param)
    compiled = Grammar(constraint, adapter, m)
    with adapter.lock:
        adapter.cache[constraint] = compiled
        while len(adapter.cache) > CACHE_SIZE:
            adapter.cache.popitem(last=False)
    return compiled


def _unsupported(message: str) -> bool:
    return any(k in message.lower() for k in _UNSUPPORTED)


def _brief(message: str) -> str:
    """llguidance's message without its source excerpts: the first line and the `error:` lines."""
    lines = [x.strip() for x in message.strip().splitlines() if x.strip()]
    if not lines:
        return "unknown error"
    return " ".join([lines[0]] + [x for x in lines[1:] if x.startswith("error:")])


# ------------------------------------------------------------------------------------------ matching


class Matcher:
    """One sequence's place in its grammar. `allowed` gives the tokens that may come next, `advance`
    takes the sampled one. Used by one thread at a time (the engine's loop, or generate's caller)."""

    def __init__(self, m: llguidance.LLMatcher, adapter: _Adapter, stop_ids: Iterable[int]):
        self._m = m
        self._adapter = adapter
        self._stop = sorted(set(stop_ids))
        self.tokens = 0  # consumed so far

    @property
    def accepting(self) -> bool:
        """The output so far is a complete match (a stop id may end it)."""
        return self._m.is_accepting()

    @property
    def finished(self) -> bool:
        """Nothing more can follow: the output is complete without a stop token."""
        return self._m.is_stopped()

    def allowed(self, row: torch.Tensor) -> torch.Tensor:
        """Fill `row` (a contiguous CPU int32 tensor [W]) with the bitmask of the tokens allowed next and
        return it. Ids past the tokenizer's vocabulary are never allowed; stop ids only when accepting."""
        a = self._adapter
        w = row.numel()
        row.zero_()
        if w >= a.words:
            self._m.unsafe_compute_mask_ptr(row.data_ptr(), a.words * 4)
        else:  # the model has fewer ids than the tokenizer: keep the first w words
            full = torch.zeros(a.words, dtype=torch.int32)
            self._m.unsafe_compute_mask_ptr(full.data_ptr(), a.words * 4)
            row.copy_(full[:w])
        bits = row.numpy().view(np.uint32)  # shares memory with row
        if self.tokens == 0 and a.start_ok is not None:
            bits &= a.start_ok[:w] if w <= a.words else np.pad(a.start_ok, (0, w - a.words))
        if a.fake_eos is not None and a.fake_eos < 32 * w:
            bits[a.fake_eos >> 5] &= ~np.uint32(1 << (a.fake_eos & 31))
        if self._stop and self._m.is_accepting():
            for t in self._stop:
                if t < 32 * w:
                    bits[t >> 5] |= np.uint32(1 << (t & 31))
        return row

    def advance(self, token: int) -> None:
        """Take the sampled token (one `allowed` permitted). LlmfnError if the grammar rejects it."""
        if not self._m.consume_token(token):
            raise LlmfnError(f"token {token} broke the constraint: {_brief(self._m.get_error())}")
        self.tokens += 1
