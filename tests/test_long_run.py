"""A shorter long run in CI: bench/long_run.py's checks on 300 steps, 2 ranks.

The full run (2,000 steps) is `python bench/long_run.py`; docs/launcher.md
has its figures. The checks: resident memory growth under 5% after warm-up,
one trace per input signature, moving statistics bit-identical across ranks.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import long_run  # noqa: E402

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


def test_failures_reports_retracing_and_memory_growth():
    """The checks themselves, on made-up results (no processes)."""
    good = {"rank": 0, "traces": 2, "tracing_count": 2, "signatures": 2, "rss_growth": 0.01,
            "rss_warm_mb": 500.0, "rss_end_mb": 505.0, "moving_sha256": "a",
            "weights_sha256": "b"}
    assert long_run.failures([good, {**good, "rank": 1}]) == []
    retraced = {**good, "rank": 1, "traces": 3, "tracing_count": 3}
    assert "3 traces" in long_run.failures([good, retraced])[0]
    grown = {**good, "rank": 1, "rss_growth": 0.08, "rss_end_mb": 540.0}
    assert "grew 8.0%" in long_run.failures([good, grown])[0]
