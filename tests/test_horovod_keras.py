"""syncbn.horovod_keras: argument checks and the optimizer contract in one
process, then real 2-rank Horovod (Gloo) jobs for `model.fit`, a custom
`tf.function` loop, and the examples.

The fit job seeds weights, Adam state and data by rank, so the negative
controls (parts of the glue switched off) must end with different weights
across ranks: the positive test can fail.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from syncbn import horovod_keras as hk

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
FIT_JOB = os.path.join(TESTS_DIR, "jobs", "hvd_fit.py")
CUSTOM_LOOP_JOB = os.path.join(TESTS_DIR, "jobs", "hvd_custom_loop.py")
JOB_TIMEOUT = 300
# Also run on the older supported TensorFlow (tests/run.sh's compatibility pass).
pytestmark = pytest.mark.compat
EPOCHS, STEPS_PER_EPOCH, INITIAL_ITERATIONS = 2, 3, 5  # INITIAL_ITERATIONS as in hvd_fit.py


def _env():
    env = dict(os.environ)
    # The syncbn next to these tests, whatever copy is installed.
    env.update({"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": os.pathsep.join([TESTS_DIR, REPO_DIR])})
    if os.geteuid() == 0:
        env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    return env


def _run(command):
    result = subprocess.run(command, capture_output=True, text=True, timeout=JOB_TIMEOUT,
                            env=_env(), cwd=REPO_DIR)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def _horovodrun(script, *args):
    return _run(["horovodrun", "-np", "2", "--gloo", sys.executable, script, *args])


def _arrays(directory, rank, prefix):
    data = np.load(os.path.join(directory, f"rank{rank}.npz"))
    return [data[key] for key in sorted(data.files) if key.startswith(prefix)]


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
    assert "imported False" in _run([sys.executable, "-c", code])


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


# --- Real 2-rank Horovod jobs ----------------------------------------------------------


def _fit_job(tmp_path, without=""):
    out, checkpoints = tmp_path / "out", tmp_path / "checkpoints"
    output = _horovodrun(FIT_JOB, "--out", str(out), "--checkpoint-dir", str(checkpoints),
                         "--epochs", str(EPOCHS), "--steps-per-epoch", str(STEPS_PER_EPOCH),
                         "--without", without)
    assert output.count("hvd_fit rank=") == 2, output[-3000:]
    histories = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return str(out), checkpoints, histories


def test_fit_with_glue_keeps_ranks_identical(tmp_path):
    out, checkpoints, runs = _fit_job(tmp_path)
    model = [_arrays(out, r, "model_") for r in range(2)]
    optimizer = [_arrays(out, r, "optimizer_") for r in range(2)]
    initial = [_arrays(out, r, "initial_") for r in range(2)]

    assert _max_difference(initial[0], initial[1]) > 1e-2  # ranks really started apart
    assert _max_difference(model[0], model[1]) <= 1e-6
    assert _max_difference(optimizer[0], optimizer[1]) <= 1e-6
    assert _max_difference(model[0], initial[0]) > 1e-3  # training changed the weights
    # Rank 0's (restored-like) iteration count won, then every step counted once.
    assert int(optimizer[0][0]) == INITIAL_ITERATIONS + EPOCHS * STEPS_PER_EPOCH
    assert runs[0]["optimizer_class"] == "Adam"
    assert any(name.endswith("_momentum") for name in runs[0]["optimizer_variables"])

    histories = [run["history"] for run in runs]
    assert set(histories[0]) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    for name, values in histories[0].items():
        assert len(values) == EPOCHS
        np.testing.assert_allclose(values, histories[1][name], rtol=1e-12, err_msg=name)

    expected_checkpoints = [f"rank0.epoch{epoch}.keras" for epoch in range(1, EPOCHS + 1)]
    assert sorted(os.listdir(checkpoints)) == expected_checkpoints
    restored = keras.models.load_model(str(checkpoints / f"rank0.epoch{EPOCHS}.keras"))
    assert _max_difference([w.numpy() for w in restored.weights], model[0]) == 0.0
    assert int(restored.optimizer.iterations.numpy()) == int(optimizer[0][0])


# Each control keeps the rest of the glue on, so it shows that part is needed:
# without the broadcast, averaged gradients cannot undo different starts; without
# the averaging, a common start drifts apart on different data.
@pytest.mark.parametrize("without", ["broadcast", "allreduce,metric_average"])
def test_fit_without_glue_ends_with_different_weights(tmp_path, without):
    out, checkpoints, runs = _fit_job(tmp_path, without)
    assert _max_difference(_arrays(out, 0, "model_"), _arrays(out, 1, "model_")) > 1e-3
    assert _max_difference(_arrays(out, 0, "optimizer_"), _arrays(out, 1, "optimizer_")) > 1e-6
    if "metric_average" in without:
        assert runs[0]["history"]["loss"] != runs[1]["history"]["loss"]
    assert all(name.startswith("rank0.") for name in os.listdir(checkpoints))


def test_custom_loop_with_training_flag_variable(tmp_path):
    output = _horovodrun(CUSTOM_LOOP_JOB, "--out", str(tmp_path), "--steps", "3")
    assert output.count(" ok") == 2 and "FAIL" not in output, output[-3000:]
    out = str(tmp_path)
    assert _max_difference(_arrays(out, 0, "model_"), _arrays(out, 1, "model_")) <= 1e-6
    assert _max_difference(_arrays(out, 0, "optimizer_"), _arrays(out, 1, "optimizer_")) <= 1e-6
    local = [_arrays(out, r, "local_grad_") for r in range(2)]
    averaged = [_arrays(out, r, "averaged_grad_") for r in range(2)]
    assert _max_difference(local[0], local[1]) > 1e-3  # different data, different local grads
    for rank in range(2):
        mean = [(a.astype(np.float64) + b) / 2 for a, b in zip(local[0], local[1])]
        assert _max_difference(averaged[rank], mean) <= 1e-6


EXAMPLES = {"horovodrun_fit.py": ["--epochs", "1"], "horovodrun_custom_loop.py": ["--steps", "10"]}


@pytest.mark.parametrize("num_proc", [1, 2])
@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_examples_run_quick_mode(example, num_proc):
    script = os.path.join(REPO_DIR, "examples", example)
    command = [sys.executable, script, *EXAMPLES[example]]
    if num_proc > 1:
        # Our launcher here (the job tests above use horovodrun): both must work.
        command = [sys.executable, "-m", "launch", "-np", str(num_proc), "--backend", "horovod",
                   "--timeout", str(JOB_TIMEOUT - 30), "--", *command]
    output = _run(command)
    assert output.count("rank(s): val_accuracy=") == 1, output[-3000:]  # rank 0 only prints
    assert f"{num_proc} rank(s): val_accuracy=" in output, output[-3000:]
