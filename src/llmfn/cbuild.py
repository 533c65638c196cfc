"""Compile a C source once per machine into LLMFN_HOME/kernels/ and load it with ctypes.

Used by llmfn's CPU kernels (llmfn.kernels.cpu, llmfn.kernels.cpu_quant). Built with the system C compiler
(-O3 -march=native -fopenmp); the library's name hashes the source, the flags and the CPU's flags,
so -march=native code never runs on another CPU sharing LLMFN_HOME. Without a compiler (or on a
non-Linux system) `load` returns None and callers take their torch path."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from llmfn._env import home

# LLMFN_CPU_MARCH picks the target (default: this CPU); e.g. x86-64 builds the portable C paths
# that a CPU without AVX2 runs, which the tests check too.
FLAGS = ["-O3", f"-march={os.environ.get('LLMFN_CPU_MARCH', 'native')}", "-ffp-contract=off", "-fopenmp", "-shared",
         "-fPIC"]  # fmt: skip

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def _cpu_flags() -> str:
    try:
        return next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return ""


def library_path(name: str, source: str) -> Path:
    key = hashlib.sha256((source + " ".join(FLAGS) + platform.machine() + _cpu_flags()).encode()).hexdigest()[:16]
    return home() / "kernels" / f"{name}_{key}.so"


def compiler() -> str | None:
    """The C compiler llmfn builds with ($CC, else cc / gcc / clang on PATH), or None."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _compile(source: str, target: Path) -> None:
    cc = compiler()
    if cc is None:
        raise OSError("no C compiler")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "kernel.c"
        src.write_text(source)
        out = Path(tmp) / "kernel.so"
        subprocess.run([cc, *FLAGS, str(src), "-o", str(out)], check=True, capture_output=True)
        out.replace(target)  # atomic: concurrent first uses each compile, one rename wins


def cpu_kernels(name: str, source: str, signatures: dict[str, list]) -> ctypes.CDLL | None:
    """`load` for llmfn's CPU compute kernels, or None when LLMFN_CPU_KERNELS=torch turns them off
    (callers then take their torch path)."""
    return None if os.environ.get("LLMFN_CPU_KERNELS", "c") == "torch" else load(name, source, signatures)


def load(name: str, source: str, signatures: dict[str, list]) -> ctypes.CDLL | None:
    """The compiled library (compiling on first use), its functions typed by `signatures`
    ({function: argtypes}, all returning int), or None when it cannot be built here."""
    if name in _loaded:
        return _loaded[name]
    with _lock:
        if name in _loaded:
            return _loaded[name]
        lib = None
        if platform.system() == "Linux":
            path = library_path(name, source)
            try:
                if not path.exists():
                    _compile(source, path)
                lib = ctypes.CDLL(str(path))
                for fn, argtypes in signatures.items():
                    getattr(lib, fn).argtypes = argtypes
                    getattr(lib, fn).restype = ctypes.c_int
            except (OSError, subprocess.CalledProcessError, AttributeError):
                lib = None
        _loaded[name] = lib
        return lib
