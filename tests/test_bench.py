"""The benchmarks' parts in one process: bench/model_step.py's arguments, launch
command and table, bench/model_fit_job.py's variants, bench/model_layers.py's
arguments, and bench/long_run.py's checks on made-up results.

tests/test_bench_multiprocess.py runs the benchmarks themselves, in their
smallest settings.
"""

import os
import re
import sys

import pytest

from helpers import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))
import long_run  # noqa: E402
import model_fit_job  # noqa: E402
import model_layers  # noqa: E402
import model_step  # noqa: E402

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("argv, message", [
    (["--launch", "1"], "Argument `--launch` must be 0 or >= 2. Received: --launch=1"),
    (["--launch", "2", "--mirrored", "2"], "Received: --launch=2 --mirrored=2"),
    (["--launch", "2", "--backends", "horovod,nccl"], "Received: --backends='horovod,nccl'"),
    (["--models", "vgg16"], "Received: --models='vgg16'"),
    (["--steps", "0"], "Argument `--steps` must be >= 1. Received: --steps=0"),
    (["--timeout", "0"], "Argument `--timeout` must be > 0. Received: --timeout=0.0"),
])
def test_bad_arguments_name_the_argument_and_value(argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        model_step.parse_args(argv)


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


@pytest.mark.parametrize("argv, message", [
    (["--model", "vgg16"], "Received: --model='vgg16'"),
    (["--rounds", "0"], "Argument `--rounds` must be >= 1. Received: --rounds=0"),
])
def test_model_layers_bad_arguments(argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        model_layers.parse_args(argv)


def test_long_run_failures_report_retracing_and_memory_growth():
    """bench/long_run.py's checks on made-up results (tests/test_long_run.py runs the job)."""
    good = {"rank": 0, "traces": 2, "tracing_count": 2, "signatures": 2, "rss_growth": 0.01,
            "rss_warm_mb": 500.0, "rss_end_mb": 505.0, "moving_sha256": "a",
            "weights_sha256": "b"}
    assert long_run.failures([good, {**good, "rank": 1}]) == []
    retraced = {**good, "rank": 1, "traces": 3, "tracing_count": 3}
    assert "3 traces" in long_run.failures([good, retraced])[0]
    grown = {**good, "rank": 1, "rss_growth": 0.08, "rss_end_mb": 540.0}
    assert "grew 8.0%" in long_run.failures([good, grown])[0]
