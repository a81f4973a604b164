"""Real jobs through `python -m launch`: every backend, one host and simulated hosts, failures.

These start real processes (and, for `--simulate-hosts`, network namespaces: CI runs
as root). Nothing is skipped. The only time bounds asserted are the launcher's promise
to stop a job within 10 s of a crash.
"""

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from helpers import (BACKEND_ARGS, BACKENDS, LAUNCH_JOBS_DIR, REPO, WORLD_CHECKS_JOB,
                     RunningLauncher, hang_job, job_backend, launcher, processes_with,
                     wait_for_no_processes)

pytestmark = pytest.mark.multiprocess

TOPOLOGIES = {
    "one-host": ["-np", "2"],
    "2-simulated-hosts": ["-np", "4", "--simulate-hosts", "2"],
}
# Under mpirun, BN sums bypass Horovod's queue and the strategy's all-reduce.
KERNELS = {"horovod": "mpi-direct", "horovod-gloo": "hvd.allreduce", "mpi": "compiled",
           "tf": "mpi-direct", "tf-no-mpi": "tf.distribute"}


def job_directories(launcher_pid):
    """The private directories that launcher `launcher_pid` made for its job."""
    return [name for name in os.listdir(tempfile.gettempdir())
            if name.startswith(f"syncbn-launch-{launcher_pid}-")]


@pytest.mark.parametrize("topology", sorted(TOPOLOGIES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_job_succeeds(backend, topology, tmp_path):
    # One job per launch runs both checks (tests/jobs/world_checks.py): a real all-reduce
    # through the backend (tests/launch_jobs/collective_check.py), then SyncBatchNormalization
    # against Keras BN on the global batch, uneven counts with an empty rank, on every rank.
    args = TOPOLOGIES[topology]
    num_proc = int(args[args.index("-np") + 1])
    logs = tmp_path / "logs"
    job = [sys.executable, WORLD_CHECKS_JOB, "--world", job_backend(backend),
           "--checks", "collective,exactness", "--out", str(tmp_path / "checks")]
    result = subprocess.run(
        launcher(*args, *BACKEND_ARGS[backend], "--timeout", "150", "--output-dir", str(logs),
                 "--", *job),
        cwd=REPO, capture_output=True, text=True, timeout=200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "every process exited with code 0" in result.stderr
    for rank in range(num_proc):
        log = (logs / f"rank.{rank}.log").read_text()
        assert f"[{rank}] collective_check OK" in result.stdout, output
        assert "collective_check OK" in log
        assert f"rank={rank} size={num_proc}" in log
        # Simulated hosts: each rank sees only its namespace's interfaces.
        assert ("ifaces=lo,sbn0" in log) == (topology == "2-simulated-hosts"), log
        if backend.startswith("horovod"):
            controller = "gloo" if backend == "horovod-gloo" else "mpi"
            assert f"horovod_controller={controller}" in log, log
        exactness = re.findall(rf"^exactness rank={rank}/{num_proc} .*$", log, re.M)
        assert len(exactness) == 3 and all(" ok " in line for line in exactness), log
        assert all(f"kernel={KERNELS[backend]} " in line for line in exactness), log
    assert not any(line and not line.startswith("[") for line in result.stdout.splitlines()), (
        "every output line must carry a [rank] prefix")


@pytest.mark.parametrize("backend", BACKENDS)
def test_crash_of_one_rank_stops_all_within_10_s(backend):
    marker = f"syncbn-crash-{uuid.uuid4().hex}"
    started = time.monotonic()
    result = subprocess.run(
        launcher("-np", "3", *BACKEND_ARGS[backend], "--",
                 *hang_job(marker, "--fail-rank", "1", "--fail-code", "3", "--fail-after", "1")),
        cwd=REPO, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    leftovers = processes_with(marker)
    print(f"{backend}: launcher exited with {result.returncode} after {elapsed:.2f} s, "
          f"{len(leftovers)} job processes left")
    assert result.returncode == 3, result.stdout + result.stderr
    assert elapsed < 10.0
    assert re.search(r"rank 1 failed first with exit code 3", result.stderr), result.stderr
    assert leftovers == []


@pytest.mark.parametrize("backend,simulate", [
    ("horovod", False), ("horovod-gloo", False), ("mpi", False), ("tf", False),
    ("tf-no-mpi", False), ("mpi", True), ("horovod-gloo", True)])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_stopping_the_launcher_leaves_no_orphans(backend, simulate, signum):
    marker = f"syncbn-stop-{uuid.uuid4().hex}"
    topology = ["-np", "4", "--simulate-hosts", "2"] if simulate else ["-np", "2"]
    run = RunningLauncher(launcher(*topology, *BACKEND_ARGS[backend], "--", *hang_job(marker)))
    try:
        run.wait_for(r"^\[\d+\] rank \d+ pid \d+ started", int(topology[1]))
        run.process.send_signal(signum)
        code = run.finish()
        left = wait_for_no_processes(marker)
        assert left == [], f"orphans after {signum.name}: {left}\n{run.output}"
        if signum == signal.SIGTERM:
            assert code == 128 + signal.SIGTERM, run.output
            assert "received SIGTERM; stopping all ranks" in run.output
            assert job_directories(run.process.pid) == []
        else:
            assert code == -signal.SIGKILL
            assert job_directories(run.process.pid) != []  # for the next launcher to remove
    finally:
        if run.process.poll() is None:
            run.process.kill()
        # A SIGKILLed launcher cannot remove its namespaces and its job's directory;
        # the next one does.
        from launch.netns import remove_stale, remove_stale_directories

        (remove_stale if simulate else remove_stale_directories)()
        listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        assert f"sbn-{run.process.pid}-" not in listing.stdout
        assert job_directories(run.process.pid) == []


@pytest.mark.parametrize("backend", ["horovod-gloo", "mpi"])
def test_timeout_ends_a_hanging_job(backend):
    marker = f"syncbn-timeout-{uuid.uuid4().hex}"
    result = subprocess.run(
        launcher("-np", "2", *BACKEND_ARGS[backend], "--timeout", "3", "--", *hang_job(marker)),
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 124, result.stdout + result.stderr
    assert "job timed out after 3 s (--timeout)" in result.stderr
    assert wait_for_no_processes(marker) == []


def test_bad_arguments_fail_before_starting_anything():
    result = subprocess.run(launcher("-np", "3", "-H", "localhost:2", "--", "true"),
                            cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "Received: -np=3" in result.stderr


def error_file_job(mode, barrier_dir, *extra):
    return [sys.executable, os.path.join(LAUNCH_JOBS_DIR, "error_file_job.py"), mode, str(barrier_dir),
            *extra]


def run_and_collect(argv, timeout=240, **env):
    """Runs a launcher; returns `(its pid, CompletedProcess)`."""
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env})
    stdout, stderr = process.communicate(timeout=timeout)
    return process.pid, subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


@pytest.mark.parametrize("backend", ["mpi", "tf-no-mpi"])
def test_error_files_name_the_rank_that_raised_first(backend, tmp_path):
    # Rank 1 raises first but exits last: the first exit (and mpirun's account)
    # would blame rank 0; rank 1's error file names it.
    pid, result = run_and_collect(launcher(
        "-np", "2", *BACKEND_ARGS[backend], "--", *error_file_job("raise", tmp_path)))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    verdict = ("rank 1 failed first: ValueError: rank 1: bad batch (its error file)"
               + ("" if backend == "mpi" else "; rank 0 exited first, with exit code 1"))
    assert f"ERROR {verdict}; stopping the other ranks" in result.stderr, output
    assert job_directories(pid) == []


@pytest.mark.parametrize("backend", ["mpi", "tf-no-mpi"])
def test_without_error_files_the_output_names_the_rank(backend, tmp_path):
    # The same job, not importing syncbn: no error file, so the verdict comes from
    # the output (mpirun's account, or the first exit and traceback) -- here,
    # since rank 1 exits last, a less exact one.
    _, result = run_and_collect(launcher(
        "-np", "2", *BACKEND_ARGS[backend], "--",
        *error_file_job("raise", tmp_path, "--no-syncbn")))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "(its error file)" not in output
    expected = ("rank 0 failed first with exit code 1 (mpirun)" if backend == "mpi" else
                "rank 1 failed first (its traceback came first); rank 0 exited first, "
                "with exit code 1")
    assert expected in result.stderr, output


@pytest.mark.parametrize("kernel", ["compiled", "numpy_function"])
def test_a_collective_timeout_leaves_an_error_file(kernel, tmp_path):
    # The compiled kernel (mpi_all_sum.cc) and the mpi4py path each write the record
    # before MPI_Abort(124).
    _, result = run_and_collect(
        launcher("-np", "2", "--backend", "mpi", "--", *error_file_job("timeout", tmp_path)),
        SYNCBN_COLLECTIVE_TIMEOUT="3", SYNCBN_MPI_KERNEL=kernel)
    output = result.stdout + result.stderr
    assert result.returncode == 124, output
    assert ("ERROR rank 0 failed first: CollectiveTimeout: syncbn: MPI all-reduce "
            "'syncbn/bn_t/forward' waited more than 3 s (SYNCBN_COLLECTIVE_TIMEOUT)") in output
    assert "(its error file); stopping the other ranks" in output
