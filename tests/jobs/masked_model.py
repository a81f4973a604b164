"""A model with Masking and then batch norm on axis 1, trained on several ranks, against one process.

The model takes sequences of `STEPS` time steps of `FEATURES` features:
`Masking` (a time step whose features are all 0 is masked out), then batch
normalization with `axis=1`, the time steps as channels. Keras's mask has
the input's shape without its last axis, `[batch, STEPS]`, and is broadcast
over the features: it covers the channel axis, so every time step has its
own count. A `Dense` layer on every time step follows.

Every rank builds the same global batches from a seed and trains, on its own
rows (`--counts`), the model with `SyncBatchNormalization` (communicator
"auto": whatever the launcher set up, `syncbn.world` tells which); the first
rank's rows are all masked out. Gradients are summed over ranks (the loss is
a sum over the global batch divided by its size), and SGD steps every rank
alike. In the same process it trains the model with
`keras.layers.BatchNormalization` on the whole global batch, from the same
weights. After every step it compares the batch norm's moving statistics,
its rank's rows of the outputs and every weight, prints one line and exits 1
on a mismatch.

    syncbn-launch -np 2 --backend mpi -- python tests/jobs/masked_model.py --counts 4,6

`run_check` runs it in a world that is already set up (`syncbn.world`);
tests/jobs/world_checks.py runs it with the other checks of a launch.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobs.common import open_world, say  # noqa: E402
from syncbn.check.reference import relative_error  # noqa: E402

STEPS = 5  # time steps: the channels of the batch norm
FEATURES = 3
LEARNING_RATE = 0.1
MOMENTUM = 0.6


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="4,6", help="per-rank batch sizes (default 4,6)")
    parser.add_argument("--steps", type=int, default=3, help="training steps (default 3)")
    parser.add_argument("--tolerance", type=float, default=2e-4)
    return parser.parse_args(argv)


def global_batches(counts, steps, seed=2024):
    """Per step `(x, y)` of the global batch; about 30% of time steps masked out (all 0)."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(steps):
        x = rng.normal(1.5, 2.0, (sum(counts), STEPS, FEATURES)).astype(np.float32)
        masked = rng.random((sum(counts), STEPS)) < 0.3
        masked[:counts[0]] = True  # the first rank has rows, all masked out
        x[masked] = 0.0
        y = rng.normal(size=(sum(counts), STEPS, 1)).astype(np.float32)
        batches.append((x, y))
    return batches


def build_model(batch_norm):
    import keras

    keras.utils.set_random_seed(7)
    inputs = keras.Input((STEPS, FEATURES))
    masked = keras.layers.Masking(mask_value=0.0)(inputs)
    normalized = batch_norm(axis=1, momentum=MOMENTUM, gamma_initializer="random_normal",
                            beta_initializer="random_normal")(masked)
    return keras.Model(inputs, keras.layers.Dense(1)(normalized))


def train_step(model, x, y, global_count):
    """Loss: this replica's squared errors summed, over the global batch size."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        out = model(x, training=True)
        loss = tf.reduce_sum(tf.square(out - y)) / global_count
    return (out, *tape.gradient(loss, model.trainable_variables))


def run_check(world, counts, steps=3, tolerance=2e-4):
    """Trains both models on this rank of `world`; returns the record of this rank.

    The record holds the line printed for it (`masked_model rank=R/W ... ok|FAIL
    ...`), the largest relative errors, this replica's `rows` and how many of
    them are all masked out (`masked_rows`), and `ok`.
    """
    import keras

    import syncbn

    counts = list(counts)
    if len(counts) != world.num_replicas:
        raise ValueError(f"Argument `counts` needs one entry per replica ({world.num_replicas}). "
                         f"Received: counts={counts}")
    bounds = np.cumsum([0] + counts)
    batches = global_batches(counts, steps)
    with world.scope():
        model = build_model(syncbn.SyncBatchNormalization)
    reference = build_model(keras.layers.BatchNormalization)
    reference.set_weights(model.get_weights())
    bn, reference_bn = model.layers[2], reference.layers[2]
    global_count = float(sum(counts))
    step = world.compile(lambda x, y: train_step(model, x, y, global_count))
    worst = {}
    for x, y in batches:
        for channel in range(STEPS):  # Keras would average zeros in for an empty channel
            assert np.any(x[:, channel] != 0), "every time step needs a sample in the global batch"
        rows = {r: (x[bounds[r]:bounds[r + 1]], y[bounds[r]:bounds[r + 1]])
                for r in world.local_replica_ids}
        (out, *grads), = step(world.distribute(rows))
        summed = world.process_sum(np.concatenate([np.ravel(g) for g in grads]))
        offset = 0
        for variable in model.trainable_variables:
            size = int(np.prod(variable.shape))
            gradient = summed[offset:offset + size].reshape(variable.shape)
            variable.assign(variable.numpy() - LEARNING_RATE * gradient.astype(np.float32))
            offset += size
        want_out, *want_grads = train_step(reference, x, y, global_count)
        for variable, gradient in zip(reference.trainable_variables, want_grads):
            variable.assign(variable - LEARNING_RATE * gradient)
        rank_rows = slice(bounds[world.local_replica_ids[0]], bounds[world.local_replica_ids[0] + 1])
        checks = {"outputs": relative_error(out.numpy(), want_out.numpy()[rank_rows]),
                  "moving_mean": relative_error(bn.moving_mean.numpy(), reference_bn.moving_mean.numpy()),
                  "moving_variance": relative_error(bn.moving_variance.numpy(),
                                                    reference_bn.moving_variance.numpy()),
                  "weights": max(relative_error(a, b) for a, b in zip(model.get_weights(),
                                                                        reference.get_weights()))}
        for name, error in checks.items():
            worst[name] = max(worst.get(name, 0.0), error)
    # The comparison saw trained statistics, not the initial zeros and ones.
    moved = not (np.allclose(bn.moving_mean.numpy(), 0.0) or np.allclose(bn.moving_variance.numpy(), 1.0))
    ok = moved and all(error <= tolerance for error in worst.values())
    replica = world.local_replica_ids[0]
    own_rows = x[bounds[replica]:bounds[replica + 1]]  # the last step's
    masked_rows = int(np.sum(np.all(own_rows == 0.0, axis=(1, 2))))
    summary = " ".join(f"{name}={error:.2e}" for name, error in worst.items())
    line = (f"masked_model rank={world.process_rank}/{world.num_processes} world={world.name} "
            f"rows={counts[replica]} masked_rows={masked_rows} {'ok' if ok else 'FAIL'} {summary}")
    say(line)
    return {"line": line, "ok": ok, "world": world.name, "rows": counts[replica],
            "masked_rows": masked_rows, "errors": worst}


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    world = open_world("auto")
    record = run_check(world, [int(c) for c in args.counts.split(",")], args.steps,
                       args.tolerance)
    world.barrier()  # nobody shuts its backend down while another rank still sums
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
