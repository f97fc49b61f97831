#!/usr/bin/env bash
# One command runs every check: lint and format (ruff), types (mypy), then the whole test suite (pytest, no network).
# Extra arguments go to pytest (e.g. ./test.sh tests/algorithms -x).
set -euo pipefail
cd "$(dirname "$0")"
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
