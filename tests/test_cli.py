"""The `llmfn` command line: chat, run, doctor and errors through the installed console script (a
subprocess, stdin piped), the rest in-process through `llmfn.cli.main`; and the perf report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import llmfn
from llmfn.cli import commands as cli
from llmfn.perf import PerfReport, TokenClock, format_report, measure
from server_util import write_config
from tiny import make_checkpoint

MAX_TOKENS = 12
PERF_LINE = re.compile(r"prompt \d+ tok \| generated \d+ tok \| prefill [\d.]+ s \| decode [\d.]+ s \| "
                       r"decode [\d.]+ tok/s \| avg [\d.]+ tok/s")  # fmt: skip


def llmfn_command() -> list[str]:
    """The console script installed next to this Python (pyproject's [project.scripts])."""
    script = Path(sys.executable).parent / "llmfn"
    assert script.exists(), f"{script} is missing: `pip install -e .` installs the llmfn console script"
    return [str(script)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "tiny"
    make_checkpoint(folder)
    return folder


@pytest.fixture(scope="module")
def model(tiny):
    return llmfn.load(tiny)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "LLMFN_HOME": str(home), "PYTHONIOENCODING": "utf-8", "HOME": str(home)}
    env.pop("TRITON_INTERPRET", None)  # as a user runs it (conftest sets it for the in-process tests)
    return env


def run_cli(args: list[str], env: dict, stdin: str = "", timeout: float = 180) -> subprocess.CompletedProcess:
    """Run llmfn; stdout/stderr decoded as UTF-8 with newlines kept exactly."""
    proc = subprocess.run(llmfn_command() + args, input=stdin.encode(), capture_output=True, env=env, timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def answer(model, messages, **sampling) -> str:
    """What the library's chat() answers: the CLI must print exactly this."""
    defaults = cli.model_defaults(model)
    return llmfn.chat(model, messages, max_tokens=MAX_TOKENS, **{**defaults, **sampling}).text()


# ------------------------------------------------------------------------------------------ subprocess


def test_chat_through_piped_stdin(tiny, model, env):
    script = "\n".join([
        "Hello",
        "/set temperature 0.7",
        "/set seed 3",
        "/set top_p 2",
        "/perf",
        "What is the capital of France?",
        "/undo",
        "/system Be brief.",
        "def main",
        "/clear",
        "Hello",
        "/nonsense",
        "/exit",
        "never answered",
    ]) + "\n"  # fmt: skip
    out = run_cli(["chat", str(tiny), "--max-tokens", str(MAX_TOKENS)], env, stdin=script)
    assert out.returncode == 0, out.stderr
    sampled = {"temperature": 0.7, "seed": 3}
    a1 = answer(model, [{"role": "user", "content": "Hello"}])
    a2 = answer(model, [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": a1},
                        {"role": "user", "content": "What is the capital of France?"}], **sampled)  # fmt: skip
    # /undo forgot question 2; the system prompt applies from now on
    a3 = answer(model, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                        {"role": "assistant", "content": a1}, {"role": "user", "content": "def main"}], **sampled)  # fmt: skip
    # /clear forgot the conversation but kept the system prompt and settings
    a4 = answer(model, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}], **sampled)
    assert out.stdout == f"{a1}\n{a2}\n{a3}\n{a4}\n"  # answers only, one per message; nothing after /exit
    err = out.stderr
    assert "temperature = 0.7" in err and "seed = 3" in err
    assert "error: /set top_p needs a value in (0, 1], got '2'" in err
    assert "perf report on" in err
    assert len(PERF_LINE.findall(err)) == 4  # the last answer's (on /perf), then after answers 2, 3 and 4
    assert "forgot the last question and answer" in err and "conversation cleared" in err
    assert "unknown command /nonsense" in err
    assert "Traceback" not in err


def test_run_prints_one_answer(tiny, model, env):
    out = run_cli(["run", str(tiny), "Hello there", "--system", "Be brief.", "--max-tokens", str(MAX_TOKENS),
                   "--perf"], env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    expected = answer(model, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}])
    assert out.stdout == expected + "\n"
    assert PERF_LINE.fullmatch(out.stderr.strip()), out.stderr


def test_doctor_exits_0(tiny, env, tmp_path):
    config = write_config(tmp_path, [{"name": "tiny", "path": str(tiny)}])
    out = run_cli(["doctor", "--config", str(config)], env)
    assert out.returncode == 0, out.stdout + out.stderr
    for word in ("torch", "triton", "granian", "cpu:", "Triton kernels", "C decode kernels: built", "tiny forward self-test",
                 "all checks passed"):
        assert word in out.stdout
    assert re.search(r"\[ +ok\] tiny \(.*tiny\): causal-lm, loaded in", out.stdout), out.stdout


def test_bad_model_path_is_one_clear_line(env, tmp_path):
    missing = tmp_path / "no-such-model"
    out = run_cli(["run", str(missing), "hi"], env)
    assert out.returncode == 1
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("llmfn: error: ") and str(missing) in lines[0]


# ------------------------------------------------------------------------------------------ in-process


@pytest.mark.parametrize("command", [
    [], ["serve"], ["chat"], ["run"], ["convert"], ["convert", "gguf"], ["convert", "gptq-to-awq"],
    ["convert", "quantize"], ["bench"], ["doctor"], ["models"],
])  # fmt: skip
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: llmfn")


def test_usage_errors_exit_2(capsys):
    for argv in (["run"], ["chat", "--temperature", "warm"], ["frobnicate"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2
    assert "usage: llmfn" in capsys.readouterr().err


def test_run_reads_the_prompt_from_stdin_and_refuses_embedding_models(tiny, model, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there"))
    assert cli.main(["run", str(tiny), "-", "--max-tokens", str(MAX_TOKENS)]) == 0
    assert capsys.readouterr().out == answer(model, [{"role": "user", "content": "Hello there"}]) + "\n"
    assert cli.main(["run", "all-minilm-l6-v2", "hi"]) == 1
    assert "this is an embedding model" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    for argv in (["run", str(missing), "hi", "--debug"], ["--debug", "run", str(missing), "hi"]):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err
        assert err.strip().splitlines()[-1].startswith(f"llmfn: error: {missing}: no such model folder")


def test_run_with_too_many_words_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "model", "two", "prompts"])
    assert exit_.value.code == 2
    assert "quote the prompt" in capsys.readouterr().err


def test_bench_reports_exact_lengths(tiny, capsys):
    code = cli.main(["bench", str(tiny), "--prompt-tokens", "16", "--max-tokens", "6", "--repeat", "2",
                     "--warmup", "0", "--json"])  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["runs"]) == 2
    for run in report["runs"]:
        assert (run["prompt_tokens"], run["generated_tokens"]) == (16, 6)
    assert cli.main(["bench", str(tiny), "--prompt-tokens", "8", "--max-tokens", "4", "--repeat", "1",
                     "--warmup", "0"]) == 0  # fmt: skip
    assert PERF_LINE.search(capsys.readouterr().out)


def test_perf_measure_times_prefill_and_decode(model):
    prompt = model.tokenizer.encode("The quick brown fox")
    report = measure(model, prompt, 8)  # EOS ignored: exactly 8 tokens
    assert (report.prompt_tokens, report.generated_tokens) == (len(prompt), 8)
    assert report.prefill_s > 0 and report.decode_s > 0
    assert report.decode_tok_s == pytest.approx(7 / report.decode_s)
    assert report.avg_tok_s == pytest.approx(8 / (report.prefill_s + report.decode_s))
    assert PERF_LINE.fullmatch(format_report(report))
    # a clock over nothing reports zeros, not a division by zero
    assert TokenClock(iter(()), 3).report() == PerfReport(3, 0, 0.0, 0.0, 0.0, 0.0)
    single = PerfReport.of(3, 1, 0.5, 0.0)
    assert (single.decode_tok_s, single.avg_tok_s) == (0.0, 2.0)


def test_doctor_reports_a_model_that_does_not_load(tmp_path, capsys):
    assert cli.main(["doctor", "--model", str(tmp_path / "missing")]) == 1
    out = capsys.readouterr().out
    assert re.search(r"\[FAILED\] .*missing.*: .*no such model folder", out)
    assert "some checks FAILED" in out


def test_models_lists_aliases_and_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMFN_HOME", str(tmp_path))
    cached = tmp_path / "models" / "my-model-float32"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "all-minilm-l6-v2" in out and "my-model-float32" in out
    assert cli.main(["models", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {a["name"] for a in listing["aliases"]} >= {"smollm2-135m-instruct", "all-minilm-l6-v2"}
    assert [c["name"] for c in listing["cached"]] == ["my-model-float32"]


def test_convert_gguf_wiring_and_errors(tmp_path, monkeypatch, capsys):
    import llmfn.loading.gguf

    assert cli.main(["convert", "gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llmfn: error: ") and "missing.gguf" in err and len(err.strip().splitlines()) == 1
    calls = []
    monkeypatch.setattr(llmfn.loading.gguf, "convert_gguf",
                        lambda src, out, dtype, progress: calls.append((src, out, dtype)) or out)
    assert cli.main(["convert", "gguf", "in.gguf", "out-dir", "--dtype", "bfloat16"]) == 0
    import torch

    assert calls == [("in.gguf", "out-dir", torch.bfloat16)]
    assert "wrote out-dir" in capsys.readouterr().out


def test_convert_quantize_and_gptq_to_awq(tiny, tmp_path, monkeypatch, capsys):
    import llmfn.cli.progress

    out = tmp_path / "int8"
    monkeypatch.setattr(llmfn.cli.progress, "enabled", lambda: True)  # as on a terminal: draw the bar
    assert cli.main(["convert", "quantize", str(tiny), str(out), "--method", "rtn-int8", "--group-size", "32"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"wrote {out}\n"
    assert "quantizing (rtn-int8): 100%" in captured.err and "14/14" in captured.err  # 2 layers x 7 linears
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8
    monkeypatch.undo()
    assert cli.main(["convert", "gptq-to-awq", str(tiny), str(tmp_path / "awq")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llmfn: error: ") and "not a GPTQ checkpoint" in err and len(err.splitlines()) == 1


def test_serve_refuses_a_missing_model_in_one_line(tmp_path, capsys):
    assert cli.main(["serve", "--model", str(tmp_path / "missing"), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llmfn: error: ") and "missing" in err and len(err.splitlines()) == 1


def test_serve_flags_override_the_config():
    from llmfn.serve.config import load_config

    config = cli.serve_overrides(load_config(None), ["/models/a", "smollm2-135m-instruct"], "sk-test")
    assert [m.path for m in config.models] == ["/models/a", "smollm2-135m-instruct"]
    assert config.api_keys == ["sk-test"]
    assert cli.serve_overrides(load_config(None), None, None) == load_config(None)
    assert cli.serve_overrides(load_config(None), None, None, max_running=32).limits.max_running == 32


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_serve_refuses_a_max_running_below_one_in_one_line(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--max-running", value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--max-running: must be an integer >= 1" in err and "Traceback" not in err


def test_progress_is_quiet_off_a_terminal(capsys):
    from llmfn.cli.progress import Progress, spinner

    with spinner("waiting", delay=0):
        pass
    with Progress("converting") as progress:
        for i in range(3):
            progress(i + 1, 3, "layer")
    assert capsys.readouterr().err == ""


def test_chat_session_commands(model, capsys):
    from llmfn.cli.chat import ChatSession

    session = ChatSession(model, {**cli.model_defaults(model), "max_tokens": 4})
    for line in ("/set max-tokens 0", "/set top_k -2", "/set seed none", "/set colour red", "/undo", "/system"):
        assert session.handle(line)
    err = capsys.readouterr().err
    assert "error: /set max_tokens needs a value" in err and "error: /set top_k needs a value" in err
    assert "seed = none" in err and "unknown setting 'colour'" in err
    assert "nothing to undo" in err and "no system prompt" in err
    assert session.handle("Hi") and len(session.history) == 2
    assert session.history[1]["content"] == capsys.readouterr().out[:-1]
    assert not session.handle("/exit") and not session.handle("/quit")


def test_convert_gguf_writes_a_loadable_folder(tmp_path):
    """`llmfn convert gguf` on the real SmolLM2 file gives a folder llmfn.load reads, with the same logits."""
    import subprocess
    import sys

    import torch

    import llmfn
    from llmfn.loading.registry import ALIASES, package_path

    gguf_file = package_path(ALIASES["smollm2-135m-instruct"])
    out = tmp_path / "smol"
    done = subprocess.run([sys.executable, "-m", "llmfn.cli", "convert", "gguf", str(gguf_file), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file()
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    dense = llmfn.load("smollm2-135m-instruct", quantize=None)  # the alias dequantized, as convert writes it
    assert torch.equal(llmfn.logits(llmfn.load(out), tokens), llmfn.logits(dense, tokens))
