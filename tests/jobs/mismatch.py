"""Misbehaving MPI ranks, to check that syncbn fails loudly instead of hanging.

    mpirun -np 2 python tests/jobs/mismatch.py order    # ranks call two layers in opposite orders
    mpirun -np 2 python tests/jobs/mismatch.py absent   # rank 1 never calls the layer
    mpirun -np 2 python tests/jobs/mismatch.py shape    # 8 channels on rank 0, 4 on rank 1
    mpirun -np 2 python tests/jobs/mismatch.py dtype    # float32 on rank 0, float64 on rank 1
"""

import sys
import time

import numpy as np

import syncbn
from syncbn.world import create_world

mode = sys.argv[1]
rank = create_world("mpi").process_rank
first = syncbn.SyncBatchNormalization(communicator="mpi", name="first")
second = syncbn.SyncBatchNormalization(communicator="mpi", name="second")
x = np.random.default_rng(rank).normal(size=(4, 3)).astype(np.float32)
if mode == "order":
    layers = [first, second] if rank == 0 else [second, first]
    for layer in layers:
        layer(x, training=True)
elif mode == "shape":
    channels = 8 if rank == 0 else 4
    first(np.ones((4, channels), np.float32), training=True)
elif mode == "dtype":
    dtype = "float32" if rank == 0 else "float64"
    layer = syncbn.SyncBatchNormalization(communicator="mpi", name="third", dtype=dtype)
    layer(x.astype(dtype), training=True)
elif mode == "absent":
    if rank == 0:
        first(x, training=True)
    else:
        time.sleep(120)
else:
    raise ValueError(
        f"Argument `mode` must be 'order', 'shape', 'dtype' or 'absent'. Received: {mode!r}")
print(f"rank {rank} finished without an error", flush=True)
