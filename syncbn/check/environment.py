"""What the check runs on: versions, build flags, devices, hosts, the communicator.

Every probe reports what it finds, or why it cannot, and never fails the
check: a missing Horovod or mpi4py is a fact about the machine.
"""

import importlib.util
import os
import platform
import socket
import subprocess
import sys

from syncbn import world


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def devices():
    """This process's devices, e.g. `CPU Intel(R) Xeon(R) ... (2 cores); GPU 0: NVIDIA A100 (8.0)`."""
    import tensorflow as tf

    parts = [f"CPU {_cpu_model()} ({os.cpu_count()} cores)"]
    gpus = tf.config.list_physical_devices("GPU")
    for index, gpu in enumerate(gpus):
        details = tf.config.experimental.get_device_details(gpu)
        capability = details.get("compute_capability")
        suffix = f" (compute {capability[0]}.{capability[1]})" if capability else ""
        parts.append(f"GPU {index}: {details.get('device_name', gpu.name)}{suffix}")
    if not gpus:
        parts.append("no GPU")
    return "; ".join(parts)


def tensorflow_build():
    import tensorflow as tf

    info = tf.sysconfig.get_build_info()
    if not info.get("is_cuda_build"):
        return "CPU build" if not info.get("is_rocm_build") else "ROCm build"
    return f"CUDA {info.get('cuda_version')}, cuDNN {info.get('cudnn_version')}"


def horovod():
    """Horovod's version and build flags (MPI, Gloo, NCCL), and its controller if initialized."""
    if importlib.util.find_spec("horovod") is None:
        return "not installed"
    try:
        import horovod as horovod_package
        import horovod.tensorflow as hvd
    except Exception as error:  # a broken build is worth reporting, not raising
        return f"installed, but `import horovod.tensorflow` fails: {error}"
    flags = [f"mpi_built={bool(hvd.mpi_built())}", f"gloo_built={bool(hvd.gloo_built())}",
             f"nccl_built={hvd.nccl_built() or False}", f"cuda_built={bool(hvd.cuda_built())}"]
    text = f"{horovod_package.__version__} ({', '.join(flags)})"
    if hvd.is_initialized():
        text += f"; controller {'mpi' if hvd.mpi_enabled() else 'gloo'}"
    return text


def _in_mpi_job():
    return world.launch_from_environment(os.environ).mpi


def _short_library_version(text):
    """`'Open MPI v4.1.4, package: Debian OpenMPI, ...'` -> `'Open MPI v4.1.4'`."""
    return text.strip().splitlines()[0].split(",")[0].strip()


_LIBRARY_VERSION_PROBE = (
    "import mpi4py; mpi4py.rc.initialize = False; mpi4py.rc.finalize = False; "
    "from mpi4py import MPI; print(MPI.Get_library_version())")


def mpi():
    """`(mpi4py version, MPI library version and thread level)`."""
    if importlib.util.find_spec("mpi4py") is None:
        return "not installed", "unknown (no mpi4py)"
    import mpi4py

    if "mpi4py.MPI" not in sys.modules and not _in_mpi_job():
        # Importing mpi4py.MPI here would initialize MPI in this process; outside
        # an MPI job, a child process asks the library for its version, which MPI
        # answers before MPI_Init.
        probe = subprocess.run([sys.executable, "-c", _LIBRARY_VERSION_PROBE],
                               capture_output=True, text=True, timeout=60)
        if probe.returncode != 0:
            return mpi4py.__version__, f"unknown ({probe.stderr.strip()[-200:]})"
        return (mpi4py.__version__,
                _short_library_version(probe.stdout) + "; not initialized (no MPI job)")
    try:
        from mpi4py import MPI

        library = _short_library_version(MPI.Get_library_version())
    except Exception as error:  # reported, not raised: see the module docstring
        return mpi4py.__version__, f"unknown ({error})"
    if MPI.Is_initialized():
        levels = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled",
                  MPI.THREAD_SERIALIZED: "serialized", MPI.THREAD_MULTIPLE: "multiple"}
        library += f"; thread level {levels.get(MPI.Query_thread(), MPI.Query_thread())}"
    return mpi4py.__version__, library


def versions():
    import keras
    import numpy as np
    import tensorflow as tf

    from syncbn import _versions

    return {
        "syncbn": _versions.__version__,
        "Python": platform.python_version(),
        "TensorFlow": f"{tf.__version__} ({tensorflow_build()})",
        "Keras": keras.__version__,
        "NumPy": np.__version__,
    }


def describe_communicator(communicator):
    """`(what auto picks here, the checked communicator's kernel, its replicas)`.

    Call it where a layer's call runs (`World.in_replica`): under tf.distribute
    the answer depends on the replica context.
    """
    from syncbn import collectives
    from syncbn.check.timing import resolve

    resolved = resolve(communicator)
    kernel = getattr(resolved, "kernel", None) or type(resolved).__name__
    return collectives.detect(), kernel, resolved.num_replicas


def ranges(numbers):
    """`[0, 1, 2, 5]` -> `'0-2, 5'`."""
    groups = []
    for n in numbers:
        if groups and n == groups[-1][1] + 1:
            groups[-1][1] = n
        else:
            groups.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in groups)


def hosts(world):
    """`[(ranks text, host and devices)]`, ranks on the same host with the same devices grouped."""
    per_process = world.gather_strings(f"{socket.gethostname()}: {devices()}")
    grouped = {}
    for rank, text in enumerate(per_process):
        grouped.setdefault(text, []).append(rank)
    return [(ranges(ranks), text) for text, ranks in grouped.items()]
