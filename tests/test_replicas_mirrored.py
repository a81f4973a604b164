"""Replica equivalence in one process: MirroredStrategy on 4 virtual CPUs.

Per-replica batches of 5, 0, 11 and 3 samples must give the outputs,
gradients (summed over replicas) and moving statistics of one
`keras.layers.BatchNormalization` on the 19 samples concatenated.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import reference
from helpers import relative_error
from jobs import exactness
from syncbn import SyncBatchNormalization

# Every test runs on both channels-last kernel sets (conftest.kernels).
pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("kernels")]

COUNTS = [5, 0, 11, 3]
LAYOUTS = {"2d": ((7,), -1), "nhwc": ((3, 3, 4), -1), "ncw": ((4, 6), 1)}
STEPS = 3
TOLERANCE = 2e-4
MOMENTUM = 0.8


# Data mean: near zero, and far from zero where a float32 sum of the raw data
# loses the variance (and Keras's float32 layer is no reference: float64 is).
OFFSETS = {"near zero": 4.0, "far from zero": 1e4}


@pytest.fixture(params=sorted(OFFSETS))
def offset(request):
    return OFFSETS[request.param]


def _global_batches(feature_shape, seed, offset=4.0):
    rng = np.random.default_rng(seed)
    shape = (sum(COUNTS),) + feature_shape
    return [
        (rng.normal(offset, 3.0, shape).astype(np.float32), rng.normal(size=shape).astype(np.float32))
        for _ in range(STEPS)
    ]


def _run_mirrored(strategy, layer, batches, counts):
    bounds = np.cumsum([0] + counts)

    @tf.function
    def step(x, dy):
        return strategy.run(lambda x, dy: exactness.layer_gradients(layer, x, dy), args=(x, dy))

    results = []
    for x, dy in batches:
        def split(array):
            return strategy.experimental_distribute_values_from_function(
                lambda ctx: tf.constant(
                    array[bounds[ctx.replica_id_in_sync_group] : bounds[ctx.replica_id_in_sync_group + 1]]
                )
            )

        y, dx, dgamma, dbeta = step(split(x), split(dy))
        local = strategy.experimental_local_results
        results.append(
            {
                "y": [v.numpy() for v in local(y)],
                "dx": [v.numpy() for v in local(dx)],
                "dgamma": [v.numpy() for v in local(dgamma)],
                "dbeta": [v.numpy() for v in local(dbeta)],
            }
        )
    return results


def _keras_reference(batches, feature_shape, axis, weights):
    layer = keras.layers.BatchNormalization(axis=axis, momentum=MOMENTUM)
    layer.build((None,) + feature_shape)
    layer.set_weights(weights)
    results = []
    for x, dy in batches:
        y, dx, dgamma, dbeta = exactness.layer_gradients(layer, tf.constant(x), dy)
        results.append({"y": y.numpy(), "dx": dx.numpy(), "dgamma": dgamma.numpy(), "dbeta": dbeta.numpy()})
    return results, {name: getattr(layer, name).numpy() for name in ("moving_mean", "moving_variance")}


def _float64_reference(batches, axis, weights):
    gamma, beta, moving_mean, moving_variance = [w.astype(np.float64) for w in weights]
    results = []
    for x, dy in batches:
        want = reference.batch_norm(x, gamma, beta, dy, axis, 1e-3)
        results.append({key: want[key] for key in ("y", "dx", "dgamma", "dbeta")})
        moving_mean = reference.moving_average(moving_mean, want["mean"], MOMENTUM)
        moving_variance = reference.moving_average(moving_variance, want["variance"], MOMENTUM)
    return results, {"moving_mean": moving_mean, "moving_variance": moving_variance}


def _make_layer(strategy, feature_shape, axis, **kwargs):
    with strategy.scope():
        layer = SyncBatchNormalization(
            axis=axis, momentum=MOMENTUM, gamma_initializer="random_normal", beta_initializer="random_normal", **kwargs
        )
        layer.build((None,) + feature_shape)
    return layer


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_uneven_replicas_match_one_layer_on_global_batch(mirrored_strategy, layout, offset):
    strategy = mirrored_strategy
    feature_shape, axis = LAYOUTS[layout]
    layer = _make_layer(strategy, feature_shape, axis)
    batches = _global_batches(feature_shape, seed=len(layout), offset=offset)
    initial_weights = [w.numpy() for w in layer.weights]
    got = _run_mirrored(strategy, layer, batches, COUNTS)
    if offset == OFFSETS["near zero"]:
        want, want_moving = _keras_reference(batches, feature_shape, axis, initial_weights)
    else:
        # Keras's float32 layer folds the mean into an offset, which cancels here.
        want, want_moving = _float64_reference(batches, axis, initial_weights)
    for step_got, step_want in zip(got, want):
        assert relative_error(np.concatenate(step_got["y"]), step_want["y"]) < TOLERANCE
        assert relative_error(np.concatenate(step_got["dx"]), step_want["dx"]) < TOLERANCE
        assert relative_error(sum(step_got["dgamma"]), step_want["dgamma"]) < TOLERANCE
        assert relative_error(sum(step_got["dbeta"]), step_want["dbeta"]) < TOLERANCE
        assert step_got["y"][1].shape[0] == 0  # the empty replica took part
    for name, expected in want_moving.items():
        # Every replica's copy holds the same, global value.
        for copy in strategy.experimental_local_results(getattr(layer, name).value):
            assert relative_error(copy.numpy(), expected) < TOLERANCE, name


def test_group_size_two_syncs_within_consecutive_pairs(mirrored_strategy):
    strategy = mirrored_strategy
    feature_shape, axis = LAYOUTS["2d"]
    layer = _make_layer(strategy, feature_shape, axis, group_size=2)
    batches = _global_batches(feature_shape, seed=11)
    weights = [w.numpy() for w in layer.weights]
    got = _run_mirrored(strategy, layer, batches, COUNTS)
    split_at = COUNTS[0] + COUNTS[1]
    for group, replicas, rows in ((0, [0, 1], slice(0, split_at)), (1, [2, 3], slice(split_at, None))):
        group_batches = [(x[rows], dy[rows]) for x, dy in batches]
        want, want_moving = _keras_reference(group_batches, feature_shape, axis, weights)
        for step_got, step_want in zip(got, want):
            y = np.concatenate([step_got["y"][r] for r in replicas])
            dx = np.concatenate([step_got["dx"][r] for r in replicas])
            assert relative_error(y, step_want["y"]) < TOLERANCE, group
            assert relative_error(dx, step_want["dx"]) < TOLERANCE, group
        copies = strategy.experimental_local_results(layer.moving_variance.value)
        for r in replicas:
            assert relative_error(copies[r].numpy(), want_moving["moving_variance"]) < TOLERANCE


def test_auto_detects_tf_distribute_inside_replica_context(mirrored_strategy):
    strategy = mirrored_strategy
    from syncbn import collectives

    @tf.function
    def detect_in_replica():
        return strategy.run(lambda: tf.constant(collectives.detect() == "tf.distribute"))

    assert all(v.numpy() for v in strategy.experimental_local_results(detect_in_replica()))
    assert collectives.detect() == "local"
