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


def _run_mirrored(strategy, layer, batches, counts, masks=None):
    bounds = np.cumsum([0] + counts)

    @tf.function
    def step(x, dy, mask):
        return strategy.run(lambda x, dy, mask: exactness.layer_gradients(layer, x, dy, mask),
                            args=(x, dy, mask))

    results = []
    for index, (x, dy) in enumerate(batches):
        def split(array):
            return strategy.experimental_distribute_values_from_function(
                lambda ctx: tf.constant(
                    array[bounds[ctx.replica_id_in_sync_group] : bounds[ctx.replica_id_in_sync_group + 1]]
                )
            )

        mask = None if masks is None else split(masks[index])
        y, dx, dgamma, dbeta = step(split(x), split(dy), mask)
        local = strategy.experimental_local_results
        results.append(
            {
                "y": [v.numpy() for v in local(y)],
                "dx": [v.numpy() for v in local(dx)],
                "dgamma": [v.numpy() for v in local(dgamma)],
                "dbeta": [v.numpy() for v in local(dbeta)],
                # The moving weights after the step, as the first replica stores them.
                "state": {w.name: local(w.value)[0].numpy() for w in layer.non_trainable_weights},
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


def _compare(strategy, layer, got, want, want_moving):
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
    _compare(strategy, layer, got, want, want_moving)


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


# -- batch renormalization and masks ------------------------------------------------------

RENORM_CLIPPING = {"none": None, "clipped": {"rmax": 1.5, "rmin": 0.7, "dmax": 0.8}}
RENORM_MOMENTUM = 0.6
# renorm's five moving weights, and the moving statistics without it.
RENORM_WEIGHTS = reference.RENORM_WEIGHTS
PLAIN_WEIGHTS = ("moving_mean", "moving_variance")


def _keras_reference_layer(feature_shape, axis, weights, **kwargs):
    layer = keras.layers.BatchNormalization(axis=axis, momentum=MOMENTUM, **kwargs)
    layer.build((None,) + feature_shape)
    layer.set_weights(weights)
    return layer


def _renorm_float64_reference(batches, axis, layer_weights, clipping, got):
    """The float64 reference with renorm, each step from the state the layer stored.

    The layer keeps its moving weights in float32 (as Keras does): at 1e4 the
    stored renorm mean is 1e-3 away from a float64 recursion's, and d moves
    with it. So each step starts from what the layer stored after the last,
    and the update itself is checked one step at a time.
    """
    gamma, beta = (w.astype(np.float64) for w in layer_weights[:2])
    states = [dict(zip(RENORM_WEIGHTS, layer_weights[2:]))] + [step["state"] for step in got]
    results = []
    for (x, dy), state, stored in zip(batches, states, states[1:]):
        state = {name: value.astype(np.float64) for name, value in state.items()}
        renorm = {"mean": state["renorm_mean"], "stddev": state["renorm_stddev"], **(clipping or {})}
        want = reference.batch_norm(x, gamma, beta, dy, axis, 1e-3, renorm=renorm)
        results.append({key: want[key] for key in ("y", "dx", "dgamma", "dbeta")})
        state = reference.renorm_moving_statistics(state, want["mean"], want["variance"],
                                                   want["count"], 1e-3, MOMENTUM, RENORM_MOMENTUM)
        for name, value in state.items():
            assert relative_error(stored[name], value) < TOLERANCE, name
    return results, state


@pytest.mark.parametrize("clipping", sorted(RENORM_CLIPPING))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_renorm_uneven_replicas_match_keras_renorm_on_global_batch(mirrored_strategy, layout,
                                                                   clipping, offset):
    strategy = mirrored_strategy
    # r and d from the global statistics: outputs, input gradients, summed gamma/beta
    # gradients and all five moving weights equal Keras's renorm=True on the 19
    # samples concatenated (far from zero: the float64 reference).
    feature_shape, axis = LAYOUTS[layout]
    renorm_kwargs = dict(renorm=True, renorm_momentum=RENORM_MOMENTUM,
                         renorm_clipping=RENORM_CLIPPING[clipping])
    layer = _make_layer(strategy, feature_shape, axis, **renorm_kwargs)
    # Renorm statistics near the data, so r and d are neither 1 and 0 nor clipped away.
    rng = np.random.default_rng(5)
    channels = layer.moving_mean.shape[0]
    with strategy.scope():
        layer.renorm_mean.assign((offset + rng.normal(0.0, 2.0, channels)).astype(np.float32))
        layer.renorm_stddev.assign(rng.uniform(1.5, 5.0, channels).astype(np.float32))
    batches = _global_batches(feature_shape, seed=len(layout) + 20, offset=offset)
    initial_weights = [w.numpy() for w in layer.weights]
    got = _run_mirrored(strategy, layer, batches, COUNTS)
    if offset == OFFSETS["near zero"]:
        keras_layer = _keras_reference_layer(feature_shape, axis, initial_weights, **renorm_kwargs)
        want = []
        for x, dy in batches:
            y, dx, dgamma, dbeta = exactness.layer_gradients(keras_layer, tf.constant(x), dy)
            want.append({"y": y.numpy(), "dx": dx.numpy(), "dgamma": dgamma.numpy(),
                         "dbeta": dbeta.numpy()})
        want_moving = {name: getattr(keras_layer, name).numpy() for name in RENORM_WEIGHTS}
    else:
        want, want_moving = _renorm_float64_reference(batches, axis, initial_weights,
                                                      RENORM_CLIPPING[clipping], got)
    _compare(strategy, layer, got, want, want_moving)


MASKED_LAYOUTS = {"nhwc": LAYOUTS["nhwc"], "ncw": LAYOUTS["ncw"]}


@pytest.mark.parametrize("renorm", [False, True], ids=["plain", "renorm"])
@pytest.mark.parametrize("layout", sorted(MASKED_LAYOUTS))
def test_masked_uneven_replicas_match_keras_on_global_batch(mirrored_strategy, layout, renorm):
    strategy = mirrored_strategy
    # Keras's mask convention (the input's shape without its last axis): with
    # channels on axis 1 ("ncw") each channel has its own global count. Replica 3
    # is fully masked out; the statistics stay synchronized and exact.
    feature_shape, axis = MASKED_LAYOUTS[layout]
    kwargs = dict(renorm=True, renorm_momentum=RENORM_MOMENTUM) if renorm else {}
    layer = _make_layer(strategy, feature_shape, axis, **kwargs)
    batches = _global_batches(feature_shape, seed=len(layout) + 30)
    rng = np.random.default_rng(6)
    mask_shape = (sum(COUNTS),) + feature_shape[:-1]
    masks = [rng.random(mask_shape) > 0.35 for _ in batches]
    for mask in masks:
        mask[sum(COUNTS[:3]):] = False
    initial_weights = [w.numpy() for w in layer.weights]
    got = _run_mirrored(strategy, layer, batches, COUNTS, masks)
    keras_layer = _keras_reference_layer(feature_shape, axis, initial_weights, **kwargs)
    want = []
    for (x, dy), mask in zip(batches, masks):
        y, dx, dgamma, dbeta = exactness.layer_gradients(keras_layer, tf.constant(x), dy,
                                                         tf.constant(mask))
        want.append({"y": y.numpy(), "dx": dx.numpy(), "dgamma": dgamma.numpy(),
                     "dbeta": dbeta.numpy()})
    names = RENORM_WEIGHTS if renorm else PLAIN_WEIGHTS
    want_moving = {name: getattr(keras_layer, name).numpy() for name in names}
    if layout == "ncw":
        counts = [np.broadcast_to(m[..., None], (sum(COUNTS),) + feature_shape).sum(axis=(0, 2))
                  for m in masks]
        assert all(len(set(c)) > 1 for c in counts)  # the counts differ per channel
    _compare(strategy, layer, got, want, want_moving)


@pytest.mark.parametrize("renorm", [False, True], ids=["plain", "renorm"])
def test_fully_masked_global_batch_gives_no_nan_and_no_update(mirrored_strategy, renorm):
    strategy = mirrored_strategy
    # No sample anywhere: outputs as Keras's (mean 0, variance 0), finite gradients,
    # and no moving weight averaged from nothing (Keras would average zeros in).
    feature_shape, axis = LAYOUTS["ncw"]
    kwargs = dict(renorm=True, renorm_momentum=RENORM_MOMENTUM) if renorm else {}
    layer = _make_layer(strategy, feature_shape, axis, **kwargs)
    batches = _global_batches(feature_shape, seed=40)[:1]
    masks = [np.zeros((sum(COUNTS),) + feature_shape[:-1], bool)]
    initial_weights = [w.numpy() for w in layer.weights]
    got = _run_mirrored(strategy, layer, batches, COUNTS, masks)
    keras_layer = _keras_reference_layer(feature_shape, axis, initial_weights, **kwargs)
    (x, dy), = batches
    y, dx, dgamma, dbeta = exactness.layer_gradients(keras_layer, tf.constant(x), dy,
                                                     tf.constant(masks[0]))
    for key in ("y", "dx", "dgamma", "dbeta"):
        assert all(np.isfinite(v).all() for v in got[0][key]), key
    assert relative_error(np.concatenate(got[0]["y"]), y.numpy()) < TOLERANCE
    assert relative_error(np.concatenate(got[0]["dx"]), dx.numpy()) < TOLERANCE
    assert relative_error(sum(got[0]["dgamma"]), dgamma.numpy()) < TOLERANCE
    names = RENORM_WEIGHTS if renorm else PLAIN_WEIGHTS
    for name, initial in zip(names, initial_weights[2:]):
        for copy in strategy.experimental_local_results(getattr(layer, name).value):
            np.testing.assert_array_equal(copy.numpy(), initial, err_msg=name)
    # Keras averaged zeros in (its variance moved towards 0): a real difference.
    assert np.all(keras_layer.moving_variance.numpy() < initial_weights[3])
