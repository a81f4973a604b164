#!/usr/bin/env bash
# Installs everything syncbn needs into a virtualenv at the repository root.
#
# Sourced by the README's two commands (examples/demo.sh, tests/run.sh).
#
# SYNCBN_TF_VERSION picks the TensorFlow (default 2.21.0, the newest; 2.18.1 is
# also supported and tested). The default lives in .venv/, any other version
# in .venv-tf<VERSION>/, so two versions never mix.
#
# Safe to run again: a stamp makes a second run in the same checkout a no-op,
# and built wheels (Horovod, keyed by the TensorFlow version; mpi4py in pip's
# cache) stay outside the checkout, so a fresh clone on the same machine
# installs in about a minute instead of compiling again.
#
# Pins, and why:
# * tensorflow-cpu: the CPU build, since CI has no GPU (users choose their own
#   TensorFlow; setup.py does not pin it). numpy is whatever that TensorFlow
#   allows (TF 2.18 caps it below 2.1; TF 2.21 takes numpy 2.x).
# * Horovod 0.28.1, the last release, has no wheels: `syncbn-build-horovod`
#   (launch/build_horovod.py) builds it from the sdist with TensorFlow, Gloo
#   and MPI, against Debian's Open MPI, with the patches of launch/patches/
#   (each says what and why: Gloo's stall check; XLA for TF >= 2.19).
# * mpi4py is built from source against the same Open MPI.
# * tf_keras, the Keras 2 that `tf.keras` is under TF_USE_LEGACY_KERAS=1, in
#   the release line of the TensorFlow (2.21.* for TF 2.21.0, 2.18.* for TF
#   2.18.1), without its dependencies: it requires the `tensorflow` package,
#   which would install the GPU build next to tensorflow-cpu.
set -euo pipefail

SYNCBN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The default TensorFlow is syncbn's own (TF_DEFAULT in syncbn/_versions.py), read before
# any Python is installed.
SYNCBN_DEFAULT_TF_VERSION="$(sed -n 's/^TF_DEFAULT = "\(.*\)"$/\1/p' "$SYNCBN_ROOT/syncbn/_versions.py")"
if [ -z "$SYNCBN_DEFAULT_TF_VERSION" ]; then
  echo "[bootstrap] no TF_DEFAULT in syncbn/_versions.py" >&2
  return 1 2>/dev/null || exit 1
fi
TF_VERSION="${SYNCBN_TF_VERSION:-$SYNCBN_DEFAULT_TF_VERSION}"
if [ "$TF_VERSION" = "$SYNCBN_DEFAULT_TF_VERSION" ]; then
  VENV="$SYNCBN_ROOT/.venv"
else
  VENV="$SYNCBN_ROOT/.venv-tf$TF_VERSION"
fi
CACHE_DIR="${SYNCBN_CACHE_DIR:-$HOME/.cache/syncbn}"
APT_PACKAGES=(python3-venv python3-dev g++ cmake make patch libopenmpi-dev openmpi-bin
              libhighwayhash-dev libfarmhash-dev iproute2 procps openssh-client openssh-server
              slurmctld slurmd slurm-client munge)
PY_PACKAGES=("tensorflow-cpu==$TF_VERSION" pytest hypothesis scikit-learn matplotlib
             cloudpickle psutil pyyaml packaging cffi)

log() { printf '[bootstrap] %s\n' "$*" >&2; }

stamp_value() {
  { cat "$SYNCBN_ROOT/.ci/bootstrap.sh" "$SYNCBN_ROOT/setup.py" \
        "$SYNCBN_ROOT/launch/build_horovod.py" "$SYNCBN_ROOT"/launch/patches/*.patch
    echo "$TF_VERSION"; } | sha256sum | cut -d' ' -f1
}

install_apt_packages() {
  local missing=()
  for package in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "apt-get install ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

bootstrap() {
  if [ -f "$VENV/.bootstrap-stamp" ] && [ "$(cat "$VENV/.bootstrap-stamp")" = "$(stamp_value)" ]; then
    return 0
  fi
  local started=$SECONDS
  install_apt_packages
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  log "pip install into $VENV (TensorFlow $TF_VERSION)"
  "$VENV/bin/pip" install --quiet --upgrade pip setuptools wheel
  "$VENV/bin/pip" install --quiet "${PY_PACKAGES[@]}"
  "$VENV/bin/pip" install --quiet --no-binary=mpi4py mpi4py
  "$VENV/bin/pip" install --quiet --no-deps "tf-keras==${TF_VERSION%.*}.*"
  "$VENV/bin/pip" install --quiet --no-deps -e "$SYNCBN_ROOT"
  # The same command users run for their own TensorFlow; it reuses the cached wheel.
  "$VENV/bin/syncbn-build-horovod" --gpu no --wheel-dir "$CACHE_DIR/wheels/tf-$TF_VERSION" >/dev/null
  "$VENV/bin/python" -c "import horovod.tensorflow as hvd; assert hvd.gloo_built() and hvd.mpi_built()"
  # The MPI communicator's kernel builds on first use; build it now, not in every rank at once.
  log "MPI all-sum kernel: $("$VENV/bin/python" -m syncbn.collectives.mpi_op)"
  stamp_value > "$VENV/.bootstrap-stamp"
  log "environment ready in $((SECONDS - started)) s"
}

bootstrap
export PATH="$VENV/bin:$PATH"
# Debian's Open MPI refuses to start as root without these.
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
