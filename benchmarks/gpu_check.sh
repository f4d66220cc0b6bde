#!/usr/bin/env bash
# The GPU checks of issue 11, in one run on a CUDA machine, from the repository root:
#
#   bash benchmarks/gpu_check.sh            # uses .venv/bin/python if present, else python
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# 1. benchmarks/overhead.py --device cuda   CGGM step time / joint step time (transformer and MLP models)
# 2. benchmarks/backbone.py --device cuda   fast vs reference transformer layers, MOSI model, joint and CGGM
# 3. benchmarks/preset_steps.py --device cuda
#                                            two steps of every preset's model (joint and the preset's
#                                            method), the second under torch.cuda.set_sync_debug_mode("error"),
#                                            and each step's peak memory (torch.cuda.max_memory_allocated)
#
# Every part runs even if an earlier one failed; the exit status is 1 if any failed, and 1 at once
# (with a message) when there is no CUDA device.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu_check: cannot import torch with $PY (set PYTHON=...)" >&2
    exit 1
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 1)"; then
    echo "gpu_check: no CUDA device: torch.cuda.is_available() is False for $PY (torch $("$PY" -c 'import torch; print(torch.__version__)')); run this on a CUDA machine with a CUDA build of torch" >&2
    exit 1
fi
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'gpu_check: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader

status=0
run() {
    echo
    echo "== $*"
    local t0=$SECONDS
    "$@" || { echo "gpu_check: FAILED: $*" >&2; status=1; }
    echo "   ($((SECONDS - t0)) s)"
}
run "$PY" benchmarks/overhead.py --device cuda --steps 30 --warmup 5
run "$PY" benchmarks/overhead.py --device cuda --arch mlp --steps 30 --warmup 5
run "$PY" benchmarks/backbone.py --device cuda --steps 30 --warmup 5
run "$PY" benchmarks/preset_steps.py --device cuda --batch 4
echo
if [ "$status" -eq 0 ]; then echo "gpu_check: all parts ran"; else echo "gpu_check: some parts FAILED (see above)" >&2; fi
exit $status
