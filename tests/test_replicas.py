"""Replicas on Ray Serve (llmfn.serve.replicas) with a local Ray of 2 CPUs: two replicas of a tiny
model behind one endpoint both serve (each response names its replica), and with one replica killed
the endpoint keeps answering and Ray starts a new one. Slow (Ray's start and a restart: ~60 s here);
skipped when Ray Serve is not installed (the optional `ray` extra)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import time
import urllib.error
import urllib.request

import pytest

from parallel_ranks import free_port
from tiny import make_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'llmfn[ray]')")
    from llmfn.serve import replicas
    from llmfn.serve.config import ServerConfig, models_from_paths

    folder = tmp_path_factory.mktemp("replicas") / "tiny"
    make_checkpoint(folder)
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20,
             runtime_env={"env_vars": {"PYTHONPATH": os.path.abspath(src)}})  # fmt: skip
    port = free_port()
    serve = replicas.start(ServerConfig(models=models_from_paths([str(folder)])), "127.0.0.1", port, 2)
    yield f"http://127.0.0.1:{port}", ray
    serve.shutdown()
    ray.shutdown()


def _complete(base: str, timeout: float = 60) -> tuple[int, str | None, dict]:
    body = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}).encode()
    req = urllib.request.Request(f"{base}/v1/completions", data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers.get("x-llmfn-replica"), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("x-llmfn-replica"), {}


def _burst(base: str, n: int = 16) -> list[tuple[int, str | None, dict]]:
    with cf.ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda _: _complete(base), range(n)))


def test_two_replicas_serve_and_survive_one_killed(endpoint):
    base, ray = endpoint
    answers = _burst(base)
    assert [status for status, _, _ in answers] == [200] * 16
    assert len({a["choices"][0]["text"] for _, _, a in answers}) == 1  # same model, same greedy answer
    names = {name for _, name, _ in answers}
    assert len(names) == 2, names  # both replicas took requests

    victim = sorted(names)[0]
    actor = next(a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(victim))
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)

    deadline, after = time.monotonic() + 120, []
    while time.monotonic() < deadline:
        after += _burst(base, 8)
        served_by = {name for status, name, _ in after[-8:] if status == 200}
        if [s for s, _, _ in after[-8:]] == [200] * 8 and len(served_by - {victim}) == 2:
            break  # the survivor and a restarted replica both serve again
        time.sleep(1)
    assert all(status == 200 or status >= 500 for status, _, _ in after)  # never a hang or a 4xx
    assert [s for s, _, _ in after[-8:]] == [200] * 8
    assert victim not in {name for _, name, _ in after[-8:]}
    assert len({name for _, name, _ in after[-8:]}) == 2, "Ray did not bring a second replica back"
