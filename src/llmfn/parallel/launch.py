"""How ranks start: under torchrun (one host or many, through its rendezvous), or spawned by the CLI
on one host the way torchrun would (`llmfn run MODEL PROMPT --tensor-parallel 2`, and `llmfn serve
--tensor-parallel 2`, whose rank 0 serves and leads while the others follow: llmfn.parallel.steps).

A rank is a process whose environment names it: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT, which torchrun sets and `spawn_ranks` sets for the copies of the command line it starts.
`init` joins the process group from them: gloo on CPU, NCCL when the model runs on CUDA.

Multi-node (two hosts, or two invocations on one host for a test):
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 1 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29400 -m llmfn.cli run MODEL "prompt" --tensor-parallel 2
    (the same with --node-rank 1 on the other host)"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import torch
import torch.distributed as dist

from llmfn.errors import LlmfnError
from llmfn.sampling import fresh_seed

RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
PIPELINE_ENV = "LLMFN_PIPELINE_PARALLEL"  # stages, for a server's rank 0 (the ranks' argv stays in the CLI)
MICRO_BATCHES_ENV = "LLMFN_PIPELINE_MICRO_BATCHES"  # and its pipeline's micro-batches


def in_rank() -> bool:
    """Whether this process is one rank of a launched group (torchrun's or spawn_ranks' environment)."""
    return all(v in os.environ for v in ("RANK", "WORLD_SIZE"))


def rank_device(device: str) -> str:
    """A rank's device: "cuda" means this host's GPU number LOCAL_RANK; anything else as given."""
    if device == "cuda" and in_rank():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def init(device: str = "cpu") -> None:
    """Join the process group named by the environment, once (gloo, or NCCL for CUDA devices)."""
    if dist.is_initialized():
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(torch.device(rank_device(device)))
    dist.init_process_group("nccl" if cuda else "gloo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def should_spawn(tensor: int | None, pipeline: int) -> bool:
    """Whether the CLI, asked for tensor x pipeline ranks, must start them (it is not one already)."""
    if (tensor is not None and tensor < 1) or pipeline < 1:
        raise LlmfnError(f"--tensor-parallel and --pipeline-parallel take at least 1 (got {tensor}, {pipeline})")
    return (tensor or 1) * pipeline > 1 and not in_rank()


def spawn_ranks(world: int, argv: list[str] | None = None, stdin: str | None = None, grace: float = 0.0) -> int:
    """Run this command line (`python -m llmfn.cli ARGS`) as `world` ranks on this host, loopback only,
    and wait for them. Rank 0 writes to this process's stdout and stderr; the other ranks' output is
    dropped, except a failing rank's stderr, printed here. The first failure stops the others.
    stdin: text every rank reads as its standard input (a prompt given as '-'). grace: seconds the
    ranks get to end after SIGTERM (this process interrupted or terminated, or a rank failed: a server
    drains its requests) before they are killed. Returns the exit status (the first non-zero one)."""
    argv = sys.argv[1:] if argv is None else argv
    threads = max(1, (os.cpu_count() or 1) // world)  # the ranks share the host's cores
    base = {**os.environ, "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    base.setdefault("GLOO_SOCKET_IFNAME", "lo")
    base.setdefault("OMP_NUM_THREADS", str(threads))
    procs, logs = [], []
    try:
        for rank in range(world):
            env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)}
            log = None if rank == 0 else tempfile.TemporaryFile()
            out = None if rank == 0 else subprocess.DEVNULL
            procs.append(subprocess.Popen([sys.executable, "-m", "llmfn.cli", *argv], env=env, stdout=out, stderr=log,
                                          stdin=None if stdin is None else subprocess.PIPE))  # fmt: skip
            logs.append(log)
            if stdin is not None:
                procs[-1].stdin.write(stdin.encode())
                procs[-1].stdin.close()
        previous = _forward_sigterm(procs[0])
        try:
            code = _wait(procs, logs)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if code and procs[0].poll() is None:
            procs[0].terminate()  # another rank failed: rank 0 ends (a server drains) and ends the rest
        return code
    finally:
        _stop(procs, grace)
        for log in logs:
            if log is not None:
                log.close()


def _forward_sigterm(rank0: subprocess.Popen):
    """On SIGTERM, terminate rank 0 (which leads the others: a server drains its requests, then stops
    them) and end this process like Ctrl-C does. Returns the handler it replaces (None off the main
    thread, where it cannot)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def forward(signum, frame):
        rank0.terminate()
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, forward)


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
    """Give the ranks still running `grace` seconds to end (they were interrupted too, or rank 0 was
    terminated), then kill the rest."""
    deadline = time.monotonic() + grace
    for p in procs:
        if p.poll() is None:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _wait(procs: list[subprocess.Popen], logs: list) -> int:
    """Wait for every rank; on the first failure, print its stderr (rank 0's is already shown) and
    stop the rest."""
    pending = set(range(len(procs)))
    while pending:
        for rank in sorted(pending):
            try:
                code = procs[rank].wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                continue
            pending.discard(rank)
            if code != 0:
                if rank != 0 and _exit_code(procs[0], timeout=5.0) not in (None, 0):
                    return code  # rank 0 failed too and said why on this terminal: one message, not two
                if logs[rank] is not None:
                    logs[rank].seek(0)
                    sys.stderr.write(logs[rank].read().decode(errors="replace"))
                return code
    return 0


def _exit_code(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def agreed_seed(seed: int | None, src: int = 0) -> int:
    """`seed`, or when None one drawn on rank `src` and shared with every rank of the world."""
    if seed is not None:
        return seed
    box = [fresh_seed()]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def quiet_unless_rank0() -> None:
    """Under torchrun every rank shares the terminal: only rank 0 prints answers."""
    if int(os.environ.get("RANK", "0")) != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


def load_sharded(load, *, tensor: int, pipeline: int, device: str = "cpu"):
    """In a rank: join the group, load the model (rank 0 first, so a first-use GGUF conversion into
    the shared cache runs once) and return this rank's shard. `load()` returns the full Model; tensor
    and pipeline must multiply to the world size (tensor 0: whatever pipeline leaves)."""
    from llmfn.parallel.sharding import shard

    init(device)
    world = dist.get_world_size()
    tensor = tensor or world // pipeline
    if tensor * pipeline != world:
        raise LlmfnError(f"--tensor-parallel {tensor} x --pipeline-parallel {pipeline} = {tensor * pipeline} "
                         f"ranks, but {world} were launched")  # fmt: skip
    quiet_unless_rank0()
    if dist.get_rank() != 0:
        dist.barrier()
    model = load()
    if dist.get_rank() == 0:
        dist.barrier()
    return shard(model, pipeline=pipeline)


def parallel_model(load, sampling: dict, *, tensor: int | None, pipeline: int, device: str = "cpu"):
    """The CLI's model and sampling settings: in a rank, this rank's shard and the settings with a seed
    every rank shares (so sampled tokens agree); elsewhere load() and the settings as they are."""
    if not in_rank():
        return load(), sampling
    import atexit

    model = load_sharded(load, tensor=tensor or 0, pipeline=pipeline, device=device)
    atexit.register(finish)
    return model, {**sampling, "seed": agreed_seed(sampling.get("seed"))}


def finish() -> None:
    """Leave the process group (a clean exit for gloo and NCCL)."""
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
