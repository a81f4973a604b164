"""Backends: what each kind of job adds to a rank's environment and how its processes start.

Every backend turns a `Placement` (ranks, hosts, how to reach them) into the
`WorkerSpec`s the supervisor runs:

- `horovod`: like horovodrun, over MPI (the `mpi` backend's `mpirun`, Horovod's MPI
  controller) when Horovod was built with MPI and `mpirun` is on PATH, else one
  process per rank with `HOROVOD_*` Gloo variables and Horovod's own rendezvous
  server running in the launcher; `hvd.init()` just works either way.
- `tf`: one process per rank with a `TF_CONFIG` (`MultiWorkerMirroredStrategy()` just works).
- `mpi`: a single `mpirun`, whose ranks pass through `launch.mpi_rank` to get the
  same variables and `[rank]` output prefixes.

Default (`--backend` not given, no `SYNCBN_LAUNCH_BACKEND`): `horovod` if Horovod is
installed, else `tf` if TensorFlow is installed, else `mpi` if `mpirun` is on PATH.
The check looks for the packages without importing them.
"""

import dataclasses
import importlib.util
import shutil
from typing import Optional

BACKENDS = ("horovod", "tf", "mpi")


@dataclasses.dataclass
class Placement:
    """Where the ranks run and how they reach each other; built by the CLI.

    Attributes:
        slots: one `launch.hosts.Slot` per rank, indexed by rank.
        hosts: the `launch.hosts.Host`s that got ranks.
        runners: hostname -> `launch.hostexec.HostRunner`.
        addresses: hostname -> address other hosts reach it at.
        launcher_address: address the ranks reach the launcher at.
        iface: network interface the ranks use, or None if unknown.
        command: the user's command (argv list).
        cwd: working directory of the ranks.
        cpus: cores per machine; gpu_ids: GPU ids per machine.
        shared_machine: True for `--simulate-hosts` (all hosts share this machine).
        network: the `launch.netns.SimulatedNetwork`, or None.
        exported: extra launcher variables to forward to remote hosts.
    """

    slots: list
    hosts: list
    runners: dict
    addresses: dict
    launcher_address: str
    iface: Optional[str]
    command: list
    cwd: str
    cpus: int
    gpu_ids: tuple = ()
    shared_machine: bool = False
    network: object = None
    exported: tuple = ()


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


def create_backend(name, options):
    """Returns the backend object for `name` ('horovod', 'tf' or 'mpi')."""
    if name == "horovod":
        from launch.backends.horovod import HorovodBackend

        return HorovodBackend(options)
    if name == "tf":
        from launch.backends.tf import TfBackend

        return TfBackend(options)
    if name == "mpi":
        from launch.backends.mpi import MpiBackend

        return MpiBackend(options)
    raise ValueError(f"Argument `--backend` must be one of {BACKENDS}. Received: {name!r}")
