"""Open MPI: one `mpirun` (`launch.backends.mpirun`) that runs every rank."""

from launch.backends.common import Backend
from launch.backends.mpirun import mpirun_worker


class MpiBackend(Backend):
    name = "mpi"

    def workers(self, placement):
        return [mpirun_worker(placement)]
