"""The served models: loaded in a background thread at start-up (so /health can answer 503 while
they load), one `llmfn.engine.Engine` per causal LM, looked up by name or alias."""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field

from llmfn.errors import LlmfnError
from llmfn.model import Model
from llmfn.serve.banner import ready_banner
from llmfn.serve.config import ModelConfig, ServerConfig
from llmfn.serve.http import ApiError

log = logging.getLogger("llmfn.serve")
EXIT_ON_LOAD_ERROR_ENV = (
    "LLMFN_SERVE_EXIT_ON_LOAD_ERROR"  # set by `run`: a model that fails to load stops the server
)


@dataclass
class Served:
    name: str
    spec: ModelConfig
    model: Model
    engine: object | None = None  # llmfn.engine.Engine for causal LMs
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def kind(self) -> str:
        return self.model.kind

    @property
    def context_length(self) -> int:
        """Tokens a request may use in all: the model's context, or the engine's shorter max_model_len."""
        cfg = self.model.cfg
        if self.kind == "embedding":
            return int(self.model.extra.get("max_seq_length") or getattr(cfg, "max_positions", 512))
        return min(int(cfg.max_position_embeddings), int(getattr(self.engine, "max_model_len", 1 << 62)))


def load_model(spec: ModelConfig) -> Model:
    """llmfn.load, with a fallback to llmfn.embed for sentence-transformers folders that the generic
    loader does not know yet; the result must match spec.type when given."""
    from llmfn.errors import UnsupportedModelError
    from llmfn.loading import load, parse_dtype, resolve

    try:
        model = load(spec.path, dtype=spec.dtype, device=spec.device, compile=spec.compile, quantize=spec.quantize)
    except UnsupportedModelError:
        folder = resolve(spec.path)
        if spec.type != "embedding" and not (folder / "modules.json").exists():
            raise
        from llmfn.embed import load_embedding_model

        model = load_embedding_model(folder, dtype=parse_dtype(spec.dtype), device=spec.device)
    if spec.type is not None and model.kind != spec.type:
        raise LlmfnError(f"{spec.path} is a {model.kind} model, but the config says type = {spec.type!r}")
    return model


def load_rank_model(spec: ModelConfig) -> Model:
    """load_model in a rank of `llmfn serve --tensor-parallel`: "cuda" is this rank's GPU."""
    import msgspec

    from llmfn.parallel.launch import rank_device

    return load_model(msgspec.structs.replace(spec, device=rank_device(spec.device)))


def rank_leader():
    """llmfn.parallel's Leader when this server is rank 0 of `llmfn serve --tensor-parallel N` ranks
    (the others follow its engines' steps: llmfn.parallel.steps), else None."""
    from llmfn.parallel import launch

    if not launch.in_rank():
        return None
    from llmfn.parallel import Leader

    return Leader(pipeline=int(os.environ.get(launch.PIPELINE_ENV, "1")),
                  micro_batches=int(os.environ.get(launch.MICRO_BATCHES_ENV, "1")), device=launch.rank_device("cpu"))


def kv_budget(memory: int | str | None, model: Model) -> int | str | None:
    """The engine's KV budget: on rank 0 of sharded ranks, its share (extra["kv_share"]), so that the
    pool of every rank, which mirrors rank 0's block count, stays within `memory`."""
    share = model.extra.get("kv_share", 1.0)
    if share == 1.0:
        return memory
    from llmfn.engine.blocks import default_kv_cache_memory, parse_bytes

    budget = parse_bytes(memory) if memory is not None else default_kv_cache_memory(model.params["norm"].device)
    return int(budget * share)


def warm_up(engine, model: Model) -> None:
    """One short generation before the server reports ready, so that first-use costs (torch.compile,
    allocator growth, building the sampler's C code) are paid while /health still says 503, not by
    the first client. Sampled, not greedy: a greedy step runs only the sampler's argmax, not its race."""
    from llmfn.engine import GenerationRequest
    from llmfn.sampling import SamplingParams

    prompt = model.tokenizer.encode("Hello") or [0]
    engine.generate_many(
        [GenerationRequest(prompt_ids=prompt, max_tokens=2, sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=0))]
    )


class ModelPool:
    """Loads the models on one long-lived thread, which then runs the embedding batches.

    Why one thread that stays: torch's OpenMP runtime keeps a team of worker threads per thread that
    ran a parallel op, and the team of a thread that exits keeps spinning; an engine built on a
    short-lived loader thread ran 10-50x slower on a 2-core machine. Loading, engine construction
    and embeddings therefore all run on this thread, for the life of the server."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.served: dict[str, Served] = {}  # name and every alias -> Served
        self.order: list[Served] = []
        self.status = "loading"  # "loading" | "ok" | "error"
        self.error: str | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._loaded = threading.Event()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped = False
        self.leader = None  # llmfn.parallel.Leader on rank 0 of tensor / pipeline parallel ranks

    def start(self) -> None:
        """Load every model on the pool's thread (idempotent)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name="llmfn-models", daemon=True)
                self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until loading has finished (or failed); True when every model is ready."""
        self._loaded.wait(timeout)
        return self.status == "ok"

    def run(self, fn) -> concurrent.futures.Future:
        """Run fn() on the pool's thread (embedding batches); `asyncio.wrap_future` awaits it."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, future))
        return future

    def _main(self) -> None:
        try:
            self._load_all()
        finally:
            self._loaded.set()
        while (job := self._jobs.get()) is not None:
            fn, future = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:
                    future.set_exception(e)

    def _load_all(self) -> None:
        from llmfn.engine import Engine

        limits = self.config.limits
        spec = None
        try:
            self.leader = rank_leader()
            for spec in self.config.models:
                t0 = time.perf_counter()
                log.info("loading %s from %s", spec.name, spec.path)
                model = load_model(spec) if self.leader is None else self.leader.load(functools.partial(load_rank_model, spec))
                served = Served(spec.name, spec, model)
                if model.kind == "causal-lm":
                    context = min(spec.max_model_len or spec.context_length or 1 << 62,
                                  model.cfg.max_position_embeddings)  # fmt: skip
                    served.engine = Engine(model, max_running=limits.max_running, max_queued=limits.max_queued,
                                           kv_cache_memory=kv_budget(limits.kv_cache_memory, model), max_model_len=context,
                                           kv_cache_dtype=limits.kv_cache_dtype,
                                           speculative=spec.speculative)  # fmt: skip
                    served.engine.start()
                    warm_up(served.engine, model)
                if self._stopped:
                    self._shutdown_one(served)
                    return
                for name in (spec.name, *spec.aliases):
                    self.served[name] = served
                self.order.append(served)
                log.info("loaded %s (%s, %s) in %.1fs", spec.name, model.kind, spec.path, time.perf_counter() - t0)
            self.status = "ok"
            log.info("%s", ready_banner([(s.name, s.kind) for s in self.order]))
        except Exception as e:  # a model that cannot load: report it on /health and in the log
            self.error = f"model {spec.name!r} failed to load: {e}" if spec else str(e)
            self.status = "error"
            log.error("%s", self.error, exc_info=not isinstance(e, LlmfnError))
            if os.environ.get(EXIT_ON_LOAD_ERROR_ENV):
                os._exit(3)

    def ready(self) -> None:
        """Raise the 503 that every model route answers until loading has succeeded."""
        if self.status == "error":
            raise ApiError(503, self.error or "model loading failed", code="model_load_failed")
        if self.status != "ok":
            raise ApiError(503, "the server is still loading its models; retry shortly", code="loading",
                           headers=[(b"retry-after", b"2")])  # fmt: skip

    def get(self, name: str | None, kind: str | None = None) -> Served:
        """The model a request names, or when it names none the first model of `kind` (the first
        chat model when kind is None). 404 for an unknown name, 400 for a model of the wrong kind."""
        self.ready()
        if name is None:
            served = next((s for s in self.order if s.kind == (kind or "causal-lm")), None)
            if served is None:
                raise ApiError(400, f"this server has no {kind or 'causal-lm'} model", param="model",
                               code="model_not_found")  # fmt: skip
            return served
        served = self.served.get(name)
        if served is None:
            names = ", ".join(sorted(self.served))
            raise ApiError(404, f"the model {name!r} does not exist (served: {names})", param="model",
                           code="model_not_found")  # fmt: skip
        if kind is not None and served.kind != kind:
            what = "an embedding model" if kind == "embedding" else "a chat/completion model"
            raise ApiError(400, f"the model {name!r} is a {served.kind} model, not {what}", param="model",
                           code="wrong_model_type")  # fmt: skip
        return served

    def shutdown(self) -> None:
        self._stopped = True
        self._jobs.put(None)
        for served in self.order:
            self._shutdown_one(served)
        if self.leader is not None:
            try:
                self.leader.close()  # the other ranks return
            except Exception:
                log.exception("could not stop the other ranks")

    @staticmethod
    def _shutdown_one(served: Served) -> None:
        if served.engine is not None:
            try:
                served.engine.shutdown()
            except Exception:
                log.exception("engine shutdown failed for %s", served.name)
