"""Collective back ends and the rule that picks one.

`resolve(spec, group_size)` turns the layer's `communicator` argument into a
communicator object. `"auto"` asks `syncbn.world.detect()`, which picks, the
first that applies:

1. a tf.distribute replica context with more than one replica in sync:
   tf.distribute;
2. Horovod initialized with more than one process: Horovod;
3. a launcher's MPI world of more than one process (`mpirun`, `srun
   --mpi=pmix` or `pmi2`): MPI through mpi4py;
4. otherwise local, no communication; but a process that a launcher started
   as one of several raises `syncbn.world.LauncherWorldError` instead.

The tf.distribute check comes first because it is the only context that is
specific to the current call: the same process can run a tf.distribute
replica function and also have Horovod initialized.
"""

from syncbn import world
from syncbn.collectives.base import (
    Communicator,
    LocalCommunicator,
    PretendReplicas,
    collective_timeout_seconds,
    consecutive_groups,
)

COMMUNICATORS = ("auto", "horovod", "tf.distribute", "mpi", "local")


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


def detect():
    """The name of the communicator `"auto"` resolves to here and now (`syncbn.world.detect`)."""
    return world.detect()


def supports_xla(communicator, replicas_in_process=1):
    """True if the sums of `communicator` (the layer's argument) compile under XLA.

    One replica needs no sum, and compiles. Horovod's ops and the MPI kernels
    do not, nor do tf.distribute's all-reduces: between processes never, and
    between the replicas of one process XLA cannot place the replicas'
    variables (Keras's own BatchNormalization fails there too, and Keras's
    `jit_compile="auto"` already leaves XLA off under a strategy). For
    `"auto"` the answer comes from the job before the first step (Keras asks
    when a model is compiled): no when the process sums with other processes
    or the layer was built under a strategy of several replicas. A custom
    communicator says so with a `supports_xla` attribute (default True).

    Args:
        communicator: the layer's `communicator` argument.
        replicas_in_process: replicas of the tf.distribute strategy the layer
            was built under (1 without one).
    """
    if not isinstance(communicator, str):
        return bool(getattr(communicator, "supports_xla", True))
    if communicator == "auto":
        return replicas_in_process == 1 and not world.several_processes()
    return communicator == "local"


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
    "PretendReplicas",
    "collective_timeout_seconds",
    "consecutive_groups",
    "detect",
    "resolve",
    "supports_xla",
    "validate_group_size",
    "validate_spec",
]
