"""What the test jobs share: their world, and how they print a result line.

A job's `--backend` (`horovod`, `mpi` or `tf`, or `auto` where a job takes it)
names a `syncbn.world` World; `open_world` sets it up. Every job gets rank,
size, strategy and process sums from it.
"""

import os
import sys

# The jobs' --backend, and the world (syncbn.world) it means; a World's name is
# also the layer's `communicator` that sums in it.
WORLDS = {"horovod": "horovod", "mpi": "mpi", "tf": "tf.distribute"}


def open_world(backend, group_size=None):
    """The `syncbn.world` World of the job's `--backend` (`auto`: from the environment).

    `group_size` declares Horovod's process sets for layers of that `group_size`.
    """
    from syncbn import world as worlds

    name = (worlds.world_name_from_environment(os.environ) if backend == "auto"
            else WORLDS[backend])
    return worlds.create_world(name, **({"group_size": group_size} if name == "horovod" else {}))


def say(line):
    """Prints `line` in one write, so that the lines of ranks sharing a pipe do not interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
