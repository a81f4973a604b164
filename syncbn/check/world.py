"""The job as the check sees it: processes, replicas, and sums across processes.

The check moves data between processes for itself (the global batch for the
references, every replica's results, the verdicts) and must not do that
through the communicator it checks: a communicator that loses a rank's
contribution would then corrupt the references as well and hide its own
fault. So each world sums with its framework's own mechanism:

* `LocalWorld`: one process, one replica, nothing to sum.
* `MPIWorld`: one replica per process; mpi4py's `Allreduce` on COMM_WORLD.
* `HorovodWorld`: one replica per process; `hvd.allreduce(op=hvd.Sum)`.
* `StrategyWorld`: `MultiWorkerMirroredStrategy` (from `TF_CONFIG`) or
  `MirroredStrategy` (this process's devices), any number of replicas per
  process; replica functions run in `strategy.run`, sums are
  `strategy.reduce(SUM)`.

Gathers are sums of one-hot rows: every process writes its rows into a zero
array at its own index and the sum is the concatenation, exactly (adding
zeros rounds nothing).

Nothing here picks a device: tensors go to TensorFlow's default device, a
GPU when the process has one, so the check runs where training would.
"""

import contextlib
import os

import numpy as np

WORLDS = ("local", "mpi", "horovod", "tf.distribute")
# The variables MPI launchers (mpirun, srun) set, as syncbn.collectives reads them.
MPI_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
HOROVOD_VARIABLES = ("HOROVOD_RANK", "HOROVOD_CONTROLLER", "HOROVOD_SIZE")
LOCAL_RANK_VARIABLES = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                        "SLURM_LOCALID")
MAX_STRING_BYTES = 512


def world_from_environment(env):
    """The world a launcher's environment implies, for `--communicator auto`. Pure.

    `TF_CONFIG` means tf.distribute workers; `HOROVOD_*` variables (horovodrun,
    `syncbn-launch --backend horovod`) mean Horovod; an MPI launcher with more
    than one process means MPI; anything else is one local process.

    Example:
        >>> world_from_environment({"OMPI_COMM_WORLD_SIZE": "3"})
        'mpi'
        >>> world_from_environment({"TF_CONFIG": "{}", "OMPI_COMM_WORLD_SIZE": "3"})
        'tf.distribute'
        >>> world_from_environment({})
        'local'
    """
    if env.get("TF_CONFIG"):
        return "tf.distribute"
    if any(variable in env for variable in HOROVOD_VARIABLES):
        return "horovod"
    for variable in MPI_SIZE_VARIABLES:
        try:
            if int(env.get(variable, "0")) > 1:
                return "mpi"
        except ValueError:
            continue
    return "local"


def local_rank_from_environment(env):
    """This process's index among the processes on its host, 0 if no launcher says."""
    for variable in LOCAL_RANK_VARIABLES:
        if env.get(variable, "").isdigit():
            return int(env[variable])
    return 0


def pin_gpu(local_rank):
    """Gives each process one GPU when it sees several, as Horovod's recipe does.

    `syncbn-launch` already hands each rank one GPU (`CUDA_VISIBLE_DEVICES`);
    under `horovodrun`, `mpirun` or `srun` every process may see all of the
    host's GPUs, and without this they would all run on the first. Memory
    growth lets the check share a GPU with nothing reserved up front.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) > 1:
        tf.config.set_visible_devices(gpus[local_rank % len(gpus)], "GPU")
        gpus = [gpus[local_rank % len(gpus)]]
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)


class World:
    """Processes and replicas of the job, and sums that bypass the checked communicator.

    Attributes:
        name: one of `WORLDS`.
        process_rank: this process's index, 0 on the chief.
        num_processes: processes in the job.
        local_replica_ids: global replica ids of this process's replicas, in
            the order `compile`d functions return their results.
        num_replicas: replicas in the job.
    """

    name = None
    process_rank = 0
    num_processes = 1
    strategy = None

    @property
    def local_replica_ids(self):
        return [self.process_rank]

    @property
    def num_replicas(self):
        return self.num_processes

    def scope(self):
        """Where to create layers: the strategy's scope, or nothing."""
        return contextlib.nullcontext()

    def process_sum(self, array):
        """The element-wise float64 sum of `array` over processes."""
        raise NotImplementedError

    def distribute(self, args_by_replica):
        """Turns `{replica id: tuple of arrays}` into this process's arguments for `compile`."""
        import tensorflow as tf

        if not args_by_replica:
            return ()
        return tuple(tf.constant(a) for a in args_by_replica[self.process_rank])

    def compile(self, replica_fn):
        """A `tf.function` running `replica_fn` on every replica of this process.

        `replica_fn` takes tensors and returns a tuple of tensors. The result
        takes `distribute`'s output and returns, per local replica, that tuple.
        """
        import tensorflow as tf

        function = tf.function(replica_fn, autograph=False)
        return lambda args: [tuple(function(*args))]

    def in_replica(self, python_fn):
        """Calls `python_fn` where a layer's call would run (in a replica context)."""
        return python_fn()

    # --- built on process_sum --------------------------------------------------------

    def barrier(self):
        self.process_sum(np.zeros(1))

    def gather_rows(self, rows_by_replica, counts):
        """The concatenation, in replica order, of every replica's `[rows, ...]` array.

        Args:
            rows_by_replica: `{replica id: array}` for this process's replicas;
                replica `r` has `counts[r]` rows.
            counts: rows per replica, for every replica of the job.
        """
        example = next(iter(rows_by_replica.values()))
        padded = np.zeros((len(counts), max(max(counts), 1)) + example.shape[1:])
        for replica, rows in rows_by_replica.items():
            padded[replica, :len(rows)] = rows  # [rows, ...] -> one row of [R, max rows, ...]
        total = self.process_sum(padded)
        return np.concatenate([total[r, :count] for r, count in enumerate(counts)])

    def gather_vectors(self, vector_by_replica):
        """`[R, ...]`: every replica's array of one shape, stacked in replica order."""
        example = next(iter(vector_by_replica.values()))
        stacked = np.zeros((self.num_replicas,) + np.shape(example))
        for replica, vector in vector_by_replica.items():
            stacked[replica] = vector
        return self.process_sum(stacked)

    def gather_per_process(self, array):
        """`[P, ...]`: every process's array of one shape, stacked in process order."""
        stacked = np.zeros((self.num_processes,) + np.shape(array))
        stacked[self.process_rank] = array
        return self.process_sum(stacked)

    def gather_strings(self, text):
        """Every process's `text` (UTF-8, at most 512 bytes), in process order."""
        data = text.encode()[:MAX_STRING_BYTES]
        row = np.zeros(MAX_STRING_BYTES)
        row[:len(data)] = np.frombuffer(data, np.uint8)
        rows = self.gather_per_process(row).astype(np.uint8)
        return [bytes(r).rstrip(b"\0").decode(errors="replace") for r in rows]


class LocalWorld(World):
    """This process alone, one replica."""

    name = "local"

    def __init__(self):
        pin_gpu(0)

    def process_sum(self, array):
        return np.array(array, np.float64)


class MPIWorld(World):
    """One replica per MPI process; the check's own sums are mpi4py `Allreduce`s."""

    name = "mpi"

    def __init__(self):
        from mpi4py import MPI

        self._mpi = MPI
        self._comm = MPI.COMM_WORLD
        self.process_rank = self._comm.Get_rank()
        self.num_processes = self._comm.Get_size()
        local = self._comm.Split_type(MPI.COMM_TYPE_SHARED)
        pin_gpu(local.Get_rank())
        local.Free()

    def process_sum(self, array):
        send = np.ascontiguousarray(array, np.float64)
        received = np.empty_like(send)
        self._comm.Allreduce(send, received, op=self._mpi.SUM)
        return received


class HorovodWorld(World):
    """One replica per Horovod process, set up by `syncbn.init_horovod()`."""

    name = "horovod"

    def __init__(self):
        from syncbn.collectives.horovod import init_horovod

        self.hvd = init_horovod()
        self.process_rank = self.hvd.rank()
        self.num_processes = self.hvd.size()
        pin_gpu(self.hvd.local_rank())
        self._sums = 0

    def process_sum(self, array):
        import tensorflow as tf

        # Horovod matches collectives by name: every process numbers its sums alike.
        self._sums += 1
        summed = self.hvd.allreduce(tf.constant(np.asarray(array, np.float64)),
                                    op=self.hvd.Sum, name=f"syncbn_check_{self._sums}")
        return summed.numpy()


class StrategyWorld(World):
    """tf.distribute: MultiWorkerMirroredStrategy with `TF_CONFIG`, else MirroredStrategy."""

    name = "tf.distribute"

    def __init__(self, env, strategy=None):
        """Creates the strategy, or adopts `strategy` (a MirroredStrategy, e.g. in tests)."""
        import tensorflow as tf

        # Each worker's strategy uses every GPU the worker sees (syncbn-launch gives
        # each one its own); collective ops must be configured before any op runs.
        if strategy is not None:
            self.strategy = strategy
        elif env.get("TF_CONFIG"):
            self.strategy = tf.distribute.MultiWorkerMirroredStrategy()
            resolver = self.strategy.cluster_resolver
            spec = resolver.cluster_spec().as_dict()
            tasks = [(kind, index) for kind in ("chief", "worker")
                     for index in range(len(spec.get(kind, [])))]
            self.process_rank = tasks.index((resolver.task_type, resolver.task_id))
            self.num_processes = len(tasks)
        else:
            self.strategy = tf.distribute.MirroredStrategy()
        per_replica = self.strategy.run(
            lambda: tf.distribute.get_replica_context().replica_id_in_sync_group)
        self._local_ids = [int(i) for i in self.strategy.experimental_local_results(per_replica)]

    @property
    def local_replica_ids(self):
        return list(self._local_ids)

    @property
    def num_replicas(self):
        return self.strategy.num_replicas_in_sync

    def scope(self):
        return self.strategy.scope()

    def process_sum(self, array):
        import tensorflow as tf

        array = np.asarray(array, np.float64)
        first = self._local_ids[0]  # one replica per process contributes the process's array
        values = self.strategy.experimental_distribute_values_from_function(
            lambda context: tf.constant(
                array if context.replica_id_in_sync_group == first else np.zeros_like(array)))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None).numpy()

    def distribute(self, args_by_replica):
        import tensorflow as tf

        if not args_by_replica:
            return ()
        num_args = len(args_by_replica[self._local_ids[0]])

        def argument(index):
            return self.strategy.experimental_distribute_values_from_function(
                lambda context: tf.constant(args_by_replica[context.replica_id_in_sync_group][index]))

        return tuple(argument(i) for i in range(num_args))

    def compile(self, replica_fn):
        import tensorflow as tf

        function = tf.function(lambda *args: self.strategy.run(replica_fn, args=args),
                               autograph=False)

        def call(args):
            per_output = [self.strategy.experimental_local_results(o) for o in function(*args)]
            return [tuple(o[k] for o in per_output) for k in range(len(self._local_ids))]

        return call

    def in_replica(self, python_fn):
        import tensorflow as tf

        results = []

        def replica_fn():
            results.append(python_fn())
            return tf.constant(0)

        self.strategy.run(replica_fn)
        return results[0]


def create_world(name, env=None):
    """The world `name` (one of `WORLDS`), set up from the launcher's environment."""
    env = os.environ if env is None else env
    if name == "local":
        return LocalWorld()
    if name == "mpi":
        return MPIWorld()
    if name == "horovod":
        return HorovodWorld()
    if name == "tf.distribute":
        return StrategyWorld(env)
    raise ValueError(f"Argument `name` must be one of {WORLDS}. Received: name={name!r}")
