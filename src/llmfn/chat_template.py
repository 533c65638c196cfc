"""Chat templates: the model's own jinja2 template rendered in a sandbox, as transformers'
apply_chat_template does, then tokenized so that message content can never become a control
token: special-token strings are recognised only in the template's own text."""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime
from functools import lru_cache

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmfn.errors import RequestError
from llmfn.tokenizer import Tokenizer


def _raise(message: str):
    raise TemplateError(message)


@lru_cache(maxsize=16)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render(template: str, messages: list[dict], *, add_generation_prompt: bool = True, **extra) -> str:
    """The prompt text for messages, exactly as transformers renders it."""
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)
    except TemplateError as e:
        raise RequestError(f"chat template rejected the messages: {e}", param="messages") from None


def render_segments(template: str, messages: list[dict], **kwargs) -> list[tuple[str, bool]]:
    """The rendered prompt as (text, trusted) segments: message content is untrusted.

    Content is replaced by unique markers before rendering and put back after, so the template's
    own text (where special tokens are legitimate) and user text stay apart."""
    nonce = uuid.uuid4().hex
    # Private-use characters: not whitespace, so templates that strip content keep the marker whole.
    key = lambda i: f"\ue000{nonce}:{i}\ue001"
    marker = {key(i): m["content"] for i, m in enumerate(messages) if isinstance(m.get("content"), str)}
    marked = [{**m, "content": key(i)} if key(i) in marker else m for i, m in enumerate(messages)]
    text = render(template, marked, **kwargs)
    expected = render(template, messages, **kwargs)
    for fill in (lambda c: c, str.strip):  # templates that strip content see the marker unchanged
        segments = []
        for i, part in enumerate(re.split(f"(\ue000{nonce}:\\d+\ue001)", text)):
            if part:
                segments.append((fill(marker[part]), False) if i % 2 else (part, True))
        if "".join(t for t, _ in segments) == expected:
            return segments
    raise RequestError("chat template transforms message content in a way llmfn cannot separate", param="messages")


def encode_segments(tokenizer: Tokenizer, segments: list[tuple[str, bool]]) -> list[int]:
    """Token ids for (text, trusted) segments. Special tokens are matched only inside trusted
    text; the text between them (trusted and untrusted alike) is encoded as plain text in one
    piece, so BPE merges across the template/content boundary as they would in the full string."""
    specials = special_token_ids(tokenizer)
    pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))) if specials else None
    ids: list[int] = []
    pending = ""
    for text, trusted in segments:
        if not trusted or pattern is None:
            pending += text
            continue
        pos = 0
        for m in pattern.finditer(text):
            pending += text[pos : m.start()]
            if pending:
                ids += tokenizer.encode(pending)
                pending = ""
            ids.append(specials[m.group()])
            pos = m.end()
        pending += text[pos:]
    if pending:
        ids += tokenizer.encode(pending)
    return ids


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Special and added tokens by their text: the template may use them, user content may not."""
    added = {tok.content: i for i, tok in tokenizer.hf.get_added_tokens_decoder().items()}
    return {**added, **tokenizer.special_tokens}


def apply_chat_template(tokenizer: Tokenizer, template: str, messages: list[dict], **kwargs) -> list[int]:
    """Prompt token ids for a conversation, with user content kept as plain text."""
    extra = {
        "bos_token": _token_text(tokenizer, tokenizer.bos_id),
        "eos_token": _token_text(tokenizer, tokenizer.eos_ids[0] if tokenizer.eos_ids else None),
    }
    return encode_segments(tokenizer, render_segments(template, messages, **extra, **kwargs))


def _token_text(tokenizer: Tokenizer, token_id: int | None) -> str:
    return "" if token_id is None else tokenizer.id_to_token(token_id) or ""
