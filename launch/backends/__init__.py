"""Backends: what each kind of job adds to a rank's environment and how its processes start.

Every backend takes the job's `launch.config.LaunchConfig`, and turns a
`launch.placement.Placement` (ranks, hosts, how to reach them) into the
`WorkerSpec`s the supervisor runs. A backend is a context manager: what it starts
(Horovod's rendezvous server) ends when the launcher's `ExitStack` closes it.

- `horovod`: like horovodrun, over MPI (one `mpirun`, Horovod's MPI
  controller) when Horovod was built with MPI and `mpirun` is on PATH, else one
  process per rank with `HOROVOD_*` Gloo variables and Horovod's own rendezvous
  server running in the launcher; `hvd.init()` just works either way.
- `tf`: one process per rank with a `TF_CONFIG` (`MultiWorkerMirroredStrategy()` just works).
- `mpi`: a single `mpirun`, whose ranks pass through `launch.mpi_rank` to get the
  same variables and `[rank]` output prefixes (`launch.backends.mpirun`, which the
  other two use as well when they run under mpirun).

Default (`--backend` not given, no `SYNCBN_LAUNCH_BACKEND`): `horovod` if Horovod is
installed, else `tf` if TensorFlow is installed, else `mpi` if `mpirun` is on PATH.
The check looks for the packages without importing them.
"""

import importlib.util
import shutil

BACKENDS = ("horovod", "tf", "mpi")


def default_backend():
    """The backend used when none is asked for (see module docstring)."""
    if importlib.util.find_spec("horovod") is not None:
        return "horovod"
    if importlib.util.find_spec("tensorflow") is not None:
        return "tf"
    if shutil.which("mpirun"):
        return "mpi"
    raise RuntimeError(
        "No backend available: install Horovod or TensorFlow, or put Open MPI's "
        "`mpirun` on PATH, or pass `--backend`"
    )


def create_backend(config):
    """Returns the backend object of `config.backend` ('horovod', 'tf' or 'mpi')."""
    if config.backend == "horovod":
        from launch.backends.horovod import HorovodBackend

        return HorovodBackend(config)
    if config.backend == "tf":
        from launch.backends.tf import TfBackend

        return TfBackend(config)
    if config.backend == "mpi":
        from launch.backends.mpi import MpiBackend

        return MpiBackend(config)
    raise ValueError(f"Argument `--backend` must be one of {BACKENDS}. "
                     f"Received: {config.backend!r}")
