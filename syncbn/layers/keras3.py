"""`SyncBatchNormalization` as a Keras 3 layer (`keras.layers.Layer`)."""

import keras
import numpy as np

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
            self.moving_updates.assign(np.zeros(self.moving_updates.shape, np.float32))
            return
        if self.moving_updates is not None and self.moving_updates.shape:
            # A count saved as one scalar: every channel has had that many updates.
            updates_key = str(len(self.weights) - 1)
            if updates_key in store and not np.shape(store[updates_key]):
                store = {key: np.asarray(store[key]) for key in store.keys()}
                store[updates_key] = np.full(self.moving_updates.shape, store[updates_key],
                                             np.float32)
        super().load_own_variables(store)
