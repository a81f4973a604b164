"""A training step with `communicator="auto"` and nothing set up: no Horovod, no strategy.

Started by a launcher as one of several processes whose world it cannot
join, every copy must raise `syncbn.world.LauncherWorldError` at the layer's
first training call, naming the launcher's variable and the fix, rather than
normalize its own batch alone. Started alone, it trains locally and says so.

    horovodrun -np 2 --gloo python tests/jobs/no_world.py     # raises on every rank
"""

import os
import sys

import numpy as np


def main():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    import syncbn

    layer = syncbn.SyncBatchNormalization()
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 3)), tf.float32)
    layer(x, training=True)
    print("no_world: trained with this process's batch alone", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
