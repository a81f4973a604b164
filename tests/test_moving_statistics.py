"""Moving statistics in one process: the update math against
float64 NumPy, the layer contract of the new arguments, non-finite steps,
recalibrate, PreciseBN and check_consistency. The multi-process runs are in
tests/test_moving_multiprocess.py.
"""

import gc
import logging
import os
import subprocess
import sys
import textwrap
import threading
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf

import syncbn
from jobs import moving_stats
from syncbn import moving, skip_monitor
from syncbn.world import create_world

pytestmark = pytest.mark.unit


def debiased_reference(batch_stats, momentum):
    """Float64: the momentum-weighted average of the statistics so far, weights summing to 1."""
    results = []
    for t in range(1, len(batch_stats) + 1):
        weights = np.array([momentum ** (t - i) * (1 - momentum) for i in range(1, t + 1)])
        stacked = np.stack(batch_stats[:t]).astype(np.float64)
        results.append((weights[:, None] * stacked).sum(0) / weights.sum())
    return results


def batches(count, rows=16, channels=3, mean=5.0, std=2.0, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(mean, std, (rows, channels)).astype(np.float32) for _ in range(count)]


def train_steps(layer, data):
    step = tf.function(lambda x: layer(x, training=True))
    means, variances = [], []
    for x in data:
        step(tf.constant(x))
        means.append(layer.moving_mean.numpy().copy())
        variances.append(layer.moving_variance.numpy().copy())
    return means, variances


# -- the pure math --------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.99, 0.999, 0.999999])
def test_debiased_rate_matches_float64(momentum):
    for t in [1, 2, 10, 1000]:
        want = (1 - momentum) / (1 - momentum ** t) if momentum else 1.0
        got = float(moving.debiased_rate(momentum, tf.constant(float(t))))
        assert got == pytest.approx(want, rel=1e-6), (momentum, t)
    assert float(moving.debiased_rate(momentum, tf.constant(1.0))) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("nonfinite", ["skip", "update"])
def test_empty_global_batch_changes_nothing(nonfinite):
    old = tf.constant([1.0, 2.0])
    nan = tf.constant([np.nan, np.nan], tf.float32)
    mean, variance, updates, flagged = moving.next_moving_statistics(
        old, old, nan, nan, tf.constant(0.0), momentum=0.9, moving_average="debiased",
        updates=tf.constant(4.0), nonfinite=nonfinite)
    np.testing.assert_array_equal(mean, old)
    np.testing.assert_array_equal(variance, old)
    assert float(updates) == 4.0 and not bool(flagged)


def test_skip_selects_so_a_nan_step_leaves_no_nan():
    old = tf.constant([1.0, 2.0])
    mean, variance, updates, flagged = moving.next_moving_statistics(
        old, old, tf.constant([np.nan, 0.0]), tf.constant([1.0, np.inf]), tf.constant(8.0),
        momentum=0.0, moving_average="debiased", updates=tf.constant(1.0), nonfinite="skip")
    np.testing.assert_array_equal(mean, old)
    np.testing.assert_array_equal(variance, old)
    assert float(updates) == 1.0 and bool(flagged)


# -- the layer -------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.9, 0.999])
def test_debiased_layer_matches_float64_reference_at_every_step(momentum):
    data = batches(12, seed=1)
    layer = syncbn.SyncBatchNormalization(momentum=momentum, moving_average="debiased")
    layer.build((None, 3))
    means, variances = train_steps(layer, data)
    want_means = debiased_reference([x.astype(np.float64).mean(0) for x in data], momentum)
    want_vars = debiased_reference([x.astype(np.float64).var(0) for x in data], momentum)
    for step in range(len(data)):
        np.testing.assert_allclose(means[step], want_means[step], rtol=1e-5)
        np.testing.assert_allclose(variances[step], want_vars[step], rtol=1e-5)
    np.testing.assert_allclose(means[0], data[0].mean(0), rtol=1e-6)  # t = 1: the first batch
    assert float(layer.moving_updates.numpy()) == len(data)


def test_ema_is_still_exactly_keras():
    data = batches(5, seed=2)
    ours = syncbn.SyncBatchNormalization(momentum=0.9)
    keras_bn = keras.layers.BatchNormalization(momentum=0.9)
    ours.build((None, 3))
    keras_bn.build((None, 3))
    got, _ = train_steps(ours, data)
    want, _ = train_steps(keras_bn, data)
    np.testing.assert_allclose(got[-1], want[-1], rtol=1e-6)
    assert len(ours.weights) == len(keras_bn.weights) == 4


def test_debiased_survives_keras_save_and_load_mid_run(tmp_path):
    data = batches(8, rows=8, channels=2, seed=3)
    model = keras.Sequential([keras.Input((2,)),
                              syncbn.SyncBatchNormalization(momentum=0.95, moving_average="debiased")])
    train_steps(model.layers[0], data[:4])
    path = str(tmp_path / "mid.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    layer = restored.layers[0]
    assert layer.moving_average == "debiased" and float(layer.moving_updates.numpy()) == 4.0
    means, variances = train_steps(layer, data[4:])
    want = debiased_reference([x.astype(np.float64).mean(0) for x in data], 0.95)
    for step in range(4):
        np.testing.assert_allclose(means[step], want[4 + step], rtol=1e-5)
    # Negative control: a restart from a zero count would forget the first four batches.
    fresh = debiased_reference([x.astype(np.float64).mean(0) for x in data[4:]], 0.95)
    assert not np.allclose(means[-1], fresh[-1], rtol=1e-5)


def test_config_round_trip_and_argument_errors():
    layer = syncbn.SyncBatchNormalization(moving_average="debiased", nonfinite="raise")
    config = layer.get_config()
    assert config["moving_average"] == "debiased" and config["nonfinite"] == "raise"
    copy = syncbn.SyncBatchNormalization.from_config(config)
    assert copy.get_config() == config
    assert syncbn.SyncBatchNormalization().get_config()["nonfinite"] == "skip"
    with pytest.raises(ValueError, match=r"moving_average='bias'"):
        syncbn.SyncBatchNormalization(moving_average="bias")
    with pytest.raises(ValueError, match=r"nonfinite=None"):
        syncbn.SyncBatchNormalization(nonfinite=None)


def _keras_model(momentum=0.9):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(6),
        keras.layers.BatchNormalization(momentum=momentum, name="bn1"),
        keras.layers.Dense(5),
        keras.layers.BatchNormalization(momentum=momentum, name="bn2"),
    ])


def test_convert_forwards_layer_arguments_and_round_trips_weights():
    model = _keras_model()
    x = np.random.default_rng(4).normal(3, 2, (32, 4)).astype(np.float32)
    model(x, training=True)  # Keras BN statistics away from their initial values
    synced = syncbn.convert(model, moving_average="debiased", nonfinite="raise")
    bn = synced.get_layer("bn1")
    assert (bn.moving_average, bn.nonfinite, len(bn.weights)) == ("debiased", "raise", 5)
    # The Keras statistics arrive as initial values, with a zero count.
    np.testing.assert_array_equal(bn.moving_mean.numpy(), model.get_layer("bn1").moving_mean.numpy())
    assert float(bn.moving_updates.numpy()) == 0.0
    step = tf.function(lambda x: synced(x, training=True))
    step(x)
    step(x[:20])
    exported = syncbn.convert(synced, to="local")
    local_bn = exported.get_layer("bn2")
    assert type(local_bn) is keras.layers.BatchNormalization and len(local_bn.weights) == 4
    np.testing.assert_array_equal(local_bn.moving_variance.numpy(),
                                  synced.get_layer("bn2").moving_variance.numpy())
    np.testing.assert_allclose(exported(x), synced(x), rtol=1e-5, atol=1e-5)
    # Back to sync, debiased: the count starts again (Keras BN has none).
    again = syncbn.convert(exported, moving_average="debiased")
    assert float(again.get_layer("bn2").moving_updates.numpy()) == 0.0
    with pytest.raises(ValueError, match="moving_average='x'"):
        syncbn.convert(model, moving_average="x")
    with pytest.raises(ValueError, match="only apply to to='sync'"):
        syncbn.convert(synced, to="local", moving_average="ema")


def test_debiased_layer_loads_keras_bn_weights():
    keras_bn = keras.layers.BatchNormalization()
    keras_bn.build((None, 3))
    keras_bn.set_weights([np.full(3, v, np.float32) for v in (2.0, 1.0, 7.0, 9.0)])
    layer = syncbn.SyncBatchNormalization(moving_average="debiased")
    layer.build((None, 3))
    layer.moving_updates.assign(5.0)
    store = {}
    keras_bn.save_own_variables(store)
    layer.load_own_variables(store)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), 7.0)
    assert float(layer.moving_updates.numpy()) == 0.0
    layer.set_weights(keras_bn.get_weights() + [np.float32(3.0)])
    assert float(layer.moving_updates.numpy()) == 3.0


# -- non-finite steps ------------------------------------------------------------------------


def _with_nan(x):
    x = x.copy()
    x[1, 0] = np.nan
    return x


@pytest.fixture
def monitor(monkeypatch):
    """A fresh process-wide skipped-steps monitor that checks every 50 ms, stopped afterwards."""
    fresh = skip_monitor.SkippedStepsMonitor(interval=0.05)
    monkeypatch.setattr(skip_monitor, "_monitor", fresh)
    yield fresh
    fresh.stop()


class _Records(logging.Handler):
    """Collects the `syncbn.layers` records; `wait_for(text)` waits until one contains text."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []
        self._arrived = threading.Condition()

    def emit(self, record):
        with self._arrived:
            self.records.append(record)
            self._arrived.notify_all()

    def naming(self, text):
        return [r for r in self.records if text in r.getMessage()]

    def wait_for(self, text, timeout=120.0):
        # A liveness bound (the thread checks every 50 ms), not a timing assertion.
        with self._arrived:
            return self._arrived.wait_for(lambda: self.naming(text), timeout)


@pytest.fixture
def records():
    handler = _Records()
    layer_logger = logging.getLogger("syncbn.layers")
    layer_logger.addHandler(handler)
    yield handler
    layer_logger.removeHandler(handler)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_skip_leaves_statistics_finite_counts_and_warns_once(monitor, records, jit_compile):
    data = batches(4, seed=5)
    layer = syncbn.SyncBatchNormalization(momentum=0.5, name=f"bn_skip_{jit_compile}")
    layer.build((None, 3))
    train_steps(layer, data[:2])
    before = layer.moving_mean.numpy().copy()
    step = tf.function(lambda x: layer(x, training=True), jit_compile=jit_compile)
    step(tf.constant(_with_nan(data[2])))
    step(tf.constant(_with_nan(data[3])))
    np.testing.assert_array_equal(layer.moving_mean.numpy(), before)
    assert np.all(np.isfinite(layer.moving_variance.numpy()))
    # Nobody reads the counter: the monitor's thread logs the warning.
    assert records.wait_for(layer.name), records.records
    assert layer.skipped_steps == 2
    step(tf.constant(_with_nan(data[3])))
    assert layer.skipped_steps == 3
    monitor.check()
    warnings = records.naming(layer.name)
    assert len(warnings) == 1, warnings
    assert "training step(s) had non-finite" in warnings[0].getMessage()
    step(tf.constant(data[3]))  # a good step updates again
    assert not np.array_equal(layer.moving_mean.numpy(), before)
    assert layer.skipped_steps == 3


def test_reading_skipped_steps_logs_the_warning(caplog):
    # The default monitor checks every few seconds; a read does not wait for it.
    layer = syncbn.SyncBatchNormalization(name="bn_read")
    layer.build((None, 3))
    with caplog.at_level(logging.WARNING, logger="syncbn.layers"):
        layer(tf.constant(_with_nan(batches(1)[0])), training=True)  # eager
        assert layer.skipped_steps == 1
    assert skip_monitor.monitor().is_watching(layer)
    warnings = [r for r in caplog.records if "'bn_read'" in r.getMessage()]
    assert len(warnings) == 1 and "1 training step(s)" in warnings[0].getMessage(), caplog.records


def test_monitor_warns_once_per_layer_across_models_and_lets_layers_go(monitor, records):
    def model(prefix):
        return keras.Sequential([keras.Input((3,)), keras.layers.Dense(3),
                                 syncbn.SyncBatchNormalization(name=f"{prefix}_bn1"),
                                 syncbn.SyncBatchNormalization(name=f"{prefix}_bn2")])

    first, second = model("first"), model("second")
    x = _with_nan(batches(1)[0])
    tf.function(lambda x: first(x, training=True))(tf.constant(x))
    tf.function(lambda x: second(x, training=True))(tf.constant(batches(1)[0]))
    for name in ["first_bn1", "first_bn2"]:
        assert records.wait_for(f"'{name}'"), records.records
    monitor.check(final=True)
    assert all(len(records.naming(f"'{n}'")) == 1 for n in ["first_bn1", "first_bn2"])
    assert not records.naming("second_"), records.records  # no skipped step, no warning
    assert monitor.running and monitor.is_watching(second.layers[1])
    # Weak references: the monitor keeps no layer alive, and its thread ends
    # once no watched layer is left.
    bn, thread = weakref.ref(first.layers[1]), monitor._thread
    del first, second
    gc.collect()
    assert bn() is None
    thread.join(120.0)  # a liveness bound, not a timing assertion
    assert not monitor.running


def test_monitor_reports_the_total_at_the_last_check(monitor, records):
    layer = syncbn.SyncBatchNormalization(name="bn_total")
    layer.build((None, 3))
    step = tf.function(lambda x: layer(x, training=True))
    step(tf.constant(_with_nan(batches(1)[0])))
    assert layer.skipped_steps == 1
    step(tf.constant(_with_nan(batches(1)[0])))
    step(tf.constant(_with_nan(batches(1)[0])))
    monitor.stop()  # what interpreter exit runs
    assert not monitor.running
    messages = [r.getMessage() for r in records.naming("'bn_total'")]
    assert len(messages) == 2 and "3 training steps skipped in all" in messages[1], messages


def test_monitor_rejects_a_bad_interval():
    with pytest.raises(ValueError, match=r"interval=0"):
        skip_monitor.SkippedStepsMonitor(interval=0)
    with pytest.raises(TypeError, match=r"interval='5'"):
        skip_monitor.SkippedStepsMonitor(interval="5")


def test_a_script_that_skips_a_step_warns_at_exit_and_exits(tmp_path):
    # The script never reads the counter and ends before the monitor's thread
    # checks (its interval is set to an hour here): the last check at exit
    # logs the warning, and the thread neither keeps the process alive nor
    # crashes at shutdown.
    script = tmp_path / "skip.py"
    script.write_text(textwrap.dedent("""
        import numpy as np, tensorflow as tf, syncbn
        syncbn.skip_monitor.monitor().interval = 3600.0
        layer = syncbn.SyncBatchNormalization(name="bn_exit")
        step = tf.function(lambda x: layer(x, training=True))
        x = np.ones((4, 3), "float32")
        x[0, 0] = np.nan
        step(tf.constant(x))
        print("done", flush=True)
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done", result.stdout
    assert "SyncBatchNormalization 'bn_exit': 1 training step(s) had non-finite" in result.stderr, \
        result.stderr


def test_update_is_keras_behaviour_and_outputs_do_not_depend_on_the_mode():
    x = _with_nan(batches(1, seed=6)[0])
    outputs = {}
    for mode in ["skip", "update"]:
        layer = syncbn.SyncBatchNormalization(nonfinite=mode)
        layer.build((None, 3))
        with tf.GradientTape() as tape:
            y = layer(tf.constant(x), training=True)
        outputs[mode] = (y.numpy(), [g.numpy() for g in tape.gradient(y, [layer.gamma, layer.beta])])
        if mode == "update":
            assert np.isnan(layer.moving_mean.numpy()[0])  # as Keras BN: poisoned
            assert layer.skipped_steps == 0
    np.testing.assert_array_equal(outputs["skip"][0], outputs["update"][0])
    for a, b in zip(outputs["skip"][1], outputs["update"][1]):
        np.testing.assert_array_equal(a, b)


def test_raise_names_the_layer():
    layer = syncbn.SyncBatchNormalization(nonfinite="raise", name="bn_loud")
    layer.build((None, 3))
    step = tf.function(lambda x: layer(x, training=True))
    step(tf.constant(batches(1)[0]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="bn_loud"):
        step(tf.constant(_with_nan(batches(1)[0])))


# -- recalibrate -----------------------------------------------------------------------------


def two_bn_model(momentum=0.99, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(6),
        syncbn.SyncBatchNormalization(momentum=momentum, name="bn1"),
        keras.layers.Dense(5, activation="tanh"),
        syncbn.SyncBatchNormalization(momentum=momentum, name="bn2"),
        keras.layers.Dense(2),
    ])


def recalibration_reference(model, global_batches):
    """Float64: per BN layer, the count-weighted averages of each global batch's statistics."""
    sums = {}
    for x in global_batches:
        h = x
        for layer in model.layers:
            if isinstance(layer, syncbn.SyncBatchNormalization):
                values = np.asarray(h, np.float64)
                if len(values):
                    total = sums.setdefault(layer.name, [0.0, 0.0, 0.0])
                    total[0] += len(values)
                    total[1] = total[1] + len(values) * values.mean(0)
                    total[2] = total[2] + len(values) * values.var(0)
            h = layer(h, training=True)
    return {name: (s[1] / s[0], s[2] / s[0]) for name, s in sums.items()}


def test_recalibrate_one_process_matches_float64_and_changes_no_weight():
    model = two_bn_model()
    rng = np.random.default_rng(7)
    data = [(rng.normal(2, 3, (n, 4)).astype(np.float32), np.zeros(n)) for n in (16, 5, 0, 9)]
    trainable_before = [w.numpy().copy() for w in model.trainable_weights]
    want = recalibration_reference(model, [x for x, _ in data])
    assert syncbn.recalibrate(model, data, verbose=0) == 4
    for name, (mean, variance) in want.items():
        layer = model.get_layer(name)
        np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=1e-5)
    for before, after in zip(trainable_before, model.trainable_weights):
        np.testing.assert_array_equal(before, after.numpy())


def test_recalibrate_accepts_datasets_and_steps():
    model = two_bn_model()
    x = np.random.default_rng(8).normal(1, 2, (40, 4)).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros(40))).batch(10)
    want = recalibration_reference(model, [x[:10], x[10:20]])  # before: it moves the EMA
    assert syncbn.recalibrate(model, dataset, steps=2, verbose=0) == 2
    np.testing.assert_allclose(model.get_layer("bn1").moving_mean.numpy(), want["bn1"][0], rtol=1e-5)
    with pytest.raises(ValueError, match="steps=0"):
        syncbn.recalibrate(model, dataset, steps=0)
    with pytest.raises(TypeError, match="data of type int"):
        syncbn.recalibrate(model, 3)
    with pytest.raises(ValueError, match="no SyncBatchNormalization"):
        syncbn.recalibrate(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]), [x])


def test_recalibrate_with_mirrored_strategy_matches_one_process(mirrored_strategy):
    rng = np.random.default_rng(9)
    data = [rng.normal(-1, 2, (n, 4)).astype(np.float32) for n in (13, 6, 3)]
    with mirrored_strategy.scope():
        model = two_bn_model()
    syncbn.recalibrate(model, data, verbose=0)
    reference_model = two_bn_model()
    want = recalibration_reference(reference_model, data)
    for name, (mean, variance) in want.items():
        np.testing.assert_allclose(model.get_layer(name).moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(model.get_layer(name).moving_variance.numpy(), variance, rtol=1e-5)


def test_cold_start_figure_keras_ema_vs_debiased_vs_recalibrate(capsys):
    """The README's figure: 10 steps at momentum 0.999 on data with mean 5 and variance 4."""
    data = batches(10, rows=256, channels=4, mean=5.0, std=2.0, seed=10)
    errors = {}
    for name in ["keras", "debiased", "recalibrate"]:
        if name == "keras":
            layer = keras.layers.BatchNormalization(momentum=0.999)
        else:
            layer = syncbn.SyncBatchNormalization(momentum=0.999, moving_average=(
                "debiased" if name == "debiased" else "ema"))
        model = keras.Sequential([keras.Input((4,)), layer])
        if name == "recalibrate":
            syncbn.recalibrate(model, data, verbose=0)
        else:
            train_steps(layer, data)
        errors[name] = (float(np.max(np.abs(layer.moving_mean.numpy() - 5.0) / 5.0)),
                        float(np.max(np.abs(layer.moving_variance.numpy() - 4.0) / 4.0)))
    with capsys.disabled():
        print("\n10 steps, momentum 0.999, data mean 5 / variance 4: relative error of "
              "moving mean / variance")
        for name, (mean_error, var_error) in errors.items():
            print(f"  {name:12s} {100 * mean_error:5.1f}% / {100 * var_error:5.1f}%")
    assert errors["keras"][0] > 0.98 and errors["keras"][1] > 0.7
    for name in ["debiased", "recalibrate"]:
        assert errors[name][0] < 0.05 and errors[name][1] < 0.05, errors


# -- PreciseBN -------------------------------------------------------------------------------


class _RecordAtValidation(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_test_begin(self, logs=None):
        self.seen.append(self.model.get_layer("bn2").moving_mean.numpy().copy())


def test_precise_bn_recalibrates_before_the_epochs_validation():
    model = two_bn_model(momentum=0.99)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    rng = np.random.default_rng(11)
    x, y = rng.normal(3, 2, (64, 4)).astype(np.float32), rng.normal(size=(64, 2)).astype(np.float32)
    calibration = [x[i:i + 16] for i in range(0, 64, 16)]
    precise = syncbn.PreciseBN(calibration, every_n_epochs=2)
    recorder = _RecordAtValidation()
    history = model.fit(x, y, batch_size=16, epochs=2, validation_data=(x, y), verbose=0,
                        callbacks=[precise, recorder])
    assert precise.recalibrations == 1  # epoch 1 only (every_n_epochs=2)
    after_fit = model.get_layer("bn2").moving_mean.numpy().copy()
    np.testing.assert_array_equal(recorder.seen[1], after_fit)  # epoch 2's validation saw them
    # Negative control: epoch 1's validation saw the plain EMA, far from them.
    assert not np.allclose(recorder.seen[0], after_fit, atol=1e-2)
    # They are the recalibrated statistics, and the epoch's val_loss was computed with them.
    syncbn.recalibrate(model, calibration, verbose=0)
    np.testing.assert_allclose(model.get_layer("bn2").moving_mean.numpy(), after_fit, rtol=1e-6)
    assert history.history["val_loss"][1] == pytest.approx(model.evaluate(x, y, verbose=0), rel=1e-5)


# -- check_consistency -----------------------------------------------------------------------


def test_check_consistency_one_process_and_mirrored(mirrored_strategy):
    assert syncbn.check_consistency(two_bn_model()) == []
    with mirrored_strategy.scope():
        model = two_bn_model()
    assert syncbn.check_consistency(model) == []
    copies = model.get_layer("bn2").moving_mean.value.values
    copies[1].assign(copies[1] + tf.constant([0.0, 0.5, 0.0, 0.0, 0.0]))
    found = syncbn.check_consistency(model)
    assert [(d["layer"], d["weight"]) for d in found] == [("bn2", "moving_mean")], found
    assert found[0]["replicas"] == len(copies)
    with pytest.raises(syncbn.InconsistentReplicasError, match="'bn2'"):
        syncbn.check_consistency(model, strict=True)
    with pytest.raises(ValueError, match="tolerance=-1"):
        syncbn.check_consistency(model, tolerance=-1)


@pytest.mark.parametrize("center,scale", [(False, True), (True, False), (False, False)])
def test_debiased_conversion_without_gamma_or_beta(center, scale):
    model = keras.Sequential([keras.Input((4,)),
                              keras.layers.BatchNormalization(center=center, scale=scale, name="bn")])
    synced = syncbn.convert(model, moving_average="debiased")
    layer = synced.get_layer("bn")
    assert len(layer.weights) == len(model.get_layer("bn").weights) + 1
    x = np.random.default_rng(12).normal(2, 1, (16, 4)).astype(np.float32)
    synced(x, training=True)
    np.testing.assert_allclose(layer.moving_mean.numpy(), x.mean(0), rtol=1e-5)  # t = 1
    exported = syncbn.convert(synced, to="local")
    np.testing.assert_array_equal(exported.get_layer("bn").moving_mean.numpy(), layer.moving_mean.numpy())


def test_the_multiprocess_checks_pass_with_one_replica(tmp_path):
    # tests/jobs/moving_stats.py's checks, which tests/test_moving_multiprocess.py runs
    # on real ranks, here in this process: one replica, layers of communicator="local".
    records = moving_stats.run_checks(create_world("local"), out=str(tmp_path))
    assert [r["check"] for r in records] == list(moving_stats.CHECKS)
    assert all(r["ok"] for r in records), [r["line"] for r in records if not r["ok"]]
    saved = np.load(tmp_path / "rank0.npz")
    assert np.all(np.isfinite(saved["skip_mean"]))
