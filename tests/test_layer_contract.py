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


@pytest.mark.parametrize("moving_average", ["ema", "debiased"])
@pytest.mark.parametrize("renorm", [False, True])
def test_weights_in_keras_order_then_moving_updates(renorm, moving_average):
    keras_layer = keras.layers.BatchNormalization(renorm=renorm)
    layer = SyncBatchNormalization(renorm=renorm, moving_average=moving_average)
    keras_layer.build((None, 3, 5))
    layer.build((None, 3, 5))
    names = [w.name for w in layer.weights]
    keras_names = [w.name for w in keras_layer.weights]
    assert names[:len(keras_names)] == keras_names
    assert names[len(keras_names):] == (["moving_updates"] if moving_average == "debiased" else [])
    assert len(keras_names) == (7 if renorm else 4)


@pytest.mark.parametrize("axis,updates_shape", [(-1, ()), (1, (3,))])
def test_debiased_update_count_is_per_channel_when_channels_are_not_last(axis, updates_shape):
    layer = SyncBatchNormalization(axis=axis, moving_average="debiased")
    layer.build((None, 3, 3))
    assert tuple(layer.moving_updates.shape) == updates_shape


def test_renorm_config_round_trips_and_loads_from_keras():
    keras_config = keras.layers.BatchNormalization(
        renorm=True, renorm_clipping={"rmax": 3.0, "dmax": 2.0}, renorm_momentum=0.9).get_config()
    layer = SyncBatchNormalization.from_config(keras_config)
    config = layer.get_config()
    for key in ("renorm", "renorm_clipping", "renorm_momentum"):
        assert config[key] == keras_config[key], key
    assert SyncBatchNormalization.from_config(config).get_config() == config
    # As Keras: None becomes {} with renorm, and is kept as it is without.
    assert SyncBatchNormalization(renorm=True).get_config()["renorm_clipping"] == {}
    assert SyncBatchNormalization().get_config()["renorm_clipping"] is None


# Bad values of Keras's own arguments: the exception type must be the one
# keras.layers.BatchNormalization raises for the same value (checked live, side
# by side), with a message naming the argument and the value.
KERAS_REFUSES = [
    ({"axis": "last"}, ValueError, "axis='last'"),          # int("last")
    ({"axis": None}, TypeError, "axis=None"),
    ({"axis": [1]}, TypeError, "axis=[1]"),
    ({"momentum": "high"}, ValueError, "momentum='high'"),  # float("high")
    ({"momentum": None}, TypeError, "momentum=None"),
    ({"epsilon": "small"}, ValueError, "epsilon='small'"),
    ({"epsilon": None}, TypeError, "epsilon=None"),
    ({"beta_initializer": "nope"}, ValueError, "nope"),
    ({"gamma_regularizer": "nope"}, ValueError, "nope"),
    ({"beta_constraint": "nope"}, ValueError, "nope"),
    ({"renorm": True, "renorm_clipping": {"random_key": 1.0}}, ValueError, "random_key"),
    ({"renorm": True, "renorm_clipping": {"rmax": 0.0, "rmin": 1.0}}, ValueError, "rmax=0.0"),
    ({"renorm": True, "renorm_clipping": {"rmax": 1.0, "dmax": -1.0}}, ValueError, "dmax=-1.0"),
    ({"renorm": True, "renorm_clipping": 3.0}, TypeError, "renorm_clipping=3.0"),
    ({"renorm": True, "renorm_clipping": {"rmax": "a", "rmin": 1.0}}, TypeError, "'a'"),
]


@pytest.mark.parametrize("kwargs,error,needle", KERAS_REFUSES)
def test_bad_keras_arguments_raise_what_keras_raises(kwargs, error, needle):
    with pytest.raises(error):
        keras.layers.BatchNormalization(**kwargs)
    with pytest.raises(error) as info:
        SyncBatchNormalization(**kwargs)
    assert needle in str(info.value)
    named = next(name for name in kwargs if name != "renorm" or len(kwargs) == 1)
    assert f"`{named}`" in str(info.value), str(info.value)


# Values Keras takes but that mean nothing (or something other than what they
# say): ValueError, naming the argument and the value.
KERAS_ACCEPTS_MEANINGLESS = [
    {"momentum": 1.5},
    {"momentum": -0.1},
    {"momentum": float("nan")},
    {"momentum": True},
    {"epsilon": 0.0},
    {"epsilon": -1e-3},
    {"epsilon": float("inf")},
    {"axis": 1.5},
    {"axis": True},
    {"center": "yes"},
    {"center": None},
    {"scale": "False"},
    {"synchronized": "no"},
    {"renorm": "yes"},
    {"renorm": True, "renorm_momentum": 1.0},
    {"renorm": True, "renorm_clipping": {"rmax": float("nan")}},
]


@pytest.mark.parametrize("kwargs", KERAS_ACCEPTS_MEANINGLESS)
def test_meaningless_values_keras_accepts_raise_value_error(kwargs):
    keras.layers.BatchNormalization(**kwargs)  # accepted there: the case is a real difference
    named, value = list(kwargs.items())[-1]
    with pytest.raises(ValueError) as info:
        SyncBatchNormalization(**kwargs)
    assert f"`{named}`" in str(info.value), str(info.value)
    if not isinstance(value, dict):
        assert f"{named}={value!r}" in str(info.value), str(info.value)


# Values Keras converts: taken, and stored as Keras stores them.
KERAS_CONVERTS = [
    {"axis": "1"},
    {"axis": np.int64(1)},
    {"axis": 1.0},
    {"momentum": "0.9"},
    {"momentum": np.float32(0.5)},
    {"momentum": 0},
    {"epsilon": "1e-5"},
    {"center": 0, "scale": np.bool_(True)},
    {"renorm": 1, "renorm_clipping": {"rmax": 3, "rmin": None}},
    {"renorm": False, "renorm_clipping": {"anything": 1}, "renorm_momentum": None},
]


@pytest.mark.parametrize("kwargs", KERAS_CONVERTS)
def test_values_keras_converts_are_taken_as_keras_takes_them(kwargs):
    theirs = keras.layers.BatchNormalization(**kwargs)
    ours = SyncBatchNormalization(**kwargs)
    for name in ("axis", "momentum", "epsilon", "renorm_momentum"):
        assert getattr(ours, name) == getattr(theirs, name), name
        assert type(getattr(ours, name)) is type(getattr(theirs, name)), name
    for name in ("center", "scale", "renorm"):
        assert getattr(ours, name) == bool(getattr(theirs, name)), name
    assert ours.renorm_clipping == theirs.renorm_clipping
    theirs.build((None, 4, 3))
    ours.build((None, 4, 3))
    assert [w.name for w in ours.weights] == [w.name for w in theirs.weights]


@pytest.mark.parametrize(
    "kwargs,error,needle",
    [
        ({"communicator": "nccl"}, ValueError, "communicator='nccl'"),
        ({"communicator": object()}, TypeError, "communicator=<object"),
        ({"group_size": 0}, ValueError, "group_size=0"),
        ({"group_size": 2.5}, ValueError, "group_size=2.5"),
        ({"moving_average": "mean"}, ValueError, "moving_average='mean'"),
        ({"nonfinite": None}, ValueError, "nonfinite=None"),
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


# -- Keras's own cases --------------------------------------------------------------------
# keras/src/layers/normalization/batch_normalization_test.py (Keras 3.15.1), run on
# keras.layers.BatchNormalization and on SyncBatchNormalization alike: each case
# holds for both, and where the check is "the same as Keras", the two run side by
# side on the same data.

LAYER_CLASSES = {"keras": keras.layers.BatchNormalization, "syncbn": SyncBatchNormalization}


@pytest.fixture(params=sorted(LAYER_CLASSES))
def layer_class(request):
    return LAYER_CLASSES[request.param]


def _keras_test_case():
    from keras.src import testing

    return testing.TestCase()


RUN_LAYER_TEST_CASES = {
    # test_bn_basics: vector case, without center and scale, image case with regularizers.
    "vector": ({"center": True, "scale": True}, (2, 3), 2, 2, 0),
    "no center or scale": ({"center": False, "scale": False}, (2, 3), 0, 2, 0),
    "image, regularizers": ({"center": True, "scale": True, "beta_regularizer": "l2",
                             "gamma_regularizer": "l2"}, (2, 4, 4, 3), 2, 2, 2),
    # test_renorm_basics: renorm, and renorm with clipping.
    "renorm": ({"center": True, "scale": True, "renorm": True}, (2, 3), 2, 5, 0),
    "renorm, clipping": ({"center": True, "scale": True, "renorm": True,
                          "renorm_clipping": {"rmax": 3.0, "rmin": 0.3, "dmax": 5.0}},
                         (2, 4, 4, 3), 2, 5, 0),
}


@pytest.mark.parametrize("case", sorted(RUN_LAYER_TEST_CASES))
def test_keras_run_layer_test(layer_class, case):
    # Keras's own harness: config round trip, build, call, weight and loss
    # counts, masking support, a short fit, saving.
    init_kwargs, shape, trainable, non_trainable, losses = RUN_LAYER_TEST_CASES[case]
    _keras_test_case().run_layer_test(
        layer_class, init_kwargs=init_kwargs, call_kwargs={"training": True},
        input_shape=shape, expected_output_shape=shape,
        expected_num_trainable_weights=trainable, expected_num_non_trainable_weights=non_trainable,
        expected_num_seed_generators=0, expected_num_losses=losses, supports_masking=True,
    )


CORRECTNESS_CASES = [
    (axis, shape, mean_init, variance_init)
    for axis in (-1, 1)
    for shape in ((5, 2, 3), (5, 3, 3, 2))
    for mean_init in ("zeros", "ones")
    for variance_init in ("zeros", "ones")
]


def test_correctness_cases_are_all_there():
    assert len(CORRECTNESS_CASES) == 16 and {c[0] for c in CORRECTNESS_CASES} == {-1, 1}


def _as_numpy(x):
    return keras.ops.convert_to_numpy(x)


@pytest.mark.parametrize("axis,shape,mean_init,variance_init", CORRECTNESS_CASES)
def test_keras_correctness_side_by_side(axis, shape, mean_init, variance_init):
    # test_correctness, both layers on the same data: Keras's checks on each, and
    # equal outputs and moving statistics. Its last part passes a Masking mask, which
    # with axis=1 covers the channel axis (one channel fully masked out here).
    x = np.random.default_rng(len(shape) + axis).normal(5.0, 10.0, shape).astype(np.float32)
    layers = {name: cls(axis=axis, momentum=0, moving_mean_initializer=mean_init,
                        moving_variance_initializer=variance_init)
              for name, cls in LAYER_CLASSES.items()}
    outs = {}
    for name, layer in layers.items():
        out = x
        for _ in range(3):
            out = layer(out, training=True)
        outs[name] = _as_numpy(out)
        broadcast = [1] * len(shape)
        broadcast[axis] = shape[axis]
        normalized = (outs[name] - _as_numpy(layer.beta).reshape(broadcast)) / _as_numpy(
            layer.gamma).reshape(broadcast)
        reduction = tuple(i for i in range(len(shape)) if i != axis % len(shape))
        np.testing.assert_allclose(normalized.mean(reduction), 0.0, atol=1e-3)
        np.testing.assert_allclose(normalized.std(reduction), 1.0, atol=1e-3)
        np.testing.assert_allclose(_as_numpy(layer.moving_mean), 0.0, atol=1e-3)
        np.testing.assert_allclose(_as_numpy(layer.moving_variance), 1.0, atol=1e-3)
        inference, training = layer(x, training=False), layer(x, training=True)
        assert not np.allclose(_as_numpy(inference), _as_numpy(training))
        training, inference = layer(x, training=True), layer(x, training=False)
        np.testing.assert_allclose(_as_numpy(inference), _as_numpy(training), atol=1e-5)
    np.testing.assert_allclose(outs["syncbn"], outs["keras"], atol=1e-5)

    masked_x = x.copy()
    masked_x[:, 1, :] = 0.0
    masked = keras.layers.Masking()(masked_x)
    assert masked._keras_mask.shape == shape[:-1]
    masked_out = {}
    for name, layer in layers.items():
        # Inference ignores the mask.
        np.testing.assert_allclose(_as_numpy(layer(masked, training=False)),
                                   _as_numpy(layer(masked_x, training=False)), atol=1e-6)
        unmasked_out = layer(masked_x, training=False)
        masked_out[name] = _as_numpy(layer(masked, training=True))
        assert not np.allclose(_as_numpy(unmasked_out), masked_out[name])
    np.testing.assert_allclose(masked_out["syncbn"], masked_out["keras"], rtol=1e-5, atol=1e-4)
    # Channels with samples: the same moving statistics. With axis=1 channel 1 had
    # none: Keras averaged zeros in, syncbn left it as it was.
    seen = np.ones(shape[axis], bool)
    if axis == 1:
        seen[1] = False
        np.testing.assert_array_equal(_as_numpy(layers["keras"].moving_variance)[1], 0.0)
        assert float(_as_numpy(layers["syncbn"].moving_variance)[1]) > 0.5
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(_as_numpy(getattr(layers["syncbn"], name))[seen],
                                   _as_numpy(getattr(layers["keras"], name))[seen],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("synchronized", [False, True])
def test_keras_input_fully_masked(layer_class, synchronized):
    # test_input_fully_masked. Keras's own test meant to run both values, but its
    # guard compared a function with a string (`backend.backend == "tensorflow"`),
    # so only False ran; here both do.
    norm = layer_class(scale=False, center=False, synchronized=synchronized)
    x = np.zeros((4, 5))
    mask = np.zeros((4,), dtype=np.float32)
    y = norm(x, mask=mask, training=True)
    np.testing.assert_allclose(_as_numpy(y), np.zeros_like(x, dtype=np.float32))


@pytest.mark.parametrize("run_eagerly", [True, False])
@pytest.mark.parametrize("mask_value", [0.0, 0.1, 1])
def test_keras_ignore_masked_values(layer_class, run_eagerly, mask_value):
    # test_bachnorm_ignore_masked_values: padded positions add nothing to the statistics.
    padded_data = np.array(
        [[[1, 5], [2, 5], [mask_value, mask_value], [mask_value, mask_value]] for _ in range(10)],
        dtype="float32")
    inputs = keras.layers.Input((None, 2))
    masked = keras.layers.Masking(mask_value=mask_value)(inputs)
    normed = layer_class(momentum=0.0)(masked)
    model = keras.Model(inputs, normed)
    model.compile("rmsprop", loss=keras.losses.MeanSquaredError(), run_eagerly=run_eagerly)
    model.fit(x=padded_data, y=padded_data, batch_size=10, epochs=5, verbose=0)
    np.testing.assert_allclose(_as_numpy(model.layers[2].moving_mean), [1.5, 5.0], rtol=1e-6)
    np.testing.assert_allclose(_as_numpy(model.layers[2].moving_variance), [0.25, 0.0], atol=1e-6)


@pytest.mark.parametrize("renorm", [False, True])
def test_keras_trainable_behavior(layer_class, renorm):
    # test_trainable_behavior (and with renorm): a frozen layer runs in inference
    # mode, updates nothing, and trains again once unfrozen.
    layer = layer_class(axis=-1, momentum=0.8, epsilon=1e-7, renorm=renorm)
    layer.build((1, 4, 4, 3))
    layer.trainable = False
    non_trainable = 5 if renorm else 2
    assert len(layer.weights) == 2 + non_trainable
    assert len(layer.trainable_weights) == 0
    assert len(layer.non_trainable_weights) == 2 + non_trainable
    x = np.random.default_rng(0).normal(5.0, 10.0, (200, 4, 4, 3)).astype(np.float32)
    before = [_as_numpy(w).copy() for w in layer.weights]
    out = layer(x, training=True)
    np.testing.assert_allclose(_as_numpy(out), x, rtol=1e-6, atol=1e-6)
    for old, weight in zip(before, layer.weights):
        np.testing.assert_array_equal(_as_numpy(weight), old)
    layer.trainable = True
    assert len(layer.weights) == 2 + non_trainable
    assert len(layer.trainable_weights) == 2
    assert len(layer.non_trainable_weights) == non_trainable
    for _ in range(10):
        out = layer(x, training=True)
    out = (_as_numpy(out) - _as_numpy(layer.beta)) / _as_numpy(layer.gamma)
    if not renorm:  # renorm's r and d move the output off the batch statistics
        np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0.0, atol=1e-3)
        np.testing.assert_allclose(out.std(axis=(0, 1, 2)), 1.0, atol=1e-3)
    assert not np.allclose(_as_numpy(layer.moving_mean), before[2])


def test_keras_large_value_within_autocast_scope(layer_class):
    from keras.src import backend

    layer = layer_class()
    layer.build((1, 4, 4, 3))
    large_value = keras.ops.full(layer.moving_variance.shape, 70000)
    with backend.AutocastScope("float16"):
        layer.moving_variance.assign(large_value)
        np.testing.assert_allclose(_as_numpy(layer.moving_variance.value), _as_numpy(large_value))


def test_keras_masked_broadcast_normalization(layer_class):
    # A mask that broadcasts against the inputs without their last axis.
    x = keras.ops.ones((1, 2, 3, 4))
    mask = keras.ops.ones((1, 2, 1))
    layer = layer_class(axis=-1, momentum=0.0, epsilon=1e-3)
    y = layer(x, training=True, mask=mask)
    np.testing.assert_allclose(_as_numpy(keras.ops.mean(y, axis=[0, 1, 2])), 0.0, atol=1e-6)
    np.testing.assert_allclose(_as_numpy(y), 0.0, atol=1e-6)
    np.testing.assert_allclose(_as_numpy(layer.moving_mean), 1.0, atol=1e-6)
    np.testing.assert_allclose(_as_numpy(layer.moving_variance), 0.0, atol=1e-6)


def test_keras_renorm_invalid_clipping_keys(layer_class):
    with pytest.raises(ValueError, match="Received invalid keys"):
        layer_class(renorm=True, renorm_clipping={"random_key": 1.0})
    with pytest.raises(ValueError, match="rmax should be"):
        layer_class(renorm=True, renorm_clipping={"rmax": 0.0, "rmin": 1.0})
    with pytest.raises(ValueError, match="dmax should be non-negative"):
        layer_class(renorm=True, renorm_clipping={"rmax": 1.0, "dmax": -1.0})


def test_keras_renorm_stddev_initializer(layer_class):
    layer = layer_class(renorm=True, moving_variance_initializer=keras.initializers.Constant(4.0))
    layer.build((None, 5))
    np.testing.assert_allclose(_as_numpy(layer.moving_stddev), 2.0, atol=1e-6)
    np.testing.assert_allclose(_as_numpy(layer.renorm_stddev), 2.0, atol=1e-6)


def test_keras_renorm_inference(layer_class):
    # Inference is the same with and without renorm.
    bn = layer_class(renorm=False)
    bn_renorm = layer_class(renorm=True)
    bn.build((None, 10))
    bn_renorm.build((None, 10))
    rng = np.random.default_rng(3)
    for attr in ["gamma", "beta", "moving_mean", "moving_variance"]:
        getattr(bn, attr).assign(rng.normal(size=(10,)).astype(np.float32))
        getattr(bn_renorm, attr).assign(getattr(bn, attr))
    x = rng.normal(size=(4, 10)).astype(np.float32)
    np.testing.assert_allclose(_as_numpy(bn(x, training=False)),
                               _as_numpy(bn_renorm(x, training=False)), atol=1e-5, rtol=1e-5)


def test_keras_renorm_correctness(layer_class):
    # test_renorm_correctness: the output and all five moving weights after one step.
    epsilon, momentum, renorm_momentum = 1e-3, 0.9, 0.8
    layer = layer_class(axis=-1, epsilon=epsilon, momentum=momentum, renorm=True,
                        renorm_momentum=renorm_momentum)
    layer.build((None, 3))
    rng = np.random.default_rng(1337)
    init_moving_mean = rng.normal(0.0, 1.0, 3)
    init_moving_var = np.abs(rng.normal(1.0, 0.5, 3))
    init_moving_stddev = np.sqrt(init_moving_var)
    init_renorm_mean = rng.normal(0.0, 1.0, 3)
    init_renorm_stddev = np.abs(rng.normal(1.0, 0.5, 3))
    init_gamma = rng.normal(1.0, 0.1, 3)
    init_beta = rng.normal(0.0, 0.1, 3)
    for name, value in [("moving_mean", init_moving_mean), ("moving_variance", init_moving_var),
                        ("moving_stddev", init_moving_stddev), ("renorm_mean", init_renorm_mean),
                        ("renorm_stddev", init_renorm_stddev), ("gamma", init_gamma),
                        ("beta", init_beta)]:
        getattr(layer, name).assign(value.astype(np.float32))
    x = np.array([[4.0, 6.0, 2.0], [8.0, -2.0, 5.0], [6.0, 4.0, 3.0]], dtype="float32")
    batch_mean, batch_var = x.mean(0), x.var(0)
    batch_stddev = np.sqrt(batch_var + epsilon)
    r = batch_stddev / init_renorm_stddev
    d = (batch_mean - init_renorm_mean) / init_renorm_stddev
    expected = (((x - batch_mean) / batch_stddev) * r + d) * init_gamma + init_beta
    np.testing.assert_allclose(_as_numpy(layer(x, training=True)), expected, atol=1e-5)
    expected_moving_stddev = init_moving_stddev * momentum + batch_stddev * (1 - momentum)
    for name, want in [
        ("renorm_mean", init_renorm_mean * renorm_momentum + batch_mean * (1 - renorm_momentum)),
        ("renorm_stddev", init_renorm_stddev * renorm_momentum
         + batch_stddev * (1 - renorm_momentum)),
        ("moving_mean", init_moving_mean * momentum + batch_mean * (1 - momentum)),
        ("moving_stddev", expected_moving_stddev),
        ("moving_variance", expected_moving_stddev ** 2 - epsilon),
    ]:
        np.testing.assert_allclose(_as_numpy(getattr(layer, name)), want, atol=1e-5, err_msg=name)


def test_keras_serialization(layer_class):
    layer = layer_class(renorm=True, renorm_clipping={"rmax": 3.0, "rmin": 0.3, "dmax": 5.0},
                        renorm_momentum=0.95)
    config = layer.get_config()
    assert layer_class.from_config(config).get_config() == config


def test_recalibrate_a_renorm_layer_keeps_its_stddev_in_step():
    # recalibrate sets moving_mean and moving_variance, and renorm's moving_stddev
    # to agree with them: the next update derives the variance from it.
    import syncbn

    layer = SyncBatchNormalization(renorm=True, momentum=0.5)
    model = keras.Sequential([keras.Input((3,)), layer])
    data = [np.random.default_rng(i).normal(4.0, 2.0, (16, 3)).astype(np.float32) for i in range(3)]
    syncbn.recalibrate(model, data, verbose=0)
    # Averages of the batches' statistics (equal batch sizes).
    variance = np.mean([x.astype(np.float64).var(0) for x in data], axis=0)
    np.testing.assert_allclose(layer.moving_mean.numpy(),
                               np.concatenate(data).astype(np.float64).mean(0), rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_stddev.numpy(), np.sqrt(variance + 1e-3), rtol=1e-6)
    stddev = layer.moving_stddev.numpy().astype(np.float64)
    model(data[0], training=True)
    batch_stddev = np.sqrt(data[0].astype(np.float64).var(0) + 1e-3)
    new_stddev = 0.5 * stddev + 0.5 * batch_stddev
    np.testing.assert_allclose(layer.moving_variance.numpy(), new_stddev ** 2 - 1e-3, rtol=1e-5)


EVERY_KERAS_ARGUMENT = {
    "axis": 1, "momentum": 0.8, "epsilon": 1e-2, "center": True, "scale": True,
    "beta_initializer": keras.initializers.Constant(0.3),
    "gamma_initializer": keras.initializers.Constant(-0.5),
    "moving_mean_initializer": keras.initializers.Constant(1.0),
    "moving_variance_initializer": keras.initializers.Constant(4.0),
    "beta_regularizer": "l2", "gamma_regularizer": keras.regularizers.L1(0.01),
    "beta_constraint": keras.constraints.MaxNorm(0.5), "gamma_constraint": "non_neg",
}


@pytest.mark.parametrize("renorm", [{}, {"renorm": True, "renorm_momentum": 0.7,
                                         "renorm_clipping": {"rmax": 1.5, "dmax": 0.5}}],
                         ids=["plain", "renorm"])
def test_every_keras_argument_side_by_side_in_fit(renorm):
    # Every argument of keras.layers.BatchNormalization with a value other than its
    # default, after a Masking layer, in model.fit: the same losses (regularizers
    # included), weights (constraints applied) and moving statistics as Keras's layer.
    x = np.random.default_rng(11).normal(2.0, 3.0, (24, 4, 3)).astype(np.float32)
    x[::4, 1] = 0.0  # masked time steps
    y = np.random.default_rng(12).normal(size=(24, 4, 1)).astype(np.float32)
    results = {}
    for name, cls in LAYER_CLASSES.items():
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((4, 3)), keras.layers.Masking(),
                                  cls(**EVERY_KERAS_ARGUMENT, **renorm), keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.05), "mse")
        history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        results[name] = (history.history["loss"], model.get_weights(),
                         model.predict(x, verbose=0), len(model.losses))
    (keras_loss, keras_weights, keras_out, keras_losses), (loss, weights, out, losses) = (
        results["keras"], results["syncbn"])
    assert losses == keras_losses == 2
    np.testing.assert_allclose(loss, keras_loss, rtol=1e-5)
    assert len(weights) == len(keras_weights) == (9 if renorm else 6)
    for ours, theirs in zip(weights, keras_weights):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, keras_out, rtol=1e-5, atol=1e-5)
    assert np.all(weights[0] >= 0.0) and np.max(np.abs(weights[1])) <= 0.5 + 1e-6  # constraints
