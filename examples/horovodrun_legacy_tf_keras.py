"""A horovodrun script written for tf.keras (Keras 2), with synchronized batch norm: one line changed.

Scripts that use Horovod's Keras helpers (`horovod.tensorflow.keras`) run
on TensorFlow 2.16 and newer with `TF_USE_LEGACY_KERAS=1`, where `tf.keras`
is tf_keras. This is such a script, as its users write it: `hvd.init()`,
Horovod's GPU pinning recipe, a `tf.keras` model with batch normalization,
`hvd.DistributedOptimizer`, Horovod's callbacks, checkpoints written by rank
0. The one change is the import of `BatchNormalization` (marked below):
`syncbn.SyncBatchNormalization` follows `tf.keras`, so here it is a tf_keras
layer that normalizes with the statistics of all ranks' batches. At the end
rank 0 loads its last `.h5` checkpoint back, with no `custom_objects`.

    horovodrun -np 2 --gloo python examples/horovodrun_legacy_tf_keras.py
    horovodrun -np 2 --gloo python examples/horovodrun_legacy_tf_keras.py --epochs 1  # quick
"""

import argparse
import os
import tempfile

os.environ["TF_USE_LEGACY_KERAS"] = "1"  # before TensorFlow or syncbn is imported

import horovod.tensorflow.keras as hvd  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

# from tensorflow.keras.layers import BatchNormalization          # before
from syncbn import SyncBatchNormalization as BatchNormalization  # noqa: E402  # the one changed line


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="default 4; 1 is a quick check")
    parser.add_argument("--batch-size", type=int, default=32, help="per rank (default 32)")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="where rank 0 writes checkpoint-<epoch>.h5 (default: a temporary folder)")
    return parser.parse_args()


def main():
    args = parse_args()
    hvd.init()

    # Horovod's recipe: each process sees one GPU, with memory growth.
    gpus = tf.config.experimental.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        tf.config.experimental.set_visible_devices(gpus[hvd.local_rank()], "GPU")

    # Each rank trains on its own shard of scikit-learn's digits (8x8 images).
    digits = load_digits()
    x = (digits.images[..., None] / 16.0).astype(np.float32)
    y = digits.target
    split = len(x) * 4 // 5
    usable = split // hvd.size() * hvd.size()  # equal shards: the same number of steps everywhere
    x_train, y_train = x[hvd.rank():usable:hvd.size()], y[hvd.rank():usable:hvd.size()]
    x_val, y_val = x[split:], y[split:]

    model = tf.keras.Sequential([
        tf.keras.layers.Conv2D(16, 3, use_bias=False, input_shape=(8, 8, 1)),
        BatchNormalization(momentum=0.9),
        tf.keras.layers.ReLU(),
        tf.keras.layers.Conv2D(32, 3, use_bias=False),
        BatchNormalization(momentum=0.9),
        tf.keras.layers.ReLU(),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(10),
    ])
    # The learning rate scaled by the number of ranks, as Horovod's examples do.
    optimizer = hvd.DistributedOptimizer(tf.keras.optimizers.Adam(0.005 * hvd.size()))
    model.compile(optimizer=optimizer, metrics=["accuracy"],
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    callbacks = [
        # Rank 0's initial weights and optimizer state to every rank.
        hvd.callbacks.BroadcastGlobalVariablesCallback(0),
        # Epoch logs averaged over the ranks.
        hvd.callbacks.MetricAverageCallback(),
    ]
    checkpoint_dir = args.checkpoint_dir or tempfile.mkdtemp()
    if hvd.rank() == 0:  # one writer
        callbacks.append(tf.keras.callbacks.ModelCheckpoint(
            os.path.join(checkpoint_dir, "checkpoint-{epoch}.h5")))
    history = model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
                        validation_data=(x_val, y_val), callbacks=callbacks,
                        verbose=2 if hvd.rank() == 0 else 0)

    if hvd.rank() == 0:
        path = os.path.join(checkpoint_dir, f"checkpoint-{args.epochs}.h5")
        restored = tf.keras.models.load_model(path)  # no custom_objects: importing syncbn registered it
        difference = np.max(np.abs(restored.predict(x_val, verbose=0) - model.predict(x_val, verbose=0)))
        layers = sorted({type(layer).__name__ for layer in restored.layers
                         if isinstance(layer, BatchNormalization)})
        print(f"{hvd.size()} rank(s): val_accuracy={history.history['val_accuracy'][-1]:.3f}; "
              f"reloaded {os.path.basename(path)}: {', '.join(layers)}, largest prediction "
              f"difference {difference:.1e}")


if __name__ == "__main__":
    main()
