"""Real jobs through `python -m launch`: every backend, one host and simulated hosts, failures.

These start real processes (and, for `--simulate-hosts`, network namespaces: CI runs
as root). Nothing is skipped. The only time bounds asserted are the launcher's promise
to stop a job within 10 s of a crash.
"""

import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

from helpers import (BACKEND_ARGS, BACKENDS, REPO, WORLD_CHECKS_JOB, RunningLauncher, hang_job,
                     job_backend, launcher, processes_with, wait_for_no_processes)

pytestmark = pytest.mark.multiprocess

TOPOLOGIES = {
    "one-host": ["-np", "2"],
    "2-simulated-hosts": ["-np", "4", "--simulate-hosts", "2"],
}
# Under mpirun, BN sums bypass Horovod's queue and the strategy's all-reduce.
KERNELS = {"horovod": "mpi-direct", "horovod-gloo": "hvd.allreduce", "mpi": "compiled",
           "tf": "mpi-direct", "tf-no-mpi": "tf.distribute"}


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
        else:
            assert code == -signal.SIGKILL
    finally:
        if run.process.poll() is None:
            run.process.kill()
        if simulate:
            # A SIGKILLed launcher cannot remove its namespaces; the next one does.
            from launch.netns import remove_stale

            remove_stale()
            listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
            assert f"sbn-{run.process.pid}-" not in listing.stdout


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
