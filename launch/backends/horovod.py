"""Horovod, the way `horovodrun` does it: over MPI when Horovod was built with MPI and
`mpirun` is on PATH, else over Gloo (`--horovod-controller` chooses).

- MPI: one `mpirun` (`launch.backends.mpirun`; horovod/runner/mpi_run.py), with
  `HOROVOD_CONTROLLER=mpi` and `HOROVOD_CPU_OPERATIONS=mpi`. syncbn's Horovod
  communicator then sums BN statistics over MPI directly instead of through
  Horovod's cycle, so Horovod's own 1 ms cycle is kept.
- Gloo (horovod/runner/gloo_run.py): the launcher runs Horovod's own
  `RendezvousServer`, initialised with the slot plan from Horovod's
  `get_host_assignments`; each rank gets the `HOROVOD_*` variables of its slot.
  BN statistics then travel through Horovod's queue, so `syncbn.init_horovod()`
  shortens the cycle to 0.1 ms (`HOROVOD_CONTROLLER=gloo` tells it).

`--horovod-cycle-time` sets the cycle for either. Horovod is imported here
only, when this backend is chosen.
"""

import glob
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys

from launch.backends.common import Backend, rank_workers
from launch.backends.mpirun import mpirun_worker
from launch.environment import horovod_env

logger = logging.getLogger("launch")
CONTROLLERS = ("auto", "mpi", "gloo")
# Measured with bench/sync_step.py; see the README's performance section.
_PROBE = "import horovod.tensorflow as hvd; print(int(hvd.mpi_built()))"


def _cache_dir():
    default = os.path.join(os.path.expanduser("~"), ".cache", "syncbn")
    return os.environ.get("SYNCBN_CACHE_DIR", default)


def horovod_mpi_built(python=sys.executable):
    """Whether the installed Horovod's TensorFlow extension was built with MPI.

    Asking Horovod means importing TensorFlow (seconds), as horovodrun does, so
    the answer is cached per build of the extension (its path, size and mtime).
    """
    spec = importlib.util.find_spec("horovod")
    if spec is None or not spec.submodule_search_locations:
        return False
    libraries = glob.glob(os.path.join(spec.submodule_search_locations[0], "tensorflow",
                                       "mpi_lib*.so"))
    if not libraries:
        return False
    stat = os.stat(libraries[0])
    key = hashlib.sha256(f"{libraries[0]}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    cached = os.path.join(_cache_dir(), f"horovod-mpi-built-{key[:16]}")
    try:
        with open(cached) as handle:
            return handle.read().strip() == "1"
    except OSError:
        pass
    probe = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if probe.returncode != 0:
        raise RuntimeError(f"cannot import horovod.tensorflow: {probe.stderr.strip()[-2000:]}")
    answer = probe.stdout.strip().splitlines()[-1]
    try:
        os.makedirs(_cache_dir(), exist_ok=True)
        with open(cached, "w") as handle:
            handle.write(answer)
    except OSError as error:  # a read-only home: ask again next time
        logger.debug("not caching Horovod's MPI support in %s: %s", cached, error)
    return answer == "1"


def resolve_controller(requested, *, mpirun, mpi_built):
    """'mpi' or 'gloo' for `--horovod-controller requested`. Pure.

    Args:
        requested: 'auto', 'mpi' or 'gloo'.
        mpirun: path of `mpirun`, or None when it is not on PATH.
        mpi_built: zero-argument callable, True if Horovod was built with MPI
            (called only when the answer matters).

    Example:
        >>> resolve_controller("auto", mpirun="/usr/bin/mpirun", mpi_built=lambda: True)
        'mpi'
        >>> resolve_controller("auto", mpirun=None, mpi_built=lambda: True)
        'gloo'
    """
    if requested not in CONTROLLERS:
        raise ValueError(f"Argument `--horovod-controller` must be one of {CONTROLLERS}. "
                         f"Received: --horovod-controller={requested!r}")
    if requested == "gloo":
        return "gloo"
    if requested == "mpi":
        if mpirun is None:
            raise FileNotFoundError("`--horovod-controller mpi` needs Open MPI's `mpirun` on PATH")
        if not mpi_built():
            raise RuntimeError("`--horovod-controller mpi`: this Horovod was built without MPI "
                               "(HOROVOD_WITH_MPI=1 at build time)")
        return "mpi"
    return "mpi" if mpirun is not None and mpi_built() else "gloo"


def horovod_plan(hosts, num_proc):
    """Horovod's slot plan for our hosts, as `launch.hosts.Slot`s."""
    from horovod.runner.common.util.hosts import HostInfo, get_host_assignments

    from launch.hosts import Slot

    plan = get_host_assignments([HostInfo(h.name, h.slots) for h in hosts], num_proc, num_proc)
    return plan, [Slot(s.hostname, s.rank, s.local_rank, s.cross_rank, s.size,
                       s.local_size, s.cross_size) for s in plan]


class HorovodBackend(Backend):
    name = "horovod"

    def __init__(self, config):
        super().__init__(config)
        self.cycle_time_ms = config.horovod_cycle_time
        self.controller = resolve_controller(
            config.horovod_controller, mpirun=shutil.which("mpirun"),
            mpi_built=horovod_mpi_built)
        self._server = None

    def workers(self, placement):
        if self.controller == "mpi":
            return self._mpi_workers(placement)
        return self._gloo_workers(placement)

    def _mpi_workers(self, placement):
        env = {"HOROVOD_CONTROLLER": "mpi", "HOROVOD_CPU_OPERATIONS": "mpi"}
        if self.cycle_time_ms is not None:
            env["HOROVOD_CYCLE_TIME"] = format(float(self.cycle_time_ms), "g")
        logger.info("Horovod over MPI (mpirun)%s", "".join(f", {k}={v}" for k, v in env.items()
                                                          if k == "HOROVOD_CYCLE_TIME"))
        return [mpirun_worker(placement, env)]

    def _gloo_workers(self, placement):
        from horovod.runner.http.http_server import RendezvousServer

        plan, slots = horovod_plan(placement.hosts, len(placement.slots))
        if slots != placement.slots:
            raise RuntimeError(
                f"rank assignment differs from Horovod's: {placement.slots} vs {slots}"
            )
        self._server = RendezvousServer(verbose=0)
        port = self._server.start()
        self._server.init(plan)
        logger.info("Horovod Gloo rendezvous at %s:%d (iface %s)",
                    placement.launcher_address, port, placement.iface)

        def backend_env(slot):
            return horovod_env(
                slot,
                rendezvous_addr=placement.launcher_address,
                rendezvous_port=port,
                iface=placement.iface,
                cycle_time_ms=self.cycle_time_ms,
            )

        return rank_workers(placement, backend_env, os.environ)

    def close(self):
        if self._server is not None:
            self._server.stop()
            self._server = None
