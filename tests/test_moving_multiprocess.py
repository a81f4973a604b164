"""Moving statistics on real processes, for every backend.

The world launches of helpers.WORLD_LAUNCHES that run the `moving` check
(tests/jobs/moving_stats.py: debiased vs float64 at every step with a
save/load mid-run, a NaN on one rank skipped, recalibrate on uneven and
empty batches vs one process, check_consistency flagging a hand-altered
moving mean) on every rank; the tests here also check that every rank ends
with bit-identical statistics. tests/test_moving_statistics.py runs the same
checks in one process.
"""

import os
import re
import sys

import numpy as np
import pytest

from helpers import JOBS_DIR, output, syncbn_launch, worlds_with
from jobs import moving_stats

pytestmark = pytest.mark.multiprocess


@pytest.mark.world_checks("moving")
@pytest.mark.parametrize("name", worlds_with("moving"))
def test_moving_statistics_on_real_processes(world_launch, name):
    launch = world_launch(name)
    num_proc = launch.spec.num_proc
    per_rank = launch.per_rank("moving")
    for records in per_rank:
        assert [r["check"] for r in records] == list(moving_stats.CHECKS), records
        assert all(r["ok"] for r in records), [r["line"] for r in records if not r["ok"]]
    ranks = [dict(np.load(os.path.join(launch.out_dir, "moving", f"rank{r}.npz")))
             for r in range(num_proc)]
    assert set(ranks[0]) >= {"debiased_mean", "skip_mean", "recalibrated_bn2_mean"}
    for other in ranks[1:]:
        for key, value in ranks[0].items():
            np.testing.assert_array_equal(other[key], value, err_msg=key)
    assert all(np.all(np.isfinite(r["skip_mean"])) for r in ranks)
    # The NaN was on the last rank only, and every rank skipped the step.
    skips = [r["line"] for records in per_rank for r in records if r["check"] == "skip"]
    assert all("skipped_steps=1" in line for line in skips) and len(skips) == num_proc, skips


CHECKPOINT_JOB = os.path.join(JOBS_DIR, "consistent_checkpoint.py")


def test_consistent_checkpoint_refuses_to_save_from_diverged_replicas(tmp_path):
    # One launch, two fits: replicas that agree save both epochs; then the last
    # rank alters a moving mean, and every rank refuses the second epoch's save.
    result = syncbn_launch(2, [sys.executable, CHECKPOINT_JOB, "--dir", str(tmp_path)],
                           "--backend", "horovod")
    text = output(result)
    assert result.returncode == 0, text[-4000:]
    agreeing, diverged = tmp_path / "agree", tmp_path / "diverge"
    assert text.count("checks=2") == 2, text[-4000:]
    assert (agreeing / "epoch1.keras").exists() and (agreeing / "epoch2.keras").exists()
    raised = re.findall(r"rank=(\d) raised: .*'bn' \(moving_mean differs by 0\.5\)", text)
    assert sorted(raised) == ["0", "1"], text[-4000:]
    assert (diverged / "epoch1.keras").exists()
    assert not (diverged / "epoch2.keras").exists()
