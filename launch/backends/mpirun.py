"""One `mpirun` that the supervisor treats as a single worker: the `mpi` backend, and the
`horovod` (over MPI) and `tf` (`--tf-mpi`) backends, through `mpirun_worker`.

Each rank passes through `python -m launch.mpi_rank -- CMD`, which sets the same
`RANK`/`LOCAL_RANK`/threads/GPU variables as the other backends (from
`OMPI_COMM_WORLD_*`), prefixes the rank's output lines with `[rank]`, and execs
CMD (so the rank is still mpirun's own child and its exit status is exact).

With `--simulate-hosts`, mpirun starts its remote daemons through
`launch.netns_rsh` (`--mca plm_rsh_agent`), which runs them inside the namespace
of the host address it is given; TCP traffic is pinned to the simulated subnet.
With `--simulate-hosts --ssh`, and for remote hosts given with `-H`, mpirun
starts them over ssh with the options of the hosts' `SshRunner` (port, key,
configuration file) in `--mca plm_rsh_args`.

Which rank failed first comes from the ranks' error files (`launch.failures`);
for programs that write none, `describe_mpirun_failure` reads it from mpirun's
output, the fallback.

Note: an mpi4py rank that exits non-zero through `sys.exit` first waits in
`MPI_Finalize` for the other ranks. For fail-fast jobs run the script as
`python -m mpi4py script.py` (which calls `MPI_Abort` on errors) or call
`MPI.COMM_WORLD.Abort(code)`.
"""

import os
import re
import shlex
import shutil
import signal
import stat
import sys

from launch.hostexec import LocalRunner, NetnsRunner, SshRunner, forwarded_names
from launch.supervisor import WorkerSpec

_PROCESS_NAME = re.compile(r"Process name:\s*\[\[\d+,\d+\],(\d+)\]")
_EXIT_CODE = re.compile(r"Exit code:\s*(-?\d+)")
_SIGNALLED = re.compile(r"process rank (\d+) with PID \d+ on node \S+ exited on signal (\d+)")
_ORDERED_ABORT = re.compile(r"has exited due to process rank (\d+) with PID \d+ on\s+"
                            r"node \S+ calling \"abort\"")
# Open MPI's MPI_ABORT notice: printed by mpirun, or by the aborting rank itself (then
# every line carries its "[rank] " prefix, and another rank's line may come between
# the two). The communicator's name may have spaces ("MPI COMMUNICATOR 3 DUP FROM 0").
_ABORTED = re.compile(r"^(?:\[\d+\] )?MPI_ABORT was invoked on rank (\d+) in communicator "
                      r"([^\n]*?) *$", re.M)
_ABORT_CODE = re.compile(r"^(?:\[\d+\] )?with errorcode (-?\d+)\.", re.M)
# Communicators whose ranks are COMM_WORLD's (cid 0); a split one numbers its own.
_WORLD_COMMUNICATOR = re.compile(r"^(?:MPI_COMM_WORLD|MPI COMMUNICATOR \d+ DUP FROM 0)$")
# syncbn's collective timeout, as syncbn/collectives/mpi.py and mpi_all_sum.cc print
# it before they call MPI_Abort(SYNCBN_TIMEOUT_EXIT_CODE); group 1 is the collective.
_TIMEOUT_MESSAGE = r"syncbn: MPI all-reduce '([^']*)' waited more than"
# The rank's own account, prefixed with "[rank] " by launch.mpi_rank: a traceback, or
# syncbn's collective timeout.
_RANK_FAILURE = re.compile(r"^\[(\d+)\] (?:Traceback \(most recent call last\):|"
                           + _TIMEOUT_MESSAGE + ")", re.M)
SYNCBN_TIMEOUT_EXIT_CODE = 124
# The second line of the MPI_ABORT notice, carrying the exit code, and syncbn's
# timeout line: the job has failed even if mpirun never exits (fatal_code).
ABORT_LINE = re.compile(rb"^(?:\[\d+\] )?with errorcode (?P<code>-?\d+)\.")
_TIMEOUT_LINE = re.compile(rb"^\[\d+\] " + _TIMEOUT_MESSAGE.encode())
# Lines describe_mpirun_failure reads; the supervisor keeps them even when they scroll
# out of its tail (a rank's timeout line can be followed by long tracebacks).
VERDICT_LINE = re.compile(rb"MPI_ABORT was invoked|with errorcode|Process name:|Exit code:|"
                          rb"exited on signal|has exited due to process rank|node \S+ calling|"
                          rb"^\[\d+\] (?:Traceback \(most recent call last\):|"
                          + _TIMEOUT_MESSAGE.encode() + rb")")


def mpirun_fatal_code(line):
    """The exit code a line of mpirun's output announces for the whole job, or None.

    After MPI_Abort, mpirun can wait forever for the daemon of a host it can no
    longer reach (issue #11, a cut network), so the supervisor stops it shortly
    after such a line. Open MPI 4.1 sometimes loses its own MPI_ABORT notice
    (mpirun logs `ORTE_ERROR_LOG: Data unpack would read past end of buffer in file
    ../../../orte/util/show_help.c`, open-mpi/ompi#8356), so syncbn's timeout line,
    which the rank prints just before `MPI_Abort(124)`, counts too.

    Example:
        >>> mpirun_fatal_code(b"with errorcode 1.\\n"), mpirun_fatal_code(b"[1] step done\\n")
        (1, None)
    """
    aborted = ABORT_LINE.search(line)
    if aborted:
        return int(aborted.group("code"))
    if _TIMEOUT_LINE.search(line):
        return SYNCBN_TIMEOUT_EXIT_CODE
    return None


def mpirun_command(placement, *, mpirun="mpirun", rsh_agent=None, is_root=False,
                   python=sys.executable, job_env_names=()):
    """The mpirun argv for `placement`. Pure.

    Example:
        >>> from launch.hosts import Host, assign_ranks
        >>> from launch.placement import Placement
        >>> hosts = [Host("localhost", 2)]
        >>> p = Placement(assign_ranks(hosts, 2), hosts, {}, {}, "127.0.0.1", "lo",
        ...               ["python", "t.py"], "/w", cpus=2)
        >>> " ".join(mpirun_command(p, python="py"))  # doctest: +NORMALIZE_WHITESPACE +ELLIPSIS
        'mpirun -np 2 --host localhost:2 --map-by slot --bind-to none --oversubscribe
         --mca rtc_hwloc_vmhole none -x SYNCBN_LAUNCH_PID=... -x SYNCBN_LAUNCH_CPUS=2 -x SYNCBN_LAUNCH_GPU_IDS= -x SYNCBN_LAUNCH_SHARED_MACHINE=0
         -x SYNCBN_LAUNCH_ERROR_DIR=
         py -m launch.mpi_rank -- python t.py'
    """
    hosts = ",".join(f"{host.name}:{host.slots}" for host in placement.hosts)
    argv = [mpirun, "-np", str(len(placement.slots)), "--host", hosts,
            "--map-by", "slot", "--bind-to", "none", "--oversubscribe",
            # Open MPI 4.1's daemons share the hwloc topology through a shared-memory
            # segment mapped at a guessed address hole; under load that segfaults
            # orted (hwloc_shmem_topology_write). The topology is cheap to rediscover.
            "--mca", "rtc_hwloc_vmhole", "none"]
    if is_root:
        argv.append("--allow-run-as-root")
    ssh_runners = [r for r in placement.runners.values() if isinstance(r, SshRunner)]
    if ssh_runners:
        # mpirun runs `ssh [plm_rsh_args] HOST orted ...`; the hosts share one set of options.
        argv += ["--mca", "plm_rsh_agent", "ssh",
                 "--mca", "plm_rsh_args", shlex.join(ssh_runners[0].ssh_options())]
    if placement.network is not None:
        subnet = str(placement.network.subnet)
        if not ssh_runners:
            argv += ["--mca", "plm_rsh_agent", rsh_agent]
        argv += ["--mca", "btl", "self,tcp",
                 "--mca", "btl_tcp_if_include", subnet,
                 "--mca", "oob_tcp_if_include", subnet]
    elif placement.iface and placement.iface != "lo":
        argv += ["--mca", "btl_tcp_if_include", placement.iface,
                 "--mca", "oob_tcp_if_include", placement.iface]
    job_vars = {
        # Lets launch.mpi_rank stop the rank if the launcher dies and mpirun does not
        # act on its SIGTERM (it can miss one that arrives while it is starting the job).
        # Only meaningful where the ranks share the launcher's PID namespace.
        "SYNCBN_LAUNCH_PID": str(os.getpid()) if _all_hosts_on_this_machine(placement) else "",
        "SYNCBN_LAUNCH_CPUS": str(placement.cpus),
        "SYNCBN_LAUNCH_GPU_IDS": ",".join(str(g) for g in placement.gpu_ids),
        "SYNCBN_LAUNCH_SHARED_MACHINE": "1" if placement.shared_machine else "0",
        "SYNCBN_LAUNCH_ERROR_DIR": placement.job_dir or "",
    }
    for name, value in job_vars.items():
        argv += ["-x", f"{name}={value}"]
    for name in job_env_names:
        argv += ["-x", name]
    return argv + [python, "-m", "launch.mpi_rank", "--", *placement.command]


def _all_hosts_on_this_machine(placement):
    return placement.shared_machine or all(
        isinstance(runner, (LocalRunner, NetnsRunner)) for runner in placement.runners.values())


def describe_mpirun_failure(lines, exit_code):
    """Names the rank that failed first, from mpirun's output (its closing message or the
    ranks' own lines). Pure.

    In order of authority: Open MPI's MPI_ABORT notice; mpirun's closing message (a
    rank's exit code or signal, or its call to abort); else the rank whose own output
    first reported a failure, a Python traceback or syncbn's collective timeout. That
    last one matters: mpirun's notice can be missing (its show_help relay fails under
    load, open-mpi/ompi#8356), while the rank's lines went out before it aborted.

    Args:
        lines: mpirun's output lines (bytes), in the order they came.
        exit_code: mpirun's exit code.

    Returns:
        The verdict, or None if the output names no rank.

    Example:
        >>> describe_mpirun_failure([b"[0] syncbn: MPI all-reduce 'bn/forward' waited more "
        ...                          b"than 20 s\\n"], 124)  # doctest: +ELLIPSIS
        "rank 0 failed first: its MPI all-reduce 'bn/forward' timed out and it called MPI_Abort; ..."
    """
    text = b"".join(lines).decode(errors="replace")
    own = _RANK_FAILURE.search(text)
    aborted = _ABORTED.search(text)
    if aborted:
        rank, communicator = aborted.group(1), aborted.group(2)
        code = _ABORT_CODE.search(text, aborted.end())
        code = code.group(1) if code else str(exit_code)
        if _WORLD_COMMUNICATOR.match(communicator) or own is None:
            where = "" if _WORLD_COMMUNICATOR.match(communicator) else (
                f" (rank {rank} of communicator {communicator})")
            return (f"rank {rank} failed first: it called MPI_Abort with error code {code} "
                    f"(mpirun){where}")
        # A split communicator numbers its own ranks: the rank's own lines say which it is.
        return (f"rank {own.group(1)} failed first: it called MPI_Abort with error code "
                f"{code} (mpirun: rank {rank} of communicator {communicator})")
    name, code = _PROCESS_NAME.search(text), _EXIT_CODE.search(text)
    if name and code:
        return f"rank {name.group(1)} failed first with exit code {code.group(1)} (mpirun)"
    signalled = _SIGNALLED.search(text)
    if signalled:
        signame = signal.Signals(int(signalled.group(2))).name
        return f"rank {signalled.group(1)} failed first with signal {signame} (mpirun)"
    ordered = _ORDERED_ABORT.search(text)
    if ordered:
        return (f"rank {ordered.group(1)} failed first: it called abort (mpirun); "
                f"mpirun exited with {exit_code}")
    if own is None:
        return None
    if own.group(2) is not None:
        return (f"rank {own.group(1)} failed first: its MPI all-reduce '{own.group(2)}' timed "
                f"out and it called MPI_Abort; mpirun exited with {exit_code} (mpirun's "
                "MPI_ABORT notice is missing)")
    return (f"rank {own.group(1)} failed first (its traceback came first); "
            f"mpirun exited with {exit_code}")


def _write_rsh_agent(job_dir):
    # mpirun wants a program path for plm_rsh_agent: a two-line script of ours.
    if job_dir is None:
        raise ValueError("mpirun on simulated hosts needs the job's directory for its rsh "
                         "agent. Received: placement.job_dir=None")
    path = os.path.join(job_dir, "netns-rsh")
    with open(path, "w") as script:
        script.write(f"#!/bin/sh\nexec {sys.executable} -m launch.netns_rsh \"$@\"\n")
    os.chmod(path, stat.S_IRWXU)
    return path


def mpirun_worker(placement, extra_env=None):
    """The `WorkerSpec` of one mpirun that runs every rank of `placement`.

    Args:
        placement: the job's `launch.placement.Placement`.
        extra_env: variables added to every rank's environment (and forwarded).
    """
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise FileNotFoundError("this backend needs Open MPI's `mpirun` on PATH")
    extra_env = dict(extra_env or {})
    env = {**os.environ, **extra_env, "PYTHONUNBUFFERED": "1"}
    rsh_agent = None
    over_ssh = any(isinstance(r, SshRunner) for r in placement.runners.values())
    if placement.network is not None and not over_ssh:
        rsh_agent = _write_rsh_agent(placement.job_dir)
        env["SYNCBN_LAUNCH_NETNS_MAP"] = ",".join(
            f"{h.address}={h.namespace}" for h in placement.network.hosts)
        # launch.netns_rsh must be importable in the daemons' namespaces too.
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    names = forwarded_names(env, (*extra_env, *placement.exported))
    argv = mpirun_command(placement, mpirun=mpirun, rsh_agent=rsh_agent,
                          is_root=os.geteuid() == 0, job_env_names=names)
    return WorkerSpec(
        label="mpirun",
        argv=argv,
        env=env,
        cwd=placement.cwd,
        # mpirun tears its job down (remote daemons included) on SIGTERM, so it
        # gets SIGTERM both when we stop it and when the launcher dies.
        stop_signal=signal.SIGTERM,
        death_signal=signal.SIGTERM,
        demux_ranks=True,
        describe_failure=describe_mpirun_failure,
        fatal_code=mpirun_fatal_code,
        keep_line=VERDICT_LINE,
    )
