#!/usr/bin/env bash
# One command for a GPU run: the diff and align benchmarks on CUDA in bfloat16.
#
#     bash benchmarks/gpu.sh                  # cuda, bfloat16
#     DEVICE=cuda:1 DTYPE=float16 bash benchmarks/gpu.sh
#     PYTHON=.venv/bin/python ALIGN_SIZES=4096,16384 bash benchmarks/gpu.sh
#
# It prints the GPU's name, then each benchmark's ratios (ours/floor, naive/ours,
# peak RSS and peak GPU memory at 10x prompts against 1x; ours/SciPy for align).
# Put the figures in the README with the GPU's name. The align solver runs on
# the CPU in float32 whatever the device (see aquin_nb.align.match), so its
# figures measure the hand-over from the GPU plus the CPU solver.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
DEVICE="${DEVICE:-cuda}"
DTYPE="${DTYPE:-bfloat16}"
REPEATS="${REPEATS:-5}"
ALIGN_SIZES="${ALIGN_SIZES:-4096,16384,65536}"
ALIGN_DIMS="${ALIGN_DIMS:-512,2304}"
# The checkout this script sits in, not whichever aquin_nb is installed.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"

"$PYTHON" - "$DEVICE" "$DTYPE" <<'EOF'
import sys

import torch

device, dtype = sys.argv[1], getattr(torch, sys.argv[2])
if not torch.cuda.is_available():
    sys.exit(f"gpu.sh: no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda})")
if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
    sys.exit(f"gpu.sh: {torch.cuda.get_device_name(device)} cannot run bfloat16; use DTYPE=float16")
print(f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

echo
echo "== sae_diff: ours/floor, naive/ours, memory at 10x prompts (benchmarks/diff.py) =="
"$PYTHON" benchmarks/diff.py --device "$DEVICE" --dtype "$DTYPE" --repeats "$REPEATS"

echo
echo "== sae_align: ours against SciPy dense (benchmarks/align.py) =="
"$PYTHON" benchmarks/align.py --device "$DEVICE" --dtype "$DTYPE" \
    --sizes "$ALIGN_SIZES" --dims "$ALIGN_DIMS"
