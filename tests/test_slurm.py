"""Real Slurm: srun, sbatch and salloc on a simulated cluster of 2 nodes (launch/slurm.py).

Every command runs on the login node of the session's cluster
(`slurm_conf`, tests/conftest.py), as a user would. Every task pays
TensorFlow's start-up, so one batch job (the `steps` fixture, submitted once)
runs most tests' commands as steps, one after the other, each with a task on
each node, and the tests read each step's exit code and output:

- `srun --mpi=pmix` (PMIx gives mpi4py its world): the exactness job on
  uneven batches with an empty rank, through `communicator="auto"` (MPI) and
  through Horovod over MPI; `python -m syncbn.check` (world mpi, all OK);
- `srun --mpi=pmi2`: Debian's Open MPI has no Slurm PMI2 support, and every
  task fails at `MPI_Init` (never a silent local run);
- `srun --mpi=none`: every task raises, naming `SLURM_STEP_NUM_TASKS` and
  `srun --mpi=pmix`, after `syncbn.check`'s FAIL row in the same process;
- a plain `python` in the batch script: one process, it trains locally;
- `syncbn-launch` with no `-H` inside the job: the tf backend's ranks as job
  steps (exactness), the mpi backend's mpirun across the nodes (exactness),
  and a failing job whose verdict comes from the ranks' error files;
- a killed and a stalled task end the step within the collective timeout,
  and the output names the task.

`examples/slurm_train.sbatch` runs as a job of its own, and a launcher with a
cluster of its own checks that `--slurm` leaves nothing behind.

Needs root (network namespaces) and Debian's slurmctld, slurmd, slurm-client
and munge (.ci/bootstrap.sh installs them); nothing is skipped.
"""

import os
import re
import shlex
import subprocess
import sys
import time

import pytest

from helpers import JOBS_DIR, LAUNCH_JOBS_DIR, REPO, exactness_job, launcher, output, run

pytestmark = pytest.mark.multiprocess

FAULT_JOB = os.path.join(JOBS_DIR, "fault_job.py")
NO_WORLD = os.path.join(JOBS_DIR, "no_world.py")
ERROR_FILE_JOB = os.path.join(LAUNCH_JOBS_DIR, "error_file_job.py")
SBATCH_EXAMPLE = os.path.join(REPO, "examples", "slurm_train.sbatch")
JOB_TIMEOUT = 1200
STEP_TIMEOUT = 300
COLLECTIVE_TIMEOUT = 20
PY = sys.executable
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
TASKS = 2  # one per node: every step crosses nodes, and no task waits for a core


def exactness(backend):
    """tests/jobs/exactness.py's command line: uneven batches, rank 1's empty, 2 layouts."""
    return shlex.join(exactness_job(backend, TASKS))


# --overlap: a step need not wait until Slurm has released the CPUs of the step
# before it, which a step that was cancelled (MPI_Abort) holds for a while.
SRUN = f"srun --overlap -N2 -n{TASKS}"
LAUNCH = shlex.join(launcher("-np", str(TASKS)))

# The batch job's steps: name -> command, run in this order, but for the
# BACKGROUND ones, which start first and run beside the others.
STEPS = {
    "plain_python": f"{PY} {NO_WORLD}",
    "pmix_auto": f"{SRUN} --mpi=pmix {exactness('auto')}",
    "pmix_horovod": f"{SRUN} --mpi=pmix {exactness('horovod')}",
    "pmix_check": f"{SRUN} --mpi=pmix {PY} -m syncbn.check --rounds 1",
    "pmi2": f"{SRUN} --mpi=pmi2 {PY} {NO_WORLD}",
    "no_pmi": f"{SRUN} --mpi=none --label {PY} {NO_WORLD} --check",
    "launch_tf": f"{LAUNCH} --backend tf --tf-mpi no -v -- {exactness('tf')}",
    "launch_mpi": f"{LAUNCH} --backend mpi -- {exactness('mpi')}",
    "launch_error_files": f"{LAUNCH} --backend tf --tf-mpi no -- "
                          f"{PY} {ERROR_FILE_JOB} raise error-file-barrier",
    # A killed task ends the step at once with --kill-on-bad-exit=1 (as docs/clusters.md
    # advises); a stalled one only through the collective timeout.
    **{f"fault_{fault}": f"env SYNCBN_COLLECTIVE_TIMEOUT={COLLECTIVE_TIMEOUT} {SRUN} --mpi=pmix "
                         f"{options}{PY} {FAULT_JOB} --backend mpi --fault {fault} --fault-rank 1"
       for fault, options in (("kill", "--kill-on-bad-exit=1 "), ("stall", ""))},
}
BACKGROUND = ("fault_stall",)  # it mostly waits for the collective timeout

# Each step's output lines carry the time they arrived (bash's EPOCHREALTIME),
# its last line the time the step ended, and NAME.rc its exit code.
STEPS_SCRIPT = """#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
step() {{
  local name=$1; shift
  timeout -k 10 {timeout} "$@" 2>&1 | while IFS= read -r line; do
    printf '%s %s\\n' "$EPOCHREALTIME" "$line"; done > "$name.log"
  echo "${{PIPESTATUS[0]}}" > "$name.rc"
  printf '%s end\\n' "$EPOCHREALTIME" >> "$name.log"
}}
mkdir error-file-barrier
"""


def login(slurm_conf, argv, cwd, timeout=JOB_TIMEOUT):
    """Runs `argv` on the login node; returns (exit code, stdout + stderr)."""
    result = run(argv, timeout=timeout, cwd=cwd, SLURM_CONF=slurm_conf)
    return result.returncode, output(result)


def sbatch(slurm_conf, script, directory, *options):
    """Submits `script` and waits for its end; returns (state, exit code, output file's text).

    Polls `scontrol show job`: `sbatch --wait` polls at growing intervals, and
    can return half a minute after the job's end.
    """
    job_out = directory / "job.out"
    code, text = login(slurm_conf, ["sbatch", "--parsable", f"--output={job_out}", *options,
                             str(script)], directory)
    assert code == 0, text
    job_id = text.strip().split(";")[0]
    deadline = time.monotonic() + JOB_TIMEOUT
    while True:
        _, info = login(slurm_conf, ["scontrol", "show", "job", "-o", job_id], directory)
        fields = dict(word.split("=", 1) for word in info.split() if "=" in word)
        if fields.get("JobState") in FINAL_STATES:
            break
        assert time.monotonic() < deadline, f"job {job_id} still {fields.get('JobState')}"
        time.sleep(0.5)
    return (fields["JobState"], fields.get("ExitCode"),
            job_out.read_text(errors="replace") if job_out.exists() else "")


class Steps:
    """The finished batch job of `STEPS`: each step's exit code, output and line times."""

    def __init__(self, directory):
        self.directory = directory

    def timed_lines(self, name):
        """`[(seconds, line), ...]` of step `name`, the last one `(end, 'end')`."""
        path = self.directory / f"{name}.log"
        assert path.exists(), f"step {name} never ran"
        timed = []
        for line in path.read_text(errors="replace").splitlines():
            stamp, _, text = line.partition(" ")
            timed.append((float(stamp), text))
        return timed

    def __call__(self, name):
        """(exit code, output) of step `name`."""
        text = "".join(f"{line}\n" for _, line in self.timed_lines(name)[:-1])
        return int((self.directory / f"{name}.rc").read_text()), text


@pytest.fixture(scope="module")
def steps(slurm_conf, tmp_path_factory):
    directory = tmp_path_factory.mktemp("slurm-steps")
    script = directory / "steps.sbatch"
    order = [*BACKGROUND, *(name for name in STEPS if name not in BACKGROUND)]
    script.write_text(STEPS_SCRIPT.format(timeout=STEP_TIMEOUT) + "".join(
        f"step {name} {STEPS[name]}{' &' if name in BACKGROUND else ''}\n" for name in order)
        + "wait\n")
    state, exit_code, text = sbatch(slurm_conf, script, directory, f"--chdir={directory}")
    assert (state, exit_code) == ("COMPLETED", "0:0"), text[-4000:]
    return Steps(directory)


def exactness_lines(output):
    return re.findall(r"exactness rank=\d+/\d+ .*? (?:ok|FAIL) ", output)


def check_exactness(output, layouts=2, kernel=None):
    lines = exactness_lines(output)
    assert len(lines) == TASKS * layouts, output[-4000:]
    assert all(" ok " in line for line in lines), lines
    assert all(f"kernel={kernel} " in line for line in lines), lines
    assert sum("rows=0 " in line for line in lines) == layouts, lines  # the empty rank joined
    assert {re.search(r"rank=(\d+)/", line).group(1) for line in lines} == {
        str(rank) for rank in range(TASKS)}


# --- the cluster ------------------------------------------------------------------------------

def test_cluster_is_up_and_expands_node_lists_with_slurms_own_parser(slurm_conf, tmp_path):
    code, text = login(slurm_conf, ["sinfo", "-h", "-N", "-o", "%N %T"], tmp_path)
    assert (code, text.split()) == (0, ["node0", "idle", "node1", "idle"]), text
    # syncbn-launch expands SLURM_JOB_NODELIST with `scontrol show hostnames`.
    code, text = login(slurm_conf, ["scontrol", "show", "hostnames", "gpu[01-03,7],cpu-a[9-10]"],
                       tmp_path)
    assert code == 0, text
    assert text.split() == ["gpu01", "gpu02", "gpu03", "gpu7", "cpu-a9", "cpu-a10"]


# --- srun -----------------------------------------------------------------------------------

def test_srun_pmix_exactness_over_mpi_through_auto(steps):
    code, output = steps("pmix_auto")
    assert code == 0, output[-4000:]
    check_exactness(output, kernel="compiled")


def test_srun_pmix_exactness_over_horovod_on_mpi(steps):
    code, output = steps("pmix_horovod")
    assert code == 0, output[-4000:]
    check_exactness(output, kernel="mpi-direct")


def test_srun_pmix_check_reports_mpi_processes_all_ok(steps):
    code, output = steps("pmix_check")
    assert code == 0, output[-4000:]
    assert re.search(rf"\| job +\| {TASKS} processes, {TASKS} replicas \(mpi\)", output), (
        output[-4000:])
    assert re.search(r"\| all checks +\| (\d+) of \1 OK on every rank .*\| OK +\|", output), (
        output[-4000:])
    assert "FAIL" not in output


def test_srun_pmi2_fails_at_mpi_init_not_in_silence(steps):
    # Debian's Open MPI speaks PMIx only: under PMI2 (PMI_SIZE set) MPI_Init
    # fails on every task, and nothing trains.
    code, output = steps("pmi2")
    assert code != 0, output[-4000:]
    assert "MPI_Init" in output, output[-4000:]
    assert "trained with this process's batch alone" not in output


def test_srun_without_pmi_raises_on_every_task_and_check_fails(steps):
    code, output = steps("no_pmi")
    assert code != 0, output[-4000:]
    for task in range(TASKS):
        # The check first: its table's launcher row fails, and it exits 1.
        assert re.search(rf"^{task}: \| launcher +\| syncbn: srun started {TASKS} processes "
                         rf"\(SLURM_STEP_NUM_TASKS={TASKS}\).*\| FAIL +\|$", output, re.M), (
            output[-4000:])
        assert f"{task}: no_world: syncbn.check exited with 1" in output, output[-4000:]
        # Then the training call raises, naming the variable and the fix.
        error = re.search(rf"^{task}: syncbn\.world\.LauncherWorldError: (.*)$", output, re.M)
        assert error, output[-4000:]
        message = "\n".join(re.findall(rf"^{task}: (.*)$", output[error.start():], re.M))
        assert f"syncbn: srun started {TASKS} processes (SLURM_STEP_NUM_TASKS={TASKS}), but " \
               f"this one (rank {task})" in message, message
        assert "`srun --mpi=pmix`" in message, message
    assert "trained with this process's batch alone" not in output


def test_plain_python_in_a_batch_script_trains_locally(steps):
    code, output = steps("plain_python")
    assert (code, output.count("no_world: trained with this process's batch alone")) == (0, 1), (
        output[-4000:])


# --- syncbn-launch inside the allocation ----------------------------------------------------

def test_syncbn_launch_runs_tf_workers_as_job_steps(steps):
    code, output = steps("launch_tf")
    assert code == 0, output[-4000:]
    assert output.count(f"backend tf: {TASKS} ranks on node0:1,node1:1") == 1, output[-4000:]
    assert output.count("srun --overlap --nodes=1 --ntasks=1") == TASKS, output[-4000:]
    assert "--nodelist=node1 " in output, output[-4000:]
    check_exactness(output, kernel="tf.distribute")


def test_syncbn_launch_runs_mpirun_across_the_nodes(steps):
    code, output = steps("launch_mpi")
    assert code == 0, output[-4000:]
    assert output.count(f"backend mpi: {TASKS} ranks on node0:1,node1:1") == 1, output[-4000:]
    check_exactness(output, kernel="compiled")


def test_syncbn_launch_reads_the_error_files_of_its_job_steps(steps):
    # Rank 1 raises first but exits 4 s later than rank 0: only its error file,
    # which every node writes where the launcher reads it, names rank 1.
    code, output = steps("launch_error_files")
    assert code != 0, output[-4000:]
    assert "rank 1 failed first: ValueError: rank 1: bad batch (its error file)" in output, (
        output[-4000:])


# --- faults ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["kill", "stall"])
def test_fault_ends_the_srun_step_within_the_timeout_and_names_the_task(steps, fault):
    timed = steps.timed_lines(f"fault_{fault}")
    code, output = steps(f"fault_{fault}")
    assert code != 0, output[-4000:]
    fault_at = [seconds for seconds, line in timed if "injects fault" in line]
    assert fault_at, output[-4000:]
    assert timed[-1][0] - fault_at[0] <= COLLECTIVE_TIMEOUT + 10, output[-4000:]
    if fault == "kill":
        assert re.search(r"srun: error: node1: task 1: Killed", output), output[-4000:]
        assert "waited more than" not in output, output[-4000:]  # Slurm ended it, not rank 0
    else:
        # Rank 0 waits for the stalled rank, says which collective, and aborts the step.
        assert re.search(rf"syncbn: MPI all-reduce 'syncbn/bn_\w/\w+' waited more than "
                         rf"{COLLECTIVE_TIMEOUT} s", output), output[-4000:]
        assert re.search(r"MPI_ABORT was invoked on rank 0 in communicator MPI_COMM_WORLD\s+"
                         r"with errorcode 124", output), output[-4000:]


# --- sbatch, and the launcher's own cluster -------------------------------------------------

def test_sbatch_example_trains_synchronized_and_exact(slurm_conf, tmp_path):
    # The example as users submit it, on one task per node instead of its two.
    state, exit_code, output = sbatch(slurm_conf, SBATCH_EXAMPLE, tmp_path,
                                      "--ntasks-per-node=1")
    assert (state, exit_code) == ("COMPLETED", "0:0"), output[-4000:]
    assert sorted(re.findall(rf"^task (\d)/{TASKS}: moving mean", output, re.M)) == ["0", "1"]
    assert f"synchronized: moving statistics identical on all {TASKS} tasks: True" in output, (
        output[-4000:])
    assert re.search(r"^exact: 20 samples in batches of \[8, 12\], .*: OK$", output, re.M), (
        output[-4000:])


def test_launcher_with_a_cluster_leaves_nothing_behind(tmp_path):
    # `syncbn-launch --simulate-hosts 2 --slurm`: the command runs on the login node
    # beside the cluster, and when it ends, daemons, directories and namespaces go.
    mpi_size = f"{PY} -c 'from mpi4py import MPI; print(\"size\", MPI.COMM_WORLD.Get_size())'"
    result = run(launcher("--simulate-hosts", "2", "--slurm", "--", "sh", "-c",
                          'echo "launcher=$PPID conf=$SLURM_CONF"; '
                          f"srun -N2 -n2 --mpi=pmix {mpi_size}; exit 3"), cwd=tmp_path)
    text = output(result)
    assert result.returncode == 3, text  # the command's own exit code
    assert text.count("size 2") == 2, text
    launcher_pid, conf = re.search(r"launcher=(\d+) conf=(\S+)", text).groups()
    assert not os.path.exists(os.path.dirname(conf)), conf
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"sbn-{launcher_pid}-" not in namespaces, namespaces
    assert not [name for name in os.listdir("/tmp") if name.startswith(f"sbn-{launcher_pid}-")]
    daemons = subprocess.run(["pgrep", "-af", os.path.dirname(conf)], capture_output=True,
                             text=True).stdout
    assert daemons == "", daemons
