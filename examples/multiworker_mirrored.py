"""SyncBatchNormalization under tf.distribute's MultiWorkerMirroredStrategy.

Each worker is one process with a `TF_CONFIG` (the launcher writes them:
`--backend tf`). Under a strategy, `communicator="auto"` finds the replica
context and all-reduces the statistics with the strategy's own collectives.

The training loop is written out with `strategy.run`: Keras 3's `model.fit`
does not run under MultiWorkerMirroredStrategy (it fails converting a
`PerReplica` value, with plain BatchNormalization too; keras-team/keras#20585).
The Keras optimizer sums the replicas' gradients itself inside `strategy.run`.

    python -m launch -np 2 --backend tf -- python examples/multiworker_mirrored.py
    python examples/multiworker_mirrored.py --epochs 1      # one process, one replica
"""

import argparse
import json
import os

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

import syncbn


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="default 3; 1 is a quick check")
    parser.add_argument("--global-batch-size", type=int, default=16,
                        help="split over the workers (default 16)")
    return parser.parse_args()


def main():
    args = parse_args()
    # Collectives fail after this long instead of hanging if a worker dies.
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=600)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
    is_chief = task.get("index", 0) == 0

    digits = load_digits()
    x = (digits.images[..., None] / 16.0).astype(np.float32)
    y = digits.target
    split = len(x) * 4 // 5
    # Every worker builds the same dataset; the strategy shards each global batch.
    train = tf.data.Dataset.from_tensor_slices((x[:split], y[:split])).shuffle(
        2048, seed=0).batch(args.global_batch_size, drop_remainder=True)
    train = strategy.experimental_distribute_dataset(train)

    with strategy.scope():
        model = keras.Sequential([
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, use_bias=False),
            syncbn.SyncBatchNormalization(momentum=0.9),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ])
        optimizer = keras.optimizers.Adam(1e-2)
        optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="sum")

    @tf.function
    def train_step(images, labels):
        def replica_step(images, labels):
            with tf.GradientTape() as tape:
                # Sum over the local batch / global batch: the replicas' sum is the mean.
                loss = loss_fn(labels, model(images, training=True)) / args.global_batch_size
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)
            return loss

        losses = strategy.run(replica_step, args=(images, labels))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    for epoch in range(args.epochs):
        losses = [float(train_step(images, labels)) for images, labels in train]
        logits = model.predict(x[split:], verbose=0)
        accuracy = float(np.mean(np.argmax(logits, -1) == y[split:]))
        if is_chief:
            print(f"epoch {epoch + 1}: loss {np.mean(losses):.4f}, val accuracy {accuracy:.4f}",
                  flush=True)
    bn = model.layers[1]
    checksum = float(sum(np.abs(w.numpy()).sum() for w in model.weights))
    print(f"worker {task.get('index', 0)}: replicas in sync {strategy.num_replicas_in_sync}, "
          f"val accuracy {accuracy:.4f}, weight checksum {checksum:.6f}, "
          f"moving mean[0] {float(bn.moving_mean.numpy()[0]):.6f}", flush=True)

if __name__ == "__main__":
    main()
