"""`check_consistency`: do all replicas hold the same batch-norm state?

Every replica of a synchronization group should hold bit-identical `gamma`,
`beta` and moving statistics (the same global statistics and averaged
gradients reach all of them). A replica that diverged (a hand edit, a
restore on one rank only, a non-deterministic op) silently makes the job's
result depend on which rank saves. See docs/moving-statistics.md.
"""

import numpy as np
import tensorflow as tf

from syncbn import collectives
from syncbn.recalibration import _check_model, _strategy, synchronized_layers

# A difference is reported when it exceeds this fraction of the value's size.
# Replicas are bit-identical when consistent; this only absorbs float64
# rounding in the spread of more than 32 replicas (see `check_consistency`).
DEFAULT_TOLERANCE = 1e-6


class InconsistentReplicasError(RuntimeError):
    """Raised by `check_consistency(..., strict=True)` when replicas differ."""


def _layer_state(layer):
    """`(name, variable)` of the state compared for `layer`."""
    names = ["gamma", "beta", "moving_mean", "moving_variance", "moving_updates"]
    return [(name, getattr(layer, name)) for name in names if getattr(layer, name, None) is not None]


def _groups(layers):
    """Layers by (communicator, group_size): each combination needs its own all-reduce."""
    groups = {}
    for layer in layers:
        spec = layer.communicator if isinstance(layer.communicator, str) else id(layer.communicator)
        groups.setdefault((spec, layer.group_size), []).append(layer)
    return groups


def _spreads(layers, strategy):
    """Per (layer, weight): twice the largest standard deviation across replicas, and its scale."""
    state = [(layer, name, variable) for layer in layers for name, variable in _layer_state(layer)]

    def summed():
        communicator = collectives.resolve(layers[0].communicator, layers[0].group_size)
        values = tf.concat([tf.reshape(tf.cast(v, tf.float64), [-1]) for _, _, v in state], 0)
        # [D], [D], [1] -> [2D + 1]: from the sums of x and x^2, every entry's spread.
        packed = tf.concat([values, tf.square(values), tf.ones([1], tf.float64)], 0)
        return communicator.all_sum(packed, name="syncbn/check_consistency")

    if strategy is None:
        total = summed().numpy()
    else:
        per_replica = tf.function(lambda: strategy.run(summed))()
        total = strategy.experimental_local_results(per_replica)[0].numpy()
    size = (total.size - 1) // 2
    sums, squares, replicas = total[:size], total[size:2 * size], total[-1]
    # R * sum(x^2) - (sum x)^2 = R^2 var: exactly 0 for equal float32 values
    # when R * x^2 sums exactly in float64 (up to 32 replicas).
    variance = np.maximum(replicas * squares - sums * sums, 0.0) / (replicas * replicas)
    mean = sums / replicas
    found, start = [], 0
    for layer, name, variable in state:
        stop = start + int(np.prod(variable.shape))
        # By Popoviciu's inequality the range is at least 2 std: exact for 2 replicas.
        spread = 2.0 * np.sqrt(variance[start:stop])
        scale = np.abs(mean[start:stop])
        found.append((layer, name, spread, scale))
        start = stop
    return found, int(round(replicas))


def check_consistency(model, strict=False, tolerance=DEFAULT_TOLERANCE):
    """Compares every SyncBatchNormalization's state across the replicas of its group.

    For every synchronized layer, `gamma`, `beta`, `moving_mean`,
    `moving_variance` (and `moving_updates`) are compared across the
    replicas that synchronize it, with one all-reduce (per communicator and
    group size; one in a usual model) of the sums of every value and of its
    square, in float64. Every replica gets the same answer, so with
    `strict=True` all of them raise together. Call it on every replica (it
    is a collective, like a training step), outside `tf.function`.

    A value counts as differing when its spread across replicas exceeds
    `tolerance` times its mean magnitude (or `tolerance` itself when that is
    below 1). The reported `difference` is twice the largest standard
    deviation across replicas of one entry: the difference itself with two
    replicas, and a lower bound on the largest difference between two
    replicas with more.

    Args:
        model: a Keras model (layers without synchronization are ignored).
        strict: if True, raise instead of returning differing layers.
        tolerance: relative tolerance, >= 0 (default 1e-6).

    Returns:
        A list of dicts `{"layer", "weight", "difference", "replicas"}`, one
        per differing layer (its largest difference), largest first; empty
        when every replica agrees (and always with one replica).

    Raises:
        InconsistentReplicasError: with `strict=True`, if some layer differs,
            naming every such layer.
        TypeError, ValueError: for invalid arguments.

    Example:

    ```python
    import keras, syncbn

    model = keras.Sequential([keras.Input((4,)), syncbn.SyncBatchNormalization()])
    assert syncbn.check_consistency(model) == []   # one process: nothing differs
    ```
    """
    _check_model(model)
    if not isinstance(strict, bool):
        raise TypeError(f"Argument `strict` must be a bool. Received: strict={strict!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(f"Argument `tolerance` must be a number >= 0. Received: tolerance={tolerance!r}")
    layers = [layer for layer in synchronized_layers(model) if layer.built]
    strategy = _strategy(model)
    differing = {}
    for group in _groups(layers).values():
        found, replicas = _spreads(group, strategy)
        for layer, name, spread, scale in found:
            excess = spread > tolerance * np.maximum(scale, 1.0)
            if not np.any(excess):
                continue
            difference = float(np.max(spread))
            if difference > differing.get(layer.name, {}).get("difference", -1.0):
                differing[layer.name] = {"layer": layer.name, "weight": name,
                                         "difference": difference, "replicas": replicas}
    result = sorted(differing.values(), key=lambda item: -item["difference"])
    if strict and result:
        listed = "; ".join(f"'{d['layer']}' ({d['weight']} differs by {d['difference']:.3g})"
                           for d in result)
        raise InconsistentReplicasError(
            f"SyncBatchNormalization state differs across replicas in {len(result)} "
            f"layer(s): {listed}."
        )
    return result
