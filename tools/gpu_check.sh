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
# Tensor parallel over NCCL (issue 20), where the machine has 2+ GPUs: torchrun's ranks must print
# the one-GPU answer. (Not yet run on a GPU: no multi-GPU machine was lent when it was written.)
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  python3 -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from tiny import make_checkpoint; make_checkpoint(Path('/tmp/llmfn-tp-tiny'))" > /dev/null 2>&1
  args=(run /tmp/llmfn-tp-tiny "Hello world, what is" --raw --max-tokens 12 --temperature 0 --device cuda)
  one=$(timeout 120 python3 -m llmfn.cli "${args[@]}")
  tp=$(timeout 300 python3 -m torch.distributed.run --nproc-per-node 2 -m llmfn.cli "${args[@]}" --tensor-parallel 2)
  [ -n "$one" ] && [ "$one" = "$tp" ] && echo "TP 2 over NCCL: the one-GPU answer" | tee "$out/parallel.log" \
    || echo "TP 2 over NCCL: DIFFERENT: [$one] vs [$tp]" | tee "$out/parallel.log"
fi
