"""MPI through mpi4py, for jobs started with `mpirun` and no Horovod.

mpi4py sets MPI up and splits the communicator; the sum itself runs in a
small compiled TensorFlow kernel (`mpi_all_sum.cc`, built on first use and
cached, see `syncbn.collectives.mpi_op`) that calls MPI directly. Without a
compiler it runs mpi4py from `tf.numpy_function` instead: same results, about
20 us more per collective (`bench/latency.py`). Either op works eagerly and inside `tf.function`,
and is stateful, so within one `tf.function` TensorFlow runs the calls in
program order, which is the same on every rank.

Two safety nets, because plain MPI cannot match calls by name:

* every call first exchanges a header of 3 int64 per rank: a fingerprint of
  its call site (the layer and direction), the vector's length and its dtype
  (`MPI_Iallgather`, microseconds). If any rank's header differs, because
  ranks reached different layers or the same layer with a different number
  of channels or dtype, every rank raises the same error, naming this rank's
  layer and shape and those of the ranks that differ, and the data
  all-reduce is never started (Open MPI sums mismatched buffers without a
  word, and every rank would exit 0). A process-local table maps fingerprints
  to the call sites this process has seen, so another rank's layer is named
  whenever it exists here too. The header travels inside the same `all_sum`
  call, so a layer still makes exactly 2 `all_sum` calls per training step;
* both exchanges are non-blocking and polled against one deadline,
  `SYNCBN_COLLECTIVE_TIMEOUT`; when a rank never arrives, the waiting rank
  says which collective timed out and aborts the MPI job (exit code 124)
  instead of hanging.

And one rule for the whole job: once a process sums over MPI, an uncaught
exception aborts the MPI job (`MPI_Abort`, exit code 1) after its traceback is
printed, as `python -m mpi4py` does. Otherwise the failing rank would wait in
`MPI_Finalize` while the others wait in their next collective, and the job
would end only at the timeout, blaming a rank that did nothing wrong.
"""

import functools
import os
import sys
import time
import traceback
import warnings
import zlib

import numpy as np
import tensorflow as tf

from syncbn import error_file
from syncbn.collectives import mpi_op
from syncbn.collectives.base import Communicator, collective_timeout_seconds, consecutive_groups

# Spin on MPI_Test this long before yielding the core between polls: the
# other ranks usually arrive within microseconds, and a sleep costs ~60 us.
# mpi_all_sum.cc uses the same values.
_SPIN_SECONDS = 2e-3
_POLL_SECONDS = 1e-4
TIMEOUT_EXIT_CODE = 124


HEADER_SIZE = 3  # [fingerprint, element count, dtype code], as in mpi_all_sum.cc
_MAX_RANKS_NAMED = 4
_DTYPE_NAMES = {1: "float32", 2: "float64", 14: "bfloat16", 19: "float16"}
# fingerprint -> call-site name, for every call site this process has seen.
_call_sites = {}


def _fingerprint(name):
    return zlib.crc32(name.encode())


def register_call_site(name, op_library=None):
    """Remembers `name` (and its other direction) so mismatch errors can name it.

    `sync_batch_norm` names its two calls `<layer>/forward` and
    `<layer>/backward`; both are registered when either is seen, so a rank
    that is one direction ahead of another can still name where the other is.
    Returns the fingerprint of `name`.
    """
    names = [name]
    for direction, other in (("/forward", "/backward"), ("/backward", "/forward")):
        if name.endswith(direction):
            names.append(name[: -len(direction)] + other)
    for each in names:
        fingerprint = _fingerprint(each)
        if _call_sites.get(fingerprint) != each:
            _call_sites[fingerprint] = each
            if op_library is not None:
                mpi_op.register_call_site(fingerprint, each)
    return _fingerprint(name)


def _describe(header):
    fingerprint, count, dtype = (int(v) for v in header)
    site = _call_sites.get(fingerprint)
    site = (f"'{site}'" if site is not None
            else f"a call site this rank has not seen (fingerprint {fingerprint:08x})")
    return f"{site} with {_DTYPE_NAMES.get(dtype, f'dtype#{dtype}')}[{count}]"


def mismatch_message(own, headers, rank):
    """The error for ranks whose headers differ from this rank's, or None.

    Args:
        own: this rank's header, `[fingerprint, count, dtype code]`.
        headers: `[size, 3]`, every rank's header, in rank order.
        rank: this rank's index in `headers`.
    """
    own = [int(v) for v in own]
    differing = [(other, header) for other, header in enumerate(headers)
                 if [int(v) for v in header] != own]
    if not differing:
        return None
    others = "; ".join(f"rank {other} is at {_describe(header)}"
                       for other, header in differing[:_MAX_RANKS_NAMED])
    if len(differing) > _MAX_RANKS_NAMED:
        others += f"; and {len(differing) - _MAX_RANKS_NAMED} more"
    return (f"syncbn: ranks disagree at a sync BN collective: this rank ({rank}) is at "
            f"{_describe(own)}; {others}. Every rank must call the same "
            "SyncBatchNormalization layers, in the same order, with the same number of "
            "channels and dtype.")


def abort_on_uncaught_exception():
    """Makes an uncaught exception end the whole MPI job (see the module docstring)."""
    if getattr(sys.excepthook, "syncbn_mpi_abort", False):
        return
    previous = sys.excepthook

    def excepthook(kind, value, traceback):
        previous(kind, value, traceback)
        sys.stderr.flush()
        sys.stdout.flush()
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.COMM_WORLD.Abort(1)

    excepthook.syncbn_mpi_abort = True
    sys.excepthook = excepthook


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
        message = (f"syncbn: MPI all-reduce '{name}' waited more than "
                   f"{collective_timeout_seconds():.0f} s (SYNCBN_COLLECTIVE_TIMEOUT) for the "
                   "other ranks; one of them has died or is stuck. Aborting the MPI job.")
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
        error_file.record_failure(error_file.COLLECTIVE_TIMEOUT, message,
                                  traceback_text="".join(traceback.format_stack()),
                                  exit_code=TIMEOUT_EXIT_CODE)
        self._comm.Abort(TIMEOUT_EXIT_CODE)

    def _wait(self, request, deadline, name):
        spin_until = time.monotonic() + _SPIN_SECONDS
        while not request.Test():
            now = time.monotonic()
            if now > deadline:
                self._abort(name)
            if now > spin_until:
                time.sleep(_POLL_SECONDS)

    def _sum_numpy(self, array, fingerprint, dtype_code, name):
        from mpi4py import MPI

        deadline = time.monotonic() + collective_timeout_seconds()
        header = np.array([fingerprint, array.size, dtype_code], np.int64)
        headers = np.empty((self._comm.Get_size(), HEADER_SIZE), np.int64)  # [3] -> [size, 3]
        self._wait(self._comm.Iallgather(header, headers), deadline, name)
        message = mismatch_message(header, headers, self._comm.Get_rank())
        if message is not None:
            raise RuntimeError(message)
        received = np.empty_like(array)
        self._wait(self._comm.Iallreduce(np.ascontiguousarray(array), received, op=MPI.SUM),
                   deadline, name)
        return received

    def all_sum(self, tensor, name):
        tensor = tf.convert_to_tensor(tensor)
        fingerprint = register_call_site(name, self._ops)
        if self._ops is not None:
            from mpi4py import MPI

            # The kernel is CPU-only; on a GPU job the small payload is copied over.
            with tf.device("/CPU:0"):
                return self._ops.syncbn_mpi_all_sum(
                    tensor, comm=MPI._handleof(self._comm), fingerprint=fingerprint,
                    timeout_seconds=collective_timeout_seconds(), call_name=name,
                    name="syncbn_mpi_all_sum")
        summed = tf.numpy_function(
            functools.partial(self._sum_numpy, fingerprint=fingerprint,
                              dtype_code=tensor.dtype.as_datatype_enum, name=name),
            [tensor],
            Tout=tensor.dtype,
            stateful=True,
            name="syncbn_mpi_all_sum",
        )
        summed.set_shape(tensor.shape)
        return summed


def mpi_communicator(group_size=None):
    from syncbn import world

    world.check_mpi_world()
    abort_on_uncaught_exception()
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
    abort_on_uncaught_exception()
    return MPICommunicator(_group_comm(group_size), mpi_op.load())
