"""Pieces shared by the per-rank backends (horovod, tf)."""

import signal

from launch.environment import build_rank_env
from launch.supervisor import WorkerSpec


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
                death_signal=getattr(runner, "death_signal", signal.SIGKILL),
            )
        )
    return specs
