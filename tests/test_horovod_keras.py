"""syncbn.horovod_keras in one process: argument checks and the optimizer contract.

tests/test_horovod_keras_multiprocess.py runs the glue on real Horovod ranks.
"""

import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import output, run
from syncbn import horovod_keras as hk

# Also run on the older supported TensorFlow (tests/run.sh's compatibility pass).
pytestmark = [pytest.mark.unit, pytest.mark.compat]


def _max_difference(first, second):
    assert len(first) == len(second) > 0
    return max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(first, second))


# --- Arguments, in one process -------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: hk.broadcast_variables(keras.Variable(1.0)), TypeError,
         "Received: variables=<variable"),
        (lambda: hk.broadcast_variables([tf.constant(1.0)]), TypeError,
         r"Received: variables\[0\]="),
        (lambda: hk.broadcast_variables([], root_rank=-1), ValueError, "Received: root_rank=-1"),
        (lambda: hk.broadcast_variables([], root_rank="0"), TypeError, "Received: root_rank='0'"),
        (lambda: hk.broadcast_variables([], root_rank=True), TypeError, "Received: root_rank=True"),
        (lambda: hk.allreduce_gradients(tf.constant([1.0])), TypeError,
         "Received: grads=<tf.Tensor"),
        (lambda: hk.allreduce_gradients([np.ones(2)]), TypeError, r"Received: grads\[0\]=array"),
        (lambda: hk.allreduce_gradients([None], op="mean"), ValueError, "Received: op='mean'"),
        (lambda: hk.DistributedOptimizer("adam"), TypeError, "Received: optimizer='adam'"),
        (lambda: hk.BroadcastInitialState(root_rank=-2), ValueError, "Received: root_rank=-2"),
        (lambda: hk.BroadcastInitialState(root_rank=0.0), TypeError, "Received: root_rank=0.0"),
        (lambda: hk.chief_only(keras.callbacks.History(), "ckpt"), TypeError,
         r"Received: callbacks\[1\]='ckpt'"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(call, error, message):
    # Checked before Horovod is touched, so this needs no Horovod job.
    with pytest.raises(error, match=message):
        call()


def test_functions_say_how_when_horovod_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "horovod.tensorflow", None)
    for function in (hk.rank, hk.size, hk.is_chief, lambda: hk.allreduce_gradients([])):
        with pytest.raises(RuntimeError, match="needs Horovod built with TensorFlow"):
            function()


def test_module_imports_without_horovod():
    code = ("import sys; sys.modules['horovod'] = None; import syncbn.horovod_keras as hk; "
            "print('imported', 'horovod.tensorflow' in sys.modules)")
    result = run([sys.executable, "-c", code])
    assert result.returncode == 0 and "imported False" in result.stdout, output(result)[-4000:]


def test_distributed_optimizer_keeps_class_config_and_serialization():
    optimizer = keras.optimizers.Adam(learning_rate=0.01, global_clipnorm=1.0)
    distributed = hk.DistributedOptimizer(optimizer)
    assert isinstance(distributed, keras.optimizers.Adam)
    assert type(optimizer) is keras.optimizers.Adam  # the argument is left alone
    assert distributed.get_config() == optimizer.get_config()
    serialized = keras.optimizers.serialize(distributed)
    assert serialized["class_name"] == "Adam"
    # A saved config loads as the plain optimizer (documented: wrap again after loading).
    assert type(keras.optimizers.deserialize(serialized)) is keras.optimizers.Adam
    assert type(hk.DistributedOptimizer(distributed)) is type(distributed)  # no double wrapping


def test_distributed_optimizer_carries_state_across_save_load_and_rewrap(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(np.ones((4, 3), np.float32), np.zeros((4, 2), np.float32), epochs=2, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)

    loaded = keras.models.load_model(path)
    loaded.optimizer = hk.DistributedOptimizer(loaded.optimizer)
    assert loaded.optimizer._syncbn_allreduces_gradients
    assert int(loaded.optimizer.iterations.numpy()) == 2
    assert _max_difference([v.numpy() for v in loaded.optimizer.variables],
                           [v.numpy() for v in model.optimizer.variables]) == 0.0
    loaded.save(path)
    assert int(keras.models.load_model(path).optimizer.iterations.numpy()) == 2
