"""syncbn.horovod_keras on real 2-rank Horovod (Gloo) jobs: `model.fit`, a custom
`tf.function` loop, and the examples.

The fit job seeds weights, Adam state and data by rank, so the negative
controls (parts of the glue switched off) must end with different weights
across ranks: the positive test can fail.
"""

import json
import os
import sys

import keras
import numpy as np
import pytest

from helpers import JOBS_DIR, REPO, horovodrun, output, run, syncbn_launch

# Also run on the older supported TensorFlow (tests/run.sh's compatibility pass).
pytestmark = [pytest.mark.multiprocess, pytest.mark.compat]

FIT_JOB = os.path.join(JOBS_DIR, "hvd_fit.py")
CUSTOM_LOOP_JOB = os.path.join(JOBS_DIR, "hvd_custom_loop.py")
EPOCHS, STEPS_PER_EPOCH, INITIAL_ITERATIONS = 2, 3, 5  # INITIAL_ITERATIONS as in hvd_fit.py


def _succeeded(result):
    text = output(result)
    assert result.returncode == 0, text[-4000:]
    return text


def _horovodrun(script, *args):
    return _succeeded(horovodrun(2, [sys.executable, script, *args]))


def _arrays(directory, rank, prefix):
    data = np.load(os.path.join(directory, f"rank{rank}.npz"))
    return [data[key] for key in sorted(data.files) if key.startswith(prefix)]


def _max_difference(first, second):
    assert len(first) == len(second) > 0
    return max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(first, second))


# --- Real 2-rank Horovod jobs ----------------------------------------------------------


# The glue whole, then each negative control, in one launch: the job's runs.
FIT_RUNS = ("none", "broadcast", "allreduce,metric_average")


@pytest.fixture(scope="module")
def fit_runs(tmp_path_factory):
    """`fit_runs(without)`: `(out dir, checkpoint dir, per-rank History)` of that run."""
    root = tmp_path_factory.mktemp("hvd_fit")
    out, checkpoints = root / "out", root / "checkpoints"
    text = _horovodrun(FIT_JOB, "--out", str(out), "--checkpoint-dir", str(checkpoints),
                       "--epochs", str(EPOCHS), "--steps-per-epoch", str(STEPS_PER_EPOCH),
                       "--without", ";".join(FIT_RUNS))
    assert text.count("hvd_fit rank=") == 2 * len(FIT_RUNS), text[-3000:]

    def run(without):
        histories = [json.loads((out / without / f"rank{r}.json").read_text()) for r in range(2)]
        return str(out / without), checkpoints / without, histories

    return run


def test_fit_with_glue_keeps_ranks_identical(fit_runs):
    out, checkpoints, runs = fit_runs("none")
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
@pytest.mark.parametrize("without", FIT_RUNS[1:])
def test_fit_without_glue_ends_with_different_weights(fit_runs, without):
    out, checkpoints, runs = fit_runs(without)
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
    script = os.path.join(REPO, "examples", example)
    command = [sys.executable, script, *EXAMPLES[example]]
    if num_proc > 1:
        # Our launcher here (the job tests above use horovodrun): both must work.
        text = _succeeded(syncbn_launch(num_proc, command, "--backend", "horovod"))
    else:
        text = _succeeded(run(command))
    assert text.count("rank(s): val_accuracy=") == 1, text[-3000:]  # rank 0 only prints
    assert f"{num_proc} rank(s): val_accuracy=" in text, text[-3000:]
