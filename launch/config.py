"""The launcher's configuration: the command line, its environment fallbacks, and `LaunchConfig`.

Every option falls back to an environment variable, `SYNCBN_LAUNCH_<DEST>`
(`--grace-period` -> `SYNCBN_LAUNCH_GRACE_PERIOD`): the command line wins over
the environment, which wins over the built-in default. One argparse action,
`EnvDefault` (with its flag and list variants), reads the variable and writes
the option's help suffix, `(default: ...; env ...)`, so both come from one
place. `LaunchConfig.from_args` then turns argparse's namespace into a frozen
`LaunchConfig`, validated once; backends and placement take that value.

Example:
    >>> config = LaunchConfig.from_args(build_parser().parse_args(
    ...     ["-np", "2", "--backend", "mpi", "--", "python", "train.py"]))
    >>> config.num_proc, config.command, config.gpus_per_host
    (2, ('python', 'train.py'), 'auto')
"""

import argparse
import contextlib
import dataclasses
import os
from typing import Optional, Tuple, Union

from launch import hosts as hosts_lib
from launch.backends import BACKENDS, default_backend
from launch.backends.horovod import CONTROLLERS
from launch.backends.tf import TF_MPI_CHOICES

ENV_PREFIX = "SYNCBN_LAUNCH_"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class EnvDefault(argparse.Action):
    """`store`, with the default taken from the environment; writes the help suffix.

    Args (besides argparse's own):
        default_text: how `--help` describes the built-in default.
        env: the variables to read, first set one wins (default:
            `SYNCBN_LAUNCH_<DEST>`).
    """

    env_note = ""  # how the help shows the variable's value, e.g. "=1"

    def __init__(self, option_strings, dest, *, default_text="none", env=None, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.env = tuple(env or (ENV_PREFIX + dest.upper(),))
        for name in self.env:
            text = os.environ.get(name, "")
            if text != "":
                self.default = self.from_env(name, text, self.type, self.choices)
                break
        names = ", then ".join(f"{name}{self.env_note}" for name in self.env)
        self.help = f"{self.help} (default: {default_text}; env {names})"

    def from_env(self, name, text, convert, choices):
        try:
            value = convert(text) if convert else text
        except ValueError:
            raise ValueError(f"Environment variable `{name}` must be a valid {convert.__name__} "
                             f"for {'/'.join(self.option_strings)}. Received: {name}={text!r}"
                             ) from None
        if choices is not None and value not in choices:
            raise ValueError(f"Environment variable `{name}` must be one of {tuple(choices)}. "
                             f"Received: {name}={text!r}")
        return value

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)


class EnvFlag(EnvDefault):
    """`store_true`, with the default from the environment (1/true/yes/on or 0/false/no/off)."""

    env_note = "=1"

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, default_text="off",
                         **kwargs)

    def from_env(self, name, text, convert, choices):
        if text.lower() not in _TRUE + _FALSE:
            raise ValueError(f"Environment variable `{name}` must be one of {_TRUE + _FALSE}. "
                             f"Received: {name}={text!r}")
        return text.lower() in _TRUE

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)


class EnvList(EnvDefault):
    """`append`, with the default list from the environment, comma-separated."""

    env_note = " (comma-separated)"

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, default=[], **kwargs)

    def from_env(self, name, text, convert, choices):
        return [item.strip() for item in text.split(",") if item.strip()]

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), values])


def build_parser():
    """The `syncbn-launch` parser; defaults read the `SYNCBN_LAUNCH_*` variables now.

    Raises:
        ValueError: if one of those variables holds a value its option rejects.
    """
    parser = argparse.ArgumentParser(
        prog="syncbn-launch", epilog="Example: syncbn-launch -np 4 --simulate-hosts 2 "
                                     "--backend horovod -- python train.py",
        description="Start N ranks of a distributed job, prefix their output with [rank], "
                    "and stop all of them as soon as one fails.")
    _add_ranks_and_hosts(parser.add_argument_group("ranks and hosts").add_argument)
    _add_backend(parser.add_argument_group("backend").add_argument)
    _add_remote_hosts(parser.add_argument_group("remote hosts (ssh)").add_argument)
    _add_supervision(parser.add_argument_group("supervision and output").add_argument)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the program to run, after `--`")
    return parser


def _add_ranks_and_hosts(add):
    """The options of the "ranks and hosts" group of `--help`."""
    add("-np", "--num-proc", action=EnvDefault, type=int, metavar="N",
        default_text="none, required", help="number of ranks")
    add("-H", "--hosts", action=EnvDefault, default_text="localhost:N",
        help="hosts and slots, 'host1:2,host2:2'; local names (localhost, this host's name) "
             "run without ssh, others over ssh")
    add("--simulate-hosts", action=EnvDefault, type=int, metavar="N", default_text="off",
        help="run the ranks on N simulated hosts: network namespaces on a bridge, root only")
    add("--ssh", action=EnvFlag,
        help="with --simulate-hosts: an sshd in every simulated host, reached over ssh as -H "
             "reaches remote machines, instead of `ip netns exec`")
    add("--slurm", action=EnvFlag,
        help="with --simulate-hosts: run a Slurm cluster on the simulated hosts (munged, "
             "slurmctld, a slurmd per host) and the command once, on this machine (the login "
             "node), with SLURM_CONF set; no -np")
    add("--gpus-per-host", action=EnvDefault, default="auto", default_text="auto",
        metavar="N|auto",
        help="GPUs per host, one per local rank through CUDA_VISIBLE_DEVICES; 'auto': when "
             "every host is this machine, CUDA_VISIBLE_DEVICES if set, else the `nvidia-smi -L` "
             "count; with other machines, each host's `nvidia-smi -L` count (0 without it), "
             "which must agree. 0: CPUs, TF/OpenMP threads divided among local ranks")
    add("--cpus-per-host", action=EnvDefault, type=int, metavar="N",
        default_text="cores usable by the launcher", help="cores per host, for dividing threads")


def _add_backend(add):
    """The options of the "backend" group of `--help`."""
    add("--backend", action=EnvDefault, choices=BACKENDS,
        default_text="horovod if installed, else tf if TensorFlow is, else mpi",
        help="horovod (over MPI or Gloo), tf (TF_CONFIG for MultiWorkerMirroredStrategy) "
             "or mpi (one mpirun)")
    add("--horovod-controller", action=EnvDefault, choices=CONTROLLERS, default="auto",
        default_text="auto: mpi if Horovod has MPI and mpirun is on PATH, else gloo",
        help="how Horovod ranks start and talk, as with horovodrun: mpi (mpirun; syncbn then "
             "sums BN statistics over MPI directly) or gloo (Horovod's rendezvous)")
    add("--tf-mpi", action=EnvDefault, choices=TF_MPI_CHOICES, default="auto",
        default_text="auto: yes if mpirun is on PATH and mpi4py is installed",
        help="start the tf backend's workers under mpirun (each still gets its TF_CONFIG), so "
             "that syncbn sums BN statistics over MPI beside the strategy")
    add("--horovod-cycle-time", action=EnvDefault, type=float, metavar="MS",
        env=(ENV_PREFIX + "HOROVOD_CYCLE_TIME", "HOROVOD_CYCLE_TIME"),
        default_text="unset: `syncbn.init_horovod()` sets 0.1 on Gloo, where sync BN's small "
                     "collectives each wait for a cycle, and keeps Horovod's own 1 on MPI, "
                     "where they do not",
        help="HOROVOD_CYCLE_TIME of the ranks, in ms")
    add("--network-interface", action=EnvDefault, metavar="IFACE",
        default_text="lo on one machine, sbn0 on simulated hosts, else the interface of the "
                     "route to the first remote host",
        help="interface the ranks talk over (Gloo iface, mpirun btl/oob)")
    add("--launcher-address", action=EnvDefault, metavar="ADDRESS",
        default_text="source address of the route to the first remote host",
        help="address remote ranks reach the launcher at (Horovod's rendezvous)")


def _add_remote_hosts(add):
    """The options of the "remote hosts (ssh)" group of `--help`."""
    add("--ssh-port", action=EnvDefault, type=int, metavar="PORT", default_text="ssh's own",
        help="ssh port")
    add("--ssh-identity-file", action=EnvDefault, metavar="FILE", help="ssh -i file")
    add("-x", "--export", action=EnvList, metavar="NAME",
        help="also forward this launcher variable to remote ranks, repeatable; PATH, "
             "PYTHONPATH, LD_LIBRARY_PATH, VIRTUAL_ENV and every SYNCBN_*, NCCL_*, TF_*, "
             "HOROVOD_* and OMPI_MCA_* variable are forwarded anyway")


def _add_supervision(add):
    """The options of the "supervision and output" group of `--help`."""
    add("--timeout", action=EnvDefault, type=float, metavar="SECONDS",
        help="end the job after this many seconds, with exit code 124")
    add("--grace-period", action=EnvDefault, type=float, default=3.0, default_text="3",
        metavar="SECONDS", help="seconds between SIGTERM and SIGKILL when stopping ranks")
    add("--output-dir", action=EnvDefault, metavar="DIR",
        help="also write each rank's output to DIR/rank.N.log")
    add("-v", "--verbose", action=EnvFlag,
        help="log the commands started and the variables forwarded to remote ranks")

@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """What `syncbn-launch` was asked to do, validated on creation. Immutable.

    Attributes are the options of `build_parser` (see `syncbn-launch --help`),
    with `command` a tuple of strings, `hosts` a tuple of `launch.hosts.Host`
    (None: `localhost:num_proc`), `gpus_per_host` 'auto' or an int, `export` a
    tuple of names, `backend` never None (`from_args` picks the default), and
    `num_proc` None with `slurm` (the command runs once, it starts the ranks).

    Raises:
        ValueError, TypeError: naming the argument and the value it received.
    """

    num_proc: int
    command: Tuple[str, ...]
    backend: str
    hosts: Optional[Tuple[hosts_lib.Host, ...]] = None
    simulate_hosts: Optional[int] = None
    ssh: bool = False
    slurm: bool = False
    gpus_per_host: Union[str, int] = "auto"
    cpus_per_host: Optional[int] = None
    horovod_controller: str = "auto"
    tf_mpi: str = "auto"
    horovod_cycle_time: Optional[float] = None
    network_interface: Optional[str] = None
    launcher_address: Optional[str] = None
    ssh_port: Optional[int] = None
    ssh_identity_file: Optional[str] = None
    export: Tuple[str, ...] = ()
    timeout: Optional[float] = None
    grace_period: float = 3.0
    output_dir: Optional[str] = None
    verbose: bool = False

    def __post_init__(self):
        if not self.command:
            raise ValueError("No command given. Received: nothing after `--`; "
                             "usage: syncbn-launch -np 2 -- python train.py")
        if self.slurm:
            self._check_slurm()
        elif self.num_proc is None:
            raise ValueError("Argument `-np` is required. Received: none")
        else:
            hosts_lib.validate_num_proc(self.num_proc, self.hosts)
        for name, value, choices in (("--backend", self.backend, BACKENDS),
                                     ("--horovod-controller", self.horovod_controller, CONTROLLERS),
                                     ("--tf-mpi", self.tf_mpi, TF_MPI_CHOICES)):
            if value not in choices:
                raise ValueError(f"Argument `{name}` must be one of {choices}. "
                                 f"Received: {name}={value!r}")
        if self.hosts is not None and self.simulate_hosts is not None:
            raise ValueError("Arguments `-H` and `--simulate-hosts` exclude each other. "
                             f"Received: both, --simulate-hosts={self.simulate_hosts}")
        if self.simulate_hosts is not None and not self.slurm:
            hosts_lib.simulated_hosts_spec(self.num_proc, self.simulate_hosts)
        if self.ssh and self.simulate_hosts is None:
            raise ValueError(
                "Argument `--ssh` needs `--simulate-hosts N` (remote hosts given with `-H` are "
                "always reached over ssh). Received: --ssh without --simulate-hosts")
        if self.gpus_per_host != "auto" and (
                isinstance(self.gpus_per_host, bool) or not isinstance(self.gpus_per_host, int)
                or self.gpus_per_host < 0):
            raise ValueError("Argument `--gpus-per-host` must be 'auto' or an integer >= 0. "
                             f"Received: {self.gpus_per_host!r}")
        for name, value, lowest, inclusive in (
                ("--cpus-per-host", self.cpus_per_host, 1, True),
                ("--horovod-cycle-time", self.horovod_cycle_time, 0, False),
                ("--ssh-port", self.ssh_port, 0, False),
                ("--timeout", self.timeout, 0, False),
                ("--grace-period", self.grace_period, 0, True)):
            if value is not None and (value < lowest if inclusive else value <= lowest):
                raise ValueError(f"Argument `{name}` must be {'>=' if inclusive else '>'} "
                                 f"{lowest}. Received: {name}={value}")

    def _check_slurm(self):
        """`--slurm` runs the command once beside a cluster of `--simulate-hosts N` nodes."""
        if self.simulate_hosts is None:
            raise ValueError(
                "Argument `--slurm` needs `--simulate-hosts N` (inside a real allocation, "
                "syncbn-launch finds the nodes by itself). Received: --slurm without "
                "--simulate-hosts")
        if isinstance(self.simulate_hosts, bool) or not isinstance(self.simulate_hosts, int) \
                or self.simulate_hosts < 1:
            raise ValueError("Argument `--simulate-hosts` must be an integer >= 1. "
                             f"Received: --simulate-hosts={self.simulate_hosts!r}")
        for name, given in (("-np", self.num_proc is not None), ("--ssh", self.ssh)):
            if given:
                raise ValueError(
                    f"Argument `{name}` does not apply with `--slurm`, which runs the command "
                    "once, on the login node; start ranks from the command (srun, sbatch, "
                    f"syncbn-launch inside an allocation). Received: --slurm with {name}")

    @classmethod
    def from_args(cls, args):
        """The config of argparse's namespace `args` (from `build_parser`)."""
        command = list(args.command)
        if command[:1] == ["--"]:
            command = command[1:]
        gpus = args.gpus_per_host
        with contextlib.suppress(ValueError):  # 'auto', or a bad value __post_init__ names
            gpus = int(gpus)
        return cls(
            num_proc=args.num_proc, command=tuple(command),
            backend=args.backend or default_backend(),
            hosts=None if args.hosts is None else tuple(hosts_lib.parse_hosts(args.hosts)),
            simulate_hosts=args.simulate_hosts, ssh=args.ssh, slurm=args.slurm,
            gpus_per_host=gpus,
            cpus_per_host=args.cpus_per_host, horovod_controller=args.horovod_controller,
            tf_mpi=args.tf_mpi, horovod_cycle_time=args.horovod_cycle_time,
            network_interface=args.network_interface, launcher_address=args.launcher_address,
            ssh_port=args.ssh_port, ssh_identity_file=args.ssh_identity_file,
            export=tuple(args.export), timeout=args.timeout, grace_period=args.grace_period,
            output_dir=args.output_dir, verbose=args.verbose)
