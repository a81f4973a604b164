"""`CountingCommunicator`: counts the collectives a model really executes.

A debugging and benchmarking aid: pass it as a layer's `communicator` to see
how many all-reduces (and bytes) a training step or an inference pass runs.
Calls are counted when they execute, not when a `tf.function` is traced, so
a branch of `tf.cond` that does not run is not counted.

    counter = CountingCommunicator()                  # pretends 2 replicas, sums nothing
    layer = syncbn.SyncBatchNormalization(communicator=counter)
    ...
    calls, num_bytes = counter.take()
"""

import collections
import threading

import numpy as np
import tensorflow as tf


class CountingCommunicator:
    """Records executed `all_sum` calls and payload bytes; delegates the sum.

    Args:
        num_replicas: what the layer is told (default 2, so that the layer
            takes its synchronized path).
        make_delegate: None to sum nothing (pretend replicas: `all_sum`
            returns its input), or a zero-argument callable returning the
            real communicator. It is called at the first `all_sum`, because
            `TFDistributeCommunicator` can only be created in a replica context.

    Attributes:
        calls, bytes: `collections.Counter`s keyed by call-site name.
    """

    def __init__(self, num_replicas=2, make_delegate=None):
        self.num_replicas = num_replicas
        self._make_delegate = make_delegate
        self._delegate = None
        self._lock = threading.Lock()
        self.calls = collections.Counter()
        self.bytes = collections.Counter()

    def _get_delegate(self):
        # MirroredStrategy traces its replicas in parallel threads.
        with self._lock:
            if self._delegate is None and self._make_delegate is not None:
                self._delegate = self._make_delegate()
                if self._delegate.num_replicas != self.num_replicas:
                    raise ValueError(
                        f"The delegate has {self._delegate.num_replicas} replicas, the "
                        f"counter was told {self.num_replicas}."
                    )
            return self._delegate

    def _record(self, name, num_bytes):
        with self._lock:
            self.calls[name] += 1
            self.bytes[name] += num_bytes
        return np.int32(0)

    def all_sum(self, tensor, name):
        num_bytes = tensor.shape.num_elements() * tensor.dtype.size
        executed = tf.py_function(lambda: self._record(name, num_bytes), [], tf.int32)
        delegate = self._get_delegate()
        with tf.control_dependencies([executed]):
            return tf.identity(tensor if delegate is None else delegate.all_sum(tensor, name))

    @property
    def total(self):
        """Calls so far."""
        return sum(self.calls.values())

    def take(self):
        """`(calls, bytes)` since the last `take` (or `reset`), then resets."""
        with self._lock:
            result = (sum(self.calls.values()), sum(self.bytes.values()))
            self.calls.clear()
            self.bytes.clear()
        return result

    def reset(self):
        self.take()
