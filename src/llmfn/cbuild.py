"""Compile a C library once per machine into LLMFN_HOME/kernels/ and load it with ctypes.

Used by llmfn's CPU kernels (llmfn.kernels.cpu, cpu_gemm, cpu_attention) and native tokenizers. The
sources live in llmfn/kernels/csrc/: a library is one .c file there (the translation unit), which
includes the headers beside it. Built with the system C compiler (-O3 -fopenmp) for the ISA level
`isa()` picks from the CPU's features (scalar, AVX2 + FMA, AVX-512 with VNNI, + AMX int8); the C code chooses
its paths by the compiler's macros (__AVX2__, __AVX512VNNI__). The library's name hashes the .c
file, every header in csrc/, the generated headers and the flags (the ISA level's and the defines),
so an edited header rebuilds and a cache copied to a CPU of another level is never loaded there.
Without a compiler (or on a non-Linux system) `load` returns None and callers take their torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from llmfn._env import home

CSRC = Path(__file__).parent / "kernels" / "csrc"

FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]

# x86 ISA levels, lowest first: (name, the /proc/cpuinfo flags it needs, its compiler flags). A level
# is only worth its own build when the C code has a path for it: avx2 the 256-bit FMA kernels,
# avx512 the 512-bit ones and the int8 dot products of VNNI (vpdpbusd), amx the int8 tile products of
# the int8-activation kernels (csrc/amx.h; the rest of the code is avx512's).
X86_LEVELS = (
    ("scalar", (), ["-march=x86-64"]),
    ("avx2", ("avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe"), ["-march=x86-64-v3"]),
    ("avx512", ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni"),
     ["-march=x86-64-v4", "-mavx512vnni"]),
    ("amx", ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni", "amx_tile", "amx_int8"),
     ["-march=x86-64-v4", "-mavx512vnni", "-mamx-tile", "-mamx-int8"]),
)  # fmt: skip

log = logging.getLogger("llmfn.cbuild")
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def _cpu_flags() -> str:
    try:
        return next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return ""


@functools.cache
def _compiler_takes(flags: tuple[str, ...]) -> bool:
    """Whether the C compiler accepts these flags (an older one lacks -mamx-tile: gcc < 11, clang < 12)."""
    cc = compiler()
    if cc is None:
        return True  # nothing is built anyway
    probe = subprocess.run([cc, *flags, "-x", "c", "-fsyntax-only", "-"], input=b"int x;\n", capture_output=True)
    return probe.returncode == 0


def supported_levels() -> list[str]:
    """The ISA levels this CPU runs (and, for amx, the compiler builds), lowest first (["native"] off
    x86: built with -march=native)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["native"]
    have = set(_cpu_flags().split())
    levels = []
    for name, needs, flags in X86_LEVELS:
        if not set(needs) <= have or (name == "amx" and not _compiler_takes(tuple(flags))):
            break
        levels.append(name)
    return levels


def isa() -> tuple[str, str]:
    """(the ISA level the kernels are built for, why): the best this CPU supports, or the lower one
    LLMFN_CPU_ISA asks for (scalar / avx2 / avx512 / amx), e.g. to test or compare the portable paths."""
    levels = supported_levels()
    asked = os.environ.get("LLMFN_CPU_ISA", "").strip().lower()
    if not asked:
        return levels[-1], "the best level this CPU's features support"
    if asked in levels:
        return asked, "LLMFN_CPU_ISA"
    known = [name for name, _, _ in X86_LEVELS] if levels != ["native"] else levels
    why = "this CPU lacks its features" if asked in known else f"not a level (one of {', '.join(known)})"
    return levels[-1], f"LLMFN_CPU_ISA={asked} ignored: {why}"


def _isa_flags(level: str) -> list[str]:
    return next((flags for name, _, flags in X86_LEVELS if name == level), ["-march=native"])


def _flags(defines: dict[str, object]) -> list[str]:
    level = isa()[0]
    return [*FLAGS, *_isa_flags(level), f"-DLLMFN_ISA_{level.upper()}=1",
            *(f"-D{k}={v}" for k, v in sorted(defines.items()))]  # fmt: skip


def build_dir() -> Path:
    """Where the compiled libraries live."""
    return home() / "kernels"


def library_path(name: str, main: str, defines: dict[str, object] | None = None,
                 generated: dict[str, str] | None = None) -> Path:
    """The library built from csrc/`main` with these -D `defines` and `generated` headers ({file
    name: text}, written beside the build, on its include path): its name hashes all the build reads."""
    files = [(p.name, p.read_bytes()) for p in [CSRC / main, *sorted(CSRC.glob("*.h"))]]
    files += [(file, text.encode()) for file, text in sorted((generated or {}).items())]
    h = hashlib.sha256()
    for file, data in files:  # each named and sized: no two sets of files hash alike
        h.update(f"{file}\0{len(data)}\0".encode() + data)
    level = isa()[0]
    # -march=native code (off x86) is keyed by the CPU's features too; an x86 level by its flags alone
    cpu = _cpu_flags() if level == "native" else ""
    h.update("\0".join([*_flags(defines or {}), platform.machine(), cpu]).encode())
    return build_dir() / f"{name}_{level}_{h.hexdigest()[:16]}.so"


def compiler() -> str | None:
    """The C compiler llmfn builds with ($CC, else cc / gcc / clang on PATH), or None."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _compile(main: str, defines: dict[str, object], generated: dict[str, str], target: Path) -> None:
    cc = compiler()
    if cc is None:
        raise OSError("no C compiler")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        for file, text in generated.items():
            (Path(tmp) / file).write_text(text)
        out = Path(tmp) / "kernel.so"
        cmd = [cc, *_flags(defines), f"-I{tmp}", f"-I{CSRC}", str(CSRC / main), "-o", str(out)]
        subprocess.run(cmd, check=True, capture_output=True)
        out.replace(target)  # atomic: concurrent first uses each compile, one rename wins


def cpu_kernels(name: str, main: str, signatures: dict[str, list], **kwargs) -> ctypes.CDLL | None:
    """`load` for llmfn's CPU compute kernels, or None when LLMFN_CPU_KERNELS=torch turns them off
    (callers then take their torch path)."""
    return None if os.environ.get("LLMFN_CPU_KERNELS", "c") == "torch" else load(name, main, signatures, **kwargs)


def load(name: str, main: str, signatures: dict[str, list], defines: dict[str, object] | None = None,
         generated: dict[str, str] | None = None) -> ctypes.CDLL | None:
    """The library built from csrc/`main` (compiling on first use; `defines` and `generated` as in
    library_path), its functions typed by `signatures` ({function: argtypes}, all returning int), or
    None when it cannot be built here."""
    if name in _loaded:
        return _loaded[name]
    with _lock:
        if name in _loaded:
            return _loaded[name]
        lib = None
        if platform.system() == "Linux":
            try:
                path = library_path(name, main, defines, generated)
                if not path.exists():
                    log.info("building the C kernels %s (first use on this machine) into %s", name, path.parent)
                    t0 = time.perf_counter()
                    _compile(main, defines or {}, generated or {}, path)
                    log.info("built %s in %.1fs", name, time.perf_counter() - t0)
                lib = ctypes.CDLL(str(path))
                for fn, argtypes in signatures.items():
                    getattr(lib, fn).argtypes = argtypes
                    getattr(lib, fn).restype = ctypes.c_int
            except (OSError, subprocess.CalledProcessError, AttributeError) as e:
                log.info("the C kernels %s are unavailable (%s): the torch path runs instead", name, e)
                lib = None
        _loaded[name] = lib
        return lib
