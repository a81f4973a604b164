"""Every example runs, in its short mode, through our launcher (`python -m launch`,
the `syncbn-launch` command), and says what it should.

The Horovod examples (`horovodrun_fit.py`, `horovodrun_custom_loop.py`) run in
tests/test_horovod_keras.py, with one process and with two.
"""

import json
import os
import re
import sys

import pytest

from helpers import REPO, output, run, syncbn_launch

pytestmark = pytest.mark.multiprocess

TIMEOUT = 600


def _succeeded(result):
    text = output(result)
    assert result.returncode == 0, text[-4000:]
    return text


def _launch(backend, num_proc, script, *args):
    return _succeeded(syncbn_launch(num_proc, [sys.executable, os.path.join(REPO, "examples", script),
                                               *args], "--backend", backend, timeout=TIMEOUT))


def test_multiworker_mirrored_example_keeps_workers_identical():
    output = _launch("tf", 2, "multiworker_mirrored.py", "--epochs", "1")
    checksums = re.findall(r"worker (\d): replicas in sync 2, .* weight checksum ([\d.]+)", output)
    assert sorted(index for index, _ in checksums) == ["0", "1"], output[-3000:]
    assert checksums[0][1] == checksums[1][1]


def test_mpirun_example_keeps_ranks_identical():
    output = _launch("mpi", 2, "mpirun_train.py", "--steps", "20")
    checksums = re.findall(r"rank (\d): communicator mpi, .* weight checksum ([\d.]+)", output)
    assert sorted(rank for rank, _ in checksums) == ["0", "1"], output[-3000:]
    assert checksums[0][1] == checksums[1][1]


def test_train_validate_test_example(tmp_path):
    output = _launch("horovod", 2, "train_validate_test.py", "--epochs", "3", "--out", str(tmp_path))
    match = re.search(r"2 rank\(s\): best checkpoint val accuracy ([\d.]+), test accuracy ([\d.]+)", output)
    assert match, output[-3000:]
    # Ten classes: chance is 0.1. Broken moving statistics land there.
    assert float(match.group(2)) > 0.6, output[-3000:]
    assert len(re.findall(r"moving variance off by", output)) == 2
    assert (tmp_path / "best.keras").exists()
    # The cold start (momentum 0.999, a short run) and its two fixes.
    cold = dict(re.findall(r"(ema|debiased|recalibrate) ([\d.]+)", re.search(
        r"cold start, momentum 0.999, .*", output).group(0)))
    assert set(cold) == {"ema", "debiased", "recalibrate"}, output[-3000:]
    # Measured: ema 0.11 (chance), debiased 0.56 (no cold start, but it still averages in the
    # statistics of the first steps' weights), recalibrate 0.83 (neither).
    assert float(cold["ema"]) < 0.3, cold
    assert float(cold["debiased"]) > float(cold["ema"]) + 0.2, cold
    assert float(cold["recalibrate"]) > max(0.6, float(cold["debiased"])), cold


def test_convert_resnet50_example():
    output = _launch("horovod", 2, "convert_resnet50.py", "--steps", "1")
    assert "step 1/1" in output and "(2 process(es))" in output, output[-3000:]
    assert "exported 53 layers back to BatchNormalization" in output, output[-3000:]


def test_demo_quick_mode(tmp_path):
    output = _succeeded(run([sys.executable, os.path.join(REPO, "examples", "demo.py"),
                             "--epochs", "1", "--out", str(tmp_path)], timeout=TIMEOUT))
    rows = re.findall(r"^\| (local|syncbn|single) \| (\d) x (\d) \|", output, re.M)
    assert rows == [("local", "2", "4"), ("syncbn", "2", "4"), ("single", "1", "8")], output[-3000:]
    recalibrated = re.search(r"^\| syncbn \+ recalibrate \| 2 x 4 \| ([\d.]+) \| ([\d.]+) \|", output, re.M)
    assert recalibrated, output[-3000:]
    gaps = dict(re.findall(r"^  (syncbn|local): ([\d.e+-]+)$", output, re.M))
    # syncbn computes what one process computes; local BN does not.
    assert float(gaps["syncbn"]) < 1e-4 < float(gaps["local"]), gaps
    assert (tmp_path / "val_accuracy.png").stat().st_size > 10_000
    # The plot's second panel: distance from `single` per step, every step at first.
    distances = json.loads((tmp_path / "weight_distance.json").read_text())
    assert distances["syncbn"]["steps"][:100] == list(range(1, 101))
    assert distances["local"]["steps"] == distances["syncbn"]["steps"]
    assert max(distances["syncbn"]["largest_difference"][:20]) < 1e-4
    assert distances["local"]["largest_difference"][19] > 1e-4
    assert not list(tmp_path.glob("*.trajectory.npz"))  # only the distances are kept
