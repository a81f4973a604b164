"""`--simulate-hosts N`: N hosts on this machine, as Linux network namespaces.

Each simulated host is a network namespace with `lo` up and one veth interface
(`sbn0`) whose peer is attached to a bridge in the root namespace. The bridge holds
the subnet's first address (the launcher's side: Horovod's rendezvous server,
mpirun's out-of-band channel); host i gets the address `.2 + i`. Ranks run inside
their host's namespace, so every byte between simulated hosts crosses the veths and
the bridge.

Inside each namespace this machine's host name resolves to the host's own address
(`ip netns exec` bind-mounts `/etc/netns/<ns>/hosts` over `/etc/hosts`), as on a
real host. Horovod 0.28.1 needs that: the Gloo device of its process-set contexts
ignores `HOROVOD_GLOO_IFACE` and binds to the address of `gethostname()`.

Addresses come from 198.18.0.0/15 (RFC 2544, reserved for benchmarking, never
routed), one /24 per job, chosen under a lock among the /24s that overlap no
address or route of this machine. Names carry the launcher's pid (`sbn-<pid>-h<i>`,
bridge `sbnb<pid>`, veths `sbnv<pid>h<i>`), so concurrent jobs never collide, and
leftovers of a launcher that was SIGKILLed (it cannot clean up) are removed by
the next launcher that finds their pid dead.

Removing a namespace first ends every process still inside it (SIGTERM, then
SIGKILL): ranks started over ssh (`--ssh`, see `launch.netns_ssh`) are children
of the host's sshd, not of the launcher, and a namespace whose name is deleted
lives on as long as a process holds it.
"""

import dataclasses
import fcntl
import ipaddress
import logging
import os
import re
import shutil
import socket
import signal
import subprocess
import tempfile
import time

logger = logging.getLogger("launch")

POOL = ipaddress.ip_network("198.18.0.0/15")
IFACE = "sbn0"  # the interface name inside every namespace
LOCK_PATH = "/run/lock/syncbn-launch-netns.lock"
NETNS_ETC = "/etc/netns"
_NAMESPACE = re.compile(r"^sbn-(\d+)-h\d+$")
_LINK = re.compile(r"^sbn[bv](\d+)(h\d+)?$")
# Per-job directories under the temporary directory (Open MPI session bases,
# `--ssh` keys, the launcher's own): `sbn-<pid>-...`, `syncbn-ssh-<pid>-...`,
# `syncbn-launch-<pid>-...`.
_JOB_DIRECTORY = re.compile(r"^(?:sbn|syncbn-ssh|syncbn-launch)-(\d+)-")
STOP_GRACE_SECONDS = 2.0


@dataclasses.dataclass(frozen=True)
class SimulatedHost:
    """One simulated host: its namespace and its address (also used as its name)."""

    namespace: str
    address: str


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def check_can_simulate():
    """Raises PermissionError/FileNotFoundError with a clear message if netns can't work."""
    if os.geteuid() != 0:
        raise PermissionError(
            "Argument `--simulate-hosts` creates network namespaces and needs root. "
            f"Received: --simulate-hosts as uid {os.geteuid()}; run as root or use `-H`"
        )
    if shutil.which("ip") is None:
        raise FileNotFoundError(
            "Argument `--simulate-hosts` needs the `ip` command (Debian: apt-get install iproute2)"
        )


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mpi_session_base(namespace):
    """Open MPI's session-directory base for the daemons of simulated host `namespace`.

    The namespaces share this machine's host name and /tmp, so by default every
    simulated host's daemon (and mpirun) would create the same
    `/tmp/ompi.HOST.UID/jf.N` at once, and Open MPI fails on that race ("A call
    to mkdir was unable to create the desired directory ... File exists").
    """
    return os.path.join(tempfile.gettempdir(), f"{namespace}-ompi")


def namespace_pids(namespace):
    """Pids of the processes inside network namespace `namespace` (none if it is gone)."""
    listing = _ip("netns", "pids", namespace, check=False).stdout
    return [int(word) for word in listing.split() if word.isdigit()]


def _signal_all(pids, signum):
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def stop_namespace_processes(namespaces, grace_period=STOP_GRACE_SECONDS):
    """Ends every process inside `namespaces`: SIGTERM, `grace_period` seconds, SIGKILL.

    Returns:
        The pids that were still there (and got SIGTERM), for the log.
    """
    found = [pid for namespace in namespaces for pid in namespace_pids(namespace)]
    if not found:
        return []
    _signal_all(found, signal.SIGTERM)
    deadline = time.monotonic() + grace_period
    while time.monotonic() < deadline:
        if not any(namespace_pids(namespace) for namespace in namespaces):
            return found
        time.sleep(0.05)
    for namespace in namespaces:
        _signal_all(namespace_pids(namespace), signal.SIGKILL)
    return found


def _remove_namespace_files(namespace):
    shutil.rmtree(os.path.join(NETNS_ETC, namespace), ignore_errors=True)
    shutil.rmtree(mpi_session_base(namespace), ignore_errors=True)


def remove_stale(own_pid=None):
    """Deletes namespaces and links left by launchers that no longer run."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NAMESPACE.match(name)
        if match and int(match.group(1)) != own_pid and not _pid_alive(int(match.group(1))):
            logger.info("removing stale namespace %s", name)
            stop_namespace_processes([name], grace_period=0.0)
            _ip("netns", "del", name, check=False)
            _remove_namespace_files(name)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        match = _LINK.match(name)
        if match and int(match.group(1)) != own_pid and not _pid_alive(int(match.group(1))):
            logger.info("removing stale link %s", name)
            _ip("link", "del", name, check=False)
    remove_stale_directories(own_pid)


def remove_stale_directories(own_pid=None):
    """Deletes the per-job directories (see `_JOB_DIRECTORY`) of launchers that no longer
    run; every launcher calls it, since every job has a directory of its own."""
    temporary = tempfile.gettempdir()
    for name in os.listdir(temporary):
        match = _JOB_DIRECTORY.match(name)
        if match and int(match.group(1)) != own_pid and not _pid_alive(int(match.group(1))):
            logger.info("removing stale directory %s", os.path.join(temporary, name))
            shutil.rmtree(os.path.join(temporary, name), ignore_errors=True)


def used_networks():
    """IPv4 networks of this machine's addresses and routes (all tables)."""
    networks = []
    text = _ip("-4", "-o", "addr", "show", check=False).stdout
    for match in re.finditer(r"inet (\S+)", text):
        networks.append(ipaddress.ip_interface(match.group(1)).network)
    text = _ip("-4", "route", "show", "table", "all", check=False).stdout
    for line in text.splitlines():
        words = line.split()
        if words and words[0] in ("broadcast", "local", "unicast", "blackhole", "unreachable"):
            words = words[1:]
        if not words or words[0] == "default":
            continue
        try:
            networks.append(ipaddress.ip_network(words[0], strict=False))
        except ValueError:
            continue
    return networks


def choose_subnet(used, seed):
    """Picks a free /24 in `POOL` that overlaps none of `used`, starting at `seed`. Pure.

    Example:
        >>> import ipaddress
        >>> str(choose_subnet([ipaddress.ip_network("198.18.0.0/24")], 0))
        '198.18.1.0/24'
    """
    subnets = list(POOL.subnets(new_prefix=24))
    for offset in range(len(subnets)):
        candidate = subnets[(seed + offset) % len(subnets)]
        if not any(candidate.overlaps(network) for network in used):
            return candidate
    raise RuntimeError(f"no free /24 left in {POOL} for --simulate-hosts")


def _write_hosts_file(namespace, address):
    directory = os.path.join(NETNS_ETC, namespace)
    os.makedirs(directory, exist_ok=True)
    names = " ".join(sorted({socket.gethostname(), socket.getfqdn()}))
    with open(os.path.join(directory, "hosts"), "w") as hosts:
        hosts.write(f"127.0.0.1 localhost\n::1 localhost\n{address} {names}\n")


class SimulatedNetwork:
    """Creates N simulated hosts on enter, removes them on exit (also after errors).

    Args:
        count: number of hosts.
        owner_pid: pid put in the names (default: this process).

    Example (as root):
        with SimulatedNetwork(2) as network:
            print(network.gateway, [h.address for h in network.hosts])
    """

    def __init__(self, count, owner_pid=None):
        self.count = count
        self.owner_pid = owner_pid or os.getpid()
        self.bridge = f"sbnb{self.owner_pid}"
        self.hosts = []
        self.gateway = None
        self.subnet = None
        self._created_namespaces = []
        self._bridge_created = False

    def __enter__(self):
        check_can_simulate()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _create(self):
        remove_stale(own_pid=self.owner_pid)
        os.makedirs(os.path.dirname(LOCK_PATH), exist_ok=True)
        with open(LOCK_PATH, "w") as lock:
            # Two launchers must not pick the same /24: choose and claim it atomically.
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.subnet = choose_subnet(used_networks(), seed=self.owner_pid)
            addresses = list(self.subnet.hosts())
            self.gateway = str(addresses[0])
            _ip("link", "add", self.bridge, "type", "bridge")
            self._bridge_created = True
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        for index in range(self.count):
            namespace = f"sbn-{self.owner_pid}-h{index}"
            veth = f"sbnv{self.owner_pid}h{index}"
            address = str(addresses[1 + index])
            _ip("netns", "add", namespace)
            self._created_namespaces.append(namespace)
            _write_hosts_file(namespace, address)
            _ip("link", "add", veth, "type", "veth", "peer", "name", IFACE, "netns", namespace)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", IFACE)
            _ip("-n", namespace, "link", "set", IFACE, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            self.hosts.append(SimulatedHost(namespace, address))
        logger.info("simulated %d hosts in %s: %s", self.count, self.subnet,
                    ", ".join(f"{h.address} ({h.namespace})" for h in self.hosts))

    def close(self):
        """Ends the processes left inside the namespaces, then removes the namespaces
        (their veths go with them) and the bridge. Idempotent."""
        left = stop_namespace_processes(self._created_namespaces)
        if left:
            logger.info("stopped %d processes left in the simulated hosts", len(left))
        for namespace in self._created_namespaces:
            _ip("netns", "del", namespace, check=False)
            _remove_namespace_files(namespace)
        self._created_namespaces = []
        if self._bridge_created:
            _ip("link", "del", self.bridge, check=False)
            self._bridge_created = False

    def namespace_of(self, address):
        return {h.address: h.namespace for h in self.hosts}[address]
