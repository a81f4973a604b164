"""Collective back ends and the rule that picks one.

`resolve(spec, group_size)` turns the layer's `communicator` argument into a
communicator object. With `"auto"`, the first that applies wins:

1. a tf.distribute replica context with more than one replica in sync:
   tf.distribute;
2. Horovod imported and initialized with more than one process: Horovod;
3. an MPI launcher's environment with more than one process (`mpirun`,
   `srun`): MPI through mpi4py;
4. otherwise: local, no communication.

The tf.distribute check comes first because it is the only context that is
specific to the current call: the same process can run a tf.distribute
replica function and also have Horovod initialized.
"""

import os
import sys

from syncbn.collectives.base import (
    Communicator,
    LocalCommunicator,
    collective_timeout_seconds,
    consecutive_groups,
)

COMMUNICATORS = ("auto", "horovod", "tf.distribute", "mpi", "local")

_MPI_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


def validate_spec(communicator):
    """Checks the layer's `communicator` argument without creating anything."""
    if isinstance(communicator, str):
        if communicator not in COMMUNICATORS:
            raise ValueError(
                f"Argument `communicator` must be one of {COMMUNICATORS} or an object "
                "with `num_replicas` and `all_sum(tensor, name)`. "
                f"Received: communicator={communicator!r}"
            )
        return communicator
    if not (hasattr(communicator, "all_sum") and hasattr(communicator, "num_replicas")):
        raise TypeError(
            "Argument `communicator` must be a string or an object with "
            "`num_replicas` and `all_sum(tensor, name)`. "
            f"Received: communicator={communicator!r}"
        )
    return communicator


def validate_group_size(group_size):
    """Checks the `group_size` argument: None or a positive integer."""
    if group_size is not None and (
        isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1
    ):
        raise ValueError(
            "Argument `group_size` must be a positive integer or None. "
            f"Received: group_size={group_size!r}"
        )
    return group_size


def _tf_distribute_replicas():
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None:
        return 0
    return context.num_replicas_in_sync


def _horovod_size():
    hvd = sys.modules.get("horovod.tensorflow")
    if hvd is None:
        return 0
    try:
        return hvd.size() if hvd.is_initialized() else 0
    except ValueError:
        return 0


def _mpi_launcher_size():
    for variable in _MPI_SIZE_VARIABLES:
        if variable in os.environ:
            try:
                return int(os.environ[variable])
            except ValueError:
                continue
    return 0


def detect():
    """The name of the communicator `"auto"` resolves to here and now."""
    if _tf_distribute_replicas() > 1:
        return "tf.distribute"
    if _horovod_size() > 1:
        return "horovod"
    if _mpi_launcher_size() > 1:
        return "mpi"
    return "local"


def resolve(communicator, group_size=None):
    """Returns a communicator object for the layer's `communicator` argument."""
    if not isinstance(communicator, str):
        return communicator
    name = detect() if communicator == "auto" else communicator
    if name == "local":
        if group_size not in (None, 1):
            raise ValueError(
                "Argument `group_size` needs more than one replica, but the "
                f"communicator is 'local'. Received: group_size={group_size}"
            )
        return LocalCommunicator()
    if name == "tf.distribute":
        from syncbn.collectives.tf_distribute import TFDistributeCommunicator

        return TFDistributeCommunicator(group_size)
    if name == "horovod":
        from syncbn.collectives.horovod import horovod_communicator

        return horovod_communicator(group_size)
    from syncbn.collectives.mpi import mpi_communicator

    return mpi_communicator(group_size)


__all__ = [
    "COMMUNICATORS",
    "Communicator",
    "LocalCommunicator",
    "collective_timeout_seconds",
    "consecutive_groups",
    "detect",
    "resolve",
    "validate_group_size",
    "validate_spec",
]
