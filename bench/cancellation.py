"""Accuracy of the moving variance far from zero: Keras `synchronized=True` vs syncbn.

Two in-process replicas (MirroredStrategy on two virtual CPUs), 256 samples
each, 8 channels of data with std 1 and the given offset; momentum 0, so the
moving variance is the batch variance. Prints the largest relative error
against float64 NumPy on the same float32 data.

    python bench/cancellation.py
"""

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import syncbn  # noqa: E402

OFFSETS = (1e2, 1e3, 1e4, 1e5)
PER_REPLICA = 256


def moving_variance_error(strategy, make_layer, x):
    with strategy.scope():
        layer = make_layer()
        layer.build((None, x.shape[1]))

    def shard(ctx):
        i = ctx.replica_id_in_sync_group
        return tf.constant(x[i * PER_REPLICA:(i + 1) * PER_REPLICA])

    data = strategy.experimental_distribute_values_from_function(shard)
    tf.function(lambda d: strategy.run(lambda v: layer(v, training=True), args=(d,)))(data)
    truth = x.astype(np.float64).var(0)
    return float(np.max(np.abs(layer.moving_variance.numpy() - truth) / truth))


def main():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    print("command: python bench/cancellation.py\n")
    print("| data offset (std 1) | Keras synchronized=True | syncbn |")
    print("|---|---|---|")
    for offset in OFFSETS:
        x = (offset + np.random.default_rng(0).normal(size=(2 * PER_REPLICA, 8))).astype(np.float32)
        keras_error = moving_variance_error(
            strategy, lambda: keras.layers.BatchNormalization(momentum=0.0, synchronized=True), x)
        ours = moving_variance_error(strategy, lambda: syncbn.SyncBatchNormalization(momentum=0.0), x)
        print(f"| {offset:g} | {keras_error:.3g} | {ours:.3g} |")


if __name__ == "__main__":
    main()
