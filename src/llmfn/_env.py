"""Environment defaults llmfn sets when imported, before torch is (torch's OpenMP runtime and its
allocator read them once, when loaded); a value the user set is kept. Also `home()`, the cache
folder (LLMFN_HOME), here so that modules low in the package (cbuild) read it without importing
the model registry.

OMP_WAIT_POLICY=PASSIVE: libgomp spins idle worker threads after each parallel region by default.
On a small machine shared with an engine thread, a server or another process, that spinning takes
the cores the work needs: measured on 2 cores with one other busy process, SmolLM2 decode (then on
MKL) ran at 5.7 tok/s by default and 16.5 tok/s with PASSIVE. The C decode kernels wake the
workers once per step, so on an idle machine the policy no longer shows (int4 decode, best of 3:
112 tok/s PASSIVE, 113 with a spin count). It only takes effect when llmfn is imported before
torch, as the CLI and the server do.

THP_MEM_ALLOC_ENABLE=1: large CPU tensors on transparent huge pages (torch's allocator madvises
them). Decode streams every weight once per token, and with 4 KiB pages the TLB misses cost
bandwidth (a 540 MB read on 2 cores: 28.2 -> 32.1 GB/s).
"""

import os
from pathlib import Path

# The variables llmfn sets (the user had not): benchmarks start peer runtimes without them.
ENV_SET_BY_LLMFN = tuple(k for k in ("OMP_WAIT_POLICY", "THP_MEM_ALLOC_ENABLE") if k not in os.environ)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def home() -> Path:
    """llmfn's cache folder: LLMFN_HOME, default ~/.cache/llmfn (converted models, compiled kernels)."""
    return Path(os.environ.get("LLMFN_HOME", Path.home() / ".cache" / "llmfn"))
