"""SyncBatchNormalization under plain `mpirun`, with mpi4py and no Horovod.

`communicator="auto"` sees the MPI launcher's environment and all-reduces
the statistics over MPI (a compiled kernel, or mpi4py from
`tf.numpy_function` where no compiler is available; inside `tf.function`
too). The gradients go through the same communicator: one all-reduce of all
of them, flattened.

    mpirun -np 2 python examples/mpirun_train.py
    python -m launch -np 2 --backend mpi -- python examples/mpirun_train.py
    python examples/mpirun_train.py --steps 5          # one process
"""

import argparse

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

import syncbn
from syncbn import collectives


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--batch-size", type=int, default=8, help="per rank (default 8)")
    return parser.parse_args()


def average_gradients(communicator, grads):
    """One all-reduce for every gradient: flatten, sum, divide, split back."""
    flat = tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)
    flat = communicator.all_sum(flat, "gradients") / communicator.num_replicas
    sizes = [int(np.prod(g.shape)) for g in grads]
    return [tf.reshape(part, g.shape) for part, g in zip(tf.split(flat, sizes), grads)]


def main():
    args = parse_args()
    # "mpi" under mpirun; "local" in a single process.
    communicator = collectives.resolve("auto")
    if communicator.name == "mpi":
        from mpi4py import MPI

        rank = MPI.COMM_WORLD.Get_rank()
    else:
        rank = 0

    digits = load_digits()
    x = (digits.images[..., None] / 16.0).astype(np.float32)
    y = digits.target
    split = len(x) * 4 // 5
    keras.utils.set_random_seed(0)  # the same initial weights on every rank
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(16, 3, use_bias=False),
        syncbn.SyncBatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step(images, labels):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(images, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(average_gradients(communicator, grads), model.trainable_variables)
        return loss

    rng = np.random.default_rng(rank)  # each rank draws its own batches
    for step in range(args.steps):
        rows = rng.integers(0, split, args.batch_size)
        loss = train_step(tf.constant(x[rows]), tf.constant(y[rows]))
    accuracy = float(np.mean(np.argmax(model.predict(x[split:], verbose=0), -1) == y[split:]))
    checksum = float(sum(np.abs(w.numpy()).sum() for w in model.weights))
    print(f"rank {rank}: communicator {communicator.name}, last loss {float(loss):.4f}, "
          f"val accuracy {accuracy:.4f}, weight checksum {checksum:.6f}", flush=True)


if __name__ == "__main__":
    main()
