"""A training step with `communicator="auto"` and nothing set up: no Horovod, no strategy.

Started by a launcher as one of several processes whose world it cannot
join, every copy must raise `syncbn.world.LauncherWorldError` at the layer's
first training call, naming the launcher's variable and the fix, rather than
normalize its own batch alone. Started alone, it trains locally and says so.

With `--check`, it first runs `python -m syncbn.check --rounds 0` in this
process and prints the check's exit code: the check reports the same broken
world as a failed row of its table, and the process pays TensorFlow's
start-up once for both.

    horovodrun -np 2 --gloo python tests/jobs/no_world.py     # raises on every rank
    srun -n 2 --mpi=none python tests/jobs/no_world.py --check
"""

import os
import sys

import numpy as np


def main(argv):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    import syncbn

    if "--check" in argv:
        from syncbn.check import cli as check

        code = check.main(["--rounds", "0"])
        print(f"no_world: syncbn.check exited with {code}", flush=True)
    layer = syncbn.SyncBatchNormalization()
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 3)), tf.float32)
    layer(x, training=True)
    print("no_world: trained with this process's batch alone", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
