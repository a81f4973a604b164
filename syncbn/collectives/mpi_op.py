"""Builds and loads `mpi_all_sum.cc`, the MPI communicator's compiled kernel.

The kernel is compiled on first use with `mpicxx` and the flags of the
installed TensorFlow (`tf.sysconfig`), about 10 s, and cached: the file name
carries a hash of the source, the TensorFlow version and every flag, so a new
TensorFlow or MPI gets its own build. Ranks that build at the same time each
write a private file and rename it into place, so they never see half a file.

`SYNCBN_MPI_KERNEL` chooses the kernel:

* `auto` (default): the compiled kernel; if it cannot be built (no `mpicxx`,
  no TensorFlow headers), a warning and the `tf.numpy_function` kernel;
* `compiled`: the compiled kernel or an error;
* `numpy_function`: mpi4py called from `tf.numpy_function`, no compiler.

`SYNCBN_CACHE_DIR` moves the cache (default `~/.cache/syncbn`).

    python -m syncbn.collectives.mpi_op   # build now, print the library's path
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

KERNELS = ("auto", "compiled", "numpy_function")
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mpi_all_sum.cc")


class BuildError(RuntimeError):
    """The compiled MPI kernel could not be built or loaded."""


def requested_kernel():
    """The `SYNCBN_MPI_KERNEL` setting, validated."""
    value = os.environ.get("SYNCBN_MPI_KERNEL", "auto")
    if value not in KERNELS:
        raise ValueError(
            f"Environment variable `SYNCBN_MPI_KERNEL` must be one of {KERNELS}. "
            f"Received: SYNCBN_MPI_KERNEL={value!r}"
        )
    return value


def cache_dir():
    default = os.path.join(os.path.expanduser("~"), ".cache", "syncbn")
    return os.path.join(os.environ.get("SYNCBN_CACHE_DIR", default), "ops")


def _compiler():
    compiler = os.environ.get("MPICXX", "mpicxx")
    path = shutil.which(compiler)
    if path is None:
        raise BuildError(
            f"`{compiler}` was not found on PATH; install Open MPI's development package "
            "(Debian: libopenmpi-dev) or set MPICXX to the MPI C++ compiler wrapper."
        )
    return path


def build_command(compiler, source, output):
    """The compiler command line for `source` -> shared library `output`."""
    import tensorflow as tf

    return ([compiler, "-shared", "-fPIC", "-O2", source, "-o", output]
            + tf.sysconfig.get_compile_flags() + tf.sysconfig.get_link_flags())


def library_path(command_template, source_text):
    """Cache path of the library for this source and this exact command line."""
    import tensorflow as tf

    digest = hashlib.sha256()
    for part in [source_text, tf.__version__, *command_template]:
        digest.update(part.encode())
        digest.update(b"\0")
    return os.path.join(cache_dir(), f"mpi_all_sum-{digest.hexdigest()[:16]}.so")


def build():
    """Returns the path of the compiled library, building it if it is not cached.

    Raises:
        BuildError: when the compiler is missing or fails.
    """
    compiler = _compiler()
    with open(SOURCE) as handle:
        source_text = handle.read()
    template = build_command(compiler, "SOURCE", "OUTPUT")
    path = library_path(template, source_text)
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    descriptor, partial = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(descriptor)
    try:
        result = subprocess.run(build_command(compiler, SOURCE, partial),
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(
                f"compiling {SOURCE} failed with exit code {result.returncode}:\n"
                + (result.stderr or result.stdout)[-3000:]
            )
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


_loaded_paths = []  # the library `load` loaded, if any


@functools.lru_cache(maxsize=None)
def _registrar(path):
    # dlopen of an already loaded path returns the same library, and so the
    # same call-site table as the kernels use.
    function = ctypes.CDLL(path).syncbn_register_call_site
    function.argtypes = [ctypes.c_int64, ctypes.c_char_p]
    function.restype = None
    return function


def register_call_site(fingerprint, name):
    """Tells the loaded kernel's call-site table that `fingerprint` is `name`.

    The kernel names another rank's call site from this table when their
    headers differ; kernels register their own name when they are created,
    which for a layer not yet run here is too late.
    """
    for path in _loaded_paths:
        _registrar(path)(fingerprint, name.encode())


@functools.lru_cache(maxsize=None)
def load():
    """The loaded op module (`.syncbn_mpi_all_sum`), or None for the numpy_function kernel.

    Raises:
        BuildError: with `SYNCBN_MPI_KERNEL=compiled`, when the kernel cannot be built.
    """
    kernel = requested_kernel()
    if kernel == "numpy_function":
        return None
    import tensorflow as tf

    try:
        path = build()
        library = tf.load_op_library(path)
        _loaded_paths.append(path)
        return library
    except (BuildError, tf.errors.NotFoundError, OSError) as error:
        if kernel == "compiled":
            raise BuildError(f"SYNCBN_MPI_KERNEL=compiled, but the kernel is unavailable: {error}") from error
        warnings.warn(
            "syncbn: the compiled MPI all-sum kernel is unavailable, so MPI collectives go "
            "through tf.numpy_function (slower, same results). Set "
            f"SYNCBN_MPI_KERNEL=numpy_function to silence this. Reason: {error}",
            RuntimeWarning, stacklevel=2,
        )
        return None


if __name__ == "__main__":
    print(build())
    sys.exit(0)
