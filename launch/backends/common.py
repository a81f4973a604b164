"""Pieces shared by the backends: their base class, and one process per rank (horovod, tf)."""

import contextlib

from launch.environment import build_rank_env
from launch.supervisor import WorkerSpec


class Backend(contextlib.AbstractContextManager):
    """A backend: takes the job's `LaunchConfig`, gives the `WorkerSpec`s of a placement.

    Used as a context manager; `close()` ends what `workers` started.
    """

    name = None

    def __init__(self, config):
        self.config = config

    def workers(self, placement):
        """The `launch.supervisor.WorkerSpec`s that run `placement`'s ranks."""
        raise NotImplementedError

    def close(self):
        """Ends what `workers` started; idempotent."""

    def __exit__(self, *exc_info):
        self.close()


def rank_workers(placement, backend_env_for, base_env):
    """One `WorkerSpec` per rank: common rank variables + `backend_env_for(slot)`."""
    specs = []
    for slot in placement.slots:
        env = build_rank_env(
            slot,
            cpus=placement.cpus,
            gpu_ids=placement.gpu_ids,
            shared_machine=placement.shared_machine,
            base_env=base_env,
            error_dir=placement.job_dir,
        )
        env.update(backend_env_for(slot))
        runner = placement.runners[slot.hostname]
        argv, popen_env = runner.command(placement.command, env, placement.cwd)
        specs.append(
            WorkerSpec(
                label=str(slot.rank),
                argv=argv,
                env=popen_env,
                rank=slot.rank,
                cwd=placement.cwd if runner.is_local else None,
                death_signal=runner.death_signal,
            )
        )
    return specs
