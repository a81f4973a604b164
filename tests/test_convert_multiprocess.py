"""Training steps of a `syncbn.convert`-ed model on real Horovod ranks.

The world launches of helpers.WORLD_LAUNCHES that run the `convert` check
(tests/jobs/convert_train_step.py): horovodrun over Gloo, where the BN sums go
through `hvd.allreduce`, and mpirun, where they go over MPI directly. Every
rank trains its slice of the global batch (uneven slices) and checks the
moving statistics and weights against the unconverted model trained on the
whole batch in one process, and bit for bit across ranks.
"""

import pytest

from helpers import worlds_with

pytestmark = pytest.mark.multiprocess


@pytest.mark.world_checks("convert")
@pytest.mark.parametrize("name", worlds_with("convert"))
def test_horovod_training_steps_after_conversion(world_launch, name):
    launch = world_launch(name)
    records = launch.records("convert")
    assert len(records) == launch.spec.num_proc, records
    for rank, record in enumerate(records):
        line = record["line"]
        assert f"convert_train_step rank={rank} " in line, line
        assert "bn_converted=4 " in line and "across_ranks_max_abs=0 " in line, line
        assert f"kernel={launch.spec.kernel} " in line, line
        assert record["ok"] and line.endswith(" OK"), line
