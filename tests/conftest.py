"""Shared test setup. Triton kernels run on CPU through the interpreter when no GPU is present;
the variable must be set before triton is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("CUDA_VISIBLE_DEVICES") == "" else "1")

import torch  # noqa: E402

if torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] == "1" and "LLMFN_FORCE_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "0"

torch.manual_seed(0)
