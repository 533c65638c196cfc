"""The `llmfn` command: serve, chat, run, convert, bench, doctor, models.

Every deliberate failure is an LlmfnError (or an OSError) and is printed as one line,
`llmfn: error: <message>`, with exit status 1; `--debug` adds the traceback. Usage errors exit 2."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from llmfn.cli.common import add_sampling_flags, load_model, model_defaults, one_line, sampling_settings
from llmfn.errors import LlmfnError
from llmfn.loading.registry import DEFAULT_CHAT_MODEL

DTYPE_CHOICES = ("float32", "float16", "bfloat16")
QUANTIZE_CHOICES = ("auto", "none", "int4", "int8")  # llmfn.loading.QUANTIZE_CHOICES, without importing torch
COMPILE_DEFAULT = "off on CPU, where it does not pay; on on CUDA for models of 50M+ parameters"


# ---------------------------------------------------------------------------------------- helpers


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("llmfn")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def _positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _add_quantize_flag(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None if what else "auto",
                   help=f"auto: a quantized GGUF runs on its own Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K / Q5_0 blocks, as llama.cpp does, "
                        f"anything else as stored; none: dequantize to --dtype; int4 / int8: weight-only "
                        f"linears rounded at load{what or ' (default auto)'}")  # fmt: skip


def _add_model_flags(p: argparse.ArgumentParser, compile_default: str = COMPILE_DEFAULT) -> None:
    p.add_argument("--dtype", choices=DTYPE_CHOICES,
                   help="dense weights in this dtype (default float32); a GGUF is then dequantized unless --quantize int4/int8")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default cpu)")
    _add_quantize_flag(p)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help=f"torch.compile the decode step: slow the first time, then faster (default: {compile_default})")


def _add_parallel_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel", type=int, metavar="N", help="split each layer over N ranks, started here "
                   "on this host (or torchrun's ranks: llmfn.parallel.launch)")  # fmt: skip
    p.add_argument("--pipeline-parallel", type=int, default=1, metavar="N", help="split the layers into N stages")


# --------------------------------------------------------------------------------------- commands


def cmd_serve(args: argparse.Namespace) -> int:
    from llmfn import serve
    from llmfn.serve.config import load_config

    config = serve_overrides(load_config(args.config), args.model, args.api_key, quantize=args.quantize,
                             access_log=args.access_log, access_log_format=args.access_log_format,
                             kv_cache_memory=args.kv_cache_memory, kv_cache_dtype=args.kv_cache_dtype,
                             max_running=args.max_running)  # fmt: skip
    from llmfn.parallel import launch

    sharded = launch.should_spawn(args.tensor_parallel, args.pipeline_parallel) or launch.in_rank()
    if args.replicas > 1 or args.ray_address:  # replicas on Ray Serve (llmfn.serve.replicas)
        if sharded:
            raise LlmfnError("--replicas does not combine with --tensor-parallel / --pipeline-parallel yet")
        from llmfn.serve import replicas

        replicas.run(config, args.host, args.port, args.replicas, args.ray_address)
        return 0
    if sharded:  # rank 0 serves and leads, the other ranks follow its steps (llmfn.parallel.steps)
        return serve_sharded(config, args)
    serve.run(config, args.host, args.port, args.workers)
    return 0


def serve_sharded(config, args: argparse.Namespace) -> int:
    """`llmfn serve --tensor-parallel N [--pipeline-parallel M]`: start the N x M ranks on this host
    (or be one of torchrun's); rank 0 runs the server, whose engines lead, the others follow."""
    import os

    from llmfn import serve
    from llmfn.parallel import follow, launch
    from llmfn.serve.config import check_model_paths
    from llmfn.serve.models import load_rank_model

    args.micro_batches = args.micro_batches or args.pipeline_parallel
    if args.micro_batches < 1:
        raise LlmfnError(f"--micro-batches must be at least 1, got {args.micro_batches}")
    if args.workers != 1:
        raise LlmfnError("--workers must be 1 with --tensor-parallel / --pipeline-parallel: one server leads the ranks")
    check_model_paths(config)
    os.environ[launch.PIPELINE_ENV] = str(args.pipeline_parallel)  # for rank 0's server worker
    os.environ[launch.MICRO_BATCHES_ENV] = str(args.micro_batches)
    world = (args.tensor_parallel or 1) * args.pipeline_parallel
    if not launch.in_rank():
        return launch.spawn_ranks(world, grace=config.limits.shutdown_timeout + 10)
    launched = int(os.environ["WORLD_SIZE"])
    if args.tensor_parallel and world != launched:
        raise LlmfnError(f"--tensor-parallel {args.tensor_parallel} x --pipeline-parallel {args.pipeline_parallel} "
                         f"= {world} ranks, but {launched} were launched")  # fmt: skip
    if int(os.environ["RANK"]) == 0:
        serve.run(config, args.host, args.port, 1)
        return 0
    import functools
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a follower ends when rank 0 tells it (or is terminated)
    follow([functools.partial(load_rank_model, spec) for spec in config.models], pipeline=args.pipeline_parallel,
           micro_batches=args.micro_batches, device=launch.rank_device(config.models[0].device))  # fmt: skip
    return 0


def serve_overrides(config, models: list[str] | None, api_key: str | None, *, quantize: str | None = None,
                    access_log: bool | None = None, access_log_format: str | None = None,
                    kv_cache_memory: str | None = None, kv_cache_dtype: str | None = None,
                    max_running: int | None = None):  # fmt: skip
    """The server config with `--model` replacing its models, `--api-key` added to its keys,
    `--quantize` set on every model not configured as an embedding model, the access log's flags and
    `--kv-cache-memory` / `--kv-cache-dtype` / `--max-running` replacing its limits."""
    import msgspec

    from llmfn.serve.config import check_config, models_from_paths

    replace = msgspec.structs.replace
    changes = {}
    if kv_cache_memory is not None:
        changes["limits"] = replace(config.limits, kv_cache_memory=kv_cache_memory)
    if kv_cache_dtype is not None:
        changes["limits"] = replace(changes.get("limits", config.limits), kv_cache_dtype=kv_cache_dtype)
    if max_running is not None:
        changes["limits"] = replace(changes.get("limits", config.limits), max_running=max_running)
    if models:
        changes["models"] = models_from_paths(models)
    if quantize:
        changes["models"] = [m if m.type == "embedding" else replace(m, quantize=quantize)
                             for m in changes.get("models", config.models)]  # fmt: skip
    if api_key:
        changes["api_keys"] = [*config.api_keys, api_key]
    if access_log is not None or access_log_format:
        log = config.access_log
        changes["access_log"] = replace(log, enabled=log.enabled if access_log is None else access_log,
                                        format=access_log_format or log.format)  # fmt: skip
    return check_config(replace(config, **changes)) if changes else config


def cmd_chat(args: argparse.Namespace) -> int:
    from llmfn.cli.chat import run_chat

    model = load_model(args.model, args.dtype, args.device, args.compile, args.quantize)
    return run_chat(model, args.model, sampling_settings(args), args.max_tokens, args.system, args.perf)


def cmd_run(args: argparse.Namespace) -> int:
    from llmfn.cli.chat import answer_once

    if len(args.words) > 2:
        args.parser.error("run takes [MODEL] PROMPT; quote the prompt")
    name, prompt = (args.words if len(args.words) == 2 else (DEFAULT_CHAT_MODEL, args.words[0]))
    if prompt == "-":
        prompt = sys.stdin.read()
    from llmfn.parallel import launch

    if launch.should_spawn(args.tensor_parallel, args.pipeline_parallel):
        stdin = prompt if args.words[-1] == "-" else None  # the ranks read the prompt this process read
        return launch.spawn_ranks((args.tensor_parallel or 1) * args.pipeline_parallel, stdin=stdin)
    load = lambda: load_model(name, args.dtype, launch.rank_device(args.device), bool(args.compile), args.quantize)
    model, sampling = launch.parallel_model(load, sampling_settings(args), tensor=args.tensor_parallel,
                                            pipeline=args.pipeline_parallel, device=args.device)  # fmt: skip
    return answer_once(model, prompt, sampling, args.max_tokens, args.system, args.raw, args.perf)


def cmd_bench(args: argparse.Namespace) -> int:
    import json
    import statistics

    from llmfn.perf import format_report, measure

    model = load_model(args.model, args.dtype, args.device, args.compile, args.quantize)
    if model.kind != "causal-lm":
        raise LlmfnError(f"{args.model}: this is an {model.kind} model; bench times text generation")
    prompt = bench_prompt(model, args.prompt_tokens)
    sampling = {**model_defaults(model), "temperature": 0.0, **sampling_settings(args)}
    for _ in range(args.warmup):
        measure(model, prompt, args.max_tokens, **sampling)
    reports = [measure(model, prompt, args.max_tokens, **sampling) for _ in range(args.repeat)]
    median = sorted(reports, key=lambda r: r.decode_tok_s)[len(reports) // 2]
    if args.json:
        print(json.dumps({"model": args.model, "device": args.device, "median": median.as_dict(),
                          "runs": [r.as_dict() for r in reports]}, indent=2))
        return 0
    print(f"{args.model} on {args.device}, {args.repeat} run(s) after {args.warmup} warm-up, median by decode tok/s:")
    print(format_report(median))
    if len(reports) > 1:
        spread = [r.decode_tok_s for r in reports]
        print(f"decode tok/s over runs: min {min(spread):.1f}, median {statistics.median(spread):.1f}, max {max(spread):.1f}")
    return 0


def bench_prompt(model, n: int) -> list[int]:
    """A prompt of exactly n tokens: English text, repeated and cut to length."""
    text = ("The quick brown fox jumps over the lazy dog while the scientist writes notes about "
            "rotary embeddings, caches and the speed of matrix multiplication. ")
    ids = model.tokenizer.encode(text)
    if n < 1:
        raise LlmfnError(f"--prompt-tokens must be at least 1, got {n}")
    return (ids * (n // len(ids) + 1))[:n]


def cmd_convert_gguf(args: argparse.Namespace) -> int:
    from llmfn.cli.progress import Progress
    from llmfn.loading import parse_dtype
    from llmfn.loading.gguf import convert_gguf

    dtype = parse_dtype(args.dtype)
    with Progress(f"converting {Path(args.input).name}") as progress:  # a bar per tensor
        out = convert_gguf(args.input, args.output, dtype=dtype, progress=progress)
    print(f"wrote {out}")
    return 0


def cmd_convert_gptq_to_awq(args: argparse.Namespace) -> int:
    from llmfn.cli.progress import Progress
    from llmfn.loading.convert import convert_gptq_to_awq

    with Progress("repacking GPTQ as AWQ", unit="linear") as progress:
        out = convert_gptq_to_awq(args.input, args.output, progress=progress)
    print(f"wrote {out}")
    return 0


def cmd_convert_quantize(args: argparse.Namespace) -> int:
    from llmfn.cli.progress import Progress
    from llmfn.loading.convert import quantize_checkpoint

    with Progress(f"quantizing ({args.method})", unit="linear") as progress:
        out = quantize_checkpoint(args.input, args.output, args.method, group_size=args.group_size,
                                  progress=progress)  # fmt: skip
    print(f"wrote {out}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from llmfn.cli.doctor import doctor

    return doctor(config_path=args.config, models=args.model, check_models=not args.no_models)


def cmd_models(args: argparse.Namespace) -> int:
    from llmfn.cli.doctor import list_models

    return list_models(as_json=args.json)


# ----------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
    parser = argparse.ArgumentParser(
        prog="llmfn", description="llmfn: a pure-functional LLM runtime over PyTorch.",
        epilog="Run `llmfn COMMAND --help` for a command's options.",
    )
    parser.add_argument("--debug", action="store_true", default=False, help="show the traceback of an error")
    parser.add_argument("--version", action="version", version=f"llmfn {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, func, description: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=description or help_text)
        p.set_defaults(func=func, parser=p)
        return p

    p = command("serve", "serve models over an OpenAI-compatible HTTP API (and a web chat at /)", cmd_serve)
    p.add_argument("--config", metavar="FILE", help="server config file (default: the built-in defaults)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--model", action="append", metavar="PATH_OR_ALIAS",
                   help="serve this model instead of the configured ones (repeatable)")
    p.add_argument("--api-key", metavar="KEY", help="require `Authorization: Bearer KEY` on the API")
    p.add_argument("--kv-cache-memory", metavar="SIZE",
                   help="KV cache per model, e.g. 512MiB or 2GiB (default: a tenth of the machine's memory, "
                        "at most 1 GiB)")
    p.add_argument("--kv-cache-dtype", choices=("float32", "bfloat16", "float16"),
                   help="KV cache dtype of fp32 models: bfloat16 / float16 hold twice the positions in the same "
                        "memory, keys and values rounded once (default: the model's dtype)")  # fmt: skip
    p.add_argument("--max-running", type=_positive, metavar="N",
                   help="requests decoded together per model, as vLLM's --max-num-seqs and llama.cpp's --parallel "
                        "(default: the config's [limits] max_running, 16)")  # fmt: skip
    p.add_argument("--replicas", type=int, default=1, metavar="N", help="N engine replicas on Ray Serve behind "
                   "one endpoint (needs llmfn[ray]; default 1: this process)")  # fmt: skip
    p.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster for --replicas (default: a local Ray)")
    _add_parallel_flags(p)
    p.add_argument("--micro-batches", type=int, metavar="N",
                   help="with --pipeline-parallel: run a decode step's sequences as N groups, so the stages work "
                        "at once (default: as many as stages; 1 runs the stages one after another)")  # fmt: skip
    _add_quantize_flag(p, " (default: each model's quantize in the config, else auto; embedding models keep theirs)")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction,
                   help="log one line per request on stderr: method, path, status, model, tokens, duration "
                        "(default: on, or the config's [access_log] enabled)")  # fmt: skip
    p.add_argument("--access-log-format", choices=("text", "json"),
                   help="text lines or one JSON object per line (default: text, or the config's [access_log] format)")

    p = command("chat", "interactive chat in the terminal (type /help inside)", cmd_chat,
                "Interactive chat with streamed answers and history. Reads lines from stdin when it is "
                "piped (answers go to stdout, notes to stderr). Commands: /help, /exit, /clear, /undo, "
                "/system TEXT, /set KEY VALUE, /perf.")
    p.add_argument("model", nargs="?", default=DEFAULT_CHAT_MODEL, metavar="MODEL",
                   help=f"alias, checkpoint folder or .gguf file (default {DEFAULT_CHAT_MODEL})")
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    p.add_argument("--perf", action="store_true", help="print the decoder perf report after each answer")
    _add_model_flags(p)
    add_sampling_flags(p, "most tokens per answer (default 512, capped by the context)")

    p = command("run", "answer one prompt and print the answer to stdout", cmd_run,
                "Answer one prompt with the model's chat template (or --raw text completion). "
                "PROMPT '-' reads the prompt from stdin.")
    p.add_argument("words", nargs="+", metavar="[MODEL] PROMPT",
                   help=f"model (alias, folder or .gguf; default {DEFAULT_CHAT_MODEL}) and the prompt")
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    p.add_argument("--raw", action="store_true", help="complete the prompt as plain text (no chat template)")
    p.add_argument("--perf", action="store_true", help="print the decoder perf report to stderr")
    _add_parallel_flags(p)
    _add_model_flags(p, "off: one answer rarely repays the compile time")
    add_sampling_flags(p, "most tokens to generate (default 256, capped by the context)")

    p = command("convert", "convert checkpoints: gguf, gptq-to-awq, quantize", None)
    conv = p.add_subparsers(dest="conversion", metavar="KIND", required=True)
    c = conv.add_parser("gguf", parents=[common], help="a llama.cpp GGUF file to a Hugging Face-style folder",
                        description="Dequantize a GGUF (llama, qwen2) into a folder llmfn loads.")
    c.set_defaults(func=cmd_convert_gguf, parser=c)
    c.add_argument("input", metavar="IN.gguf")
    c.add_argument("output", metavar="OUT_DIR")
    c.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="weight dtype (default float32)")
    c = conv.add_parser("gptq-to-awq", parents=[common], help="repack a GPTQ int4 checkpoint as AWQ",
                        description="Repack a GPTQ int4 checkpoint folder into the AWQ layout.")
    c.set_defaults(func=cmd_convert_gptq_to_awq, parser=c)
    c.add_argument("input", metavar="IN_DIR")
    c.add_argument("output", metavar="OUT_DIR")
    c = conv.add_parser("quantize", parents=[common], help="quantize a checkpoint's weights",
                        description="Quantize a float checkpoint folder's decoder linear weights (round to nearest).")
    c.set_defaults(func=cmd_convert_quantize, parser=c)
    c.add_argument("input", metavar="IN_DIR")
    c.add_argument("output", metavar="OUT_DIR")
    c.add_argument("--method", required=True, choices=("rtn-int4", "rtn-int8", "int4", "int8"),
                   help="rtn-int4: AutoAWQ GEMM layout; rtn-int8: llmfn int8 layout (round to nearest)")
    c.add_argument("--group-size", type=int, default=128,
                   help="weights per scale (default 128; -1 for rtn-int8 is one scale per output channel)")

    p = command("bench", "the decoder perf report: prefill s, decode s, decode and average tok/s", cmd_bench)
    p.add_argument("model", nargs="?", default=DEFAULT_CHAT_MODEL, metavar="MODEL",
                   help=f"alias, checkpoint folder or .gguf file (default {DEFAULT_CHAT_MODEL})")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    _add_model_flags(p)
    add_sampling_flags(p, "tokens to generate, EOS ignored (default 128)")
    p.set_defaults(max_tokens=128)

    p = command("doctor", "check the install: versions, devices, Triton, a tiny forward, the models", cmd_doctor)
    p.add_argument("--config", metavar="FILE", help="server config whose models to check (default: built-in)")
    p.add_argument("--model", action="append", metavar="PATH_OR_ALIAS",
                   help="check this model instead of the configured ones (repeatable)")
    p.add_argument("--no-models", action="store_true", help="skip loading the models")

    p = command("models", "list the known aliases and the cached models", cmd_models)
    p.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # never die on a character the terminal can't show
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    from llmfn.cli.progress import show_first_use_notes

    show_first_use_notes()
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("\nllmfn: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `llmfn run ... | head -1`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:  # noqa: BLE001 - the one place every error becomes one line
        if args.debug:
            traceback.print_exc()
        deliberate = isinstance(e, (LlmfnError, OSError))
        hint = "" if deliberate or args.debug else " (an internal error; run with --debug for the traceback)"
        print(f"llmfn: error: {one_line(e)}{hint}", file=sys.stderr)
        return 1
