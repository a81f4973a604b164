"""The main demo: why synchronized batch norm matters with small per-rank batches.

A small CNN learns scikit-learn's bundled handwritten digits (8x8 images,
nothing downloaded), split into train / validation / test sets, three ways:

1. `local`: 2 Horovod ranks, 4 samples each per step, plain Keras
   BatchNormalization (each rank normalizes with its own 4 samples);
2. `syncbn`: the same 2 ranks and batches, SyncBatchNormalization (every
   rank normalizes with the statistics of all 8 samples);
3. `single`: one process, the same 8 samples per step, plain Keras BN.

Gradients are averaged over ranks and all three see the same global batches
in the same order, so `syncbn` computes what `single` computes. The demo
prints, per variant, the final validation and test accuracy, the gap between
train and validation accuracy, the largest difference between the BN layers'
moving statistics and the true statistics of their inputs over the training
set (the mean's in population standard deviations, the variance's relative),
and the median time per step; a `syncbn + recalibrate` row, the `syncbn`
model after `syncbn.recalibrate` (its moving statistics replaced by precise
averages over training batches; docs/moving-statistics.md); the largest
weight difference from `single`
after 20 steps (before chaotic SGD dynamics amplify float rounding); and it
writes a two-panel plot: validation accuracy per epoch, and each variant's
largest weight difference from `single` per step (every step for the first
100, then every 4th), on a log scale. The second panel shows why the
accuracy curves of `syncbn` and `single` can differ by a few points: local
BN leaves `single` at the first step, syncbn stays within float32 rounding
of it until training's chaotic dynamics amplify that rounding (different
summation orders) and separate them too.

    python examples/demo.py                  # the driver: runs all three, prints the table
    python examples/demo.py --epochs 1       # quick check

The driver starts the 2-rank variants with `python -m launch` (the
`syncbn-launch` command) and runs `single` in a process of its own.
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("local", "syncbn", "single")
NUM_RANKS = 2
PER_RANK_BATCH = 4
# Weights are saved after this many steps, before chaotic SGD dynamics amplify
# float rounding, to show that syncbn computes what one process computes.
COMPARE_AFTER_STEPS = 20
# Global batches of 128 that `syncbn + recalibrate` averages its statistics over.
RECALIBRATION_STEPS = 8
# The weight-distance panel: every step for the first 100, then every 4th
# (every step would be 117 MB of snapshots per variant).
EVERY_STEP_UNTIL = 100
THEN_EVERY = 4

logger = logging.getLogger("demo")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12, help="training epochs (default: 12)")
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "demo"),
                        help="directory for results and the plot (default: runs/demo)")
    parser.add_argument("--lr", type=float, default=0.02, help="SGD learning rate (default: 0.02)")
    parser.add_argument("--momentum", type=float, default=0.99,
                        help="BN moving-average momentum (default: 0.99, Keras's)")
    parser.add_argument("--worker", choices=VARIANTS, default=None,
                        help="internal: run one variant in this process")
    return parser.parse_args(argv)


def load_splits(seed=0):
    """Digits split 70 / 15 / 15 into train / validation / test, images in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_train, n_val = int(0.7 * len(x)), int(0.15 * len(x))
    return {
        "train": (x[:n_train], y[:n_train]),
        "val": (x[n_train:n_train + n_val], y[n_train:n_train + n_val]),
        "test": (x[n_train + n_val:], y[n_train + n_val:]),
    }


def build_model(bn_layer, momentum):
    import keras

    def block(filters):
        return [
            keras.layers.Conv2D(filters, 3, padding="same", use_bias=False),
            bn_layer(momentum=momentum),
            keras.layers.ReLU(),
        ]

    keras.utils.set_random_seed(0)  # the same initial weights in every variant and rank
    # BN sees 64, 16 and 4 values per channel and sample after each pooling, and
    # one value in the dense head: with 4 samples per rank, local statistics are noisy.
    return keras.Sequential(
        [keras.Input((8, 8, 1))]
        + block(16) + [keras.layers.MaxPooling2D()]
        + block(32) + [keras.layers.MaxPooling2D()]
        + block(32) + [keras.layers.GlobalAveragePooling2D()]
        + [keras.layers.Dense(32, use_bias=False), bn_layer(momentum=momentum), keras.layers.ReLU()]
        + [keras.layers.Dense(10)]
    )


def bn_input_statistics(model, x):
    """True mean and variance of every BN layer's input over `x`, in inference mode."""
    stats = []
    h = x
    for layer in model.layers:
        if hasattr(layer, "moving_variance"):
            values = np.asarray(h, np.float64).reshape(-1, h.shape[-1])
            stats.append((layer, values.mean(0), values.var(0)))
        h = layer(h, training=False)
    return stats


def moving_statistics_errors(model, x_train):
    """Largest errors of the moving statistics against the true ones of the training set.

    In units that compare across layers: the mean's in population standard
    deviations, the variance's relative to the population variance.
    """
    population = bn_input_statistics(model, x_train)
    mean_gap = max(float(np.max(np.abs(l.moving_mean.numpy() - m) / np.sqrt(v + 1e-3)))
                   for l, m, v in population)
    var_gap = max(float(np.max(np.abs(l.moving_variance.numpy() - v) / (v + 1e-3)))
                  for l, _, v in population)
    return mean_gap, var_gap


def is_recorded(step):
    """True for the 1-based steps whose weights the distance panel uses."""
    return step <= EVERY_STEP_UNTIL or step % THEN_EVERY == 0


def flat_weights(model):
    return np.concatenate([np.ravel(w.numpy()) for w in model.trainable_weights])


def run_variant(variant, args):
    import keras
    import tensorflow as tf

    import syncbn

    distributed = variant != "single"
    if distributed:
        hvd = syncbn.init_horovod()
        rank, size = hvd.rank(), hvd.size()
    else:
        rank, size = 0, 1
    batch = PER_RANK_BATCH if distributed else PER_RANK_BATCH * NUM_RANKS
    if distributed and size != NUM_RANKS:
        raise ValueError(f"The demo's multi-rank variants need {NUM_RANKS} ranks. Received: {size}")

    splits = load_splits()
    x_train, y_train = splits["train"]
    global_batch = PER_RANK_BATCH * NUM_RANKS
    steps_per_epoch = len(x_train) // global_batch
    bn_layer = syncbn.SyncBatchNormalization if variant == "syncbn" else keras.layers.BatchNormalization
    model = build_model(bn_layer, args.momentum)
    optimizer = keras.optimizers.SGD(args.lr, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer.build(model.trainable_variables)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        if distributed:
            grads = syncbn.horovod_keras.allreduce_gradients(grads)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    def accuracy(split):
        x, y = splits[split]
        logits = model.predict(x, batch_size=256, verbose=0)
        return float(np.mean(np.argmax(logits, -1) == y))

    history = {"val_accuracy": [], "train_accuracy": []}
    step_times = []
    trajectory_steps, trajectory = [], []  # rank 0's weights after the recorded steps
    rng = np.random.default_rng(1)  # the same global batch order everywhere
    for epoch in range(args.epochs):
        order = rng.permutation(len(x_train))[: steps_per_epoch * global_batch]
        for step in range(steps_per_epoch):
            global_rows = order[step * global_batch:(step + 1) * global_batch]
            rows = global_rows[rank * batch:(rank + 1) * batch] if distributed else global_rows
            started = time.perf_counter()
            train_step(tf.constant(x_train[rows]), tf.constant(y_train[rows])).numpy()
            step_times.append(time.perf_counter() - started)
            if rank == 0 and is_recorded(len(step_times)):
                trajectory_steps.append(len(step_times))
                trajectory.append(flat_weights(model))
            if len(step_times) == COMPARE_AFTER_STEPS and rank == 0:
                os.makedirs(args.out, exist_ok=True)
                np.savez(os.path.join(args.out, f"{variant}.weights.npz"),
                         *[w.numpy() for w in model.trainable_weights])
        history["val_accuracy"].append(accuracy("val"))
        history["train_accuracy"].append(accuracy("train"))
        if rank == 0:
            logger.info("%s epoch %d: val accuracy %.4f", variant, epoch + 1, history["val_accuracy"][-1])

    mean_gap, var_gap = moving_statistics_errors(model, x_train)
    result = {
        "variant": variant,
        "ranks": size,
        "per_rank_batch": batch,
        "epochs": args.epochs,
        "steps": len(step_times),
        "val_accuracy": history["val_accuracy"],
        "train_accuracy": history["train_accuracy"],
        "test_accuracy": accuracy("test"),
        "moving_mean_error_in_std": mean_gap,
        "moving_variance_relative_error": var_gap,
        # The first epoch includes tracing; the median is the steady state.
        "median_step_ms": 1e3 * float(np.median(step_times)),
    }
    if variant == "syncbn":
        # Each rank recalibrates on its own rows of the training set, 64 per batch.
        rows = np.arange(rank, len(x_train), size)
        syncbn.recalibrate(model, [x_train[rows[i:i + 64]] for i in range(0, len(rows), 64)],
                           steps=RECALIBRATION_STEPS, verbose=0)
        mean_gap, var_gap = moving_statistics_errors(model, x_train)
        result["recalibrated"] = {
            "val_accuracy": accuracy("val"), "train_accuracy": accuracy("train"),
            "test_accuracy": accuracy("test"), "moving_mean_error_in_std": mean_gap,
            "moving_variance_relative_error": var_gap,
        }
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"{variant}.json"), "w") as f:
            json.dump(result, f, indent=2)
        np.savez(os.path.join(args.out, f"{variant}.trajectory.npz"),
                 steps=np.array(trajectory_steps), weights=np.stack(trajectory))
    if distributed:
        # Every rank's final weights must agree: report it, so a broken all-reduce shows.
        weights = np.concatenate([np.ravel(w.numpy()) for w in model.trainable_weights])
        spread = hvd.allreduce(tf.constant(weights), op=hvd.Max) - hvd.allreduce(
            tf.constant(weights), op=hvd.Min)
        if rank == 0:
            logger.info("%s: largest difference of trainable weights across ranks %.3g",
                        variant, float(tf.reduce_max(spread)))


def run_driver(args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    base = [sys.executable, os.path.abspath(__file__), "--epochs", str(args.epochs), "--out", args.out,
            "--lr", str(args.lr), "--momentum", str(args.momentum)]
    for variant in VARIANTS:
        if variant == "single":
            command = base + ["--worker", variant]
        else:
            command = [sys.executable, "-m", "launch", "-np", str(NUM_RANKS), "--backend", "horovod",
                       "--timeout", "600", "--"] + base + ["--worker", variant]
        logger.info("running %s: %s", variant, " ".join(command))
        subprocess.run(command, check=True, cwd=REPO, env=env)
    results = []
    for variant in VARIANTS:
        with open(os.path.join(args.out, f"{variant}.json")) as f:
            results.append(json.load(f))
    print_table(results)
    print_equivalence(args.out)
    distances = weight_distances(args.out)
    plot_path = write_plot(results, distances, args.out)
    print(f"\nPlot of validation accuracy per epoch and weight distance from `single` "
          f"per step: {plot_path}")


def print_equivalence(out_dir):
    def load(variant):
        with np.load(os.path.join(out_dir, f"{variant}.weights.npz")) as weights:
            return [weights[k] for k in sorted(weights.files, key=lambda k: int(k.split("_")[1]))]

    single = load("single")
    print(f"\nLargest weight difference from `single` after {COMPARE_AFTER_STEPS} steps:")
    for variant in ("syncbn", "local"):
        gap = max(float(np.max(np.abs(a - b))) for a, b in zip(load(variant), single))
        print(f"  {variant}: {gap:.3g}")


def weight_distances(out_dir):
    """`{variant: (steps, largest |weight - single's weight|)}` for syncbn and local.

    Also writes them to `weight_distance.json` and removes the weight snapshots.
    """
    trajectories = {}
    for variant in VARIANTS:
        path = os.path.join(out_dir, f"{variant}.trajectory.npz")
        with np.load(path) as data:
            trajectories[variant] = (data["steps"], data["weights"])
    single_steps, single_weights = trajectories["single"]
    distances = {}
    for variant in ("local", "syncbn"):
        steps, weights = trajectories[variant]
        if not np.array_equal(steps, single_steps):
            raise RuntimeError(f"{variant} and single recorded different steps")
        distances[variant] = (steps, np.max(np.abs(weights - single_weights), axis=1))
    with open(os.path.join(out_dir, "weight_distance.json"), "w") as f:
        json.dump({v: {"steps": s.tolist(), "largest_difference": d.tolist()}
                   for v, (s, d) in distances.items()}, f)
    for variant in VARIANTS:
        os.remove(os.path.join(out_dir, f"{variant}.trajectory.npz"))
    return distances


def print_table(results):
    header = ("| variant | ranks x batch | val acc | test acc | train - val acc | "
              "moving-stat error: mean (in std) / var (relative) | ms per step |")
    print("\n" + header)
    print("|" + "---|" * 7)
    rows = []
    for r in results:
        rows.append((r["variant"], r, f"{r['median_step_ms']:.2f}"))
        if "recalibrated" in r:  # the same model after syncbn.recalibrate: no step time
            rows.append((f"{r['variant']} + recalibrate", {**r, **r["recalibrated"]}, "-"))
    for name, r, step_ms in rows:
        val, train = np.ravel(r["val_accuracy"])[-1], np.ravel(r["train_accuracy"])[-1]
        print(f"| {name} | {r['ranks']} x {r['per_rank_batch']} | {val:.4f} | "
              f"{r['test_accuracy']:.4f} | {train - val:+.4f} | "
              f"{r['moving_mean_error_in_std']:.3f} / {r['moving_variance_relative_error']:.3f} | "
              f"{step_ms} |")


def first_step_above(steps, distances, threshold):
    """The first recorded step whose distance exceeds `threshold`, or None."""
    above = np.nonzero(distances > threshold)[0]
    return int(steps[above[0]]) if len(above) else None


def write_plot(results, distances, out_dir):
    """Two panels: validation accuracy per epoch; weight distance from `single` per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy_axes, distance_axes) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"local": "o-", "syncbn": "s-", "single": "x--"}
    colors = {"local": "tab:blue", "syncbn": "tab:orange", "single": "tab:green"}
    for r in results:
        epochs = range(1, len(r["val_accuracy"]) + 1)
        label = f"{r['variant']} ({r['ranks']} x {r['per_rank_batch']})"
        accuracy_axes.plot(epochs, r["val_accuracy"], styles[r["variant"]], label=label,
                           color=colors[r["variant"]])
    accuracy_axes.set_xlabel("epoch")
    accuracy_axes.set_ylabel("validation accuracy")
    accuracy_axes.set_title("Validation accuracy, global batch 8")
    accuracy_axes.grid(alpha=0.3)
    accuracy_axes.legend()

    # float32's spacing at 1: the scale of a weight's last-bit difference.
    rounding = float(np.finfo(np.float32).eps)
    floor = 1e-9  # where a difference of exactly 0 is drawn on the log scale
    for variant in ("local", "syncbn"):
        steps, distance = distances[variant]
        zeros = " (0 drawn at 1e-9)" if np.any(distance == 0) else ""
        distance_axes.plot(steps, np.maximum(distance, floor), "-", color=colors[variant],
                           label=f"{variant} (2 x 4){zeros}")
    distance_axes.axhline(rounding, color="gray", linestyle=":", linewidth=1,
                          label=f"float32 rounding (eps = {rounding:.1e})")
    distance_axes.set_yscale("log")
    distance_axes.set_xlabel("training step")
    distance_axes.set_ylabel("largest |weight - single's weight|")
    distance_axes.set_title("Distance from the one-process run (single, 1 x 8)")
    distance_axes.grid(alpha=0.3)
    distance_axes.legend(loc="best")

    local_leaves = first_step_above(*distances["local"], 1e-3)
    sync_leaves = first_step_above(*distances["syncbn"], 1e-3)
    last_step = int(distances["syncbn"][0][-1])
    caption = (
        "Local BN normalizes each rank's 4 samples, so its weights leave the one-process run at "
        + (f"once (above 1e-3 from step {local_leaves}). " if local_leaves else "once. ")
        + "syncbn computes what one process computes: it starts within float32 rounding of it. "
        + (f"Summed in another order, that rounding is amplified by training's chaotic dynamics "
           f"until syncbn, too, separates (above 1e-3 from step {sync_leaves}); from there its "
           "accuracy curve differs from single's as a rerun's would."
           if sync_leaves else
           "Summed in another order, that rounding grows with training's chaotic dynamics, "
           f"but stays below 1e-3 in these {last_step} steps."))
    figure.text(0.5, 0.01, caption, ha="center", va="bottom", wrap=True, fontsize=9)
    figure.suptitle("Digits: local BN vs syncbn vs one process")
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    path = os.path.join(out_dir, "val_accuracy.png")
    figure.savefig(path, dpi=120)
    return path


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = parse_args(argv)
    if args.epochs < 1:
        raise ValueError(f"Argument `--epochs` must be >= 1. Received: --epochs={args.epochs}")
    if args.worker:
        run_variant(args.worker, args)
    else:
        run_driver(args)


if __name__ == "__main__":
    main()
