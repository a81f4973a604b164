"""Where the ranks run and how they are reached: the `Placement` every backend takes.

It is decided once per job from a `LaunchConfig`, in two steps:

1. A host source gives a `Site`: the hosts, a `launch.hostexec.HostRunner` per
   host, the addresses hosts reach each other and the launcher at, and the
   interface. `simulated_site` serves `--simulate-hosts`, `allocation_site` a
   Slurm allocation (ranks as job steps), `listed_site` `-H` (or this machine
   alone).
2. `make_placement(config, site, ...)` puts the ranks in the hosts' slots
   (`launch.hosts.assign_ranks`) and counts the cores and GPUs of a host.
"""

import dataclasses
import logging
import os
import socket
import subprocess
from typing import Optional

from launch import hosts as hosts_lib
from launch.hostexec import LocalRunner, NetnsRunner, SrunRunner, SshRunner, srun_step

logger = logging.getLogger("launch")
SLURM_TIMEOUT_SECONDS = 60.0


@dataclasses.dataclass(frozen=True)
class Site:
    """What a host source says: hosts, runners, addresses, interface.

    Attributes:
        hosts: the `launch.hosts.Host`s, in rank order.
        runners: hostname -> `launch.hostexec.HostRunner`.
        addresses: hostname -> address other hosts reach it at.
        launcher_address: address the ranks reach the launcher at.
        iface: network interface the ranks use, or None if unknown.
        shared_machine: True if every host is this machine (simulated hosts).
        network: the `launch.netns.SimulatedNetwork`, or None.
        shared_job_dir: True if every host sees the launcher's job directory.
    """

    hosts: list
    runners: dict
    addresses: dict
    launcher_address: str
    iface: Optional[str]
    shared_machine: bool = False
    network: object = None
    shared_job_dir: bool = False


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the ranks run and how they reach each other; built by `make_placement`.

    Attributes:
        slots: one `launch.hosts.Slot` per rank, indexed by rank.
        hosts: the `launch.hosts.Host`s that got ranks.
        runners: hostname -> `launch.hostexec.HostRunner`.
        addresses: hostname -> address other hosts reach it at.
        launcher_address: address the ranks reach the launcher at.
        iface: network interface the ranks use, or None if unknown.
        command: the user's command (argv list).
        cwd: working directory of the ranks.
        cpus: cores per machine; gpu_ids: GPU ids per machine.
        shared_machine: True for `--simulate-hosts` (all hosts share this machine).
        network: the `launch.netns.SimulatedNetwork`, or None.
        exported: extra launcher variables to forward to remote hosts (`-x`).
        job_dir: the launcher's private directory for the job (the ranks' error
            files, mpirun's rsh agent), or None.
        shared_job_dir: True if every host sees `job_dir` (a file system shared
            with the launcher's machine).
    """

    slots: list
    hosts: list
    runners: dict
    addresses: dict
    launcher_address: str
    iface: Optional[str]
    command: list
    cwd: str
    cpus: int
    gpu_ids: tuple = ()
    shared_machine: bool = False
    network: object = None
    exported: tuple = ()
    job_dir: Optional[str] = None
    shared_job_dir: bool = False

    @property
    def error_files_readable(self):
        """True if every rank's error file lands where the launcher reads it: every host
        is this machine (simulated hosts too), or sees the job directory. Ranks on other
        machines write none."""
        return (self.shared_machine or self.shared_job_dir
                or all(runner.is_local for runner in self.runners.values()))


def _route_words(address):
    return subprocess.run(["ip", "-o", "route", "get", address], capture_output=True,
                          text=True, check=True).stdout.split()


def _route_to(host):
    """(interface, source address) of this machine's route to `host`."""
    words = _route_words(socket.gethostbyname(host))
    return words[words.index("dev") + 1], words[words.index("src") + 1]


def _is_own_address(address):
    """True if `address` is one of this machine's (in this network namespace)."""
    words = _route_words(address)
    return bool(words) and words[0] == "local"


def simulated_site(config, network, ssh_servers=None):
    """The hosts of `--simulate-hosts`: `network`'s namespaces, reached by
    `ip netns exec` or, with `--ssh`, by the `ssh_servers` (`SimulatedSsh`)."""
    counts = hosts_lib.simulated_hosts_spec(config.num_proc, config.simulate_hosts)
    if ssh_servers is not None:
        runners = {h.address: ssh_servers.runner(h.address, exported=config.export)
                   for h in network.hosts}
    else:
        runners = {h.address: NetnsRunner(h.namespace) for h in network.hosts}
    return Site(hosts=[hosts_lib.Host(h.address, n) for h, n in zip(network.hosts, counts)],
                runners=runners, addresses={h.address: h.address for h in network.hosts},
                launcher_address=network.gateway, iface="sbn0", shared_machine=True,
                network=network)


def listed_site(config, route_to=_route_to):
    """The hosts of `-H` (default `localhost:NP`): local names run here, others over ssh."""
    host_list = list(config.hosts or [hosts_lib.Host("localhost", config.num_proc)])
    used = {slot.hostname for slot in hosts_lib.assign_ranks(host_list, config.num_proc)}
    host_list = [h for h in host_list if h.name in used]
    remote = [h.name for h in host_list if not hosts_lib.is_local_host(h.name)]
    if remote:
        iface, source = (None, None)
        if not (config.network_interface and config.launcher_address):
            iface, source = route_to(remote[0])
        iface = config.network_interface or iface
        launcher_address = config.launcher_address or source
        addresses = {h.name: (launcher_address if hosts_lib.is_local_host(h.name) else h.name)
                     for h in host_list}
    else:
        iface = config.network_interface or "lo"
        launcher_address = config.launcher_address or "127.0.0.1"
        addresses = {h.name: "127.0.0.1" for h in host_list}
    runners = {
        h.name: LocalRunner() if hosts_lib.is_local_host(h.name) else SshRunner(
            h.name, port=config.ssh_port, identity_file=config.ssh_identity_file,
            exported=config.export)
        for h in host_list
    }
    return Site(hosts=host_list, runners=runners, addresses=addresses,
                launcher_address=launcher_address, iface=iface)


def in_allocation(environ):
    """True inside a Slurm allocation: a batch script, salloc's command, a job step."""
    return bool(environ.get("SLURM_JOB_ID"))


def _scontrol(*args):
    """`scontrol ARGS`'s output; RuntimeError naming the command if it fails."""
    argv = ["scontrol", *args]
    try:
        result = subprocess.run(argv, capture_output=True, text=True,
                                timeout=SLURM_TIMEOUT_SECONDS)
    except (OSError, subprocess.SubprocessError) as error:
        raise RuntimeError(f"`{' '.join(argv)}` failed: {error}") from None
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` exited with {result.returncode}: "
                           f"{result.stderr.strip()[-500:] or 'no message'}")
    return result.stdout


def nodes_seeing(path, nodes, timeout=SLURM_TIMEOUT_SECONDS):
    """The nodes of `nodes` (of this allocation) on which directory `path` exists.

    One job step of a task per node asks them all; a step that cannot run
    counts as no node seeing it.
    """
    argv = [*srun_step(nodes, cwd="/"), "sh", "-c", 'test -d "$1" && echo "$SLURMD_NODENAME"',
            "sh", path]
    try:
        answer = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as error:
        logger.debug("%s: %s", " ".join(argv), error)
        return set()
    return set(answer.stdout.split()) & set(nodes)


def allocation_site(config, *, job_dir=None, environ=None, scontrol=_scontrol,
                    route_to=_route_to, is_own_address=_is_own_address, probe=nodes_seeing):
    """The nodes of the Slurm allocation the launcher runs in, each rank a job step.

    The nodes and their task counts come from `SLURM_JOB_NODELIST`, expanded
    by Slurm's own `scontrol show hostnames`, and `SLURM_TASKS_PER_NODE`; the
    address other nodes reach a node at is its `NodeAddr` (`scontrol show
    node`; on most clusters, its name). Each rank runs as a job step of one
    task on its node (`launch.hostexec.SrunRunner`). The interface and the
    launcher's address are those of the route to the first node that is not
    this machine (`lo` if every rank runs here). A job step per node asks
    whether the node sees `job_dir` (`shared_job_dir`): only then do the
    ranks' error files reach the launcher.

    Args:
        config: the job's `launch.config.LaunchConfig`.
        job_dir: the launcher's directory for the job, or None.
        environ: the allocation's variables (default: `os.environ`).
        scontrol, route_to, is_own_address, probe: how Slurm, routes and the
            nodes are asked (replaced in tests).

    Raises:
        ValueError: if the allocation's variables are missing or disagree, or
            `-np` exceeds its tasks.
        RuntimeError: if scontrol fails.
    """
    environ = os.environ if environ is None else environ
    nodelist = environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise ValueError("Environment variable `SLURM_JOB_NODELIST` must name the nodes of "
                         "the Slurm allocation. Received: SLURM_JOB_ID="
                         f"{environ.get('SLURM_JOB_ID')!r} without SLURM_JOB_NODELIST")
    names = scontrol("show", "hostnames", nodelist).split()
    host_list = hosts_lib.allocation_hosts(names, environ.get("SLURM_TASKS_PER_NODE", ""))
    hosts_lib.validate_num_proc(config.num_proc, host_list)
    used = {slot.hostname for slot in hosts_lib.assign_ranks(host_list, config.num_proc)}
    host_list = [h for h in host_list if h.name in used]
    node_addresses = hosts_lib.node_addresses(
        scontrol("show", "node", "-o", ",".join(h.name for h in host_list)))
    addresses = {h.name: node_addresses.get(h.name, h.name) for h in host_list}
    elsewhere = [address for address in addresses.values() if not is_own_address(address)]
    iface, source = "lo", "127.0.0.1"  # every rank runs here
    if elsewhere and not (config.network_interface and config.launcher_address):
        iface, source = route_to(elsewhere[0])
    nodes = [h.name for h in host_list]
    return Site(hosts=host_list, runners={name: SrunRunner(name) for name in nodes},
                addresses=addresses, launcher_address=config.launcher_address or source,
                iface=config.network_interface or iface,
                shared_job_dir=job_dir is not None and probe(job_dir, nodes) == set(nodes))


def make_placement(config, site, *, cwd, job_dir=None, gpu_ids=None):
    """Places the job's ranks on the hosts of `site`.

    Args:
        config: the job's `launch.config.LaunchConfig`.
        site: the `Site` of a host source (`simulated_site`, `allocation_site`,
            `listed_site`).
        cwd: the ranks' working directory.
        job_dir: the launcher's directory for the job, or None.
        gpu_ids: function(config, site) -> GPU ids of a host (default: `launch.gpus.gpu_ids`).
    """
    from launch import gpus

    return Placement(
        slots=hosts_lib.assign_ranks(site.hosts, config.num_proc), hosts=site.hosts,
        runners=site.runners, addresses=site.addresses, launcher_address=site.launcher_address,
        iface=site.iface, command=list(config.command), cwd=cwd,
        cpus=config.cpus_per_host or len(os.sched_getaffinity(0)),
        gpu_ids=(gpu_ids or gpus.gpu_ids)(config, site), shared_machine=site.shared_machine,
        network=site.network, exported=tuple(config.export), job_dir=job_dir,
        shared_job_dir=site.shared_job_dir)
