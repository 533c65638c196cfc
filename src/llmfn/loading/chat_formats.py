"""Built-in chat formats for checkpoints whose folder carries no chat template.

Each is a jinja template (rendered by llmfn.chat_template like a folder's own) whose output is
the prompt text the original code builds; special-token strings in it become their ids. The
originals also drop old turns to fit a token budget; templates render the whole conversation.
"""

from __future__ import annotations

from pathlib import Path

from llmfn.loading.config import read_json
from llmfn.tokenizer import Tokenizer

# Qwen-1 ChatML: the raw_text of make_context() in Qwen's qwen_generation_utils.py
# (chat_format "chatml"): a system turn always (default "You are a helpful assistant."), turns
# joined by "\n", and "<|im_start|>assistant\n" to prompt the reply.
QWEN_CHATML = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = 'You are a helpful assistant.' -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>system\\n' + system + '<|im_end|>' -}}"
    "{%- for m in turns -%}"
    "{{- '\\n<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '\\n<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Llama 2 chat: Meta's chat_completion() in llama/generation.py, as the Llama-2-chat
# tokenizer_config.json template writes it: "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]
# {answer} </s><s>[INST] ...", the system prompt folded into the first user turn, contents stripped.
LLAMA2 = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set turns = messages[1:] -%}{%- set system = messages[0]['content'] -%}"
    "{%- else -%}"
    "{%- set turns = messages -%}{%- set system = false -%}"
    "{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- if loop.index0 == 0 and system != false -%}"
    "{%- set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + m['content'] -%}"
    "{%- else -%}{%- set content = m['content'] -%}{%- endif -%}"
    "{%- if m['role'] == 'user' -%}{{- bos_token + '[INST] ' + content.strip() + ' [/INST]' -}}"
    "{%- else -%}{{- ' ' + content.strip() + ' ' + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)


def baichuan2_template(user_token: str = "<reserved_106>", assistant_token: str = "<reserved_107>") -> str:
    """Baichuan 2 chat: build_chat_input() in Baichuan 2's generation_utils.py. The system text
    (first message only) bare, then each turn as its role token + content (no separators, no EOS),
    any role but "user" taking the assistant token; the assistant token prompts the reply unless
    the last message is the assistant's. The tokens are generation_config's user_token_id (195,
    "<reserved_106>") and assistant_token_id (196, "<reserved_107>")."""
    return (
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'system' -%}"
        "{%- if not loop.first -%}{{- raise_exception('a system message must come first') -}}{%- endif -%}"
        "{{- m['content'] -}}"
        f"{{%- elif m['role'] == 'user' -%}}{{{{- {user_token!r} + m['content'] -}}}}"
        f"{{%- else -%}}{{{{- {assistant_token!r} + m['content'] -}}}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt and (not messages or messages[-1]['role'] != 'assistant') -%}"
        f"{{{{- {assistant_token!r} -}}}}"
        "{%- endif -%}"
    )


BAICHUAN2 = baichuan2_template()


def token_id(tokenizer: Tokenizer, text: str) -> int | None:
    """The id of a token by its text, or None when the tokenizer has no such token."""
    return tokenizer.token_to_id(text)


def token_text(tokenizer: Tokenizer, token: int) -> str | None:
    """The text of a token by its id, or None."""
    return tokenizer.id_to_token(token)


def fallback_template(folder: Path, raw_config: dict, tokenizer: Tokenizer) -> str | None:
    """The built-in format for a folder without a template, or None: ChatML for Qwen-1, Baichuan 2's
    role tokens for Baichuan, and Llama 2's [INST] format for a Llama folder that carries only a
    SentencePiece tokenizer.model (the Llama 2 release layout; later Llamas ship tokenizer.json)."""
    model_type = raw_config.get("model_type")
    if model_type == "qwen":
        return QWEN_CHATML
    if model_type == "baichuan":
        gen_file = folder / "generation_config.json"
        gen = read_json(gen_file) if gen_file.exists() else {}
        user = token_text(tokenizer, int(gen.get("user_token_id", 195)))
        assistant = token_text(tokenizer, int(gen.get("assistant_token_id", 196)))
        return baichuan2_template(user, assistant) if user and assistant else None
    if model_type == "llama" and (folder / "tokenizer.model").exists() and not (folder / "tokenizer.json").exists():
        return LLAMA2
    return None
