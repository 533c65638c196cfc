"""torch.compile of the decode step: one graph (fullgraph), no recompile per step, same tokens."""

import pytest
import torch

import llmfn
from tiny import make_checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-compile")
    make_checkpoint(folder, "llama")
    return folder


def test_compiled_decode_matches_eager_without_recompiles(folder):
    import torch._dynamo

    eager = llmfn.load(folder, compile=False)
    compiled = llmfn.load(folder, compile=True)
    prompt = [5, 17, 100, 33, 250, 7]
    torch._dynamo.reset()
    expected = list(llmfn.generate(eager, prompt, max_tokens=20, stop_token_ids=[]))
    with torch._dynamo.config.patch(error_on_recompile=False):
        got = list(llmfn.generate(compiled, prompt, max_tokens=20, stop_token_ids=[]))
    assert got == expected
    # A second generation of the same length reuses the graph: any recompile is an error.
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = list(llmfn.generate(compiled, prompt, max_tokens=20, stop_token_ids=[]))
    assert again == expected


def test_compiled_logits_are_close_to_eager(folder):
    from llmfn.backend import compiled_forward
    from llmfn.models import llama

    model = llmfn.load(folder, compile=True)
    cfg, params = model.cfg, model.params
    tokens = torch.tensor([[3, 9, 27, 81]])
    with torch.inference_mode():
        ref, _ = llama.forward(params, cfg, tokens, torch.arange(4)[None], llama.init_cache(cfg, 1, 8))
        out, _ = compiled_forward()(params, cfg, tokens, torch.arange(4)[None], llama.init_cache(cfg, 1, 8))
    assert (out - ref).abs().max().item() <= 1e-4
