"""Keras's `jit_compile` and syncbn's `supports_jit`, in one process.

Keras's `compile(jit_compile="auto")` turns XLA on when
`tf.config.list_physical_devices()` shows a GPU (and no strategy is in use),
unless a layer says `supports_jit = False`; an explicit `jit_compile=True`
then falls back with Keras's warning. These tests show Keras a GPU that is
not there (tests/jobs/xla_compile.py does it on real processes).
"""

import contextlib
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import syncbn
from syncbn.collectives import PretendReplicas
from syncbn.world import several_processes

from jobs.xla_compile import fake_gpu_devices

pytestmark = pytest.mark.unit


def _compiled(layer, jit_compile, strategy=None):
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        model = keras.Sequential([keras.Input((4,)), layer, keras.layers.Dense(1)])
        with fake_gpu_devices(tf), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.compile(optimizer="sgd", loss="mse", jit_compile=jit_compile)
    return model, [str(w.message) for w in caught]


def test_auto_compiles_one_process_with_xla_and_trains():
    layer = syncbn.SyncBatchNormalization()
    model, _ = _compiled(layer, "auto")
    assert model.jit_compile is True
    x = np.random.default_rng(0).normal(3.0, 2.0, (32, 4)).astype("float32")
    model.fit(x, x.sum(axis=1), batch_size=16, epochs=1, verbose=0)
    assert np.all(layer.moving_mean.numpy() > 0.0)


@pytest.mark.parametrize("communicator", ["horovod", "mpi", "tf.distribute"])
def test_sums_that_xla_cannot_compile_turn_auto_off(communicator):
    model, _ = _compiled(syncbn.SyncBatchNormalization(communicator=communicator), "auto")
    assert model.jit_compile is False


@pytest.mark.parametrize("communicator", ["horovod", "mpi"])
def test_explicit_xla_falls_back_with_keras_warning(communicator):
    model, messages = _compiled(syncbn.SyncBatchNormalization(communicator=communicator), True)
    assert model.jit_compile is False
    assert any("doesn't support `jit_compile=True`" in m for m in messages), messages


@pytest.mark.parametrize("variable,value", [
    ("HOROVOD_SIZE", "2"), ("OMPI_COMM_WORLD_SIZE", "4"), ("SLURM_STEP_NUM_TASKS", "2")])
def test_auto_under_a_multi_process_launcher_leaves_xla_off(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    assert several_processes()
    model, _ = _compiled(syncbn.SyncBatchNormalization(), "auto")
    assert model.jit_compile is False


def test_layers_built_under_a_strategy_of_several_replicas_leave_xla_off(mirrored_strategy):
    layer = syncbn.SyncBatchNormalization()
    model, messages = _compiled(layer, True, strategy=mirrored_strategy)
    assert layer.supports_jit is False and model.jit_compile is False, messages


def test_custom_communicators_say_so_with_supports_xla():
    assert syncbn.SyncBatchNormalization(communicator=PretendReplicas()).supports_jit is True
    no_xla = PretendReplicas()
    no_xla.supports_xla = False
    assert syncbn.SyncBatchNormalization(communicator=no_xla).supports_jit is False


def test_supports_jit_can_still_be_turned_off_by_hand():
    layer = syncbn.SyncBatchNormalization()
    layer.supports_jit = False
    model, _ = _compiled(layer, "auto")
    assert model.jit_compile is False
