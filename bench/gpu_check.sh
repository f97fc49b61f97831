#!/usr/bin/env bash
# GPU check, meant for a CUDA machine (about 6 to 8 minutes; every step is capped by `timeout`, 9.5 min at worst):
#   0. with a bundle (.gpu/, written by `bench/gpu_bundle.py` where pip works): its wheels are installed into a folder
#      put first on PYTHONPATH, over the machine's own Python and its CUDA torch (for a machine with no network);
#   1. torch must see a CUDA GPU, else exit 2 (nothing else runs);
#   2. the `gpu` tests: pytest -q -m gpu tests/gpu  (tiny-llama on cuda: fp32 vs CPU, bf16, nf4 + checkpointing,
#      DP-SGD epsilon, the exported adapter on CPU, two Flower clients on one GPU, which needs ray), ~1-3 min;
#   3. bench/scale.py on cuda: the llama-3.2-1b and llama-2-7b shapes (random weights, written once on the GPU),
#      4 steps a cell, the plain peft loop right after the first shape (cut at its cap; scale.py saves each cell
#      as it finishes, and a rerun into the same folder resumes);
#   4. gpu_check.json: each step's exit status (124: timed out), the pytest summary, the GPU, the versions.
# Output goes to $OUT when set (a lent machine sets it to a folder whose contents come back), else bench/results/gpu.
# Python: $PYTHON, else python3 with a bundle, else .venv/bin/python (which then needs a CUDA build of torch 2.13.0:
# `.venv/bin/python -m pip install torch==2.13.0 --index-url URL`, URL being PyTorch's own CUDA wheel index).
# Settings: GPU_BUNDLE (default .gpu), GPU_CHECK_SHAPES, GPU_CHECK_PYTEST_TIMEOUT, GPU_CHECK_SCALE_TIMEOUT (seconds),
# GPU_CHECK_DEVICE=cpu rehearses the script and the bundle on a machine without a GPU (the gpu tests skip; nothing
# it measures is about GPUs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BUNDLE="${GPU_BUNDLE:-.gpu}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
SHAPES="${GPU_CHECK_SHAPES:-llama-3.2-1b llama-2-7b}"
DIR="${OUT:-bench/results/gpu}"
PYTEST_S="${GPU_CHECK_PYTEST_TIMEOUT:-180}"
SCALE_S="${GPU_CHECK_SCALE_TIMEOUT:-270}"
mkdir -p "$DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# 0. The bundle, if there is one.
if [ -d "$BUNDLE/wheels" ]; then
    BUNDLE="$(cd "$BUNDLE" && pwd)"
    PY="${PYTHON:-python3}"
    SITE="$(mktemp -d /tmp/fedlpp-site.XXXXXX)"
    trap 'rm -rf "$SITE"' EXIT
    echo "gpu_check: installing $BUNDLE's $(ls "$BUNDLE"/wheels | wc -l) wheels into $SITE (no network, no dependencies)"
    timeout -k 10 120 "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
        --target "$SITE" "$BUNDLE"/wheels/*.whl
    cp -r "$BUNDLE"/site/. "$SITE"/
    export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    export FEDLPP_CACHE="$BUNDLE/cache"  # the SmolLM2 tokenizer; the random-shape checkpoints are written here
else
    PY="${PYTHON:-.venv/bin/python}"
fi
"$PY" -c 'import sys, torch, transformers, peft, flwr, opacus; from fedlpp.models.machine import require_bitsandbytes
print(f"gpu_check: python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.version.cuda}), transformers",
      transformers.__version__, "peft", peft.__version__, "flwr", flwr.__version__, "bitsandbytes", require_bitsandbytes().__version__)' \
    || echo "gpu_check: $PY cannot import what fedlpp needs (above)" >&2

# 1. A CUDA GPU that torch sees.
check_rc=0
if [ "$DEVICE" != cpu ]; then
    timeout -k 10 45 "$PY" -c 'import torch; assert torch.cuda.is_available()' || check_rc=$?
fi
if [ "$check_rc" -ne 0 ]; then
    echo "gpu_check: $PY's torch sees no CUDA GPU (exit $check_rc); on a machine with a GPU, use a Python whose" \
         "torch is a CUDA build (see this script's first lines)" >&2
    exit 2
fi

# 2. The gpu tests.
echo "gpu_check: pytest -m gpu tests/gpu (cap ${PYTEST_S}s) -> $DIR/pytest-gpu.log"
pytest_rc=0
timeout -k 10 "$PYTEST_S" "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider -rs >"$DIR/pytest-gpu.log" 2>&1 || pytest_rc=$?
tail -n 40 "$DIR/pytest-gpu.log" || true
echo "gpu_check: pytest exit $pytest_rc"

# 3. Memory and speed at scale.
echo "gpu_check: bench/scale.py --device $DEVICE --shapes $SHAPES (cap ${SCALE_S}s) -> $DIR/scale-gpu.json"
scale_rc=0
# shellcheck disable=SC2086  # the shapes are words
timeout -k 10 "$SCALE_S" "$PY" bench/scale.py --device "$DEVICE" --shapes $SHAPES --steps 4 \
    --out "$DIR/scale-gpu.json" >"$DIR/scale-gpu.log" 2>&1 || scale_rc=$?
tail -n 30 "$DIR/scale-gpu.log" || true
echo "gpu_check: scale.py exit $scale_rc"

# 4. The summary.
json_rc=0
GPU_CHECK_DIR="$DIR" CHECK_RC="$check_rc" PYTEST_RC="$pytest_rc" SCALE_RC="$scale_rc" DEVICE="$DEVICE" \
PYTEST_CAP="$PYTEST_S" SCALE_CAP="$SCALE_S" timeout -k 10 45 "$PY" - <<'EOF' || json_rc=$?
import json
import os
import sys
from pathlib import Path

import peft
import torch
import transformers

from fedlpp.models.machine import import_bitsandbytes

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
    "device": os.environ["DEVICE"],
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "python": sys.version.split()[0],
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "transformers": transformers.__version__,
    "peft": peft.__version__,
    "bitsandbytes": getattr(import_bitsandbytes(), "__version__", None),
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
