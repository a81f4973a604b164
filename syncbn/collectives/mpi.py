"""MPI through mpi4py, for jobs started with `mpirun` and no Horovod.

mpi4py sets MPI up and splits the communicator; the sum itself runs in a
small compiled TensorFlow kernel (`mpi_all_sum.cc`, built on first use and
cached, see `syncbn.collectives.mpi_op`) that calls MPI directly. Without a
compiler it runs mpi4py from `tf.numpy_function` instead: same results, about
20 us more per collective (`bench/latency.py`). Either op works eagerly and inside `tf.function`,
and is stateful, so within one `tf.function` TensorFlow runs the calls in
program order, which is the same on every rank.

Two safety nets, because plain MPI cannot match calls by name:

* every call carries a fingerprint of its call site; if ranks reach
  different layers (a different call order), the sums of the fingerprint and
  of its square disagree and every rank raises instead of silently mixing
  the statistics of different layers;
* the all-reduce is non-blocking and polled against
  `SYNCBN_COLLECTIVE_TIMEOUT`; when a rank never arrives, the waiting rank
  says which collective timed out and aborts the MPI job (exit code 124)
  instead of hanging.
"""

import functools
import os
import sys
import time
import warnings
import zlib

import numpy as np
import tensorflow as tf

from syncbn.collectives import mpi_op
from syncbn.collectives.base import Communicator, collective_timeout_seconds, consecutive_groups

# Spin on MPI_Test this long before yielding the core between polls: the
# other ranks usually arrive within microseconds, and a sleep costs ~60 us.
# mpi_all_sum.cc uses the same values.
_SPIN_SECONDS = 2e-3
_POLL_SECONDS = 1e-4
TIMEOUT_EXIT_CODE = 124


def _fingerprint(name):
    # 1..1024: its square times any realistic world size stays exact in float32.
    return float(zlib.crc32(name.encode()) % 1024 + 1)


@functools.lru_cache(maxsize=None)
def _group_comm(group_size):
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise RuntimeError(
            f"communicator='mpi' needs mpi4py (`from mpi4py import MPI` failed: {error})."
        ) from error
    world = MPI.COMM_WORLD
    groups = consecutive_groups(world.Get_size(), group_size)
    if len(groups) == 1:
        return world
    return world.Split(color=world.Get_rank() // group_size, key=world.Get_rank())


class MPICommunicator(Communicator):
    """Sums with `MPI_Iallreduce` on COMM_WORLD or a consecutive-rank split."""

    name = "mpi"

    def __init__(self, comm, op_library=None):
        self._comm = comm
        self._ops = op_library

    @property
    def num_replicas(self):
        return self._comm.Get_size()

    @property
    def kernel(self):
        """`"compiled"` or `"numpy_function"`: what runs the sum."""
        return "numpy_function" if self._ops is None else "compiled"

    def _abort(self, name):
        # The pending request cannot be cancelled, and MPI_Finalize at exit would
        # wait for it forever, so a timed-out collective ends the whole job.
        sys.stderr.write(
            f"syncbn: MPI all-reduce '{name}' waited more than "
            f"{collective_timeout_seconds():.0f} s (SYNCBN_COLLECTIVE_TIMEOUT) for the "
            "other ranks; one of them has died or is stuck. Aborting the MPI job.\n"
        )
        sys.stderr.flush()
        self._comm.Abort(TIMEOUT_EXIT_CODE)

    def _sum_numpy(self, array, fingerprint, name):
        from mpi4py import MPI

        # [2] + [D] -> [D + 2]: fingerprint and its square lead the payload.
        send = np.concatenate([np.array([fingerprint, fingerprint**2], array.dtype), array.ravel()])
        received = np.empty_like(send)
        request = self._comm.Iallreduce(send, received, op=MPI.SUM)
        deadline = time.monotonic() + collective_timeout_seconds()
        spin_until = time.monotonic() + _SPIN_SECONDS
        while not request.Test():
            now = time.monotonic()
            if now > deadline:
                self._abort(name)
            if now > spin_until:
                time.sleep(_POLL_SECONDS)
        size = self._comm.Get_size()
        if received[0] != size * fingerprint or received[1] != size * fingerprint**2:
            raise RuntimeError(
                f"syncbn: ranks reached different sync BN layers: this rank was at "
                f"'{name}'. Every rank must call the layers in the same "
                "order and the same number of times."
            )
        return received[2:].reshape(array.shape)

    def all_sum(self, tensor, name):
        tensor = tf.convert_to_tensor(tensor)
        if self._ops is not None:
            from mpi4py import MPI

            # The kernel is CPU-only; on a GPU job the small payload is copied over.
            with tf.device("/CPU:0"):
                return self._ops.syncbn_mpi_all_sum(
                    tensor, comm=MPI._handleof(self._comm), fingerprint=_fingerprint(name),
                    timeout_seconds=collective_timeout_seconds(), call_name=name,
                    name="syncbn_mpi_all_sum")
        summed = tf.numpy_function(
            functools.partial(self._sum_numpy, fingerprint=_fingerprint(name), name=name),
            [tensor],
            Tout=tensor.dtype,
            stateful=True,
            name="syncbn_mpi_all_sum",
        )
        summed.set_shape(tensor.shape)
        return summed


def mpi_communicator(group_size=None):
    return MPICommunicator(_group_comm(group_size), mpi_op.load())


# --- BN sums over MPI beside another framework (Horovod, tf.distribute) -------------


def direct_mpi_wanted():
    """False when `SYNCBN_DIRECT_MPI=0` turns the direct MPI path off."""
    value = os.environ.get("SYNCBN_DIRECT_MPI", "auto")
    if value not in ("auto", "0"):
        raise ValueError(
            "Environment variable `SYNCBN_DIRECT_MPI` must be 'auto' or '0'. "
            f"Received: SYNCBN_DIRECT_MPI={value!r}"
        )
    return value == "auto"


def direct_mpi_obstacle(size, rank):
    """Why this process cannot sum over MPI for a framework whose replica is `rank`
    of `size`, or None if it can."""
    try:
        from mpi4py import MPI
    except ImportError as error:
        return f"mpi4py is missing ({error})"
    world = MPI.COMM_WORLD
    if (world.Get_size(), world.Get_rank()) != (size, rank):
        return (f"MPI_COMM_WORLD rank {world.Get_rank()} of {world.Get_size()} is not the "
                f"framework's replica {rank} of {size}")
    if MPI.Query_thread() != MPI.THREAD_MULTIPLE:
        return "MPI was not initialized with MPI_THREAD_MULTIPLE"
    if mpi_op.requested_kernel() == "numpy_function":
        return "SYNCBN_MPI_KERNEL=numpy_function"
    try:
        mpi_op.build()
    except mpi_op.BuildError as error:
        return f"the compiled MPI kernel is unavailable: {error}"
    return None


def direct_mpi_communicator(size, rank, group_size, framework):
    """An `MPICommunicator` to sum BN statistics beside `framework`, or None.

    Collective: every rank calls it at the same point (when its layers first
    resolve their communicator) and takes part in one MPI all-reduce, so that
    either every rank sums over MPI or none does; a mixed job would hang.
    """
    obstacle = direct_mpi_obstacle(size, rank)
    try:
        from mpi4py import MPI
    except ImportError:
        MPI = None  # no rank can agree over MPI without it; the environment is shared
    if MPI is None or not MPI.COMM_WORLD.allreduce(obstacle is None, op=MPI.LAND):
        warnings.warn(
            f"syncbn: the job runs under MPI, but BN sums go through {framework} because "
            f"a rank cannot sum over MPI directly; this rank: {obstacle or 'can; another cannot'}.",
            RuntimeWarning, stacklevel=3,
        )
        return None
    return MPICommunicator(_group_comm(group_size), mpi_op.load())
