"""Train a keras.applications ResNet50 with synchronized batch norm, then export it.

`syncbn.convert` swaps the model's 53 BatchNormalization layers for
SyncBatchNormalization; the training steps run under Horovod (gradients
summed with `hvd.allreduce` by hand: Horovod's Keras helpers are written for
Keras 2); `syncbn.convert(..., to="local")` turns the layers back into plain
BatchNormalization for export and serving. Random data, a few steps.

    python examples/convert_resnet50.py --steps 2
    horovodrun -np 2 --gloo python examples/convert_resnet50.py --steps 2
"""

import argparse
import logging
import os
import tempfile

import numpy as np

NUM_CLASSES = 10
INPUT_SHAPE = (64, 64, 3)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="training steps (default: 3)")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="samples per process and step (default: 4)")
    parser.add_argument("--output", default=None,
                        help="where rank 0 saves the exported .keras model "
                             "(default: a file in a temporary directory)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    import keras
    import tensorflow as tf

    import syncbn

    hvd = syncbn.init_horovod()
    rank, size = hvd.rank(), hvd.size()

    model = keras.applications.ResNet50(weights=None, input_shape=INPUT_SHAPE, classes=NUM_CLASSES)
    model = syncbn.convert(model)  # communicator="auto": Horovod when size > 1
    # Start every rank from rank 0's weights.
    for index, variable in enumerate(model.variables):
        variable.assign(hvd.broadcast(variable.value, root_rank=0, name=f"init_{index}"))

    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction="sum")
    global_batch = args.batch_size * size

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            # This rank's share of the global mean loss; the sum over ranks is the mean.
            loss = loss_fn(y, model(x, training=True)) / global_batch
        variables = model.trainable_variables
        gradients = [
            hvd.allreduce(g, op=hvd.Sum, name=f"grad_{i}")
            for i, g in enumerate(tape.gradient(loss, variables))
        ]
        optimizer.apply_gradients(zip(gradients, variables))
        return hvd.allreduce(loss, op=hvd.Sum, name="loss")

    rng = np.random.default_rng(rank)  # each rank its own data
    for step in range(args.steps):
        x = rng.normal(size=(args.batch_size,) + INPUT_SHAPE).astype(np.float32)
        y = rng.integers(0, NUM_CLASSES, args.batch_size)
        loss = float(train_step(x, y))
        if rank == 0:
            print(f"step {step + 1}/{args.steps}: loss {loss:.4f} ({size} process(es))", flush=True)

    exported = syncbn.convert(model, to="local")
    x = np.random.default_rng(99).normal(size=(2,) + INPUT_SHAPE).astype(np.float32)
    difference = float(np.max(np.abs(exported(x, training=False) - model(x, training=False))))
    if rank == 0:
        path = args.output or os.path.join(tempfile.mkdtemp(), "resnet50_exported.keras")
        exported.save(path)
        print(f"exported {len(exported.syncbn_converted_layers)} layers back to BatchNormalization; "
              f"max abs output difference {difference:.3g}; saved to {path}", flush=True)


if __name__ == "__main__":
    main()
