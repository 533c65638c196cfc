"""Tensor and pipeline parallel (llmfn.parallel) on this CPU: ranks spawned as processes over gloo on
loopback. Tensor parallel sums in another order than one process, so its logits are held within 1e-4
of the single-process forward; pipeline parallel runs the same arithmetic, so its logits are bitwise
equal; every rank ends with the same logits, bit for bit. Each rank computes the single-process
reference itself (rank 0, one thread, as the shards run), before sharding.

The 2-rank run (every family and leaf kind, one spawn) takes ~20 s and `llmfn run --tensor-parallel 2`
against one process ~25 s; marked slow (they run in `make test`, not in the quick tier): the 4-rank
run (GQA with fewer kv heads than ranks, tensor x pipeline), SmolLM2's 64 greedy tokens, the CLI's
pipeline and error runs and two torchrun "nodes" meeting through a c10d rendezvous on 127.0.0.1.
llmfn.Engine on the shards (rank 0 leading, llmfn.parallel.steps) runs in the 2-rank spawn against
llmfn.generate; `llmfn serve --tensor-parallel 2` against a one-process server is slow (~30 s)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import llmfn
from llmfn import parallel
from llmfn.chat_template import apply_chat_template
from llmfn.errors import LlmfnError
from llmfn.parallel.tensor import head_split
from parallel_ranks import free_port, run_ranks
from server_util import start_server
from tiny import make_checkpoint

TP_CASES = {  # name: (family, checkpoint overrides, case keywords)
    "llama-gqa": ("llama", {}, {}),
    "llama-mqa": ("llama", {"num_key_value_heads": 1}, {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}, {}),
    "llama-vocab-replicated": ("llama", {}, {"vocab": "replicated"}),
    "llama-alibi": ("llama", {}, {"mutate": "alibi"}),
    "mistral-window": ("mistral", {"sliding_window": 8}, {}),
    "qwen2-bias": ("qwen2", {"tie_word_embeddings": True}, {}),
    "llama-int4": ("llama", {"intermediate_size": 128}, {"load": {"quantize": "int4"}}),
    "llama-int8": ("llama", {"intermediate_size": 128, "tie_word_embeddings": True}, {"load": {"quantize": "int8"}}),
    "llama-bf16": ("llama", {}, {"load": {"dtype": "bfloat16"}}),  # Bf16Weight leaves
}
PP_CASES = {
    "pipeline-llama": ("llama", {"num_hidden_layers": 3}, {"pipeline": 2}),
    "pipeline-qwen2-int4": ("qwen2", {"intermediate_size": 128}, {"pipeline": 2, "load": {"quantize": "int4"}}),
}


def _cases(tmp_path, table: dict) -> dict:
    cases = {}
    for name, (fam, overrides, extra) in table.items():
        folder = tmp_path / name
        make_checkpoint(folder, fam, **overrides)
        cases[name] = {"path": str(folder), **extra}
    return cases


# llmfn.Engine on the shards, rank 0 leading (llmfn.parallel.steps): three prompts batched, one longer
# than the prefill chunk (8) and the block size (4), greedy against llmfn.generate on the whole model
ENGINE_PROMPTS = [[5, 17, 42], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12], [300, 2]]
ENGINE_CASES = {
    "engine-tp2": ("llama", {}, {"engine": True, "prompts": ENGINE_PROMPTS, "max_tokens": 10}),
    "engine-pp2": ("qwen2", {}, {"engine": True, "prompts": ENGINE_PROMPTS, "max_tokens": 10, "pipeline": 2}),
    "engine-pp2-micro": ("qwen2", {}, {"engine": True, "prompts": ENGINE_PROMPTS, "max_tokens": 10, "pipeline": 2,
                                       "micro_batches": 2}),  # decode steps of 3 rows as 2 groups
}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel2")
    return run_ranks(2, _cases(tmp, {**TP_CASES, **PP_CASES, **ENGINE_CASES}), tmp)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", TP_CASES)
def test_tensor_parallel_logits_match_one_process(two_ranks, name):
    ranks = two_ranks
    reference = ranks[0][name]["reference"]
    for r in ranks:
        assert _max_diff(r[name]["sharded"], reference) <= 1e-4
    assert _bitwise(ranks[0][name]["sharded"], ranks[1][name]["sharded"]), "ranks disagree"
    assert ranks[0][name]["cfg"]["num_heads"] == 2  # each rank really ran half the heads


def test_tensor_parallel_splits_kv_heads_or_replicates_them(two_ranks):
    assert [r["llama-gqa"]["cfg"]["num_kv_heads"] for r in two_ranks] == [1, 1]  # 2 kv heads split
    assert [r["llama-mqa"]["cfg"]["num_kv_heads"] for r in two_ranks] == [1, 1]  # 1 kv head copied
    assert [r["llama-int4"]["cfg"]["intermediate_size"] for r in two_ranks] == [64, 64]


@pytest.mark.parametrize("name", PP_CASES)
def test_pipeline_parallel_is_bitwise_one_process(two_ranks, name):
    reference = two_ranks[0][name]["reference"]
    for r in two_ranks:
        assert _bitwise(r[name]["sharded"], reference)
    assert [r[name]["cfg"]["num_layers"] for r in two_ranks] == ([1, 2] if name == "pipeline-llama" else [1, 1])


@pytest.mark.parametrize("name", ENGINE_CASES)
def test_engine_on_shards_led_by_rank0_gives_the_one_process_tokens(two_ranks, name):
    reference = two_ranks[0][name]["reference"]
    assert [len(t) for t in reference] == [10, 10, 10]  # no early stop hides a difference
    assert two_ranks[0][name]["sharded"] == reference
    assert two_ranks[1][name]["sharded"] is None  # the follower only repeated rank 0's steps


class _Cfg:
    def __init__(self, heads, kv, width=8):
        self.num_heads, self.num_kv_heads, self.intermediate_size = heads, kv, width


def test_head_split_keeps_gqa_groups_whole():
    # SmolLM2: 9 query heads in 3 groups over 2 ranks -> 1 group and 2 groups
    assert [head_split(_Cfg(9, 3), r, 2).q for r in range(2)] == [(0, 3), (3, 9)]
    assert [head_split(_Cfg(9, 3), r, 2).kv for r in range(2)] == [(0, 1), (1, 3)]
    # 2 kv heads over 4 ranks: each kv head copied to 2 ranks, its 4 query heads split 2 + 2
    assert [head_split(_Cfg(8, 2), r, 4).q for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [head_split(_Cfg(8, 2), r, 4).kv for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    with pytest.raises(LlmfnError, match="kv heads"):
        head_split(_Cfg(9, 3), 0, 6)  # 3 query heads a kv head do not split over 2 ranks


def test_shard_without_a_process_group_is_a_clear_error(tmp_path):
    make_checkpoint(tmp_path / "m")
    with pytest.raises(LlmfnError, match="process group"):
        parallel.shard(llmfn.load(tmp_path / "m"))


@pytest.mark.slow
def test_four_ranks_gqa_replicated_and_tensor_times_pipeline(tmp_path):
    table = {
        "tp4-gqa": ("llama", {"num_attention_heads": 4, "num_key_value_heads": 2}, {}),
        "tp2-pp2": ("qwen2", {"num_hidden_layers": 4}, {"pipeline": 2}),
    }
    ranks = run_ranks(4, _cases(tmp_path, table), tmp_path)
    for name in table:
        reference = ranks[0][name]["reference"]
        for r in ranks:
            assert _max_diff(r[name]["sharded"], reference) <= 1e-4
            assert _bitwise(r[name]["sharded"], ranks[0][name]["sharded"])
    assert [r["tp4-gqa"]["cfg"]["num_kv_heads"] for r in ranks] == [1, 1, 1, 1]
    assert [r["tp2-pp2"]["cfg"]["num_layers"] for r in ranks] == [2, 2, 2, 2]
    assert [r["tp2-pp2"]["cfg"]["num_heads"] for r in ranks] == [2, 2, 2, 2]


@pytest.mark.slow
def test_smollm2_greedy_tokens_are_one_process_tokens(tmp_path):
    model = llmfn.load("smollm2-135m-instruct")
    asks = ["Write a long story about a lighthouse keeper.", "Explain in detail how a bicycle works."]
    prompts = [apply_chat_template(model.tokenizer, model.chat_template, [{"role": "user", "content": a}]) for a in asks]
    cases = {"smollm2-tp2": {"path": "smollm2-135m-instruct", "prompts": prompts, "max_tokens": 64},
             "smollm2-pp2": {"path": "smollm2-135m-instruct", "prompts": prompts, "max_tokens": 64,
                             "pipeline": 2, "reference_of": "smollm2-tp2"},
             "smollm2-engine-tp2": {"path": "smollm2-135m-instruct", "prompts": prompts, "max_tokens": 64,
                                    "engine": True, "reference_of": "smollm2-tp2"}}  # fmt: skip
    ranks = run_ranks(2, cases, tmp_path)
    reference = ranks[0]["smollm2-tp2"]["reference"]
    for name in cases:
        assert ranks[0][name]["sharded"] == reference
        assert ranks[1][name]["sharded"] == (None if name == "smollm2-engine-tp2" else reference)
    assert [len(t) for t in reference] == [64, 64]  # no early EOS hides a difference


# ------------------------------------------------------------------------------------------ CLI


def _cli(args: list[str], env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", **(env or {})}
    return subprocess.run([sys.executable, "-m", "llmfn.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parallel_cli") / "tiny"
    make_checkpoint(folder)
    args = ["run", str(folder), "Hello world, what is", "--raw", "--max-tokens", "12", "--temperature", "0"]
    single = _cli(args)
    assert single.returncode == 0, single.stderr
    assert single.stdout.strip()
    return folder, args, single.stdout


def test_cli_run_tensor_parallel_prints_the_one_process_answer(cli_model):
    _, args, expected = cli_model
    tp = _cli([*args, "--tensor-parallel", "2"])
    assert tp.returncode == 0, tp.stderr
    assert tp.stdout == expected  # rank 0 alone prints, the same greedy tokens


@pytest.mark.slow
def test_cli_run_pipeline_parallel_and_a_bad_layout(cli_model):
    _, args, expected = cli_model
    pp = _cli([*args, "--pipeline-parallel", "2"])
    assert pp.returncode == 0, pp.stderr
    assert pp.stdout == expected
    bad = _cli([*args, "--tensor-parallel", "3"])  # 2 kv heads over 3 ranks
    assert bad.returncode == 1
    assert bad.stderr.count("llmfn: error: tensor parallel 3") == 1, bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.slow
def test_cli_run_under_two_torchrun_nodes(cli_model):
    """Multi-node through torchrun's c10d rendezvous: two invocations of one rank each, on loopback."""
    _, args, expected = cli_model
    port = free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "llmfn-test",
                "--local-addr", "127.0.0.1", "-m", "llmfn.cli", *args, "--tensor-parallel", "2"]  # fmt: skip
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(torchrun, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]  # fmt: skip
    outs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outs]
    assert sorted(out for out, _ in outs) == ["", expected]  # the node that drew rank 0 prints it, once


# ---------------------------------------------------------------------------------------- serve


def _completions(base: str, prompts: list[str]) -> list[str]:
    def one(prompt: str) -> str:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0}
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 12
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(len(prompts)) as pool:  # concurrent: the engine batches them
        return list(pool.map(one, prompts))


@pytest.mark.slow
def test_serve_tensor_and_pipeline_parallel_answer_as_one_process(cli_model):
    """`llmfn serve --tensor-parallel 2` and `--pipeline-parallel 2`: the CLI spawns the ranks, rank 0's
    server leads, rank 1 follows its engine's steps; greedy completions are those of a one-process
    server, and Ctrl-C (SIGINT to the process group, as a terminal sends it) ends every rank."""
    folder, _, _ = cli_model
    prompts = ["Hello world, what is", "The", "Once upon a time there was a tiny model that"]
    command = [sys.executable, "-m", "llmfn.cli", "serve", "--model", str(folder)]
    env = {"GLOO_SOCKET_IFNAME": "lo"}
    with start_server(command=command, env=env) as single:
        expected = _completions(single.base_url, prompts)
    for layout in (["--tensor-parallel", "2"], ["--pipeline-parallel", "2"]):  # the pipeline: 2 micro-batches
        with start_server(command=command, args=layout, env=env) as sharded:
            assert _completions(sharded.base_url, prompts) == expected
            assert "llmfn: ready" in sharded.log()
        with pytest.raises(ProcessLookupError):  # no rank is left running
            os.killpg(sharded.proc.pid, 0)
