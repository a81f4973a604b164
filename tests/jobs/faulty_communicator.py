"""A communicator that loses the last replica's contribution: the negative control of
`python -m syncbn.check`.

    syncbn-launch -np 3 -- python -m syncbn.check --communicator faulty_communicator:drop_last_rank

(with tests/jobs on PYTHONPATH). It sums with whatever `"auto"` picks, except
that the last replica's tensors are replaced by zeros first: the kind of
fault a wrong process group or a stale buffer would cause. Every replica then
normalizes with the statistics of the others only, which the check must
report as FAIL. The last replica is the last in the tf.distribute replica
context if there is one, else the last process of the launcher's job
(`syncbn.world`).
"""

import os

import tensorflow as tf

from syncbn import collectives, world


def _is_last_replica():
    context = tf.distribute.get_replica_context()
    if tf.distribute.has_strategy() and context is not None:
        return tf.equal(context.replica_id_in_sync_group, context.num_replicas_in_sync - 1)
    launch = world.launch_from_environment(os.environ)
    return tf.constant(world.process_rank() == launch.size - 1)


class DropLastRank:
    """Sums over every replica but the last one's contribution."""

    @staticmethod
    def _inner():
        # Resolved at call time: under tf.distribute it needs the replica context.
        return collectives.resolve("auto")

    @property
    def num_replicas(self):
        return self._inner().num_replicas

    @property
    def kernel(self):
        return f"drop-last-rank({self._inner().kernel})"

    def all_sum(self, tensor, name):
        dropped = tf.where(_is_last_replica(), tf.zeros_like(tensor), tensor)
        return self._inner().all_sum(dropped, name)


drop_last_rank = DropLastRank()
