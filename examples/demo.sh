#!/usr/bin/env bash
# README command 1: the main demo, installing what it needs first (.ci/bootstrap.sh).
# Extra arguments go to examples/demo.py, e.g. `bash examples/demo.sh --epochs 2`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source .ci/bootstrap.sh
exec python examples/demo.py "$@"
