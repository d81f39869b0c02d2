#!/usr/bin/env bash
# Installs what the tests need (see setup.sh; the virtual board sets itself up on first use) and runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
