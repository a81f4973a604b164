"""`model.fit` under horovodrun with the Keras 3 glue (syncbn.horovod_keras).

Every rank seeds its initial weights, its Adam state (moments, iterations)
and its data with its rank, so without
the glue the ranks drift apart. With it, `BroadcastInitialState` makes the
start identical, `DistributedOptimizer` (Adam) keeps the steps identical,
`MetricAverage` makes the logs identical, and only rank 0 writes
checkpoints (named `rank<R>.epoch<E>.keras` so a test can tell who wrote).

`--without broadcast,allreduce,metric_average` switches parts of the glue
off for negative controls; several runs, one after the other in the same
processes, are separated by `;` (`--without "none;broadcast"`: the glue
whole, then without the broadcast). At the end of each run each rank saves
`OUT/<run>/rank<R>.npz` (initial and final model weights, optimizer variables)
and `OUT/<run>/rank<R>.json` (the History), `<run>` being its `--without`.

    horovodrun -np 2 --gloo python tests/jobs/hvd_fit.py --out /tmp/o --checkpoint-dir /tmp/c
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobs.common import open_world  # noqa: E402

INITIAL_ITERATIONS = 5
GLUE_PARTS = ("broadcast", "allreduce", "metric_average")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for rank<R>.npz/.json")
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps-per-epoch", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--without", default="none",
                        help=f"comma-separated parts of the glue to switch off, from {GLUE_PARTS}, "
                             "or none (default); runs separated by ';'")
    args = parser.parse_args(argv)
    args.runs = args.without.split(";")
    for run in args.runs:
        unknown = set(run.split(",")) - set(GLUE_PARTS) - {"none"}
        if unknown:
            parser.error(f"Argument `--without` must name parts of {GLUE_PARTS} or none. "
                         f"Received: --without={args.without!r}")
    return args


def rank_data(rank, samples, validation):
    """Different images on every rank; labels from a fixed rule so there is something to learn."""
    rng = np.random.default_rng([rank, int(validation)])
    x = rng.normal(size=(samples, 8, 8, 1)).astype(np.float32)
    y = (x[:, :4].mean(axis=(1, 2, 3)) > x[:, 4:].mean(axis=(1, 2, 3))).astype(np.int64)
    return x, y


def make_model(syncbn, keras):
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, use_bias=False),
        syncbn.SyncBatchNormalization(momentum=0.5),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2),
    ])


def fit(args, without, out, checkpoint_dir):
    """One run of `model.fit` with the glue but `without`; saves this rank's results in `out`."""
    import keras

    import syncbn
    from syncbn import horovod_keras as hk

    rank = hk.rank()
    keras.utils.set_random_seed(100 + rank)
    model = make_model(syncbn, keras)
    initial = [w.numpy().copy() for w in model.weights]

    optimizer = keras.optimizers.Adam(learning_rate=0.05)
    if "allreduce" not in without:
        optimizer = hk.DistributedOptimizer(optimizer)
    model.compile(optimizer=optimizer, jit_compile=False, metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    # Rank-dependent optimizer state too (as if only one rank restored it), so
    # the test sees BroadcastInitialState carry Adam's moments and iterations.
    model.optimizer.build(model.trainable_variables)
    state_rng = np.random.default_rng(200 + rank)
    for variable in model.optimizer.variables:
        if variable.path.endswith("iteration"):
            variable.assign(INITIAL_ITERATIONS + rank)
        elif variable.path.endswith(("momentum", "velocity")):
            variable.assign(np.abs(state_rng.normal(0, 0.01, variable.shape)).astype(np.float32))

    callbacks = []
    if "broadcast" not in without:
        callbacks.append(hk.BroadcastInitialState(root_rank=0))
    if "metric_average" not in without:
        callbacks.append(hk.MetricAverage())
    checkpoint = os.path.join(checkpoint_dir, f"rank{rank}.epoch{{epoch}}.keras")
    callbacks += hk.chief_only(keras.callbacks.ModelCheckpoint(checkpoint))

    samples = args.steps_per_epoch * args.batch_size
    history = model.fit(
        *rank_data(rank, samples, validation=False),
        validation_data=rank_data(rank, args.batch_size, validation=True),
        batch_size=args.batch_size, epochs=args.epochs, shuffle=False,
        callbacks=callbacks, verbose=2 if hk.is_chief() else 0,
    )

    arrays = {f"initial_{i:03d}": value for i, value in enumerate(initial)}
    arrays.update({f"model_{i:03d}": w.numpy() for i, w in enumerate(model.weights)})
    arrays.update({f"optimizer_{i:03d}": v.numpy()
                   for i, v in enumerate(model.optimizer.variables)})
    os.makedirs(out, exist_ok=True)
    np.savez(os.path.join(out, f"rank{rank}.npz"), **arrays)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as stream:
        json.dump({"history": history.history,
                   "optimizer_class": type(model.optimizer).__name__,
                   "optimizer_variables": [v.path for v in model.optimizer.variables]}, stream)
    print(f"hvd_fit rank={rank}/{hk.size()} done without={sorted(without)}", flush=True)


def main():
    args = parse_args()
    world = open_world("horovod")
    for run in args.runs:
        without = set(run.split(",")) - {"none"}
        fit(args, without, os.path.join(args.out, run), os.path.join(args.checkpoint_dir, run))
        world.barrier()  # every rank has saved before the next run


if __name__ == "__main__":
    main()
