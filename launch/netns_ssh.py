"""`--simulate-hosts N --ssh`: a real OpenSSH server in every simulated host.

Each simulated host (a network namespace, see `launch.netns`) runs Debian's
`/usr/sbin/sshd` on its own address and port `SSH_PORT`, and the launcher reaches
it with `launch.hostexec.SshRunner`, the very path `-H` takes to real machines,
instead of `ip netns exec`. Everything the servers and the client need is made
for the job in one private temporary directory (`syncbn-ssh-<pid>-*`):

- `host_ed25519`: the servers' host key, and `known_hosts` listing it for every
  host address, so the client checks host keys strictly and writes nowhere else;
- `id_ed25519`: the client key, authorized through `authorized_keys`;
- `ssh_config`: the client's configuration (`ssh -F`), and `bin/ssh`, a wrapper
  that adds `-F ssh_config`: put first on PATH, it lets programs that run a plain
  `ssh` (mpirun, `horovodrun -H`) reach the simulated hosts as they would reach
  machines listed in `~/.ssh/config`;
- `sshd_config.<i>`, `sshd.<i>.log`: each server's configuration and log.

Every sshd session gets `OMPI_MCA_orte_tmpdir_base` and
`OMPI_MCA_btl_vader_backing_directory` (sshd's `SetEnv`): the host's own Open MPI
session-directory base (see `launch.netns.mpi_session_base`), which
`launch.netns_rsh` sets the same way on the `ip netns exec` path, also for the
shared-memory segments, whose names would otherwise collide between hosts (they
share /dev/shm and the host name) when a caller, like `horovodrun`, lets Open MPI
use shared memory.

`close()` stops the servers and deletes the directory; processes the servers
started (ranks, Open MPI daemons) end when the namespaces are removed
(`SimulatedNetwork.close`). If the launcher is SIGKILLed, the servers get SIGKILL
too (parent-death signal) and the next launcher removes the directory.
"""

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time

from launch.hostexec import SshRunner
from launch.netns import mpi_session_base

logger = logging.getLogger("launch")

SSHD = "/usr/sbin/sshd"
SSH_PORT = 2222  # not 22, so that the port option is exercised on every path
READY_TIMEOUT_SECONDS = 30.0
_PR_SET_PDEATHSIG = 1
_PRIVILEGE_SEPARATION_DIR = "/run/sshd"  # Debian's sshd refuses to start without it


def check_can_ssh(sshd=SSHD):
    """Raises FileNotFoundError naming the package if sshd, ssh or ssh-keygen is missing."""
    missing = [tool for tool in (sshd, "ssh", "ssh-keygen")
               if shutil.which(tool) is None]
    if missing:
        raise FileNotFoundError(
            f"Argument `--ssh` needs OpenSSH's {', '.join(missing)} (Debian: apt-get install "
            "openssh-server openssh-client). Received: --ssh")


def sshd_config(*, address, port, host_key, authorized_keys, session_base):
    """The text of one simulated host's sshd configuration. Pure.

    Example:
        >>> text = sshd_config(address="198.18.3.2", port=2222, host_key="/k",
        ...                    authorized_keys="/a", session_base="/tmp/s")
        >>> "ListenAddress 198.18.3.2:2222" in text, "PasswordAuthentication no" in text
        (True, True)
    """
    return "\n".join([
        f"ListenAddress {address}:{port}",
        f"HostKey {host_key}",
        f"AuthorizedKeysFile {authorized_keys}",
        "PidFile none",
        # Keys only, and no PAM session modules (motd, lastlog) on every rank's start.
        "UsePAM no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password",
        # The key files live under /tmp, whose permissions StrictModes rejects.
        "StrictModes no",
        "PrintMotd no",
        "PrintLastLog no",
        "X11Forwarding no",
        # mpirun and the per-rank backends open all their sessions at once.
        "MaxStartups 100:30:200",
        "MaxSessions 100",
        "LogLevel ERROR",
        # The hosts share /tmp, /dev/shm and the host name: Open MPI's session
        # directories and shared-memory segments get a base of each host's own.
        f"SetEnv OMPI_MCA_orte_tmpdir_base={session_base} "
        f"OMPI_MCA_btl_vader_backing_directory={session_base}",
        "",
    ])


def ssh_client_config(*, known_hosts):
    """The text of the client configuration (`ssh -F`). Pure."""
    return "\n".join([
        "Host *",
        f"  UserKnownHostsFile {known_hosts}",
        "  GlobalKnownHostsFile /dev/null",
        "  StrictHostKeyChecking yes",
        "  BatchMode yes",
        "  IdentitiesOnly yes",
        "  ConnectTimeout 20",
        "  LogLevel ERROR",
        "",
    ])


def known_hosts_line(address, port, public_key):
    """`[198.18.3.2]:2222 ssh-ed25519 AAAA...`: ssh's notation for a non-default port."""
    host = address if port == 22 else f"[{address}]:{port}"
    return f"{host} {public_key.strip()}\n"


def _keygen(path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "syncbn-launch",
                    "-f", path], check=True, capture_output=True, text=True)


def _start_in_namespace(namespace, argv, log_path):
    """Starts a daemon in `namespace` (None: this one), logging to `log_path`; it dies with us."""
    parent = os.getpid()

    def child_setup():
        # The servers die with the launcher; nothing else would stop them.
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    if namespace is not None:
        argv = ["ip", "netns", "exec", namespace, *argv]
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, preexec_fn=child_setup)


class SimulatedSsh:
    """An sshd in every host of a `launch.netns.SimulatedNetwork`; stopped on exit.

    Args:
        network: the entered `SimulatedNetwork`.
        port: the servers' port (the same in every namespace).
        sshd: path of the OpenSSH server.

    Attributes:
        directory: the job's private directory with keys and configurations.
        identity_file, config_file, known_hosts: paths in it.
        bin_dir: directory holding the `ssh` wrapper (put it first on PATH).

    Example (as root):
        with SimulatedNetwork(2) as network, SimulatedSsh(network) as servers:
            runner = servers.runner(network.hosts[0].address)
    """

    def __init__(self, network, port=SSH_PORT, sshd=SSHD):
        self.network = network
        self.port = port
        self.sshd = sshd
        self.directory = None
        self._servers = []  # [(name, Popen, log path)]

    def __enter__(self):
        check_can_ssh(self.sshd)
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _path(self, name):
        return os.path.join(self.directory, name)

    @property
    def identity_file(self):
        return self._path("id_ed25519")

    @property
    def config_file(self):
        return self._path("ssh_config")

    @property
    def known_hosts(self):
        return self._path("known_hosts")

    @property
    def bin_dir(self):
        return self._path("bin")

    def _create(self):
        # The pid in the name lets the next launcher remove it if this one is SIGKILLed.
        self.directory = tempfile.mkdtemp(prefix=f"syncbn-ssh-{self.network.owner_pid}-")
        host_key = self._path("host_ed25519")
        _keygen(host_key)
        _keygen(self.identity_file)
        shutil.copyfile(self.identity_file + ".pub", self._path("authorized_keys"))
        with open(host_key + ".pub") as public:
            host_public_key = public.read()
        with open(self.known_hosts, "w") as known:
            for host in self.network.hosts:
                known.write(known_hosts_line(host.address, self.port, host_public_key))
        with open(self.config_file, "w") as config:
            config.write(ssh_client_config(known_hosts=self.known_hosts))
        os.makedirs(self.bin_dir)
        wrapper = os.path.join(self.bin_dir, "ssh")
        with open(wrapper, "w") as script:
            script.write(f"#!/bin/sh\nexec {shutil.which('ssh')} -F {self.config_file} \"$@\"\n")
        os.chmod(wrapper, 0o700)
        os.makedirs(_PRIVILEGE_SEPARATION_DIR, mode=0o755, exist_ok=True)
        for index, host in enumerate(self.network.hosts):
            session_base = mpi_session_base(host.namespace)
            os.makedirs(session_base, mode=0o700, exist_ok=True)
            config_path = self._path(f"sshd_config.{index}")
            with open(config_path, "w") as config:
                config.write(sshd_config(address=host.address, port=self.port,
                                         host_key=host_key,
                                         authorized_keys=self._path("authorized_keys"),
                                         session_base=session_base))
            log_path = self._path(f"sshd.{index}.log")
            # -D: stay in the foreground, our child; -e: log to the log file.
            process = _start_in_namespace(host.namespace, [self.sshd, "-D", "-e", "-f", config_path],
                                          log_path)
            self._servers.append((f"sshd in {host.namespace}", process, log_path))
        for host in self.network.hosts:
            self._wait_until_ready(host.address)
        logger.info("sshd on port %d in every simulated host; keys in %s", self.port,
                    self.directory)

    def _wait_until_ready(self, address):
        """Logs in once (`true`), which also proves the keys and configuration work."""
        argv = ["ssh", *self.runner(address).ssh_options(), address, "true"]
        attempt = {}

        def logged_in():
            attempt["result"] = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            return attempt["result"].returncode == 0

        wait_until(logged_in, READY_TIMEOUT_SECONDS, self._servers,
                   lambda: f"cannot log in to simulated host {address} over ssh after "
                           f"{READY_TIMEOUT_SECONDS:g} s: {attempt['result'].stderr.strip()}")

    def runner(self, address, exported=()):
        """The `SshRunner` that reaches simulated host `address`, as `-H` would."""
        return SshRunner(address, port=self.port, identity_file=self.identity_file,
                         config_file=self.config_file, exported=exported)

    def close(self):
        """Stops the servers (SIGTERM, then SIGKILL) and deletes the directory. Idempotent."""
        stop_daemons([process for _, process, _ in self._servers])
        self._servers = []
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


def stop_daemons(processes, timeout=5.0):
    """SIGTERM to every process of `processes`, then SIGKILL to those alive `timeout` s later."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def check_daemons(daemons):
    """Raises RuntimeError, with the end of its log, if one of `daemons` has exited.

    `daemons` holds `(name, subprocess.Popen, log path)` triples.
    """
    for name, process, log_path in daemons:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode}: {_tail(log_path)}")


def wait_until(ready, timeout, daemons, failure, interval=0.1):
    """Calls `ready()` until it returns true, while every one of `daemons` runs.

    Raises RuntimeError at once if a daemon exits (`check_daemons`), and with the message
    `failure()` once `timeout` seconds have passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        check_daemons(daemons)
        if ready():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(failure())
        time.sleep(interval)


def _tail(path, lines=10):
    try:
        with open(path, errors="replace") as log:
            return " | ".join(log.read().splitlines()[-lines:]) or "(no log output)"
    except OSError:
        return "(no log)"
