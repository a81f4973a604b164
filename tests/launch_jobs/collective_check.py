"""A real all-reduce through the backend the launcher set up; exits non-zero on a mismatch.

Usage: python collective_check.py {horovod,mpi,tf}

Each rank contributes rank + 1; the sum must be N (N + 1) / 2. Also checks the
launcher's RANK/WORLD_SIZE (what syncbn-launch promises every rank) against
the backend's own idea of rank and size (`syncbn.world`, which sums through
mpi4py, Horovod or tf.distribute), and prints the network interfaces it sees
(simulated hosts show `sbn0`) and, for Horovod, whether it runs over MPI or Gloo.
"""

import os
import sys

import numpy as np


def run_check(world):
    """The all-reduce on this rank of `world` (a `syncbn.world` World); returns one record."""
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    total = float(world.process_sum(np.array([rank + 1.0]))[0])
    expected = size * (size + 1) / 2
    details = ""
    if world.name == "horovod":
        details = f" horovod_controller={'mpi' if world.hvd.mpi_enabled() else 'gloo'}"
    line = (f"rank={rank} size={size} backend_rank={world.process_rank} "
            f"backend_size={world.num_processes} sum={total:g} expected={expected:g} "
            f"ifaces={','.join(sorted(os.listdir('/sys/class/net')))} "
            f"intra_op_threads={os.environ.get('TF_NUM_INTRAOP_THREADS')}{details}")
    ok = (world.process_rank, world.num_processes) == (rank, size) and total == expected
    print(line, flush=True)
    print(f"collective_check {'OK' if ok else 'FAILED'}", flush=True)
    return {"line": line, "ok": ok}


def main():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from jobs.common import open_world

    backend = sys.argv[1]
    if backend not in ("horovod", "mpi", "tf"):
        raise ValueError(f"Argument `backend` must be horovod, mpi or tf. Received: {backend!r}")
    world = open_world(backend)
    record = run_check(world)
    world.barrier()
    sys.exit(0 if record["ok"] else 1)


if __name__ == "__main__":
    main()
