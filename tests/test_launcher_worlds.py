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
import subprocess
import sys

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
NO_WORLD = os.path.join(TESTS_DIR, "jobs", "no_world.py")
JOB_TIMEOUT = 300
TRAINED_ALONE = "trained with this process's batch alone"
# Runs a command without the variables MPI_Init finds the launcher through.
WITHOUT_LAUNCHER = ("import os, sys\n"
                    "for name in list(os.environ):\n"
                    "    if name.startswith(('PMIX_', 'OMPI_MCA_')):\n"
                    "        del os.environ[name]\n"
                    "os.execvp(sys.argv[1], sys.argv[1:])\n")


def _run(argv):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO}
    if os.geteuid() == 0:
        env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    result = subprocess.run(argv, capture_output=True, text=True, timeout=JOB_TIMEOUT, env=env,
                            cwd=REPO)
    return result.returncode, result.stdout + result.stderr


def _check_every_rank_raises(code, output, evidence, fix):
    assert code != 0, output[-4000:]
    assert TRAINED_ALONE not in output, output[-4000:]
    assert output.count("LauncherWorldError") >= 2, output[-4000:]
    for rank in (0, 1):
        assert re.search(rf"syncbn: \S+ started 2 processes \({re.escape(evidence)}\), but "
                         rf"(?:this one \(rank {rank}\)|MPI_COMM_WORLD here has 1 \(this is "
                         rf"rank {rank}\))", output), (rank, output[-4000:])
    assert output.count(fix) >= 2, output[-4000:]


def test_horovodrun_gloo_without_horovod_initialized():
    code, output = _run(["horovodrun", "-np", "2", "--gloo", sys.executable, NO_WORLD])
    _check_every_rank_raises(code, output, "HOROVOD_SIZE=2", "`syncbn.init_horovod()`")


def test_tf_config_workers_training_outside_a_strategy():
    code, output = _run([sys.executable, "-m", "launch", "-np", "2", "--backend", "tf",
                         "--tf-mpi", "no", "--", sys.executable, NO_WORLD])
    _check_every_rank_raises(code, output, "TF_CONFIG with 2 tasks",
                             "`tf.distribute.MultiWorkerMirroredStrategy()`")
    assert re.search(r"rank \d failed first", output), output[-4000:]  # the launcher's verdict


def test_mpirun_whose_mpi_world_is_smaller_than_the_launchers():
    code, output = _run(["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none",
                         sys.executable, "-c", WITHOUT_LAUNCHER, sys.executable, NO_WORLD])
    _check_every_rank_raises(code, output, "OMPI_COMM_WORLD_SIZE=2",
                             "`pip install --no-binary=mpi4py mpi4py`")
