"""`SyncBatchNormalization` as a tf_keras layer: Keras 2, `tf.keras` under `TF_USE_LEGACY_KERAS=1`.

Importing this module needs the `tf_keras` package (`pip install
"tf-keras==<your TensorFlow's major.minor>.*"`); `syncbn` imports it itself
when `TF_USE_LEGACY_KERAS` is set. It also registers the class with
tf_keras's serialization as `"syncbn>SyncBatchNormalization"`, so saved
models (`.h5`, SavedModel, `.keras`) load with `import syncbn` alone.
"""

import tensorflow as tf
import tf_keras

from syncbn.layers.base import SyncBatchNormalizationBase

#: The compute dtypes tf_keras's fused kernels take.
_FUSED_DTYPES = ("float16", "bfloat16", "float32")


def _single_axis(axis):
    """tf_keras stores `axis` as a list once built (`[3]`); one axis is all this layer takes."""
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            raise ValueError(
                "Argument `axis` must be one channel axis: SyncBatchNormalization "
                f"normalizes over all the others. Received: axis={axis!r}")
        return axis[0]
    return axis


@tf_keras.saving.register_keras_serializable(package="syncbn")
class SyncBatchNormalization(SyncBatchNormalizationBase, tf_keras.layers.Layer):
    """`SyncBatchNormalization` for tf_keras: a drop-in for `tf.keras.layers.BatchNormalization`.

    Everything of `syncbn.layers.base.SyncBatchNormalizationBase` (the
    statistics of the global batch, `communicator`, `group_size`,
    `moving_average`, `nonfinite`), as a tf_keras layer, with tf_keras
    BatchNormalization's arguments and conventions:

    * `training=None` follows tf_keras's learning phase, as its layer does.
    * `axis` may be a list of one axis (how tf_keras stores it).
    * `fused` (None, True or False) decides, as it does in tf_keras, how the
      moving variance is averaged: where tf_keras runs its fused kernels
      (`fused=None` on inputs of rank 4 or 5 with the channels on axis 1 or
      last, and a float16, bfloat16 or float32 compute dtype; or
      `fused=True`), it averages the Bessel-corrected batch variance,
      `n / (n - 1)` times the biased one; elsewhere (and with
      `fused=False`) the biased variance. Which kernels run is syncbn's own
      choice (see `syncbn.ops.kernels_for`). `fused=True` where tf_keras
      cannot fuse raises a ValueError when the layer is built.
    * `virtual_batch_size` and `adjustment` must be None: a ghost batch or a
      per-call random adjustment has no global-batch equivalent; they raise
      a ValueError.
    """

    _keras = tf_keras

    def __init__(self, axis=-1, *args, fused=None, virtual_batch_size=None, adjustment=None,
                 **kwargs):
        if virtual_batch_size is not None:
            raise ValueError(
                "Argument `virtual_batch_size` must be None: SyncBatchNormalization "
                "normalizes with the statistics of the global batch, not of ghost batches. "
                f"Received: virtual_batch_size={virtual_batch_size!r}")
        if adjustment is not None:
            raise ValueError(
                "Argument `adjustment` must be None: SyncBatchNormalization does not "
                f"support it. Received: adjustment={adjustment!r}")
        if fused not in (None, True, False):
            raise TypeError(
                f"Argument `fused` must be None, True or False. Received: fused={fused!r}")
        super().__init__(_single_axis(axis), *args, **kwargs)
        self.fused = fused

    def _add_float32_weight(self, name, shape, initializer, trainable=False,
                            regularizer=None, constraint=None):
        # The moving statistics as tf_keras's BatchNormalization makes them:
        # under a tf.distribute strategy each replica assigns its own copy
        # (here the same value on all) and a read averages them.
        distributed = {} if trainable else {
            "synchronization": tf.VariableSynchronization.ON_READ,
            "aggregation": tf.VariableAggregation.MEAN}
        return self.add_weight(name=name, shape=shape, dtype=tf.float32, initializer=initializer,
                               regularizer=regularizer, constraint=constraint, trainable=trainable,
                               experimental_autocast=False, **distributed)

    def _training_when_unset(self):
        return tf_keras.backend.learning_phase()

    # tf_keras runs the `call` of a layer from outside tf_keras through
    # AutoGraph, which would re-parse syncbn's whole call tree at every trace
    # (seconds at a model's first step). The call has no Python control flow
    # on tensors to convert: it decides its path from static facts.
    @tf.autograph.experimental.do_not_convert
    def call(self, inputs, training=None, mask=None):
        return super().call(inputs, training=training, mask=mask)

    def _moving_variance_is_unbiased(self):
        return bool(self.fused)

    def __setattr__(self, name, value):
        if name == "_skipped_steps":
            # tf_keras makes every tf.Variable attribute a weight, and this
            # counter is diagnostics: it is only tracked, for checkpoints and
            # SavedModel, whose traced training step updates it.
            value = tf.__internal__.tracking.sticky_attribute_assignment(
                trackable=self, value=value, name=name)
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    def build(self, input_shape):
        input_shape = tf.TensorShape(input_shape)
        SyncBatchNormalizationBase.build(self, input_shape.as_list())
        self.fused = self._tf_keras_fuses(input_shape.rank)
        # Marks the layer built and records its input shape (for saving), as
        # tf_keras layers that override `build` do.
        tf_keras.layers.Layer.build(self, input_shape)

    def _tf_keras_fuses(self, rank):
        """Whether tf_keras's BatchNormalization would run fused kernels here, as it decides."""
        fusable = (rank in (4, 5) and self._channel_axis in (1, rank - 1)
                   and self.compute_dtype in _FUSED_DTYPES)
        if self.fused and not fusable:
            raise ValueError(
                "Argument `fused=True` needs what tf_keras's fused kernels take: inputs of "
                "rank 4 or 5 with the channels on axis 1 or last, in float16, bfloat16 or "
                f"float32. Received: fused=True, input rank {rank}, axis={self.axis}, "
                f"compute dtype {self.compute_dtype}")
        return fusable if self.fused is None else self.fused

    def get_config(self):
        return {**super().get_config(), "fused": self.fused}
