"""`llmfn doctor` (is this install healthy?) and `llmfn models` (what can be loaded by name?)."""

from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path

import torch

from llmfn.cli.common import load_model, one_line
from llmfn.loading.registry import ALIASES, converted_path, home, package_path
from llmfn.models.llama import LlamaConfig

OK, FAIL = "ok", "FAILED"


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def devices() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return found


def describe(device: str) -> str:
    if device == "cpu":
        return f"cpu: {platform.machine()} {platform.processor() or ''}".rstrip() + f", {torch.get_num_threads()} threads"
    props = torch.cuda.get_device_properties(device)
    return (f"{device}: {props.name}, compute capability {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB")


# ----------------------------------------------------------------------------- Triton kernel check


def triton_check(device: str) -> tuple[bool | None, str]:
    """Run every Triton kernel once on `device` against its torch reference.

    Returns (None, why) where Triton is not used (a CPU outside the interpreter)."""
    from llmfn.kernels.triton_common import interpreting

    if device == "cpu" and not interpreting():
        return None, "not used on CPU (the torch reference kernels run; TRITON_INTERPRET=1 interprets Triton)"
    try:
        from llmfn.kernels import reference as ref
        from llmfn.kernels import triton_attention, triton_int4, triton_norm, triton_rope
    except Exception as e:  # noqa: BLE001 - report any import failure of triton
        return False, f"cannot import the Triton kernels: {one_line(e)}"
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    def close(name, got, want):
        err = (got.float() - want.float()).abs().max().item()
        scale = want.float().abs().max().item()
        if not err <= 2e-2 * scale + 2e-2:
            raise AssertionError(f"{name} differs from the reference by {err:.3g}")

    try:
        x, w = rand(3, 64), rand(64)
        close("rms_norm", triton_norm.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))
        q, k = rand(1, 5, 4, 16), rand(1, 5, 2, 16)
        ang = torch.randn(1, 5, 8, generator=g).to(device)
        want_q, want_k = ref.apply_rope(q.clone(), k.clone(), ang.cos(), ang.sin())
        triton_rope.rope_(q, k, ang.cos(), ang.sin())
        close("rope", torch.cat([q.flatten(), k.flatten()]), torch.cat([want_q.flatten(), want_k.flatten()]))
        kc, vc = rand(1, 2, 8, 16), rand(1, 2, 8, 16)
        for s in (5, 1):  # prefill and decode
            qa = rand(1, 4, s, 16)
            pos = torch.arange(8 - s, 8, device=device)[None]
            close(f"attention (s={s})", triton_attention.attention(qa, kc, vc, pos, 0.25, None, None),
                  ref.attention(qa, kc, vc, pos, 0.25, None, None))
        qw, sc, zp = ref.quantize_int4(rand(32, 128), 64)
        xi = rand(3, 128)
        close("int4_matmul", triton_int4.int4_matmul(xi, qw, sc, zp, 64), ref.int4_matmul(xi, qw, sc, zp, 64))
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - a kernel that fails to compile or run is the finding
        return False, one_line(e)
    return True, "rms_norm, rope, attention (prefill, decode) and int4_matmul match the torch references"


# ---------------------------------------------------------------------------- tiny forward self-test


def tiny_model(device: str, dtype: torch.dtype) -> tuple[dict, LlamaConfig]:
    """A 2-layer random Llama (GQA, vocab 64) built in memory: no files, no downloads."""
    from llmfn.models import llama

    cfg = LlamaConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=32, rms_norm_eps=1e-5)
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=0.2):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    D, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    layers = [
        {"attn_norm": 1 + rand(D, scale=0.1), "wqkv": rand((cfg.num_heads + 2 * cfg.num_kv_heads) * hd, D),
         "wo": rand(D, cfg.q_size), "mlp_norm": 1 + rand(D, scale=0.1), "w_gate_up": rand(2 * F, D),
         "w_down": rand(D, F)}
        for _ in range(cfg.num_layers)
    ]
    params = {"embed": rand(cfg.vocab_size, D, scale=1.0), "norm": 1 + rand(D, scale=0.1),
              "lm_head": rand(cfg.vocab_size, D), "rope_inv_freq": llama.rope_inv_freq(cfg).to(device),
              "layers": layers}
    return params, cfg


def cpu_kernels_check() -> tuple[bool | None, str]:
    """Whether llmfn's C kernels for CPU decode and encoders are built here (None: not, the torch ops run)."""
    from llmfn import cbuild, sampling
    from llmfn.kernels import cpu, cpu_attention, cpu_gemm, cpu_quant

    if not (cpu.available() and cpu_gemm.available() and cpu_attention.available()):
        return None, ("not available (no C compiler, or LLMFN_CPU_KERNELS=torch): decode and embeddings run the "
                      "slower torch ops")  # fmt: skip
    level, why = cbuild.isa()
    acts = "int8" if cpu_quant.int8_activations() else "fp32"
    if cpu.library().llmfn_amx_active():
        acts += " (int8 ones on AMX tiles)"
    built = "decode, GEMM, encoder attention" + (", sampler" if sampling.c_sampler_available() else "")
    return True, (f"built in {cbuild.build_dir()} ({built}) for {level} ({why}); "
                  f"int4 / int8 weights take {acts} activations (LLMFN_QUANT_ACTIVATIONS)")


def native_tokenizers_check() -> tuple[bool | None, str]:
    """Whether the C encoders for SentencePiece and tiktoken files are built here."""
    from llmfn.tokenization import native_bpe, native_spm
    from llmfn.tokenizer import native_tokenizers_enabled

    if not native_tokenizers_enabled():
        return None, "off (LLMFN_NATIVE_TOKENIZERS=0): every format encodes through `tokenizers`"
    if native_bpe.library() is None or native_spm.library() is None:
        return None, "not available (no C compiler): every format encodes through `tokenizers`"
    return True, "built (SentencePiece and tiktoken files encode in C)"


def forward_self_test(device: str) -> tuple[bool, str]:
    """Prefill + token-by-token decode must give the logits of one full forward (and, off CPU,
    the CPU float32 logits)."""
    from llmfn.models import llama

    dtype = torch.float32
    try:
        params, cfg = tiny_model(device, dtype)
        tokens = torch.tensor([[5, 17, 3, 60, 22, 9, 41, 8, 33, 1, 12, 50]], device=device)
        n, split = tokens.shape[1], 8
        with torch.inference_mode():
            positions = torch.arange(n, device=device)[None]
            full, _ = llama.forward(params, cfg, tokens, positions, llama.init_cache(cfg, 1, n, dtype, device))
            cache = llama.init_cache(cfg, 1, n, dtype, device)
            part, cache = llama.forward(params, cfg, tokens[:, :split], positions[:, :split], cache)
            steps = [part]
            for p in range(split, n):
                out, cache = llama.forward(params, cfg, tokens[:, p : p + 1], positions[:, p : p + 1], cache)
                steps.append(out)
            incremental = torch.cat(steps, dim=1)
        if not torch.isfinite(full).all():
            return False, "the logits are not finite"
        err = (full - incremental).abs().max().item()
        tol = 1e-3 if device == "cpu" else 2e-2
        if err > tol:
            return False, f"prefill + decode differs from a full forward by {err:.3g}"
        if device != "cpu":
            cpu_params, _ = tiny_model("cpu", dtype)
            with torch.inference_mode():
                want, _ = llama.forward(cpu_params, cfg, tokens.cpu(), positions.cpu(), llama.init_cache(cfg, 1, n))
            err = (full.cpu() - want).abs().max().item()
            if err > 2e-2:
                return False, f"differs from the CPU reference by {err:.3g}"
    except Exception as e:  # noqa: BLE001 - any failure is the finding
        return False, one_line(e)
    return True, f"{n}-token forward, prefill + {n - split} decode steps agree"


# ------------------------------------------------------------------------------------ model loads


def configured_models(config_path: str | None, models: list[str] | None):
    """(name, path, dtype, device, quantize) of each model to check: --model ones, else the server config's."""
    if models:
        return [(m, m, None, "cpu", "auto") for m in models]
    from llmfn.serve.config import load_config

    return [(m.name, m.path, m.dtype, m.device, m.quantize) for m in load_config(config_path).models]


def model_check(path: str, dtype: str | None, device: str, quantize: str = "auto") -> tuple[bool, str]:
    start = time.perf_counter()
    try:
        model = load_model(path, dtype, device, quantize=quantize)
    except Exception as e:  # noqa: BLE001 - report and go on to the next model
        return False, one_line(e)
    return True, f"{model.kind}, loaded in {time.perf_counter() - start:.1f} s from {model.path}"


def doctor(config_path: str | None = None, models: list[str] | None = None, check_models: bool = True) -> int:
    """Print the report; exit status 1 when a check that should pass here failed."""
    failed = False

    def line(status: bool | None, text: str) -> None:
        nonlocal failed
        failed |= status is False
        mark = {True: OK, False: FAIL, None: "--"}[status]
        print(f"  [{mark:>6}] {text}", flush=True)

    import llmfn

    print(f"llmfn {version('llmfn')} at {Path(llmfn.__file__).parent}, Python {platform.python_version()}")
    print("versions:")
    for package in ("torch", "triton", "granian"):
        v = torch.__version__ if package == "torch" else version(package)
        line(v != "not installed" if package != "granian" else (None if v == "not installed" else True),
             f"{package} {v}")
    print(f"  CUDA build: {torch.version.cuda or 'none'}; LLMFN_HOME: {home()}")
    print("devices:")
    for device in devices():
        print(f"  {describe(device)}")
        ok, why = triton_check(device)
        line(ok, f"Triton kernels: {why}")
        if device == "cpu":
            ok, why = cpu_kernels_check()
            line(ok, f"C decode kernels: {why}")
            ok, why = native_tokenizers_check()
            line(ok, f"native tokenizers: {why}")
        ok, why = forward_self_test(device)
        line(ok, f"tiny forward self-test: {why}")
    if check_models:
        print("models:")
        try:
            targets = configured_models(config_path, models)
        except Exception as e:  # noqa: BLE001 - a bad config is one of the findings
            line(False, f"config: {one_line(e)}")
            targets = []
        for name, path, dtype, device, quantize in targets:
            ok, why = model_check(path, dtype, device, quantize)
            line(ok, f"{name}{'' if path == name else f' ({path})'}: {why}")
    print("all checks passed" if not failed else "some checks FAILED")
    return 1 if failed else 0


# ------------------------------------------------------------------------------------ llmfn models


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def list_models(as_json: bool = False) -> int:
    aliases = []
    for alias in ALIASES.values():
        entry = {"name": alias.name, "kind": alias.kind, "description": alias.description}
        try:
            entry["weights"] = str(package_path(alias))
            entry["installed"] = Path(entry["weights"]).exists()
        except Exception as e:  # noqa: BLE001 - an alias without its package is listed as such
            entry["installed"], entry["weights"], entry["hint"] = False, None, one_line(e)
        cached = converted_path(alias.name)
        entry["cached"] = str(cached) if (cached / "config.json").exists() else None
        aliases.append(entry)
    cache_dir = home() / "models"
    cached = []
    if cache_dir.is_dir():
        for folder in sorted(cache_dir.iterdir()):
            if folder.is_dir() and not folder.name.startswith(".") and (folder / "config.json").exists():
                cached.append({"name": folder.name, "path": str(folder), "bytes": folder_size(folder)})
    if as_json:
        print(json.dumps({"aliases": aliases, "cache": str(cache_dir), "cached": cached}, indent=2))
        return 0
    print("known aliases (llmfn chat ALIAS, or `path = \"ALIAS\"` in a server config):")
    for a in aliases:
        state = "installed" if a["installed"] else f"not installed: {a.get('hint', 'weights missing')}"
        if a["cached"]:
            state += ", converted in the cache"
        print(f"  {a['name']:<24} {a['kind']:<10} {state}")
        print(f"  {'':<24} {a['description']}")
    print(f"cached models in {cache_dir}:" if cached else f"no cached models in {cache_dir}")
    for c in cached:
        print(f"  {c['name']:<32} {c['bytes'] / 2**20:8.1f} MiB  {c['path']}")
    if os.environ.get("LLMFN_HOME") is None:
        print("(set LLMFN_HOME to use another cache folder)")
    return 0
