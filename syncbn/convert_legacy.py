"""`syncbn.convert` for tf_keras models (`tf.keras` under `TF_USE_LEGACY_KERAS=1`).

`syncbn.convert` passes a tf_keras model here; what to convert, the checks,
the config edits and the logging are `syncbn.convert`'s own. What differs is
how tf_keras copies: its `clone_model` has no `recursive` option, so nested
Functional and Sequential models are cloned by the clone function itself;
weights are copied with `get_weights` / `assign`; a compiled model is
recompiled from its compile config; and a `BatchNormalization`'s `fused`,
which tf_keras leaves out of its config, is carried over, since it decides
how the moving variance is averaged (`syncbn.layers.legacy`).
"""

import tf_keras
from tf_keras.src.engine.functional import Functional  # what clone_model rebuilds

from syncbn.convert import _UNSUPPORTED, _Conversion
from syncbn.layers.legacy import SyncBatchNormalization


class LegacyConversion(_Conversion):
    """One call of `syncbn.convert` on a tf_keras model."""

    batch_normalization = tf_keras.layers.BatchNormalization
    sync_batch_normalization = SyncBatchNormalization
    rebuildable = (tf_keras.Sequential, Functional)

    def why_not_convertible(self, layer):
        if self.is_source(layer) and self.to == "sync":
            for argument in ("virtual_batch_size", "adjustment"):
                if getattr(layer, argument, None) is not None:
                    return f"{argument}={getattr(layer, argument)!r} {_UNSUPPORTED}"
        return super().why_not_convertible(layer)

    def source_config(self, layer):
        config = layer.get_config()
        if self.to == "sync":
            # True or False once built (None before): how tf_keras runs this layer.
            config["fused"] = layer.fused
        return config

    def clone_layer(self, layer):
        if self.is_rebuildable(layer):
            return self.clone_model(layer)
        return super().clone_layer(layer)

    def clone_model(self, model):
        converted = tf_keras.models.clone_model(model, clone_function=self.clone_layer)
        compile_config = model.get_compile_config() if model._is_compiled else None
        if compile_config is not None:
            converted.compile_from_config(compile_config)
        return converted

    def copy_variables(self, original, copy):
        values = original.get_weights()
        variables = copy.weights
        # SyncBatchNormalization's optional `moving_updates` comes after
        # BatchNormalization's weights: dropped for "local", left at its
        # initial 0 for "sync".
        bn_pair = self.is_source(original) and type(copy) is self.target_class
        if len(values) != len(variables) and not (bn_pair and abs(len(values) - len(variables)) == 1):
            raise RuntimeError(
                f"The copy of layer '{original.name}' has {len(variables)} weights where the "
                f"original has {len(values)}; its weights cannot be copied.")
        for variable, value in zip(variables, values):
            variable.assign(value)
