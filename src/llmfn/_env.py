"""Environment defaults llmfn sets when imported, before torch is (torch's OpenMP runtime and its
allocator read them once, when loaded); a value the user set is kept. Also `home()`, the cache
folder (LLMFN_HOME), here so that modules low in the package (cbuild) read it without importing
the model registry.

GOMP_SPINCOUNT (OpenMP's wait: spin, then sleep): torch, oneDNN, MKL and llmfn's C kernels share one
OpenMP runtime (torch's libgomp; the C kernels link the libgomp already loaded), which reads its wait
policy once, when torch loads it. An idle worker spins up to GOMP_SPINCOUNT pause loops waiting for the
next parallel region, then sleeps in the kernel. libgomp's default, 300000 spins (about 15 ms at this
Xeon's ~50 ns pause), lets a worker burn a core that another thread or process needs: on 2 cores with
one other busy process, SmolLM2 decode (then on MKL) ran at 5.7 tok/s by default and 16.5 tok/s with
OMP_WAIT_POLICY=PASSIVE (no spinning). PASSIVE taxes everything made of many short regions instead: each
region wakes the sleeping worker through the kernel, and embedding short sentences one at a time fell
from ~190 to ~115 sent/s. A short spin (~0.1 ms) is the compromise measured (benchmarks/RESULTS.md,
issue 22): decode under outside load as robust as with PASSIVE, short sentences and prefill on an idle
machine 1.2-1.6x PASSIVE's (libgomp's default is faster still there, and collapses under load), short
sentences beside a busy process ~0.6x PASSIVE's. The setting is process-wide and fixed once torch is
loaded, so no value wins every case. Not set when the user sets OMP_WAIT_POLICY or GOMP_SPINCOUNT; it
only takes effect when llmfn is imported before torch, as the CLI and the server do.

Not set any more: THP_MEM_ALLOC_ENABLE=1 (torch's allocator madvising every CPU allocation of 2 MB or
more onto transparent huge pages). It was set for decode, which streams every weight once a token
(fewer TLB misses); but torch's CPU allocator caches nothing, so every large temporary was
madvised and faulted in as fresh huge pages (the kernel zeroing and compacting 2 MB at a time):
widening a [3072, 576] bf16 weight for a prefill matmul took 5.4 ms instead of 0.2. Without it, on
the AVX-512 Xeon's 2 cores, SmolLM2 prefill of 128 tokens: bf16 522 -> 916 tok/s, int4 556 -> 782,
fp32 907 -> 925; decode unchanged on 2 threads (fp32 53.8 / 53.9, int4 184 / 190) and 3-5% slower on
one (fp32 28.6 -> 27.7, int4 100 -> 95) (benchmarks/RESULTS.md). A user may still set it.
"""

import os
from pathlib import Path

SPIN_COUNT = 2000  # pause loops an idle OpenMP worker spins before it sleeps: ~0.1 ms here

_defaults = {}
if "OMP_WAIT_POLICY" not in os.environ:  # the user's policy comes with its own spin count
    _defaults["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
# The variables llmfn sets (the user had not): benchmarks start peer runtimes without them.
ENV_SET_BY_LLMFN = tuple(k for k in _defaults if k not in os.environ)
for _k in ENV_SET_BY_LLMFN:
    os.environ[_k] = _defaults[_k]


def home() -> Path:
    """llmfn's cache folder: LLMFN_HOME, default ~/.cache/llmfn (converted models, compiled kernels)."""
    return Path(os.environ.get("LLMFN_HOME", Path.home() / ".cache" / "llmfn"))
