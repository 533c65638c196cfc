"""Tiny random checkpoints written by the tests (no downloads): HF models saved with
save_pretrained next to a small byte-level BPE tokenizer with ChatML specials."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello world! What is the capital of France? Paris is the capital of France.",
    "def main():\n    print('hello, world')\n    return 42\n",
    "Numbers 0123456789 and symbols !@#$%^&*() are tokens too.",
    "Ünïcödé, 日本語のテキスト, emoji 🙂🚀 and more text for merges.",
]


def write_tokenizer(folder: Path, vocab_size: int = 384) -> None:
    """A byte-level BPE tokenizer (full byte coverage) trained on a few sentences, with specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML})
    )


FAMILIES = {
    # name: (transformers config class, model class, kwargs)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4096}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
}


def make_checkpoint(folder: Path, family: str = "llama", seed: int = 0, **overrides):
    """Save a tiny random HF model of `family` plus tokenizer into folder; returns the HF model."""
    import transformers

    cfg_cls, model_cls, extra = FAMILIES[family]
    kwargs = dict(
        vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=2, pad_token_id=0, initializer_range=0.2,
    )
    kwargs.update(extra)
    kwargs.update(overrides)
    config = getattr(transformers, cfg_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder, kwargs["vocab_size"])
    return model
