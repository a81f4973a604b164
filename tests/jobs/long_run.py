"""A long training run on every rank: memory, retracing and agreement of the moving statistics.

Run one copy per rank through the launcher (`--backend mpi` or `horovod`):

    syncbn-launch -np 2 --backend mpi -- python tests/jobs/long_run.py --steps 2000

Each rank trains a small model with two `SyncBatchNormalization` layers on its
own data (seeded by rank, so only synchronization can make the ranks' statistics
agree) in a custom loop: one `tf.function` step taking `training` as a boolean
tensor (every tenth step runs with `training=False`, the same signature), and
epochs of `--steps-per-epoch` steps whose last batch is smaller. Gradients are
summed over ranks with the layers' own communicator, so weights stay equal too.

At the end every rank prints one line:

    long_run rank=R/N backend=B steps=S traces=T signatures=K rss_warm_mb=W rss_end_mb=E
        rss_growth=G moving_sha256=H weights_sha256=H2

- `traces`: how often the step's Python body ran (tracing), `signatures`: the
  distinct input signatures seen (batch size x training's type); one trace per
  signature means no retracing;
- `rss_*`: resident memory after `--warmup-steps` and at the end, from
  /proc/self/statm; `rss_growth` = end / warm - 1;
- `moving_sha256`: SHA-256 of the bytes of every moving mean and variance, so
  bit-identical statistics give the same digest on every rank.
"""

import argparse
import hashlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobs.common import open_world  # noqa: E402

FEATURES = 12
HIDDEN = 16
CLASSES = 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["horovod", "mpi"], required=True)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="steps before the first memory reading (default: 20%% of --steps)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--last-batch", type=int, default=11)
    parser.add_argument("--steps-per-epoch", type=int, default=10)
    parser.add_argument("--communicator", default=None,
                        help="the layers' communicator (default: the backend's); "
                             "'local' makes a run whose ranks do not synchronize")
    return parser.parse_args(argv)


def resident_mb():
    """Resident set size of this process in MiB (Linux)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def digest(arrays):
    sha = hashlib.sha256()
    for array in arrays:
        sha.update(np.ascontiguousarray(array).tobytes())
    return sha.hexdigest()[:16]


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    world = open_world(args.backend)
    rank, size = world.process_rank, world.num_processes
    import keras
    import tensorflow as tf

    import syncbn
    from syncbn import collectives

    communicator = args.communicator or args.backend
    keras.utils.set_random_seed(7)  # the same initial weights on every rank
    model = keras.Sequential([
        keras.Input((FEATURES,)),
        keras.layers.Dense(HIDDEN, use_bias=False),
        syncbn.SyncBatchNormalization(communicator=communicator, name="bn_hidden"),
        keras.layers.ReLU(),
        keras.layers.Dense(CLASSES, use_bias=False),
        syncbn.SyncBatchNormalization(communicator=communicator, name="bn_logits"),
    ])
    optimizer = keras.optimizers.SGD(0.05)
    optimizer.build(model.trainable_variables)
    gradient_sum = collectives.resolve(communicator, None)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    traces = []

    @tf.function
    def train_step(x, y, training):
        traces.append((tuple(x.shape), training.dtype.name))  # once per trace
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=training))
        grads = tape.gradient(loss, model.trainable_variables)
        # Data parallel: every rank applies the sum of all ranks' gradients.
        grads = [gradient_sum.all_sum(g, f"grad_{i}") / size for i, g in enumerate(grads)]
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    rng = np.random.default_rng([1234, rank])
    centres = rng.normal(0.0, 3.0, (CLASSES, FEATURES)).astype(np.float32)
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 5)
    signatures = set()
    rss_warm = None
    training_true, training_false = tf.constant(True), tf.constant(False)
    for step in range(args.steps):
        last = step % args.steps_per_epoch == args.steps_per_epoch - 1
        batch = args.last_batch if last else args.batch
        labels = rng.integers(0, CLASSES, batch)
        x = centres[labels] + rng.normal(0.0, 1.0, (batch, FEATURES)).astype(np.float32)
        training = training_false if step % 10 == 5 else training_true
        signatures.add((batch, "bool-tensor"))
        train_step(tf.constant(x), tf.constant(labels.astype(np.int32)), training)
        if step + 1 == warmup:
            rss_warm = resident_mb()
    rss_end = resident_mb()
    bn_layers = [layer for layer in model.layers if isinstance(layer, syncbn.SyncBatchNormalization)]
    moving = [v.numpy() for layer in bn_layers for v in (layer.moving_mean, layer.moving_variance)]
    weights = [v.numpy() for v in model.trainable_variables]
    growth = rss_end / rss_warm - 1.0 if rss_warm else float("nan")
    sys.stdout.write(
        f"long_run rank={rank}/{size} backend={args.backend} communicator={communicator} "
        f"steps={args.steps} traces={len(traces)} signatures={len(signatures)} "
        f"tracing_count={train_step.experimental_get_tracing_count()} "
        f"rss_warm_mb={rss_warm or 0:.1f} rss_end_mb={rss_end:.1f} rss_growth={growth:.4f} "
        f"moving_sha256={digest(moving)} weights_sha256={digest(weights)}\n")
    sys.stdout.flush()
    world.barrier()  # nobody shuts its backend down while another rank still sums
    return 0


if __name__ == "__main__":
    sys.exit(main())
