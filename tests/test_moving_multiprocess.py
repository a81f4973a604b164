"""Moving statistics on real processes (issue #12), for every backend, through
our launcher: each run executes tests/jobs/moving_stats.py (debiased vs
float64 at every step with a save/load mid-run, a NaN on one rank skipped,
recalibrate on uneven and empty batches vs one process, check_consistency
flagging a hand-altered moving mean), and the tests here also check that
every rank ends with bit-identical statistics.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
JOB = os.path.join(TESTS_DIR, "jobs", "moving_stats.py")
TIMEOUT = 900
CHECKS = ("debiased", "skip", "recalibrate", "consistency")


def _launch(backend, num_proc, out):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=os.pathsep.join([TESTS_DIR, REPO]))
    command = [sys.executable, "-m", "launch", "-np", str(num_proc), "--backend", backend,
               "--timeout", str(TIMEOUT - 60), "--",
               sys.executable, JOB, "--backend", backend, "--out", str(out)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, env=env)


def _check(result, num_proc):
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    lines = re.findall(r"moving rank=(\d+)/\d+ check=(\w+) (ok|FAIL) ", output)
    assert sorted(lines) == sorted((str(r), c, "ok") for r in range(num_proc) for c in CHECKS), (
        lines, output[-5000:])
    return output


@pytest.mark.parametrize("backend,num_proc", [
    ("mpi", 1), ("mpi", 3), ("horovod", 2), ("horovod", 3), ("tf", 2),
])
def test_moving_statistics_on_real_processes(backend, num_proc, tmp_path):
    output = _check(_launch(backend, num_proc, tmp_path), num_proc)
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(num_proc)]
    assert set(ranks[0]) >= {"debiased_mean", "skip_mean", "recalibrated_bn2_mean"}
    for other in ranks[1:]:
        for key, value in ranks[0].items():
            np.testing.assert_array_equal(other[key], value, err_msg=key)
    assert all(np.all(np.isfinite(r["skip_mean"])) for r in ranks)
    if num_proc > 1:
        # The NaN was on the last rank only, and every rank skipped the step.
        assert output.count("skipped_steps=1") == num_proc


CHECKPOINT_JOB = os.path.join(TESTS_DIR, "jobs", "consistent_checkpoint.py")


@pytest.mark.parametrize("diverge", [False, True])
def test_consistent_checkpoint_refuses_to_save_from_diverged_replicas(diverge, tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=os.pathsep.join([TESTS_DIR, REPO]))
    command = [sys.executable, "-m", "launch", "-np", "2", "--backend", "horovod",
               "--timeout", str(TIMEOUT - 60), "--", sys.executable, CHECKPOINT_JOB,
               "--dir", str(tmp_path)] + (["--diverge"] if diverge else [])
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    output = result.stdout + result.stderr
    assert (tmp_path / "epoch1.keras").exists(), output[-4000:]
    if not diverge:
        assert result.returncode == 0, output[-4000:]
        assert output.count("checks=2") == 2, output[-4000:]
        assert (tmp_path / "epoch2.keras").exists()
    else:
        assert result.returncode != 0
        raised = re.findall(r"rank=(\d) raised: .*'bn' \(moving_mean differs by 0\.5\)", output)
        assert sorted(raised) == ["0", "1"], output[-4000:]
        assert not (tmp_path / "epoch2.keras").exists()
