"""Real Slurm: srun, sbatch and salloc on a simulated 2-node cluster (launch/slurm.py).

One cluster per module (munged, slurmctld, a slurmd in each of 2 simulated
hosts, 2 CPUs a node); every job runs from the "login node" (this process's
network namespace) with `SLURM_CONF` set, as a user would, and checks
several things, since every task pays TensorFlow's start-up:

- `srun --mpi=pmix` (PMIx gives mpi4py its world): the exactness job on
  uneven and empty batches through `communicator="auto"` (MPI) and through
  Horovod over MPI; `python -m syncbn.check` (4 processes, world mpi, all OK);
- `srun --mpi=pmi2`: Debian's Open MPI has no Slurm PMI2 support, and the
  job fails at `MPI_Init` (never a silent local run);
- `srun --mpi=none`: every task raises, naming `SLURM_STEP_NUM_TASKS` and
  `srun --mpi=pmix`, and `syncbn.check` fails with a FAIL row;
- `sbatch examples/slurm_train.sbatch`, whose output shows synchronized and
  exact statistics; a plain `python` in a batch script stays local, no error;
- `syncbn-launch -np 4` with no `-H` inside `sbatch` (horovod, mpi) and
  `salloc` (tf): hosts from the allocation, ranks as srun steps;
- a killed and a stalled task end the step within the collective timeout,
  and srun names the task.

Needs root (network namespaces) and Debian's slurmctld, slurmd, slurm-client
and munge (.ci/bootstrap.sh installs them); nothing is skipped.
"""

import os
import re
import subprocess
import sys
import threading
import time

import pytest

from launch import hosts as hosts_lib
from launch.netns import SimulatedNetwork
from launch.slurm import SimulatedSlurm, slurm_conf

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
EXACTNESS = os.path.join(TESTS_DIR, "jobs", "exactness.py")
FAULT_JOB = os.path.join(TESTS_DIR, "jobs", "fault_job.py")
NO_WORLD = os.path.join(TESTS_DIR, "jobs", "no_world.py")
SBATCH_EXAMPLE = os.path.join(REPO, "examples", "slurm_train.sbatch")
JOB_TIMEOUT = 600
COLLECTIVE_TIMEOUT = 20
PY = sys.executable
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@pytest.fixture(scope="module")
def cluster():
    with SimulatedNetwork(2) as network, SimulatedSlurm(network) as slurm:
        yield slurm


def _env(cluster, **extra):
    env = dict(os.environ)
    env.update({"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": os.pathsep.join([REPO, TESTS_DIR]),
                "PYTHONUNBUFFERED": "1", **cluster.env(), **extra})
    return env


def login(cluster, argv, tmp_path, timeout=JOB_TIMEOUT, **extra_env):
    """Runs `argv` on the login node; returns (exit code, stdout + stderr)."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                            cwd=tmp_path, env=_env(cluster, **extra_env))
    return result.returncode, result.stdout + result.stderr


def sbatch(cluster, script, tmp_path, timeout=JOB_TIMEOUT, **extra_env):
    """Submits `script`, waits for the job's end; returns (state, exit code, output file text)."""
    output = tmp_path / "job.out"
    code, text = login(cluster, ["sbatch", "--parsable", f"--output={output}", str(script)],
                       tmp_path, **extra_env)
    assert code == 0, text
    job_id = text.strip().split(";")[0]
    deadline = time.monotonic() + timeout
    while True:
        _, info = login(cluster, ["scontrol", "show", "job", "-o", job_id], tmp_path)
        fields = dict(w.split("=", 1) for w in info.split() if "=" in w)
        if fields.get("JobState") in FINAL_STATES:
            break
        assert time.monotonic() < deadline, f"job {job_id} still {fields.get('JobState')}"
        time.sleep(0.5)
    return fields["JobState"], fields.get("ExitCode"), output.read_text(errors="replace")


def exactness_lines(output):
    return re.findall(r"exactness rank=\d+/\d+ .*? (?:ok|FAIL) ", output)


def check_exactness(output, ranks, layouts, kernel):
    lines = exactness_lines(output)
    assert len(lines) == ranks * layouts, output[-4000:]
    assert all(" ok " in line for line in lines), lines
    assert all(f"kernel={kernel} " in line for line in lines), lines
    assert sum("rows=0 " in line for line in lines) == layouts, lines  # the empty rank joined
    assert {re.search(r"rank=(\d+)/", line).group(1) for line in lines} == {
        str(r) for r in range(ranks)}


EXACTNESS_ARGS = ["--counts", "4,0,7,2", "--layouts", "2d,nhwc", "--steps", "2"]


# --- pure parts -----------------------------------------------------------------------------

def test_tasks_per_node_expands_slurms_compressed_forms():
    assert hosts_lib.parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert hosts_lib.parse_tasks_per_node("4") == [4]
    assert hosts_lib.parse_tasks_per_node("1,2(x2),3") == [1, 2, 2, 3]
    for bad in ("", "2(x)", "x3", "2(3)", "2(x3"):
        with pytest.raises(ValueError, match="SLURM_TASKS_PER_NODE"):
            hosts_lib.parse_tasks_per_node(bad)
    with pytest.raises(ValueError, match="names 2 nodes, but the allocation has 3"):
        hosts_lib.allocation_hosts(["a", "b", "c"], "2(x2)")


def test_node_lists_expand_with_slurms_own_parser(cluster, tmp_path):
    # syncbn-launch expands SLURM_JOB_NODELIST with `scontrol show hostnames`.
    code, text = login(cluster, ["scontrol", "show", "hostnames", "gpu[01-03,7],cpu-a[9-10]"],
                       tmp_path)
    assert code == 0, text
    assert text.split() == ["gpu01", "gpu02", "gpu03", "gpu7", "cpu-a9", "cpu-a10"]


def test_slurm_conf_declares_cpus_and_no_cgroup_plugins():
    text = slurm_conf(controller="box", controller_address="198.18.3.1", port=6900,
                      directory="/d", munge_socket="/d/m", cpus=2,
                      nodes=[("node0", "198.18.3.2"), ("node1", "198.18.3.3")])
    lines = text.splitlines()
    for line in ("ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
                 "AccountingStorageType=accounting_storage/none", "AuthInfo=socket=/d/m",
                 "NodeName=node1 NodeAddr=198.18.3.3 CPUs=2 State=UNKNOWN"):
        assert line in lines, text
    assert "cgroup" not in text


# --- srun -----------------------------------------------------------------------------------

def test_cluster_is_up(cluster):
    assert cluster.node_states() == {"node0": "idle", "node1": "idle"}


def test_srun_pmix_exactness_over_mpi_through_auto(cluster, tmp_path):
    code, output = login(cluster, ["srun", "-N2", "-n4", "--mpi=pmix", PY, EXACTNESS,
                                   "--backend", "auto", *EXACTNESS_ARGS], tmp_path)
    assert code == 0, output[-4000:]
    check_exactness(output, 4, 2, "compiled")


def test_srun_pmix_exactness_over_horovod_on_mpi(cluster, tmp_path):
    code, output = login(cluster, ["srun", "-N2", "-n4", "--mpi=pmix", PY, EXACTNESS,
                                   "--backend", "horovod", *EXACTNESS_ARGS], tmp_path)
    assert code == 0, output[-4000:]
    check_exactness(output, 4, 2, "mpi-direct")


def test_srun_pmix_check_reports_four_mpi_processes_all_ok(cluster, tmp_path):
    code, output = login(cluster, ["srun", "-N2", "-n4", "--mpi=pmix", PY, "-m", "syncbn.check",
                                   "--rounds", "2"], tmp_path)
    assert code == 0, output[-4000:]
    assert re.search(r"\| job +\| 4 processes, 4 replicas \(mpi\)", output), output[-4000:]
    assert re.search(r"\| all checks +\| (\d+) of \1 OK on every rank .*\| OK +\|", output), (
        output[-4000:])
    assert "FAIL" not in output


def test_srun_pmi2_fails_at_mpi_init_not_in_silence(cluster, tmp_path):
    # Debian's Open MPI speaks PMIx only: under PMI2 (PMI_SIZE set) MPI_Init
    # fails on every task, and nothing trains.
    code, output = login(cluster, ["srun", "-N2", "-n2", "--mpi=pmi2", PY, NO_WORLD], tmp_path)
    assert code != 0, output[-4000:]
    assert "MPI_Init" in output, output[-4000:]
    assert "trained with this process's batch alone" not in output


def test_srun_without_pmi_raises_on_every_task_and_check_fails(cluster, tmp_path):
    code, output = login(cluster, ["srun", "-N2", "-n2", "--mpi=none", "--label", PY, NO_WORLD],
                         tmp_path)
    assert code != 0, output[-4000:]
    for task in (0, 1):
        assert re.search(rf"^{task}: syncbn\.world\.LauncherWorldError: ", output, re.M), (
            output[-4000:])
        assert re.search(rf"^{task}: .*syncbn: srun started 2 processes "
                         rf"\(SLURM_STEP_NUM_TASKS=2\), but this one \(rank {task}\)",
                         output, re.M), output[-4000:]
    assert output.count("`srun --mpi=pmix`") == 2, output[-4000:]
    assert "trained with this process's batch alone" not in output

    code, output = login(cluster, ["srun", "-N2", "-n2", "--mpi=none", PY, "-m", "syncbn.check",
                                   "--rounds", "0"], tmp_path)
    assert code == 1, output[-4000:]
    assert re.search(r"^\| launcher +\| syncbn: srun started 2 processes "
                     r"\(SLURM_STEP_NUM_TASKS=2\).*\| FAIL +\|$", output, re.M), output[-4000:]


# --- sbatch and salloc ----------------------------------------------------------------------

def test_sbatch_example_trains_synchronized_and_exact(cluster, tmp_path):
    state, exit_code, output = sbatch(cluster, SBATCH_EXAMPLE, tmp_path)
    assert (state, exit_code) == ("COMPLETED", "0:0"), output[-4000:]
    assert sorted(re.findall(r"^task (\d)/4: moving mean", output, re.M)) == ["0", "1", "2", "3"]
    assert "synchronized: moving statistics identical on all 4 tasks: True" in output, output
    assert re.search(r"^exact: 56 samples in batches of \[8, 12, 16, 20\], .*: OK$", output,
                     re.M), output


def test_syncbn_launch_in_sbatch_uses_the_allocation(cluster, tmp_path):
    # One batch job: a plain python stays local without an error, then the
    # launcher runs the exactness job on the allocation's 2 x 2 tasks with no -H.
    script = tmp_path / "launch.sbatch"
    job = f"{PY} {EXACTNESS} " + " ".join(EXACTNESS_ARGS)
    script.write_text(
        "#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=2\n"
        f"{PY} -c 'import syncbn.world as w; print(\"plain python picks\", w.detect())'\n"
        f"{PY} -m launch -np 4 --backend horovod -- {job} --backend horovod\n"
        "echo \"launch horovod exit $?\"\n"
        f"{PY} -m launch -np 4 --backend mpi -- {job} --backend mpi\n"
        "echo \"launch mpi exit $?\"\n")
    state, exit_code, output = sbatch(cluster, script, tmp_path)
    assert state == "COMPLETED", output[-4000:]
    assert "plain python picks local" in output, output[-4000:]
    assert "launch horovod exit 0" in output and "launch mpi exit 0" in output, output[-6000:]
    assert output.count("backend horovod: 4 ranks on node0:2,node1:2") == 1, output[-6000:]
    assert output.count("backend mpi: 4 ranks on node0:2,node1:2") == 1, output[-6000:]
    horovod, mpi = output.split("launch horovod exit 0")
    check_exactness(horovod, 4, 2, "mpi-direct")
    check_exactness(mpi, 4, 2, "compiled")


def test_syncbn_launch_in_salloc_runs_tf_workers_as_steps(cluster, tmp_path):
    code, output = login(cluster, [
        "salloc", "--nodes=2", "--ntasks-per-node=2", PY, "-m", "launch", "-np", "4",
        "--backend", "tf", "--tf-mpi", "no", "-v", "--", PY, EXACTNESS, "--backend", "tf",
        *EXACTNESS_ARGS], tmp_path)
    assert code == 0, output[-4000:]
    assert output.count("srun --overlap") == 4 and "--nodelist=node1" in output, output[-4000:]
    check_exactness(output, 4, 2, "tf.distribute")


# --- faults ---------------------------------------------------------------------------------

def _run_fault(cluster, fault, tmp_path):
    """Runs the fault job under srun; returns (exit code, output, seconds from fault to end)."""
    argv = ["srun", "-N2", "-n2", "--mpi=pmix", PY, FAULT_JOB, "--backend", "mpi",
            "--fault", fault, "--fault-rank", "1"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=tmp_path, env=_env(cluster, SYNCBN_COLLECTIVE_TIMEOUT=str(
                                   COLLECTIVE_TIMEOUT)))
    lines, fault_at = [], []

    def read():
        for line in process.stdout:
            if "injects fault" in line and not fault_at:
                fault_at.append(time.monotonic())
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=JOB_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
    ended = time.monotonic()
    reader.join(timeout=10)
    seconds = ended - fault_at[0] if fault_at else float("nan")
    return code, "".join(lines), seconds


@pytest.mark.parametrize("fault", ["kill", "stall"])
def test_fault_ends_the_srun_step_within_the_timeout_and_names_the_task(cluster, fault, tmp_path):
    code, output, seconds = _run_fault(cluster, fault, tmp_path)
    assert code != 0, output[-4000:]
    assert seconds <= COLLECTIVE_TIMEOUT + 10, (seconds, output[-4000:])  # nan fails too
    if fault == "kill":
        assert re.search(r"srun: error: node1: task 1: Killed", output), output[-4000:]
    else:
        # Rank 0 waits for the stalled rank, says which collective, and aborts the step.
        assert re.search(r"syncbn: MPI all-reduce 'syncbn/bn_\w/\w+' waited more than 20 s",
                         output), output[-4000:]
        assert re.search(r"MPI_ABORT was invoked on rank 0 in communicator MPI_COMM_WORLD\s+"
                         r"with errorcode 124", output), output[-4000:]
    assert cluster.node_states() != {}


def test_launcher_with_a_cluster_leaves_nothing_behind(tmp_path):
    # `syncbn-launch --simulate-hosts 2 --slurm`: the command runs on the login node
    # beside the cluster, and when it ends, daemons, directories and namespaces go.
    code, output = login_without_cluster(
        [PY, "-m", "launch", "--simulate-hosts", "2", "--slurm", "--",
         "sh", "-c", 'echo "launcher=$PPID conf=$SLURM_CONF"; srun -N2 -n2 --mpi=pmix '
         f'{PY} -c "from mpi4py import MPI; print(\'size\', MPI.COMM_WORLD.Get_size())"'],
        tmp_path)
    assert code == 0, output
    assert output.count("size 2") == 2, output
    launcher_pid, conf = re.search(r"launcher=(\d+) conf=(\S+)", output).groups()
    assert not os.path.exists(os.path.dirname(conf)), conf
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"sbn-{launcher_pid}-" not in namespaces, namespaces
    assert not [name for name in os.listdir("/tmp") if name.startswith(f"sbn-{launcher_pid}-")]
    daemons = subprocess.run(["pgrep", "-af", os.path.dirname(conf)], capture_output=True,
                             text=True).stdout
    assert daemons == "", daemons


def login_without_cluster(argv, tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("SLURM_CONF", None)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=JOB_TIMEOUT,
                            cwd=tmp_path, env=env)
    return result.returncode, result.stdout + result.stderr
