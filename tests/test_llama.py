"""Parity of the Llama-family forward with Hugging Face transformers on tiny random models."""

import pytest
import torch

import llmfn
from llmfn.models import llama
from tiny import make_checkpoint

CASES = {
    "llama-gqa": ("llama", {}),
    "llama-mqa-tied": ("llama", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    "llama3-rope-scaling": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                                      "rope_theta": 500000.0}),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-odd-head-dim": ("llama", {"head_dim": 24, "num_key_value_heads": 4}),
    "llama-attention-bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "mistral": ("mistral", {}),
    "mistral-small-window": ("mistral", {"sliding_window": 8}),
    "qwen2-bias": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_checkpoint(folder, family, **overrides)
    return hf, llmfn.load(folder)


def test_logits_match_transformers(pair):
    hf, model = pair
    tokens = torch.randint(0, 384, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
    got = llmfn.logits(model, tokens)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_greedy_tokens_match_transformers(pair):
    hf, model = pair
    prompt = [5, 17, 100, 33, 250, 7]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    got = list(llmfn.generate(model, prompt, max_tokens=32, stop_token_ids=[]))
    assert got == ref


def test_cached_decoding_equals_full_forward(pair):
    _, model = pair
    cfg, params = model.cfg, model.params
    tokens = torch.randint(0, 384, (1, 12), generator=torch.Generator().manual_seed(2))
    full = llmfn.logits(model, tokens)
    cache = llama.init_cache(cfg, 1, 12)
    with torch.inference_mode():
        first, cache = llama.forward(params, cfg, tokens[:, :5], torch.arange(5)[None], cache)
        steps = [first]
        for p in range(5, 12):
            out, cache = llama.forward(params, cfg, tokens[:, p : p + 1], torch.tensor([[p]]), cache)
            steps.append(out)
    incremental = torch.cat(steps, dim=1)
    assert (incremental - full).abs().max().item() <= 1e-4


def test_batched_rows_with_different_positions(pair):
    """Two rows decoding at different positions in one call give each row's own logits."""
    _, model = pair
    cfg, params = model.cfg, model.params
    a = torch.randint(0, 384, (1, 9), generator=torch.Generator().manual_seed(3))
    b = torch.randint(0, 384, (1, 6), generator=torch.Generator().manual_seed(4))
    full_a, full_b = llmfn.logits(model, a), llmfn.logits(model, b)
    # Row 0 of the cache holds a's prefix, row 1 b's prefix, then one joint step.
    cache = llama.init_cache(cfg, 2, 16)
    with torch.inference_mode():
        row0 = cache.view(slice(0, 1))
        row1 = cache.view(slice(1, 2))
        llama.forward(params, cfg, a[:, :8], torch.arange(8)[None], row0)
        llama.forward(params, cfg, b[:, :5], torch.arange(5)[None], row1)
        step, _ = llama.forward(params, cfg, torch.tensor([[a[0, 8]], [b[0, 5]]]), torch.tensor([[8], [5]]), cache)
    assert (step[0, 0] - full_a[0, 8]).abs().max().item() <= 1e-4
    assert (step[1, 0] - full_b[0, 5]).abs().max().item() <= 1e-4
