#!/usr/bin/env bash
# GPU check, meant for a lent CUDA machine (about 7 to 8 minutes; every step is capped by `timeout`, 9.7 min at worst):
#   1. torch must see a CUDA GPU, else exit 2 (nothing else runs);
#   2. the `gpu` tests: .venv/bin/python -m pytest -q -m gpu tests/gpu  (tiny-llama on cuda: fp32 vs CPU, bf16,
#      nf4 + checkpointing, DP-SGD epsilon, the exported adapter on CPU, two Flower clients on one GPU), ~2-3 min;
#   3. bench/scale.py on cuda: smollm2-135m, llama-3.2-1b and llama-2-7b shapes, 4 steps a cell (cut at its cap;
#      scale.py saves each cell as it finishes, and a rerun into the same folder resumes);
#   4. gpu_check.json: each step's exit status (124: timed out), the pytest summary, the GPU, torch's version.
# Output goes to $OUT when set (a lent machine sets it to a folder whose contents come back), else bench/results/gpu.
# It needs a CUDA build of torch 2.13.0 in .venv: `.venv/bin/python -m pip install torch==2.13.0 --index-url URL`,
# URL being a CUDA build of torch 2.13.0 from PyTorch's own wheel index. PYTHON=... runs another interpreter
# (one with a CUDA torch and fedlpp's requirements). Caps: GPU_CHECK_PYTEST_TIMEOUT, GPU_CHECK_SCALE_TIMEOUT (seconds).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${PYTHON:-.venv/bin/python}"
DIR="${OUT:-bench/results/gpu}"
PYTEST_S="${GPU_CHECK_PYTEST_TIMEOUT:-210}"
SCALE_S="${GPU_CHECK_SCALE_TIMEOUT:-240}"
mkdir -p "$DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# 1. A CUDA GPU that torch sees.
check_rc=0
timeout -k 10 45 "$PY" -c 'import torch; assert torch.cuda.is_available()' || check_rc=$?
if [ "$check_rc" -ne 0 ]; then
    echo "gpu_check: $PY's torch sees no CUDA GPU (exit $check_rc); install a CUDA build of torch 2.13.0" \
         "from PyTorch's own wheel index into .venv (see this script's first lines), on a machine with a GPU" >&2
    exit 2
fi

# 2. The gpu tests.
echo "gpu_check: pytest -m gpu tests/gpu (cap ${PYTEST_S}s) -> $DIR/pytest-gpu.log"
pytest_rc=0
timeout -k 10 "$PYTEST_S" "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider >"$DIR/pytest-gpu.log" 2>&1 || pytest_rc=$?
tail -n 40 "$DIR/pytest-gpu.log" || true
echo "gpu_check: pytest exit $pytest_rc"

# 3. Memory and speed at scale on cuda.
echo "gpu_check: bench/scale.py --device cuda (cap ${SCALE_S}s) -> $DIR/scale-gpu.json"
scale_rc=0
timeout -k 10 "$SCALE_S" "$PY" bench/scale.py --device cuda --shapes smollm2-135m llama-3.2-1b llama-2-7b --steps 4 \
    --out "$DIR/scale-gpu.json" >"$DIR/scale-gpu.log" 2>&1 || scale_rc=$?
tail -n 30 "$DIR/scale-gpu.log" || true
echo "gpu_check: scale.py exit $scale_rc"

# 4. The summary.
json_rc=0
GPU_CHECK_DIR="$DIR" CHECK_RC="$check_rc" PYTEST_RC="$pytest_rc" SCALE_RC="$scale_rc" \
PYTEST_CAP="$PYTEST_S" SCALE_CAP="$SCALE_S" timeout -k 10 45 "$PY" - <<'EOF' || json_rc=$?
import json
import os
from pathlib import Path

import torch

out = Path(os.environ["GPU_CHECK_DIR"])
log = out / "pytest-gpu.log"
lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
scale = out / "scale-gpu.json"
summary = {
    "steps": {
        "cuda_available": {"exit": int(os.environ["CHECK_RC"])},
        "pytest_gpu": {"exit": int(os.environ["PYTEST_RC"]), "cap_s": int(os.environ["PYTEST_CAP"]),
                       "summary": lines[-1] if lines else None, "log": str(log)},
        "scale": {"exit": int(os.environ["SCALE_RC"]), "cap_s": int(os.environ["SCALE_CAP"])},
    },
    "pytest_exit": int(os.environ["PYTEST_RC"]),
    "gpu": torch.cuda.get_device_name(0),
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "scale_json": str(scale),
    "scale_json_exists": scale.exists(),
    "timed_out": [name for name, rc in (("pytest_gpu", os.environ["PYTEST_RC"]), ("scale", os.environ["SCALE_RC"]))
                  if int(rc) in (124, 137)],
}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary, indent=1))
EOF
if [ "$json_rc" -ne 0 ]; then  # torch could not be asked again: the exit statuses alone
    printf '{"steps": {"cuda_available": {"exit": %d}, "pytest_gpu": {"exit": %d}, "scale": {"exit": %d}, "summary_json": {"exit": %d}},\n "pytest_exit": %d, "scale_json": "%s"}\n' \
        "$check_rc" "$pytest_rc" "$scale_rc" "$json_rc" "$pytest_rc" "$DIR/scale-gpu.json" >"$DIR/gpu_check.json"
    cat "$DIR/gpu_check.json"
fi
echo "gpu_check: wrote $DIR/gpu_check.json"
[ "$pytest_rc" -eq 0 ] && [ "$scale_rc" -eq 0 ]
