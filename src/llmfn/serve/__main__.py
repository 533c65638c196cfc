"""`python -m llmfn.serve [--config FILE] [--host] [--port] [--workers] [--model PATH ...]`: the
server without the rest of the CLI (what `llmfn serve` calls, and what the tests start)."""

from __future__ import annotations

import argparse
import sys

import msgspec

from llmfn.errors import LlmfnError
from llmfn.serve import load_config, models_from_paths, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmfn.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="TOML config file (default: the embedded SmolLM2 + MiniLM models)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="processes; each loads its own models")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="PATH",
        help="serve this folder, .gguf file or alias instead of the config's models (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        if args.model:
            config = msgspec.structs.replace(config, models=models_from_paths(args.model))
        run(config, host=args.host, port=args.port, workers=args.workers)
    except LlmfnError as e:
        print(f"llmfn serve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
