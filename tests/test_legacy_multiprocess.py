"""The tf_keras SyncBatchNormalization (legacy tf.keras) on real processes.

One launch per sum path, 3 ranks with batches of 4, 0 and 7 samples, each
running tests/jobs/legacy.py with `TF_USE_LEGACY_KERAS=1`: exactness against
tf_keras's BatchNormalization on the global batch, Horovod's own Keras 2
helpers in `model.fit`, a summed-gradient tape loop and saving, each rank
checking itself. The test adds up the ranks' gamma/beta gradients, which no
rank can check alone. Then the legacy example runs through horovodrun.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from jobs import exactness
from helpers import relative_error

# Also run on every older supported TensorFlow (tests/run.sh's second pass).
pytestmark = [pytest.mark.multiprocess, pytest.mark.compat]

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
LEGACY_JOB = os.path.join(TESTS_DIR, "jobs", "legacy.py")
JOB_TIMEOUT = 900
COUNTS = [4, 0, 7]
LAYOUTS = ["2d", "ncw", "nhwc"]  # exactness.py's; tf_keras fuses NHWC (Bessel-corrected variance)
MPIRUN = ["mpirun", "--oversubscribe", "--bind-to", "none"]
# path -> (launcher command, the job's --backend, the `kernel=` every exactness line shows)
PATHS = {
    "horovod-gloo": (["horovodrun", "--gloo"], "horovod", "hvd.allreduce"),
    "horovod-mpi": (MPIRUN, "horovod", "mpi-direct"),
    "mpi": (MPIRUN, "mpi", "compiled"),
}
# The job's checks after exactness, per backend, on every rank; "save" on rank 0 only.
CHECKS = {"horovod": ["fit", "broadcast", "tape"], "mpi": ["tape"]}


def _env():
    env = dict(os.environ)
    env.update({"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
                "PYTHONPATH": os.pathsep.join([TESTS_DIR, REPO_DIR])})
    if os.geteuid() == 0:
        env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    return env


def _run(command):
    result = subprocess.run(command, capture_output=True, text=True, timeout=JOB_TIMEOUT,
                            env=_env(), cwd=REPO_DIR)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    return output


def _tf_keras_sums(out_dir):
    """Summed over ranks, dgamma/dbeta equal tf_keras's on the global batch; so do the moving statistics."""
    for layout in LAYOUTS:
        feature_shape, axis = exactness.LAYOUTS[layout]
        reference = tf_keras.layers.BatchNormalization(axis=axis, momentum=exactness.MOMENTUM,
                                                       epsilon=exactness.EPSILON)
        reference.build((None,) + feature_shape)
        reference.set_weights(exactness.initial_weights(layout))
        assert reference.fused is (layout == "nhwc")
        per_rank = [np.load(os.path.join(out_dir, f"rank{r}.{layout}.npz")) for r in range(len(COUNTS))]
        batches = exactness.global_batches(layout, COUNTS, 3, 0.0)
        for step, (x, dy) in enumerate(batches):
            _, _, dgamma, dbeta = exactness.layer_gradients(reference, tf.constant(x), dy)
            assert relative_error(sum(r[f"dgamma_{step}"] for r in per_rank), dgamma.numpy()) < 2e-4
            assert relative_error(sum(r[f"dbeta_{step}"] for r in per_rank), dbeta.numpy()) < 2e-4
        for r in per_rank:
            for name in ("moving_mean", "moving_variance"):
                want = getattr(reference, name).numpy()
                assert relative_error(r[f"{name}_{len(batches) - 1}"], want) < 2e-4, (layout, name)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_three_ranks_uneven_and_empty_match_tf_keras_and_horovods_helpers_work(path, tmp_path):
    launcher, backend, kernel = PATHS[path]
    output = _run(launcher + ["-np", str(len(COUNTS)), sys.executable, LEGACY_JOB,
                              "--backend", backend, "--counts", ",".join(map(str, COUNTS)),
                              "--out", str(tmp_path)])
    lines = re.findall(r"^(?:\[\d\]<stdout>:)?((?:exactness|legacy) rank=\d/\d .*)$", output, re.M)
    exact = [line for line in lines if line.startswith("exactness")]
    assert len(exact) == len(COUNTS) * len(LAYOUTS), output[-4000:]
    assert all(" ok " in line and f"kernel={kernel} " in line for line in exact), exact
    assert sum("rows=0 " in line for line in exact) == len(LAYOUTS)  # the empty rank took part
    checks = [re.search(r"check=(\w+) (ok|FAIL)", line).groups()
              for line in lines if line.startswith("legacy")]
    expected = CHECKS[backend] * len(COUNTS) + (["save"] if backend == "horovod" else [])
    assert sorted(name for name, _ in checks) == sorted(expected), lines
    assert all(state == "ok" for _, state in checks), lines
    _tf_keras_sums(str(tmp_path / "exactness"))


def test_legacy_example_through_horovodrun(tmp_path):
    script = os.path.join(REPO_DIR, "examples", "horovodrun_legacy_tf_keras.py")
    output = _run(["horovodrun", "-np", "2", "--gloo", sys.executable, script, "--epochs", "2",
                   "--checkpoint-dir", str(tmp_path)])
    match = re.search(r"2 rank\(s\): val_accuracy=([\d.]+); reloaded checkpoint-2.h5: "
                      r"SyncBatchNormalization, largest prediction difference ([\d.e+-]+)", output)
    assert match, output[-3000:]
    assert output.count("rank(s): val_accuracy=") == 1  # rank 0 only prints
    assert float(match.group(1)) > 0.8, output[-3000:]  # ten classes; measured 0.93
    assert float(match.group(2)) == 0.0
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1.h5", "checkpoint-2.h5"]
