#!/usr/bin/env bash
# Installs draftdistill with its test dependencies, lints, and runs the test suite (the README's second command).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
python -m ruff check .  # lint (pyproject.toml [tool.ruff]); the import-cycle check is a test
python -m pytest -q "$@"
