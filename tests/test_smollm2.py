"""The real default model: SmolLM2-135M-Instruct converted from its GGUF (dequantized, quantize=None,
as transformers reads it), against transformers loading the same GGUF file. The default load, which
runs on the GGUF's own Q4_1 / Q8_0 blocks, is checked in test_feedback.py."""

import pytest
import torch

import llmfn
from llmfn.chat_template import apply_chat_template
from llmfn.loading.registry import ALIASES, package_path

GGUF = package_path(ALIASES["smollm2-135m-instruct"])


@pytest.fixture(scope="module")
def model():
    return llmfn.load("smollm2-135m-instruct", compile=False, quantize=None)


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()


def chat_ids(model, text):
    return apply_chat_template(model.tokenizer, model.chat_template, [{"role": "user", "content": text}])


def test_logits_match_transformers_on_the_same_gguf(model, reference):
    ids = chat_ids(model, "Write a haiku about the sea, then count from 1 to 10.")
    tokens = torch.tensor([ids])
    with torch.inference_mode():
        expected = reference(tokens).logits
    got = llmfn.logits(model, tokens)
    assert (got - expected).abs().max().item() <= 1e-3


def test_greedy_chat_continuation_matches_transformers(model, reference):
    ids = chat_ids(model, "Tell me a short story about a robot who learns to paint.")
    with torch.inference_mode():
        # An explicit mask: the prompt holds <|im_end|> (id 2), which is also SmolLM2's pad id.
        ref = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=2)[0, len(ids):].tolist()
    got = list(llmfn.generate(model, ids, max_tokens=40, temperature=0.0, stop_token_ids=[]))
    assert got == ref


def test_capital_of_france(model):
    """Greedy: the alias's own defaults (its card's temperature 0.2) sample, and this Q4_1 model then
    opens with "L'..." in half the seeds (10 of 20)."""
    stream = llmfn.chat(model, [{"role": "user", "content": "What is the capital of France?"}], max_tokens=40,
                        temperature=0.0)
    assert "Paris" in stream.text()
    assert stream.finish_reason == "stop"


def test_chat_template_matches_transformers_rendering(model):
    from transformers import PreTrainedTokenizerFast

    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name 3 colors."}]
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(model.path / "tokenizer.json"))
    hf_tok.chat_template = model.chat_template
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    from llmfn.chat_template import render

    assert render(model.chat_template, messages) == text
    assert apply_chat_template(model.tokenizer, model.chat_template, messages) == model.tokenizer.encode_trusted(text)
