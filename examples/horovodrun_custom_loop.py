"""A custom `tf.function` training loop with SyncBatchNormalization on Horovod.

The training flag is a `tf.Variable`, so one traced function trains on a
batch (batch statistics synchronized over the ranks, gradients averaged with
`allreduce_gradients`) and then evaluates with the moving statistics, with
no retracing. Weights and optimizer state start from rank 0's.

    python examples/horovodrun_custom_loop.py --steps 20                  # one process
    horovodrun -np 2 --gloo python examples/horovodrun_custom_loop.py     # two
"""

import argparse

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

import syncbn
from syncbn import horovod_keras as hk


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="default 200; 20 is a quick check")
    parser.add_argument("--batch-size", type=int, default=32, help="per rank (default 32)")
    parser.add_argument("--log-every", type=int, default=10)
    return parser.parse_args()


def main():
    args = parse_args()
    hvd = syncbn.init_horovod()
    rank, size = hk.rank(), hk.size()

    digits = load_digits()
    x = (digits.images[..., None] / 16.0).astype(np.float32)  # [N, 8, 8, 1]
    y = digits.target.astype(np.int64)
    split = len(x) * 4 // 5
    # Each rank draws its batches from its own seed: different data, same step count.
    rng = np.random.default_rng(rank)

    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(16, 3, use_bias=False),
        # A short run: moving statistics that follow the batches quickly.
        syncbn.SyncBatchNormalization(momentum=0.9),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])
    optimizer = keras.optimizers.Adam(1e-2 * size)
    optimizer.build(model.trainable_variables)  # create Adam's moments now, to broadcast them
    hk.broadcast_variables(model.weights + optimizer.variables, root_rank=0)

    training = tf.Variable(False, trainable=False)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_then_evaluate(x_batch, y_batch, x_eval, y_eval):
        training.assign(True)
        with tf.GradientTape() as tape:
            loss = loss_fn(y_batch, model(x_batch, training=training))  # mean over the local batch
        grads = hk.allreduce_gradients(tape.gradient(loss, model.trainable_variables))
        optimizer.apply(grads, model.trainable_variables)
        training.assign(False)
        logits = model(x_eval, training=training)
        accuracy = tf.reduce_mean(tf.cast(tf.argmax(logits, -1) == y_eval, tf.float32))
        # Global numbers for logging: every rank joins, rank 0 prints.
        return hvd.allreduce(tf.stack([loss, accuracy]), op=hvd.Average, name="example_logs")

    for step in range(1, args.steps + 1):
        batch = rng.integers(0, split, args.batch_size)
        held_out = rng.integers(split, len(x), args.batch_size)
        loss, accuracy = train_then_evaluate(x[batch], y[batch], x[held_out], y[held_out]).numpy()
        if hk.is_chief() and (step % args.log_every == 0 or step == args.steps):
            print(f"step {step}: loss={loss:.3f} val_accuracy={accuracy:.3f}", flush=True)
    if hk.is_chief():
        print(f"{size} rank(s): val_accuracy={accuracy:.3f}")


if __name__ == "__main__":
    main()
