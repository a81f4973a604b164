"""`python -m launch.netns_rsh [ssh options] HOST COMMAND...`: mpirun's rsh agent for simulated hosts.

mpirun calls its `plm_rsh_agent` like ssh. We map HOST (a simulated host's address)
to its network namespace through `SYNCBN_LAUNCH_NETNS_MAP` (`addr=namespace,...`,
set by the launcher) and exec `ip netns exec NS /bin/sh -c COMMAND`, so Open MPI's
daemon -- and the ranks it forks -- live in that host's namespace, with Open MPI's
session directories under a base of that host's own. The daemon gets SIGKILL if
mpirun dies (parent-death signal), so nothing outlives the job.
"""

import ctypes
import os
import signal
import sys

from launch.hostexec import NetnsRunner
from launch.netns import mpi_session_base


def parse_agent_args(argv):
    """Splits ssh-style arguments into (host, command string). Pure.

    Example:
        >>> parse_agent_args(["-x", "198.18.3.2", "orted", "-mca", "ess", "env"])
        ('198.18.3.2', 'orted -mca ess env')
    """
    args = list(argv)
    while args and args[0].startswith("-"):
        args.pop(0)
    if len(args) < 2:
        raise ValueError(f"expected `HOST COMMAND...`. Received: {argv!r}")
    return args[0], " ".join(args[1:])


def parse_namespace_map(text):
    """'a=ns1,b=ns2' -> {'a': 'ns1', 'b': 'ns2'}. Pure."""
    return dict(item.split("=", 1) for item in text.split(",") if item)


def main(argv=None):
    host, command = parse_agent_args(sys.argv[1:] if argv is None else argv)
    namespaces = parse_namespace_map(os.environ.get("SYNCBN_LAUNCH_NETNS_MAP", ""))
    if host not in namespaces:
        sys.exit(f"launch.netns_rsh: unknown simulated host {host!r}; known: {sorted(namespaces)}")
    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    # A session-directory base of this host's own (see launch.netns.mpi_session_base).
    session_base = mpi_session_base(namespaces[host])
    os.makedirs(session_base, mode=0o700, exist_ok=True)
    popen_argv, env = NetnsRunner(namespaces[host]).command(
        ["/bin/sh", "-c", command], {"OMPI_MCA_orte_tmpdir_base": session_base}, "/")
    os.execvpe(popen_argv[0], popen_argv, env)


if __name__ == "__main__":
    main()
