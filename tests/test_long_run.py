"""A shorter long run in CI: bench/long_run.py's checks on 300 steps, 2 ranks.

The full run (2,000 steps) is `python bench/long_run.py`; docs/launcher.md
has its figures. The checks: resident memory growth under 5% after warm-up,
one trace per input signature, moving statistics bit-identical across ranks.
tests/test_bench.py checks those checks on made-up results.
"""

import os
import sys

import pytest

from helpers import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))
import long_run  # noqa: E402

pytestmark = pytest.mark.multiprocess

CI_STEPS = 300


@pytest.mark.parametrize("backend", ["mpi", "horovod-gloo"])
def test_long_run_keeps_memory_traces_and_statistics_steady(backend):
    results, _, output = long_run.run_job(backend, CI_STEPS, timeout=600)
    assert long_run.failures(results) == [], output[-4000:]
    for r in results:
        assert r["steps"] == CI_STEPS
        # Full batches and the smaller last batch of each epoch: two signatures,
        # `training` as a tensor (True and False) adding none.
        assert r["signatures"] == 2 and r["traces"] == 2, r
        assert r["rss_warm_mb"] > 100, r  # a real reading of a TensorFlow process


def test_unsynchronized_ranks_fail_the_agreement_check():
    """Negative control: with `communicator="local"` the ranks' statistics must differ."""
    results, _, output = long_run.run_job(
        "mpi", 20, timeout=600, extra_job_args=["--communicator", "local"])
    problems = long_run.failures(results)
    assert any("moving_sha256 differs" in p for p in problems), (problems, output[-3000:])
