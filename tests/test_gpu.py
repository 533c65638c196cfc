"""The whole model paths on a CUDA GPU, where the Triton kernels run inside the forward: logits
against transformers on the same GPU, greedy tokens, cached decoding, the engine, int4 / int8,
the Qwen-1 / Baichuan 2 layouts (ALiBi), BERT embeddings and the compiled decode step.

Low-precision logits follow the kernels' rule (tests/test_kernels.py): llmfn's error against an
fp64 CPU reference is at most twice transformers' own error in the same dtype on the same GPU,
plus a small eps."""

import copy

import pytest
import torch

import llmfn
from llmfn.engine import Engine, GenerationRequest
from llmfn.models import llama
from test_bert import random_batch, save_st_folder, tiny_hf
from test_families import _hf, _write, baichuan_config_json, baichuan_tensors, write_qwen1
from tiny import make_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = {
    "llama-gqa": ("llama", {}),
    "llama-odd-head-dim": ("llama", {"head_dim": 24, "num_key_value_heads": 4}),
    "llama-mqa-tied": ("llama", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    "mistral-small-window": ("mistral", {"sliding_window": 8}),
    "qwen2-bias": ("qwen2", {}),
}
EPS = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def tokens(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 384, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    return folder, make_checkpoint(folder, family, **overrides)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_logits_on_cuda_match_transformers_on_cuda(checkpoint, dtype):
    folder, hf = checkpoint
    x = tokens(2, 37)
    with torch.no_grad():
        exact = copy.deepcopy(hf).double()(x).logits
        peer = copy.deepcopy(hf).to("cuda", dtype)(x.cuda()).logits.double().cpu()
    got = llmfn.logits(llmfn.load(folder, dtype=dtype, device="cuda"), x).double().cpu()
    err, base = (got - exact).abs().max().item(), (peer - exact).abs().max().item()
    assert err <= 2 * base + EPS[dtype], f"llmfn error {err:.3g} > 2 * transformers error {base:.3g} + {EPS[dtype]:g}"


def test_greedy_tokens_and_cached_decoding_on_cuda(checkpoint):
    folder, hf = checkpoint
    model = llmfn.load(folder, device="cuda")
    prompt = [5, 17, 100, 33, 250, 7]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()  # fmt: skip
    assert list(llmfn.generate(model, prompt, max_tokens=32, stop_token_ids=[])) == ref

    x = tokens(1, 12, seed=2).cuda()
    full = llmfn.logits(model, x)
    cache = llama.init_cache(model.cfg, 1, 12, device="cuda")
    with torch.inference_mode():
        steps, cache = llama.forward(model.params, model.cfg, x[:, :5], torch.arange(5, device="cuda")[None], cache)
        steps = [steps]
        for p in range(5, 12):
            pos = torch.tensor([[p]], device="cuda")
            out, cache = llama.forward(model.params, model.cfg, x[:, p : p + 1], pos, cache)
            steps.append(out)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


def test_engine_on_cuda_equals_generate_and_is_batch_invariant(tmp_path):
    make_checkpoint(tmp_path, "llama", max_position_embeddings=512)
    model = llmfn.load(tmp_path, device="cuda")
    prompts = [tokens(1, n, seed=n)[0].tolist() for n in (1, 9, 17, 40, 70)]
    reqs = [GenerationRequest(p, 20, stop_token_ids=()) for p in prompts]
    together = Engine(model, max_running=3, prefill_chunk=16).generate_many(reqs)
    for prompt, req, joint in zip(prompts, reqs, together, strict=True):
        alone = Engine(model, max_running=3, prefill_chunk=16).generate_many([req])[0]
        assert joint.token_ids == alone.token_ids
        assert joint.token_ids == list(llmfn.generate(model, prompt, max_tokens=20, stop_token_ids=[]))


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_quantized_model_on_cuda_equals_it_on_cpu(tmp_path, method):
    """The Triton int4 GEMM (and the int8 path) on CUDA against the CPU kernels, which
    tests/test_quant.py holds to the dequantized model."""
    make_checkpoint(tmp_path, "llama")
    cpu, gpu = (llmfn.load(tmp_path, quantize=method, device=d) for d in ("cpu", "cuda"))
    x = tokens(2, 21, seed=3)
    want = llmfn.logits(cpu, x)
    assert (llmfn.logits(gpu, x).cpu() - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
    prompt = [5, 17, 100, 33]
    assert list(llmfn.generate(gpu, prompt, max_tokens=12, stop_token_ids=[])) == \
        list(llmfn.generate(cpu, prompt, max_tokens=12, stop_token_ids=[]))  # fmt: skip


@pytest.mark.parametrize("layout", ["qwen1", "baichuan2-7b", "baichuan2-13b-alibi"])
def test_original_layouts_on_cuda_equal_cpu(tmp_path, layout):
    if layout == "qwen1":
        folder = write_qwen1(tmp_path, _hf("qwen2"), seq_length=32)
    else:
        alibi = layout.endswith("alibi")
        hf = _hf("llama", seed=7, num_attention_heads=6, num_key_value_heads=6, hidden_size=96) if alibi else _hf("llama")
        folder = _write(tmp_path, baichuan_config_json(hf, alibi=alibi), baichuan_tensors(hf))
    cpu, gpu = llmfn.load(folder), llmfn.load(folder, device="cuda")
    x = tokens(2, 45, seed=4)  # past Qwen-1's seq_length 32: dynamic NTK and logn on
    assert (llmfn.logits(gpu, x).cpu() - llmfn.logits(cpu, x)).abs().max().item() <= 1e-4
    prompt = [5, 17, 100, 33]
    assert list(llmfn.generate(gpu, prompt, max_tokens=40, stop_token_ids=[])) == \
        list(llmfn.generate(cpu, prompt, max_tokens=40, stop_token_ids=[]))  # fmt: skip


def test_bert_on_cuda_matches_transformers(tmp_path):
    hf = tiny_hf()
    folder = save_st_folder(hf, tmp_path / "m")
    model = llmfn.load(folder, device="cuda")
    x, mask, _ = random_batch()
    from llmfn.models import bert

    with torch.inference_mode():
        got = bert.forward(model.params, model.cfg, x.cuda(), mask.cuda()).cpu()
        want = hf(input_ids=x, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    assert (got[keep] - want[keep]).abs().max().item() <= 1e-4
    texts = ["a short one", "", "a somewhat longer sentence with more words in it " * 3]
    torch.testing.assert_close(llmfn.embed(model, texts).cpu(), llmfn.embed(llmfn.load(folder), texts),
                               rtol=0, atol=1e-5)  # fmt: skip


def test_compiled_decode_on_cuda_gives_the_eager_tokens(tmp_path):
    make_checkpoint(tmp_path, "llama", max_position_embeddings=512)
    eager = llmfn.load(tmp_path, device="cuda", compile=False)
    compiled = llmfn.load(tmp_path, device="cuda", compile=True)
    for prompt in ([5, 17, 100, 33], tokens(1, 50, seed=5)[0].tolist()):
        assert list(llmfn.generate(compiled, prompt, max_tokens=24, stop_token_ids=[])) == \
            list(llmfn.generate(eager, prompt, max_tokens=24, stop_token_ids=[]))  # fmt: skip
