"""The tf_keras SyncBatchNormalization (legacy tf.keras) in one process.

The test process runs Keras 3 (no `TF_USE_LEGACY_KERAS`), so these tests use
tf_keras and `syncbn.layers.legacy` by name; the last test starts a process
with `TF_USE_LEGACY_KERAS=1` to check that `syncbn`'s own names follow.
The multi-process checks are in tests/test_legacy_multiprocess.py.
"""

import contextlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import syncbn
from jobs import exactness
from helpers import relative_error
from syncbn.layers.legacy import SyncBatchNormalization

# Also run on every older supported TensorFlow (tests/run.sh's second pass).
pytestmark = [pytest.mark.unit, pytest.mark.compat]

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
TOLERANCE = 2e-4
# (feature shape, axis) -> whether tf_keras's BatchNormalization runs fused kernels there.
LAYOUTS = {
    "2d": (((7,), -1), False),
    "ncw": (((4, 6), 1), False),
    "nhcw": (((3, 4, 3), 2), False),
    "nhwc": (((3, 3, 4), -1), True),
    "nchw": (((4, 3, 3), 1), True),
    "ndhwc": (((2, 2, 2, 3), -1), True),
}


def _pair(feature_shape, axis, seed=0, strategy=None, **kwargs):
    """A tf_keras BatchNormalization and a SyncBatchNormalization (under `strategy`) with the same weights."""
    reference = tf_keras.layers.BatchNormalization(axis=axis, momentum=0.7, **kwargs)
    reference.build((None,) + feature_shape)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        ours = SyncBatchNormalization(axis=axis, momentum=0.7, **kwargs)
        ours.build((None,) + feature_shape)
    weights = reference.get_weights()
    rng = np.random.default_rng(seed)
    weights[0] = rng.normal(1.0, 0.3, weights[0].shape).astype(np.float32)
    weights[1] = rng.normal(0.0, 0.3, weights[1].shape).astype(np.float32)
    reference.set_weights(weights)
    ours.set_weights(weights)
    return reference, ours


def _steps(reference, ours, feature_shape, steps=3, batch=5, seed=1):
    """Largest relative error per quantity over `steps` training steps."""
    rng = np.random.default_rng(seed)
    errors = {}
    for _ in range(steps):
        x = tf.constant(rng.normal(2.0, 3.0, (batch,) + feature_shape).astype(np.float32))
        dy = rng.normal(size=(batch,) + feature_shape).astype(np.float32)
        want = exactness.layer_gradients(reference, x, dy)
        got = exactness.layer_gradients(ours, x, dy)
        for name, a, b in zip(["y", "dx", "dgamma", "dbeta"], got, want):
            errors[name] = max(errors.get(name, 0.0), relative_error(a.numpy(), b.numpy()))
        for name in ("moving_mean", "moving_variance"):
            error = relative_error(getattr(ours, name).numpy(), getattr(reference, name).numpy())
            errors[name] = max(errors.get(name, 0.0), error)
    return errors


# --- The layer: arguments, weights, config --------------------------------------------------


def test_is_a_tf_keras_layer_with_batch_normalizations_weights():
    model = tf_keras.Sequential([tf_keras.Input((4, 4, 3)), SyncBatchNormalization(),
                                 SyncBatchNormalization()])
    first, second = model.layers
    assert isinstance(first, tf_keras.layers.Layer) and isinstance(first, syncbn.layers.SyncBatchNormalizationBase)
    assert first.name != second.name  # tf_keras's unique default names
    # The skipped-steps counter is diagnostics, not a weight (tf_keras would track it as one).
    assert [w.name.split("/")[-1] for w in first.weights] == [
        "gamma:0", "beta:0", "moving_mean:0", "moving_variance:0"]
    assert len(first.trainable_weights) == 2 and len(model.weights) == 8
    debiased = SyncBatchNormalization(moving_average="debiased")
    debiased.build((None, 3))
    assert [w.name.split("/")[-1] for w in debiased.weights][-1] == "moving_updates:0"
    assert tf_keras.saving.get_registered_name(SyncBatchNormalization) == "syncbn>SyncBatchNormalization"


def test_takes_a_tf_keras_batch_normalization_config_and_round_trips_its_own():
    built = tf_keras.layers.BatchNormalization(axis=1, momentum=0.9, epsilon=1e-5, center=False)
    built.build((None, 4, 5, 5))
    config = built.get_config()
    assert config["axis"] == [1]  # how tf_keras stores a built layer's axis
    layer = SyncBatchNormalization.from_config(config)
    assert (layer.axis, layer.momentum, layer.epsilon, layer.center) == (1, 0.9, 1e-5, False)
    ours = SyncBatchNormalization(axis=1, fused=False, communicator="mpi", group_size=2,
                                  moving_average="debiased", name="bn")
    clone = SyncBatchNormalization.from_config(ours.get_config())
    assert clone.get_config() == ours.get_config()
    assert (clone.fused, clone.communicator, clone.moving_average) == (False, "mpi", "debiased")


@pytest.mark.parametrize("kwargs, error, message", [
    ({"virtual_batch_size": 4}, ValueError, "Received: virtual_batch_size=4"),
    ({"adjustment": lambda shape: (1.0, 0.0)}, ValueError, "Received: adjustment=<function"),
    ({"fused": "yes"}, TypeError, "Received: fused='yes'"),
    ({"axis": [1, 2]}, ValueError, r"Received: axis=\[1, 2\]"),
    ({"renorm": True}, ValueError, "Received: renorm=True"),
    ({"momentum": 1.5}, ValueError, "Received: momentum=1.5"),
])
def test_refuses_what_it_cannot_synchronize_naming_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        SyncBatchNormalization(**kwargs)


def test_fused_true_where_tf_keras_cannot_fuse_raises_when_built():
    with pytest.raises(ValueError, match="Received: fused=True, input rank 2"):
        SyncBatchNormalization(fused=True).build((None, 3))
    layer = SyncBatchNormalization(fused=True)
    layer.build((None, 2, 2, 3))
    assert layer.fused is True


# --- Numerics: the same as tf_keras's BatchNormalization ------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("fused", [None, False])
def test_matches_tf_keras_batch_normalization(layout, fused, kernels):
    (feature_shape, axis), tf_keras_fuses = LAYOUTS[layout]
    reference, ours = _pair(feature_shape, axis, fused=fused)
    # The layouts are what this test says they are: tf_keras fuses where expected.
    assert reference.fused is (tf_keras_fuses and fused is None)
    assert ours.fused is reference.fused
    errors = _steps(reference, ours, feature_shape)
    assert max(errors.values()) < TOLERANCE, errors


def test_fused_layers_average_the_bessel_corrected_variance():
    # The convention is visible: NHWC with fused=False (biased) against tf_keras's default.
    feature_shape, axis = LAYOUTS["nhwc"][0]
    reference, ours = _pair(feature_shape, axis)
    biased = SyncBatchNormalization(axis=axis, momentum=0.7, fused=False)
    biased.build((None,) + feature_shape)
    biased.set_weights(ours.get_weights())
    _steps(reference, ours, feature_shape, steps=1)
    x = tf.constant(np.random.default_rng(1).normal(2.0, 3.0, (5,) + feature_shape), tf.float32)
    biased(x, training=True)
    count = 5 * 3 * 3
    assert relative_error(ours.moving_variance.numpy(), reference.moving_variance.numpy()) < 1e-5
    # (m - 0.3 * v) / 0.3 recovers each layer's batch variance v from one update of 1.
    unbiased_batch = (ours.moving_variance.numpy() - 0.7) / 0.3
    biased_batch = (biased.moving_variance.numpy() - 0.7) / 0.3
    np.testing.assert_allclose(unbiased_batch, biased_batch * count / (count - 1), rtol=1e-4)


def test_training_none_follows_the_tf_keras_learning_phase():
    reference, ours = _pair((3,), -1)
    x = tf.constant(np.random.default_rng(2).normal(5.0, 1.0, (8, 3)), tf.float32)
    ours(x)
    assert np.all(ours.moving_mean.numpy() == 0.0)  # inference by default
    with tf_keras.backend.learning_phase_scope(1):
        got, want = ours(x), reference(x)
    assert relative_error(got.numpy(), want.numpy()) < TOLERANCE
    assert relative_error(ours.moving_mean.numpy(), reference.moving_mean.numpy()) < TOLERANCE
    assert np.all(ours.moving_mean.numpy() > 1.0)


def test_mixed_precision_float16_outputs_float32_variables():
    policy = tf_keras.mixed_precision.Policy("mixed_float16")
    reference, ours = _pair((3, 3, 4), -1, dtype=policy)
    assert ours.fused is reference.fused is True
    assert all(w.dtype == tf.float32 for w in ours.weights)
    x = tf.constant(np.random.default_rng(3).normal(2.0, 3.0, (6, 3, 3, 4)), tf.float16)
    got, want = ours(x, training=True), reference(x, training=True)
    assert got.dtype == want.dtype == tf.float16
    assert relative_error(got.numpy(), want.numpy()) < 2e-3
    assert relative_error(ours.moving_variance.numpy(), reference.moving_variance.numpy()) < 1e-4


def test_replicas_in_one_process_match_one_batch_norm_on_the_global_batch(mirrored_strategy):
    # MirroredStrategy over 4 virtual CPUs, per-replica batches of 5, 0, 11 and 3.
    counts = [5, 0, 11, 3]
    bounds = np.cumsum([0] + counts)
    feature_shape, axis = LAYOUTS["nhwc"][0]
    reference, ours = _pair(feature_shape, axis, strategy=mirrored_strategy)
    rng = np.random.default_rng(4)
    x = rng.normal(2.0, 3.0, (sum(counts),) + feature_shape).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)

    def split(array):
        return mirrored_strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(array[bounds[ctx.replica_id_in_sync_group]:
                                          bounds[ctx.replica_id_in_sync_group + 1]]))

    step = tf.function(lambda x, dy: mirrored_strategy.run(
        lambda x, dy: exactness.layer_gradients(ours, x, dy), args=(x, dy)))
    y, dx, dgamma, dbeta = (mirrored_strategy.experimental_local_results(v)
                            for v in step(split(x), split(dy)))
    want = [v.numpy() for v in exactness.layer_gradients(reference, tf.constant(x), dy)]
    assert relative_error(np.concatenate([v.numpy() for v in y]), want[0]) < TOLERANCE
    assert relative_error(np.concatenate([v.numpy() for v in dx]), want[1]) < TOLERANCE
    assert relative_error(sum(v.numpy() for v in dgamma), want[2]) < TOLERANCE
    assert relative_error(sum(v.numpy() for v in dbeta), want[3]) < TOLERANCE
    for name in ("moving_mean", "moving_variance"):
        assert relative_error(getattr(ours, name).numpy(), getattr(reference, name).numpy()) < TOLERANCE


def test_nonfinite_steps_are_skipped_and_counted():
    layer = SyncBatchNormalization()
    layer.build((None, 2))
    layer(tf.constant([[1.0, np.nan], [2.0, 3.0]]), training=True)
    assert layer.skipped_steps == 1
    np.testing.assert_array_equal(layer.moving_variance.numpy(), [1.0, 1.0])
    assert len(layer.weights) == 4


# --- Models: saving, fit, convert, recalibrate ---------------------------------------------


def _cnn(bn=SyncBatchNormalization, **bn_kwargs):
    tf_keras.utils.set_random_seed(5)
    return tf_keras.Sequential([
        tf_keras.Input((6, 6, 2)),
        tf_keras.layers.Conv2D(4, 3, use_bias=False),
        bn(momentum=0.5, **bn_kwargs),
        tf_keras.layers.ReLU(),
        tf_keras.layers.Flatten(),
        tf_keras.layers.Dense(3),
    ])


def _data(samples=32, seed=6):
    rng = np.random.default_rng(seed)
    return rng.normal(1.0, 2.0, (samples, 6, 6, 2)).astype(np.float32), rng.integers(0, 3, samples)


@pytest.mark.parametrize("moving_average", ["ema", "debiased"])
@pytest.mark.parametrize("file_name", ["model.h5", "model.keras", "savedmodel"])
def test_fit_then_save_and_load_without_custom_objects(file_name, moving_average, tmp_path):
    model = _cnn(moving_average=moving_average)
    model.compile("adam", tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = str(tmp_path / file_name)
    model.save(path)
    loaded = tf_keras.models.load_model(path)
    layer = loaded.layers[1]
    assert type(layer) is SyncBatchNormalization and layer.moving_average == moving_average
    assert [w.name.split("/")[-1] for w in layer.weights] == [
        w.name.split("/")[-1] for w in model.layers[1].weights]
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    # The loaded model trains on.
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)


def test_convert_nested_functional_model_to_sync_and_back():
    inputs = tf_keras.Input((8, 8, 3))
    x = tf_keras.layers.Conv2D(4, 3)(inputs)
    x = tf_keras.layers.BatchNormalization(name="bn_nhwc")(x)
    inner = tf_keras.Sequential([
        tf_keras.Input((6, 6, 4)), tf_keras.layers.Conv2D(4, 1),
        tf_keras.layers.BatchNormalization(fused=False, name="bn_unfused"),
        tf_keras.layers.Flatten(), tf_keras.layers.Dense(3, use_bias=False),
        tf_keras.layers.BatchNormalization(name="bn_2d")], name="inner")
    inner.trainable = False
    model = tf_keras.Model(inputs, inner(x))
    model.compile("sgd", "mse")
    data = np.random.default_rng(7).normal(size=(16, 8, 8, 3)).astype(np.float32)
    model.fit(data, np.zeros((16, 3)), epochs=1, verbose=0)

    synced = syncbn.convert(model)
    assert sorted(synced.syncbn_converted_layers) == ["bn_2d", "bn_nhwc", "bn_unfused"]
    layers = {layer.name: layer for layer in synced._flatten_layers()
              if isinstance(layer, SyncBatchNormalization)}
    # Each keeps tf_keras's decision, and with it the moving-variance convention.
    assert {name: layer.fused for name, layer in layers.items()} == {
        "bn_nhwc": True, "bn_unfused": False, "bn_2d": False}
    assert not synced.get_layer("inner").trainable
    assert type(synced.optimizer).__name__ == "SGD"  # recompiled from its config
    np.testing.assert_allclose(synced(data), model(data), atol=1e-5)
    # A training step moves every moving variance as tf_keras's layers do.
    synced(data, training=True)
    model(data, training=True)
    for original in model._flatten_layers():
        if isinstance(original, tf_keras.layers.BatchNormalization):
            copy = layers[original.name]
            assert relative_error(copy.moving_variance.numpy(), original.moving_variance.numpy()) < TOLERANCE
    exported = syncbn.convert(synced, to="local")
    assert not any(isinstance(layer, SyncBatchNormalization) for layer in exported._flatten_layers())
    np.testing.assert_allclose(exported(data), synced(data), atol=1e-5)


def test_convert_a_tf_keras_application_keeps_its_outputs():
    model = tf_keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35)
    synced = syncbn.convert(model, moving_average="debiased")
    assert len(synced.syncbn_converted_layers) == 52
    assert all(len(layer.weights) == 5 for layer in synced.layers if isinstance(layer, SyncBatchNormalization))
    x = np.random.default_rng(8).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(synced(x), model(x), atol=1e-5)


def test_convert_refuses_what_cannot_be_synchronized():
    model = tf_keras.Sequential([tf_keras.Input((4,)),
                                 tf_keras.layers.BatchNormalization(virtual_batch_size=2, name="ghost")])
    with pytest.raises(ValueError, match=r"ghost \(virtual_batch_size=2 is not supported"):
        syncbn.convert(model)
    with pytest.raises(TypeError, match="Received: model=<object"):
        syncbn.convert(object())


def test_recalibrate_precise_bn_and_check_consistency():
    model = tf_keras.Sequential([tf_keras.Input((4,)), SyncBatchNormalization(momentum=0.999)])
    batches = [np.random.default_rng(b).normal(5.0, 2.0, (32, 4)).astype(np.float32) for b in range(4)]
    assert syncbn.recalibrate(model, batches, verbose=0) == 4
    np.testing.assert_allclose(model.layers[0].moving_mean.numpy(), np.mean(batches, axis=(0, 1)), rtol=1e-5)
    assert syncbn.check_consistency(model) == []


def test_under_legacy_keras_syncbn_names_follow_tf_keras(tmp_path):
    # A model saved here loads in a process that sets TF_USE_LEGACY_KERAS=1 and imports syncbn.
    model = _cnn()
    model.save(str(tmp_path / "model.h5"))
    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf, tf_keras
        import syncbn
        from syncbn.layers import legacy
        assert tf.keras.layers.Layer is tf_keras.layers.Layer
        assert syncbn.SyncBatchNormalization is legacy.SyncBatchNormalization
        assert issubclass(syncbn.PreciseBN, tf_keras.callbacks.Callback)
        loaded = tf.keras.models.load_model({str(tmp_path / "model.h5")!r})
        assert type(loaded.layers[1]) is legacy.SyncBatchNormalization, loaded.layers
        converted = syncbn.convert(tf.keras.Sequential([tf.keras.Input((3,)),
                                                        tf.keras.layers.BatchNormalization()]))
        assert type(converted.layers[0]) is syncbn.SyncBatchNormalization
        print("legacy names ok")
    """)
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO_DIR}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            timeout=300, cwd=str(tmp_path))
    assert result.returncode == 0 and "legacy names ok" in result.stdout, result.stderr[-3000:]


def test_legacy_bench_runs_each_variant_in_its_own_horovodrun_job():
    sys.path.insert(0, os.path.join(REPO_DIR, "bench"))
    import legacy_fit

    args = legacy_fit.parse_args(["--quick"])
    assert (args.rounds, args.steps, args.np, args.controller) == (1, 2, 2, "gloo")
    command = legacy_fit.job_command(args, "horovod")
    assert command[:4] == ["horovodrun", "-np", "2", "--gloo"]
    assert command[command.index("--variant") + 1] == "horovod"
    assert "--gloo" not in legacy_fit.job_command(legacy_fit.parse_args(["--controller", "mpi"]), "local")
    with pytest.raises(ValueError, match="Received: --np=0"):
        legacy_fit.parse_args(["--np", "0"])
