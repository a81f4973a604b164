"""Legacy tf.keras (tf_keras, `TF_USE_LEGACY_KERAS=1`) on real processes: one launch, many checks.

Run one copy per rank, with `TF_USE_LEGACY_KERAS=1` in the environment:

    TF_USE_LEGACY_KERAS=1 horovodrun -np 3 --gloo python tests/jobs/legacy.py \\
        --backend horovod --counts 4,0,7 --out /tmp/legacy

Every rank runs, and checks for itself:

1. `exactness`: tests/jobs/exactness.py's check, whose layers are then
   tf_keras's: each rank's slice of the outputs, input gradients, gamma/beta
   gradient shares and moving statistics against one tf_keras
   BatchNormalization on the global batch (per-rank batches `--counts`,
   empty ones included; its NHWC layout is one where tf_keras averages the
   Bessel-corrected variance). Results in `OUT/exactness/`.
2. `fit` (Horovod): `syncbn.convert` of a tf_keras CNN trained by
   `model.fit` with Horovod's own Keras 2 helpers (`hvd.DistributedOptimizer`,
   `BroadcastGlobalVariablesCallback`, `MetricAverageCallback`), equal
   batches per rank: its weights, moving statistics and averaged epoch losses
   equal one process training the original model on the global batches.
3. `broadcast` (Horovod): the same with weights seeded by rank and Adam:
   after `fit` every rank holds the same weights, optimizer state and History.
4. `tape`: a `tf.function` loop on the `--counts` batches, each rank's loss a
   sum over its rows divided by the global count, gradients summed over the
   ranks (`hvd.DistributedGradientTape(op=hvd.Sum)`, or one all-sum of the
   MPI communicator with `--backend mpi`): weights equal one process on the
   global batch.
5. `save` (rank 0): the model of 3 saved as `.h5` and as a SavedModel and
   loaded back by `tf.keras.models.load_model` with no `custom_objects`: the
   same layers and predictions. (Not `.keras`: that format records Horovod's
   optimizer wrapper by its module, `horovod._keras`, and cannot load it.)

Each check prints `legacy rank=R/N check=NAME ok|FAIL ...`; the job exits 1
if any fails.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import exactness  # noqa: E402

TOLERANCE = 1e-4
EPOCHS, STEPS_PER_EPOCH, FIT_BATCH = 2, 3, 4
CLASSES = 3


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["horovod", "mpi"], required=True)
    parser.add_argument("--counts", required=True, help="per-rank batch sizes, e.g. 4,0,7")
    parser.add_argument("--out", required=True)
    return parser.parse_args(argv)


def report(world, check, errors):
    """Prints the check's line; returns 1 if any relative error is above TOLERANCE."""
    worst = max(errors.values()) if errors else 0.0
    failed = not worst <= TOLERANCE  # NaN fails too
    summary = " ".join(f"{name}={value:.2e}" for name, value in errors.items())
    sys.stdout.write(f"legacy rank={world.process_rank}/{world.num_processes} check={check} "
                     f"{'FAIL' if failed else 'ok'} {summary}\n")
    sys.stdout.flush()
    return int(failed)


def weight_errors(got, want):
    """The largest relative error over a model's weights, and over its moving statistics."""
    pairs = list(zip(got.weights, want.weights))
    moving = [relative(a, b) for a, b in pairs if "moving" in a.name]
    return {"weights": max(relative(a, b) for a, b in pairs), "moving": max(moving)}


def relative(actual, expected):
    return exactness.relative_error(np.asarray(actual), np.asarray(expected, np.float64))


def cnn(tf, seed):
    """A tf_keras CNN with two BatchNormalization layers: one fused (NHWC), one not (2D)."""
    keras = tf.keras
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3, use_bias=False),
        keras.layers.BatchNormalization(momentum=0.5),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(5, use_bias=False),
        keras.layers.BatchNormalization(momentum=0.5),
        keras.layers.ReLU(),
        keras.layers.Dense(CLASSES),
    ])


def fit_data(ranks):
    """Global batches of `ranks * FIT_BATCH` rows; rank r's rows of each step, contiguous."""
    rng = np.random.default_rng(7)
    rows = STEPS_PER_EPOCH * ranks * FIT_BATCH
    x = rng.normal(1.0, 2.0, (rows, 6, 6, 2)).astype(np.float32)
    y = rng.integers(0, CLASSES, rows)
    return x, y


def rank_rows(array, rank, ranks):
    steps = array.reshape((STEPS_PER_EPOCH, ranks, FIT_BATCH) + array.shape[1:])
    return steps[:, rank].reshape((-1,) + array.shape[1:])


def compile_for_fit(tf, model, optimizer):
    model.compile(optimizer=optimizer,
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def check_fit(tf, hvd, world, syncbn):
    ranks, rank = world.num_processes, world.process_rank
    x, y = fit_data(ranks)
    original = cnn(tf, seed=100)
    reference = tf.keras.models.clone_model(original)
    reference.set_weights(original.get_weights())
    compile_for_fit(tf, reference, tf.keras.optimizers.SGD(0.1, momentum=0.9))
    want = reference.fit(x, y, batch_size=ranks * FIT_BATCH, epochs=EPOCHS, shuffle=False,
                         verbose=0)

    model = syncbn.convert(original)
    compile_for_fit(tf, model, hvd.DistributedOptimizer(tf.keras.optimizers.SGD(0.1, momentum=0.9)))
    got = model.fit(rank_rows(x, rank, ranks), rank_rows(y, rank, ranks), batch_size=FIT_BATCH,
                    epochs=EPOCHS, shuffle=False, verbose=0,
                    callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                               hvd.callbacks.MetricAverageCallback()])
    errors = weight_errors(model, reference)
    errors["loss"] = relative(got.history["loss"], want.history["loss"])
    errors["converted"] = float(len(syncbn_layers(model, syncbn)) != 2)
    return report(world, "fit", errors)


def syncbn_layers(model, syncbn):
    return [layer for layer in model.layers if isinstance(layer, syncbn.SyncBatchNormalization)]


def check_broadcast(tf, hvd, world, syncbn):
    ranks, rank = world.num_processes, world.process_rank
    x, y = fit_data(ranks)
    model = syncbn.convert(cnn(tf, seed=200 + rank))  # every rank starts elsewhere
    compile_for_fit(tf, model, hvd.DistributedOptimizer(tf.keras.optimizers.Adam(0.01)))
    history = model.fit(rank_rows(x, rank, ranks), rank_rows(y, rank, ranks),
                        batch_size=FIT_BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
                        callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                                   hvd.callbacks.MetricAverageCallback()])
    state = np.concatenate([np.ravel(v.numpy()) for v in model.variables + model.optimizer.variables()]
                           + [np.asarray(history.history["loss"])]).astype(np.float64)
    gathered = world.gather_per_process(state)
    spread = float(np.max(np.abs(gathered - gathered[0]))) / max(float(np.max(np.abs(state))), 1e-12)
    return report(world, "broadcast", {"spread": spread}), model


def check_tape(tf, world, syncbn, backend, counts):
    from syncbn import collectives

    keras = tf.keras
    rank = world.process_rank
    lo, hi = sum(counts[:rank]), sum(counts[:rank + 1])
    global_count = float(sum(counts))
    keras.utils.set_random_seed(300)
    original = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, use_bias=False),
                                 keras.layers.BatchNormalization(momentum=0.6),
                                 keras.layers.ReLU(), keras.layers.Dense(1)])
    reference = keras.models.clone_model(original)
    reference.set_weights(original.get_weights())
    model = syncbn.convert(original)
    rng = np.random.default_rng(8)
    batches = [(rng.normal(2.0, 3.0, (int(global_count), 5)).astype(np.float32),
                rng.normal(size=(int(global_count), 1)).astype(np.float32)) for _ in range(3)]

    if backend == "horovod":
        import horovod.tensorflow as hvd

        def summed_gradients(tape, loss, variables):
            return hvd.DistributedGradientTape(tape, op=hvd.Sum).gradient(loss, variables)
    else:
        communicator = collectives.resolve("auto")

        def summed_gradients(tape, loss, variables):
            grads = tape.gradient(loss, variables)
            sizes = [g.shape.num_elements() for g in grads]
            # [*shape_i] for each gradient -> [sum of sizes]
            flat = communicator.all_sum(tf.concat([tf.reshape(g, [-1]) for g in grads], 0),
                                        "legacy/gradients")
            return [tf.reshape(part, g.shape) for part, g in zip(tf.split(flat, sizes), grads)]

    def train_step(step_model, optimizer, summed):
        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                # Sums over this rank's rows / the global count: summed over ranks, the mean.
                loss = tf.reduce_sum(tf.square(step_model(x, training=True) - y)) / global_count
            grads = summed(tape, loss, step_model.trainable_variables)
            optimizer.apply_gradients(zip(grads, step_model.trainable_variables))
        return step

    local_step = train_step(model, keras.optimizers.SGD(0.05), summed_gradients)
    reference_step = train_step(reference, keras.optimizers.SGD(0.05),
                                lambda tape, loss, variables: tape.gradient(loss, variables))
    for x, y in batches:
        local_step(tf.constant(x[lo:hi]), tf.constant(y[lo:hi]))
        reference_step(tf.constant(x), tf.constant(y))
    return report(world, "tape", weight_errors(model, reference))


def check_save(tf, world, syncbn, model, out):
    """Rank 0 saves `model` in every tf_keras format and loads it back with no custom_objects."""
    x = np.random.default_rng(9).normal(size=(5, 6, 6, 2)).astype(np.float32)
    want = model.predict(x, verbose=0)
    errors = {}
    for name in ("model.h5", "savedmodel"):
        path = os.path.join(out, name)
        model.save(path)
        loaded = tf.keras.models.load_model(path)
        errors[name] = relative(loaded.predict(x, verbose=0), want)
        errors[name + "_layers"] = float(len(syncbn_layers(loaded, syncbn)) != 2)
    return report(world, "save", errors)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from syncbn.layers import LEGACY_KERAS

    if not LEGACY_KERAS:
        sys.stderr.write("legacy: run with TF_USE_LEGACY_KERAS=1\n")
        return 2
    failures = exactness.main(["--backend", args.backend, "--counts", args.counts,
                               "--out", os.path.join(args.out, "exactness")])
    import tensorflow as tf

    import syncbn
    from syncbn import world as worlds

    world = worlds.create_world(args.backend, pin=False)
    counts = [int(c) for c in args.counts.split(",")]
    if args.backend == "horovod":
        import horovod.tensorflow.keras as hvd

        hvd.init()  # as legacy scripts do; Horovod is already up (exactness)
        failures += check_fit(tf, hvd, world, syncbn)
        failed, trained = check_broadcast(tf, hvd, world, syncbn)
        failures += failed
    failures += check_tape(tf, world, syncbn, args.backend, counts)
    if args.backend == "horovod" and world.is_chief:
        failures += check_save(tf, world, syncbn, trained, args.out)
    world.barrier()  # no rank leaves (and shuts its world down) while the chief saves
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
