"""Every C library builds wherever a C compiler is found. The kernel tests skip when the kernels are
unavailable (a machine without a compiler), so a compile error would otherwise turn them all into
skips and leave the torch path running in their place."""

import pytest

from llmfn import cbuild
from llmfn.kernels import cpu, cpu_attention, cpu_gemm
from llmfn.tokenization import native_bpe, native_spm


@pytest.mark.skipif(cbuild.compiler() is None, reason="no C compiler on this machine")
@pytest.mark.parametrize("library", [cpu.library, cpu_gemm.library, cpu_attention.library, native_bpe.library,
                                     native_spm.library], ids=["decode", "gemm", "attention", "bpe", "spm"])  # fmt: skip
def test_every_c_library_builds_where_a_compiler_exists(library, monkeypatch):
    for switch in ("LLMFN_CPU_KERNELS", "LLMFN_QUANT_KERNEL"):
        monkeypatch.delenv(switch, raising=False)
    assert library() is not None, "the C kernels failed to build: see the llmfn.cbuild log"
