"""Where the ranks run and how they are reached: the `Placement` every backend takes.

It is decided once per job from a `LaunchConfig`, in two steps:

1. A host source gives a `Site`: the hosts, a `launch.hostexec.HostRunner` per
   host, the addresses hosts reach each other and the launcher at, and the
   interface. `simulated_site` serves `--simulate-hosts`, `listed_site` `-H`
   (or this machine alone); another source (a scheduler's allocation, with its
   own runner) is one more function returning a `Site`.
2. `make_placement(config, site, ...)` puts the ranks in the hosts' slots
   (`launch.hosts.assign_ranks`) and counts the cores and GPUs of a host.
"""

import dataclasses
import os
import socket
import subprocess
from typing import Optional

from launch import hosts as hosts_lib
from launch.hostexec import LocalRunner, NetnsRunner, SshRunner


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
    """

    hosts: list
    runners: dict
    addresses: dict
    launcher_address: str
    iface: Optional[str]
    shared_machine: bool = False
    network: object = None


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

    @property
    def error_files_readable(self):
        """True if every rank's error file lands where the launcher reads it: every host
        is this machine (simulated hosts too). Ranks on other machines write none."""
        return self.shared_machine or all(runner.is_local for runner in self.runners.values())


def _route_to(host):
    """(interface, source address) of this machine's route to `host`."""
    address = socket.gethostbyname(host)
    words = subprocess.run(["ip", "-o", "route", "get", address], capture_output=True,
                           text=True, check=True).stdout.split()
    return words[words.index("dev") + 1], words[words.index("src") + 1]


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


def make_placement(config, site, *, cwd, job_dir=None, gpu_ids=None):
    """Places the job's ranks on the hosts of `site`.

    Args:
        config: the job's `launch.config.LaunchConfig`.
        site: the `Site` of a host source (`simulated_site`, `listed_site`).
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
        network=site.network, exported=tuple(config.export), job_dir=job_dir)
