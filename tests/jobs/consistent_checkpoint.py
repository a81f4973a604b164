"""`horovod_keras.ConsistentModelCheckpoint` under Horovod: checks before the chief saves.

Every rank fits the same small model (one SyncBatchNormalization, `bn`) for
two epochs with the callback writing `DIR/<run>/epoch<E>.keras`, twice:

* `agree`: nothing alters the model; both checkpoints are written and each
  rank prints `rank=R checks=2`;
* `diverge`: the last rank adds 0.5 to `bn`'s moving mean just before the
  second epoch's checkpoint; every rank must then raise
  `InconsistentReplicasError` naming `bn` (printed as `rank=R raised: ...`),
  and the second checkpoint must not be written.

It exits 0 when both runs went that way on this rank, else 1.

    syncbn-launch -np 2 --backend horovod -- python tests/jobs/consistent_checkpoint.py --dir /tmp/c
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobs.common import open_world  # noqa: E402


class Diverge:
    """Alters the moving mean of `bn` on one rank at the end of epoch `epoch`."""

    def __init__(self, keras, epoch):
        class _Callback(keras.callbacks.Callback):
            def on_epoch_end(self, current, logs=None):
                if current == epoch:
                    layer = self.model.get_layer("bn")
                    layer.moving_mean.assign(layer.moving_mean.numpy() + 0.5)

        self.callback = _Callback()


def fit(directory, diverge):
    """Fits the model with the checkpoint callback; returns the exception it raised, or None."""
    import keras

    import syncbn
    from syncbn import horovod_keras as hk

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                              syncbn.SyncBatchNormalization(name="bn"), keras.layers.Dense(1)])
    model.compile(optimizer=hk.DistributedOptimizer(keras.optimizers.SGD(0.01)), loss="mse",
                  jit_compile=False)
    rng = np.random.default_rng(hk.rank())
    x, y = rng.normal(size=(32, 4)).astype(np.float32), rng.normal(size=(32, 1)).astype(np.float32)
    checkpoint = hk.ConsistentModelCheckpoint(os.path.join(directory, "epoch{epoch}.keras"))
    callbacks = [hk.BroadcastInitialState()]
    if diverge and hk.rank() == hk.size() - 1:
        callbacks.append(Diverge(keras, epoch=1).callback)
    callbacks.append(checkpoint)
    try:
        model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=callbacks)
    except syncbn.InconsistentReplicasError as error:
        sys.stdout.write(f"rank={hk.rank()} raised: {error}\n")
        sys.stdout.flush()
        return error
    sys.stdout.write(f"rank={hk.rank()} checks={checkpoint.checks}\n")
    sys.stdout.flush()
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    args = parser.parse_args(argv)
    world = open_world("horovod")
    agreed = fit(os.path.join(args.dir, "agree"), diverge=False) is None
    world.barrier()  # both ranks printed before the next run
    refused = fit(os.path.join(args.dir, "diverge"), diverge=True) is not None
    world.barrier()
    return 0 if agreed and refused else 1


if __name__ == "__main__":
    sys.exit(main())
