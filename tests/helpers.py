"""What the tests share: the environment of launched jobs and the ways to launch them.

Test modules import from here, never from `conftest` or from each other.

* `job_env`: the environment every launched process gets (this checkout's
  syncbn and the test jobs on `PYTHONPATH`, quiet TensorFlow, Open MPI allowed
  to run as root).
* `run`, and the launchers that wrap it: `syncbn_launch` (`python -m launch`,
  the `syncbn-launch` command), `horovodrun`, `mpirun` and `tf_workers`
  (processes with a `TF_CONFIG` each); `launcher` builds a launcher command
  line for tests that start it themselves.
* What the in-process tests need of the test session: the virtual CPUs,
  and the kernel sets (`KERNELS`, `kernels_env`).
* Processes of a job found by a marker on their command line, for the
  launcher's and the fault tests' "nothing left behind".

* The tolerance helper, `relative_error`: the library's own
  (`syncbn.check.reference`, NaN and infinity fail every tolerance), which the
  test jobs import from there.
"""

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from unittest import mock

from syncbn.check.reference import relative_error  # noqa: F401

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
JOBS_DIR = os.path.join(TESTS_DIR, "jobs")
LAUNCH_JOBS_DIR = os.path.join(TESTS_DIR, "launch_jobs")
# Seconds a launched job may take before the test gives up on it.
JOB_TIMEOUT = 300

# Virtual CPU devices of the test process (conftest.py splits the CPU), for
# the in-process MirroredStrategy replicas.
NUM_VIRTUAL_CPUS = 4
KERNELS = ("elementwise", "fused")  # syncbn.ops.kernels_for's two answers


def kernels_env(kernels):
    """A context manager: `SYNCBN_KERNELS=kernels` for what is traced inside the block."""
    return mock.patch.dict(os.environ, {"SYNCBN_KERNELS": kernels})


# `python -m syncbn.check`'s exactness rows (`| exact: ... | ... | ... | OK |`, the
# rank prefix of syncbn-launch allowed): one per (layout, reference) and scenario
# of batch sizes; 3 replicas make one scenario.
CHECK_ROW = re.compile(r"^(?:\[\d+\] )?\| (exact: .*?) +\| (.*?) +\| (\S+) +\| (OK|FAIL) +\|$",
                       re.M)


def check_rows(text):
    """The exactness rows of syncbn.check's table in `text`: `(check, detail, error, verdict)`."""
    return CHECK_ROW.findall(text)


def _checks_per_scenario():
    from syncbn.check import exactness

    return len(exactness.LAYOUTS) * len(exactness.REFERENCES)


CHECKS_PER_SCENARIO = _checks_per_scenario()


# --- launched jobs ----------------------------------------------------------------------


def job_env(path=(REPO, TESTS_DIR, JOBS_DIR), **extra):
    """The environment of a launched job: this process's, plus `extra`.

    `path` goes first on `PYTHONPATH`: this checkout's syncbn and launcher,
    whatever copy is installed, and the test jobs' modules (e.g.
    `faulty_communicator` for `python -m syncbn.check --communicator`).
    """
    env = dict(os.environ)
    python_path = [*path, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env.update({"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": os.pathsep.join(python_path)})
    if os.geteuid() == 0:  # Debian's Open MPI refuses root without these
        env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    env.update({name: str(value) for name, value in extra.items()})
    return env


def output(result):
    """Everything a finished job printed, stdout then stderr."""
    return (result.stdout or "") + (result.stderr or "")


def run(command, timeout=JOB_TIMEOUT, env=None, cwd=REPO, **extra_env):
    """Runs `command` to its end with `job_env(**extra_env)` (or `env`); a CompletedProcess."""
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=job_env(**extra_env) if env is None else env)


def launcher(*args):
    """The command line of `syncbn-launch ARGS`, from this checkout."""
    return [sys.executable, "-m", "launch", *args]


def syncbn_launch(num_proc, job, *launcher_args, timeout=JOB_TIMEOUT, **extra_env):
    """Runs `job` (an argv) on `num_proc` ranks through `syncbn-launch LAUNCHER_ARGS`.

    The launcher's own `--timeout` ends the job a minute before the test
    would, so that it names what hung.
    """
    command = launcher("-np", str(num_proc), *launcher_args,
                       "--timeout", str(max(timeout - 60, 30)), "--", *job)
    return run(command, timeout=timeout, **extra_env)


def horovodrun(num_proc, job, controller="--gloo", timeout=JOB_TIMEOUT, **extra_env):
    """Runs `job` on `num_proc` ranks through Horovod's own `horovodrun`."""
    return run(["horovodrun", "-np", str(num_proc), controller, *job], timeout=timeout,
               **extra_env)


def mpirun_command(num_proc, job):
    """`mpirun` as the tests run it on one machine of 2 cores: oversubscribed, unbound."""
    return ["mpirun", "-np", str(num_proc), "--oversubscribe", "--bind-to", "none", *job]


def mpirun(num_proc, job, timeout=JOB_TIMEOUT, **extra_env):
    """Runs `job` on `num_proc` ranks through Open MPI's `mpirun`."""
    return run(mpirun_command(num_proc, job), timeout=timeout, **extra_env)


def free_ports(count):
    """`count` TCP ports on 127.0.0.1 that were free a moment ago."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def tf_workers(num_proc, job, timeout=JOB_TIMEOUT, **extra_env):
    """Runs `job` in `num_proc` processes with a `TF_CONFIG` each, as a cluster manager would.

    Returns one CompletedProcess: the workers' outputs, one after the other,
    and the exit code of largest magnitude.
    """
    workers = [f"127.0.0.1:{port}" for port in free_ports(num_proc)]
    processes = []
    for index in range(num_proc):
        tf_config = json.dumps({"cluster": {"worker": workers},
                                "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(
            job, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
            env=job_env(TF_CONFIG=tf_config, **extra_env)))
    outputs, codes = [], []
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            out, _ = process.communicate(timeout=max(deadline - time.monotonic(), 1))
            outputs.append(out)
            codes.append(process.returncode)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return subprocess.CompletedProcess(job, max(codes, key=abs), "".join(outputs), "")


# --- syncbn-launch's backends, and jobs that only sleep or fail ---------------------------

# Launcher arguments per backend under test; "horovod" and "tf" are the defaults
# (under mpirun here, since Horovod is built with MPI and mpi4py is installed),
# "horovod-gloo" and "tf-no-mpi" the launcher's other ways to start them.
BACKEND_ARGS = {
    "horovod": ["--backend", "horovod"],
    "horovod-gloo": ["--backend", "horovod", "--horovod-controller", "gloo"],
    "mpi": ["--backend", "mpi"],
    "tf": ["--backend", "tf"],
    "tf-no-mpi": ["--backend", "tf", "--tf-mpi", "no"],
}
BACKENDS = tuple(BACKEND_ARGS)


def job_backend(backend):
    """The `--backend` name the job scripts take for a launcher backend of `BACKEND_ARGS`."""
    return backend.split("-")[0]


def exactness_job(backend, num_proc):
    """tests/jobs/exactness.py's argv: uneven counts with an empty rank, 2 layouts, 2 steps."""
    return [sys.executable, os.path.join(JOBS_DIR, "exactness.py"),
            "--backend", job_backend(backend),
            "--counts", ",".join(str((4, 0, 7, 2)[r % 4]) for r in range(num_proc)),
            "--layouts", "2d,nhwc", "--steps", "2"]


def hang_job(marker, *extra):
    """Ranks that sleep (tests/launch_jobs/crash_or_hang.py), findable by `marker`."""
    return [sys.executable, os.path.join(LAUNCH_JOBS_DIR, "crash_or_hang.py"), marker, *extra]


def processes_with(marker):
    """Pids of processes whose command line contains `marker` (a /proc scan)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    if marker.encode() in cmdline.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def wait_for_no_processes(marker, seconds=10.0):
    """The processes with `marker` still there after up to `seconds` (the kernel reaps late)."""
    deadline = time.monotonic() + seconds
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    return processes_with(marker)


class RunningLauncher:
    """A launcher in the background whose output is collected as it comes."""

    def __init__(self, argv):
        self.process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, pattern, count, seconds=60.0):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if sum(bool(re.search(pattern, line)) for line in list(self.lines)) >= count:
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{count} lines matching {pattern!r} not seen:\n{self.output}")

    @property
    def output(self):
        return "".join(self.lines)

    def finish(self, seconds=30.0):
        code = self.process.wait(timeout=seconds)
        self._reader.join(timeout=5)
        return code


# --- many checks in one launch (tests/jobs/world_checks.py) --------------------------------

WORLD_CHECKS_JOB = os.path.join(JOBS_DIR, "world_checks.py")
WORLD_LAUNCH_TIMEOUT = 900


@dataclasses.dataclass(frozen=True)
class WorldLaunch:
    """One launch of tests/jobs/world_checks.py, and what its BN sums must report.

    Attributes:
        launcher: `"horovodrun"` (over Gloo), `"mpirun"`, `"tf_workers"` or
            `"syncbn-launch"` (with `launcher_args`).
        world: the job's `--world` (`auto`: from the launcher's environment).
        num_proc: ranks.
        kernel: the `kernel` every exactness record of the world's own
            communicator must show (how the sums travel).
        checks: names of world_checks.py's `CHECKS`, run in this order.
        env: variables for every rank.
        launcher_args: syncbn-launch's backend options.
    """

    launcher: str
    world: str
    num_proc: int
    kernel: str
    checks: tuple
    env: tuple = ()
    launcher_args: tuple = ()


# How each communicator sums, each on its own launch: the MPI communicator has
# two kernels, and under mpirun the Horovod and tf.distribute communicators sum
# over MPI directly unless told not to; SYNCBN_MPI_KERNEL=compiled fails rather
# than fall back. Four ranks where the groups check (group_size=2) runs.
# A new multi-process check joins by adding its name to the launches that
# should run it (tests/jobs/world_checks.py's docstring says the rest).
WORLD_LAUNCHES = {
    "horovod-gloo": WorldLaunch("horovodrun", "auto", 4, "hvd.allreduce",
                                ("exactness", "groups", "fused", "large_offset", "auto",
                                 "convert")),
    "horovod-mpi": WorldLaunch("mpirun", "horovod", 4, "mpi-direct",
                               ("exactness", "groups", "moving", "convert")),
    "horovod-mpi-queue": WorldLaunch("mpirun", "horovod", 3, "hvd.allreduce", ("exactness",),
                                     env=(("SYNCBN_DIRECT_MPI", "0"),)),
    "mpi-compiled": WorldLaunch("mpirun", "auto", 4, "compiled",
                                ("exactness", "groups", "fused", "large_offset", "auto",
                                 "moving"),
                                env=(("SYNCBN_MPI_KERNEL", "compiled"),)),
    "mpi-numpy_function": WorldLaunch("mpirun", "mpi", 3, "numpy_function", ("exactness",),
                                      env=(("SYNCBN_MPI_KERNEL", "numpy_function"),)),
    "tf": WorldLaunch("tf_workers", "tf", 3, "tf.distribute", ("exactness",)),
    # TF_CONFIG workers under mpirun, from the launcher.
    "tf-mpi": WorldLaunch("syncbn-launch", "tf", 3, "mpi-direct", ("exactness", "moving"),
                          launcher_args=("--backend", "tf")),
}


def worlds_with(check):
    """Names of the launches of `WORLD_LAUNCHES` that run `check`."""
    return [name for name, spec in WORLD_LAUNCHES.items() if check in spec.checks]


class WorldResults:
    """A finished world launch: its output, and the records each check wrote on each rank."""

    def __init__(self, name, spec, checks, result, out_dir):
        self.name, self.spec, self.checks = name, spec, checks
        self.result, self.out_dir = result, out_dir

    @property
    def output(self):
        return output(self.result)

    def per_rank(self, check):
        """`[records of rank 0, records of rank 1, ...]` of `check`; fails if a rank has none."""
        assert check in self.checks, (
            f"launch {self.name} ran {self.checks}, not {check}: does the test's "
            f"world_checks marker name it?")
        ranks = []
        for rank in range(self.spec.num_proc):
            path = os.path.join(self.out_dir, f"{check}.rank{rank}.json")
            assert os.path.exists(path), (
                f"{self.name}: rank {rank} wrote no results for {check} (exit code "
                f"{self.result.returncode}):\n{self.output[-6000:]}")
            with open(path) as stream:
                written = json.load(stream)
            assert written["error"] is None, f"{self.name}: {check} raised on rank {rank}:\n" + (
                written["error"])
            ranks.append(written["records"])
        return ranks

    def records(self, check):
        """Every rank's records of `check`, rank after rank."""
        return [record for records in self.per_rank(check) for record in records]


def launch_world(name, out_dir, checks=None, timeout=WORLD_LAUNCH_TIMEOUT):
    """Runs the launch `WORLD_LAUNCHES[name]` to its end; its `WorldResults`.

    `checks` (default: all of the launch's) are run in the launch's order.
    """
    spec = WORLD_LAUNCHES[name]
    checks = [c for c in spec.checks if checks is None or c in checks] or list(spec.checks)
    job = [sys.executable, WORLD_CHECKS_JOB, "--world", spec.world, "--checks",
           ",".join(checks), "--out", str(out_dir)]
    # A desynchronized check ends in minutes rather than the default 10.
    env = {"SYNCBN_COLLECTIVE_TIMEOUT": "120", **dict(spec.env)}
    if spec.launcher == "horovodrun":
        result = horovodrun(spec.num_proc, job, timeout=timeout, **env)
    elif spec.launcher == "mpirun":
        result = mpirun(spec.num_proc, job, timeout=timeout, **env)
    elif spec.launcher == "tf_workers":
        result = tf_workers(spec.num_proc, job, timeout=timeout, **env)
    else:
        result = syncbn_launch(spec.num_proc, job, *spec.launcher_args, timeout=timeout, **env)
    return WorldResults(name, spec, checks, result, out_dir)
