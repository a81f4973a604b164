"""Ranks that fail in ways only their error files tell apart.

Usage: python error_file_job.py MODE BARRIER_DIR [--no-syncbn]

* `raise`: rank 1 raises first, but takes 4 s more to exit (an atexit
  handler); rank 0 raises a second later and exits at once. The first process
  to exit (or mpirun's account of the job) names rank 0; rank 1's error file
  names rank 1.
* `timeout`: rank 0 calls a syncbn MPI all-reduce that rank 1 never joins, and
  aborts after `SYNCBN_COLLECTIVE_TIMEOUT` (exit code 124), through the kernel
  that `SYNCBN_MPI_KERNEL` picks. Needs mpirun.

The ranks first wait for each other (files in BARRIER_DIR), so that the order
of the failures does not depend on how long each took to import syncbn.
`--no-syncbn` does not import syncbn: no error file is written.
"""

import atexit
import os
import sys
import time


def barrier(directory, rank, size, seconds=120.0):
    open(os.path.join(directory, f"ready.{rank}"), "w").close()
    deadline = time.monotonic() + seconds
    while len([n for n in os.listdir(directory) if n.startswith("ready.")]) < size:
        if time.monotonic() > deadline:
            sys.exit(f"rank {rank}: the other ranks never came")
        time.sleep(0.05)


def main():
    mode, directory = sys.argv[1], sys.argv[2]
    if "--no-syncbn" not in sys.argv:
        import syncbn  # noqa: F401  (installs the error file's hook)
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if mode == "timeout":
        from mpi4py import MPI  # every rank joins MPI_Init, then only rank 0 sums

        MPI.COMM_WORLD.Barrier()
    barrier(directory, rank, size)
    print(f"rank {rank} starts {mode}", flush=True)
    if mode == "raise":
        if rank == 1:
            atexit.register(time.sleep, 4.0)
            raise ValueError("rank 1: bad batch")
        time.sleep(1.0)
        raise RuntimeError(f"rank {rank}: failing because rank 1 did")
    if mode == "timeout":
        if rank == 0:
            import tensorflow as tf

            from syncbn.collectives.mpi import mpi_communicator

            mpi_communicator().all_sum(tf.ones([3]), "syncbn/bn_t/forward")
        time.sleep(600)
    sys.exit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
