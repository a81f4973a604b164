"""`--simulate-hosts N --slurm`: a real Slurm cluster on the simulated hosts.

Debian's Slurm daemons, configured for the job in one private directory
(`sbn-<pid>-slurm-*` under the temporary directory, so that the next launcher
removes it if this one is SIGKILLed, see `launch.netns.remove_stale`):

- `munged`, with a key made for the job and its own socket, which Slurm finds
  through `AuthInfo=socket=...`; a MUNGE daemon of the machine, if any, is
  neither used nor disturbed;
- `slurmctld` in the launcher's own network namespace, the "login node", on the
  bridge's address and a free port;
- one `slurmd` in every simulated host (`slurmd -N node<i>`, `NodeAddr` = the
  host's address), with per-node spool, pid and log files (`%n`). Node names
  resolve on the nodes (each namespace's hosts file), not on the login node,
  where Slurm's `NodeAddr` says where a node is.

No cgroups and no accounting: `ProctrackType=proctrack/linuxproc` (which finds
a task's processes by parentage, also those that start their own session, as
`syncbn-launch`'s ranks do), `TaskPlugin=task/none`. Every node declares
`CPUs=` the cores this process may use, or slurmd registers it as `inval`.
Commands see the cluster through `SLURM_CONF` (`SimulatedSlurm.env()`).

The daemons run in the foreground as children of this process, with a
parent-death signal; `close()` stops them and deletes the directory, and the
processes of the jobs end when `SimulatedNetwork.close` removes the namespaces.
"""

import contextlib
import logging
import os
import secrets
import shutil
import socket
import subprocess
import tempfile

from launch.netns import NETNS_ETC, mpi_session_base
from launch.netns_ssh import _start_in_namespace, _tail, stop_daemons, wait_until

logger = logging.getLogger("launch")

MUNGED = "/usr/sbin/munged"
SLURMCTLD = "/usr/sbin/slurmctld"
SLURMD = "/usr/sbin/slurmd"
CLIENT_TOOLS = ("srun", "sbatch", "salloc", "sinfo", "scontrol")
READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 10.0
PARTITION = "sbn"
# `ip netns exec` mounts a fresh /sys, without the cgroup file systems, and
# slurmd 22.05 initializes its cgroup plugin (cgroup v1 here) even when no plugin
# of the configuration uses cgroups: it wants a tmpfs with the named `systemd`
# hierarchy in it, which it only looks at.
SLURMD_IN_NAMESPACE = ("mount -t tmpfs syncbn-cgroup /sys/fs/cgroup && "
                       "mkdir /sys/fs/cgroup/systemd && "
                       "mount -t cgroup -o none,name=systemd syncbn-cgroup /sys/fs/cgroup/systemd && "
                       'exec "$@"')


def check_can_run_slurm():
    """Raises FileNotFoundError naming the Debian packages if a daemon or a client is missing."""
    missing = [tool for tool in (MUNGED, SLURMCTLD, SLURMD, *CLIENT_TOOLS)
               if shutil.which(tool) is None]
    if missing:
        raise FileNotFoundError(
            f"Argument `--slurm` needs {', '.join(missing)} (Debian: apt-get install munge "
            "slurmctld slurmd slurm-client). Received: --slurm")


def node_names(count):
    """The simulated cluster's node names. Pure.

    Example:
        >>> node_names(2)
        ['node0', 'node1']
    """
    return [f"node{index}" for index in range(count)]


def slurm_conf(*, controller, controller_address, port, directory, munge_socket, nodes, cpus):
    """The text of the cluster's `slurm.conf`. Pure.

    Args:
        controller: the controller's host name (slurmctld checks that it is its own).
        controller_address: the address nodes and commands reach slurmctld at.
        port: slurmctld's port.
        directory: the cluster's private directory (state, spool, pid and log files).
        munge_socket: path of the job's MUNGE socket.
        nodes: `[(name, address), ...]`.
        cpus: CPUs of every node.

    Example:
        >>> text = slurm_conf(controller="box", controller_address="198.18.3.1", port=6900,
        ...                   directory="/d", munge_socket="/d/munge.socket",
        ...                   nodes=[("node0", "198.18.3.2")], cpus=2)
        >>> "NodeName=node0 NodeAddr=198.18.3.2 CPUs=2 State=UNKNOWN" in text.splitlines()
        True
    """
    names = ",".join(name for name, _ in nodes)
    lines = [
        "ClusterName=syncbn",
        f"SlurmctldHost={controller}({controller_address})",
        f"SlurmctldPort={port}",
        "SlurmdPort=6818",  # one per network namespace: every node can use the default
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={directory}/state",
        f"SlurmdSpoolDir={directory}/spool/%n",
        f"SlurmctldPidFile={directory}/slurmctld.pid",
        f"SlurmdPidFile={directory}/slurmd.%n.pid",
        f"SlurmctldLogFile={directory}/slurmctld.log",
        f"SlurmdLogFile={directory}/slurmd.%n.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/builtin",
        "MpiDefault=none",
        "ReturnToService=2",
        # A job's end: SIGTERM, then SIGKILL this many seconds later (default 30).
        "KillWait=5",
        "MinJobAge=60",
        "InactiveLimit=0",
        "PropagateResourceLimits=NONE",
        f"TaskProlog={directory}/task_prolog",
        *(f"NodeName={name} NodeAddr={address} CPUs={cpus} State=UNKNOWN"
          for name, address in nodes),
        f"PartitionName={PARTITION} Nodes={names} Default=YES MaxTime=INFINITE State=UP",
        "",
    ]
    return "\n".join(lines)


def task_prolog(session_bases):
    """The TaskProlog script: what every task gets on its node. Pure.

    The nodes share /tmp, /dev/shm and the host name, so Open MPI's session
    directories and shared-memory segments get a base of each node's own, as
    they would on separate machines (`launch.netns.mpi_session_base`), and
    its byte transfer layers are TCP and self only, as `--simulate-hosts`
    gives mpirun: with one host name for every node, tasks of different nodes
    would take each other for neighbours and map each other's shared-memory
    segments (Open MPI's `vader` then crashes).

    Args:
        session_bases: `{node name: directory}`.

    Example:
        >>> print(task_prolog({"node0": "/tmp/n0"}).splitlines()[-6])
          node0) base=/tmp/n0 ;;
    """
    cases = "".join(f"  {name}) base={base} ;;\n" for name, base in session_bases.items())
    return ("#!/bin/sh\n"
            "# Lines `export NAME=VALUE` on stdout set NAME in the task (slurm.conf, TaskProlog).\n"
            'case "$SLURMD_NODENAME" in\n'
            f"{cases}"
            "  *) exit 0 ;;\n"
            "esac\n"
            'echo "export OMPI_MCA_orte_tmpdir_base=$base"\n'
            'echo "export OMPI_MCA_btl_vader_backing_directory=$base"\n'
            'echo "export OMPI_MCA_btl=self,tcp"\n')


def _free_port(address):
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


class SimulatedSlurm:
    """munged, slurmctld and a slurmd per host of a `launch.netns.SimulatedNetwork`.

    Args:
        network: the entered `SimulatedNetwork`.
        cpus: CPUs each node declares (default: the cores this process may use).

    Attributes:
        directory: the private directory (configuration, state, logs).
        conf: path of `slurm.conf`.
        nodes: `[(name, address), ...]`, one per simulated host, in order.

    Example (as root):
        with SimulatedNetwork(2) as network, SimulatedSlurm(network) as cluster:
            subprocess.run(["srun", "-N", "2", "hostname"], env={**os.environ, **cluster.env()})
    """

    def __init__(self, network, cpus=None):
        self.network = network
        self.cpus = cpus or len(os.sched_getaffinity(0))
        self.directory = None
        self.nodes = []
        self._daemons = []  # [(name, Popen, log path)], started in this order

    def __enter__(self):
        check_can_run_slurm()
        with contextlib.ExitStack() as on_error:
            on_error.callback(self.close)  # whatever was started before a failure
            self._create()
            on_error.pop_all()
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _path(self, *names):
        return os.path.join(self.directory, *names)

    @property
    def conf(self):
        return self._path("slurm.conf")

    def env(self):
        """The variables a command needs to use this cluster."""
        return {"SLURM_CONF": self.conf}

    def _create(self):
        self.directory = tempfile.mkdtemp(prefix=f"sbn-{self.network.owner_pid}-slurm-")
        os.chmod(self.directory, 0o755)  # slurmd's job steps read slurm.conf as root anyway
        for sub in ("munge", "state", "spool"):
            os.makedirs(self._path(sub), mode=0o700)
        munge_socket = self._start_munge()
        self.nodes = list(zip(node_names(len(self.network.hosts)),
                              (host.address for host in self.network.hosts)))
        with open(self.conf, "w") as conf:
            conf.write(slurm_conf(
                controller=socket.gethostname().split(".")[0],
                controller_address=self.network.gateway,
                port=_free_port(self.network.gateway), directory=self.directory,
                munge_socket=munge_socket, nodes=self.nodes, cpus=self.cpus))
        self._name_nodes()
        bases = {}
        for (name, _), host in zip(self.nodes, self.network.hosts):
            bases[name] = mpi_session_base(host.namespace)
            os.makedirs(bases[name], mode=0o700, exist_ok=True)
        prolog = self._path("task_prolog")
        with open(prolog, "w") as script:
            script.write(task_prolog(bases))
        os.chmod(prolog, 0o755)
        env_argv = ["env", f"SLURM_CONF={self.conf}"]
        self._daemons.append(("slurmctld", _start_in_namespace(
            None, [*env_argv, SLURMCTLD, "-D", "-i", "-f", self.conf],
            self._path("slurmctld.out")),
            self._path("slurmctld.log")))
        for (name, _), host in zip(self.nodes, self.network.hosts):
            node_conf = self._node_conf(name)
            self._daemons.append((f"slurmd {name}", _start_in_namespace(
                host.namespace,
                ["sh", "-c", SLURMD_IN_NAMESPACE, "slurmd", "env", f"SLURM_CONF={node_conf}",
                 SLURMD, "-D", "-N", name, "-f", node_conf],
                self._path(f"slurmd.{name}.out")),
                self._path(f"slurmd.{name}.log")))
        self._wait_until_idle()
        logger.info("Slurm cluster of %d nodes (%s), SLURM_CONF=%s", len(self.nodes),
                    ", ".join(f"{n} at {a}" for n, a in self.nodes), self.conf)

    def _name_nodes(self):
        """Makes every node's name resolve to its address on every node, as cluster DNS
        would (`ip netns exec` shows each namespace its `/etc/netns/<ns>/hosts`)."""
        lines = "".join(f"{address} {name}\n" for name, address in self.nodes)
        for host in self.network.hosts:
            with open(os.path.join(NETNS_ETC, host.namespace, "hosts"), "a") as hosts:
                hosts.write(lines)

    def _node_conf(self, name):
        """A directory of node `name`'s own: the cluster's slurm.conf, and an mpi.conf.

        The nodes share /tmp, where the PMIx plugin would put the same directory
        for a step's tasks on every node (`spmix_appdir_<uid>_<job>.<step>`, and
        the second node's step fails on "File exists"); each node's mpi.conf
        gives it a base of its own.
        """
        directory = self._path("nodes", name)
        os.makedirs(os.path.join(directory, "pmix"), mode=0o755)
        os.makedirs(self._path("spool", name), mode=0o700)
        os.symlink(self.conf, os.path.join(directory, "slurm.conf"))
        with open(os.path.join(directory, "mpi.conf"), "w") as conf:
            conf.write(f"PMIxCliTmpDirBase={directory}/pmix\n")
        return os.path.join(directory, "slurm.conf")

    def _start_munge(self):
        key = self._path("munge", "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400), "wb") as handle:
            handle.write(secrets.token_bytes(1024))
        munge_socket = self._path("munge", "munge.socket")
        # --force: munged refuses root and a socket directory under /tmp without it.
        argv = [MUNGED, "--foreground", "--force", f"--key-file={key}",
                f"--socket={munge_socket}", f"--pid-file={self._path('munge', 'munged.pid')}",
                f"--log-file={self._path('munge', 'munged.log')}",
                f"--seed-file={self._path('munge', 'munged.seed')}"]
        self._daemons.append(("munged", _start_in_namespace(
            None, argv, self._path("munge", "munged.out")), self._path("munge", "munged.log")))
        wait_until(lambda: os.path.exists(munge_socket), READY_TIMEOUT_SECONDS, self._daemons,
                   lambda: f"munged did not create {munge_socket} within "
                           f"{READY_TIMEOUT_SECONDS:g} s", interval=0.05)
        return munge_socket

    def node_states(self):
        """`{node name: state}` as `sinfo` reports it, e.g. `{'node0': 'idle'}`."""
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True,
                                text=True, timeout=30, env={**os.environ, **self.env()})
        states = {}
        for line in result.stdout.splitlines():
            words = line.split()
            if len(words) == 2:
                states[words[0]] = words[1]
        return states

    def _wait_until_idle(self):
        names = [name for name, _ in self.nodes]
        states = {}

        def idle():
            states.update(self.node_states())
            return all(states.get(name) == "idle" for name in names)

        wait_until(idle, READY_TIMEOUT_SECONDS, self._daemons,
                   lambda: f"Slurm nodes not idle after {READY_TIMEOUT_SECONDS:g} s: {states}; "
                           f"slurmctld: {_tail(self._path('slurmctld.log'))}", interval=0.2)

    def close(self):
        """Stops the daemons (SIGTERM, then SIGKILL), slurmds first, and deletes the
        directory. Idempotent."""
        stop_daemons([process for _, process, _ in reversed(self._daemons)],
                     timeout=STOP_TIMEOUT_SECONDS)
        self._daemons = []
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

