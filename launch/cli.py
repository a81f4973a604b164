"""Command line of `syncbn-launch` (also `python -m launch`).

    syncbn-launch -np 4 [-H host1:2,host2:2 | --simulate-hosts 2 [--ssh]]
                  [--backend horovod|mpi|tf] [--timeout SECONDS] [--output-dir DIR]
                  -- python train.py ARGS
    syncbn-launch --simulate-hosts 2 --slurm -- sbatch --wait job.sbatch

Inside a Slurm allocation (`SLURM_JOB_ID` set) and without `-H`, the ranks run
on the allocation's nodes (`launch.placement.allocation_site`).

The options and their `SYNCBN_LAUNCH_<OPTION>` fallbacks are in `launch.config`.
`run` starts what the job needs under one `contextlib.ExitStack`, so it is
torn down in one place, in reverse order, whatever happens.
"""

import contextlib
import logging
import os
import signal
import sys
import tempfile

from launch.backends import create_backend
from launch.config import LaunchConfig, build_parser
from launch.hostexec import forwarded_names
from launch.netns import remove_stale_directories
from launch.placement import (allocation_site, in_allocation, listed_site, make_placement,
                              simulated_site)
from launch.supervisor import Supervisor, WorkerSpec

logger = logging.getLogger("launch")


def run(config):
    """Runs the job of a `LaunchConfig`; returns the exit code."""
    if os.geteuid() == 0:
        # Open MPI refuses root without both (Gloo and TF do not care).
        os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    with contextlib.ExitStack() as stack:
        if config.slurm:
            return _run_beside_simulated_slurm(config, stack)
        backend = stack.enter_context(create_backend(config))
        remove_stale_directories(own_pid=os.getpid())  # left by SIGKILLed launchers
        # The pid in the name lets a later launcher remove it if this one is SIGKILLed.
        job_dir = stack.enter_context(
            tempfile.TemporaryDirectory(prefix=f"syncbn-launch-{os.getpid()}-"))
        network = ssh_servers = None
        if config.simulate_hosts:
            from launch.netns import SimulatedNetwork

            network = stack.enter_context(SimulatedNetwork(config.simulate_hosts))
            if config.ssh:
                from launch.netns_ssh import SimulatedSsh

                ssh_servers = stack.enter_context(SimulatedSsh(network))
        if network is not None:
            site = simulated_site(config, network, ssh_servers)
        elif config.hosts is None and in_allocation(os.environ):
            site = allocation_site(config, job_dir=job_dir)
        else:
            site = listed_site(config)
        placement = make_placement(config, site, cwd=os.getcwd(), job_dir=job_dir)
        specs = backend.workers(placement)
        logger.info("backend %s: %d ranks on %s", config.backend, config.num_proc,
                    ",".join(f"{h.name}:{h.slots}" for h in placement.hosts))
        _log_forwarding(config, placement)
        for spec in specs:
            logger.debug("%s: %s", spec.label, " ".join(spec.argv))
        # With ranks on other machines, the error files would tell only part of the
        # story; the output names the failing rank then.
        supervisor = Supervisor(
            specs, output_dir=config.output_dir, grace_period=config.grace_period,
            timeout=config.timeout, error_dir=job_dir if placement.error_files_readable else None)
        return supervisor.run()


def _run_beside_simulated_slurm(config, stack):
    """`--simulate-hosts N --slurm`: the command, once, on this machine (the login node) with
    `SLURM_CONF` set, while a Slurm cluster runs on the simulated hosts; `stack` owns both."""
    from launch.netns import SimulatedNetwork
    from launch.slurm import SimulatedSlurm

    network = stack.enter_context(SimulatedNetwork(config.simulate_hosts))
    cluster = stack.enter_context(SimulatedSlurm(network))
    # SIGTERM, not SIGKILL, if the launcher dies: srun and salloc then cancel their jobs.
    login = WorkerSpec(label="login", argv=list(config.command),
                       env={**os.environ, **cluster.env()}, cwd=os.getcwd(),
                       death_signal=signal.SIGTERM)
    return Supervisor([login], output_dir=config.output_dir, grace_period=config.grace_period,
                      timeout=config.timeout).run()


def _log_forwarding(config, placement):
    for name in config.export:
        if name not in os.environ:
            logger.warning("-x %s: not set in the launcher's environment, so not forwarded", name)
    if any(not runner.is_local for runner in placement.runners.values()):
        logger.debug("forwarded to remote ranks: %s",
                     " ".join(forwarded_names(os.environ, config.export)))


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv=None):
    """Entry point of `syncbn-launch`; returns the exit code."""
    # Until the supervisor installs its own handlers, SIGTERM/SIGHUP unwind like
    # Ctrl-C, so simulated hosts and servers set up so far are still torn down.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    try:
        parser = build_parser()
    except ValueError as error:  # a SYNCBN_LAUNCH_* variable the option rejects
        sys.stderr.write(f"syncbn-launch: error: {error}\n")
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="[launcher] %(levelname)s %(message)s", stream=sys.stderr)
    try:
        config = LaunchConfig.from_args(args)
    except (ValueError, TypeError, RuntimeError) as error:
        parser.error(str(error))
    try:
        return run(config)
    except KeyboardInterrupt as interrupt:
        logger.error("interrupted (%s) before the ranks started", interrupt or "SIGINT")
        return 130
    except (ValueError, TypeError, RuntimeError, OSError) as error:
        logger.error("%s", error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
