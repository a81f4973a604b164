"""Unit tests of the launcher's pure parts: hosts, ranks, environments, commands, arguments."""

import ipaddress
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from launch import failures, gpus, supervisor
from launch.backends.mpirun import (ABORT_LINE, VERDICT_LINE, describe_mpirun_failure,
                                    mpirun_command, mpirun_fatal_code)
from launch.config import ENV_PREFIX, EnvDefault, LaunchConfig, build_parser
from launch.environment import build_rank_env, horovod_env, slot_from_mpi_env, tf_config
from launch.hostexec import (HostRunner, LocalRunner, NetnsRunner, SrunRunner, SshRunner,
                             forwarded_names)
from launch.hosts import (Host, Slot, allocation_hosts, assign_ranks, is_local_host,
                          node_addresses, parse_hosts, parse_tasks_per_node,
                          simulated_hosts_spec, validate_num_proc)
from launch.netns import POOL, choose_subnet
from launch.netns_rsh import parse_agent_args, parse_namespace_map
from launch.placement import Placement, allocation_site, make_placement
from launch.supervisor import Supervisor, WorkerSpec, describe_exit, shell_exit_code

pytestmark = pytest.mark.unit


# --- hosts -------------------------------------------------------------------------------

def test_parse_hosts():
    assert parse_hosts("a:2, b.example.com:1") == [Host("a", 2), Host("b.example.com", 1)]


@pytest.mark.parametrize("spec", ["a:b", "a", "a:2,,b:1", "", "a:2:3", "a:-1", "a b:1"])
def test_parse_hosts_rejects_bad_input_naming_argument_and_value(spec):
    with pytest.raises(ValueError) as error:
        parse_hosts(spec)
    assert "`-H`" in str(error.value)
    assert f"Received: {spec!r}" in str(error.value)


def test_parse_hosts_rejects_zero_slots_and_duplicates():
    with pytest.raises(ValueError, match="at least 1 slot.*Received: 'a:0'"):
        parse_hosts("a:0")
    with pytest.raises(ValueError, match="twice.*Received: 'a:1,a:2'"):
        parse_hosts("a:1,a:2")


def test_parse_hosts_rejects_non_string():
    with pytest.raises(TypeError, match="`-H`.*Received: 4"):
        parse_hosts(4)


@pytest.mark.parametrize("num_proc,message", [
    (0, "must be >= 1. Received: -np=0"),
    (-2, "must be >= 1. Received: -np=-2"),
    (5, r"more processes than there are slots \(4 in 'a:2,b:2'\). Received: -np=5"),
])
def test_validate_num_proc(num_proc, message):
    with pytest.raises(ValueError, match=message):
        validate_num_proc(num_proc, [Host("a", 2), Host("b", 2)])


@pytest.mark.parametrize("num_proc", ["2", 2.0, True, None])
def test_validate_num_proc_type(num_proc):
    with pytest.raises(TypeError, match="`-np` must be an integer"):
        validate_num_proc(num_proc, [Host("a", 4)])


def test_assign_ranks_fills_hosts_in_order():
    slots = assign_ranks([Host("a", 2), Host("b", 2), Host("c", 2)], 5)
    assert slots == [
        # Only a and b have a local rank 1, so its cross size is 2.
        Slot("a", 0, 0, 0, 5, 2, 3), Slot("a", 1, 1, 0, 5, 2, 2),
        Slot("b", 2, 0, 1, 5, 2, 3), Slot("b", 3, 1, 1, 5, 2, 2),
        Slot("c", 4, 0, 2, 5, 1, 3),
    ]


@pytest.mark.parametrize("spec,num_proc", [
    ("a:1", 1), ("a:4", 3), ("a:2,b:2", 4), ("a:2,b:2,c:2", 5), ("a:3,b:1,c:2", 6), ("a:1,b:3", 2),
])
def test_assign_ranks_matches_horovod(spec, num_proc):
    from launch.backends.horovod import horovod_plan

    _, horovod_slots = horovod_plan(parse_hosts(spec), num_proc)
    assert assign_ranks(parse_hosts(spec), num_proc) == horovod_slots


def test_simulated_hosts_spec():
    assert simulated_hosts_spec(4, 2) == [2, 2]
    assert simulated_hosts_spec(5, 2) == [3, 2]
    with pytest.raises(ValueError, match="must not exceed `-np` \\(2\\).*Received: --simulate-hosts=3"):
        simulated_hosts_spec(2, 3)
    with pytest.raises(ValueError, match="Received: --simulate-hosts=0"):
        simulated_hosts_spec(2, 0)


def test_is_local_host():
    assert is_local_host("localhost") and is_local_host("127.0.0.1")
    assert not is_local_host("node-17.invalid")


# --- environments ------------------------------------------------------------------------

def test_rank_env_divides_cpu_threads_among_local_ranks():
    env = build_rank_env(Slot("a", 3, 1, 1, 4, 2, 2), cpus=2)
    assert env["RANK"] == "3" and env["LOCAL_RANK"] == "1"
    assert env["WORLD_SIZE"] == "4" and env["LOCAL_WORLD_SIZE"] == "2"
    assert env["TF_NUM_INTRAOP_THREADS"] == env["OMP_NUM_THREADS"] == "1"
    assert env["TF_NUM_INTEROP_THREADS"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in env
    big = build_rank_env(Slot("a", 0, 0, 0, 2, 2, 1), cpus=16)
    assert (big["TF_NUM_INTRAOP_THREADS"], big["TF_NUM_INTEROP_THREADS"]) == ("8", "4")


def test_rank_env_simulated_hosts_share_the_machine():
    env = build_rank_env(Slot("a", 0, 0, 0, 4, 2, 2), cpus=8, shared_machine=True)
    assert env["TF_NUM_INTRAOP_THREADS"] == "2"  # 8 cores / 4 ranks, not / 2 local ranks


def test_rank_env_keeps_user_thread_settings():
    env = build_rank_env(Slot("a", 0, 0, 0, 2, 2, 1), cpus=2,
                         base_env={"OMP_NUM_THREADS": "7"})
    assert env["OMP_NUM_THREADS"] == "7"


def test_rank_env_one_gpu_per_local_rank():
    env = build_rank_env(Slot("a", 3, 1, 1, 4, 2, 2), cpus=2, gpu_ids=("4", "5"))
    assert env["CUDA_VISIBLE_DEVICES"] == "5"
    assert "TF_NUM_INTRAOP_THREADS" not in env
    shared = build_rank_env(Slot("a", 3, 1, 1, 4, 2, 2), cpus=2, gpu_ids=range(4),
                            shared_machine=True)
    assert shared["CUDA_VISIBLE_DEVICES"] == "3"
    with pytest.raises(ValueError, match="3 ranks share a machine with 2 GPUs"):
        build_rank_env(Slot("a", 0, 0, 0, 3, 3, 1), cpus=2, gpu_ids=("0", "1"))


def test_horovod_env():
    env = horovod_env(Slot("h1", 2, 0, 1, 4, 2, 2), rendezvous_addr="198.18.0.1",
                      rendezvous_port=4242, iface="sbn0", cycle_time_ms=2.5)
    assert env == {
        "HOROVOD_HOSTNAME": "h1", "HOROVOD_RANK": "2", "HOROVOD_SIZE": "4",
        "HOROVOD_LOCAL_RANK": "0", "HOROVOD_LOCAL_SIZE": "2", "HOROVOD_CROSS_RANK": "1",
        "HOROVOD_CROSS_SIZE": "2", "HOROVOD_GLOO_RENDEZVOUS_ADDR": "198.18.0.1",
        "HOROVOD_GLOO_RENDEZVOUS_PORT": "4242", "HOROVOD_CONTROLLER": "gloo",
        "HOROVOD_CPU_OPERATIONS": "gloo", "HOROVOD_GLOO_IFACE": "sbn0",
        "NCCL_SOCKET_IFNAME": "sbn0", "HOROVOD_CYCLE_TIME": "2.5",
    }
    default = horovod_env(Slot("h", 0, 0, 0, 1, 1, 1), rendezvous_addr="127.0.0.1",
                          rendezvous_port=1, iface="lo")
    assert "HOROVOD_CYCLE_TIME" not in default  # Horovod's own default unless asked


def test_tf_config():
    config = json.loads(tf_config(1, ["10.0.0.1:5000", "10.0.0.2:5000"]))
    assert config == {"cluster": {"worker": ["10.0.0.1:5000", "10.0.0.2:5000"]},
                      "task": {"type": "worker", "index": 1}}


def test_slot_from_mpi_env():
    environ = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
               "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    assert slot_from_mpi_env(environ) == Slot("", 3, 1, 1, 4, 2, 2)
    assert slot_from_mpi_env({}) is None


# --- "run this command on host H" ---------------------------------------------------------

def test_local_runner():
    argv, env = LocalRunner(base_env={"A": "1"}).command(["python", "t.py"], {"RANK": "0"}, "/w")
    assert argv == ["python", "t.py"] and env == {"A": "1", "RANK": "0"}


def test_netns_runner():
    argv, env = NetnsRunner("sbn-1-h0", base_env={}).command(["python", "t.py"], {"RANK": "1"}, "/")
    assert argv == ["ip", "netns", "exec", "sbn-1-h0", "python", "t.py"]
    assert env == {"RANK": "1"}


def test_ssh_runner_quotes_cwd_env_and_command():
    runner = SshRunner("node2", port=2222, identity_file="/k", exported=["FOO", "MISSING"],
                       base_env={"FOO": "a b"})
    argv, _ = runner.command(["python", "train.py", "--name", "it's"],
                             {"RANK": "1", "TF_CONFIG": '{"a": 1}'}, "/data/my dir")
    assert argv[:-2] == ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                         "-p", "2222", "-i", "/k"]
    assert argv[-2] == "node2"
    remote = argv[-1]
    assert remote.startswith("cd '/data/my dir' && exec env ")
    words = shlex.split(remote)
    assert words[words.index("env") + 1:] == [
        "FOO=a b", "RANK=1", 'TF_CONFIG={"a": 1}', "python", "train.py", "--name", "it's"]


def test_forwarded_names_are_the_python_basics_the_families_and_the_exports():
    env = {"PATH": "/b", "HOME": "/root", "SYNCBN_COLLECTIVE_TIMEOUT": "60", "NCCL_DEBUG": "INFO",
           "TF_CPP_MIN_LOG_LEVEL": "2", "HOROVOD_CYCLE_TIME": "1", "OMPI_MCA_btl": "tcp",
           "OMPI_COMM_WORLD_RANK": "0", "SYNCBN_LAUNCH_NUM_PROC": "4", "MY_FLAG": "x"}
    assert forwarded_names(env, ["MY_FLAG", "PATH", "ABSENT"]) == [
        "PATH", "HOROVOD_CYCLE_TIME", "NCCL_DEBUG", "OMPI_MCA_btl", "SYNCBN_COLLECTIVE_TIMEOUT",
        "TF_CPP_MIN_LOG_LEVEL", "MY_FLAG"]
    runner = SshRunner("node2", base_env=env, exported=["MY_FLAG"])
    words = shlex.split(runner.command(["true"], {"RANK": "1"}, "/")[0][-1])
    assigned = {w.split("=", 1)[0] for w in words[words.index("env") + 1:-1]}
    assert assigned == {*forwarded_names(env, ["MY_FLAG"]), "RANK"}


def test_mpirun_forwards_the_same_names(monkeypatch):
    from launch.backends.mpirun import mpirun_worker

    monkeypatch.setenv("SYNCBN_COLLECTIVE_TIMEOUT", "60")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("SYNCBN_LAUNCH_TIMEOUT", "9")
    spec = mpirun_worker(_placement(exported=("MY_FLAG",)), {"HOROVOD_CONTROLLER": "mpi"})
    forwarded = [spec.argv[i + 1] for i, word in enumerate(spec.argv) if word == "-x"]
    for name in ("SYNCBN_COLLECTIVE_TIMEOUT", "NCCL_DEBUG", "HOROVOD_CONTROLLER", "PATH"):
        assert name in forwarded
    assert "SYNCBN_LAUNCH_TIMEOUT" not in forwarded and "MY_FLAG" not in forwarded  # unset


# --- mpirun and its rsh agent --------------------------------------------------------------

def _placement(**kw):
    hosts = kw.pop("hosts", [Host("localhost", 2)])
    defaults = dict(slots=assign_ranks(hosts, sum(h.slots for h in hosts)), hosts=hosts,
                    runners={}, addresses={}, launcher_address="127.0.0.1", iface="lo",
                    command=["python", "t.py"], cwd="/w", cpus=2)
    defaults.update(kw)
    return Placement(**defaults)


def test_mpirun_command_local():
    argv = mpirun_command(_placement(), python="py", is_root=True, job_env_names=["PATH"])
    assert argv[:5] == ["mpirun", "-np", "2", "--host", "localhost:2"]
    for flag in ("--bind-to", "--oversubscribe", "--allow-run-as-root"):
        assert flag in argv
    assert argv[argv.index("--bind-to") + 1] == "none"
    assert "plm_rsh_agent" not in argv
    assert ["-x", "PATH"] == argv[argv.index("PATH") - 1:argv.index("PATH") + 1]
    assert argv[-6:] == ["py", "-m", "launch.mpi_rank", "--", "python", "t.py"]
    assert "--allow-run-as-root" not in mpirun_command(_placement(), is_root=False)


def test_mpirun_command_simulated_hosts():
    class Network:
        subnet = ipaddress.ip_network("198.18.7.0/24")

    hosts = [Host("198.18.7.2", 2), Host("198.18.7.3", 2)]
    argv = mpirun_command(_placement(hosts=hosts, network=Network(), shared_machine=True),
                          rsh_agent="/tmp/agent")
    joined = " ".join(argv)
    assert "--host 198.18.7.2:2,198.18.7.3:2" in joined
    assert "--mca plm_rsh_agent /tmp/agent" in joined
    assert "--mca btl_tcp_if_include 198.18.7.0/24" in joined
    assert "--mca oob_tcp_if_include 198.18.7.0/24" in joined
    assert "-x SYNCBN_LAUNCH_SHARED_MACHINE=1" in joined


def test_rsh_agent_argument_parsing():
    assert parse_agent_args(["198.18.0.2", "orted", "-mca", "x", "y"]) == (
        "198.18.0.2", "orted -mca x y")
    assert parse_agent_args(["-x", "h", "cmd"]) == ("h", "cmd")
    with pytest.raises(ValueError, match="Received"):
        parse_agent_args(["h"])
    assert parse_namespace_map("a=ns1,b=ns2") == {"a": "ns1", "b": "ns2"}


def test_describe_mpirun_failure():
    lines = [b"mpirun detected that one or more processes exited with non-zero status\n",
             b"  Process name: [[32692,1],1]\n", b"  Exit code:    3\n"]
    assert describe_mpirun_failure(lines, 3) == "rank 1 failed first with exit code 3 (mpirun)"
    signalled = [b"mpirun noticed that process rank 2 with PID 7 on node h exited on signal 11 "
                 b"(Segmentation fault).\n"]
    assert describe_mpirun_failure(signalled, 139) == (
        "rank 2 failed first with signal SIGSEGV (mpirun)")
    assert describe_mpirun_failure([b"nothing\n"], 1) is None


def test_describe_mpirun_failure_after_mpi_abort():
    # MPI_Abort's notice wins over mpirun's closing message; the communicator's name
    # may have spaces, and the lines may carry the aborting rank's prefix.
    aborted = [b"[1] MPI_ABORT was invoked on rank 1 in communicator MPI COMMUNICATOR 3 DUP "
               b"FROM 0\n", b"[1] with errorcode 124.\n",
               b"  Process name: [[32692,1],0]\n", b"  Exit code:    1\n"]
    assert describe_mpirun_failure(aborted, 124) == (
        "rank 1 failed first: it called MPI_Abort with error code 124 (mpirun)")
    assert ABORT_LINE.search(aborted[1]).group("code") == b"124"
    assert ABORT_LINE.search(b"with errorcode 1.\n").group("code") == b"1"
    assert ABORT_LINE.search(aborted[0]) is None


def test_describe_mpirun_failure_without_mpiruns_notice():
    lines = [b"[0] step done\n", b"[1] Traceback (most recent call last):\n",
             b"[1] RuntimeError: boom\n", b"[0] Traceback (most recent call last):\n"]
    assert describe_mpirun_failure(lines, 1) == (
        "rank 1 failed first (its traceback came first); mpirun exited with 1")


# What a stalled job's mpirun printed in the runs whose verdict named no rank: the
# rank's timeout line, then Open MPI 4.1 failing to relay its own MPI_ABORT notice
# (open-mpi/ompi#8356), as reproduced with 2 of 10 small aborting jobs on this machine.
TIMEOUT_LINE = (b"[0] syncbn: MPI all-reduce 'syncbn/bn_b/backward' waited more than 20 s "
                b"(SYNCBN_COLLECTIVE_TIMEOUT) for the other ranks; one of them has died or is "
                b"stuck. Aborting the MPI job.\n")
LOST_NOTICE = (b"[vm:26416] [[3022,0],0] ORTE_ERROR_LOG: Data unpack would read past end of "
               b"buffer in file ../../../orte/util/show_help.c at line 501\n")
TIMED_OUT_VERDICT = ("rank 0 failed first: its MPI all-reduce 'syncbn/bn_b/backward' timed out "
                     "and it called MPI_Abort; mpirun exited with 124 (mpirun's MPI_ABORT "
                     "notice is missing)")


def test_describe_mpirun_failure_when_mpiruns_abort_notice_is_lost():
    lines = [b"[1] rank 1 injects fault 'stall' between forward and backward\n",
             TIMEOUT_LINE, LOST_NOTICE]
    assert describe_mpirun_failure(lines, 124) == TIMED_OUT_VERDICT


def test_describe_mpirun_failure_names_the_rank_whose_own_failure_came_first():
    traceback_first = [b"[1] Traceback (most recent call last):\n", b"[1] RuntimeError: x\n",
                       TIMEOUT_LINE]
    assert describe_mpirun_failure(traceback_first, 124).startswith(
        "rank 1 failed first (its traceback came first)")
    timeout_first = [TIMEOUT_LINE, b"[1] Traceback (most recent call last):\n"]
    assert describe_mpirun_failure(timeout_first, 124) == TIMED_OUT_VERDICT


def test_describe_mpirun_failure_reads_a_notice_the_rank_printed_itself():
    # When the relay to mpirun is not up, the aborting rank prints the notice: its
    # lines carry the rank's prefix, and another rank's line can come between them.
    lines = [b"[0] MPI_ABORT was invoked on rank 0 in communicator MPI_COMM_WORLD \n",
             b"[1] rank 1 step 0 done\n", b"[0] with errorcode 124.\n"]
    assert describe_mpirun_failure(lines, 124) == (
        "rank 0 failed first: it called MPI_Abort with error code 124 (mpirun)")


def test_describe_mpirun_failure_on_a_split_communicator_names_the_world_rank():
    # `group_size` splits COMM_WORLD; the notice then gives the rank within the group.
    lines = [b"[3] syncbn: MPI all-reduce 'syncbn/bn/forward' waited more than 20 s\n",
             b"MPI_ABORT was invoked on rank 1 in communicator MPI COMMUNICATOR 4 SPLIT FROM 0\n",
             b"with errorcode 124.\n"]
    assert describe_mpirun_failure(lines, 124) == (
        "rank 3 failed first: it called MPI_Abort with error code 124 "
        "(mpirun: rank 1 of communicator MPI COMMUNICATOR 4 SPLIT FROM 0)")
    assert describe_mpirun_failure(lines[1:], 124) == (
        "rank 1 failed first: it called MPI_Abort with error code 124 (mpirun) "
        "(rank 1 of communicator MPI COMMUNICATOR 4 SPLIT FROM 0)")


def test_describe_mpirun_failure_after_mpiruns_ordered_abort_message():
    lines = [b"mpirun has exited due to process rank 1 with PID 0 on\n",
             b"node vm calling \"abort\". This may have caused other processes\n"]
    assert describe_mpirun_failure(lines, 7) == (
        "rank 1 failed first: it called abort (mpirun); mpirun exited with 7")


def test_mpirun_fatal_code():
    assert mpirun_fatal_code(TIMEOUT_LINE) == 124
    assert mpirun_fatal_code(b"[1] with errorcode 1.\n") == 1
    assert mpirun_fatal_code(LOST_NOTICE) is None
    assert mpirun_fatal_code(b"[0] print('syncbn: MPI all-reduce')\n") is None
    for line in (TIMEOUT_LINE, b"MPI_ABORT was invoked on rank 0 in communicator X\n",
                 b"with errorcode 1.\n", b"  Process name: [[1,1],0]\n", b"  Exit code: 3\n",
                 b"[2] Traceback (most recent call last):\n",
                 b"mpirun noticed that process rank 1 with PID 7 on node h exited on signal 9\n"):
        assert VERDICT_LINE.search(line), line


def _fake_mpirun(script, **spec):
    """A WorkerSpec like the mpi backend's, for a Python script standing in for mpirun."""
    spec = {"demux_ranks": True, "describe_failure": describe_mpirun_failure,
            "keep_line": VERDICT_LINE, "fatal_code": mpirun_fatal_code, **spec}
    return WorkerSpec("mpirun", [sys.executable, "-c", script], dict(os.environ), **spec)


def _verdict(caplog):
    return [r.getMessage() for r in caplog.records if "failed first" in r.getMessage()]


def test_supervisor_keeps_the_lines_that_name_the_rank_past_its_tail(caplog):
    # The timeout line, then more than the tail holds (other ranks' tracebacks, say).
    script = (f"import sys; sys.stdout.buffer.write({TIMEOUT_LINE!r} + {LOST_NOTICE!r}"
              " + b'[1] some line\\n' * 1000); sys.exit(124)")
    assert Supervisor([_fake_mpirun(script)]).run() == 124
    assert _verdict(caplog) == [f"{TIMED_OUT_VERDICT}; stopping the other ranks"]


def test_supervisor_waits_for_a_reader_held_back_after_mpirun_exits(caplog, monkeypatch):
    # mpirun has written everything and exited, but the reader is still busy (here, its
    # first line takes 3 s to write out, as when the launcher's own stdout is slow).
    write = supervisor._Output.write
    calls = []

    def slow_write(self, spec, line):
        calls.append(line)
        if len(calls) == 1:
            time.sleep(3.0)
        write(self, spec, line)

    monkeypatch.setattr(supervisor._Output, "write", slow_write)
    script = (f"import sys; sys.stdout.buffer.write(b'[1] step done\\n' + {TIMEOUT_LINE!r}"
              f" + {LOST_NOTICE!r}); sys.exit(124)")
    # No fatal_code here: the verdict must come from the exit, after the drain.
    assert Supervisor([_fake_mpirun(script, fatal_code=None)]).run() == 124
    assert _verdict(caplog) == [f"{TIMED_OUT_VERDICT}; stopping the other ranks"]


def test_supervisor_stops_mpirun_that_hangs_after_a_rank_timed_out(caplog):
    # With a host's network cut, mpirun may never exit, and its notice may be lost.
    script = (f"import sys, time; sys.stdout.buffer.write({TIMEOUT_LINE!r}); "
              "sys.stdout.flush(); time.sleep(600)")
    assert Supervisor([_fake_mpirun(script)], timeout=120).run() == 124
    assert _verdict(caplog) == [
        "rank 0 failed first: its MPI all-reduce 'syncbn/bn_b/backward' timed out and it "
        "called MPI_Abort; mpirun exited with 124 (mpirun's MPI_ABORT notice is missing); "
        "stopping the other ranks"]


# --- which rank failed first: error files, then output ------------------------------------

def _record(rank, at, kind="ValueError", message="boom"):
    return failures.ErrorRecord(rank=rank, type=kind, message=message, time=at)


def _death(rank, ended_at, code=1):
    return failures.Death(f"rank {rank}" if rank is not None else "mpirun", rank, ended_at, code)


def _no_output():
    raise AssertionError("with error records, the output is not read")


def test_verdict_names_the_earliest_record():
    records = [_record(0, 12.0, "RuntimeError", "Horovod has been shut down\nmore"),
               _record(1, 10.0, "tensorflow.python.framework.errors_impl.UnknownError",
                       "\ninjected fault: rank 1 raises mid-step\n  [[node x]]")]
    failed = _death(0, 13.0)
    assert failures.verdict(records, [failed], failed, _no_output) == (
        "rank 1 failed first: UnknownError: injected fault: rank 1 raises mid-step "
        "(its error file); rank 0 exited first, with exit code 1")
    mpirun = _death(None, 13.0, 124)  # one process for every rank: no "exited first"
    assert failures.verdict(records, [mpirun], mpirun, _no_output) == (
        "rank 1 failed first: UnknownError: injected fault: rank 1 raises mid-step "
        "(its error file)")


def test_verdict_a_rank_dead_without_a_record_before_the_first_record_failed_first():
    # Rank 1 was SIGKILLed (its output closed at 9.0); rank 0's error, written at 9.5,
    # follows from it.
    killed = _death(1, 9.0, -9)
    assert failures.verdict([_record(0, 9.5)], [killed], killed, _no_output) == (
        "rank 1 failed first with signal SIGKILL")
    # Its peer's error can be written a moment before the launcher sees it end.
    seen_late = _death(1, 9.5 + failures.SILENT_DEATH_WINDOW - 0.01, -9)
    assert failures.verdict([_record(0, 9.5)], [seen_late], seen_late, _no_output) == (
        "rank 1 failed first with signal SIGKILL")
    # Ended well after the record was written: the record came first.
    late = _death(1, 9.5 + failures.SILENT_DEATH_WINDOW + 0.01, 3)
    assert failures.verdict([_record(0, 9.5)], [late], late, _no_output).startswith(
        "rank 0 failed first: ValueError: boom (its error file); rank 1 exited first")
    # A rank that died with a record is not a silent death.
    recorded = _death(0, 9.0)
    assert failures.verdict([_record(0, 9.5)], [recorded], recorded, _no_output) == (
        "rank 0 failed first: ValueError: boom (its error file)")


def test_verdict_without_records_reads_the_output_then_the_first_exit():
    failed = _death(2, 5.0, -11)
    assert failures.verdict([], [failed], failed, lambda: "rank 1 failed first (mpirun)") == (
        "rank 1 failed first (mpirun)")
    assert failures.verdict([], [failed], failed, lambda: None) == (
        "rank 2 failed first with signal SIGSEGV")


def test_read_error_records_takes_the_rank_from_the_file_name_and_skips_bad_files(
        tmp_path, caplog):
    (tmp_path / "rank.3.json").write_text(json.dumps(
        {"rank": 3, "type": "KeyError", "message": "'x'", "time": 1.5, "exit_code": 1,
         "host": "h", "traceback": "Traceback ..."}))
    (tmp_path / "rank.4.json").write_text("{not json")
    (tmp_path / "rank.5.json").write_text(json.dumps({"type": "KeyError"}))  # no time
    (tmp_path / "netns-rsh").write_text("#!/bin/sh\n")  # other files of the job directory
    [record] = failures.read_error_records(str(tmp_path))
    assert (record.rank, record.type, record.time, record.host) == (3, "KeyError", 1.5, "h")
    assert len([r for r in caplog.records if "ignoring the error file" in r.getMessage()]) == 2


def test_record_summary_is_one_short_line():
    assert _record(0, 1.0, "a.b.C", "x" * 1000).summary() == "C: " + "x" * 294 + "..."
    assert _record(0, 1.0, "ValueError", "").summary() == "ValueError: "


# TensorFlow relays a node's error after a header and where the node was defined
# (as TF 2.21 words it), or after the function's name.
TF_MESSAGES = {
    "py_function": (
        "UnknownError",
        "Graph execution error:\n\nDetected at node EagerPyFunc defined at (most recent call "
        "last):\n  File \"t.py\", line 8, in <module>\n\nRuntimeError: injected fault\n"
        "Traceback (most recent call last):\n  File \"t.py\", line 3, in boom\n    raise "
        "RuntimeError(\"injected fault\")\n\nRuntimeError: injected fault\n\n\t "
        "[[{{node EagerPyFunc}}]] [Op:__inference_f_6]",
        "UnknownError: RuntimeError: injected fault"),
    "kernel": (
        "FailedPreconditionError",
        "Graph execution error:\n\nDetected at node syncbn_mpi_all_sum defined at (most recent "
        "call last):\n  File \"job.py\", line 9, in step\n\nsyncbn: ranks disagree at a sync BN "
        "collective: this rank (1) is at 'bn_b/forward'\n\t [[{{node syncbn_mpi_all_sum}}]] "
        "[Op:__inference_step_99]",
        "FailedPreconditionError: syncbn: ranks disagree at a sync BN collective: this rank (1) "
        "is at 'bn_b/forward'"),
    "eager": (
        "UnknownError",
        "{{function_node __inference_<lambda>_773}} RuntimeError: injected fault\nmore",
        "UnknownError: RuntimeError: injected fault"),
    "collective": (
        "UnavailableError",
        "{{function_node __inference_<lambda>_1257}} Collective ops is aborted by: "
        "recvmsg:Connection reset by peer\nAdditional GRPC error information",
        "UnavailableError: Collective ops is aborted by: recvmsg:Connection reset by peer"),
}


@pytest.mark.parametrize("case", sorted(TF_MESSAGES))
def test_record_summary_of_tensorflow_errors_shows_the_error_relayed(case):
    kind, message, summary = TF_MESSAGES[case]
    assert _record(0, 1.0, f"tensorflow.python.framework.errors_impl.{kind}",
                   message).summary() == summary


def _ranks_writing_records(tmp_path, scripts):
    specs = [WorkerSpec(str(rank), [sys.executable, "-c", script], dict(os.environ), rank=rank)
             for rank, script in enumerate(scripts)]
    return Supervisor(specs, error_dir=str(tmp_path), grace_period=1.0)


def test_supervisor_names_the_rank_of_the_earliest_record(tmp_path, caplog):
    # Rank 1 writes its record and stays; rank 0 exits first, with no record, well
    # after it. As the job directory's records say, rank 1 failed first.
    path = str(tmp_path / "rank.1.json")
    record = {"type": "ValueError", "message": "bad batch", "exit_code": 1}
    write = (f"import json, time; json.dump({{**{record!r}, 'time': time.time()}}, "
             f"open({path!r} + '.tmp', 'w')); import os; os.rename({path!r} + '.tmp', {path!r}); "
             "time.sleep(60)")
    exit_later = (f"import os, time\nwhile not os.path.exists({path!r}): time.sleep(0.05)\n"
                  f"time.sleep({failures.SILENT_DEATH_WINDOW + 1}); raise SystemExit(2)")
    assert _ranks_writing_records(tmp_path, [exit_later, write]).run() == 2
    assert _verdict(caplog) == ["rank 1 failed first: ValueError: bad batch (its error file); "
                                "rank 0 exited first, with exit code 2; stopping the other ranks"]


def test_exit_descriptions():
    assert describe_exit(3) == "exit code 3" and describe_exit(-9) == "signal SIGKILL"
    assert shell_exit_code(-15) == 143 and shell_exit_code(3) == 3


# --- simulated network address choice ------------------------------------------------------

def test_choose_subnet_avoids_used_networks():
    used = [ipaddress.ip_network("198.18.0.0/16"), ipaddress.ip_network("198.19.0.0/24")]
    subnet = choose_subnet(used, seed=0)
    assert subnet.subnet_of(POOL) and subnet.prefixlen == 24
    assert not any(subnet.overlaps(n) for n in used)
    with pytest.raises(RuntimeError, match="no free /24"):
        choose_subnet([POOL], seed=0)


# --- command line ---------------------------------------------------------------------------

def _config(argv):
    return LaunchConfig.from_args(build_parser().parse_args(argv))


def test_cli_defaults_and_command(monkeypatch):
    monkeypatch.delenv("HOROVOD_CYCLE_TIME", raising=False)
    config = _config(["-np", "2", "--", "python", "t.py", "--flag"])
    assert config.command == ("python", "t.py", "--flag")
    assert config.backend in ("horovod", "tf", "mpi")  # the default backend, resolved once
    assert config.timeout is None and config.grace_period == 3.0
    assert config.horovod_cycle_time is None and config.simulate_hosts is None
    assert config.horovod_controller == "auto" and config.gpus_per_host == "auto"
    assert config.hosts is None and config.export == ()


def test_config_is_frozen():
    config = _config(["-np", "2", "--backend", "mpi", "--", "x"])
    with pytest.raises(AttributeError):
        config.num_proc = 3


def test_cli_keeps_a_users_horovod_cycle_time(monkeypatch):
    monkeypatch.setenv("HOROVOD_CYCLE_TIME", "2")
    assert _config(["-np", "2", "--", "python", "t.py"]).horovod_cycle_time == 2.0
    monkeypatch.setenv("SYNCBN_LAUNCH_HOROVOD_CYCLE_TIME", "0.5")
    assert _config(["-np", "2", "--", "python", "t.py"]).horovod_cycle_time == 0.5


@pytest.mark.parametrize("argv,message", [
    (["-np", "2"], "No command given"),
    (["-np", "0", "--", "x"], "Received: -np=0"),
    (["--", "x"], "`-np` is required"),
    (["-np", "5", "-H", "a:2,b:2", "--", "x"], "Received: -np=5"),
    (["-np", "2", "-H", "a:b", "--", "x"], "Received: 'a:b'"),
    (["-np", "2", "--simulate-hosts", "3", "--", "x"], "Received: --simulate-hosts=3"),
    (["-np", "2", "--timeout", "0", "--", "x"], "Received: --timeout=0"),
    (["-np", "2", "--grace-period", "-1", "--", "x"], "Received: --grace-period=-1"),
    (["-np", "2", "--cpus-per-host", "0", "--", "x"], "Received: --cpus-per-host=0"),
    (["-np", "2", "--gpus-per-host", "two", "--", "x"], "Received: 'two'"),
    (["-np", "2", "--gpus-per-host", "-1", "--", "x"], "Received: -1"),
    (["-np", "2", "--ssh", "--", "x"], "`--ssh` needs `--simulate-hosts N`.*Received: --ssh"),
])
def test_cli_validation_names_argument_and_value(argv, message):
    with pytest.raises((ValueError, TypeError), match=message):
        _config(argv)


def test_cli_hosts_and_simulate_hosts_are_exclusive(monkeypatch):
    with pytest.raises(ValueError, match="`-H` and `--simulate-hosts` exclude each other"):
        _config(["-np", "2", "-H", "a:2", "--simulate-hosts", "2", "--", "x"])
    # Also when one of them comes from the environment.
    monkeypatch.setenv("SYNCBN_LAUNCH_HOSTS", "a:2")
    with pytest.raises(ValueError, match="exclude each other"):
        _config(["-np", "2", "--simulate-hosts", "2", "--", "x"])


def test_cli_environment_fallbacks(monkeypatch):
    monkeypatch.setenv("SYNCBN_LAUNCH_BACKEND", "mpi")
    monkeypatch.setenv("SYNCBN_LAUNCH_TIMEOUT", "12.5")
    monkeypatch.setenv("SYNCBN_LAUNCH_NUM_PROC", "3")
    monkeypatch.setenv("SYNCBN_LAUNCH_HOROVOD_CYCLE_TIME", "1")
    monkeypatch.setenv("SYNCBN_LAUNCH_EXPORT", "A,B")
    monkeypatch.setenv("SYNCBN_LAUNCH_SSH", "1")
    monkeypatch.setenv("SYNCBN_LAUNCH_SIMULATE_HOSTS", "2")
    config = _config(["--", "x"])
    assert (config.backend, config.timeout, config.num_proc) == ("mpi", 12.5, 3)
    assert config.horovod_cycle_time == 1.0 and config.export == ("A", "B")
    assert config.ssh is True and config.simulate_hosts == 2
    assert _config(["--backend", "tf", "--", "x"]).backend == "tf"  # command line wins
    assert _config(["-x", "C", "--", "x"]).export == ("A", "B", "C")  # -x adds to the list


@pytest.mark.parametrize("name,value,message", [
    ("SYNCBN_LAUNCH_NUM_PROC", "two", "`SYNCBN_LAUNCH_NUM_PROC` must be a valid int"),
    ("SYNCBN_LAUNCH_BACKEND", "nccl", "`SYNCBN_LAUNCH_BACKEND` must be one of"),
    ("SYNCBN_LAUNCH_VERBOSE", "maybe", "`SYNCBN_LAUNCH_VERBOSE` must be one of"),
])
def test_cli_rejects_a_bad_environment_value_naming_the_variable(monkeypatch, name, value,
                                                                 message):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{message}.*Received: {name}={value!r}"):
        build_parser()


def test_every_option_has_one_environment_fallback_and_documents_it(monkeypatch):
    parser = build_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) == 20
    for action in options:
        assert isinstance(action, EnvDefault), action.dest
        assert action.env[0] == ENV_PREFIX + action.dest.upper()
        assert "(default: " in action.help and f"env {action.env[0]}" in action.help, action.help
    # The fallback really works for each of them: set, every value differs from the default.
    from_env = {"num_proc": ("3", 3), "hosts": ("a:3", "a:3"), "simulate_hosts": ("3", 3),
                "ssh": ("1", True), "slurm": ("1", True), "gpus_per_host": ("4", "4"),
                "cpus_per_host": ("5", 5),
                "backend": ("tf", "tf"), "horovod_controller": ("gloo", "gloo"),
                "tf_mpi": ("no", "no"), "horovod_cycle_time": ("0.5", 0.5),
                "network_interface": ("eth9", "eth9"), "launcher_address": ("10.1.1.1", "10.1.1.1"),
                "ssh_port": ("2200", 2200), "ssh_identity_file": ("/k", "/k"),
                "export": ("A, B", ["A", "B"]), "timeout": ("9", 9.0),
                "grace_period": ("7", 7.0), "output_dir": ("/o", "/o"), "verbose": ("1", True)}
    assert set(from_env) == {a.dest for a in options}
    for dest, (text, _) in from_env.items():
        monkeypatch.setenv(ENV_PREFIX + dest.upper(), text)
    args = build_parser().parse_args([])
    for action in options:
        assert getattr(args, action.dest) == from_env[action.dest][1] != action.default, action.dest


LAUNCHER_DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "docs", "launcher.md")


def _doc():
    with open(LAUNCHER_DOC, encoding="utf-8") as handle:
        return handle.read()


def test_the_launcher_doc_lists_every_option_with_its_variable():
    rows = {}  # flags of a row of the options table -> its environment column
    for line in _doc().splitlines():
        if line.startswith("| `-"):
            cells = re.split(r"(?<!\\)\|", line)  # `a\|b` is a pipe inside a cell
            rows[frozenset(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", cells[1]))] = cells[3]
    options = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    assert set().union(*rows) == {flag for a in options for flag in a.option_strings}
    for action in options:
        environment = rows[frozenset(action.option_strings)]
        assert all(f"`{name}" in environment for name in action.env), (action.env, environment)


def test_every_launcher_command_in_the_docs_is_valid(monkeypatch):
    monkeypatch.delenv("HOROVOD_CYCLE_TIME", raising=False)
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", _doc(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" #")[0])
            if "syncbn-launch" in words and "[" not in line:  # the synopsis has [options]
                commands.append(words[words.index("syncbn-launch") + 1:])
    assert len(commands) >= 3, commands
    for words in commands:
        config = LaunchConfig.from_args(build_parser().parse_args(words))
        assert config.command[0] == "python", words


def test_listed_hosts_run_local_names_here_and_others_over_ssh():
    from launch.placement import listed_site, make_placement

    config = LaunchConfig(num_proc=3, command=("python", "t.py"), backend="mpi", ssh_port=2200,
                          hosts=(Host("localhost", 1), Host("node2", 2), Host("node3", 2)),
                          export=("MY_FLAG",))
    site = listed_site(config, route_to=lambda host: ("eth1", "10.0.0.5"))
    assert [h.name for h in site.hosts] == ["localhost", "node2"]  # node3 gets no rank
    assert isinstance(site.runners["localhost"], LocalRunner)
    assert (site.runners["node2"].port, site.runners["node2"].exported) == (2200, ("MY_FLAG",))
    assert site.addresses == {"localhost": "10.0.0.5", "node2": "node2"}
    assert (site.iface, site.launcher_address) == ("eth1", "10.0.0.5")
    placement = make_placement(config, site, cwd="/w", job_dir="/j",
                               gpu_ids=lambda config, site: ("0",))
    assert [s.hostname for s in placement.slots] == ["localhost", "node2", "node2"]
    assert (placement.job_dir, placement.gpu_ids, placement.command) == (
        "/j", ("0",), ["python", "t.py"])
    # node2's ranks cannot write where the launcher reads: no verdict from error files.
    assert not placement.error_files_readable
    local = LaunchConfig(num_proc=2, command=("x",), backend="mpi")
    assert make_placement(local, listed_site(local), cwd="/w",
                          gpu_ids=lambda config, site: ()).error_files_readable


def test_gpus_per_host_on_this_machine(tmp_path):
    assert gpus.local_gpu_ids({"CUDA_VISIBLE_DEVICES": "2,3"}) == ("2", "3")
    assert gpus.local_gpu_ids({"CUDA_VISIBLE_DEVICES": ""}) == ()
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: A100 (UUID: x)'\necho 'GPU 1: A100 (UUID: y)'\n")
    fake.chmod(0o755)
    assert gpus.local_gpu_ids({}, nvidia_smi=str(fake)) == ("0", "1")
    config = _config(["-np", "2", "--gpus-per-host", "2", "--backend", "mpi", "--", "x"])
    assert gpus.gpu_ids(config, site=None, environ={"CUDA_VISIBLE_DEVICES": "5"}) == ("0", "1")


class FakeRunner(HostRunner):
    """Runs a stand-in for the remote shell: prints `stdout`, exits with `code`."""

    is_local = False

    def __init__(self, stdout="", code=0, stderr=""):
        self.script = (f"import sys; sys.stdout.write({stdout!r}); sys.stderr.write({stderr!r}); "
                       f"sys.exit({code})")
        self.asked = 0

    def command(self, argv, added_env, cwd):
        self.asked += 1
        return [sys.executable, "-c", self.script], dict(os.environ)


TWO_GPUS = "GPU 0: A100 (UUID: GPU-a)\nGPU 1: A100 (UUID: GPU-b)\n"


def _site(runners, shared_machine=False):
    from launch.placement import Site

    return Site(hosts=[Host(name, 1) for name in runners], runners=runners, addresses={},
                launcher_address="10.0.0.1", iface="eth0", shared_machine=shared_machine)


def _auto(num_proc=2):
    return LaunchConfig(num_proc=num_proc, command=("x",), backend="mpi")


def test_gpus_per_host_auto_asks_every_remote_host():
    runners = {"node1": FakeRunner(TWO_GPUS), "node2": FakeRunner(TWO_GPUS)}
    # The launcher's own CUDA_VISIBLE_DEVICES (a login node's) has no say.
    assert gpus.gpu_ids(_auto(), _site(runners), environ={"CUDA_VISIBLE_DEVICES": "7"}) == (
        "0", "1")
    assert [r.asked for r in runners.values()] == [1, 1]


def test_gpus_per_host_auto_refuses_hosts_that_disagree():
    # node2 has no nvidia-smi: the probe prints nothing and exits 0, so it has 0 GPUs.
    runners = {"node1": FakeRunner(TWO_GPUS), "node2": FakeRunner("")}
    with pytest.raises(ValueError, match=r"same number of GPUs on every host.*node1: 2, "
                                         r"node2: 0.*Received: --gpus-per-host auto"):
        gpus.gpu_ids(_auto(), _site(runners))
    assert gpus.gpu_ids(_auto(), _site({"n1": FakeRunner(""), "n2": FakeRunner("")})) == ()


def test_gpus_per_host_auto_names_a_host_it_cannot_ask():
    runners = {"node1": FakeRunner(TWO_GPUS),
               "node9": FakeRunner(code=255,
                                   stderr="ssh: connect to host node9: Connection refused")}
    with pytest.raises(RuntimeError, match="cannot ask host 'node9'.*exited with 255: ssh: "
                                           "connect to host node9: Connection refused"):
        gpus.gpu_ids(_auto(), _site(runners))


def test_gpus_per_host_asks_nobody_when_it_need_not():
    unreachable = {"node1": FakeRunner(code=255), "node2": FakeRunner(code=255)}
    counted = LaunchConfig(num_proc=2, command=("x",), backend="mpi", gpus_per_host=3)
    assert gpus.gpu_ids(counted, _site(unreachable)) == ("0", "1", "2")
    # Simulated hosts (even over ssh) are this machine: its own answer.
    assert gpus.gpu_ids(_auto(), _site(unreachable, shared_machine=True),
                        environ={"CUDA_VISIBLE_DEVICES": "4,5"}) == ("4", "5")
    assert gpus.gpu_ids(_auto(), _site({"localhost": LocalRunner()}),
                        environ={"CUDA_VISIBLE_DEVICES": "1"}) == ("1",)
    assert [r.asked for r in unreachable.values()] == [0, 0]


def test_gpu_probe_runs_nvidia_smi_through_the_runner(tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\nprintf '{TWO_GPUS}'\n")
    fake.chmod(0o755)
    path = os.environ["PATH"]
    with_smi = LocalRunner(base_env={"PATH": f"{tmp_path}{os.pathsep}{path}"})
    assert gpus.count_host_gpus("here", with_smi) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "sh").symlink_to("/bin/sh")
    assert gpus.count_host_gpus("here", LocalRunner(base_env={"PATH": str(empty)})) == 0


def test_launcher_imports_neither_tensorflow_nor_horovod():
    code = ("import sys, launch.cli, launch.supervisor, launch.netns, launch.backends.mpi; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'horovod', 'keras')]; "
            "sys.exit(str(bad) if bad else 0)")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --- Horovod controller ----------------------------------------------------------------------

def test_horovod_controller_resolution():
    from launch.backends.horovod import resolve_controller

    def never():
        raise AssertionError("mpi_built() should not be asked")

    assert resolve_controller("gloo", mpirun="/usr/bin/mpirun", mpi_built=never) == "gloo"
    assert resolve_controller("auto", mpirun=None, mpi_built=never) == "gloo"
    assert resolve_controller("auto", mpirun="mpirun", mpi_built=lambda: False) == "gloo"
    assert resolve_controller("auto", mpirun="mpirun", mpi_built=lambda: True) == "mpi"
    assert resolve_controller("mpi", mpirun="mpirun", mpi_built=lambda: True) == "mpi"
    with pytest.raises(FileNotFoundError, match="needs Open MPI's `mpirun`"):
        resolve_controller("mpi", mpirun=None, mpi_built=lambda: True)
    with pytest.raises(RuntimeError, match="built without MPI"):
        resolve_controller("mpi", mpirun="mpirun", mpi_built=lambda: False)
    with pytest.raises(ValueError, match="Received: --horovod-controller='nccl'"):
        resolve_controller("nccl", mpirun="mpirun", mpi_built=lambda: True)


def test_horovod_mpi_built_asks_once_per_build(tmp_path, monkeypatch):
    from launch.backends import horovod as horovod_backend

    monkeypatch.setenv("SYNCBN_CACHE_DIR", str(tmp_path / "cache"))
    calls = tmp_path / "calls"
    probe = tmp_path / "python"
    probe.write_text(f'#!/bin/sh\necho call >> "{calls}"\necho 1\n')
    probe.chmod(0o755)
    assert horovod_backend.horovod_mpi_built(python=str(probe)) is True
    assert horovod_backend.horovod_mpi_built(python=str(probe)) is True
    assert calls.read_text().count("call") == 1  # the second answer came from the cache


def test_horovod_over_mpi_runs_mpirun_with_horovod_variables(monkeypatch):
    from launch.backends import horovod as horovod_backend

    monkeypatch.setattr(horovod_backend, "horovod_mpi_built", lambda: True)
    monkeypatch.delenv("HOROVOD_CYCLE_TIME", raising=False)
    placement = _placement()
    for cycle, expected in ((None, None), (0.5, "0.5")):
        config = LaunchConfig(num_proc=2, command=("x",), backend="horovod",
                              horovod_cycle_time=cycle)
        with horovod_backend.HorovodBackend(config) as backend:
            [spec] = backend.workers(placement)
        assert spec.label == "mpirun" and "-x" in spec.argv
        forwarded = {spec.argv[i + 1] for i, word in enumerate(spec.argv) if word == "-x"}
        assert {"HOROVOD_CONTROLLER", "HOROVOD_CPU_OPERATIONS"} <= forwarded
        assert (spec.env["HOROVOD_CONTROLLER"], spec.env["HOROVOD_CPU_OPERATIONS"]) == ("mpi", "mpi")
        # Horovod's own cycle unless asked: BN sums do not wait for it on MPI.
        assert spec.env.get("HOROVOD_CYCLE_TIME") == expected
        assert ("HOROVOD_CYCLE_TIME" in forwarded) == (expected is not None)


def test_tf_mpi_resolution():
    from launch.backends.tf import resolve_tf_mpi

    assert resolve_tf_mpi("auto", mpirun="mpirun", mpi4py=True) is True
    assert resolve_tf_mpi("auto", mpirun=None, mpi4py=True) is False
    assert resolve_tf_mpi("auto", mpirun="mpirun", mpi4py=False) is False
    assert resolve_tf_mpi("no", mpirun="mpirun", mpi4py=True) is False
    assert resolve_tf_mpi("yes", mpirun="mpirun", mpi4py=False) is True
    with pytest.raises(FileNotFoundError, match="needs Open MPI's `mpirun`"):
        resolve_tf_mpi("yes", mpirun=None, mpi4py=True)
    with pytest.raises(ValueError, match="Received: --tf-mpi='maybe'"):
        resolve_tf_mpi("maybe", mpirun="mpirun", mpi4py=True)


def test_tf_over_mpi_hands_the_worker_list_to_the_ranks():
    from launch.backends.tf import TfBackend

    placement = _placement(addresses={"localhost": "127.0.0.1"})
    with TfBackend(LaunchConfig(num_proc=2, command=("x",), backend="tf", tf_mpi="yes")) as backend:
        [spec] = backend.workers(placement)
    assert spec.label == "mpirun"
    workers = spec.env["SYNCBN_LAUNCH_TF_WORKERS"].split(",")
    assert len(workers) == 2 and all(w.startswith("127.0.0.1:") for w in workers)
    forwarded = {spec.argv[i + 1] for i, word in enumerate(spec.argv) if word == "-x"}
    assert "SYNCBN_LAUNCH_TF_WORKERS" in forwarded


# --- Slurm: the allocation as a host source, and --slurm -----------------------------------

def test_tasks_per_node_expands_slurms_compressed_forms():
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("4") == [4]
    assert parse_tasks_per_node("1,2(x2),3") == [1, 2, 2, 3]
    for bad in ("", "2(x)", "x3", "2(3)", "2(x3"):
        received = re.escape(f"Received: SLURM_TASKS_PER_NODE={bad!r}")
        with pytest.raises(ValueError, match=received):
            parse_tasks_per_node(bad)
    with pytest.raises(ValueError, match="names 2 nodes, but the allocation has 3"):
        allocation_hosts(["a", "b", "c"], "2(x2)")


def test_node_addresses_read_scontrols_one_line_records():
    text = ("NodeName=node0 Arch=x86_64 CoresPerSocket=1 NodeAddr=198.18.3.2 NodeHostName=node0\n"
            "NodeName=node1 Arch=x86_64 NodeHostName=node1 Version=22.05\n")
    assert node_addresses(text) == {"node0": "198.18.3.2", "node1": "node1"}


ALLOCATION = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node[0-1]",
              "SLURM_TASKS_PER_NODE": "2(x2)"}


def _allocation_site(num_proc, seen=None, own=("198.18.3.2",), environ=ALLOCATION, **options):
    """allocation_site with Slurm, routes and the nodes answered here; (site, calls)."""
    calls = []

    def scontrol(*args):
        calls.append(("scontrol", *args))
        if args[:2] == ("show", "hostnames"):
            return "node0\nnode1\n"
        return "".join(f"NodeName={name} NodeAddr=198.18.3.{2 + i} State=IDLE\n"
                       for i, name in enumerate(("node0", "node1")) if name in args[-1])

    def route_to(address):
        calls.append(("route", address))
        return "sbn0", "198.18.3.2"

    def probe(path, nodes):
        calls.append(("probe", path, tuple(nodes)))
        return set(nodes) if seen is None else set(seen)

    config = LaunchConfig(num_proc=num_proc, command=("python", "t.py"), backend="tf", **options)
    return allocation_site(config, job_dir="/j", environ=environ, scontrol=scontrol,
                           route_to=route_to, is_own_address=lambda a: a in own,
                           probe=probe), calls


def test_allocation_site_runs_ranks_as_job_steps_on_the_allocations_nodes():
    site, calls = _allocation_site(3)
    assert site.hosts == [Host("node0", 2), Host("node1", 2)]
    assert all(isinstance(site.runners[n], SrunRunner) and site.runners[n].node == n
               for n in ("node0", "node1"))
    assert site.addresses == {"node0": "198.18.3.2", "node1": "198.18.3.3"}
    # The launcher runs on node0: the route to node1 names the interface and its address.
    assert (site.iface, site.launcher_address) == ("sbn0", "198.18.3.2")
    assert ("scontrol", "show", "hostnames", "node[0-1]") in calls
    assert ("route", "198.18.3.3") in calls and ("probe", "/j", ("node0", "node1")) in calls
    placement = make_placement(LaunchConfig(num_proc=3, command=("x",), backend="tf"), site,
                               cwd="/w", job_dir="/j", gpu_ids=lambda config, site: ())
    assert [s.hostname for s in placement.slots] == ["node0", "node0", "node1"]
    assert placement.shared_job_dir and placement.error_files_readable


def test_allocation_site_reads_error_files_only_when_every_node_sees_the_job_directory():
    site, _ = _allocation_site(4, seen=["node0"])
    assert not site.shared_job_dir
    placement = make_placement(LaunchConfig(num_proc=4, command=("x",), backend="tf"), site,
                               cwd="/w", job_dir="/j", gpu_ids=lambda config, site: ())
    assert not placement.error_files_readable


def test_allocation_site_with_every_rank_on_the_launchers_node_and_given_addresses():
    site, calls = _allocation_site(2)  # both ranks fit on node0, this machine
    assert site.hosts == [Host("node0", 2)] and (site.iface, site.launcher_address) == (
        "lo", "127.0.0.1")
    assert not [call for call in calls if call[0] == "route"]
    site, calls = _allocation_site(4, network_interface="ib0", launcher_address="10.9.0.1")
    assert (site.iface, site.launcher_address) == ("ib0", "10.9.0.1")
    assert not [call for call in calls if call[0] == "route"]


def test_allocation_site_names_what_does_not_fit():
    with pytest.raises(ValueError, match="Received: -np=5"):
        _allocation_site(5)
    with pytest.raises(ValueError, match="`SLURM_JOB_NODELIST`.*Received: SLURM_JOB_ID='7'"):
        _allocation_site(2, environ={"SLURM_JOB_ID": "7"})
    with pytest.raises(ValueError, match="SLURM_TASKS_PER_NODE"):
        _allocation_site(2, environ={**ALLOCATION, "SLURM_TASKS_PER_NODE": "2"})


def test_srun_runner_starts_one_task_steps_with_the_whole_environment():
    runner = SrunRunner("node1", base_env={"PATH": "/venv/bin", "HOME": "/root"})
    argv, env = runner.command(["python", "t.py"], {"RANK": "1"}, "/w")
    assert argv[0] == "srun" and argv[-2:] == ["python", "t.py"]
    for option in ("--overlap", "--nodes=1", "--ntasks=1", "--nodelist=node1", "--mpi=none",
                   "--export=ALL", "--chdir=/w"):
        assert option in argv, argv
    assert env == {"PATH": "/venv/bin", "HOME": "/root", "RANK": "1"}
    assert not runner.is_local and runner.death_signal == signal.SIGTERM


@pytest.mark.parametrize("argv,message", [
    (["--slurm", "--", "x"], "`--slurm` needs `--simulate-hosts N`.*Received: --slurm without"),
    (["--slurm", "--simulate-hosts", "0", "--", "x"], "Received: --simulate-hosts=0"),
    (["--slurm", "--simulate-hosts", "2", "-np", "2", "--", "x"],
     "`-np` does not apply with `--slurm`.*Received: --slurm with -np"),
    (["--slurm", "--simulate-hosts", "2", "--ssh", "--", "x"], "Received: --slurm with --ssh"),
    (["--slurm", "--simulate-hosts", "2"], "No command given"),
])
def test_cli_slurm_validation_names_argument_and_value(argv, message):
    with pytest.raises(ValueError, match=message):
        _config(argv)


def test_cli_slurm_runs_one_command_without_ranks(monkeypatch):
    config = _config(["--simulate-hosts", "2", "--slurm", "--", "sbatch", "--wait", "job.sh"])
    assert config.slurm and config.num_proc is None and config.simulate_hosts == 2
    assert config.command == ("sbatch", "--wait", "job.sh")
    monkeypatch.setenv("SYNCBN_LAUNCH_SLURM", "1")
    assert _config(["--simulate-hosts", "2", "--", "srun", "hostname"]).slurm
