"""Real ssh between simulated hosts: `--simulate-hosts N --ssh`, `-H`, and `horovodrun -H`.

Every simulated host runs Debian's sshd (launch/netns_ssh.py). The launcher
tests run exactness and crash jobs on every backend over ssh and then check
that nothing is left: no process of the job, no sshd, no namespace, no
temporary directory. The `-H` tests run `syncbn-launch -H` and `horovodrun -H`
from one simulated host (the "head node", as on a cluster) against two
others, through a plain `ssh` whose configuration names the job's keys.

Needs root (network namespaces), like tests/test_launch_jobs.py; nothing is skipped.
"""

import ipaddress
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from launch.backends.mpirun import mpirun_command
from launch.hostexec import SshRunner
from launch.hosts import Host, assign_ranks
from launch.netns import SimulatedNetwork, mpi_session_base, namespace_pids, remove_stale
from launch.netns_ssh import SSH_PORT, SimulatedSsh, known_hosts_line, sshd_config
from launch.placement import Placement
from helpers import (BACKEND_ARGS, BACKENDS, REPO, RunningLauncher, exactness_job, hang_job,
                     launcher, processes_with, wait_for_no_processes)

pytestmark = pytest.mark.multiprocess

JOB_TIMEOUT = 300
# Each rank says which sshd session it runs in (sshd sets SSH_CONNECTION), then
# becomes the job: proof that it was started over ssh and not by `ip netns exec`.
SAY_SESSION = ["sh", "-c", 'echo "sshd session: $SSH_CONNECTION"; exec "$@"', "sh"]


# --- pure parts ----------------------------------------------------------------------------

def test_sshd_config_allows_keys_only_and_sets_the_hosts_session_directory():
    text = sshd_config(address="198.18.9.2", port=2222, host_key="/d/host",
                       authorized_keys="/d/authorized_keys", session_base="/tmp/sbn-1-h0-ompi")
    lines = text.splitlines()
    for line in ("ListenAddress 198.18.9.2:2222", "HostKey /d/host",
                 "AuthorizedKeysFile /d/authorized_keys", "PasswordAuthentication no",
                 "KbdInteractiveAuthentication no", "PidFile none",
                 "SetEnv OMPI_MCA_orte_tmpdir_base=/tmp/sbn-1-h0-ompi "
                "OMPI_MCA_btl_vader_backing_directory=/tmp/sbn-1-h0-ompi"):
        assert line in lines, text


def test_known_hosts_line_uses_brackets_for_a_non_default_port():
    assert known_hosts_line("198.18.9.2", 2222, "ssh-ed25519 AAA x\n") == (
        "[198.18.9.2]:2222 ssh-ed25519 AAA x\n")
    assert known_hosts_line("198.18.9.2", 22, "ssh-ed25519 AAA") == "198.18.9.2 ssh-ed25519 AAA\n"


def test_ssh_runner_forwards_the_python_environment_and_config_file():
    runner = SshRunner("h", port=2222, identity_file="/k", config_file="/c",
                       base_env={"PATH": "/venv/bin:/usr/bin", "HOME": "/root"})
    argv, _ = runner.command(["python", "t.py"], {"RANK": "0"}, "/w")
    assert argv[:3] == ["ssh", "-F", "/c"]
    words = shlex.split(argv[-1])
    assert "PATH=/venv/bin:/usr/bin" in words
    assert not any(word.startswith("HOME=") for word in words)  # only what is forwarded


def _placement(hosts, runners, network=None):
    return Placement(slots=assign_ranks(hosts, sum(h.slots for h in hosts)), hosts=hosts,
                     runners=runners, addresses={}, launcher_address="10.0.0.1", iface="eth1",
                     command=["python", "t.py"], cwd="/w", cpus=2, network=network,
                     shared_machine=network is not None)


def test_mpirun_reaches_remote_hosts_with_the_runners_ssh_options():
    hosts = [Host("node1", 2), Host("node2", 2)]
    runners = {h.name: SshRunner(h.name, port=2200, identity_file="/k") for h in hosts}
    argv = mpirun_command(_placement(hosts, runners))
    assert argv[argv.index("plm_rsh_agent") + 1] == "ssh"
    rsh_args = shlex.split(argv[argv.index("plm_rsh_args") + 1])
    assert rsh_args[-4:] == ["-p", "2200", "-i", "/k"]
    # Without ssh runners mpirun keeps its own defaults (negative control).
    assert "plm_rsh_args" not in mpirun_command(_placement([Host("localhost", 2)], {}))


def test_mpirun_over_ssh_in_simulated_hosts_uses_ssh_not_the_netns_agent():
    class Network:
        subnet = ipaddress.ip_network("198.18.7.0/24")

    hosts = [Host("198.18.7.2", 2), Host("198.18.7.3", 2)]
    runners = {h.name: SshRunner(h.name, port=SSH_PORT, config_file="/c") for h in hosts}
    argv = mpirun_command(_placement(hosts, runners, Network()), rsh_agent=None)
    joined = " ".join(argv)
    assert "--mca plm_rsh_agent ssh " in joined
    assert "--mca oob_tcp_if_include 198.18.7.0/24" in joined
    assert argv[argv.index("-x") + 1].startswith("SYNCBN_LAUNCH_PID=") and (
        argv[argv.index("-x") + 1] != "SYNCBN_LAUNCH_PID=")  # ranks share our pid namespace


# --- the launcher over ssh -----------------------------------------------------------------

def leftovers(launcher_pid, marker=None):
    """What a job of launcher `launcher_pid` left behind, as a list of descriptions."""
    found = []
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"namespace {line.split()[0]}" for line in namespaces.splitlines()
              if line.startswith(f"sbn-{launcher_pid}-")]
    temporary = tempfile.gettempdir()
    found += [f"directory {name}" for name in os.listdir(temporary)
              if name.startswith((f"syncbn-ssh-{launcher_pid}-", f"sbn-{launcher_pid}-"))]
    found += [f"process {pid} (sshd)" for pid in processes_with(f"syncbn-ssh-{launcher_pid}-")]
    if marker:
        found += [f"process {pid} (job)" for pid in processes_with(marker)]
    return found


def run_launcher(*args, timeout=JOB_TIMEOUT):
    process = subprocess.Popen(launcher(*args), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate(timeout=timeout)
    return process.pid, subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def check_exactness_logs(log_dir, num_proc, output):
    for rank in range(num_proc):
        log = (log_dir / f"rank.{rank}.log").read_text()
        assert re.search(r"sshd session: \S+ \d+ \S+ 2222", log), log
        assert f"exactness rank={rank}/{num_proc} " in log, log
        assert log.count(" ok ") == 2 and "FAIL" not in log, output[-4000:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_exactness_across_two_hosts_over_ssh(backend, tmp_path):
    pid, result = run_launcher(
        "-np", "4", "--simulate-hosts", "2", "--ssh", *BACKEND_ARGS[backend],
        "-x", "TF_CPP_MIN_LOG_LEVEL", "--timeout", "250", "--output-dir", str(tmp_path), "--",
        *SAY_SESSION, *exactness_job(backend, 4))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "sshd on port 2222 in every simulated host" in result.stderr
    check_exactness_logs(tmp_path, 4, output)
    assert leftovers(pid) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_crash_across_two_hosts_over_ssh_stops_the_job_and_leaves_nothing(backend):
    marker = f"syncbn-ssh-crash-{uuid.uuid4().hex}"
    pid, result = run_launcher(
        "-np", "4", "--simulate-hosts", "2", "--ssh", *BACKEND_ARGS[backend], "--",
        *hang_job(marker, "--fail-rank", "3", "--fail-code", "3", "--fail-after", "2"),
        timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert re.search(r"rank 3 failed first with exit code 3", result.stderr), output
    assert len(re.findall(r"^\[\d\] rank \d pid \d+ started", result.stdout, re.M)) == 4, output
    assert leftovers(pid, marker) == []


PRINT_VARIABLES = [sys.executable, "-c", "import os; print(' '.join(f'{name}=' + os.environ.get("
                   "name, 'unset') for name in ('SYNCBN_COLLECTIVE_TIMEOUT', 'MY_FLAG', "
                   "'NOT_FORWARDED')))"]


@pytest.mark.parametrize("backend", ["mpi", "tf-no-mpi"])
def test_launcher_variables_reach_ranks_on_remote_hosts(backend, monkeypatch):
    # Set in the launcher's environment only: ranks started over ssh (one ssh per rank,
    # or mpirun's daemons) get a fresh environment from sshd.
    monkeypatch.setenv("SYNCBN_COLLECTIVE_TIMEOUT", "37")
    monkeypatch.setenv("MY_FLAG", "on")
    monkeypatch.setenv("NOT_FORWARDED", "here")  # negative control: neither family nor -x
    pid, result = run_launcher(
        "-np", "2", "--simulate-hosts", "2", "--ssh", "--verbose", *BACKEND_ARGS[backend],
        "-x", "MY_FLAG", "--", *SAY_SESSION, *PRINT_VARIABLES, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for rank in range(2):
        session = rf"^\[{rank}\] sshd session: \S+ \d+ \S+ 2222$"
        assert re.search(session, result.stdout, re.M), output
        assert (f"[{rank}] SYNCBN_COLLECTIVE_TIMEOUT=37 MY_FLAG=on NOT_FORWARDED=unset"
                in result.stdout.splitlines()), output
    forwarded = re.search(r"forwarded to remote ranks: (.*)", result.stderr).group(1).split()
    assert {"SYNCBN_COLLECTIVE_TIMEOUT", "MY_FLAG", "PATH"} <= set(forwarded), output
    assert "NOT_FORWARDED" not in forwarded
    assert leftovers(pid) == []


def test_sigkilled_launcher_over_ssh_is_cleaned_up_by_the_next_one():
    marker = f"syncbn-ssh-kill-{uuid.uuid4().hex}"
    run = RunningLauncher(launcher("-np", "2", "--simulate-hosts", "2", "--ssh",
                                   *BACKEND_ARGS["tf-no-mpi"], "--", *hang_job(marker)))
    try:
        run.wait_for(r"^\[\d+\] rank \d+ pid \d+ started", 2)
        run.process.send_signal(signal.SIGKILL)
        run.finish()
        # The sshds die with the launcher; its namespaces, directory and the ranks
        # inside (children of sshd, not of the launcher) wait for the next launcher.
        assert leftovers(run.process.pid, marker), "the SIGKILL left nothing: no control"
        remove_stale()
        assert wait_for_no_processes(marker) == []
        assert leftovers(run.process.pid, marker) == []
    finally:
        if run.process.poll() is None:
            run.process.kill()
        remove_stale()


# --- `-H` and `horovodrun -H` from a head node ------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    """Three simulated hosts with sshd: host 0 is the head node, hosts 1 and 2 compute."""
    with SimulatedNetwork(3) as network, SimulatedSsh(network) as servers:
        yield network, servers


def on_head_node(cluster, argv, timeout=JOB_TIMEOUT, **extra_env):
    """Runs `argv` in the head node's namespace with the job's `ssh` first on PATH."""
    network, servers = cluster
    head = network.hosts[0]
    env = dict(os.environ)
    env.update({"PATH": f"{servers.bin_dir}{os.pathsep}{env['PATH']}",
                "TF_CPP_MIN_LOG_LEVEL": "2",
                # Open MPI's session directories of the head node's own.
                "OMPI_MCA_orte_tmpdir_base": mpi_session_base(head.namespace),
                **extra_env})
    return subprocess.run(["ip", "netns", "exec", head.namespace, *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def compute_hosts(cluster):
    network, _ = cluster
    return f"{network.hosts[1].address}:2,{network.hosts[2].address}:2"


def only_sshd_left(cluster, seconds=10.0):
    """Pids in the compute hosts that are not their sshd, after up to `seconds`."""
    network, _ = cluster
    deadline = time.monotonic() + seconds
    while True:
        others = []
        for host in network.hosts[1:]:
            for pid in namespace_pids(host.namespace):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                        if b"sshd" not in cmdline.read().split(b"\0")[0]:
                            others.append(pid)
                except OSError:
                    continue
        if not others or time.monotonic() > deadline:
            return others
        time.sleep(0.2)


@pytest.mark.parametrize("backend", ["mpi", "horovod-gloo"])
def test_launcher_with_hosts_reaches_remote_machines_over_ssh(cluster, backend, tmp_path):
    _, servers = cluster
    result = on_head_node(cluster, [
        sys.executable, "-m", "launch", "-np", "4", "-H", compute_hosts(cluster),
        "--ssh-port", str(SSH_PORT), "--ssh-identity-file", servers.identity_file,
        *BACKEND_ARGS[backend], "-x", "TF_CPP_MIN_LOG_LEVEL", "--timeout", "250",
        "--output-dir", str(tmp_path), "--", *SAY_SESSION, *exactness_job(backend, 4)])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    check_exactness_logs(tmp_path, 4, output)
    assert only_sshd_left(cluster) == []


@pytest.mark.parametrize("controller", ["--mpi", "--gloo"])
def test_horovodrun_with_hosts_over_ssh(cluster, controller):
    _, servers = cluster
    job = exactness_job("horovod", 4)
    result = on_head_node(cluster, [
        "horovodrun", "-np", "4", "-H", compute_hosts(cluster), controller,
        "--ssh-port", str(SSH_PORT), "--ssh-identity-file", servers.identity_file,
        "--start-timeout", "120", *SAY_SESSION, *job])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    lines = re.findall(r"exactness rank=(\d)/4 .*? (ok|FAIL) ", output)
    assert sorted(lines) == sorted([(str(r), "ok") for r in range(4)] * 2), output[-4000:]
    sessions = re.findall(r"sshd session: \S+ \d+ (\S+) 2222", output)
    network, _ = cluster
    assert {network.hosts[1].address, network.hosts[2].address} <= set(sessions), output[-4000:]
    assert only_sshd_left(cluster) == []
