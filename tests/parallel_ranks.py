"""The ranks of tests/test_parallel.py: torch.multiprocessing spawns `worker` once per rank (gloo over
loopback); each rank runs every case and saves what it computed for the test process to compare."""

from __future__ import annotations

import dataclasses
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import llmfn
from llmfn import parallel
from llmfn.backend import forward_for
from llmfn.engine import Engine
from llmfn.models import family


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, cases: dict, out_dir) -> list[dict]:
    """Spawn `world` ranks running `cases`; returns each rank's results (rank order)."""
    port = free_port()
    mp.start_processes(worker, args=(world, port, cases, str(out_dir)), nprocs=world, start_method="spawn")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


def with_alibi(model):
    """The same weights with ALiBi instead of rope (Baichuan-13B's position encoding)."""
    cfg = dataclasses.replace(model.cfg, position_encoding="alibi")
    n = cfg.num_heads
    slopes = torch.tensor([2 ** (-8 * (i + 1) / n) for i in range(n)], dtype=torch.float32)
    params = {k: v for k, v in model.params.items() if k != "rope_inv_freq"} | {"alibi_slopes": slopes}
    return dataclasses.replace(model, cfg=cfg, params=params)


SIZES = ("num_heads", "num_kv_heads", "intermediate_size", "num_layers")
MUTATIONS = {None: lambda m: m, "alibi": with_alibi}


def steps(model, seed: int = 3) -> list[torch.Tensor]:
    """Logits of: a 2-row prefill of 5 tokens (decode-sized: the C kernels), 7 decode steps on its
    cache, and one 40-token prefill (oneDNN's path)."""
    cfg, params = model.cfg, model.params
    arch, fwd = family(cfg), forward_for(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    out = []
    with torch.inference_mode():
        cache = arch.init_cache(cfg, 2, 16)
        logits, cache = fwd(params, cfg, tokens[:, :5], torch.arange(5).expand(2, 5), cache)
        out.append(logits.clone())
        for p in range(5, 12):
            logits, cache = fwd(params, cfg, tokens[:, p : p + 1], torch.full((2, 1), p), cache)
            out.append(logits.clone())
        long = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(seed + 1))
        logits, _ = fwd(params, cfg, long, torch.arange(40)[None], arch.init_cache(cfg, 1, 40))
        out.append(logits.clone())
    return out


def greedy(model, prompts: list[list[int]], max_tokens: int, sharded: bool) -> list[list[int]]:
    """Greedy tokens; a sharded model goes through parallel.generate (the seed agreed by all ranks)."""
    gen = parallel.generate if sharded else llmfn.generate
    return [list(gen(model, p, max_tokens=max_tokens, temperature=0.0)) for p in prompts]


def engine_greedy(case: dict) -> list[list[int]] | None:
    """Greedy tokens of llmfn.Engine on the shards, rank 0 leading (llmfn.parallel.Leader) and the
    others following; the prompts go in as one batch, so the decode steps run several rows. None on the
    followers."""
    load = lambda: llmfn.load(case["path"], **case.get("load", {}))
    layout = {"pipeline": case.get("pipeline", 1), "micro_batches": case.get("micro_batches", 1)}
    if dist.get_rank() != 0:
        parallel.follow([load], **layout)
        return None
    leader = parallel.Leader(**layout)
    model = leader.load(load)
    memory = int(8 * 2**20 * model.extra["kv_share"])  # no rank's pool above 8 MiB
    with Engine(model, max_running=4, kv_cache_memory=memory, block_size=4, prefill_chunk=8) as engine:
        results = engine.generate_many(case["prompts"], max_tokens=case["max_tokens"])
    leader.close()
    assert all(r.error is None for r in results), [r.error for r in results]
    return [r.token_ids for r in results]


def run_case(case: dict, model, sharded: bool):
    if "prompts" in case:
        return greedy(model, case["prompts"], case["max_tokens"], sharded)
    return steps(model)


def worker(rank: int, world: int, port: int, cases: dict, out_dir: str) -> None:
    """cases: name -> dict(path, load (llmfn.load keywords), mutate (a MUTATIONS key), pipeline, vocab,
    prompts / max_tokens (greedy generation instead of logits), engine (that generation by llmfn.Engine
    with rank 0 leading; micro_batches for its pipeline), reference_of (another case whose reference serves this one: not computed
    again))."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      GLOO_SOCKET_IFNAME="lo")  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for name, case in cases.items():
        own_reference = rank == 0 and not case.get("reference_of")  # else the test takes that case's
        if case.get("engine"):  # the Leader (and follow) load and shard themselves
            reference = greedy(llmfn.load(case["path"], **case.get("load", {})), case["prompts"],
                               case["max_tokens"], sharded=False) if own_reference else None  # fmt: skip
            results[name] = {"reference": reference, "sharded": engine_greedy(case)}
            continue
        full = MUTATIONS[case.get("mutate")](llmfn.load(case["path"], **case.get("load", {})))
        reference = run_case(case, full, sharded=False) if own_reference else None
        part = parallel.shard(full, pipeline=case.get("pipeline", 1), vocab=case.get("vocab", "split"))
        results[name] = {"reference": reference, "sharded": run_case(case, part, sharded=True), "cfg": {k: getattr(part.cfg, k) for k in SIZES}}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
