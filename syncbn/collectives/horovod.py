"""Horovod: NCCL on GPUs, Gloo or MPI on CPUs.

Only Horovod's core ops are used (`hvd.init`, `hvd.allreduce`, process
sets); its Keras helpers are written for Keras 2.

Through `hvd.allreduce`, Horovod matches collectives by name, so the ranks
may reach the layers in different orders without mixing statistics; a rank
that never reaches one stalls the job, and `init_horovod` sets Horovod's
stall shutdown so such a job fails after about `SYNCBN_COLLECTIVE_TIMEOUT`
seconds instead of hanging forever (over Gloo, only with a Horovod whose
stall check is fixed: see `stall_settings`). Over MPI directly (below) the sums behave like the
MPI communicator's: in call order, fingerprinted (ranks at different layers
raise at once) and with the same timeout.

Latency. Sync BN's sums are small and strictly sequential, and each
`hvd.allreduce` waits for Horovod's background cycle (1 ms by default) and
its negotiation. So when Horovod runs on MPI (under `mpirun`, or
`horovodrun` without `--gloo`), the sums bypass Horovod's queue: the MPI
communicator's compiled kernel sums them on an MPI communicator with the
same ranks, microseconds instead of a cycle, while Horovod keeps the gradient
all-reduce. That needs MPI_THREAD_MULTIPLE (Horovod asks for it), mpi4py,
and the kernel (built on first use); every rank must be able to take that
path, or they all use `hvd.allreduce`. `SYNCBN_DIRECT_MPI=0` turns it
off. Under Gloo, where there is no MPI, `init_horovod` shortens Horovod's
cycle to 0.1 ms instead.
"""

import functools
import os

from syncbn.collectives.base import Communicator, collective_timeout_seconds, consecutive_groups

DEFAULT_GLOO_CYCLE_TIME_MS = 0.1


def initialized_horovod(needed_by="communicator='horovod'"):
    """`horovod.tensorflow`, imported and initialized, or a RuntimeError that says what to do.

    Args:
        needed_by: what needs Horovod, for the error message.
    """
    try:
        import horovod.tensorflow as hvd
    except ImportError as error:
        raise RuntimeError(
            f"{needed_by} needs Horovod built with TensorFlow support "
            f"(`import horovod.tensorflow` failed: {error})."
        ) from error
    if not hvd.is_initialized():
        raise RuntimeError(
            f"{needed_by} needs Horovod to be initialized: call `syncbn.init_horovod()` "
            "(or `hvd.init()`) at the start of the program, on every rank."
        )
    return hvd


def process_sets_for(world_size, group_size):
    """The Horovod process sets `group_size` needs: lists of consecutive ranks."""
    if group_size in (None, world_size):
        return []
    return consecutive_groups(world_size, group_size)


def stall_settings(timeout):
    """Horovod's stall check for a collective timeout of `timeout` seconds.

    Horovod's coordinator checks for stalled collectives once per period `P`
    (`HOROVOD_STALL_CHECK_TIME_SECONDS`, an eighth of the timeout, 1 to 10 s;
    it also warns then) and shuts Horovod down when a collective has waited
    longer than `HOROVOD_STALL_SHUTDOWN_TIME_SECONDS`; it ignores a shutdown
    time shorter than the period. A collective found in Horovod's response
    cache (any collective after the first step) is only counted as waiting
    once the cache has given it up, one to two periods after it started, and
    the check that sees the shutdown time passed comes up to a period later.
    So the shutdown time is the timeout minus two periods: the job ends
    between the timeout and the timeout + `P` after the wait began (between
    the timeout - 2 `P` and the timeout - `P` with `HOROVOD_CACHE_CAPACITY=0`).

    Over Gloo, Horovod 0.28.1's stall check never finds a missing rank (its
    Gloo controller reserves, but does not size, the list of ranks the check
    walks), unless Horovod is built with that fixed (docs/faults.md).

    Args:
        timeout: the collective timeout in seconds, a positive number.

    Returns:
        A dict of the two environment variables and their values.

    Example:
        >>> stall_settings(20.0)
        {'HOROVOD_STALL_CHECK_TIME_SECONDS': '2', 'HOROVOD_STALL_SHUTDOWN_TIME_SECONDS': '16'}
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"Argument `timeout` must be a positive number of seconds. "
                         f"Received: timeout={timeout!r}")
    period = max(1, min(10, int(timeout / 8)))
    shutdown = max(period, int(timeout) - 2 * period)
    return {"HOROVOD_STALL_CHECK_TIME_SECONDS": str(period),
            "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": str(shutdown)}


def init_horovod(group_size=None, pin_gpu=True):
    """Initializes Horovod, gives each process its own GPU, and declares `group_size`'s process sets.

    Call it once, on every rank, before the first training step, instead of
    `hvd.init()`. Horovod only accepts static process sets at `init` time
    (dynamic ones need `HOROVOD_DYNAMIC_PROCESS_SETS=1` and a collective call
    on every rank), so layers with `group_size=k` need them declared here.

    It also sets, unless already set, Horovod's stall check from the
    collective timeout (see `stall_settings`), so that a rank that never joins
    a collective ends the job within about the timeout rather than hanging it,
    `HOROVOD_GLOO_TIMEOUT_SECONDS` to the collective timeout (at least 20 s),
    and, when Horovod's controller is Gloo
    (`HOROVOD_CONTROLLER=gloo`, as `horovodrun --gloo` and `syncbn-launch
    --horovod-controller gloo` set), `HOROVOD_CYCLE_TIME` to 0.1 ms, so that
    the small sequential collectives of sync BN are not each delayed by
    Horovod's default 1 ms cycle. On MPI the BN sums bypass Horovod's cycle
    (see the module docstring) and Horovod's default is kept: a 0.1 ms cycle
    keeps Horovod's background thread polling, which costs compute where
    ranks share cores.

    With `pin_gpu` (the default), each process of a host then sees one GPU,
    number `hvd.local_rank()` (modulo the GPUs it sees), with memory growth
    on, as Horovod's own recipes do; a process that sees one GPU or none
    keeps what it sees (see `syncbn.world.pin_gpu`).

    Args:
        group_size: the `group_size` your SyncBatchNormalization layers use,
            or None for whole-world synchronization.
        pin_gpu: give each process one GPU (default True); False leaves
            the devices as they are, for you to choose.

    Returns:
        The `horovod.tensorflow` module, initialized.

    Raises:
        RuntimeError: with `pin_gpu`, if the process sees several GPUs and
            TensorFlow has already initialized them: call `init_horovod`
            before any TensorFlow op.
    """
    import horovod.tensorflow as hvd

    from syncbn import world

    timeout = collective_timeout_seconds()
    # Horovod reads these in its background thread at hvd.init.
    for variable, value in stall_settings(timeout).items():
        os.environ.setdefault(variable, value)
    # Gloo's own deadline for a transfer whose peer went away (a cut network),
    # 30 s by default: the collective timeout instead. It also bounds the wait
    # for the other ranks at hvd.init, hence at least 20 s.
    os.environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", str(max(20, int(timeout))))
    if os.environ.get("HOROVOD_CONTROLLER", "").lower() == "gloo":
        # On Gloo sync BN's small sequential collectives go through Horovod's
        # cycle (1 ms by default), so a short cycle keeps them cheap.
        os.environ.setdefault("HOROVOD_CYCLE_TIME", str(DEFAULT_GLOO_CYCLE_TIME_MS))
    if not hvd.is_initialized():
        launch = world.launch_from_environment(os.environ)
        world_size = launch.size or (world.mpi_world_size() if launch.mpi else 1)
        groups = process_sets_for(world_size, group_size)
        hvd.init(process_sets=[hvd.ProcessSet(ranks) for ranks in groups] or None)
    if pin_gpu:
        world.pin_gpu(hvd.local_rank())
    return hvd


class HorovodCommunicator(Communicator):
    """Sums with `hvd.allreduce(op=hvd.Sum)`, optionally within a process set.

    With `direct` (an `MPICommunicator` over the same ranks), sums go through
    it instead of Horovod's queue.
    """

    name = "horovod"

    def __init__(self, hvd, process_set=None, direct=None):
        self._hvd = hvd
        self._process_set = process_set
        self._direct = direct

    @property
    def num_replicas(self):
        if self._process_set is None:
            return self._hvd.size()
        return len(self._process_set.ranks)

    @property
    def kernel(self):
        """`"mpi-direct"` or `"hvd.allreduce"`: what runs the sum."""
        return "hvd.allreduce" if self._direct is None else "mpi-direct"

    def all_sum(self, tensor, name):
        if self._direct is not None:
            return self._direct.all_sum(tensor, name)
        kwargs = {"op": self._hvd.Sum, "name": name.replace("/", "_")}
        if self._process_set is not None:
            kwargs["process_set"] = self._process_set
        return self._hvd.allreduce(tensor, **kwargs)


@functools.lru_cache(maxsize=None)
def _direct_mpi(group_size):
    """The MPICommunicator that replaces hvd.allreduce for BN sums, or None."""
    hvd = initialized_horovod()
    from syncbn.collectives import mpi

    if not mpi.direct_mpi_wanted() or not hvd.mpi_enabled():
        return None  # the same answer on every rank: no collective needed
    return mpi.direct_mpi_communicator(hvd.size(), hvd.rank(), group_size, "hvd.allreduce")


def _find_process_set(hvd, ranks):
    from horovod.tensorflow.mpi_ops import _basics

    for process_set_id, set_ranks in _basics._get_process_set_ids_and_ranks().items():
        if list(set_ranks) == list(ranks):
            process_set = hvd.ProcessSet(list(ranks))
            process_set.process_set_id = process_set_id
            return process_set
    return None


def horovod_communicator(group_size=None):
    hvd = initialized_horovod()
    world_size = hvd.size()
    groups = process_sets_for(world_size, group_size)
    direct = _direct_mpi(group_size)
    if not groups:
        return HorovodCommunicator(hvd, direct=direct)
    my_ranks = groups[hvd.rank() // group_size]
    process_set = _find_process_set(hvd, my_ranks)
    if process_set is None:
        raise RuntimeError(
            f"group_size={group_size} needs Horovod process sets of consecutive "
            f"ranks (this rank's: {my_ranks}), and none was declared. Initialize "
            f"Horovod with `syncbn.init_horovod(group_size={group_size})`."
        )
    return HorovodCommunicator(hvd, process_set, direct=direct)
