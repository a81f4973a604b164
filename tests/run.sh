#!/usr/bin/env bash
# Runs the tests, installing what they need first (.ci/bootstrap.sh).
#
#   bash tests/run.sh                            # the whole suite on the default TF (2.21.0):
#                                                # both tiers and the doctests, then the `compat`
#                                                # tests on TF 2.18.1. CI runs exactly this.
#   bash tests/run.sh --quick                    # the unit tier only (in one process, no
#                                                # launched jobs): a few minutes, for whoever
#                                                # changes the code; default TF only
#   SYNCBN_TF_VERSION=2.18.1 bash tests/run.sh   # the whole suite on TF 2.18.1 only
#   bash tests/run.sh -k mirrored                # pytest arguments: default TF only
#   bash tests/run.sh --quick -k mirrored        # both
#
# The tiers are pytest markers (setup.cfg): `unit` and `multiprocess`; every test
# module declares its own (tests/conftest.py).
#
# SYNCBN_COMPAT_TF_VERSIONS (default "2.18.1"; empty to skip) lists the older
# TensorFlow versions of the second pass. Each version has its own virtualenv,
# set up in the background (niced, after the default one, so that apt never
# runs twice at once) while the first pass runs: its pip installs and Horovod
# build use the cores the first pass leaves idle, e.g. while fault tests wait
# out their timeouts. Its log is .venv-tf<VERSION>.bootstrap.log.
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
    python -m pytest --durations=25 "$@"
  )
}

quick=()
if [ "${1:-}" = "--quick" ]; then
  shift
  quick=(-m unit)
fi
if [ -n "${SYNCBN_TF_VERSION:-}" ] || [ $# -gt 0 ] || [ ${#quick[@]} -gt 0 ]; then
  started=$SECONDS
  run_suite "${SYNCBN_TF_VERSION:-}" "${quick[@]}" --doctest-modules tests syncbn launch "$@"
  echo "== ${quick[*]:+unit tier }$((SECONDS - started)) s" >&2
  exit
fi

started=$SECONDS
# The default environment first, in the foreground: apt runs there, and only there.
(source .ci/bootstrap.sh)
background=()
for version in ${SYNCBN_COMPAT_TF_VERSIONS-2.18.1}; do
  log=".venv-tf$version.bootstrap.log"
  echo "== setting up TensorFlow $version in the background (log: $log)" >&2
  SYNCBN_TF_VERSION=$version nice -n 19 bash -c 'source .ci/bootstrap.sh' > "$log" 2>&1 &
  background+=("$version:$!")
done
run_suite "" --doctest-modules tests syncbn launch
echo "== full suite: $((SECONDS - started)) s" >&2
for entry in "${background[@]}"; do
  version=${entry%%:*}
  waited=$SECONDS
  if ! wait "${entry##*:}"; then
    cat ".venv-tf$version.bootstrap.log" >&2
    echo "== setting up TensorFlow $version failed" >&2
    exit 1
  fi
  echo "== TensorFlow $version ready ($((SECONDS - waited)) s waited after the first pass)" >&2
  started=$SECONDS
  run_suite "$version" -m compat tests
  echo "== compat tests on TensorFlow $version: $((SECONDS - started)) s" >&2
done
