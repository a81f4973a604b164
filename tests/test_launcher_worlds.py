"""Every launcher's deliberately broken environment, end to end: nothing trains alone in silence.

Each test starts tests/jobs/no_world.py (one `SyncBatchNormalization` with
`communicator="auto"` and a training call) as 2 processes whose world is
broken the way that launcher's users break it, and checks that every process
raises `LauncherWorldError` naming the launcher's variable and the fix:

- horovodrun --gloo, with a script that never initializes Horovod (`HOROVOD_SIZE`);
- TF_CONFIG workers (`syncbn-launch --backend tf --tf-mpi no`) whose script
  trains outside any strategy (`TF_CONFIG`);
- mpirun, whose processes' MPI finds no launcher: an MPI library other than
  the launcher's (mpi4py built against another MPI) makes every process a
  world of one; here the processes lose the variables that Open MPI's
  `MPI_Init` finds mpirun through (`PMIX_*`, `OMPI_MCA_*`), which has the
  same effect, and `MPI_COMM_WORLD` is smaller than `OMPI_COMM_WORLD_SIZE`.

srun without PMI is in tests/test_slurm.py.
"""

import os
import re
import sys

import pytest

from helpers import JOBS_DIR, horovodrun, mpirun, output, syncbn_launch

pytestmark = pytest.mark.multiprocess

NO_WORLD = [sys.executable, os.path.join(JOBS_DIR, "no_world.py")]
TRAINED_ALONE = "trained with this process's batch alone"
# Runs a command without the variables MPI_Init finds the launcher through.
WITHOUT_LAUNCHER = ("import os, sys\n"
                    "for name in list(os.environ):\n"
                    "    if name.startswith(('PMIX_', 'OMPI_MCA_')):\n"
                    "        del os.environ[name]\n"
                    "os.execvp(sys.argv[1], sys.argv[1:])\n")


def _check_every_rank_raises(result, evidence, fix):
    code, text = result.returncode, output(result)
    assert code != 0, text[-4000:]
    assert TRAINED_ALONE not in text, text[-4000:]
    assert text.count("LauncherWorldError") >= 2, text[-4000:]
    for rank in (0, 1):
        assert re.search(rf"syncbn: \S+ started 2 processes \({re.escape(evidence)}\), but "
                         rf"(?:this one \(rank {rank}\)|MPI_COMM_WORLD here has 1 \(this is "
                         rf"rank {rank}\))", text), (rank, text[-4000:])
    assert text.count(fix) >= 2, text[-4000:]


def test_horovodrun_gloo_without_horovod_initialized():
    _check_every_rank_raises(horovodrun(2, NO_WORLD), "HOROVOD_SIZE=2", "`syncbn.init_horovod()`")


def test_tf_config_workers_training_outside_a_strategy():
    result = syncbn_launch(2, NO_WORLD, "--backend", "tf", "--tf-mpi", "no")
    _check_every_rank_raises(result, "TF_CONFIG with 2 tasks",
                             "`tf.distribute.MultiWorkerMirroredStrategy()`")
    assert re.search(r"rank \d failed first", output(result)), output(result)[-4000:]


def test_mpirun_whose_mpi_world_is_smaller_than_the_launchers():
    result = mpirun(2, [sys.executable, "-c", WITHOUT_LAUNCHER, *NO_WORLD])
    _check_every_rank_raises(result, "OMPI_COMM_WORLD_SIZE=2",
                             "`pip install --no-binary=mpi4py mpi4py`")
