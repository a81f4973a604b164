"""`syncbn-build-horovod`: build and install Horovod for the TensorFlow you have.

Horovod's last release, 0.28.1, ships no wheels and its sdist does not build
against TensorFlow 2.19 or newer. This command:

1. finds the installed TensorFlow (in the Python that runs it, or `--python`);
2. downloads Horovod's sdist with pip and unpacks it;
3. applies the patches in `launch/patches/` (each says what it changes and
   why): `horovod-0.28.1-gloo-stall-check.patch` always, so that Horovod's
   stall check works over Gloo, `horovod-0.28.1-legacy-keras-backend.patch`
   always, so that its Keras 2 callbacks work under TF_USE_LEGACY_KERAS=1,
   and `horovod-0.28.1-tf2.19-xla.patch` when TensorFlow is 2.19 or newer;
4. builds a wheel with TensorFlow, Gloo and MPI, and with NCCL
   (`HOROVOD_GPU_OPERATIONS=NCCL`) when CUDA and NCCL are found (`--gpu`);
5. installs it and prints `horovodrun --check-build`.

Wheels are cached in `--wheel-dir`, by default one folder per TensorFlow
version and flavour under `$SYNCBN_CACHE_DIR/wheels` (`~/.cache/syncbn`), so
a second run only installs. A cached wheel is reused only if it was built
with the same patches (a fingerprint file beside it says which); otherwise it
is rebuilt. The CPU path is what `.ci/bootstrap.sh` runs, so
CI builds through it; the GPU path follows Horovod's documented build
variables and is not exercised here (no GPU).

    syncbn-build-horovod                       # detect, build (or reuse), install
    syncbn-build-horovod --dry-run             # print the plan only
    syncbn-build-horovod --gpu no --wheel-dir wheels/

Like the launcher, this module imports no TensorFlow itself: it asks the
target Python.
"""

import argparse
import glob
import hashlib
import logging
import os
import runpy
import shutil
import subprocess
import sys
import tarfile
import tempfile

from launch.config import EnvDefault

logger = logging.getLogger("syncbn-build-horovod")

HOROVOD_VERSION = "0.28.1"
PATCH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "patches")
PATCH = os.path.join(PATCH_DIR, "horovod-0.28.1-tf2.19-xla.patch")
# The XLA patch is needed from this TensorFlow on (see its header).
PATCH_FROM_TF = (2, 19)
# Applied to every build (see its header).
GLOO_STALL_PATCH = os.path.join(PATCH_DIR, "horovod-0.28.1-gloo-stall-check.patch")
LEGACY_KERAS_PATCH = os.path.join(PATCH_DIR, "horovod-0.28.1-legacy-keras-backend.patch")
FINGERPRINT_FILE = "horovod.fingerprint"
GPU_CHOICES = ("auto", "yes", "no")
# Build tools, with the Debian packages that provide them.
BUILD_TOOLS = {"cmake": "cmake", "g++": "g++", "make": "make", "mpicxx": "libopenmpi-dev",
               "patch": "patch"}
# TensorFlow's headers include these, and its wheel does not ship them.
TF_EXTRA_HEADERS = {"highwayhash/sip_hash.h": "libhighwayhash-dev", "farmhash.h": "libfarmhash-dev"}


class BuildError(RuntimeError):
    """Horovod cannot be built here; the message says what is missing."""


def _versions():
    # syncbn/_versions.py sits beside this package; run it as a file so that
    # importing `syncbn` (and with it TensorFlow) is not needed.
    here = os.path.dirname(os.path.abspath(__file__))
    return runpy.run_path(os.path.join(here, os.pardir, "syncbn", "_versions.py"))


def tensorflow_version(python):
    """The TensorFlow version `python` imports, e.g. `"2.21.0"`."""
    probe = "import tensorflow as tf; print(tf.__version__)"
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if result.returncode != 0:
        raise BuildError(
            f"`{python}` cannot import TensorFlow; install TensorFlow first "
            f"(e.g. `pip install 'tensorflow{_versions()['tf_range_text']()}'`):\n"
            + result.stderr.strip()[-2000:])
    return result.stdout.strip().splitlines()[-1]


def needs_patch(tf_version):
    """True when Horovod 0.28.1 needs the XLA patch to build against `tf_version`."""
    parsed = _versions()["major_minor"](tf_version)
    if parsed is None:
        raise BuildError(f"Cannot parse the TensorFlow version. Received: tf_version={tf_version!r}")
    return parsed >= PATCH_FROM_TF


def patches_for(tf_version):
    """The patch files a build against `tf_version` applies, in order."""
    return [GLOO_STALL_PATCH, LEGACY_KERAS_PATCH] + ([PATCH] if needs_patch(tf_version) else [])


def build_fingerprint(tf_version, flavour):
    """What a cached wheel must have been built from: Horovod, TF, flavour and the patches' text."""
    digest = hashlib.sha256(f"horovod {HOROVOD_VERSION}; tf {tf_version}; {flavour}\n".encode())
    for patch in patches_for(tf_version):
        with open(patch, "rb") as handle:
            digest.update(os.path.basename(patch).encode() + b"\n" + handle.read())
    return digest.hexdigest()[:16]


def _first_existing(paths):
    return next((path for path in paths if path and os.path.exists(path)), None)


def find_cuda_nccl(environ):
    """`(cuda_home, nccl_home)` as found on this machine, each None when absent.

    CUDA: `CUDA_HOME`/`CUDA_PATH`, else the directory above `nvcc`, else
    /usr/local/cuda. NCCL: the first of `HOROVOD_NCCL_HOME`, `NCCL_HOME`, the
    CUDA directory and /usr whose `include/nccl.h` exists.
    """
    nvcc = shutil.which("nvcc", path=environ.get("PATH"))
    cuda_candidates = [environ.get("CUDA_HOME"), environ.get("CUDA_PATH"),
                       os.path.dirname(os.path.dirname(nvcc)) if nvcc else None, "/usr/local/cuda"]
    cuda_home = next((path for path in cuda_candidates
                      if path and os.path.exists(os.path.join(path, "include", "cuda.h"))), None)
    nccl_candidates = [environ.get("HOROVOD_NCCL_HOME"), environ.get("NCCL_HOME"), cuda_home, "/usr"]
    nccl_home = next((path for path in nccl_candidates
                      if path and os.path.exists(os.path.join(path, "include", "nccl.h"))), None)
    return cuda_home, nccl_home


def build_environment(environ, gpu, jobs):
    """The environment for Horovod's build: `(env, flavour)`, flavour `"cpu"` or `"nccl"`.

    Raises:
        BuildError: with `gpu="yes"` when CUDA or NCCL is missing.
    """
    if gpu not in GPU_CHOICES:
        raise ValueError(f"Argument `gpu` must be one of {GPU_CHOICES}. Received: gpu={gpu!r}")
    env = dict(environ)
    env.update({
        "HOROVOD_WITH_TENSORFLOW": "1", "HOROVOD_WITHOUT_PYTORCH": "1",
        "HOROVOD_WITHOUT_MXNET": "1", "HOROVOD_WITH_GLOO": "1", "HOROVOD_WITH_MPI": "1",
        "MAKEFLAGS": f"-j{jobs}",
    })
    flavour = "cpu"
    if gpu != "no":
        cuda_home, nccl_home = find_cuda_nccl(environ)
        if cuda_home and nccl_home:
            # Horovod's documented GPU build: NCCL for every GPU collective.
            env.update({"HOROVOD_GPU_OPERATIONS": "NCCL", "HOROVOD_CUDA_HOME": cuda_home,
                        "HOROVOD_NCCL_HOME": nccl_home})
            flavour = "nccl"
        elif gpu == "yes":
            raise BuildError(
                "--gpu yes, but CUDA (include/cuda.h under CUDA_HOME or beside nvcc) or NCCL "
                "(include/nccl.h under HOROVOD_NCCL_HOME, NCCL_HOME, CUDA_HOME or /usr) "
                f"was not found. Found: cuda={cuda_home!r}, nccl={nccl_home!r}")
    return env, flavour


def missing_build_requirements(environ):
    """Debian package names for the build tools and headers that are missing."""
    missing = [package for tool, package in BUILD_TOOLS.items()
               if shutil.which(environ.get("MPICXX", tool) if tool == "mpicxx" else tool,
                               path=environ.get("PATH")) is None]
    include_dirs = ["/usr/include", "/usr/local/include"] + environ.get("CPATH", "").split(":")
    for header, package in TF_EXTRA_HEADERS.items():
        if _first_existing([os.path.join(d, header) for d in include_dirs if d]) is None:
            missing.append(package)
    return missing


def default_wheel_dir(tf_version, flavour):
    cache = os.environ.get("SYNCBN_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "syncbn"))
    suffix = "" if flavour == "cpu" else f"-{flavour}"
    return os.path.join(cache, "wheels", f"tf-{tf_version}{suffix}")


def _wheels(wheel_dir):
    return sorted(glob.glob(os.path.join(wheel_dir, f"horovod-{HOROVOD_VERSION}-*.whl")))


def cached_wheel(wheel_dir, fingerprint):
    """The wheel in `wheel_dir` if it was built with `fingerprint`, else None."""
    try:
        with open(os.path.join(wheel_dir, FINGERPRINT_FILE)) as handle:
            recorded = handle.read().strip()
    except OSError:
        return None
    wheels = _wheels(wheel_dir)
    return wheels[-1] if wheels and recorded == fingerprint else None


def _run(command, log_path=None, **kwargs):
    """Runs `command`; with `log_path`, its output goes there and its tail into the error."""
    logger.info("$ %s%s", " ".join(command), f"  > {log_path}" if log_path else "")
    if log_path is None:
        subprocess.run(command, check=True, **kwargs)
        return
    with open(log_path, "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, **kwargs)
    if result.returncode != 0:
        with open(log_path) as log:
            tail = log.read()[-4000:]
        raise BuildError(f"`{' '.join(command[:4])} ...` failed with exit code "
                         f"{result.returncode}; the end of {log_path}:\n{tail}")


def build_wheel(python, tf_version, env, wheel_dir, fingerprint):
    """Downloads, patches and builds Horovod; returns the wheel's path."""
    with tempfile.TemporaryDirectory(prefix="syncbn-horovod-") as work:
        _run([python, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
              "-d", work, f"horovod=={HOROVOD_VERSION}"])
        (archive,) = glob.glob(os.path.join(work, "horovod-*.tar.gz"))
        with tarfile.open(archive) as tar:
            # The "data" filter refuses links and paths that leave `work` (Python >= 3.11.4).
            tar.extractall(work, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        source = os.path.join(work, f"horovod-{HOROVOD_VERSION}")
        for patch in patches_for(tf_version):
            logger.info("applying %s", os.path.basename(patch))
            _run(["patch", "-p1", "--forward", "--batch", "-i", patch], cwd=source)
        os.makedirs(wheel_dir, exist_ok=True)
        for stale in _wheels(wheel_dir) + [os.path.join(wheel_dir, FINGERPRINT_FILE)]:
            if os.path.exists(stale):
                os.remove(stale)
        # Horovod's build prints thousands of lines; they are kept beside the wheel.
        _run([python, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
              "-w", wheel_dir, source], log_path=os.path.join(wheel_dir, "build.log"), env=env)
    wheels = _wheels(wheel_dir)
    if not wheels:
        raise BuildError(f"pip reported success but left no Horovod wheel in {wheel_dir}")
    with open(os.path.join(wheel_dir, FINGERPRINT_FILE), "w") as handle:
        handle.write(fingerprint + "\n")
    return wheels[-1]


def check_build(python):
    """`horovodrun --check-build` of the Horovod that `python` imports."""
    horovodrun = os.path.join(os.path.dirname(python), "horovodrun")
    command = [horovodrun] if os.path.exists(horovodrun) else [python, "-m", "horovod.runner.launch"]
    result = subprocess.run(command + ["--check-build"], capture_output=True, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if result.returncode != 0:
        raise BuildError("horovodrun --check-build failed:\n" + (result.stderr or result.stdout))
    return result.stdout


def build_parser():
    parser = argparse.ArgumentParser(
        prog="syncbn-build-horovod",
        description=f"Build Horovod {HOROVOD_VERSION} for the installed TensorFlow (patched "
                    "for TF >= 2.19), with Gloo and MPI, and NCCL when CUDA and NCCL are found.")
    parser.add_argument("--python", default=sys.executable,
                        help="the Python whose TensorFlow to build for and install into "
                             "(default: the one running this command)")
    parser.add_argument("--gpu", choices=GPU_CHOICES, default="auto", action=EnvDefault,
                        env=("SYNCBN_BUILD_GPU",), default_text="auto",
                        help="build NCCL GPU operations: auto (when CUDA and NCCL are found), "
                             "yes (fail without them) or no")
    parser.add_argument("--wheel-dir", default=None,
                        help="where to cache the built wheel (default: "
                             "$SYNCBN_CACHE_DIR/wheels/tf-VERSION[-nccl])")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="parallel compile jobs (default: the number of cores)")
    parser.add_argument("--rebuild", action="store_true", help="build even when a wheel is cached")
    parser.add_argument("--no-install", dest="install", action="store_false",
                        help="only build the wheel")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    return parser


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="[syncbn-build-horovod] %(message)s")
    try:
        parser = build_parser()
    except ValueError as error:  # SYNCBN_BUILD_GPU that --gpu rejects
        raise SystemExit(f"syncbn-build-horovod: error: {error}") from None
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"Argument `--jobs` must be >= 1. Received: --jobs={args.jobs}")
    try:
        tf_version = tensorflow_version(args.python)
        versions = _versions()
        if not versions["tf_supported"](tf_version):
            logger.warning("TensorFlow %s is outside the range syncbn supports (%s); trying anyway.",
                           tf_version, versions["tf_range_text"]())
        env, flavour = build_environment(os.environ, args.gpu, args.jobs)
        wheel_dir = args.wheel_dir or default_wheel_dir(tf_version, flavour)
        fingerprint = build_fingerprint(tf_version, flavour)
        wheel = None if args.rebuild else cached_wheel(wheel_dir, fingerprint)
        logger.info("TensorFlow %s; Horovod %s with TensorFlow, Gloo, MPI%s; patches: %s; wheel: %s",
                    tf_version, HOROVOD_VERSION, ", NCCL" if flavour == "nccl" else "",
                    ", ".join(os.path.basename(p) for p in patches_for(tf_version)),
                    wheel or f"to build into {wheel_dir}")
        if args.dry_run:
            return 0
        if wheel is None:
            missing = missing_build_requirements(env)
            if missing:
                raise BuildError("missing build requirements; on Debian/Ubuntu: "
                                 f"apt-get install {' '.join(sorted(set(missing)))}")
            logger.info("building (about 6 minutes on 2 cores)")
            wheel = build_wheel(args.python, tf_version, env, wheel_dir, fingerprint)
        if args.install:
            _run([args.python, "-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps", wheel])
            # Horovod's own run-time requirements, without touching TensorFlow.
            _run([args.python, "-m", "pip", "install", "--quiet",
                  "cloudpickle", "psutil", "pyyaml", "packaging", "cffi"])
            sys.stdout.write(check_build(args.python))
        else:
            print(wheel)
    except (BuildError, subprocess.CalledProcessError) as error:
        logger.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
