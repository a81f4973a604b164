""""Run this command on host H": one small abstraction, four implementations.

A `HostRunner` turns `(argv, added_env, cwd)` into the argv and environment that
the launcher hands to `subprocess.Popen` on this machine:

- `LocalRunner`: runs the command here.
- `SshRunner`: `ssh host 'cd CWD && exec env K=V ... CMD'`, as horovodrun does.
- `NetnsRunner`: `ip netns exec NS CMD`, for `--simulate-hosts` (`ip netns exec`
  execs in place, so the rank is still the launcher's direct child and inherits
  its parent-death signal).
- `SrunRunner`: `srun ... --nodelist NODE CMD`, a one-task job step on a node of
  the Slurm allocation the launcher runs in.
"""

import os
import shlex
import signal

SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no")
# What a remote rank needs to find the same Python, packages and libraries as the
# launcher (mpirun gets the same names with `-x`).
FORWARDED = ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "PYTHONUNBUFFERED",
             "OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM")
# And every variable of these families, as `horovodrun` forwards its own: syncbn's
# (`SYNCBN_COLLECTIVE_TIMEOUT`...), NCCL's, TensorFlow's, Horovod's, Open MPI's MCA
# parameters. `SYNCBN_LAUNCH_*` configure the launcher itself and stay here.
FORWARDED_PREFIXES = ("SYNCBN_", "NCCL_", "TF_", "HOROVOD_", "OMPI_MCA_")
LAUNCHER_PREFIX = "SYNCBN_LAUNCH_"


def forwarded_names(environ, exported=()):
    """The names of `environ`'s variables that remote ranks get. Pure.

    `FORWARDED`, then every name with one of `FORWARDED_PREFIXES` (not the
    launcher's own `SYNCBN_LAUNCH_*`), sorted, then `exported` (`-x`); only the
    names set in `environ`, each once.

    Example:
        >>> forwarded_names({"PATH": "/bin", "TF_CPP_MIN_LOG_LEVEL": "2", "HOME": "/root",
        ...                  "SYNCBN_LAUNCH_TIMEOUT": "9", "MY_FLAG": "1"}, exported=["MY_FLAG"])
        ['PATH', 'TF_CPP_MIN_LOG_LEVEL', 'MY_FLAG']
    """
    families = sorted(name for name in environ if name.startswith(FORWARDED_PREFIXES)
                      and not name.startswith(LAUNCHER_PREFIX))
    names = [name for name in (*FORWARDED, *families, *exported) if name in environ]
    return list(dict.fromkeys(names))


class HostRunner:
    """Base class: how to start a command on one host."""

    #: True if the command runs on this machine (signals reach the process itself).
    is_local = True
    #: What the kernel sends the started process if the launcher dies.
    death_signal = signal.SIGKILL

    def command(self, argv, added_env, cwd):
        """Returns `(popen_argv, popen_env)` that run `argv` with `added_env` in `cwd`."""
        raise NotImplementedError


class LocalRunner(HostRunner):
    """Runs on this machine, in the launcher's environment plus the rank's variables."""

    def __init__(self, base_env=None):
        self._base_env = base_env

    def command(self, argv, added_env, cwd):
        base = os.environ if self._base_env is None else self._base_env
        return list(argv), {**base, **added_env}

    def __repr__(self):
        return "LocalRunner()"


class NetnsRunner(LocalRunner):
    """Runs on this machine inside network namespace `namespace`."""

    def __init__(self, namespace, base_env=None):
        super().__init__(base_env)
        self.namespace = namespace

    def command(self, argv, added_env, cwd):
        argv, env = super().command(argv, added_env, cwd)
        return ["ip", "netns", "exec", self.namespace, *argv], env

    def __repr__(self):
        return f"NetnsRunner({self.namespace!r})"


class SshRunner(HostRunner):
    """Runs on `host` over ssh; the rank's variables and `forwarded_names` cross over.

    Args:
        host: ssh destination.
        port: ssh port, or None for ssh's default.
        identity_file: ssh `-i` file, or None.
        exported: names of launcher environment variables to forward as well (`-x`).
        base_env: environment to forward from (default: `os.environ`).
        config_file: ssh `-F` file, or None for the user's own configuration.

    Example:
        >>> runner = SshRunner("node2", base_env={"PATH": "/venv/bin", "HOME": "/root",
        ...                                       "SYNCBN_COLLECTIVE_TIMEOUT": "60"})
        >>> runner.command(["python", "t.py"], {"RANK": "1"}, "/w")[0][-1]
        'cd /w && exec env PATH=/venv/bin SYNCBN_COLLECTIVE_TIMEOUT=60 RANK=1 python t.py'
    """

    is_local = False

    def __init__(self, host, port=None, identity_file=None, exported=(), base_env=None,
                 config_file=None):
        self.host = host
        self.port = port
        self.identity_file = identity_file
        self.exported = tuple(exported)
        self.config_file = config_file
        self._base_env = base_env

    def ssh_options(self):
        """The ssh options (no host, no command); mpirun's `plm_rsh_args` too."""
        options = list(SSH_OPTIONS)
        if self.config_file:
            options = ["-F", self.config_file, *options]
        if self.port is not None:
            options += ["-p", str(self.port)]
        if self.identity_file:
            options += ["-i", self.identity_file]
        return options

    def remote_shell_command(self, argv, added_env, cwd):
        base = os.environ if self._base_env is None else self._base_env
        env = {name: base[name] for name in forwarded_names(base, self.exported)}
        env.update(added_env)
        assignments = " ".join(f"{name}={shlex.quote(value)}" for name, value in env.items())
        command = " ".join(shlex.quote(arg) for arg in argv)
        return f"cd {shlex.quote(cwd)} && exec env {assignments} {command}"

    def command(self, argv, added_env, cwd):
        ssh = ["ssh", *self.ssh_options(), self.host,
               self.remote_shell_command(argv, added_env, cwd)]
        base = os.environ if self._base_env is None else self._base_env
        return ssh, dict(base)

    def __repr__(self):
        return f"SshRunner({self.host!r})"


def srun_step(nodes, cwd):
    """srun's argv, before the command, for a job step of one task on each of `nodes`. Pure.

    The step runs inside the allocation the launcher runs in. `--overlap` lets
    steps share the allocation's CPUs (Slurm 21.08+ gives each step its CPUs
    alone otherwise, and a rank would wait for another's); `--mpi=none`, since
    the backend sets up the job's world, not Slurm; `--export=ALL` passes on
    the whole environment srun is given, also in a batch script submitted with
    `--export=NONE` (whose `SLURM_EXPORT_ENV` srun would follow).

    Example:
        >>> " ".join(srun_step(["node1", "node2"], "/w"))  # doctest: +NORMALIZE_WHITESPACE
        'srun --overlap --nodes=2 --ntasks=2 --ntasks-per-node=1 --nodelist=node1,node2
         --mpi=none --export=ALL --kill-on-bad-exit=1 --chdir=/w'
    """
    return ["srun", "--overlap", f"--nodes={len(nodes)}", f"--ntasks={len(nodes)}",
            "--ntasks-per-node=1", f"--nodelist={','.join(nodes)}", "--mpi=none",
            "--export=ALL", "--kill-on-bad-exit=1", f"--chdir={cwd}"]


class SrunRunner(HostRunner):
    """Runs on node `node` of this Slurm allocation, as a job step of one task (`srun_step`).

    The task gets the launcher's whole environment and the rank's variables, as
    a local rank does. srun forwards SIGTERM to the task, and gets SIGTERM
    (`death_signal`) if the launcher dies, so the step ends with it.

    Example:
        >>> runner = SrunRunner("node1", base_env={"PATH": "/venv/bin"})
        >>> argv, env = runner.command(["python", "t.py"], {"RANK": "1"}, "/w")
        >>> argv[0], argv[5], argv[-2:]
        ('srun', '--nodelist=node1', ['python', 't.py'])
        >>> env["RANK"], env["PATH"]
        ('1', '/venv/bin')
    """

    is_local = False
    death_signal = signal.SIGTERM

    def __init__(self, node, base_env=None):
        self.node = node
        self._base_env = base_env

    def command(self, argv, added_env, cwd):
        base = os.environ if self._base_env is None else self._base_env
        return [*srun_step([self.node], cwd), *argv], {**base, **added_env}

    def __repr__(self):
        return f"SrunRunner({self.node!r})"
