#!/usr/bin/env bash
# m-ST5-shaped embedding benchmark on one GPU (written for an H200; under 5 minutes).
# Random weights with google/mt5-xxl's shapes, no download. Prints one line of figures;
# record them in bench/README.md with the date and the GPU.
#
#   bash bench/embed_gpu.sh                  # the full run (needs CUDA)
#   bash bench/embed_gpu.sh --fp8 --compile  # also the fp8 and torch.compile variants
#   bash bench/embed_gpu.sh --smoke          # a reduced run on CPU (the test suite runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
python="${MINING_PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
exec "$python" bench/embed_gpu.py "$@"
