"""The layer on one replica against the float64 NumPy reference.

Forward output, dx, dgamma, dbeta and the moving statistics, over ranks 2-5,
several channel axes, three input dtypes and masks.
"""

import itertools

import numpy as np
import pytest
import tensorflow as tf

import reference
from helpers import relative_error
from syncbn import SyncBatchNormalization

# Every test runs on both channels-last kernel sets (conftest.kernels).
pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("kernels")]

SHAPES_AND_AXES = [
    ((12, 5), -1),
    ((6, 4, 7), 1),
    ((6, 7, 4), -1),
    ((4, 5, 6, 3), -1),
    ((4, 3, 5, 6), 1),
    ((3, 4, 2, 5, 3), -1),
    ((3, 2, 4, 3, 5), 2),
]
# dtype policy -> tolerance on relative error (output is cast to the compute dtype).
POLICIES = {"float32": 2e-5, "mixed_float16": 2e-3, "mixed_bfloat16": 2e-2}
CASES = list(itertools.product(SHAPES_AND_AXES, POLICIES, [False, True]))
# Data mean per policy, near and far from zero (std 2). Far from zero, a float32
# sum of the raw data loses the variance; each input dtype gets an offset it
# can still represent to a fraction of the std.
OFFSETS = {
    "near zero": {"float32": 1.5, "mixed_float16": 1.5, "mixed_bfloat16": 1.5},
    "far from zero": {"float32": 1e4, "mixed_float16": 1e2, "mixed_bfloat16": 1e2},
}


@pytest.fixture(params=sorted(OFFSETS))
def offsets(request):
    return OFFSETS[request.param]


def _run_steps(layer, xs, dys, masks):
    results = []
    for x, dy, mask in zip(xs, dys, masks):
        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, mask=None if mask is None else tf.constant(mask))
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * dy)
        dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma, layer.beta])
        results.append({"y": y, "dx": dx, "dgamma": dgamma, "dbeta": dbeta})
    return results


@pytest.mark.parametrize("shape_axis,policy,masked", CASES)
def test_matches_float64_reference(shape_axis, policy, masked, offsets):
    shape, axis = shape_axis
    tolerance = POLICIES[policy]
    # A fixed seed per case (Python's hash() of a tuple of strings changes from run to run).
    rng = np.random.default_rng([20240517, CASES.index((shape_axis, policy, masked))])
    channel_axis = axis % len(shape)
    mask_shape = shape[:channel_axis] + shape[channel_axis + 1 :]
    input_dtype = {"float32": np.float32, "mixed_float16": np.float16}.get(policy, np.float32)
    steps = 3
    xs = [rng.normal(offsets[policy], 2.0, shape).astype(input_dtype) for _ in range(steps)]
    dys = [rng.normal(size=shape).astype(np.float32) for _ in range(steps)]
    masks = [rng.random(mask_shape) > 0.3 if masked else None for _ in range(steps)]
    gamma = rng.normal(1.0, 0.5, shape[channel_axis])
    beta = rng.normal(0.0, 0.5, shape[channel_axis])

    layer = SyncBatchNormalization(axis=axis, momentum=0.9, dtype=policy, communicator="local")
    if policy == "mixed_bfloat16":
        xs = [tf.cast(x, tf.bfloat16) for x in xs]
    layer.build(shape)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    results = _run_steps(layer, xs, dys, masks)

    moving_mean = np.zeros(shape[channel_axis])
    moving_variance = np.ones(shape[channel_axis])
    for x, dy, mask, got in zip(xs, dys, masks, results):
        x64 = np.asarray(tf.cast(x, tf.float64))
        # dy reaches the layer through the cast of y to float32 and back.
        dy_seen = np.asarray(tf.cast(tf.cast(dy, layer.compute_dtype), tf.float32))
        want = reference.batch_norm(x64, gamma, beta, dy_seen, axis, 1e-3, mask)
        for key in ("y", "dx", "dgamma", "dbeta"):
            assert relative_error(got[key], want[key]) < tolerance, key
        moving_mean = reference.moving_average(moving_mean, want["mean"], 0.9)
        moving_variance = reference.moving_average(moving_variance, want["variance"], 0.9)
    assert layer.moving_mean.dtype == "float32"
    assert relative_error(layer.moving_mean.numpy(), moving_mean) < 1e-5
    assert relative_error(layer.moving_variance.numpy(), moving_variance) < 1e-5


def test_reference_gradient_matches_autodiff():
    # The closed-form NumPy gradient is itself checked against TF autodiff of
    # the textbook formula in float64, with a mask.
    rng = np.random.default_rng(7)
    x = rng.normal(size=(5, 4, 3))
    dy = rng.normal(size=x.shape)
    mask = rng.random((5, 4)) > 0.3
    gamma = rng.normal(size=3)
    beta = rng.normal(size=3)
    want = reference.batch_norm(x, gamma, beta, dy, -1, 1e-3, mask)
    xt = tf.constant(x)
    w = tf.constant(mask[..., None].astype(np.float64))
    with tf.GradientTape() as tape:
        tape.watch(xt)
        mean = tf.reduce_sum(w * xt, [0, 1]) / tf.reduce_sum(w[..., 0])
        var = tf.reduce_sum(w * (xt - mean) ** 2, [0, 1]) / tf.reduce_sum(w[..., 0])
        y = gamma * (xt - mean) / tf.sqrt(var + 1e-3) + beta
        loss = tf.reduce_sum(y * dy)
    assert relative_error(tape.gradient(loss, xt), want["dx"]) < 1e-12
    assert relative_error(y, want["y"]) < 1e-12


def test_inference_uses_moving_statistics():
    layer = SyncBatchNormalization(communicator="local")
    layer.build((None, 3))
    layer.moving_mean.assign([1.0, 2.0, 3.0])
    layer.moving_variance.assign([4.0, 1.0, 0.25])
    x = np.array([[1.0, 0.0, 3.5]], np.float32)
    expected = (x - [1.0, 2.0, 3.0]) / np.sqrt(np.array([4.0, 1.0, 0.25]) + 1e-3)
    np.testing.assert_allclose(layer(x, training=False).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-6)
    # Inference leaves the moving statistics alone.
    np.testing.assert_array_equal(layer.moving_mean.numpy(), [1.0, 2.0, 3.0])


@pytest.mark.parametrize("shape,axis", [((2048, 4), -1), ((2048, 4, 1), 1)])
def test_large_offset_single_replica(shape, axis):
    # Far from zero the fused kernels see shifted data: output and moving
    # variance stay exact against float64 (Keras's own layer loses ~1e-3 here).
    rng = np.random.default_rng(5)
    x = (1e4 + rng.normal(size=shape)).astype(np.float32)
    dy = rng.normal(size=shape)
    layer = SyncBatchNormalization(axis=axis, momentum=0.0, communicator="local")
    layer.build(shape)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt, training=True)
        loss = tf.reduce_sum(y * dy)
    want = reference.batch_norm(x, np.ones(4), np.zeros(4), dy, axis, 1e-3)
    assert relative_error(y, want["y"]) < 1e-5
    assert relative_error(tape.gradient(loss, xt), want["dx"]) < 1e-4
    assert relative_error(layer.moving_variance.numpy(), want["variance"]) <= 1e-5


def test_empty_and_single_sample_batches_on_the_fused_path():
    layer = SyncBatchNormalization(momentum=0.5, communicator="local")
    layer.build((None, 3))
    x = tf.zeros((0, 3))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
    grads = tape.gradient(y, [x, layer.gamma, layer.beta])
    assert y.shape == (0, 3)
    for g in grads[1:]:
        np.testing.assert_array_equal(g.numpy(), 0.0)
    one = tf.constant([[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(layer(one, training=True).numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(layer.moving_mean.numpy(), [0.5, 1.0, 1.5])
    np.testing.assert_allclose(layer.moving_variance.numpy(), 0.5)

