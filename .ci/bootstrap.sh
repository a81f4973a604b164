#!/usr/bin/env bash
# Installs everything syncbn needs into .venv/ at the repository root.
#
# Sourced by the README's two commands (examples/demo.sh, tests/run.sh).
# Safe to run again: a stamp makes a second run on the same checkout a no-op,
# and built wheels (Horovod, mpi4py) are cached outside the checkout, so a
# fresh clone on the same machine installs in about a minute instead of
# compiling again.
#
# Pins, and why:
# * tensorflow-cpu 2.18.1 is the newest TensorFlow that Horovod 0.28.1 (the
#   last Horovod release) builds and runs against: from 2.19 on, Horovod's
#   XLA ops no longer compile against TensorFlow's headers. TF 2.18 ships
#   Keras 3.
# * Horovod 0.28.1 is built from source (there are no wheels) with
#   TensorFlow, Gloo and MPI support, against Debian's Open MPI.
# * mpi4py is built from source against the same Open MPI.
set -euo pipefail

SYNCBN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$SYNCBN_ROOT/.venv"
TF_VERSION="2.18.1"
HOROVOD_VERSION="0.28.1"
CACHE_DIR="${SYNCBN_CACHE_DIR:-$HOME/.cache/syncbn}"
WHEELHOUSE="$CACHE_DIR/wheels/tf-$TF_VERSION"
APT_PACKAGES=(python3-venv python3-dev g++ cmake make libopenmpi-dev openmpi-bin
              libhighwayhash-dev libfarmhash-dev iproute2 procps openssh-client)
PY_PACKAGES=("tensorflow-cpu==$TF_VERSION" "numpy<2.1" pytest scikit-learn matplotlib
             cloudpickle psutil pyyaml packaging cffi)

log() { printf '[bootstrap] %s\n' "$*" >&2; }

stamp_value() {
  cat "$SYNCBN_ROOT/.ci/bootstrap.sh" "$SYNCBN_ROOT/setup.py" | sha256sum | cut -d' ' -f1
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

build_horovod_wheel() {
  if ls "$WHEELHOUSE"/horovod-"$HOROVOD_VERSION"-*.whl >/dev/null 2>&1; then
    return 0
  fi
  log "building Horovod $HOROVOD_VERSION against TensorFlow $TF_VERSION (a few minutes, once)"
  mkdir -p "$WHEELHOUSE"
  # TensorFlow's headers include highwayhash/ and farmhash headers that its
  # wheel does not ship; Debian's libhighwayhash-dev and libfarmhash-dev put
  # them under /usr/include, which the compiler searches already.
  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
  HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 MAKEFLAGS="-j$(nproc)" \
    "$VENV/bin/pip" wheel --quiet --no-build-isolation --no-deps \
      -w "$WHEELHOUSE" "horovod==$HOROVOD_VERSION"
}

bootstrap() {
  if [ -f "$VENV/.bootstrap-stamp" ] && [ "$(cat "$VENV/.bootstrap-stamp")" = "$(stamp_value)" ]; then
    return 0
  fi
  local started=$SECONDS
  install_apt_packages
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  log "pip install into $VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip setuptools wheel
  "$VENV/bin/pip" install --quiet "${PY_PACKAGES[@]}"
  "$VENV/bin/pip" install --quiet --no-binary=mpi4py mpi4py
  build_horovod_wheel
  "$VENV/bin/pip" install --quiet --no-deps "$WHEELHOUSE"/horovod-"$HOROVOD_VERSION"-*.whl
  "$VENV/bin/pip" install --quiet --no-deps -e "$SYNCBN_ROOT"
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
