"""The package's layering (docs/DESIGN.md), checked from the source's imports: read down, never up.

Every `import` in src/llmfn counts, module-level or inside a function (a lazy import is still a
dependency). The checks: no import cycles; models/ is pure math (no loading, serving, engine or
kernel-backend imports); only cli/ imports serve/; at most three imports run up the layers; no
Python file over 500 lines; no C source inside a Python string."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "llmfn"

# Top to bottom; a module belongs to the first layer one of whose prefixes it starts with.
LAYERS = (
    ("llmfn.cli",),
    ("llmfn.serve",),
    ("llmfn.engine",),
    ("llmfn.generate", "llmfn.speculative", "llmfn.backend", "llmfn.embed", "llmfn.perf", "llmfn.loading",
     "llmfn.parallel"),
    ("llmfn.models",),
    ("llmfn.kernels",),
    ("llmfn.model", "llmfn.sampling", "llmfn.constraints", "llmfn.tools", "llmfn.stopping", "llmfn.chat_template", "llmfn.tokenizer",
     "llmfn.tokenization", "llmfn.cbuild", "llmfn.errors", "llmfn._env"),
)
KERNEL_BACKENDS = ("llmfn.kernels.cpu", "llmfn.kernels.triton_")  # cpu*, cpu_gemm, ..., triton_*
MAX_UPWARD = 3
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def imports(path: Path) -> set[str]:
    """The llmfn modules a file imports (`from pkg import mod` resolves to pkg.mod when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("llmfn")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmfn"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


GRAPH = {name: imports(path) - {name} for name, path in MODULES.items()}


def layer(module: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") or module.startswith(p) and p.endswith("_") for p in prefixes):
            return rank
    return None


def test_every_module_has_a_layer():
    assert [m for m in MODULES if m != "llmfn" and layer(m) is None] == []


def test_no_import_cycles():
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for dep in sorted(GRAPH.get(m, ())):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def upward_imports() -> list[tuple[str, str]]:
    return sorted((m, dep) for m, deps in GRAPH.items() if m != "llmfn" for dep in deps
                  if dep != "llmfn" and layer(dep) < layer(m))  # fmt: skip


def test_at_most_a_few_imports_run_up_the_layers():
    assert len(upward_imports()) <= MAX_UPWARD, upward_imports()


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("llmfn.models")))
def test_models_are_pure_math(module):
    """A model file is the reference a reader checks against the paper: no file formats, no engine,
    no server, no choice of kernel backend."""
    banned = ("llmfn.loading", "llmfn.serve", "llmfn.engine", "llmfn.cli", "llmfn.backend", "llmfn.generate",
              *KERNEL_BACKENDS)  # fmt: skip
    assert [dep for dep in GRAPH[module] if dep.startswith(banned)] == []


def test_only_the_cli_imports_the_server():
    outside = [(m, dep) for m, deps in GRAPH.items() for dep in deps
               if dep.startswith("llmfn.serve") and not m.startswith(("llmfn.serve", "llmfn.cli"))]  # fmt: skip
    assert outside == []


def test_no_python_file_is_too_long():
    long = {name: n for name, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_no_c_source_in_python_strings():
    c_like = re.compile(r"^\s*(#include\s*<|#pragma omp|static inline )", re.M)
    assert [name for name, p in MODULES.items() if c_like.search(p.read_text(encoding="utf-8"))] == []
