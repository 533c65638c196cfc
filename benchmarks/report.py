"""One entry point for every CPU benchmark with its peers: runs each benchmark script in a process
of its own, one after another, keeps its tables, draws the plots (decode tok/s per runtime and
dtype, engine throughput against concurrency, speculative decoding's speedup by task) and writes one
report, benchmarks/report/REPORT.md, with the plots and each script's raw output beside it.

    python benchmarks/report.py [--quick] [--only decode,speculative] [--out benchmarks/report]
    make bench-report            # QUICK=1 for the short version (a few minutes instead of ~an hour)

A script that fails (a missing peer, a crash) gets its exit status and last lines in the report;
the others still run. Peers missing from the environment are skipped by the scripts themselves
(`make bench-setup` installs them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENGINE_CONCURRENCY = (1, 8, 16, 32)
QUICK_ENGINE_CONCURRENCY = (1, 4)


def steps(quick: bool, out: Path) -> dict[str, list[str]]:
    """Benchmark name -> the script and its arguments (short ones with --quick)."""
    spec_json = str(out / "speculative.json")
    if quick:
        found = {
            "decode": ["decode.py", "--rounds", "1", "--prompt-tokens", "64", "--gen-tokens", "32"],
            "quant": ["quant.py", "--gen-tokens", "32"],
            "speculative": ["speculative.py", "--quick", "--json", spec_json],
            "constrained": ["constrained.py", "--gen-tokens", "32", "--rounds", "1", "--batch", "4"],
            "embed": ["embed.py", "--repeats", "1"],
            "tokenizers": ["tokenizer_speed.py", "--mb", "0.2", "--repeat", "1"],
        }
        sweep, gen = QUICK_ENGINE_CONCURRENCY, 16
    else:
        found = {
            "decode": ["decode.py"],
            "quant": ["quant.py"],
            "speculative": ["speculative.py", "--json", spec_json],
            "constrained": ["constrained.py"],
            "embed": ["embed.py"],
            "tokenizers": ["tokenizer_speed.py"],
            "server-load": ["load.py"],
        }
        sweep, gen = ENGINE_CONCURRENCY, 64
    found["engine"] = ["engine.py", "--concurrency", *map(str, sweep), "--gen-tokens", str(gen)]
    return found


def run_step(script: list[str], timeout: int) -> dict:
    """Run one benchmark script; its stdout, stderr tail, exit status and wall time."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent / "src"), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, str(HERE / script[0]), *script[1:]], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=HERE.parent)  # fmt: skip
        rc, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = "timeout", (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else e.stdout or "", ""
    return {"rc": rc, "stdout": stdout, "stderr": stderr[-2000:], "seconds": time.perf_counter() - t0,
            "load": os.getloadavg()[0]}  # fmt: skip


def tables(text: str) -> list[list[dict[str, str]]]:
    """The markdown tables in a script's output, each as a list of {header: cell} rows."""
    found, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if len(block) > 2:
            header = block[0]
            found.append([dict(zip(header, row, strict=False)) for row in block[2:]])
        block = []
    return found


def number(cell: str | None) -> float | None:
    try:
        return float((cell or "").split()[0].rstrip("x"))
    except (ValueError, IndexError):
        return None


def column(results: dict, step: str, key_col: str, value_col: str) -> dict[str, float]:
    """{row's key_col: value_col as a number} over a step's tables that have both columns."""
    out = {}
    for table in tables(results.get(step, {}).get("stdout", "")):
        for row in table:
            value = number(row.get(value_col))
            if key_col in row and value is not None:
                out[row[key_col]] = value
    return out


def plot_decode(results: dict, path: Path) -> bool:
    bars = {**column(results, "decode", "runtime", "decode tok/s"), **column(results, "quant", "runtime", "decode tok/s")}
    if not bars:
        return False
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(bars) + 1.2))
    names = list(bars)
    colors = ["tab:blue" if n.startswith("llmfn") else "tab:gray" for n in names]
    ax.barh(names, [bars[n] for n in names], color=colors)
    for i, n in enumerate(names):
        ax.text(bars[n], i, f" {bars[n]:.1f}", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("decode tok/s (SmolLM2-135M, batch 1, greedy)")
    ax.set_title("Decode speed per runtime and dtype")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_concurrency(results: dict, path: Path) -> bool:
    """engine.py's table: a row per runtime, a column "N=n tok/s" per concurrency."""
    lines: dict[str, dict[int, float]] = {}
    for table in tables(results.get("engine", {}).get("stdout", "")):
        for row in table:
            for key, value in row.items():
                if key.startswith("N=") and key.endswith(" tok/s") and "runtime" in row:
                    label = "llmfn Engine" if "Engine" in row["runtime"] else row["runtime"]
                    lines.setdefault(label, {})[int(key[2:].split()[0])] = number(value)
    if not lines:
        return False
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in lines.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("requests decoded at once (max_running / batch)")
    ax.set_ylabel("generated tok/s")
    ax.set_title("Throughput against concurrency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_speculative(spec: dict | None, path: Path) -> bool:
    if not spec or not spec.get("rows"):
        return False
    import matplotlib.pyplot as plt

    rows = spec["rows"]
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    runtimes = list(dict.fromkeys(r["runtime"] for r in rows))
    width = 0.8 / len(runtimes)
    fig, ax = plt.subplots(figsize=(9, 4))
    for j, runtime in enumerate(runtimes):
        by = {r["prompt"]: r["speedup"] for r in rows if r["runtime"] == runtime}
        xs = [i + j * width for i in range(len(prompts))]
        ax.bar(xs, [by.get(p, 0.0) for p in prompts], width, label=runtime)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + width * (len(runtimes) - 1) / 2 for i in range(len(prompts))], prompts, rotation=20)
    ax.set_ylabel("decode speedup with speculation")
    ax.set_title("Prompt-lookup speculative decoding: speedup by task")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def as_markdown(stdout: str) -> str:
    """A script's output as report text: its `# ...` notes as quotes, not headings."""
    return "\n".join("> " + line[2:] if line.startswith("# ") else line for line in stdout.strip().splitlines())


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))  # fmt: skip
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_report(out: Path, results: dict, quick: bool, started: str) -> Path:
    spec_file = out / "speculative.json"
    spec = json.loads(spec_file.read_text()) if spec_file.exists() and "speculative" in results else None
    plots = [(name, title) for name, title, ok in (
        ("decode.png", "Decode tok/s per runtime and dtype", plot_decode(results, out / "decode.png")),
        ("concurrency.png", "Throughput against concurrency", plot_concurrency(results, out / "concurrency.png")),
        ("speculative.png", "Speculative decoding: speedup by task", plot_speculative(spec, out / "speculative.png")),
    ) if ok]  # fmt: skip
    lines = [
        "# llmfn benchmark report", "",
        f"Started {started}, commit {commit()}, {machine()}, Python {platform.python_version()}"
        + (", **quick mode** (short runs: indicative only)" if quick else "") + ".",
        "Each benchmark ran in a process of its own, one after another; peers in the same script run. "
        "The load average after each is listed: above the core count, other work shared the machine.", "",
        "| benchmark | command | status | seconds | load average after |", "|---|---|---|---:|---:|",
    ]  # fmt: skip
    for name, r in results.items():
        status = "ok" if r["rc"] == 0 else f"failed ({r['rc']})"
        lines.append(f"| {name} | `python benchmarks/{' '.join(r['command'])}` | {status} | {r['seconds']:.0f} | {r['load']:.1f} |")
    lines.append("")
    for name, title in plots:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    if spec:
        lines += ["## Speculative decoding summary", "", *spec["summary"], ""]
    for name, r in results.items():
        lines += [f"## {name}", ""]
        if r["rc"] != 0:
            lines += ["Failed; the end of its stderr:", "", "```", r["stderr"].strip()[-1500:], "```", ""]
        lines += [as_markdown(r["stdout"]), ""]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs of every benchmark (minutes, not an hour)")
    ap.add_argument("--only", help="comma-separated benchmark names (default: all); see --list")
    ap.add_argument("--list", action="store_true", help="print the benchmark names and exit")
    ap.add_argument("--out", type=Path, default=HERE / "report")
    ap.add_argument("--timeout", type=int, default=None, help="seconds per benchmark (default 900 quick, 3600 full)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    plan = steps(args.quick, args.out)
    if args.list:
        print("\n".join(plan))
        return
    if args.only:
        wanted = args.only.split(",")
        plan = {k: v for k, v in plan.items() if k in wanted or k.split("-")[0] in wanted}
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    results = {}
    for name, script in plan.items():
        print(f"[report] {name}: python benchmarks/{' '.join(script)}", flush=True)
        results[name] = {**run_step(script, args.timeout or (900 if args.quick else 3600)), "command": script}
        print(f"[report] {name}: exit {results[name]['rc']} in {results[name]['seconds']:.0f} s", flush=True)
    print(f"[report] wrote {write_report(args.out, results, args.quick, started)}")


if __name__ == "__main__":
    main()
