"""Training steps of a `syncbn.convert`-ed model across Horovod ranks.

Every rank builds the same seeded model with plain `BatchNormalization`
layers (nested two levels deep, and two on parallel branches), converts a copy with `syncbn.convert`, and
trains the copy on its own slice of the same seeded global batches (uneven
slices, `--counts`): local loss summed and divided by the
global count, gradients summed with `hvd.allreduce(op=hvd.Sum)`. Each rank
also trains the unconverted original on the whole global batch, in this one
process, as the reference.

After the steps it checks that the moving statistics (and all weights) are
bitwise identical on every rank, and that they equal the reference's within
`--tolerance` (relative to the largest magnitude of each variable, or
absolute below 1). It
prints one result line per rank and exits 1 on a mismatch.

    horovodrun -np 2 --gloo python tests/jobs/convert_train_step.py --counts 5,2
    mpirun -np 2 python tests/jobs/convert_train_step.py --counts 5,2   # BN sums over MPI
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobs.common import open_world, say  # noqa: E402

IMAGE_SHAPE = (8, 8, 3)
NUM_OUTPUTS = 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default=None,
                        help="per-rank batch sizes, e.g. 5,2 (default: 5,2,... cycled)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    return parser.parse_args(argv)


def build_model():
    """The unconverted model; call after seeding so every rank gets the same weights.

    Small on purpose: a keras.applications model at a test-sized input (say
    MobileNetV2 at 32x32, batch 4) has BN layers over a handful of values,
    where float32 rounding differences between any two BN implementations
    grow by orders of magnitude within a few SGD steps, so no tolerance
    would separate a bug from that.
    """
    import keras

    layers = keras.layers
    # Level 2: a Functional block with its own BN.
    block_input = keras.Input((8, 8, 6))
    block_output = layers.ReLU()(layers.BatchNormalization(momentum=0.8)(
        layers.Conv2D(6, 3, padding="same", use_bias=False)(block_input)))
    block = keras.Model(block_input, block_output, name="block")
    # Level 1: a Sequential holding a BN and the block.
    stem = keras.Sequential([
        keras.Input(IMAGE_SHAPE),
        layers.Conv2D(6, 3, padding="same", use_bias=False),
        layers.BatchNormalization(momentum=0.7),
        block,
    ], name="stem")
    inputs = keras.Input(IMAGE_SHAPE)
    stem_output = stem(inputs)
    # Two BN layers on parallel branches: their collectives have no data order
    # between them, so this also checks that every rank runs them in one order.
    side = layers.BatchNormalization(momentum=0.6, name="side_bn")(
        layers.Conv2D(6, 1, use_bias=False)(stem_output))
    features = layers.Add()([layers.BatchNormalization(momentum=0.9, name="top_bn")(stem_output),
                             side])
    outputs = layers.Dense(NUM_OUTPUTS)(layers.GlobalAveragePooling2D()(features))
    return keras.Model(inputs, outputs, name="nested")


def global_batches(input_shape, total, steps, seed=2024):
    """The same `(x, y)` global batches on every rank."""
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(1.0, 2.0, (total,) + tuple(input_shape)).astype(np.float32),
         rng.normal(size=(total, NUM_OUTPUTS)).astype(np.float32))
        for _ in range(steps)
    ]


def moving_statistics(model):
    """Name -> value of every moving mean/variance, nested layers included."""
    return {v.path: v.numpy() for v in model.weights if "moving_" in v.path}


def relative_difference(value, reference):
    """Largest difference relative to the variable's magnitude, or to 1 below it.

    The floor keeps near-zero variables meaningful: a BN `beta` feeding
    another batch-normalized layer has a gradient that is rounding noise.
    """
    scale = max(float(np.max(np.abs(reference))), 1.0)
    return float(np.max(np.abs(value - reference))) / scale


def run_check(world, counts=None, steps=3, learning_rate=0.1, tolerance=1e-4):
    """Trains the converted model on this rank of `world` (Horovod's); returns one record.

    The record holds the printed line and `ok`.
    """
    import keras
    import tensorflow as tf

    import syncbn

    hvd = world.hvd
    rank, size = world.process_rank, world.num_processes
    counts = list(counts) if counts else [(5, 2)[r % 2] for r in range(size)]
    if len(counts) != size:
        raise ValueError(f"Argument `counts` needs {size} entries. Received: counts={counts}")
    start = sum(counts[:rank])
    total = sum(counts)

    keras.utils.set_random_seed(1234)
    original = build_model()
    converted = syncbn.convert(original, communicator="horovod")
    num_bn = sum(isinstance(layer, keras.layers.BatchNormalization)
                 for layer in original._flatten_layers())
    num_sync = sum(isinstance(layer, syncbn.SyncBatchNormalization)
                   for layer in converted._flatten_layers())
    failures = []
    if num_sync != num_bn or len(converted.syncbn_converted_layers) != num_bn:
        failures.append(f"converted {num_sync} of {num_bn} BatchNormalization layers")

    batches = global_batches(original.input_shape[1:], total, steps)
    reference_optimizer = keras.optimizers.SGD(learning_rate)
    converted_optimizer = keras.optimizers.SGD(learning_rate)

    @tf.function
    def reference_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(original(x, training=True) - y))
        variables = original.trainable_variables
        reference_optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))

    @tf.function
    def converted_step(x, y):
        with tf.GradientTape() as tape:
            # Local share of the global mean: summed over ranks, the global loss.
            squared = tf.square(converted(x, training=True) - y)
            loss = tf.reduce_sum(squared) / float(total * NUM_OUTPUTS)
        variables = converted.trainable_variables
        gradients = [
            hvd.allreduce(g, op=hvd.Sum, name=f"grad_{i}")
            for i, g in enumerate(tape.gradient(loss, variables))
        ]
        converted_optimizer.apply_gradients(zip(gradients, variables))

    for x, y in batches:
        reference_step(x, y)
        converted_step(x[start:start + counts[rank]], y[start:start + counts[rank]])

    # Same moving statistics and weights on every rank, bit for bit.
    flat = np.concatenate([np.ravel(w) for w in converted.get_weights()]).astype(np.float32)
    gathered = world.gather_per_process(flat)
    across_ranks = float(np.max(np.abs(gathered - gathered[0])))
    if across_ranks != 0.0:
        failures.append(f"weights differ across ranks by {across_ranks:.3g}")

    reference_stats = moving_statistics(original)
    converted_stats = moving_statistics(converted)
    if sorted(reference_stats) != sorted(converted_stats):
        failures.append("moving statistics variables differ: "
                        f"{sorted(reference_stats)} vs {sorted(converted_stats)}")
        stats_error = float("inf")
    else:
        stats_error = max(relative_difference(converted_stats[k], reference_stats[k])
                          for k in reference_stats)
    weights_error = max(relative_difference(a, b) for a, b in
                        zip(converted.get_weights(), original.get_weights()))
    moved = max(relative_difference(converted_stats[k], np.full_like(converted_stats[k],
                float("moving_variance" in k))) for k in converted_stats)
    if not stats_error <= tolerance:
        failures.append(f"moving statistics differ from the reference by {stats_error:.3g}")
    if not weights_error <= tolerance:
        failures.append(f"weights differ from the reference by {weights_error:.3g}")
    if moved == 0.0:
        failures.append("moving statistics never moved from their initial values")

    status = "OK" if not failures else "MISMATCH: " + "; ".join(failures)
    from syncbn.collectives.horovod import horovod_communicator

    line = (f"convert_train_step rank={rank} size={size} counts={counts} "
            f"kernel={horovod_communicator().kernel} "
            f"steps={steps} bn_converted={num_sync} across_ranks_max_abs={across_ranks:.3g} "
            f"moving_stats_rel_err={stats_error:.3g} weights_rel_err={weights_error:.3g} {status}")
    say(line)
    return {"line": line, "ok": not failures}


def main(argv=None):
    args = parse_args(argv)
    world = open_world("horovod")
    record = run_check(world, [int(c) for c in args.counts.split(",")] if args.counts else None,
                       args.steps, args.learning_rate, args.tolerance)
    world.barrier()
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
