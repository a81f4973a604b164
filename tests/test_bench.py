"""bench/model_step.py: its launcher mode end to end, and its arguments and table;
bench/model_layers.py: a smallest run and its arguments.

The end-to-end test runs `--launch 2 --quick` (every backend, the 6-BN
`small_cnn` at 32x32, 2 samples per rank, one step per epoch) and checks that the printed
table has a row per backend with finite, positive ratios. It asserts no time.
"""

import math
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
import model_fit_job  # noqa: E402
import model_layers  # noqa: E402
import model_step  # noqa: E402


def table_rows(output):
    """Markdown rows (lists of cells) of the printed table, header and separator dropped."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in output.splitlines() if line.startswith("| ")]
    assert len(rows) >= 2 and set(rows[1]) <= {"---", "---:"}, output  # header, separator
    return rows[2:]


def ratios(cell):
    return [float(value) for value in cell.split(",")]


def test_launch_mode_prints_every_backend_with_finite_positive_ratios():
    command = [sys.executable, os.path.join(REPO, "bench", "model_step.py"),
               "--launch", "2", "--quick", "--timeout", "600"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=4000)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
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


@pytest.mark.parametrize("argv, message", [
    (["--launch", "1"], "Argument `--launch` must be 0 or >= 2. Received: --launch=1"),
    (["--launch", "2", "--mirrored", "2"], "Received: --launch=2 --mirrored=2"),
    (["--launch", "2", "--backends", "horovod,nccl"], "Received: --backends='horovod,nccl'"),
    (["--models", "vgg16"], "Received: --models='vgg16'"),
    (["--steps", "0"], "Argument `--steps` must be >= 1. Received: --steps=0"),
    (["--timeout", "0"], "Argument `--timeout` must be > 0. Received: --timeout=0.0"),
    (["--launch", "2", "--renorm"], "Argument `--renorm` is for one process and --mirrored."),
])
def test_bad_arguments_name_the_argument_and_value(argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        model_step.parse_args(argv)


def test_renorm_mode_compares_renorm_layers_in_one_process():
    # --renorm: every BN of the model with renorm=True, Keras's against syncbn's.
    command = [sys.executable, os.path.join(REPO, "bench", "model_step.py"), "--renorm",
               "--models", model_step.SMALL_MODEL, "--size", "32", "--batch", "2", "--steps", "1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=2000)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "every BatchNormalization with renorm=True" in result.stdout
    (row,) = table_rows(result.stdout)
    assert row[0] == f"{model_step.SMALL_MODEL}, renorm (6)", row
    # model | first step s | ratio | steady ms | ratio | traced ops keras / syncbn / synced
    assert all(math.isfinite(r) and r > 0 for cell in (row[2], row[4]) for r in ratios(cell)), row
    keras_ops, syncbn_ops, _ = (int(n) for n in row[5].replace(",", "").split(" / "))
    plain = model_step.parse_args(["--models", model_step.SMALL_MODEL])
    assert not plain.renorm and keras_ops > 0 and syncbn_ops > 0


def test_renorm_copy_has_renorm_layers_only():
    import keras

    model = model_step.with_batch_norm_config(
        model_step.build_model(model_step.SMALL_MODEL, 32), renorm=True)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 6 and all(layer.renorm for layer in norms)
    assert all(len(layer.non_trainable_weights) == 5 for layer in norms)


def test_quick_and_launch_defaults():
    args = model_step.parse_args(["--launch", "2", "--quick", "--steps", "7"])
    assert (args.model_list, args.size, args.batch, args.steps) == (["small_cnn"], 32, 2, 1)
    assert args.backend_list == list(model_step.LAUNCH_BACKENDS)
    assert model_step.parse_args(["--launch", "2"]).model_list == [model_step.LAUNCH_MODEL]
    assert model_step.parse_args([]).model_list == model_step.MODELS


def test_launch_command_runs_the_job_through_the_launcher():
    spec = {"backend": "tf", "model": "mobilenetv2", "variant": "sync", "batch": 2, "size": 32,
            "steps": 1, "launch": 2, "timeout": 60}
    command = model_step.launch_command(spec)
    separator = command.index("--")
    assert command[1:separator] == ["-m", "launch", "-np", "2", "--backend", "tf",
                                    "--timeout", "60"]
    job = command[separator + 1:]
    assert job[1].endswith("bench/model_fit_job.py")
    assert job[2:] == ["--backend", "tf", "--model", "mobilenetv2", "--variant", "sync",
                       "--batch", "2", "--size", "32", "--steps", "1"]


def test_fit_job_variants_differ_only_in_their_batch_normalization():
    # local keeps Keras BN; sync and synced are syncbn layers, and only sync all-reduces:
    # synced says 2 replicas (the synchronized path) and its all_sum returns its input.
    import keras
    import numpy as np

    import syncbn

    def model(variant):
        return model_fit_job.make_model(model_fit_job.parse_args(
            ["--backend", "mpi", "--model", "small_cnn", "--variant", variant, "--size", "32"]))

    local, sync, synced = (model(variant) for variant in model_fit_job.VARIANTS)
    local_bn = [l for l in local.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(local_bn) == 6, local.layers
    for converted, communicator in ((sync, "auto"), (synced, None)):
        bn = [l for l in converted.layers if isinstance(l, syncbn.SyncBatchNormalization)]
        assert len(bn) == 6, converted.layers
        for layer, original in zip(bn, local_bn):
            for got, want in zip(layer.get_weights(), original.get_weights()):
                np.testing.assert_array_equal(got, want)
            if communicator:
                assert layer.communicator == communicator
            else:
                assert layer.communicator.num_replicas == 2
                tensor = np.arange(3.0, dtype=np.float32)
                np.testing.assert_array_equal(layer.communicator.all_sum(tensor, "x"), tensor)


def test_table_has_medians_and_per_round_ratios():
    def run(first, steady):
        return {"first_epoch_s": first, "steady_ms": steady, "bn_layers": 52}

    results = {"mpi mobilenetv2": {"local": [run(10.0, 20.0), run(30.0, 40.0)],
                                   "sync": [run(12.0, 22.0), run(30.0, 48.0)]}}
    table = model_step.markdown_side_by_side(results, ["local", "sync"],
                                             model_step.LAUNCH_COLUMNS, traced_ops=False,
                                             row_title="backend model (BN layers)")
    header, separator, row = table.splitlines()
    assert header.startswith("| backend model (BN layers) | first epoch s, local / sync |")
    assert separator == "| --- | ---: | ---: | ---: | ---: |"
    # medians 20.0 / 21.0 and 30.0 / 35.0; ratios per round (1.2, 1.0) and (1.1, 1.2)
    assert row == "| mpi mobilenetv2 (52) | 20.0 / 21.0 | 1.10 | 30.0 / 35.0 | 1.15 |"


def test_model_layers_runs_every_variant_on_the_model_shapes():
    # bench/model_layers.py, smallest settings: one row per variant, keras's ratio 1,
    # every time finite and positive; the header names the model's 52 BN layers.
    command = [sys.executable, os.path.join(REPO, "bench", "model_layers.py"), "--size", "32",
               "--batch", "2", "--rounds", "2", "--repeat", "1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "mobilenetv2: 52 BN layers at batch 2, 32x32" in result.stdout, result.stdout
    rows = {row[0]: row for row in table_rows(result.stdout)}
    assert list(rows) == list(model_layers.VARIANTS), result.stdout
    assert rows["keras"][2] == "1.00", rows
    for row in rows.values():
        milliseconds, ratio = float(row[1]), float(row[2])
        assert math.isfinite(milliseconds) and milliseconds > 0, row
        assert math.isfinite(ratio) and ratio > 0, row


@pytest.mark.parametrize("argv, message", [
    (["--model", "vgg16"], "Received: --model='vgg16'"),
    (["--rounds", "0"], "Argument `--rounds` must be >= 1. Received: --rounds=0"),
])
def test_model_layers_bad_arguments(argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        model_layers.parse_args(argv)
