#!/usr/bin/env bash
# Runs the whole test suite, installing what it needs first (.ci/bootstrap.sh).
#
#   bash tests/run.sh                            # full suite on the default TF (2.21.0), then the
#                                                # `compat` tests on TF 2.18.1
#   SYNCBN_TF_VERSION=2.18.1 bash tests/run.sh   # full suite on TF 2.18.1 only
#   bash tests/run.sh -k mirrored                # pytest arguments: default TF only
#
# SYNCBN_COMPAT_TF_VERSIONS (default "2.18.1"; empty to skip) lists the older
# TensorFlow versions of the second pass. Each version has its own virtualenv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

run_suite() {  # run_suite TF_VERSION PYTEST_ARGS...
  local version=$1
  shift
  (
    export SYNCBN_TF_VERSION=$version
    source .ci/bootstrap.sh
    echo "== pytest on TensorFlow $(python -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null)" >&2
    # The slowest tests, so that a CI log shows where its time goes.
    python -m pytest --durations=15 "$@"
  )
}

if [ -n "${SYNCBN_TF_VERSION:-}" ] || [ $# -gt 0 ]; then
  run_suite "${SYNCBN_TF_VERSION:-}" --doctest-modules tests syncbn launch "$@"
  exit
fi
started=$SECONDS
run_suite "" --doctest-modules tests syncbn launch
echo "== full suite: $((SECONDS - started)) s" >&2
for version in ${SYNCBN_COMPAT_TF_VERSIONS-2.18.1}; do
  started=$SECONDS
  run_suite "$version" -m compat tests
  echo "== compat tests on TensorFlow $version: $((SECONDS - started)) s" >&2
done
