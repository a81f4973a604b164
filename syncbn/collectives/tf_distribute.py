"""tf.distribute: all-reduce inside a strategy's replica function.

Works with MirroredStrategy (several devices in one process; NCCL on GPUs),
MultiWorkerMirroredStrategy (ring or NCCL collectives across processes) and
TPUStrategy. It must be called inside `strategy.run` (which `model.fit` does
for you); the replica context is looked up at call time.

Latency. On CPUs, MultiWorkerMirroredStrategy's collectives travel over gRPC,
about 0.7 ms each on one machine, and sync BN makes 2 sequential ones per
layer. When the workers run under an MPI launcher (`syncbn-launch --backend
tf` does that when mpirun and mpi4py are there) with one replica each, in
task order, the BN sums go over MPI directly instead (the MPI communicator's
compiled kernel, microseconds), while the strategy keeps the gradient
all-reduce. As with Horovod, every rank must be able to, or none does, and
`SYNCBN_DIRECT_MPI=0` turns it off.
"""

import functools
import os
import zlib

import tensorflow as tf

from syncbn.collectives.base import Communicator, collective_timeout_seconds, consecutive_groups


def _replica_context():
    context = tf.distribute.get_replica_context()
    if not tf.distribute.has_strategy():
        raise RuntimeError(
            "communicator='tf.distribute' needs an active tf.distribute strategy: "
            "create the model under `strategy.scope()` and call it in "
            "`strategy.run(...)` or `model.fit`. No strategy is active."
        )
    if context is None:
        raise RuntimeError(
            "communicator='tf.distribute' needs a tf.distribute replica context: "
            "call the layer inside `strategy.run(...)` or `model.fit` under "
            "`strategy.scope()`. It was called in a cross-replica context."
        )
    return context


class TFDistributeCommunicator(Communicator):
    """Sums over the replicas of the current tf.distribute strategy.

    With `group_size`, replica `r` syncs with the replicas
    `[r // group_size * group_size, ...)`. tf.distribute has no sub-group
    all-reduce, so each replica writes its vector into its own row of a
    `[num_replicas, D]` zero matrix, one all-reduce sums the matrix, and each
    replica adds the rows of its group. BN statistics are a few kB, so the
    `num_replicas`-fold payload costs latency-bound collectives nothing
    measurable at the group sizes where groups make sense.
    """

    name = "tf.distribute"

    def __init__(self, group_size=None, direct_mpi=True):
        context = _replica_context()
        self._world_size = context.num_replicas_in_sync
        consecutive_groups(self._world_size, group_size)  # validates
        self._group_size = group_size if group_size not in (None, self._world_size) else None
        self._direct = _direct_mpi(group_size, self._world_size) if direct_mpi else None
        # Replicas in one process (MirroredStrategy) run one traced function:
        # they cannot reach different call sites, nor can one of them be
        # missing while the others wait. Workers can do both, so between
        # workers every sum carries the call site's fingerprint and a timeout.
        # In one process neither is paid for: the timeout alone costs 0.3-0.7
        # ms per collective on CPUs (bench/model_step.py --mirrored 2).
        self._across_workers = _multi_worker_strategy() is not None

    @property
    def num_replicas(self):
        return self._group_size or self._world_size

    @property
    def kernel(self):
        """`"mpi-direct"` or `"tf.distribute"`: what runs the sum."""
        return "tf.distribute" if self._direct is None else "mpi-direct"

    def all_sum(self, tensor, name):
        if self._direct is not None:
            return self._direct.all_sum(tensor, name)
        if not self._across_workers:
            return self._sum_packed(tensor)
        # tf.distribute matches collectives by program order, not by name, so a
        # worker at another layer with the same shape would be summed in
        # silently: the call site's fingerprint rides along. A
        # different shape or dtype already fails in the collective itself,
        # whose error names this layer's node.
        fingerprint = _fingerprint(name, tensor.dtype)
        # [D] + [2] -> [D + 2]: the fingerprint and its square follow the statistics.
        packed = tf.concat([tf.reshape(tensor, [-1]),
                            tf.constant([fingerprint, fingerprint**2], tensor.dtype)], 0)
        summed = self._sum_packed(packed)
        replicas = self.num_replicas
        expected = [replicas * fingerprint, replicas * fingerprint**2]
        agreed = tf.reduce_all(tf.equal(summed[-2:], tf.constant(expected, tensor.dtype)))
        check = tf.debugging.Assert(agreed, [
            f"syncbn: replicas disagree at a sync BN collective: this replica is at '{name}' "
            f"(fingerprint {fingerprint:g}), but the fingerprint and its square summed over "
            f"the {replicas} replicas are", summed[-2:], f"instead of {expected}: another "
            "replica is at another layer. Every replica must call the same "
            "SyncBatchNormalization layers in the same order."])
        with tf.control_dependencies([check]):
            return tf.reshape(summed[:-2], tf.shape(tensor))

    def _sum_packed(self, packed):
        """The strategy's all-reduce of `packed` ([D]) over this replica's group."""
        context = _replica_context()
        options = None
        if self._across_workers:
            options = tf.distribute.experimental.CommunicationOptions(
                timeout_seconds=collective_timeout_seconds()
            )
        if self._group_size is None:
            return context.all_reduce(tf.distribute.ReduceOp.SUM, packed, options=options)
        replica_id = tf.cast(context.replica_id_in_sync_group, tf.int32)
        rows = tf.one_hot(replica_id, self._world_size, dtype=packed.dtype)
        # [D] -> [R, D]: this replica's vector in its own row.
        scattered = rows[:, None] * packed[None, :]
        gathered = context.all_reduce(tf.distribute.ReduceOp.SUM, scattered, options=options)
        group_start = replica_id // self._group_size * self._group_size
        group_rows = tf.slice(gathered, [group_start, 0], [self._group_size, -1])
        return tf.reduce_sum(group_rows, axis=0)


def _fingerprint(name, dtype):
    """A small integer for the call site, whose square summed over replicas stays exact.

    1..1024 for float32 and narrower (1024**2 * 16 replicas = 2**24), 1..2**20 for
    float64 (exact up to 2**13 replicas).
    """
    bits = 20 if dtype == tf.float64 else 10
    return float(zlib.crc32(name.encode()) % (1 << bits) + 1)


def _direct_mpi(group_size, num_replicas):
    """The MPICommunicator that replaces the strategy's all-reduce, or None."""
    from syncbn import world
    from syncbn.collectives import mpi

    launch = world.launch_from_environment(os.environ)
    if (num_replicas < 2 or not launch.mpi or launch.size != num_replicas
            or not mpi.direct_mpi_wanted()):
        return None  # the same answer on every rank: no collective needed
    strategy = tf.distribute.get_strategy()
    if len(getattr(strategy.extended, "worker_devices", ())) != 1:
        return None  # several replicas per process: MPI ranks are not replicas
    resolver = getattr(strategy, "cluster_resolver", None)
    task_id = getattr(resolver, "task_id", None)
    return _direct_mpi_for_task(group_size, num_replicas, -1 if task_id is None else task_id)


@functools.lru_cache(maxsize=None)
def _direct_mpi_for_task(group_size, num_replicas, task_id):
    from syncbn.collectives import mpi

    return mpi.direct_mpi_communicator(num_replicas, task_id, group_size,
                                       "tf.distribute's all-reduce")


def _multi_worker_strategy():
    """The current MultiWorkerMirroredStrategy when it spans several workers, else None."""
    if not tf.distribute.has_strategy():
        return None
    strategy = tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None
    local_replicas = len(strategy.extended.worker_devices)
    return strategy if strategy.num_replicas_in_sync > local_replicas else None


def check_build_agreement(layer_name, num_channels, dtype):
    """Raises on every worker if workers build a layer with different channels or dtype.

    Under MultiWorkerMirroredStrategy every variable's initial value is broadcast
    from worker 0 as it is created; with different shapes that broadcast fails with
    TensorFlow's `Shape mismatch in the collective instance ...`, which names no
    variable. So before its weights exist, a layer built in the
    strategy's cross-replica context exchanges a header of 3 int64 per replica
    (a fingerprint of the layer's name, its channel count, its dtype) in one
    all-gather, bounded by `SYNCBN_COLLECTIVE_TIMEOUT`, and every worker raises
    the same kind of error, naming the layer and both sides. Once per build, never
    per step. Elsewhere (one worker, MirroredStrategy, Horovod, MPI, or a build
    inside a replica function) it does nothing: the sync BN collectives' own
    checks catch a mismatch at the first step.

    Args:
        layer_name: the layer's name.
        num_channels: its number of channels.
        dtype: its variables' dtype.

    Raises:
        ValueError: if any replica's header differs from this one's.
    """
    if not tf.distribute.has_strategy() or not tf.distribute.in_cross_replica_context():
        return
    with tf.init_scope():
        strategy = _multi_worker_strategy()
        if strategy is None:
            return
        dtype = tf.as_dtype(dtype)
        header = tf.constant([[_layer_fingerprint(layer_name), num_channels,
                               dtype.as_datatype_enum]], tf.int64)
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=collective_timeout_seconds())

        def gather():
            context = tf.distribute.get_replica_context()
            return context.all_gather(header, axis=0, options=options)  # [1, 3] -> [R, 3]

        headers = strategy.experimental_local_results(strategy.run(gather))[0].numpy()
        task_id = strategy.cluster_resolver.task_id
        local_replicas = len(strategy.extended.worker_devices)
        message = build_mismatch_message(layer_name, header.numpy()[0], headers, task_id,
                                         local_replicas)
    if message is not None:
        raise ValueError(message)


def _layer_fingerprint(layer_name):
    return zlib.crc32(layer_name.encode())


def build_mismatch_message(layer_name, own, headers, task_id, local_replicas=1):
    """The error for workers whose build headers differ from this worker's, or None.

    Args:
        layer_name: this worker's layer.
        own: this worker's header, `[name fingerprint, channels, dtype enum]`.
        headers: `[num_replicas, 3]`, every replica's header, in replica order
            (`local_replicas` consecutive replicas per worker).
        task_id: this worker's index.
        local_replicas: replicas per worker.

    Example:
        >>> import numpy as np
        >>> print(build_mismatch_message("bn_a", [7, 4, 1], np.array([[7, 8, 1], [7, 4, 1]]), 1))
        ... # doctest: +NORMALIZE_WHITESPACE
        syncbn: workers disagree when building SyncBatchNormalization layer 'bn_a': this worker
        (rank 1) has 4 channels of float32; rank 0 has 8 channels of float32. Every worker must
        build the same SyncBatchNormalization layers, in the same order, with the same number
        of channels and dtype.
    """
    own = [int(v) for v in own]
    differing = {}
    for replica, header in enumerate(headers):
        header = [int(v) for v in header]
        if header != own:
            differing.setdefault(replica // local_replicas, header)
    if not differing:
        return None

    def describe(header, name):
        fingerprint, channels, dtype_enum = header
        where = "" if fingerprint == own[0] else (
            f" at another layer (name fingerprint {fingerprint:08x}, not '{name}')")
        return f"has {channels} channels of {tf.as_dtype(dtype_enum).name}{where}"

    others = "; ".join(f"rank {worker} {describe(header, layer_name)}"
                       for worker, header in sorted(differing.items())[:4])
    if len(differing) > 4:
        others += f"; and {len(differing) - 4} more"
    return (f"syncbn: workers disagree when building SyncBatchNormalization layer "
            f"'{layer_name}': this worker (rank {task_id}) {describe(own, layer_name)}; "
            f"{others}. Every worker must build the same SyncBatchNormalization layers, in "
            "the same order, with the same number of channels and dtype.")
