"""Decoder speed on a CUDA GPU: llmfn (eager, compiled, and the batching engine) beside Hugging Face
transformers on the same checkpoint, bf16. The checkpoints are random-weight Llamas of SmolLM2-135M's
and Llama-3.2-1B's shapes, written here (no download; random weights time as trained ones do).

    python benchmarks/gpu_decode.py [--prompt-tokens 128] [--gen-tokens 128] [--batch 32]

Single-stream rows: the best of three runs after a warm-up (compile included in the warm-up), each
generated token read back to the host (`int(argmax)`) on both sides. The batch rows: `batch` prompts
of the same length at once, llmfn's Engine.generate_many against transformers' generate, greedy."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import llmfn
from llmfn.engine import Engine, GenerationRequest
from llmfn.perf import measure

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import SPECIALS, write_tokenizer  # noqa: E402

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
}  # fmt: skip


def write_checkpoint(folder: Path, shape: dict) -> None:
    import transformers

    config = transformers.LlamaConfig(**shape, max_position_embeddings=4096, rope_theta=100000.0, bos_token_id=None,
                                      eos_token_id=2, pad_token_id=0, initializer_range=0.02)  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder)  # its config and chat template; then a tokenizer that covers the vocab
    write_wide_tokenizer(folder, shape["vocab_size"])


def write_wide_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer without merges whose vocab fills vocab_size: the prompts are
    token ids, but the engine detokenizes every generated id."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab[ch] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"w{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    tok.save(str(folder / "tokenizer.json"))


def synced(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def transformers_single(hf, ids: list[int], gen: int) -> tuple[float, float]:
    """(prefill s, decode tok/s), the loop of benchmarks/peers.py on the GPU."""
    from transformers import DynamicCache

    def run():
        t0 = time.perf_counter()
        out = hf(torch.tensor([ids], device="cuda"), past_key_values=DynamicCache(config=hf.config), use_cache=True)
        token = int(out.logits[0, -1].argmax())
        t1 = time.perf_counter()
        for _ in range(gen - 1):
            out = hf(torch.tensor([[token]], device="cuda"), past_key_values=out.past_key_values, use_cache=True)
            token = int(out.logits[0, -1].argmax())
        return t1 - t0, (gen - 1) / (time.perf_counter() - t1)

    run()
    runs = [run() for _ in range(3)]
    return min(r[0] for r in runs), max(r[1] for r in runs)


def llmfn_single(model, ids: list[int], gen: int) -> tuple[float, float, float]:
    """(warm-up s, prefill s, decode tok/s)."""
    t0 = time.perf_counter()
    measure(model, ids, max_tokens=gen)
    warm = time.perf_counter() - t0
    runs = [measure(model, ids, max_tokens=gen) for _ in range(3)]
    return warm, min(r.prefill_s for r in runs), max(r.decode_tok_s for r in runs)


def batch_rows(hf, model, prompts: list[list[int]], gen: int) -> tuple[float, float, int]:
    """Generated tokens/s over the whole batch: (transformers, llmfn engine, rows with equal tokens)."""
    x = torch.tensor(prompts, device="cuda")

    def hf_run():
        return hf.generate(x, max_new_tokens=gen, min_new_tokens=gen, do_sample=False, eos_token_id=None, pad_token_id=0)

    reqs = [GenerationRequest(p, gen, stop_token_ids=()) for p in prompts]
    engine = Engine(model, max_running=len(prompts))
    hf_run(), engine.generate_many(reqs)  # warm-up
    ref, hf_s = synced(hf_run)
    ours, our_s = synced(lambda: engine.generate_many(reqs))
    same = sum(r.token_ids == row[len(p):].tolist() for r, row, p in zip(ours, ref, prompts, strict=True))
    n = len(prompts) * gen
    return n / hf_s, n / our_s, same


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu_decode.py: needs a CUDA GPU (none found); nothing timed.")
        return 0
    import transformers

    torch.set_grad_enabled(False)
    gen = args.gen_tokens
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"bf16, prompt {args.prompt_tokens}, generate {gen}, batch {args.batch}\n")  # fmt: skip
    print("| model | runtime | warm-up s | prefill ms | decode tok/s | batch tok/s |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.shapes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            write_checkpoint(folder, SHAPES[name])
            gen_ids = torch.Generator().manual_seed(1)
            prompts = torch.randint(3, SHAPES[name]["vocab_size"], (args.batch, args.prompt_tokens), generator=gen_ids)
            prompts = prompts.tolist()
            hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
            eager = llmfn.load(folder, dtype="bfloat16", device="cuda", compile=False)
            compiled = llmfn.load(folder, dtype="bfloat16", device="cuda", compile=True)

            hf_prefill, hf_tok_s = transformers_single(hf, prompts[0], gen)
            rows = [("transformers (eager, sdpa)", None, hf_prefill, hf_tok_s)]
            rows.append(("llmfn eager", *llmfn_single(eager, prompts[0], gen)))
            rows.append(("llmfn compiled", *llmfn_single(compiled, prompts[0], gen)))
            hf_batch, our_batch, same = batch_rows(hf, eager, prompts, gen)
            batch = {"transformers (eager, sdpa)": hf_batch, "llmfn eager": our_batch}
            for runtime, warm, prefill, tok_s in rows:
                b = batch.get(runtime)
                cells = ["" if warm is None else f"{warm:.1f}", f"{prefill * 1e3:.1f}", f"{tok_s:.1f}",
                         "" if b is None else f"{b:.0f}"]  # fmt: skip
                print(f"| {name} | {runtime} | " + " | ".join(cells) + " |")
            print(f"| {name} | batch rows whose {gen} greedy tokens equal transformers' | | | | {same}/{args.batch} |")
            del hf, eager, compiled
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
