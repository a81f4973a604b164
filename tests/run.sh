#!/usr/bin/env bash
# Runs the whole test suite, installing what it needs first (.ci/bootstrap.sh).
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k mirrored`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source .ci/bootstrap.sh
exec python -m pytest --doctest-modules tests syncbn launch "$@"
