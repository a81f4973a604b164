"""`model.fit` with SyncBatchNormalization on Horovod, with Keras 3.

Each rank trains on its own shard of scikit-learn's digits (8x8 images,
nothing downloaded). The glue in `syncbn.horovod_keras` makes it a proper
data-parallel job: rank 0's initial weights and optimizer state are
broadcast, gradients are averaged over the ranks, the epoch logs are
averaged, and only rank 0 prints and checkpoints.

    python examples/horovodrun_fit.py --epochs 1                  # one process
    horovodrun -np 2 --gloo python examples/horovodrun_fit.py     # two
    python -m launch -np 2 --backend horovod -- python examples/horovodrun_fit.py
"""

import argparse
import os

import keras
import numpy as np
from sklearn.datasets import load_digits

import syncbn
from syncbn import horovod_keras as hk


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="default 5; 1 is a quick check")
    parser.add_argument("--batch-size", type=int, default=32, help="per rank (default 32)")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="if given, rank 0 saves DIR/epoch<E>.keras after every epoch")
    return parser.parse_args()


def rank_shard(x, y, rank, size):
    """Equal shards, so that every rank runs the same number of steps."""
    usable = len(x) // size * size
    return x[rank:usable:size], y[rank:usable:size]


def main():
    args = parse_args()
    syncbn.init_horovod()
    rank, size = hk.rank(), hk.size()

    digits = load_digits()
    x = (digits.images[..., None] / 16.0).astype(np.float32)  # [N, 8, 8, 1]
    y = digits.target
    split = len(x) * 4 // 5
    x_train, y_train = rank_shard(x[:split], y[:split], rank, size)
    x_val, y_val = rank_shard(x[split:], y[split:], rank, size)

    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(16, 3, use_bias=False),
        # A short run: moving statistics that follow the batches quickly.
        syncbn.SyncBatchNormalization(momentum=0.9),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])
    model.compile(
        # Scaled by the number of ranks: the global batch is size * batch_size.
        optimizer=hk.DistributedOptimizer(keras.optimizers.Adam(1e-2 * size)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    callbacks = [hk.BroadcastInitialState(root_rank=0), hk.MetricAverage()]
    if args.checkpoint_dir:
        path = os.path.join(args.checkpoint_dir, "epoch{epoch}.keras")
        callbacks += hk.chief_only(keras.callbacks.ModelCheckpoint(path))
    history = model.fit(x_train, y_train, validation_data=(x_val, y_val),
                        batch_size=args.batch_size, epochs=args.epochs,
                        callbacks=callbacks, verbose=2 if hk.is_chief() else 0)
    if hk.is_chief():
        print(f"{size} rank(s): val_accuracy={history.history['val_accuracy'][-1]:.3f}")


if __name__ == "__main__":
    main()
