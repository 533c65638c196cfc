"""Environment defaults llmfn sets when imported, before torch is (torch's OpenMP runtime and its
allocator read them once, when loaded); a value the user set is kept.

OMP_WAIT_POLICY=PASSIVE: libgomp spins idle worker threads after each parallel region by default.
On a small machine shared with an engine thread, a server or another process, that spinning takes
the cores the work needs: measured on 2 cores with one other busy process, SmolLM2 decode (then on
MKL) ran at 5.7 tok/s by default and 16.5 tok/s with PASSIVE. On an idle machine the default can be
faster for the C decode kernels (one wake-up per step): 46.8 vs 53.7 tok/s in one quiet run, within
the noise in others. It only takes effect when llmfn is imported before torch, as the CLI and the
server do.

THP_MEM_ALLOC_ENABLE=1: large CPU tensors on transparent huge pages (torch's allocator madvises
them). Decode streams every weight once per token, and with 4 KiB pages the TLB misses cost
bandwidth (a 540 MB read on 2 cores: 28.2 -> 32.1 GB/s).
"""

import os

# The variables llmfn sets (the user had not): benchmarks start peer runtimes without them.
ENV_SET_BY_LLMFN = tuple(k for k in ("OMP_WAIT_POLICY", "THP_MEM_ALLOC_ENABLE") if k not in os.environ)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
