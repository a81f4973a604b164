"""Who this process is in its job, and how to sum across the job's processes.

The one place that reads a launcher's variables and asks the frameworks; the
layer's `communicator="auto"`, `syncbn.check`, the Horovod glue, `bench/`
and the test jobs all use it.

* `launch_from_environment(env)`: what the launcher's variables say, with no
  import: which launcher, how many processes, this one's rank and local
  rank, and whether MPI can form their world.
* `detect()`: the communicator `"auto"` picks here and now. A process that
  a launcher started as one of several, but that finds no world to sum in
  (Horovod not initialized under horovodrun's Gloo, no strategy under
  `TF_CONFIG`, srun without `--mpi=pmix`), raises `LauncherWorldError`
  rather than normalize with its own batch alone.
* `process_rank()`, `is_chief()`, `pin_gpu(local_rank)`.
* `World`: the job's processes and replicas, and sums and gathers across
  processes through each framework's own mechanism (mpi4py, Horovod,
  tf.distribute), never through a syncbn communicator: `syncbn.check` checks
  those communicators with them.
"""

import contextlib
import dataclasses
import json
import os
import sys

import numpy as np

WORLDS = ("local", "mpi", "horovod", "tf.distribute")
MAX_STRING_BYTES = 512


class LauncherWorldError(RuntimeError):
    """A launcher started several processes, but this one finds itself alone."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """What the launcher's environment variables say about this process.

    Attributes:
        launcher: `"mpirun"`, `"srun"`, `"PMI"` (another PMI launcher, such
            as MPICH's `mpiexec`), `"horovodrun"` (Horovod's Gloo
            rendezvous: horovodrun, `syncbn-launch`), `"TF_CONFIG"`
            (tf.distribute workers) or `"none"`.
        evidence: the variable that says so, as `NAME=value`, or `""`.
        size: processes the launcher started; 0 when only MPI knows.
        rank: this process's index among them.
        local_rank: its index among them on this host.
        mpi: True if MPI can join them in one world (`MPI_Init` finds them).
    """

    launcher: str = "none"
    evidence: str = ""
    size: int = 1
    rank: int = 0
    local_rank: int = 0
    mpi: bool = False


def _int(env, name, default=0):
    try:
        return int(env.get(name, default))
    except (TypeError, ValueError):
        return default


def _local_rank(env, *names):
    for name in (*names, "LOCAL_RANK", "SLURM_LOCALID"):
        if env.get(name, "").isdigit():
            return int(env[name])
    return 0


def _tf_config_tasks(env):
    """`(tasks, this task's index)`: the chief and workers of `TF_CONFIG`, chief first."""
    try:
        config = json.loads(env.get("TF_CONFIG") or "{}")
        cluster, task = config.get("cluster", {}), config.get("task", {})
        tasks = [(kind, i) for kind in ("chief", "worker") for i in range(len(cluster.get(kind, [])))]
        this = (task.get("type"), int(task.get("index", 0)))
    except (ValueError, TypeError, AttributeError):
        return 0, 0
    return len(tasks), tasks.index(this) if this in tasks else 0


def launch_from_environment(env):
    """The `Launch` a launcher's variables describe. Pure.

    Read in this order: Open MPI's `OMPI_COMM_WORLD_*` (mpirun, horovodrun
    over MPI); PMI's `PMI_SIZE`/`PMI_RANK` (srun `--mpi=pmi2`, MPICH);
    PMIx's `PMIX_RANK` (srun `--mpi=pmix`, which sets no size: Slurm's
    `SLURM_STEP_NUM_TASKS` gives it); Horovod's Gloo `HOROVOD_SIZE`;
    `TF_CONFIG`; and last Slurm's `SLURM_STEP_NUM_TASKS` alone, a step of
    several tasks that MPI cannot join (srun `--mpi=none`). A batch script's
    own process is no such step.

    Example:
        >>> launch_from_environment({"OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_RANK": "1"})
        Launch(launcher='mpirun', evidence='OMPI_COMM_WORLD_SIZE=3', size=3, rank=1, local_rank=0, mpi=True)
        >>> launch_from_environment({"PMIX_RANK": "0", "SLURM_STEP_NUM_TASKS": "4",
        ...                          "SLURM_STEP_ID": "0"}).size
        4
        >>> launch_from_environment({"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}).mpi
        False
        >>> launch_from_environment({})
        Launch(launcher='none', evidence='', size=1, rank=0, local_rank=0, mpi=False)
    """
    slurm = "SLURM_STEP_ID" in env or "SLURM_STEP_NUM_TASKS" in env
    if "OMPI_COMM_WORLD_SIZE" in env:
        return Launch("mpirun", f"OMPI_COMM_WORLD_SIZE={env['OMPI_COMM_WORLD_SIZE']}",
                      _int(env, "OMPI_COMM_WORLD_SIZE", 1), _int(env, "OMPI_COMM_WORLD_RANK"),
                      _local_rank(env, "OMPI_COMM_WORLD_LOCAL_RANK"), mpi=True)
    if "PMI_SIZE" in env:
        return Launch("srun" if slurm else "PMI", f"PMI_SIZE={env['PMI_SIZE']}",
                      _int(env, "PMI_SIZE", 1), _int(env, "PMI_RANK"),
                      _local_rank(env, "MPI_LOCALRANKID"), mpi=True)
    if "PMIX_RANK" in env:
        size = _int(env, "SLURM_STEP_NUM_TASKS") if slurm else 0
        return Launch("srun" if slurm else "PMI", f"PMIX_RANK={env['PMIX_RANK']}", size,
                      _int(env, "PMIX_RANK"), _local_rank(env), mpi=True)
    if "HOROVOD_SIZE" in env:
        return Launch("horovodrun", f"HOROVOD_SIZE={env['HOROVOD_SIZE']}",
                      _int(env, "HOROVOD_SIZE", 1), _int(env, "HOROVOD_RANK"),
                      _local_rank(env, "HOROVOD_LOCAL_RANK"))
    tasks, index = _tf_config_tasks(env)
    if tasks:
        return Launch("TF_CONFIG", f"TF_CONFIG with {tasks} tasks", tasks, index, _local_rank(env))
    if _int(env, "SLURM_STEP_NUM_TASKS", 1) > 1:
        return Launch("srun", f"SLURM_STEP_NUM_TASKS={env['SLURM_STEP_NUM_TASKS']}",
                      _int(env, "SLURM_STEP_NUM_TASKS", 1), _int(env, "SLURM_PROCID"),
                      _local_rank(env))
    return Launch()


_FIXES = {
    "horovodrun": "initialize Horovod on every rank before the first training step: "
                  "`syncbn.init_horovod()` (or `hvd.init()`)",
    "TF_CONFIG": "build and train the model under `tf.distribute.MultiWorkerMirroredStrategy()` "
                 "(its `scope()`, and `model.fit` or `strategy.run`)",
    "srun": "start the step with MPI's process management, e.g. `srun --mpi=pmix` "
            "(`srun --mpi=list` shows what this cluster offers), and install mpi4py",
}


def mpi_world_error(launch, world_size):
    """The `LauncherWorldError` for an MPI world that is not the launcher's, or None. Pure.

    mpirun or srun started `launch.size` processes, but `MPI_Init` gave this
    one a `MPI_COMM_WORLD` of `world_size`: its MPI library is not the one
    that the launcher speaks to (mpi4py built against another MPI, or the
    launcher's variables cleared), and each process is a world of its own.
    `world_size` 0 means mpi4py is missing, which the MPI communicator
    reports itself.

    Example:
        >>> launch = launch_from_environment({"OMPI_COMM_WORLD_SIZE": "2"})
        >>> mpi_world_error(launch, 2) is None, mpi_world_error(launch, 0) is None
        (True, True)
        >>> print(mpi_world_error(launch, 1))  # doctest: +ELLIPSIS
        syncbn: mpirun started 2 processes (OMPI_COMM_WORLD_SIZE=2), but MPI_COMM_WORLD here has 1 ...
    """
    if not launch.mpi or launch.size < 1 or world_size in (0, launch.size):
        return None
    return LauncherWorldError(
        f"syncbn: {launch.launcher} started {launch.size} processes ({launch.evidence}), but "
        f"MPI_COMM_WORLD here has {world_size} (this is rank {launch.rank}): the MPI library "
        "that mpi4py loads is not the one of the launcher, so each process would sum batch "
        "statistics with itself alone. To synchronize, build mpi4py against the launcher's "
        "MPI (`pip install --no-binary=mpi4py mpi4py` with that MPI's `mpicc` on PATH; "
        "`python -m mpi4py --mpi-library` shows which library it loads), or start the job "
        "with the launcher of the MPI that mpi4py uses.")


def check_mpi_world(env=None):
    """Raises `mpi_world_error`'s error if MPI's world is not the launcher's (initializes MPI)."""
    launch = launch_from_environment(os.environ if env is None else env)
    if launch.mpi and launch.size > 1:
        error = mpi_world_error(launch, mpi_world_size())
        if error is not None:
            raise error


def launcher_world_error(launch):
    """The `LauncherWorldError` for a process of `launch` that finds itself alone."""
    fix = _FIXES.get(launch.launcher, "start it so that MPI (mpi4py) can join the processes")
    return LauncherWorldError(
        f"syncbn: {launch.launcher} started {launch.size or 'several'} processes "
        f"({launch.evidence}), but this one (rank {launch.rank}) finds no world to "
        "synchronize batch statistics in, and would normalize with its own batch alone. "
        f"To synchronize, {fix}. To normalize each process's batch on its own on purpose, "
        "pass `communicator=\"local\"`.")


def _tf_distribute_replicas():
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    return 0 if context is None else context.num_replicas_in_sync


def _horovod():
    """`horovod.tensorflow` if it is imported and initialized, else None."""
    hvd = sys.modules.get("horovod.tensorflow")
    try:
        return hvd if hvd is not None and hvd.is_initialized() else None
    except ValueError:
        return None


def mpi_world_size():
    """`MPI_COMM_WORLD`'s size, initializing MPI (through mpi4py) if needed; 0 without mpi4py."""
    try:
        from mpi4py import MPI
    except ImportError:
        return 0
    return MPI.COMM_WORLD.Get_size()


def detect(env=None):
    """The communicator `"auto"` picks here and now.

    The first that applies: a tf.distribute replica context with more than
    one replica in sync; Horovod initialized with more than one process; a
    launcher's MPI world of more than one process; else `"local"`.

    Raises:
        LauncherWorldError: when that leaves `"local"` in a process that a
            launcher started as one of several (see `launch_from_environment`),
            or when MPI's world is smaller than the launcher's
            (`mpi_world_error`): it names the variable that showed the
            launcher and the fix.
    """
    if _tf_distribute_replicas() > 1:
        return "tf.distribute"
    hvd = _horovod()
    if hvd is not None and hvd.size() > 1:
        return "horovod"
    launch = launch_from_environment(os.environ if env is None else env)
    if launch.mpi and launch.size > 1:
        check_mpi_world(env)
        return "mpi"
    if launch.mpi and launch.size == 0 and mpi_world_size() > 1:
        return "mpi"
    if launch.size > 1 or launch.size == 0:
        raise launcher_world_error(launch)
    return "local"


def several_processes(env=None):
    """True if this process sums with others: Horovod's world, or a launcher's, has more than one.

    No import and no MPI call: it answers before the first training step (for
    Keras's `supports_jit`, read when a model is compiled).
    """
    hvd = _horovod()
    if hvd is not None and hvd.size() > 1:
        return True
    return launch_from_environment(os.environ if env is None else env).size != 1


def _strategy_tasks(resolver):
    """The chief and workers of a cluster resolver's spec, chief first: the job's processes."""
    spec = resolver.cluster_spec().as_dict()
    return [(kind, i) for kind in ("chief", "worker") for i in range(len(spec.get(kind, [])))]


def process_rank(strategy=None):
    """This process's rank in its job: 0 for the chief.

    A multi-worker strategy's task (chief first, then the workers), else
    Horovod's rank once initialized, else the launcher's variables.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    task = (getattr(resolver, "task_type", None), getattr(resolver, "task_id", None))
    if task[0] is not None and task in _strategy_tasks(resolver):
        return _strategy_tasks(resolver).index(task)
    hvd = _horovod()
    if hvd is not None:
        return hvd.rank()
    return launch_from_environment(os.environ).rank


def is_chief(strategy=None):
    """True on the one process that prints, logs and saves: rank 0 (see `process_rank`)."""
    return process_rank(strategy) == 0


def pin_gpu(local_rank):
    """Gives this process one GPU when it sees several, as Horovod's recipe does.

    Under `horovodrun`, `mpirun` or `srun` every process of a host may see
    all of the host's GPUs, and without this they would all run on the
    first. Process `local_rank` gets GPU `local_rank % count`; memory growth
    lets processes share a GPU with nothing reserved up front. A process
    that sees one GPU or none keeps what it sees (`syncbn-launch` already
    gives each rank its own through `CUDA_VISIBLE_DEVICES`).

    Raises:
        RuntimeError: when the process sees several GPUs but TensorFlow has
            already initialized them (call this before any TensorFlow op).
    """
    import tensorflow as tf

    gpus = tf.config.get_visible_devices("GPU")
    if len(gpus) > 1:
        try:
            tf.config.set_visible_devices(gpus[local_rank % len(gpus)], "GPU")
        except RuntimeError as error:
            raise RuntimeError(
                f"syncbn: cannot give process {local_rank} of this host its own GPU: "
                f"TensorFlow has already initialized all {len(gpus)} ({error}). Pin before "
                "the first TensorFlow op, or pass `pin_gpu=False` and choose the devices "
                "yourself.") from error
        gpus = [gpus[local_rank % len(gpus)]]
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass  # already initialized (pinned before): its memory setting stays


class World:
    """Processes and replicas of the job, and sums across processes.

    Attributes:
        name: one of `WORLDS`.
        process_rank: this process's index, 0 on the chief.
        num_processes: processes in the job.
        local_replica_ids: global replica ids of this process's replicas, in
            the order `compile`d functions return their results.
        num_replicas: replicas in the job.
        strategy: the tf.distribute strategy, or None.
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

    @property
    def is_chief(self):
        return self.process_rank == 0

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

    # Built on process_sum. Gathers are sums of one-hot rows: every process
    # writes its rows into a zero array at its own index, and the sum is the
    # concatenation, exactly (adding zeros rounds nothing).

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

    def __init__(self, pin=True):
        if pin:
            pin_gpu(0)

    def process_sum(self, array):
        return np.array(array, np.float64)


class MPIWorld(World):
    """One replica per MPI process; sums are mpi4py `Allreduce`s on `comm` (COMM_WORLD)."""

    name = "mpi"

    def __init__(self, pin=True):
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = MPI.COMM_WORLD
        self.process_rank = self.comm.Get_rank()
        self.num_processes = self.comm.Get_size()
        if pin:
            local = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
            pin_gpu(local.Get_rank())
            local.Free()

    def process_sum(self, array):
        send = np.ascontiguousarray(array, np.float64)
        received = np.empty_like(send)
        self.comm.Allreduce(send, received, op=self._mpi.SUM)
        return received


class HorovodWorld(World):
    """One replica per Horovod process, set up by `syncbn.init_horovod()` (`hvd`)."""

    name = "horovod"

    def __init__(self, pin=True, group_size=None):
        from syncbn.collectives.horovod import init_horovod

        self.hvd = init_horovod(group_size=group_size, pin_gpu=pin)
        self.process_rank = self.hvd.rank()
        self.num_processes = self.hvd.size()
        self._sums = 0

    def process_sum(self, array):
        import tensorflow as tf

        # Horovod matches collectives by name: every process numbers its sums alike.
        self._sums += 1
        summed = self.hvd.allreduce(tf.constant(np.asarray(array, np.float64)),
                                    op=self.hvd.Sum, name=f"syncbn_world_sum_{self._sums}")
        return summed.numpy()


class StrategyWorld(World):
    """tf.distribute: MultiWorkerMirroredStrategy with `TF_CONFIG`, else MirroredStrategy."""

    name = "tf.distribute"

    def __init__(self, env=None, strategy=None):
        """Creates the strategy, or adopts `strategy` (a MirroredStrategy, e.g. in tests)."""
        import tensorflow as tf

        env = os.environ if env is None else env
        # Each worker's strategy uses every GPU the worker sees (syncbn-launch gives
        # each one its own); collective ops must be configured before any op runs.
        if strategy is not None:
            self.strategy = strategy
        elif env.get("TF_CONFIG"):
            self.strategy = tf.distribute.MultiWorkerMirroredStrategy()
            self.process_rank = process_rank(self.strategy)
            self.num_processes = len(_strategy_tasks(self.strategy.cluster_resolver))
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


def world_name_from_environment(env):
    """The world a launcher's environment implies. Pure.

    `TF_CONFIG` means tf.distribute workers; Horovod's variables (horovodrun,
    `syncbn-launch --backend horovod`) mean Horovod; an MPI launcher (mpirun,
    srun with PMI) means MPI; anything else is one local process.

    Example:
        >>> world_name_from_environment({"OMPI_COMM_WORLD_SIZE": "3"})
        'mpi'
        >>> world_name_from_environment({"TF_CONFIG": "{}", "OMPI_COMM_WORLD_SIZE": "3"})
        'tf.distribute'
        >>> world_name_from_environment({"PMIX_RANK": "1", "SLURM_STEP_NUM_TASKS": "2"})
        'mpi'
        >>> world_name_from_environment({})
        'local'
    """
    if env.get("TF_CONFIG"):
        return "tf.distribute"
    if any(name in env for name in ("HOROVOD_RANK", "HOROVOD_CONTROLLER", "HOROVOD_SIZE")):
        return "horovod"
    launch = launch_from_environment(env)
    return "mpi" if launch.mpi and launch.size != 1 else "local"


def create_world(name=None, env=None, pin=True, **kwargs):
    """The world `name` (one of `WORLDS`; None: from the environment), set up.

    Args:
        name: one of `WORLDS`, or None for `world_name_from_environment`.
        env: the environment to read (default `os.environ`).
        pin: give this process its own GPU (`pin_gpu`), as training would.
        **kwargs: `group_size` for Horovod, `strategy` for tf.distribute.
    """
    env = os.environ if env is None else env
    name = world_name_from_environment(env) if name is None else name
    if name == "local":
        return LocalWorld(pin)
    if name == "mpi":
        return MPIWorld(pin)
    if name == "horovod":
        return HorovodWorld(pin, **kwargs)
    if name == "tf.distribute":
        return StrategyWorld(env, **kwargs)
    raise ValueError(f"Argument `name` must be one of {WORLDS}. Received: name={name!r}")
