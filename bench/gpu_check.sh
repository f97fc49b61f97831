#!/usr/bin/env bash
# GPU check, meant for a CUDA machine: about 6 to 8 minutes; its steps share GPU_CHECK_BUDGET seconds (540, the summary's
# 30 included; a step cut at its cap takes up to 5 s more to stop), so that a command limit of 10 minutes gets the summary:
#   0. with a bundle (.gpu/, written by `bench/gpu_bundle.py` where pip works): its wheels are installed into a folder
#      put first on PYTHONPATH, over the machine's own Python and its CUDA torch (for a machine with no network);
#      then the versions of what fedlpp needs are printed (a failed import stops here);
#   1. torch must see a CUDA GPU, else exit 2 (nothing else runs but the summary);
#   2. the `gpu` tests: pytest -q -m gpu tests/gpu  (tiny-llama on cuda: fp32 vs CPU, bf16, nf4 + checkpointing,
#      DP-SGD epsilon, the exported adapter on CPU, two Flower clients on one GPU, which needs ray), ~1-3 min, capped at 240 s;
#   3. bench/scale.py on cuda with the time left: the llama-3.2-1b and llama-2-7b shapes (random weights, written on
#      the GPU into a temporary cache), 4 steps a cell, the plain peft loop right after the first shape (scale.py
#      writes each cell as it finishes: a cut run keeps the cells it measured);
#   4. gpu_check.json: each step's exit status (124: timed out), the pytest summary, the scale cells measured and
#      failed (scale.py exits 1 when any failed), the GPU, the main versions.
# Output goes to $OUT when set (a lent machine sets it to a folder whose contents come back), else bench/results/gpu.
# Python: $PYTHON, else python3 with a bundle, else .venv/bin/python (which then needs a CUDA build of torch 2.13.0:
# `.venv/bin/python -m pip install torch==2.13.0 --index-url URL`, URL being PyTorch's own CUDA wheel index).
# Settings: GPU_BUNDLE (default .gpu), GPU_CHECK_SHAPES, GPU_CHECK_BUDGET, GPU_CHECK_PYTEST_TIMEOUT (seconds);
# GPU_CHECK_DEVICE=cpu rehearses the script and the bundle on a machine without a GPU (the gpu tests skip; nothing
# it measures is about GPUs).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BUNDLE="${GPU_BUNDLE:-.gpu}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
SHAPES="${GPU_CHECK_SHAPES:-llama-3.2-1b llama-2-7b}"
DIR="${OUT:-bench/results/gpu}"
BUDGET="${GPU_CHECK_BUDGET:-540}"
PYTEST_S="${GPU_CHECK_PYTEST_TIMEOUT:-240}"
SUMMARY_S=30  # kept back for step 4
for setting in "$BUDGET" "$PYTEST_S"; do
    [[ "$setting" =~ ^[0-9]+$ ]] || { echo "gpu_check: GPU_CHECK_BUDGET and GPU_CHECK_PYTEST_TIMEOUT are whole seconds, got '$setting'" >&2; exit 64; }
done
mkdir -p "$DIR"
rm -f "$DIR"/{gpu_check.json,pytest-gpu.log,scale-gpu.json,scale-gpu.log,bundle-install.log}  # nothing from an earlier run
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
install_rc=-1 preflight_rc=-1 check_rc=-1 pytest_rc=-1 scale_rc=-1 pytest_cap=0  # -1: not run

left() { echo $((BUDGET - SUMMARY_S - SECONDS)); }  # seconds left for the steps (SECONDS: since the script started)
capped() { local cap=$1 have; have=$(left); [ "$have" -lt "$cap" ] && cap=$have; [ "$cap" -lt 1 ] && cap=1; echo "$cap"; }

summary() {  # step 4, from whatever ran; with torch when it imports, else the exit statuses alone
    local json_rc=0
    GPU_CHECK_DIR="$DIR" INSTALL_RC="$install_rc" PREFLIGHT_RC="$preflight_rc" CHECK_RC="$check_rc" \
    PYTEST_RC="$pytest_rc" SCALE_RC="$scale_rc" DEVICE="$DEVICE" PYTEST_CAP="$pytest_cap" BUDGET="$BUDGET" \
    timeout -k 5 "$SUMMARY_S" "$PY" - <<'EOF' || json_rc=$?
import json
import os
import re
import sys
from pathlib import Path

import flwr
import opacus
import peft
import torch
import transformers

from fedlpp.models.machine import import_bitsandbytes

out = Path(os.environ["GPU_CHECK_DIR"])
log = out / "pytest-gpu.log"
lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
finished = bool(lines) and re.search(r"\d+ (passed|failed|skipped|error).* in [\d.]+s", lines[-1]) is not None
scale = out / "scale-gpu.json"
cells = json.loads(scale.read_text())["cells"] if scale.exists() else []
failed = [{k: c.get(k) for k in ("kind", "shape", "precision", "quantize", "checkpointing", "error")} for c in cells if "error" in c]
rc = {name: int(os.environ[key]) for name, key in (("bundle_install", "INSTALL_RC"), ("imports", "PREFLIGHT_RC"),
      ("cuda_available", "CHECK_RC"), ("pytest_gpu", "PYTEST_RC"), ("scale", "SCALE_RC"))}
summary = {
    "steps": {name: {"exit": code} for name, code in rc.items()},  # -1: not run (no bundle; on the CPU, no CUDA check)
    "pytest_exit": rc["pytest_gpu"],
    "pytest_summary": lines[-1] if finished else None,  # None: pytest did not run or was cut
    "pytest_cap_s": int(os.environ["PYTEST_CAP"]),
    "budget_s": int(os.environ["BUDGET"]),
    "device": os.environ["DEVICE"],
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                 "transformers": transformers.__version__, "peft": peft.__version__, "flwr": flwr.__version__,
                 "opacus": opacus.__version__, "bitsandbytes": getattr(import_bitsandbytes(), "__version__", None)},
    "scale_json": str(scale),
    "scale_json_exists": scale.exists(),
    "scale_cells": {"measured": sum("peak_bytes" in c for c in cells), "failed": len(failed), "skipped": sum("skipped" in c for c in cells)},
    "scale_failed_cells": failed,  # each with the error its process ended with
    "timed_out": [name for name, code in rc.items() if code in (124, 137)],
}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary, indent=1))
EOF
    if [ "$json_rc" -ne 0 ]; then  # fedlpp's Python could not answer: the exit statuses alone
        printf '{"steps": {"bundle_install": {"exit": %d}, "imports": {"exit": %d}, "cuda_available": {"exit": %d}, "pytest_gpu": {"exit": %d}, "scale": {"exit": %d}, "summary_json": {"exit": %d}},\n "pytest_exit": %d, "scale_json": "%s"}\n' \
            "$install_rc" "$preflight_rc" "$check_rc" "$pytest_rc" "$scale_rc" "$json_rc" "$pytest_rc" "$DIR/scale-gpu.json" \
            >"$DIR/gpu_check.json"
        cat "$DIR/gpu_check.json"
    fi
    echo "gpu_check: wrote $DIR/gpu_check.json"
}

# 0. The bundle, if there is one, and what fedlpp imports.
if [ -d "$BUNDLE/wheels" ]; then
    BUNDLE="$(cd "$BUNDLE" && pwd)"
    PY="${PYTHON:-python3}"
    SITE="$(mktemp -d /tmp/fedlpp-site.XXXXXX)"
    CACHE="$(mktemp -d /tmp/fedlpp-cache.XXXXXX)"  # the tokenizer, and the checkpoints scale.py writes (GBs: not in .gpu)
    trap 'rm -rf "$SITE" "$CACHE"' EXIT
    echo "gpu_check: installing $BUNDLE's $(ls "$BUNDLE"/wheels | wc -l) wheels into $SITE (no network, no dependencies)"
    install_rc=0
    timeout -k 5 "$(capped 90)" "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
        --target "$SITE" "$BUNDLE"/wheels/*.whl >"$DIR/bundle-install.log" 2>&1 || install_rc=$?
    if ! { cp -r "$BUNDLE"/site/. "$SITE"/ && cp -r "$BUNDLE"/cache/. "$CACHE"/; } 2>>"$DIR/bundle-install.log" \
        && [ "$install_rc" -eq 0 ]; then
        install_rc=1
    fi
    tail -n 20 "$DIR/bundle-install.log"
    export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" FEDLPP_CACHE="$CACHE"
    if [ "$install_rc" -ne 0 ]; then
        echo "gpu_check: the bundle did not install (exit $install_rc; $DIR/bundle-install.log)" >&2
        summary
        exit 1
    fi
else
    PY="${PYTHON:-.venv/bin/python}"  # the random checkpoints stay in $FEDLPP_CACHE/scale (~/.cache/fedlpp), reused later
fi
preflight_rc=0
timeout -k 5 "$(capped 60)" "$PY" -c 'import sys, torch, transformers, peft, flwr, opacus
from fedlpp.models.machine import require_bitsandbytes
print(f"gpu_check: python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.version.cuda}), transformers",
      transformers.__version__, "peft", peft.__version__, "flwr", flwr.__version__, "bitsandbytes", require_bitsandbytes().__version__)' \
    || preflight_rc=$?
if [ "$preflight_rc" -ne 0 ]; then
    echo "gpu_check: $PY cannot import what fedlpp needs (exit $preflight_rc, above)" >&2
    summary
    exit 1
fi

# 1. A CUDA GPU that torch sees.
if [ "$DEVICE" != cpu ]; then
    check_rc=0
    timeout -k 5 "$(capped 45)" "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)' || check_rc=$?
    if [ "$check_rc" -eq 3 ]; then
        echo "gpu_check: $PY's torch sees no CUDA GPU; on a machine with a GPU, use a Python whose" \
             "torch is a CUDA build (see this script's first lines)" >&2
        summary
        exit 2
    elif [ "$check_rc" -ne 0 ]; then  # a CUDA start that hung or crashed: said in the summary
        echo "gpu_check: asking torch for CUDA failed (exit $check_rc)" >&2
        summary
        exit 1
    fi
fi

# 2. The gpu tests.
pytest_cap=$(capped "$PYTEST_S")
echo "gpu_check: pytest -m gpu tests/gpu (cap ${pytest_cap}s) -> $DIR/pytest-gpu.log"
pytest_rc=0
timeout -k 5 "$pytest_cap" "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider -rs >"$DIR/pytest-gpu.log" 2>&1 || pytest_rc=$?
tail -n 40 "$DIR/pytest-gpu.log"
echo "gpu_check: pytest exit $pytest_rc"

# 3. Memory and speed at scale, with the time left.
cap=$(capped "$BUDGET")
echo "gpu_check: bench/scale.py --device $DEVICE --shapes $SHAPES (cap ${cap}s) -> $DIR/scale-gpu.json"
scale_rc=0
# shellcheck disable=SC2086  # the shapes are words
timeout -k 5 "$cap" "$PY" bench/scale.py --device "$DEVICE" --shapes $SHAPES --steps 4 --fresh \
    --out "$DIR/scale-gpu.json" >"$DIR/scale-gpu.log" 2>&1 || scale_rc=$?
tail -n 30 "$DIR/scale-gpu.log"
echo "gpu_check: scale.py exit $scale_rc"

# 4. The summary.
summary
[ "$pytest_rc" -eq 0 ] && [ "$scale_rc" -eq 0 ]
