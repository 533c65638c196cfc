#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run on a machine whose python3 has torch, triton,
# transformers, hypothesis and pytest (the lent GPU machines' image): the GPU tests, then the
# Triton kernel and decoder benchmarks. Logs go to $OUT (default /tmp/llmfn-gpu).
#
#     bash tools/gpu_check.sh
set -u
out=${OUT:-/tmp/llmfn-gpu}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1 LLMFN_HOME=/tmp/llmfn-home HF_HUB_OFFLINE=1
nvidia-smi -L
python3 -c "import torch, triton, transformers as t; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', t.__version__)"
timeout 200 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_kernels.py tests/test_gpu.py 2>&1 | tee "$out/tests.log" | tail -60
timeout 100 python3 benchmarks/triton_kernels.py 2>&1 | tee "$out/kernels.md"
timeout 240 python3 benchmarks/gpu_decode.py 2>&1 | grep -v "Loading weights\|Writing model\|deprecated" | tee "$out/decode.md"
