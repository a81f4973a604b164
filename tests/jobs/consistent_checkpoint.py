"""`horovod_keras.ConsistentModelCheckpoint` under Horovod: checks before the chief saves.

Every rank fits the same small model (one SyncBatchNormalization, `bn`) for
two epochs with the callback writing `DIR/epoch<E>.keras`. With `--diverge`,
the last rank adds 0.5 to `bn`'s moving mean just before the second epoch's
checkpoint: every rank must then raise `InconsistentReplicasError` naming
`bn`, and the second checkpoint must not be written. Each rank prints
`rank=R checks=N` or `rank=R raised: ...`, and exits 3 if it raised.

    syncbn-launch -np 2 --backend horovod -- python tests/jobs/consistent_checkpoint.py --dir /tmp/c
"""

import argparse
import os
import sys

import numpy as np


class Diverge:
    """Alters the moving mean of `bn` on one rank at the end of epoch `epoch`."""

    def __init__(self, keras, epoch):
        class _Callback(keras.callbacks.Callback):
            def on_epoch_end(self, current, logs=None):
                if current == epoch:
                    layer = self.model.get_layer("bn")
                    layer.moving_mean.assign(layer.moving_mean.numpy() + 0.5)

        self.callback = _Callback()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--diverge", action="store_true")
    args = parser.parse_args(argv)
    import keras

    import syncbn
    from syncbn import horovod_keras as hk

    syncbn.init_horovod()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                              syncbn.SyncBatchNormalization(name="bn"), keras.layers.Dense(1)])
    model.compile(optimizer=hk.DistributedOptimizer(keras.optimizers.SGD(0.01)), loss="mse",
                  jit_compile=False)
    rng = np.random.default_rng(hk.rank())
    x, y = rng.normal(size=(32, 4)).astype(np.float32), rng.normal(size=(32, 1)).astype(np.float32)
    checkpoint = hk.ConsistentModelCheckpoint(os.path.join(args.dir, "epoch{epoch}.keras"))
    callbacks = [hk.BroadcastInitialState()]
    if args.diverge and hk.rank() == hk.size() - 1:
        callbacks.append(Diverge(keras, epoch=1).callback)
    callbacks.append(checkpoint)
    code = 0
    try:
        model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=callbacks)
        sys.stdout.write(f"rank={hk.rank()} checks={checkpoint.checks}\n")
    except syncbn.InconsistentReplicasError as error:
        sys.stdout.write(f"rank={hk.rank()} raised: {error}\n")
        code = 3
    sys.stdout.flush()
    import horovod.tensorflow as hvd

    hvd.allreduce(np.zeros(1, np.float32), name="consistent_checkpoint_done")  # both print first
    return code


if __name__ == "__main__":
    sys.exit(main())
