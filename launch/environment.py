"""Each rank's environment, built by pure functions (no processes, no os.environ reads).

Backends add their own variables (`HOROVOD_*`, `TF_CONFIG`) with the helpers
below; `build_rank_env` adds what every rank gets:

- `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `CROSS_RANK`, `CROSS_SIZE`.
- `PYTHONUNBUFFERED=1`, so output reaches the launcher line by line.
- CPU only: `TF_NUM_INTRAOP_THREADS`, `TF_NUM_INTEROP_THREADS`, `OMP_NUM_THREADS`,
  the machine's cores divided among the ranks that share them (2 ranks on 2 cores get
  1 thread each instead of 2 x 2). TensorFlow 2.18 reads both `TF_NUM_*` variables
  when it creates its thread pools (`tf.config.threading.get_*` still report 0,
  "chosen by the runtime", but the pools shrink). A value already in the launcher's
  environment wins.
- GPU: one GPU per rank through `CUDA_VISIBLE_DEVICES`.
- `SYNCBN_ERROR_FILE`: where the rank writes its error record if it fails
  (`syncbn.error_file`), `rank.<N>.json` in the launcher's job directory, and
  `SYNCBN_ERROR_FILE_OWNER` empty: the record is for the rank's first process
  that imports syncbn to claim, even when the launcher runs inside a rank.
"""

import json
import os

THREAD_VARIABLES = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")


def threads_per_rank(cpus, ranks_sharing_cpus):
    """Returns `(intra_op, inter_op)` thread counts for one of `ranks_sharing_cpus` ranks.

    Example:
        >>> threads_per_rank(2, 2), threads_per_rank(16, 2)
        ((1, 1), (8, 4))
    """
    per_rank = max(1, cpus // max(1, ranks_sharing_cpus))
    return per_rank, max(1, per_rank // 2)


ERROR_FILE_VARIABLE = "SYNCBN_ERROR_FILE"  # read by syncbn.error_file
ERROR_FILE_OWNER_VARIABLE = "SYNCBN_ERROR_FILE_OWNER"


def error_file_path(directory, rank):
    """The error file of `rank` in the launcher's job directory `directory`.

    Example:
        >>> error_file_path("/tmp/job", 3)
        '/tmp/job/rank.3.json'
    """
    return os.path.join(directory, f"rank.{rank}.json")


def build_rank_env(slot, *, cpus, gpu_ids=(), shared_machine=False, base_env=None,
                   error_dir=None):
    """Builds the variables the launcher adds to one rank's environment.

    Args:
        slot: the rank's `launch.hosts.Slot`.
        cpus: CPU cores on the rank's (real) machine.
        gpu_ids: GPU ids visible on that machine (strings or ints); empty means CPU only.
        shared_machine: True when all ranks share one machine although they are on
            different (simulated) hosts: cores and GPUs are then divided among all ranks.
        base_env: the launcher's environment; thread variables already set there are kept.
        error_dir: the directory of the ranks' error files, or None for none.

    Returns:
        A dict of str to str with only the added variables.

    Raises:
        ValueError: if there are fewer GPUs than ranks sharing them.

    Example:
        >>> from launch.hosts import Slot
        >>> env = build_rank_env(Slot("localhost", 1, 1, 0, 2, 2, 1), cpus=2)
        >>> env["RANK"], env["LOCAL_WORLD_SIZE"], env["TF_NUM_INTRAOP_THREADS"]
        ('1', '2', '1')
    """
    base_env = base_env or {}
    env = {
        "RANK": str(slot.rank),
        "LOCAL_RANK": str(slot.local_rank),
        "WORLD_SIZE": str(slot.size),
        "LOCAL_WORLD_SIZE": str(slot.local_size),
        "CROSS_RANK": str(slot.cross_rank),
        "CROSS_SIZE": str(slot.cross_size),
        "PYTHONUNBUFFERED": "1",
    }
    if error_dir:
        env[ERROR_FILE_VARIABLE] = error_file_path(error_dir, slot.rank)
        env[ERROR_FILE_OWNER_VARIABLE] = ""
    sharers = slot.size if shared_machine else slot.local_size
    device_index = slot.rank if shared_machine else slot.local_rank
    gpu_ids = [str(gpu) for gpu in gpu_ids]
    if gpu_ids:
        if sharers > len(gpu_ids):
            raise ValueError(
                f"Each rank needs its own GPU, but {sharers} ranks share a machine with "
                f"{len(gpu_ids)} GPUs. Received: gpu_ids={gpu_ids}; lower `-np`, set "
                "`--gpus-per-host 0` to run on CPUs, or add hosts"
            )
        env["CUDA_VISIBLE_DEVICES"] = gpu_ids[device_index]
    else:
        intra, inter = threads_per_rank(cpus, sharers)
        wanted = {
            "TF_NUM_INTRAOP_THREADS": intra,
            "TF_NUM_INTEROP_THREADS": inter,
            "OMP_NUM_THREADS": intra,
        }
        for name, value in wanted.items():
            env[name] = base_env.get(name, str(value))
    return env


def horovod_env(slot, *, rendezvous_addr, rendezvous_port, iface, cycle_time_ms=None):
    """The `HOROVOD_*` variables that let `hvd.init()` join a Gloo job.

    Mirrors `horovod.runner.gloo_run.create_slot_env_vars` and `create_run_env_vars`.

    Example:
        >>> from launch.hosts import Slot
        >>> horovod_env(Slot("h", 0, 0, 0, 1, 1, 1), rendezvous_addr="127.0.0.1",
        ...             rendezvous_port=1234, iface="lo")["HOROVOD_CONTROLLER"]
        'gloo'
    """
    env = {
        "HOROVOD_HOSTNAME": slot.hostname,
        "HOROVOD_RANK": str(slot.rank),
        "HOROVOD_SIZE": str(slot.size),
        "HOROVOD_LOCAL_RANK": str(slot.local_rank),
        "HOROVOD_LOCAL_SIZE": str(slot.local_size),
        "HOROVOD_CROSS_RANK": str(slot.cross_rank),
        "HOROVOD_CROSS_SIZE": str(slot.cross_size),
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": rendezvous_addr,
        "HOROVOD_GLOO_RENDEZVOUS_PORT": str(rendezvous_port),
        "HOROVOD_CONTROLLER": "gloo",
        "HOROVOD_CPU_OPERATIONS": "gloo",
    }
    if iface:
        env["HOROVOD_GLOO_IFACE"] = iface
        env["NCCL_SOCKET_IFNAME"] = iface
    if cycle_time_ms is not None:
        env["HOROVOD_CYCLE_TIME"] = format(float(cycle_time_ms), "g")
    return env


def tf_config(rank, worker_addresses):
    """The `TF_CONFIG` JSON for worker `rank` of a `MultiWorkerMirroredStrategy` job.

    Example:
        >>> tf_config(1, ["127.0.0.1:2000", "127.0.0.1:2001"])
        '{"cluster": {"worker": ["127.0.0.1:2000", "127.0.0.1:2001"]}, "task": {"type": "worker", "index": 1}}'
    """
    return json.dumps(
        {"cluster": {"worker": list(worker_addresses)}, "task": {"type": "worker", "index": rank}}
    )


def slot_from_mpi_env(environ):
    """Rebuilds a rank's `Slot` from Open MPI's `OMPI_COMM_WORLD_*` variables.

    Returns None outside an Open MPI job. Cross rank/size are derived like Horovod
    does for hosts of equal size (`rank // local_size`); with uneven hosts
    `CROSS_RANK`/`CROSS_SIZE` are approximate (the other variables are exact).
    """
    from launch.hosts import Slot

    try:
        rank = int(environ["OMPI_COMM_WORLD_RANK"])
        size = int(environ["OMPI_COMM_WORLD_SIZE"])
        local_rank = int(environ["OMPI_COMM_WORLD_LOCAL_RANK"])
        local_size = int(environ["OMPI_COMM_WORLD_LOCAL_SIZE"])
    except (KeyError, ValueError):
        return None
    cross_size = max(1, -(-size // local_size))
    return Slot(
        hostname=environ.get("SYNCBN_LAUNCH_HOSTNAME", ""),
        rank=rank,
        local_rank=local_rank,
        cross_rank=rank // local_size,
        size=size,
        local_size=local_size,
        cross_size=cross_size,
    )
