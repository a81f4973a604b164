"""SyncBatchNormalization behaves as a Keras layer and a drop-in for BatchNormalization."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import relative_error
from syncbn import SyncBatchNormalization

pytestmark = pytest.mark.unit


def _small_model(**bn_kwargs):
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3, use_bias=False),
            SyncBatchNormalization(**bn_kwargs),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )


def test_same_defaults_and_arguments_as_keras_batch_normalization():
    ours = SyncBatchNormalization().get_config()
    theirs = keras.layers.BatchNormalization().get_config()
    for key, value in theirs.items():
        if key in ("name", "synchronized"):
            continue
        assert ours[key] == value, key
    # A BatchNormalization config loads into the synced layer as it is.
    layer = SyncBatchNormalization.from_config(keras.layers.BatchNormalization(axis=1).get_config())
    assert layer.axis == 1


def test_get_config_round_trip():
    layer = SyncBatchNormalization(
        axis=1,
        momentum=0.9,
        epsilon=1e-5,
        center=False,
        gamma_regularizer="l2",
        communicator="mpi",
        group_size=2,
        name="bn",
    )
    config = layer.get_config()
    clone = SyncBatchNormalization.from_config(config)
    assert clone.get_config() == config
    assert (clone.axis, clone.momentum, clone.epsilon, clone.center) == (1, 0.9, 1e-5, False)
    assert (clone.communicator, clone.group_size) == ("mpi", 2)


@pytest.mark.parametrize(
    "center,scale,trainable,non_trainable", [(True, True, 2, 2), (False, True, 1, 2), (False, False, 0, 2)]
)
def test_weight_counts(center, scale, trainable, non_trainable):
    layer = SyncBatchNormalization(center=center, scale=scale)
    layer.build((None, 5))
    assert len(layer.trainable_weights) == trainable
    assert len(layer.non_trainable_weights) == non_trainable
    names = [w.name for w in layer.non_trainable_weights]
    assert names == ["moving_mean", "moving_variance"]


@pytest.mark.parametrize(
    "kwargs,error,needle",
    [
        ({"momentum": 1.5}, ValueError, "momentum=1.5"),
        ({"momentum": -0.1}, ValueError, "momentum=-0.1"),
        ({"momentum": "high"}, TypeError, "momentum='high'"),
        ({"epsilon": 0.0}, ValueError, "epsilon=0.0"),
        ({"axis": "last"}, TypeError, "axis='last'"),
        ({"center": "yes"}, TypeError, "center='yes'"),
        ({"communicator": "nccl"}, ValueError, "communicator='nccl'"),
        ({"communicator": object()}, TypeError, "communicator=<object"),
        ({"group_size": 0}, ValueError, "group_size=0"),
        ({"group_size": 2.5}, ValueError, "group_size=2.5"),
        ({"renorm": True}, ValueError, "renorm=True"),
    ],
)
def test_bad_arguments_name_argument_and_value(kwargs, error, needle):
    with pytest.raises(error) as info:
        SyncBatchNormalization(**kwargs)
    assert needle in str(info.value)
    assert f"`{next(iter(kwargs))}`" in str(info.value)


@pytest.mark.parametrize(
    "axis,shape,needle", [(3, (None, 4), "axis=3"), (0, (None, 4), "axis=0"), (-1, (None,), "rank >= 2")]
)
def test_bad_axis_for_input_shape(axis, shape, needle):
    with pytest.raises(ValueError, match=needle):
        SyncBatchNormalization(axis=axis).build(shape)


def test_bad_mask_shape():
    layer = SyncBatchNormalization()
    with pytest.raises(ValueError, match="mask.shape"):
        layer(np.zeros((2, 3, 4), np.float32), training=True, mask=np.ones((2, 3, 4), bool))


def test_save_and_load_keeps_moving_statistics(tmp_path):
    model = _small_model(momentum=0.5)
    model.compile(optimizer="sgd", loss=keras.losses.MeanSquaredError())
    x = np.random.default_rng(0).normal(3.0, 2.0, (32, 6, 6, 2)).astype(np.float32)
    y = np.zeros((32, 3), np.float32)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    bn = model.layers[1]
    assert not np.allclose(bn.moving_mean.numpy(), 0.0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    loaded_bn = loaded.layers[1]
    assert isinstance(loaded_bn, SyncBatchNormalization)
    np.testing.assert_array_equal(loaded_bn.moving_mean.numpy(), bn.moving_mean.numpy())
    np.testing.assert_array_equal(loaded_bn.moving_variance.numpy(), bn.moving_variance.numpy())
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)

    # A loaded model also runs in a plain process with nothing else set up.
    script = textwrap.dedent(
        f"""
        import numpy as np, keras, syncbn
        model = keras.saving.load_model({path!r})
        x = np.ones((2, 6, 6, 2), np.float32)
        print(float(model.predict(x, verbose=0).sum()))
        model(x, training=True)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "HOROVOD_"))},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    expected = float(model.predict(np.ones((2, 6, 6, 2), np.float32), verbose=0).sum())
    assert abs(float(result.stdout.strip().splitlines()[-1]) - expected) < 1e-4


def test_fit_evaluate_predict_update_moving_statistics_only_in_training():
    model = _small_model()
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(1).normal(size=(16, 6, 6, 2)).astype(np.float32)
    y = np.zeros((16, 3), np.float32)
    bn = model.layers[1]
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    after_fit = bn.moving_mean.numpy().copy()
    assert not np.allclose(after_fit, 0.0)
    model.evaluate(x, y, verbose=0)
    model.predict(x, verbose=0)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), after_fit)


def test_training_flag_as_variable_inside_one_tf_function():
    layer = SyncBatchNormalization(momentum=0.0, communicator="local")
    x = tf.constant(np.random.default_rng(2).normal(5.0, 2.0, (64, 3)).astype(np.float32))
    layer.build(x.shape)
    is_training = tf.Variable(True)
    traces = []

    @tf.function
    def step(x):
        traces.append(1)
        return layer(x, training=is_training)

    y_train = step(x)
    np.testing.assert_allclose(np.mean(y_train.numpy(), 0), 0.0, atol=1e-5)
    # momentum=0: the moving statistics are now the batch statistics.
    np.testing.assert_allclose(layer.moving_mean.numpy(), np.mean(x.numpy(), 0), rtol=1e-5)
    is_training.assign(False)
    layer.moving_mean.assign([0.0, 0.0, 0.0])
    layer.moving_variance.assign([1.0, 1.0, 1.0])
    y_eval = step(x)
    np.testing.assert_allclose(y_eval.numpy(), x.numpy() / np.sqrt(1.0 + 1e-3), rtol=1e-5)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), [0.0, 0.0, 0.0])
    assert len(traces) == 1  # one trace served both modes


@pytest.mark.parametrize("shape,axis", [((8, 4), -1), ((8, 4, 3), 1)])
def test_gradient_with_training_flag_variable_inside_tf_function(shape, axis):
    # A tensor training flag puts the layer inside tf.cond; its gradient must
    # still flow on the fused (channels-last) and the exact path.
    layer = SyncBatchNormalization(axis=axis, communicator="local")
    model = keras.Sequential([keras.Input(shape[1:]), layer])
    flag = tf.Variable(True)
    x = tf.constant(np.random.default_rng(6).normal(size=shape).astype(np.float32))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(model(x, training=flag) ** 3)
        return tape.gradient(loss, [x] + model.trainable_variables)

    grads = step(x)
    eager_layer = SyncBatchNormalization(axis=axis, communicator="local")
    eager_layer.build(shape)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(eager_layer(x, training=True) ** 3)
    expected = tape.gradient(loss, [x] + eager_layer.trainable_variables)
    for got, want in zip(grads, expected):
        assert relative_error(got, want) < 1e-5


def test_training_flag_as_tensor_eagerly():
    layer = SyncBatchNormalization(momentum=0.0)
    x = np.random.default_rng(3).normal(2.0, 1.0, (32, 2)).astype(np.float32)
    layer(x, training=tf.constant(True))
    np.testing.assert_allclose(layer.moving_mean.numpy(), x.mean(0), rtol=1e-5)


def test_frozen_layer_runs_in_inference_mode():
    layer = SyncBatchNormalization()
    layer.build((None, 2))
    layer.trainable = False
    x = np.full((4, 2), 10.0, np.float32)
    np.testing.assert_allclose(layer(x, training=True).numpy(), 10.0 / np.sqrt(1.001), rtol=1e-6)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), [0.0, 0.0])


def test_mixed_precision_policy_keeps_float32_variables_and_statistics():
    layer = SyncBatchNormalization(dtype="mixed_float16", momentum=0.0)
    x = (1e3 + np.random.default_rng(4).normal(size=(256, 4))).astype(np.float16)
    y = layer(x, training=True)
    assert y.dtype == tf.float16
    assert layer.gamma.dtype == "float32" and layer.moving_variance.dtype == "float32"
    truth = x.astype(np.float64).var(0)
    assert relative_error(layer.moving_variance.numpy(), truth) < 1e-3


def test_empty_batch_leaves_moving_statistics_unchanged():
    layer = SyncBatchNormalization(communicator="local")
    layer.build((None, 3))
    y = layer(np.zeros((0, 3), np.float32), training=True)
    assert y.shape == (0, 3)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), 0.0)
    np.testing.assert_array_equal(layer.moving_variance.numpy(), 1.0)


def test_unavailable_communicator_says_why():
    layer = SyncBatchNormalization(communicator="tf.distribute")
    with pytest.raises(RuntimeError, match="strategy"):
        layer(np.zeros((2, 3), np.float32), training=True)
    layer = SyncBatchNormalization(communicator="local", group_size=2)
    with pytest.raises(ValueError, match="group_size=2"):
        layer(np.zeros((2, 3), np.float32), training=True)


def test_wrong_channel_count_at_run_time_is_a_clear_error():
    layer = SyncBatchNormalization(communicator="local")
    layer.build((None, 5, 6))

    @tf.function(input_signature=[tf.TensorSpec([None, 5, None])])
    def call(x):
        return layer(x, training=True)

    with pytest.raises(tf.errors.InvalidArgumentError, match="expects 6 channels"):
        call(tf.zeros((0, 5, 3)))


def test_wrong_channel_count_behind_a_static_shape_is_a_clear_error():
    # A kernel that returns a tensor whose run-time shape contradicts its
    # static one (TensorFlow 2.18's oneDNN kernels do, for empty batches):
    # the layer's EnsureShape, named after the layer, stops it.
    layer = SyncBatchNormalization(communicator="local", name="bn_static")
    layer.build((None, 5, 6))

    @tf.function(input_signature=[tf.TensorSpec([None, 5, None])])
    def call(x):
        claims_six = tf.reshape(x, tf.shape(x))
        claims_six.set_shape([None, 5, 6])
        return layer(claims_six, training=True)

    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"(?s)\[0,5,3\] is not compatible with expected shape \[\?,5,6\].*bn_static_channels"):
        call(tf.zeros((0, 5, 3)))
