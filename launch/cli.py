"""Command line of `syncbn-launch` (also `python -m launch`).

    syncbn-launch -np 4 [-H host1:2,host2:2 | --simulate-hosts 2 [--ssh]]
                  [--backend horovod|mpi|tf] [--timeout SECONDS] [--output-dir DIR]
                  -- python train.py ARGS
    syncbn-launch --simulate-hosts 2 --slurm -- sbatch --wait job.sbatch

Inside a Slurm allocation (`SLURM_JOB_ID` set) and without `-H`, the hosts
and their slots are the allocation's, and every rank starts as a job step
of its own (`launch.hostexec.SrunRunner`).

Every option has an environment fallback, `SYNCBN_LAUNCH_<OPTION>`; the command
line wins over the environment, which wins over the built-in default.
"""

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys

from launch import hosts as hosts_lib
from launch.backends import BACKENDS, Placement, create_backend, default_backend
from launch.hostexec import LocalRunner, NetnsRunner, SrunRunner, SshRunner
from launch.supervisor import Supervisor

logger = logging.getLogger("launch")
ENV_PREFIX = "SYNCBN_LAUNCH_"


def _env(name, default=None):
    return os.environ.get(ENV_PREFIX + name, default)


def _float_or_none(value):
    return None if value in (None, "") else float(value)


def build_parser():
    """The argparse parser; defaults read the `SYNCBN_LAUNCH_*` variables."""
    parser = argparse.ArgumentParser(
        prog="syncbn-launch",
        description="Start N ranks of a distributed job, prefix their output with [rank], "
                    "and stop all of them as soon as one fails.",
        epilog="Example: syncbn-launch -np 4 --simulate-hosts 2 --backend horovod -- "
               "python train.py",
    )
    ranks = parser.add_argument_group("ranks and hosts")
    ranks.add_argument(
        "-np", "--num-proc", dest="num_proc", type=int,
        default=int(_env("NUM_PROC", "0")) or None,
        help="number of ranks (required, no default; env SYNCBN_LAUNCH_NUM_PROC)")
    where = ranks.add_mutually_exclusive_group()
    where.add_argument(
        "-H", "--hosts", default=_env("HOSTS"),
        help="hosts and slots, 'host1:2,host2:2'; local names (localhost, this host's "
             "name) run without ssh, others over ssh (default: localhost:NP; "
             "env SYNCBN_LAUNCH_HOSTS)")
    where.add_argument(
        "--simulate-hosts", type=int, default=int(_env("SIMULATE_HOSTS", "0")) or None,
        metavar="N",
        help="run the ranks on N simulated hosts: network namespaces on a bridge, "
             "root only (default: off; env SYNCBN_LAUNCH_SIMULATE_HOSTS)")
    ranks.add_argument(
        "--ssh", action="store_true", default=_env("SSH") == "1",
        help="with --simulate-hosts: start an sshd in every simulated host, with keys "
             "made for the job, and reach the hosts over ssh as -H reaches remote "
             "machines, instead of `ip netns exec` (default: off; env SYNCBN_LAUNCH_SSH=1)")
    ranks.add_argument(
        "--slurm", action="store_true", default=_env("SLURM") == "1",
        help="with --simulate-hosts: run a Slurm cluster on the simulated hosts (munged, "
             "slurmctld, a slurmd per host) and run the command once, here (the login "
             "node), with SLURM_CONF set; -np is not used (default: off; "
             "env SYNCBN_LAUNCH_SLURM=1)")
    ranks.add_argument(
        "--gpus-per-host", default=_env("GPUS_PER_HOST", "auto"),
        help="GPUs per host, one per local rank via CUDA_VISIBLE_DEVICES; 'auto' uses "
             "CUDA_VISIBLE_DEVICES if set, else `nvidia-smi -L`, else 0 (CPU: TF/OpenMP "
             "threads are divided among local ranks) (default: auto; "
             "env SYNCBN_LAUNCH_GPUS_PER_HOST)")
    ranks.add_argument(
        "--cpus-per-host", type=int, default=int(_env("CPUS_PER_HOST", "0")) or None,
        help="cores per host for dividing threads (default: cores usable by the launcher; "
             "env SYNCBN_LAUNCH_CPUS_PER_HOST)")

    backend = parser.add_argument_group("backend")
    backend.add_argument(
        "--backend", choices=BACKENDS, default=_env("BACKEND"),
        help="horovod (over MPI or Gloo, see --horovod-controller), tf (TF_CONFIG for "
             "MultiWorkerMirroredStrategy) or mpi "
             "(mpirun) (default: horovod if installed, else tf if TensorFlow is "
             "installed, else mpi; env SYNCBN_LAUNCH_BACKEND)")
    backend.add_argument(
        "--horovod-controller", choices=("auto", "mpi", "gloo"),
        default=_env("HOROVOD_CONTROLLER", "auto"),
        help="how Horovod ranks start and talk, as with horovodrun: mpi (mpirun; syncbn "
             "then sums BN statistics over MPI directly) or gloo (Horovod's rendezvous); "
             "auto: mpi if Horovod was built with MPI and mpirun is on PATH, else gloo "
             "(default: auto; env SYNCBN_LAUNCH_HOROVOD_CONTROLLER)")
    backend.add_argument(
        "--tf-mpi", choices=("auto", "yes", "no"), default=_env("TF_MPI", "auto"),
        help="start the tf backend's workers under mpirun (each still gets its TF_CONFIG), so "
             "that syncbn sums BN statistics over MPI beside the strategy; auto: yes when "
             "mpirun is on PATH and mpi4py is installed (default: auto; env SYNCBN_LAUNCH_TF_MPI)")
    backend.add_argument(
        "--horovod-cycle-time", type=float, metavar="MS",
        default=_float_or_none(_env("HOROVOD_CYCLE_TIME") or os.environ.get("HOROVOD_CYCLE_TIME")),
        help="HOROVOD_CYCLE_TIME for the ranks, in ms (default: HOROVOD_CYCLE_TIME if set; "
             "else 0.1 on Gloo, where sync BN's small sequential collectives each wait "
             "for a cycle, and Horovod's own 1 on MPI, where they do not and a shorter "
             "cycle only keeps Horovod's thread busy; env SYNCBN_LAUNCH_HOROVOD_CYCLE_TIME)")
    backend.add_argument(
        "--network-interface", default=_env("NETWORK_INTERFACE"), metavar="IFACE",
        help="interface the ranks talk over (Gloo iface, mpirun btl/oob); needed only "
             "with remote hosts (default: lo on one machine, sbn0 with --simulate-hosts, "
             "else the interface of the route to the first remote host; "
             "env SYNCBN_LAUNCH_NETWORK_INTERFACE)")
    backend.add_argument(
        "--launcher-address", default=_env("LAUNCHER_ADDRESS"),
        help="address remote ranks reach the launcher at (Horovod rendezvous) (default: "
             "source address of the route to the first remote host; "
             "env SYNCBN_LAUNCH_LAUNCHER_ADDRESS)")

    remote = parser.add_argument_group("remote hosts (ssh)")
    remote.add_argument("--ssh-port", type=int, default=_env("SSH_PORT"),
                        help="ssh port (default: ssh's own; env SYNCBN_LAUNCH_SSH_PORT)")
    remote.add_argument("--ssh-identity-file", default=_env("SSH_IDENTITY_FILE"),
                        help="ssh -i file (default: none; env SYNCBN_LAUNCH_SSH_IDENTITY_FILE)")
    remote.add_argument(
        "-x", "--export", action="append",
        default=[n for n in _env("EXPORT", "").split(",") if n],
        metavar="NAME",
        help="also forward this launcher variable to remote ranks; repeatable "
             "(default: none; env SYNCBN_LAUNCH_EXPORT, comma-separated)")

    control = parser.add_argument_group("supervision and output")
    control.add_argument(
        "--timeout", type=float, default=float(_env("TIMEOUT", "0")) or None,
        metavar="SECONDS",
        help="end the job after this many seconds with exit code 124 (default: none; "
             "env SYNCBN_LAUNCH_TIMEOUT)")
    control.add_argument(
        "--grace-period", type=float, default=float(_env("GRACE_PERIOD", "3")),
        metavar="SECONDS",
        help="seconds between SIGTERM and SIGKILL when stopping ranks (default: 3; "
             "env SYNCBN_LAUNCH_GRACE_PERIOD)")
    control.add_argument(
        "--output-dir", default=_env("OUTPUT_DIR"), metavar="DIR",
        help="also write each rank's output to DIR/rank.N.log (default: none; "
             "env SYNCBN_LAUNCH_OUTPUT_DIR)")
    control.add_argument(
        "-v", "--verbose", action="store_true", default=_env("VERBOSE") == "1",
        help="log the commands started (default: off; env SYNCBN_LAUNCH_VERBOSE=1)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the program to run, after `--`")
    return parser


def validate(args):
    """Checks the parsed arguments; raises ValueError/TypeError naming the argument."""
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        raise ValueError("No command given. Received: nothing after `--`; "
                         "usage: syncbn-launch -np 2 -- python train.py")
    if args.slurm:
        if args.simulate_hosts is None:
            raise ValueError(
                "Argument `--slurm` needs `--simulate-hosts N` (inside a real allocation, "
                "syncbn-launch finds its hosts by itself). Received: --slurm without "
                "--simulate-hosts")
        if args.simulate_hosts < 1:
            raise ValueError(f"Argument `--simulate-hosts` must be >= 1. "
                             f"Received: --simulate-hosts={args.simulate_hosts}")
        return args
    if args.num_proc is None:
        raise ValueError("Argument `-np` is required. Received: none")
    if args.num_proc < 1:
        raise ValueError(f"Argument `-np` must be >= 1. Received: -np={args.num_proc}")
    if args.timeout is not None and args.timeout <= 0:
        raise ValueError(f"Argument `--timeout` must be > 0. Received: --timeout={args.timeout}")
    if args.grace_period < 0:
        raise ValueError(
            f"Argument `--grace-period` must be >= 0. Received: --grace-period={args.grace_period}")
    if args.simulate_hosts is not None:
        hosts_lib.simulated_hosts_spec(args.num_proc, args.simulate_hosts)
    if args.ssh and args.simulate_hosts is None:
        raise ValueError(
            "Argument `--ssh` needs `--simulate-hosts N` (remote hosts given with `-H` are "
            "always reached over ssh). Received: --ssh without --simulate-hosts")
    if args.hosts is not None:
        hosts_lib.validate_num_proc(args.num_proc, hosts_lib.parse_hosts(args.hosts))
    if args.cpus_per_host is not None and args.cpus_per_host < 1:
        raise ValueError(
            f"Argument `--cpus-per-host` must be >= 1. Received: {args.cpus_per_host}")
    parse_gpus_per_host(args.gpus_per_host, os.environ)
    return args


def parse_gpus_per_host(value, environ, nvidia_smi=None):
    """Returns the GPU ids of one host, e.g. ('0', '1'), for `--gpus-per-host VALUE`.

    'auto': `CUDA_VISIBLE_DEVICES` of the launcher if set, else `nvidia-smi -L`, else ().
    """
    if value == "auto":
        visible = environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            return tuple(g for g in visible.split(",") if g.strip() and g.strip() != "-1")
        return tuple(str(i) for i in range(_count_nvidia_gpus(nvidia_smi)))
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"Argument `--gpus-per-host` must be 'auto' or an integer >= 0. Received: {value!r}"
        ) from None
    if count < 0:
        raise ValueError(f"Argument `--gpus-per-host` must be >= 0. Received: {count}")
    return tuple(str(i) for i in range(count))


def _count_nvidia_gpus(nvidia_smi=None):
    nvidia_smi = nvidia_smi or shutil.which("nvidia-smi")
    if not nvidia_smi:
        return 0
    try:
        out = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def _route_to(host):
    """(interface, source address) of this machine's route to `host`."""
    address = socket.gethostbyname(host)
    words = subprocess.run(["ip", "-o", "route", "get", address], capture_output=True,
                           text=True, check=True).stdout.split()
    return words[words.index("dev") + 1], words[words.index("src") + 1]


def make_placement(args, network, cwd, ssh_servers=None):
    """Decides hosts, runners and addresses for the job.

    Args:
        args: the validated arguments.
        network: the `launch.netns.SimulatedNetwork` of `--simulate-hosts`, or None.
        cwd: the ranks' working directory.
        ssh_servers: the `launch.netns_ssh.SimulatedSsh` of `--ssh`, or None.
    """
    cpus = args.cpus_per_host or len(os.sched_getaffinity(0))
    gpu_ids = parse_gpus_per_host(args.gpus_per_host, os.environ)
    if network is not None:
        counts = hosts_lib.simulated_hosts_spec(args.num_proc, args.simulate_hosts)
        host_list = [hosts_lib.Host(h.address, n) for h, n in zip(network.hosts, counts)]
        slots = hosts_lib.assign_ranks(host_list, args.num_proc)
        if ssh_servers is not None:
            runners = {h.address: ssh_servers.runner(h.address, exported=args.export)
                       for h in network.hosts}
        else:
            runners = {h.address: NetnsRunner(h.namespace) for h in network.hosts}
        return Placement(
            slots=slots, hosts=host_list, runners=runners,
            addresses={h.address: h.address for h in network.hosts},
            launcher_address=network.gateway, iface="sbn0", command=args.command, cwd=cwd,
            cpus=cpus, gpu_ids=gpu_ids, shared_machine=True, network=network,
            exported=tuple(args.export))
    if args.hosts is None and os.environ.get("SLURM_JOB_ID"):
        return allocation_placement(args, cwd, cpus, gpu_ids, os.environ)
    host_list = hosts_lib.parse_hosts(args.hosts or f"localhost:{args.num_proc}")
    slots = hosts_lib.assign_ranks(host_list, args.num_proc)
    used = {slot.hostname for slot in slots}
    host_list = [h for h in host_list if h.name in used]
    remote = [h.name for h in host_list if not hosts_lib.is_local_host(h.name)]
    if remote:
        iface, source = (None, None)
        if not (args.network_interface and args.launcher_address):
            iface, source = _route_to(remote[0])
        iface = args.network_interface or iface
        launcher_address = args.launcher_address or source
        addresses = {h.name: (launcher_address if hosts_lib.is_local_host(h.name) else h.name)
                     for h in host_list}
    else:
        iface = args.network_interface or "lo"
        launcher_address = args.launcher_address or "127.0.0.1"
        addresses = {h.name: "127.0.0.1" for h in host_list}
    runners = {
        h.name: LocalRunner() if hosts_lib.is_local_host(h.name) else SshRunner(
            h.name, port=args.ssh_port, identity_file=args.ssh_identity_file,
            exported=args.export)
        for h in host_list
    }
    return Placement(slots=slots, hosts=host_list, runners=runners, addresses=addresses,
                     launcher_address=launcher_address, iface=iface, command=args.command,
                     cwd=cwd, cpus=cpus, gpu_ids=gpu_ids, exported=tuple(args.export))


def _scontrol(*args):
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True,
                          timeout=60).stdout


def node_addresses(text):
    """`{NodeName: NodeAddr}` from `scontrol show node -o` output. Pure.

    Example:
        >>> node_addresses("NodeName=n1 Arch=x86_64 NodeAddr=10.0.0.5 NodeHostName=n1\\n")
        {'n1': '10.0.0.5'}
    """
    found = {}
    for line in text.splitlines():
        fields = dict(word.split("=", 1) for word in line.split() if "=" in word)
        if "NodeName" in fields:
            found[fields["NodeName"]] = fields.get("NodeAddr", fields["NodeName"])
    return found


def _local_route(address):
    """True if `address` is this machine's own (in this network namespace)."""
    words = subprocess.run(["ip", "-o", "route", "get", address], capture_output=True,
                           text=True, check=True).stdout.split()
    return bool(words) and words[0] == "local"


def allocation_placement(args, cwd, cpus, gpu_ids, environ):
    """The placement inside a Slurm allocation: its nodes and task counts, ranks as steps.

    Slurm's own `scontrol show hostnames` expands `SLURM_JOB_NODELIST`, and
    `NodeAddr` (`scontrol show node`) gives the address other nodes reach
    each node at (on most clusters, its name).
    """
    names = _scontrol("show", "hostnames", environ["SLURM_JOB_NODELIST"]).split()
    host_list = hosts_lib.allocation_hosts(names, environ.get("SLURM_TASKS_PER_NODE", ""))
    slots = hosts_lib.assign_ranks(host_list, args.num_proc)
    used = {slot.hostname for slot in slots}
    host_list = [h for h in host_list if h.name in used]
    addresses = node_addresses(_scontrol("show", "node", "-o", ",".join(h.name for h in host_list)))
    addresses = {h.name: addresses.get(h.name, h.name) for h in host_list}
    elsewhere = [a for a in addresses.values() if not _local_route(a)]
    if elsewhere:
        iface, source = _route_to(elsewhere[0])
    else:  # every rank runs on this node
        iface, source = "lo", "127.0.0.1"
    return Placement(
        slots=slots, hosts=host_list, runners={h.name: SrunRunner(h.name) for h in host_list},
        addresses=addresses, launcher_address=args.launcher_address or source,
        iface=args.network_interface or iface, command=args.command, cwd=cwd, cpus=cpus,
        gpu_ids=gpu_ids, exported=tuple(args.export))


def run_login_command(args):
    """`--simulate-hosts N --slurm`: the command, once, beside a simulated Slurm cluster."""
    from launch.netns import SimulatedNetwork
    from launch.slurm import SimulatedSlurm
    from launch.supervisor import WorkerSpec

    with SimulatedNetwork(args.simulate_hosts) as network, SimulatedSlurm(network) as cluster:
        spec = WorkerSpec(label="login", argv=list(args.command),
                          env={**os.environ, **cluster.env()}, cwd=os.getcwd(),
                          death_signal=signal.SIGTERM)
        return Supervisor([spec], output_dir=args.output_dir, grace_period=args.grace_period,
                          timeout=args.timeout).run()


def run(args):
    """Runs a validated job; returns the exit code."""
    if os.geteuid() == 0:
        # Open MPI refuses root without both (Gloo and TF do not care).
        os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    if args.slurm:
        return run_login_command(args)
    backend_name = args.backend or default_backend()
    backend = create_backend(backend_name, args)
    network = None
    ssh_servers = None
    try:
        if args.simulate_hosts:
            from launch.netns import SimulatedNetwork

            network = SimulatedNetwork(args.simulate_hosts).__enter__()
            if args.ssh:
                from launch.netns_ssh import SimulatedSsh

                ssh_servers = SimulatedSsh(network).__enter__()
        placement = make_placement(args, network, os.getcwd(), ssh_servers)
        specs = backend.workers(placement)
        logger.info("backend %s: %d ranks on %s", backend_name, args.num_proc,
                    ",".join(f"{h.name}:{h.slots}" for h in placement.hosts))
        for spec in specs:
            logger.debug("%s: %s", spec.label, " ".join(spec.argv))
        supervisor = Supervisor(specs, output_dir=args.output_dir,
                                grace_period=args.grace_period, timeout=args.timeout)
        return supervisor.run()
    finally:
        backend.close()
        if ssh_servers is not None:
            ssh_servers.close()
        if network is not None:
            network.close()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv=None):
    """Entry point of `syncbn-launch`; returns the exit code."""
    # Until the supervisor installs its own handlers, SIGTERM/SIGHUP unwind like
    # Ctrl-C, so simulated hosts and servers set up so far are still torn down.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="[launcher] %(levelname)s %(message)s", stream=sys.stderr)
    try:
        validate(args)
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    try:
        return run(args)
    except KeyboardInterrupt as interrupt:
        logger.error("interrupted (%s) before the ranks started", interrupt or "SIGINT")
        return 130
    except (ValueError, TypeError, RuntimeError, OSError) as error:
        logger.error("%s", error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
