"""A real all-reduce through the backend the launcher set up; exits non-zero on a mismatch.

Usage: python collective_check.py {horovod,mpi,tf}

Each rank contributes rank + 1; the sum must be N (N + 1) / 2. Also checks the
launcher's RANK/WORLD_SIZE against the backend's own idea of rank and size, and
prints the network interfaces it sees (simulated hosts show `sbn0`) and, for
Horovod, whether it runs over MPI or Gloo.
"""

import os
import sys


def allreduce_sum(backend, value):
    """Returns (backend rank, backend size, sum of `value` over ranks, details)."""
    if backend == "mpi":
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        return comm.Get_rank(), comm.Get_size(), comm.allreduce(value, op=MPI.SUM), ""
    if backend == "horovod":
        import horovod.tensorflow as hvd
        import tensorflow as tf

        hvd.init()
        total = hvd.allreduce(tf.constant(value, tf.float64), op=hvd.Sum)
        controller = "mpi" if hvd.mpi_enabled() else "gloo"
        return hvd.rank(), hvd.size(), float(total.numpy()), f" horovod_controller={controller}"
    if backend == "tf":
        import tensorflow as tf

        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        resolver = strategy.cluster_resolver
        per_replica = strategy.run(lambda: tf.constant(value, tf.float64))
        total = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
        return resolver.task_id, strategy.num_replicas_in_sync, float(total.numpy()), ""
    raise ValueError(f"Argument `backend` must be horovod, mpi or tf. Received: {backend!r}")


def main():
    backend = sys.argv[1]
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend_rank, backend_size, total, details = allreduce_sum(backend, float(rank + 1))
    expected = size * (size + 1) / 2
    print(f"rank={rank} size={size} backend_rank={backend_rank} backend_size={backend_size} "
          f"sum={total:g} expected={expected:g} "
          f"ifaces={','.join(sorted(os.listdir('/sys/class/net')))} "
          f"intra_op_threads={os.environ.get('TF_NUM_INTRAOP_THREADS')}{details}", flush=True)
    if (backend_rank, backend_size) != (rank, size) or total != expected:
        print("collective_check FAILED", flush=True)
        sys.exit(1)
    print("collective_check OK", flush=True)


if __name__ == "__main__":
    main()
