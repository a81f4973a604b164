"""`python -m syncbn.check` on 3 ranks under the launcher, on every backend, and its
negative control: a communicator that drops the last rank's contribution
(tests/jobs/faulty_communicator.py) must fail every exactness row.
"""

import json
import re
import sys

import pytest

from helpers import CHECKS_PER_SCENARIO, check_rows, output, syncbn_launch

pytestmark = pytest.mark.multiprocess

JOB_TIMEOUT = 600


def _launch(backend, *check_args):
    result = syncbn_launch(3, [sys.executable, "-m", "syncbn.check", *check_args],
                           "--backend", backend, timeout=JOB_TIMEOUT)
    return result, output(result)


# Under syncbn-launch, Horovod and tf.distribute workers run under mpirun, so their
# BN sums take the direct MPI path.
BACKENDS = {"horovod": ("horovod", "mpi-direct"), "mpi": ("mpi", "compiled"),
            "tf": ("tf.distribute", "mpi-direct")}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_three_ranks_pass_on_every_backend(backend, tmp_path):
    auto_picks, kernel = BACKENDS[backend]
    path = tmp_path / "check.json"
    result, output = _launch(backend, "--json", str(path), "--rounds", "3")
    assert result.returncode == 0, output[-6000:]
    rows = check_rows(output)
    assert len(rows) == CHECKS_PER_SCENARIO and all(r[3] == "OK" for r in rows), output[-6000:]
    assert all("batches 3,0,5 " in r[0] for r in rows)
    table = re.sub(r" +", " ", output)
    assert f"| communicator checked | auto -> kernel {kernel}, 3 replicas |" in table, output
    assert f"| auto picks here | {auto_picks} |" in table, output
    assert "| job | 3 processes, 3 replicas" in table
    summary = json.loads(path.read_text())
    assert summary["passed"] is True and summary["processes"] == 3
    assert summary["communicator"]["kernel"] == kernel
    assert summary["performance"]["sum_latency_us"] > 0


@pytest.mark.parametrize("backend", ["mpi", "tf"])
def test_three_ranks_fail_when_a_rank_is_dropped(backend):
    result, output = _launch(backend, "--communicator", "faulty_communicator:drop_last_rank",
                             "--rounds", "0")
    assert result.returncode == 1, output[-6000:]
    rows = check_rows(output)
    assert len(rows) == CHECKS_PER_SCENARIO and all(r[3] == "FAIL" for r in rows), output[-6000:]
    assert "kernel drop-last-rank(" in output
    assert re.search(r"\| all checks +\| 0 of 6 OK on every rank +\| +\| FAIL +\|", output)
