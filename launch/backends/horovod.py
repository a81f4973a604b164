"""Horovod over Gloo, the way `horovodrun --gloo` does it (horovod/runner/gloo_run.py).

The launcher runs Horovod's own `RendezvousServer`, initialised with the slot plan
from Horovod's `get_host_assignments`; each rank gets the `HOROVOD_*` variables of
its slot. Horovod is imported here only, when this backend is chosen.
"""

import logging
import os

from launch.backends.common import rank_workers
from launch.environment import horovod_env

logger = logging.getLogger("launch")


def horovod_plan(hosts, num_proc):
    """Horovod's slot plan for our hosts, as `launch.hosts.Slot`s."""
    from horovod.runner.common.util.hosts import HostInfo, get_host_assignments

    from launch.hosts import Slot

    plan = get_host_assignments([HostInfo(h.name, h.slots) for h in hosts], num_proc, num_proc)
    return plan, [Slot(s.hostname, s.rank, s.local_rank, s.cross_rank, s.size,
                       s.local_size, s.cross_size) for s in plan]


class HorovodBackend:
    name = "horovod"

    def __init__(self, options):
        self.cycle_time_ms = options.horovod_cycle_time
        self._server = None

    def workers(self, placement):
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
