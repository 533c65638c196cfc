"""Helpers shared by the Triton launchers: block sizes and the interpreter's bf16 workaround."""

import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """The interpreter multiplies bf16 wrongly inside tl.dot (it goes through fp16), so kernels
    cast bf16 operands to fp32 there. Compiled GPU code keeps the native bf16 dot."""
    return dtype == torch.bfloat16 and interpreting()


def block(n: int, least: int = 16) -> int:
    """Next power of two >= n, and at least `least` (tl.dot wants dims >= 16; 2 keeps tl.arange
    away from size-1 blocks)."""
    return max(least, triton.next_power_of_2(n))
