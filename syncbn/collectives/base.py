"""The collective interface that SyncBatchNormalization talks to.

A communicator sums a small tensor across the replicas of one
synchronization group. That is all batch norm needs: one call in the forward
pass (count and sums) and one in the backward pass (two gradient sums).

Any object with these members can be passed as `communicator=`:

* `num_replicas` (int): replicas in this replica's synchronization group.
* `all_sum(tensor, name)`: the element-wise sum of `tensor` over the group,
  same shape and dtype. It must work eagerly and inside `tf.function`, and
  every replica of the group must call it the same number of times in the same
  order (`name` identifies the call site, e.g. for Horovod's name matching).
"""

import abc
import os

DEFAULT_TIMEOUT_SECONDS = 600.0


def collective_timeout_seconds():
    """Seconds a collective may wait for the other replicas before failing.

    Read from `SYNCBN_COLLECTIVE_TIMEOUT` (default 600). A rank that never
    joins a collective (it crashed, or calls layers in another order) then
    makes the others fail with an error instead of hanging forever.
    """
    raw = os.environ.get("SYNCBN_COLLECTIVE_TIMEOUT", str(DEFAULT_TIMEOUT_SECONDS))
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(
            "Environment variable `SYNCBN_COLLECTIVE_TIMEOUT` must be a number of "
            f"seconds. Received: SYNCBN_COLLECTIVE_TIMEOUT={raw!r}"
        ) from None
    if seconds <= 0:
        raise ValueError(
            "Environment variable `SYNCBN_COLLECTIVE_TIMEOUT` must be > 0. "
            f"Received: SYNCBN_COLLECTIVE_TIMEOUT={raw!r}"
        )
    return seconds


def consecutive_groups(world_size, group_size):
    """Splits ranks `0..world_size-1` into consecutive groups of `group_size`.

    `group_size=None` means one group of every rank.
    """
    if group_size is None:
        return [list(range(world_size))]
    if world_size % group_size:
        raise ValueError(
            "Argument `group_size` must divide the number of replicas "
            f"({world_size}). Received: group_size={group_size}"
        )
    return [list(range(start, start + group_size)) for start in range(0, world_size, group_size)]


class Communicator(abc.ABC):
    """Base class for the built-in communicators."""

    #: Short name used in `get_config` and error messages.
    name = None

    @property
    @abc.abstractmethod
    def num_replicas(self):
        """Replicas in this replica's synchronization group."""

    @abc.abstractmethod
    def all_sum(self, tensor, name):
        """Sums `tensor` over the synchronization group."""

    @property
    def kernel(self):
        """What carries the sums (e.g. `"compiled"`, `"mpi-direct"`); the name by default."""
        return self.name

    def __repr__(self):
        return f"<{type(self).__name__} num_replicas={self.num_replicas} kernel={self.kernel}>"


class LocalCommunicator(Communicator):
    """One replica: no communication at all."""

    name = "local"

    @property
    def num_replicas(self):
        return 1

    def all_sum(self, tensor, name):
        del name
        return tensor


class PretendReplicas(Communicator):
    """Says `num_replicas` replicas and sums nothing: the synchronized path, without communication.

    For measuring what the synchronized layer's own math and graph cost, and
    for tests of that graph: a layer given this communicator traces and runs
    exactly what it would with real replicas, but `all_sum` returns its input
    (as a new tensor, so the graph keeps one op where the sum would be).

    Args:
        num_replicas: what the layer is told, 2 or more (default 2).
    """

    name = "pretend"

    def __init__(self, num_replicas=2):
        if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 2:
            raise ValueError("Argument `num_replicas` must be an integer >= 2. "
                             f"Received: num_replicas={num_replicas!r}")
        self._num_replicas = num_replicas

    @property
    def num_replicas(self):
        return self._num_replicas

    def all_sum(self, tensor, name):
        del name
        return tensor * 1.0
