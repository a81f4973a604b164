"""`SyncBatchNormalization` as a Keras 3 layer (`keras.layers.Layer`)."""

import keras

from syncbn.layers.base import SyncBatchNormalizationBase


@keras.saving.register_keras_serializable(package="syncbn")
class SyncBatchNormalization(SyncBatchNormalizationBase, keras.layers.Layer):
    __doc__ = SyncBatchNormalizationBase.__doc__

    _keras = keras

    def _add_float32_weight(self, name, shape, initializer, trainable=False,
                            regularizer=None, constraint=None):
        return self.add_weight(shape=shape, name=name, initializer=initializer,
                               regularizer=regularizer, constraint=constraint,
                               trainable=trainable, autocast=False)

    def load_own_variables(self, store):
        # A Keras BatchNormalization's weights (or an `"ema"` layer's) have
        # no update count: the statistics count as initial values, which the
        # first debiased update replaces.
        keras_weights = self.weights[:-1] if self.moving_updates is not None else self.weights
        if self.moving_updates is not None and len(store.keys()) == len(keras_weights):
            for index, variable in enumerate(keras_weights):
                variable.assign(store[str(index)])
            self.moving_updates.assign(0.0)
            return
        super().load_own_variables(store)
