"""llmfn's import-time environment (llmfn._env): the OpenMP wait torch's libgomp actually reads, and the
user's own settings kept."""

from __future__ import annotations

import os
import subprocess
import sys

from llmfn import _env

OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "THP_MEM_ALLOC_ENABLE")


def libgomp_settings(**user_env: str) -> str:
    """What torch's OpenMP runtime reports reading (OMP_DISPLAY_ENV) in a fresh process that imports
    llmfn, then torch, as users do; user_env: variables set before."""
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARS} | user_env | {"OMP_DISPLAY_ENV": "VERBOSE"}
    code = "import llmfn, torch; torch.ones(4).sum()"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stderr


def test_openmp_workers_spin_briefly_then_sleep():
    """Not PASSIVE (sleeping at once taxes every short parallel region), not libgomp's default 300000
    spins (~15 ms of a core burnt per wait under outside load): SPIN_COUNT, read by torch's libgomp."""
    shown = libgomp_settings()
    assert f"GOMP_SPINCOUNT = '{_env.SPIN_COUNT}'" in shown
    assert 0 < _env.SPIN_COUNT < 300000


def test_the_users_openmp_settings_are_kept():
    assert "GOMP_SPINCOUNT = '30000000000'" in libgomp_settings(OMP_WAIT_POLICY="ACTIVE")  # libgomp's own
    assert "GOMP_SPINCOUNT = '0'" in libgomp_settings(OMP_WAIT_POLICY="PASSIVE")
    assert "GOMP_SPINCOUNT = '123'" in libgomp_settings(GOMP_SPINCOUNT="123")


def test_no_huge_pages_for_every_large_tensor():
    """THP_MEM_ALLOC_ENABLE=1 put every large temporary on freshly faulted huge pages (prefill up to
    1.75x slower): llmfn leaves it unset, and keeps the user's value."""
    code = "import os, llmfn; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARS}
    run = lambda e: subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=120)
    assert run(env).stdout.strip() == "None"
    assert run(env | {"THP_MEM_ALLOC_ENABLE": "1"}).stdout.strip() == "1"
