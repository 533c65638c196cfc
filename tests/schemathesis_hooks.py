"""Schemathesis hooks for tests/test_openapi_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

Some request fields hold a program in a language of its own: a JSON Schema (guided_json,
response_format, a tool's parameters), a regex, a grammar, and tool_choice must name one of the
tools. The OpenAPI document types them (an object, a string), but schema-valid text is rarely a valid
program, and which programs compile is the constraint compiler's business (tests/test_constraints.py,
and the bad-input battery of tests/test_server.py for the 400s). Positive-mode cases therefore leave
them out; negative-mode cases keep them, so a wrong type there must still be rejected."""

from __future__ import annotations

import schemathesis

PROGRAMS = ("guided_json", "guided_regex", "guided_grammar", "guided_choice", "response_format", "tools", "tool_choice",
            "text")


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    meta = getattr(case, "meta", None)
    if meta is not None and meta.generation.mode.is_positive and isinstance(case.body, dict):
        for key in PROGRAMS:
            case.body.pop(key, None)
