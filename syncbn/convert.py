"""`convert`: swap every `BatchNormalization` of a Keras model for `SyncBatchNormalization`.

The copy is made by `keras.models.clone_model(..., recursive=True)`, Keras's
own way of rebuilding a Functional or Sequential model (nested ones
included) layer by layer; the `clone_function` given to it builds a
`SyncBatchNormalization` from each `BatchNormalization`'s config (and back,
for `to="local"`) and a plain from-config copy of every other layer. Each
layer's variables are then copied with the same hooks `model.save()` and
`keras.models.load_model()` use (`save_own_variables` / `load_own_variables`),
so layers that derive state from their variables (e.g. `Normalization`) stay
consistent.

A tf_keras model (`tf.keras` under `TF_USE_LEGACY_KERAS=1`) is converted the
same way by `syncbn.convert_legacy`, whose conversion subclasses this one and
says how tf_keras clones a model and copies weights.
"""

import logging
import sys

import keras
from keras.src.models.functional import Functional  # what clone_model rebuilds

from syncbn import collectives
from syncbn.layers.keras3 import SyncBatchNormalization

logger = logging.getLogger(__name__)

TARGETS = ("sync", "local")

# How `why_not_convertible` ends a reason that is an argument's value.
_UNSUPPORTED = "is not supported by SyncBatchNormalization"

# Config keys that only SyncBatchNormalization has.
_SYNC_ONLY_KEYS = ("communicator", "group_size", "moving_average", "nonfinite")


def _conversion_class(model):
    """`_Conversion` for a Keras 3 model, the tf_keras one for a tf_keras model."""
    if isinstance(model, keras.Model):
        return _Conversion
    # A tf_keras model's class comes from an imported tf_keras.
    tf_keras = sys.modules.get("tf_keras")
    if tf_keras is not None and isinstance(model, tf_keras.Model):
        from syncbn.convert_legacy import LegacyConversion

        return LegacyConversion
    raise TypeError(
        "Argument `model` must be a Keras model (`keras.Model`, or `tf.keras.Model` under "
        "TF_USE_LEGACY_KERAS=1; e.g. Functional, Sequential or a keras.applications model). "
        f"Received: model={model!r} of type {type(model).__name__}"
    )


def _check_arguments(conversion_class, group_size, communicator, to, layer_kwargs):
    if not isinstance(to, str) or to not in TARGETS:
        raise ValueError(f"Argument `to` must be one of {TARGETS}. Received: to={to!r}")
    collectives.validate_group_size(group_size)
    collectives.validate_spec(communicator)
    if to == "local" and (group_size is not None or communicator != "auto"):
        raise ValueError(
            "Arguments `group_size` and `communicator` only apply to to='sync'. "
            f"Received: to='local', group_size={group_size!r}, communicator={communicator!r}"
        )
    if layer_kwargs:
        if to == "local":
            raise ValueError(
                "Layer keyword arguments only apply to to='sync'. "
                f"Received: to='local', {', '.join(f'{k}={v!r}' for k, v in layer_kwargs.items())}"
            )
        # Validated once here (SyncBatchNormalization checks every argument),
        # rather than at the first converted layer.
        conversion_class.sync_batch_normalization(**layer_kwargs)


class _Conversion:
    """One call of `convert` on a Keras 3 model: what to swap, and the old-to-new layer pairs.

    The class attributes name the Keras; `clone_model` and `copy_variables`
    say how it copies a model and a layer's variables.
    """

    batch_normalization = keras.layers.BatchNormalization
    sync_batch_normalization = SyncBatchNormalization
    #: The models `clone_model` rebuilds layer by layer.
    rebuildable = (keras.Sequential, Functional)

    def __init__(self, to, group_size, communicator, layer_kwargs=None):
        self.to = to
        self.group_size = group_size
        self.communicator = communicator
        self.layer_kwargs = dict(layer_kwargs or {})
        if to == "sync":
            self.source_class, self.target_class = self.batch_normalization, self.sync_batch_normalization
        else:
            self.source_class, self.target_class = self.sync_batch_normalization, self.batch_normalization
        self.copied_pairs = []  # (original layer, its copy), each layer once
        self.converted_names = []

    def is_rebuildable(self, model):
        return isinstance(model, self.rebuildable)

    def is_source(self, layer):
        # Exact class only: a subclass may change what the layer computes, and
        # converting it would silently drop that (it is reported instead).
        return type(layer) is self.source_class

    def why_not_convertible(self, layer):
        """A reason string if `layer` is or holds a layer this call cannot convert."""
        if self.is_source(layer):
            if self.to == "sync" and layer.renorm:
                return f"renorm=True {_UNSUPPORTED}"
            return None
        if isinstance(layer, self.source_class):
            return (
                f"{type(layer).__name__} subclasses {self.source_class.__name__}; "
                "only the exact class is converted"
            )
        return None

    def find_unconvertible(self, model, prefix=""):
        """Paths (and reasons) of layers the graph rebuild cannot reach or convert.

        `clone_model` only sees the layers of Functional and Sequential
        models. Inside any other layer or model (subclassed ones, wrappers
        such as `TimeDistributed`) layers are attributes used by `call()`,
        which no rebuild can rewire.
        """
        found = []
        for layer in model.layers:
            path = f"{prefix}{model.name}/{layer.name}"
            if self.is_rebuildable(layer):
                found += self.find_unconvertible(layer, f"{prefix}{model.name}/")
                continue
            reason = self.why_not_convertible(layer)
            if reason:
                found.append(f"{path} ({reason})")
                continue
            for inner in layer._flatten_layers(include_self=False):
                if isinstance(inner, self.source_class):
                    found.append(
                        f"{path}/.../{inner.name} (inside {type(layer).__name__} "
                        f"'{layer.name}', which is not a Functional or Sequential model)"
                    )
        return found

    def source_config(self, layer):
        """The config of a layer to convert, from which its replacement is built."""
        return layer.get_config()

    def clone_layer(self, layer):
        """The `clone_function` for `keras.models.clone_model`."""
        config = self.source_config(layer) if self.is_source(layer) else layer.get_config()
        if self.is_source(layer):
            if self.to == "sync":
                config.update(communicator=self.communicator, group_size=self.group_size,
                              **self.layer_kwargs)
            else:
                for key in _SYNC_ONLY_KEYS:
                    config.pop(key, None)
                # The exported layer must not try to synchronize on its own.
                config["synchronized"] = False
            copy = self.target_class.from_config(config)
            self.converted_names.append(layer.name)
        else:
            # What clone_model does by default.
            copy = layer.__class__.from_config(config)
        self.copied_pairs.append((layer, copy))
        return copy

    def clone_model(self, model):
        """The converted copy of `model`, its variables not yet copied."""
        return keras.models.clone_model(model, clone_function=self.clone_layer, recursive=True)

    def copy_state(self):
        for original, copy in self.copied_pairs:
            self.copy_variables(original, copy)

    def copy_variables(self, original, copy):
        """Copies the variables of `original` (and of its sublayers) into `copy`."""
        originals = original._flatten_layers()
        copies = copy._flatten_layers()
        if len(originals) != len(copies):
            raise RuntimeError(
                f"The copy of layer '{original.name}' has {len(copies)} (sub)layers "
                f"where the original has {len(originals)}; its weights cannot be copied."
            )
        for source, target in zip(originals, copies):
            store = {}
            source.save_own_variables(store)
            if isinstance(source, self.sync_batch_normalization) and self.to == "local" \
                    and type(target) is self.target_class:
                # Keras BN's weights are the first ones (gamma and beta only if used).
                store = {str(i): store[str(i)] for i in range(len(target.weights))}
            target.load_own_variables(
                {key: keras.ops.convert_to_numpy(value) for key, value in store.items()}
            )


def _copy_trainable_flags(conversion, original, copy):
    # clone_model rebuilds a Functional model without its own `trainable`
    # flag (its layers keep theirs). Setting False is safe: it only
    # propagates down to layers that are already frozen.
    if not original.trainable and copy.trainable:
        copy.trainable = False
    for original_layer, copy_layer in zip(original.layers, copy.layers):
        if conversion.is_rebuildable(original_layer) and conversion.is_rebuildable(copy_layer):
            _copy_trainable_flags(conversion, original_layer, copy_layer)


def convert(model, group_size=None, communicator="auto", to="sync", **layer_kwargs):
    """Returns a copy of `model` with synchronized (or plain) batch normalization.

    With `to="sync"` (the default), every `keras.layers.BatchNormalization`
    becomes a `syncbn.SyncBatchNormalization` with the same config (name and
    dtype policy included, plus `group_size` and `communicator`) and the same
    weights, at any depth of nested Functional and Sequential models (such as
    `keras.applications` models). With `to="local"`, every
    `SyncBatchNormalization` becomes a plain `keras.layers.BatchNormalization`
    (with `synchronized=False`), for export and serving.

    The result is a new model: every layer is copied (with its weights, by
    `keras.models.clone_model` and the variable hooks of `model.save()`), so
    training it leaves `model` untouched. Layers shared inside `model` (a
    sub-model called twice) stay shared in the copy. A compiled model is
    recompiled from its compile config (with a fresh optimizer). Layers that
    are already of the target class are copied as they are.

    Subclassed models and layers are not converted: their `call()` uses
    layers held as attributes, which no copy can rewire. If one of them
    holds a layer to convert, nothing is converted and a `TypeError` lists
    every such layer; build those models with `syncbn.SyncBatchNormalization`
    (it takes the same arguments) instead.

    A tf_keras model (`tf.keras` under `TF_USE_LEGACY_KERAS=1`, e.g. from
    `tf.keras.applications`) converts the same way, between
    `tf.keras.layers.BatchNormalization` and the tf_keras
    `SyncBatchNormalization` (`syncbn.layers.legacy`), which keeps each
    layer's `fused` and so its moving-variance convention.

    The number of converted layers is logged (logger `syncbn.convert`, level
    INFO; also when it is zero) and stored on the result as
    `syncbn_converted_layers`, the list of their names.

    Args:
        model: a Functional or Sequential `keras.Model` (or tf_keras model).
        group_size: for `to="sync"`, the new layers' `group_size` (None: all
            replicas).
        communicator: for `to="sync"`, the new layers' `communicator`
            (default `"auto"`).
        to: `"sync"` or `"local"`.
        **layer_kwargs: for `to="sync"`, further `SyncBatchNormalization`
            arguments given to every converted layer, e.g.
            `moving_average="debiased"` or `nonfinite="raise"` (they
            override the original layer's config). The statistics copied
            from a `BatchNormalization` count as initial values, so with
            `"debiased"` the first update replaces them. With `to="local"`,
            the moving statistics are copied as they are (debiased ones are
            already corrected) and `moving_updates` is dropped.

    Returns:
        The converted copy of `model`.

    Raises:
        TypeError: if `model` is not a Keras model, or a layer to convert
            sits where it cannot be converted (inside a subclassed model or
            layer, or it is a subclass of the class to convert).
        ValueError: if `to`, `group_size`, `communicator` or a layer keyword
            argument is invalid, or a
            `BatchNormalization` uses `renorm=True` (or, in tf_keras,
            `virtual_batch_size` or `adjustment`).

    Example:

    >>> import keras, numpy as np, syncbn
    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 3)),
    ...     keras.layers.Conv2D(4, 3),
    ...     keras.layers.BatchNormalization(name="bn"),
    ... ])
    >>> synced = syncbn.convert(model)
    >>> type(synced.layers[1]).__name__, synced.syncbn_converted_layers
    ('SyncBatchNormalization', ['bn'])
    >>> x = np.ones((2, 8, 8, 3), "float32")
    >>> bool(np.allclose(model(x), synced(x)))
    True
    >>> exported = syncbn.convert(synced, to="local")
    >>> type(exported.layers[1]).__name__
    'BatchNormalization'
    """
    conversion_class = _conversion_class(model)
    _check_arguments(conversion_class, group_size, communicator, to, layer_kwargs)
    conversion = conversion_class(to, group_size, communicator, layer_kwargs)
    target = conversion.target_class.__name__
    if not conversion.is_rebuildable(model):
        blocked = [
            f"{model.name}/.../{layer.name}"
            for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, conversion.source_class)
        ]
        if blocked:
            raise TypeError(
                f"Cannot convert to {target} in the subclassed model "
                f"{type(model).__name__} '{model.name}': only Functional and Sequential "
                "models can be rebuilt. Layers that could not be converted: "
                f"{', '.join(blocked)}. Create them as {target} in the model's code instead."
            )
        raise TypeError(
            "Argument `model` must be a Functional or Sequential model: a subclassed "
            f"model cannot be copied layer by layer. Received: model={model.name!r} of "
            f"type {type(model).__name__} (it holds no layer to convert; use it as it is)."
        )
    blocked = conversion.find_unconvertible(model)
    if blocked:
        # An argument the layer cannot take (renorm) is a bad value; a layer out of reach, a type.
        error = ValueError if any(_UNSUPPORTED in item for item in blocked) else TypeError
        raise error(
            f"Cannot convert model '{model.name}' to {target}: nothing was converted. "
            f"Layers that could not be converted: {'; '.join(blocked)}."
        )

    converted = conversion.clone_model(model)
    if not converted.built and model.built:
        converted.build(model.input_shape)
    conversion.copy_state()
    _copy_trainable_flags(conversion, model, converted)
    converted.syncbn_converted_layers = list(conversion.converted_names)
    if conversion.converted_names:
        logger.info(
            "Converted %d %s layers to %s in model '%s'.",
            len(conversion.converted_names),
            conversion.source_class.__name__,
            target,
            model.name,
        )
    else:
        logger.info(
            "Converted 0 layers in model '%s': it has no %s layer; returning a copy.",
            model.name,
            conversion.source_class.__name__,
        )
    return converted
