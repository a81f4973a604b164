"""Horovod: NCCL on GPUs, Gloo or MPI on CPUs.

Only Horovod's core ops are used (`hvd.init`, `hvd.allreduce`, process
sets); its Keras helpers are written for Keras 2.

Horovod matches collectives by name, so the ranks may reach the layers in
different orders without mixing statistics; a rank that never reaches one
stalls the job. `init_horovod` sets Horovod's stall shutdown so such a job
fails after `SYNCBN_COLLECTIVE_TIMEOUT` seconds instead of hanging forever.
"""

import os

from syncbn.collectives.base import Communicator, collective_timeout_seconds, consecutive_groups

DEFAULT_CYCLE_TIME_MS = 0.1


def _hvd():
    try:
        import horovod.tensorflow as hvd
    except ImportError as error:
        raise RuntimeError(
            "communicator='horovod' needs Horovod built with TensorFlow support "
            f"(`import horovod.tensorflow` failed: {error})."
        ) from error
    if not hvd.is_initialized():
        raise RuntimeError(
            "communicator='horovod' needs Horovod to be initialized: call "
            "`syncbn.init_horovod()` (or `hvd.init()`) at the start of the program."
        )
    return hvd


def process_sets_for(world_size, group_size):
    """The Horovod process sets `group_size` needs: lists of consecutive ranks."""
    if group_size in (None, world_size):
        return []
    return consecutive_groups(world_size, group_size)


def init_horovod(group_size=None):
    """Initializes Horovod with the process sets that `group_size` needs.

    Call it once, on every rank, before the first training step, instead of
    `hvd.init()`. Horovod only accepts static process sets at `init` time
    (dynamic ones need `HOROVOD_DYNAMIC_PROCESS_SETS=1` and a collective call
    on every rank), so layers with `group_size=k` need them declared here.

    It also sets, unless already set, `HOROVOD_STALL_SHUTDOWN_TIME_SECONDS`
    to the collective timeout, so a rank that never joins a collective fails
    the job rather than hanging it, and `HOROVOD_CYCLE_TIME` to 0.1 ms, so
    that the small sequential collectives of sync BN are not each delayed by
    Horovod's default 1 ms cycle.

    Args:
        group_size: the `group_size` your SyncBatchNormalization layers use,
            or None for whole-world synchronization.

    Returns:
        The `horovod.tensorflow` module, initialized.
    """
    import horovod.tensorflow as hvd

    os.environ.setdefault(
        "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(int(collective_timeout_seconds()))
    )
    # Sync BN's collectives are small and sequential: their cost is Horovod's
    # cycle latency (1 ms by default), so a short cycle keeps them cheap.
    os.environ.setdefault("HOROVOD_CYCLE_TIME", str(DEFAULT_CYCLE_TIME_MS))
    if hvd.is_initialized():
        return hvd
    world_size = int(os.environ.get("HOROVOD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
    groups = process_sets_for(world_size, group_size)
    hvd.init(process_sets=[hvd.ProcessSet(ranks) for ranks in groups] or None)
    return hvd


class HorovodCommunicator(Communicator):
    """Sums with `hvd.allreduce(op=hvd.Sum)`, optionally within a process set."""

    name = "horovod"

    def __init__(self, hvd, process_set=None):
        self._hvd = hvd
        self._process_set = process_set

    @property
    def num_replicas(self):
        if self._process_set is None:
            return self._hvd.size()
        return len(self._process_set.ranks)

    def all_sum(self, tensor, name):
        kwargs = {"op": self._hvd.Sum, "name": name.replace("/", "_")}
        if self._process_set is not None:
            kwargs["process_set"] = self._process_set
        return self._hvd.allreduce(tensor, **kwargs)


def _find_process_set(hvd, ranks):
    from horovod.tensorflow.mpi_ops import _basics

    for process_set_id, set_ranks in _basics._get_process_set_ids_and_ranks().items():
        if list(set_ranks) == list(ranks):
            process_set = hvd.ProcessSet(list(ranks))
            process_set.process_set_id = process_set_id
            return process_set
    return None


def horovod_communicator(group_size=None):
    hvd = _hvd()
    world_size = hvd.size()
    groups = process_sets_for(world_size, group_size)
    if not groups:
        return HorovodCommunicator(hvd)
    my_ranks = groups[hvd.rank() // group_size]
    process_set = _find_process_set(hvd, my_ranks)
    if process_set is None:
        raise RuntimeError(
            f"group_size={group_size} needs Horovod process sets of consecutive "
            f"ranks (this rank's: {my_ranks}), and none was declared. Initialize "
            f"Horovod with `syncbn.init_horovod(group_size={group_size})`."
        )
    return HorovodCommunicator(hvd, process_set)
