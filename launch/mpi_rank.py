"""`python -m launch.mpi_rank -- CMD...`: what mpirun runs for each rank.

1. Rebuilds the rank's `Slot` from `OMPI_COMM_WORLD_*` and sets the variables of
   `launch.environment.build_rank_env` (job-wide inputs come as `SYNCBN_LAUNCH_*`,
   among them the directory of the ranks' error files),
   and for `--backend tf` its `TF_CONFIG` from `SYNCBN_LAUNCH_TF_WORKERS`.
2. Forks a small prefixer that copies the rank's stdout and stderr to the real
   stdout as `[rank] line`, one whole line per write (so lines of different ranks
   do not interleave in mpirun's output).
   The prefixer also watches the launcher (`SYNCBN_LAUNCH_PID`, set when every
   host shares this machine's PID namespace) and kills the rank if the launcher
   dies and mpirun has not ended the job.
3. Execs CMD, so the rank stays mpirun's direct child with its own exit status.
"""

import os
import select
import signal
import sys

from launch.environment import build_rank_env, slot_from_mpi_env, tf_config


def _alive(pid):
    """True if `pid` exists and is not a zombie (read from /proc, Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _prefix_lines(read_fd, write_fd, prefix, rank_pid, launcher_pid=None):
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # drain to EOF; the rank decides when to stop
    buffer = b""
    idle_while_orphaned = 0
    while True:
        if launcher_pid and not _alive(launcher_pid):
            # The launcher is gone and mpirun did not end the job: end this rank.
            try:
                os.kill(rank_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            launcher_pid = None
        ready, _, _ = select.select([read_fd], [], [], 0.5)
        if not ready:
            # The rank died but something (a child of it) keeps the pipe open: give up.
            if os.getppid() != rank_pid:
                idle_while_orphaned += 1
                if idle_while_orphaned >= 2:
                    break
            continue
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        if lines:
            os.write(write_fd, b"".join(prefix + line + b"\n" for line in lines))
    if buffer:
        os.write(write_fd, prefix + buffer + b"\n")
    os._exit(0)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        sys.exit("usage: python -m launch.mpi_rank -- COMMAND [ARGS...]")
    slot = slot_from_mpi_env(os.environ)
    if slot is None:
        sys.exit("launch.mpi_rank: no OMPI_COMM_WORLD_* variables; run me under mpirun")
    gpu_ids = [g for g in os.environ.get("SYNCBN_LAUNCH_GPU_IDS", "").split(",") if g]
    os.environ.update(build_rank_env(
        slot,
        cpus=int(os.environ.get("SYNCBN_LAUNCH_CPUS") or os.cpu_count() or 1),
        gpu_ids=gpu_ids,
        shared_machine=os.environ.get("SYNCBN_LAUNCH_SHARED_MACHINE") == "1",
        base_env=os.environ,
        error_dir=os.environ.get("SYNCBN_LAUNCH_ERROR_DIR"),
    ))
    tf_workers = os.environ.get("SYNCBN_LAUNCH_TF_WORKERS")
    if tf_workers:  # `--backend tf` under mpirun: this rank is worker `rank`
        os.environ["TF_CONFIG"] = tf_config(slot.rank, tf_workers.split(","))
    stdout_fd = os.dup(1)
    read_fd, write_fd = os.pipe()
    rank_pid = os.getpid()
    if os.fork() == 0:
        os.close(write_fd)
        launcher_pid = int(os.environ.get("SYNCBN_LAUNCH_PID") or 0) or None
        _prefix_lines(read_fd, stdout_fd, f"[{slot.rank}] ".encode(), rank_pid, launcher_pid)
    os.close(read_fd)
    os.close(stdout_fd)
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
