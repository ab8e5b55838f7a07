#!/usr/bin/env bash
# Installs draftdistill with its test dependencies and runs the test suite (the README's second command).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
python -m pytest -q "$@"
