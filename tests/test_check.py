"""`python -m syncbn.check`: its parts alone, and the whole check, in one process.

The check is only worth something if it can fail, so each way of running it
has a negative control: a communicator that drops the last replica's
contribution (tests/jobs/faulty_communicator.py) must turn its checks to FAIL
and its exit code to non-zero. tests/test_check_multiprocess.py runs it under
the launcher.
"""

import json
import re

import numpy as np
import pytest

import reference as test_reference
from helpers import CHECKS_PER_SCENARIO, check_rows, relative_error
from jobs import faulty_communicator
from syncbn import world
from syncbn.check import cli, exactness, reference

pytestmark = pytest.mark.unit



# --- the parts, no processes --------------------------------------------------------


@pytest.mark.parametrize("shape,axis", [((9, 5), -1), ((4, 3, 3, 6), -1), ((7, 4, 5), 1)])
def test_shipped_float64_reference_agrees_with_the_tests_reference(shape, axis):
    rng = np.random.default_rng(0)
    x, dy = rng.normal(2.0, 3.0, shape), rng.normal(size=shape)
    channels = shape[axis]
    gamma, beta = rng.normal(1.0, 0.3, channels), rng.normal(0.0, 0.3, channels)
    got = reference.batch_norm(x, gamma, beta, dy, axis, 1e-3)
    want = test_reference.batch_norm(x, gamma, beta, dy, axis, 1e-3)
    for key in ("y", "dx", "dgamma", "dbeta", "mean", "variance"):
        assert relative_error(got[key], want[key]) < 1e-12, key


def test_relative_error_fails_nan_and_rejects_shape_mismatch():
    assert reference.relative_error([np.nan, 1.0], [1.0, 1.0]) == float("inf")
    assert reference.relative_error([1.0, 2.5], [1.0, 2.0]) == 0.25
    with pytest.raises(ValueError, match=r"Received: actual.shape=\(2,\), expected.shape=\(3,\)"):
        reference.relative_error([1.0, 2.0], [1.0, 2.0, 3.0])


@pytest.mark.parametrize("num_replicas", [1, 2, 3, 4, 8, 64])
def test_batch_sizes_are_uneven_with_one_empty_replica(num_replicas):
    scenarios = exactness.replica_counts(num_replicas)
    assert all(len(counts) == num_replicas and sum(counts) > 0 for counts in scenarios)
    empties = [counts.count(0) for counts in scenarios]
    if num_replicas == 1:
        assert empties == [0]
    elif num_replicas == 2:
        assert empties == [0, 1] and scenarios[0][0] != scenarios[0][1]
    else:
        assert empties == [1]
        assert len(set(c for c in scenarios[0] if c)) > 1  # uneven
    assert len(exactness.cases(num_replicas)) == len(scenarios) * len(exactness.LAYOUTS)


@pytest.mark.parametrize("env,expected", [
    ({}, "local"),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, "local"),
    ({"OMPI_COMM_WORLD_SIZE": "3"}, "mpi"),
    ({"PMI_SIZE": "4"}, "mpi"),
    ({"HOROVOD_RANK": "0", "HOROVOD_SIZE": "2"}, "horovod"),
    ({"HOROVOD_CONTROLLER": "mpi", "OMPI_COMM_WORLD_SIZE": "3"}, "horovod"),
    ({"TF_CONFIG": "{}", "OMPI_COMM_WORLD_SIZE": "3"}, "tf.distribute"),
    ({"PMIX_RANK": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "0"}, "mpi"),
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "0"}, "local"),
])
def test_world_follows_the_launchers_environment(env, expected):
    assert world.world_name_from_environment(env) == expected


@pytest.mark.parametrize("argv,message", [
    (["--communicator", "nccl"], "Received: --communicator=nccl"),
    (["--tolerance", "0"], "Received: --tolerance=0.0"),
    (["--rounds", "-1"], "Received: --rounds=-1"),
])
def test_bad_arguments_name_the_argument_and_value(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_custom_communicator_loading_errors_name_the_argument():
    with pytest.raises(ValueError, match="Received: --communicator='no_such_module:x'"):
        cli.load_communicator("no_such_module:x")
    with pytest.raises(ValueError, match="does not have"):
        cli.load_communicator("jobs.faulty_communicator:no_such_attribute")
    with pytest.raises(TypeError, match="Received: --communicator='jobs.faulty_communicator:os.sep', giving '/'"):
        cli.load_communicator("jobs.faulty_communicator:os.sep")  # not a communicator
    assert cli.load_communicator("jobs.faulty_communicator:drop_last_rank") is (
        faulty_communicator.drop_last_rank)
    assert isinstance(cli.load_communicator("jobs.faulty_communicator:DropLastRank"),
                      faulty_communicator.DropLastRank)


# --- in this process: one replica, and four on MirroredStrategy ------------------------


class OffInOneChannel:
    """Says 2 replicas and adds 1 to the last entry of every sum: a wrong variance
    (forward) and a wrong gradient sum (backward) in the last channel."""

    num_replicas = 2
    kernel = "off-in-one-channel"

    def all_sum(self, tensor, name):
        import tensorflow as tf

        del name
        return tensor + tf.one_hot(tf.size(tensor) - 1, tf.size(tensor), dtype=tensor.dtype)


def test_one_process_passes_and_writes_json(tmp_path, capsys):
    path = tmp_path / "check.json"
    code = cli.main(["--communicator", "local", "--rounds", "2", "--json", str(path)])
    output = capsys.readouterr().out
    rows = check_rows(output)
    assert code == 0, output
    assert len(rows) == CHECKS_PER_SCENARIO and all(r[3] == "OK" for r in rows), output
    assert "communicator checked | local -> kernel local, 1 replicas" in re.sub(r" +", " ", output)
    result = json.loads(path.read_text())
    assert result["passed"] is True and result["processes"] == 1
    assert [r["counts"] for r in result["exactness"]] == [[11]] * CHECKS_PER_SCENARIO
    assert all(r["largest"] <= r["tolerance"] for r in result["exactness"])
    assert result["performance"]["sync_ms"] > 0 and result["performance"]["sum_latency_us"] is None


def test_one_process_fails_with_a_wrong_sum(capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_communicator", lambda spec: OffInOneChannel())
    code = cli.main(["--communicator", "custom:off", "--rounds", "0"])
    output = capsys.readouterr().out
    rows = check_rows(output)
    assert code == 1, output
    assert len(rows) == CHECKS_PER_SCENARIO and all(r[3] == "FAIL" for r in rows), output
    assert re.search(r"\| all checks +\| 0 of 6 OK on every rank +\| +\| FAIL +\|", output), output


@pytest.mark.parametrize("communicator,passes", [
    ("tf.distribute", True), ("auto", True), (faulty_communicator.drop_last_rank, False)],
    ids=["tf.distribute", "auto", "drop-last-replica"])
def test_four_replicas_in_one_process(mirrored_strategy, communicator, passes):
    # Several replicas per process, as MirroredStrategy on several GPUs: batches 3, 0, 5, 10.
    strategy_world = world.StrategyWorld({}, strategy=mirrored_strategy)
    assert strategy_world.local_replica_ids == [0, 1, 2, 3]
    records = exactness.check(strategy_world, communicator, exactness.DEFAULT_TOLERANCE)
    assert [r["counts"] for r in records] == [[3, 0, 5, 10]] * CHECKS_PER_SCENARIO
    assert [r["ok"] for r in records] == [passes] * CHECKS_PER_SCENARIO, records
    if not passes:
        assert min(r["largest"] for r in records) > 1e-2
