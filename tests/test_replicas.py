"""Replicas on Ray Serve (llmfn.serve.replicas) with a local Ray of 2 CPUs: two replicas of a tiny
model behind one endpoint both serve (each response names its replica); one replica is killed while
it streams one long answer and computes others: those requests end as OpenAI errors (a 503 with an
error body, a stream's error event and [DONE]), the other replica's finish, the endpoint keeps
answering and Ray starts a new replica. Slow (Ray's start and a restart: ~60 s here); skipped when
Ray Serve is not installed (the optional `ray` extra)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import time
import urllib.error
import urllib.request

import httpx
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
    make_checkpoint(folder, max_position_embeddings=4096)  # room for answers long enough to kill mid-way
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    # a Ray started by hand, set up as the replicas module says a cluster must be
    env = {"PYTHONPATH": os.path.abspath(src), replicas.PROXY_CALLBACK_ENV: replicas.PROXY_CALLBACK}
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, runtime_env={"env_vars": env})
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


LONG = {"model": "tiny", "prompt": "Hello", "max_tokens": 4000, "temperature": 0,
        "logit_bias": {"2": -100}}  # no end of text (the tiny model's EOS is 2): 4000 tokens, several seconds


def _long(base: str) -> tuple[int, str | None, dict]:
    r = httpx.post(f"{base}/v1/completions", json=LONG, timeout=120)
    return r.status_code, r.headers.get("x-llmfn-replica"), r.json()


def _kill(ray, replica: str) -> None:
    actor = next(a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(replica))
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)


def test_two_replicas_serve_and_survive_one_killed(endpoint):
    base, ray = endpoint
    answers = _burst(base)
    assert [status for status, _, _ in answers] == [200] * 16
    assert len({a["choices"][0]["text"] for _, _, a in answers}) == 1  # same model, same greedy answer
    names = {name for _, name, _ in answers}
    assert len(names) == 2, names  # both replicas took requests

    # kill the replica that streams a long answer, while both compute long non-streamed ones
    with httpx.stream("POST", f"{base}/v1/completions", json={**LONG, "stream": True}, timeout=120) as stream, \
            cf.ThreadPoolExecutor(6) as pool:  # fmt: skip
        assert stream.status_code == 200
        victim = stream.headers["x-llmfn-replica"]
        lines = stream.iter_lines()
        assert next(lines).startswith("data: {")  # the first token: the answer is under way
        plain = [pool.submit(_long, base) for _ in range(6)]
        time.sleep(1.0)
        _kill(ray, victim)
        events = [line for line in lines if line]  # ends cleanly: no RemoteProtocolError
        plain = [f.result() for f in plain]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert (error["type"], error["code"]) == ("server_error", "replica_failed"), error
    assert len(events) < 4000  # cut short, not finished
    failed = [body for status, _, body in plain if status != 200]
    assert failed, "no non-streamed request was on the killed replica"
    assert all(status == 503 and body["error"]["code"] == "replica_failed" for status, _, body in plain if status != 200)
    assert all(name != victim and len(body["choices"][0]["text"]) > 0 for status, name, body in plain if status == 200)

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
