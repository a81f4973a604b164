"""Real processes on every sum path: horovodrun (Gloo), mpirun (Horovod over MPI,
mpi4py with either kernel), MultiWorkerMirroredStrategy workers, and the launcher.

Each path is one launch of tests/jobs/world_checks.py (helpers.WORLD_LAUNCHES),
which runs every check of that path in one world; the tests here assert on
the records of its exactness checks (every rank compares its slice with one
Keras BatchNormalization on the global batch, or float64 NumPy far from zero)
and also add up the per-rank gamma/beta gradients and compare them with the
global batch's, which no single rank does. The jobs that must fail (ranks that
disagree, a rank that never arrives) run on launches of their own.
"""

import os
import re
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import (JOBS_DIR, WORLD_LAUNCHES, mpirun, mpirun_command, output, relative_error, run,
                     worlds_with)
from jobs import exactness

pytestmark = pytest.mark.multiprocess

EXACTNESS = os.path.join(JOBS_DIR, "exactness.py")


def _check_summed_parameter_gradients(out_dir, counts, layouts, steps, offset=0.0):
    """Summed over ranks, dgamma/dbeta equal Keras's on the global batch (renorm and masks too)."""
    for layout in layouts:
        reference = exactness.keras_reference_layer(layout)
        per_rank = [np.load(os.path.join(out_dir, f"rank{r}.{layout}.npz")) for r in range(len(counts))]
        batches = exactness.global_batches(layout, counts, steps, offset)
        masks = exactness.global_masks(layout, counts, steps)
        for step, ((x, dy), mask) in enumerate(zip(batches, masks)):
            _, _, dgamma, dbeta = exactness.layer_gradients(
                reference, tf.constant(x), dy, None if mask is None else tf.constant(mask))
            summed_dgamma = sum(r[f"dgamma_{step}"] for r in per_rank)
            summed_dbeta = sum(r[f"dbeta_{step}"] for r in per_rank)
            assert relative_error(summed_dgamma, dgamma.numpy()) < 2e-4, (layout, step)
            assert relative_error(summed_dbeta, dbeta.numpy()) < 2e-4, (layout, step)
        for r in per_rank:
            for name in exactness.weight_names(layout):
                assert relative_error(r[f"{name}_{steps - 1}"],
                                      getattr(reference, name).numpy()) < 2e-4, (layout, name)


def _exact_on_the_global_batch(launch, check, case):
    """`check`'s records, after checking them and the summed gamma/beta gradients.

    Every rank passed every layout of `case` (tests/jobs/exactness.py), one rank had an empty
    batch in each, and the gradients summed over ranks and the final weights equal Keras's
    layer on the global batch.
    """
    counts = case.counts_for(launch.spec.num_proc)
    records = _passed(launch, check, len(case.layouts))
    assert 0 in counts and sum(r["rows"] == 0 for r in records) == len(case.layouts)  # it took part
    _check_summed_parameter_gradients(os.path.join(launch.out_dir, check), counts, case.layouts,
                                      case.steps)
    return records


def _passed(launch, check, per_rank):
    """`check`'s records of every rank: `per_rank` each, all passed, summed by the world's kernel."""
    records = launch.records(check)
    assert len(records) == per_rank * launch.spec.num_proc, [r["line"] for r in records]
    assert all(r["ok"] for r in records), [r["line"] for r in records if not r["ok"]]
    assert all(r["kernel"] == launch.spec.kernel for r in records), [r["line"] for r in records]
    return records


@pytest.mark.compat
@pytest.mark.parametrize("name", sorted(WORLD_LAUNCHES))
def test_launch_exits_cleanly_with_every_check_on_every_rank(world_launch, name):
    launch = world_launch(name)
    done = re.findall(rf"world_checks rank=\d+/{launch.spec.num_proc} ok ", launch.output)
    assert launch.result.returncode == 0 and len(done) == launch.spec.num_proc, (
        launch.output[-6000:])
    for check in launch.checks:
        assert all(launch.per_rank(check)), check  # every rank recorded something


@pytest.mark.compat
@pytest.mark.world_checks("exactness")
@pytest.mark.parametrize("name", worlds_with("exactness"))
def test_uneven_ranks_with_an_empty_rank_match_the_global_batch(world_launch, name):
    records = _exact_on_the_global_batch(world_launch(name), "exactness", exactness.Case())
    assert all(r["kernels"] == "elementwise" for r in records), records  # what CPUs run


@pytest.mark.world_checks("renorm_masks")
@pytest.mark.parametrize("name", worlds_with("renorm_masks"))
def test_renorm_and_a_per_channel_mask_match_the_global_batch(world_launch, name):
    # Batch renormalization (r and d from the global statistics, clipped; all five
    # moving weights) and a Keras mask with channels on axis 1 (a count per channel,
    # rank 0's rows all masked out), uneven ranks with an empty one, against Keras's
    # layer on the global batch; summed gamma/beta gradients too.
    records = _exact_on_the_global_batch(world_launch(name), "renorm_masks",
                                         exactness.RENORM_MASKS_CASE)
    assert {r["layout"] for r in records} == {"renorm", "masked_ncw"}


@pytest.mark.world_checks("masked_model")
@pytest.mark.parametrize("name", worlds_with("masked_model"))
def test_masking_then_batch_norm_on_axis_1_trains_as_one_process(world_launch, name):
    # Masking, then SyncBatchNormalization(axis=1): Keras's mask covers the channel
    # axis, each channel has its own global count, rank 0's rows are all masked out.
    # Moving statistics, outputs and weights after 3 SGD steps equal one process's
    # keras.layers.BatchNormalization on the global batch (tests/jobs/masked_model.py).
    launch = world_launch(name)
    records = launch.records("masked_model")
    assert len(records) == launch.spec.num_proc, [r["line"] for r in records]
    assert all(r["ok"] for r in records), [r["line"] for r in records]
    assert records[0]["masked_rows"] == records[0]["rows"] > 0, records[0]  # a fully masked rank


@pytest.mark.world_checks("large_offset")
@pytest.mark.parametrize("name", worlds_with("large_offset"))
def test_large_offset_across_ranks(world_launch, name):
    records = _passed(world_launch(name), "large_offset", 2)  # offsets 1e4 and 1e5
    assert {r["case"] for r in records} == {"offset_1e4", "offset_1e5"}
    assert all("reference=float64" in r["line"] for r in records)


@pytest.mark.world_checks("fused")
@pytest.mark.parametrize("name", worlds_with("fused"))
def test_fused_kernels_across_ranks_uneven_with_empty_rank(world_launch, name):
    # GPUs run the fused kernels (syncbn.ops.kernels_for); CPUs, as everywhere
    # else in these tests, the element-wise ones. Forced here, far from zero.
    records = _passed(world_launch(name), "fused", 2)  # 2 layouts
    assert any(r["rows"] == 0 for r in records)
    assert all("reference=float64" in r["line"] and r["kernels"] == "fused" for r in records)


@pytest.mark.world_checks("groups")
@pytest.mark.parametrize("name", worlds_with("groups"))
def test_group_size_syncs_within_consecutive_groups(world_launch, name):
    _passed(world_launch(name), "groups", 2)  # 2 layouts, each rank against its group's batch


@pytest.mark.world_checks("auto")
@pytest.mark.parametrize("name", worlds_with("auto"))
def test_auto_communicator_detects_the_launcher(world_launch, name):
    # The world too comes from the launcher's environment (world_checks.py --world auto).
    assert world_launch(name).spec.world == "auto"
    _passed(world_launch(name), "auto", 1)


def test_ranks_fall_back_together_when_one_cannot_sum_over_mpi():
    # Rank 1 is barred from the compiled kernel: both ranks must then use
    # hvd.allreduce (a mixed job would hang), and say why.
    job = [sys.executable, EXACTNESS, "--backend", "horovod", "--counts", "3,5", "--layouts", "2d"]
    command = (mpirun_command(1, job)
               + [":", "-np", "1", "-x", "SYNCBN_MPI_KERNEL=numpy_function"] + job)
    result = run(command)
    text = output(result)
    lines = re.findall(r"exactness rank=\d+/\d+ .*? (?:ok|FAIL) ", text)
    assert result.returncode == 0, text[-4000:]
    assert len(lines) == 2 and all(" ok " in line for line in lines), lines
    assert all("kernel=hvd.allreduce " in line for line in lines), lines
    assert "this rank: SYNCBN_MPI_KERNEL=numpy_function" in text, text[-3000:]
    assert "this rank: can; another cannot" in text, text[-3000:]


MISMATCH_JOB = os.path.join(JOBS_DIR, "mismatch.py")
MPI_KERNELS = ["compiled", "numpy_function"]


@pytest.mark.parametrize("kernel", MPI_KERNELS)
def test_mpi_detects_ranks_calling_layers_in_different_orders(kernel):
    result = mpirun(2, [sys.executable, MISMATCH_JOB, "order"], SYNCBN_MPI_KERNEL=kernel)
    text = output(result)
    assert result.returncode != 0
    for rank, other in ((0, 1), (1, 0)):
        assert re.search(rf"syncbn: ranks disagree at a sync BN collective: this rank \({rank}\) "
                         rf"is at 'syncbn/\w+/forward' with float\d+\[7\]; rank {other} is at ",
                         text), text[-3000:]


@pytest.mark.parametrize("kernel", MPI_KERNELS)
def test_mpi_detects_the_same_layer_with_a_different_channel_count(kernel):
    # Open MPI would sum the mismatched buffers, and both ranks would exit 0.
    result = mpirun(2, [sys.executable, MISMATCH_JOB, "shape"], SYNCBN_MPI_KERNEL=kernel)
    text = output(result)
    assert result.returncode != 0, text[-3000:]
    assert "finished without an error" not in text, text[-3000:]
    # Every rank names the layer, its own vector (2C + 1 values) and the other rank's.
    for rank, own, other, theirs in ((0, 17, 1, 9), (1, 9, 0, 17)):
        assert (f"this rank ({rank}) is at 'syncbn/first/forward' with float64[{own}]; "
                f"rank {other} is at 'syncbn/first/forward' with float64[{theirs}]") in text, (
            text[-3000:])


@pytest.mark.parametrize("kernel", MPI_KERNELS)
def test_mpi_rank_that_never_arrives_times_out_instead_of_hanging(kernel):
    result = mpirun(2, [sys.executable, MISMATCH_JOB, "absent"], SYNCBN_COLLECTIVE_TIMEOUT="3",
                    SYNCBN_MPI_KERNEL=kernel)
    text = output(result)
    assert result.returncode == 124, text[-3000:]  # the waiting rank's MPI_Abort code
    assert "waited more than 3 s (SYNCBN_COLLECTIVE_TIMEOUT)" in text, text[-3000:]
