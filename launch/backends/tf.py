"""tf.distribute: one `TF_CONFIG` per worker for `MultiWorkerMirroredStrategy`.

With `--tf-mpi` (auto: when `mpirun` is on PATH and mpi4py is installed) the
workers start under one `mpirun` (`launch.backends.mpirun`), and `launch.mpi_rank` gives
rank r the `TF_CONFIG` of worker r (`SYNCBN_LAUNCH_TF_WORKERS`). The strategy
works as before; syncbn can then sum BN statistics over MPI beside it, in
microseconds instead of a gRPC collective each.

Ports: on this machine the launcher reserves free ports by binding to port 0 (and
releases them just before starting the workers); in simulated hosts (fresh network
namespaces) every port is free, so ranks use `SIMULATED_BASE_PORT + local_rank`;
for remote hosts the launcher can only guess with its own free ports.
"""

import importlib.util
import os
import shutil
import socket

from launch.backends.common import Backend, rank_workers
from launch.backends.mpirun import mpirun_worker
from launch.environment import tf_config

SIMULATED_BASE_PORT = 20000
TF_MPI_CHOICES = ("auto", "yes", "no")


def resolve_tf_mpi(requested, *, mpirun, mpi4py):
    """True if tf workers start under mpirun, for `--tf-mpi requested`. Pure.

    Example:
        >>> resolve_tf_mpi("auto", mpirun="/usr/bin/mpirun", mpi4py=True)
        True
        >>> resolve_tf_mpi("auto", mpirun="/usr/bin/mpirun", mpi4py=False)
        False
    """
    if requested not in TF_MPI_CHOICES:
        raise ValueError(f"Argument `--tf-mpi` must be one of {TF_MPI_CHOICES}. "
                         f"Received: --tf-mpi={requested!r}")
    if requested == "yes" and mpirun is None:
        raise FileNotFoundError("`--tf-mpi yes` needs Open MPI's `mpirun` on PATH")
    if requested == "auto":
        return mpirun is not None and mpi4py
    return requested == "yes"


def free_ports(count, address="127.0.0.1"):
    """`count` distinct ports that were free on `address` a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((address, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def worker_addresses(placement):
    """`host:port` of every rank, indexed by rank."""
    if placement.shared_machine:
        ports = [SIMULATED_BASE_PORT + slot.local_rank for slot in placement.slots]
    else:
        ports = free_ports(len(placement.slots))
    return [f"{placement.addresses[slot.hostname]}:{port}"
            for slot, port in zip(placement.slots, ports)]


class TfBackend(Backend):
    name = "tf"

    def __init__(self, config):
        super().__init__(config)
        self.use_mpi = resolve_tf_mpi(
            config.tf_mpi, mpirun=shutil.which("mpirun"),
            mpi4py=importlib.util.find_spec("mpi4py") is not None)

    def workers(self, placement):
        addresses = worker_addresses(placement)
        if self.use_mpi:
            return [mpirun_worker(placement, {"SYNCBN_LAUNCH_TF_WORKERS": ",".join(addresses)})]
        return rank_workers(
            placement, lambda slot: {"TF_CONFIG": tf_config(slot.rank, addresses)}, os.environ
        )
