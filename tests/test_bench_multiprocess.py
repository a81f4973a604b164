"""The benchmarks themselves, in their smallest settings: bench/model_step.py's
launcher mode end to end and a smallest run of bench/model_layers.py.

The end-to-end test runs `--launch 2 --quick` (every backend, the 6-BN
`small_cnn` at 32x32, 2 samples per rank, one step per epoch) and checks that the printed
table has a row per backend with finite, positive ratios. It asserts no time.
"""

import math
import os
import re
import sys

import pytest

from helpers import REPO, output, run

sys.path.insert(0, os.path.join(REPO, "bench"))
import model_layers  # noqa: E402
import model_step  # noqa: E402

pytestmark = pytest.mark.multiprocess


def table_rows(text):
    """Markdown rows (lists of cells) of the printed table, header and separator dropped."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) >= 2 and set(rows[1]) <= {"---", "---:"}, text  # header, separator
    return rows[2:]


def ratios(cell):
    return [float(value) for value in cell.split(",")]


def test_launch_mode_prints_every_backend_with_finite_positive_ratios():
    command = [sys.executable, os.path.join(REPO, "bench", "model_step.py"),
               "--launch", "2", "--quick", "--timeout", "600"]
    result = run(command, timeout=4000)
    assert result.returncode == 0, output(result)[-6000:]
    rows = {row[0]: row for row in table_rows(result.stdout)}
    expected = [f"{backend} {model_step.QUICK['models']}" for backend in model_step.LAUNCH_BACKENDS]
    labels = [re.sub(r" \(\d+\)$", "", label) for label in rows]
    assert labels == expected, result.stdout
    for label, row in rows.items():
        assert int(re.search(r"\((\d+)\)$", label).group(1)) > 0, row  # BN layers counted
        # backend model (BN) | first epoch s | ratio | steady step ms | ratio
        assert len(row) == 5, row
        for cell in (row[2], row[4]):  # sync/local, synced/local
            values = ratios(cell)
            assert len(values) == 2, row
            assert all(math.isfinite(ratio) and ratio > 0 for ratio in values), row
        for cell in (row[1], row[3]):  # local / sync / synced
            times = [float(value) for value in cell.split(" / ")]
            assert len(times) == 3, row
            assert all(math.isfinite(time) and time > 0 for time in times), row


def test_model_layers_runs_every_variant_on_the_model_shapes():
    # bench/model_layers.py, smallest settings: one row per variant, keras's ratio 1,
    # every time finite and positive; the header names the model's 52 BN layers.
    command = [sys.executable, os.path.join(REPO, "bench", "model_layers.py"), "--size", "32",
               "--batch", "2", "--rounds", "2", "--repeat", "1"]
    result = run(command, timeout=900)
    assert result.returncode == 0, output(result)[-6000:]
    assert "mobilenetv2: 52 BN layers at batch 2, 32x32" in result.stdout, result.stdout
    rows = {row[0]: row for row in table_rows(result.stdout)}
    assert list(rows) == list(model_layers.VARIANTS), result.stdout
    assert rows["keras"][2] == "1.00", rows
    for row in rows.values():
        milliseconds, ratio = float(row[1]), float(row[2])
        assert math.isfinite(milliseconds) and milliseconds > 0, row
        assert math.isfinite(ratio) and ratio > 0, row
