"""One batch-norm layer, forward and backward in training mode, single process.

Each variant is a `tf.function` that computes `y` and the gradients with
respect to `x`, `gamma` and `beta` for a fixed upstream `dy` (the copy floor
has no `gamma`/`beta`), and returns all of them; the timed region is one call
plus `.numpy()` on every output (zero-copy on CPU), the same for every variant.

Variants, per shape / layout / dtype case:

* `syncbn`: `syncbn.SyncBatchNormalization(communicator="local")`;
* `synced-local`: the same layer with a communicator that says it has 2
  replicas but whose `all_sum` returns `tensor * 1.0`, so the layer takes its
  synchronized code path (two `all_sum` calls, global-statistics math) with
  no communication: the cost of that path's local math;
* `keras`: `keras.layers.BatchNormalization`;
* `fused`: `tf.raw_ops.FusedBatchNormV3(is_training=True)` and its registered
  gradient (`FusedBatchNormGradV3`) through `tf.GradientTape`;
* `copy`: the floor, `tf.negative` forward (reads x, writes y) and its
  gradient `tf.negative(dy)` backward, no reductions.

bfloat16 cases run the Keras layers under the `"mixed_bfloat16"` policy and
feed bfloat16 `x` (and `dy`) to every variant.

Variants are interleaved round-robin in one process; each round times every
variant once (`--repeat` calls, averaged); the table shows medians over the
rounds, and ratios are medians of the per-round ratios (both variants of a
ratio ran in the same round, so load from other processes largely cancels).

    python bench/layer.py                      # about 1 minute on 2 cores
    python bench/layer.py --rounds 40 --json layer.json
"""

import argparse
import functools
import json
import os
import platform
import shlex
import sys

import numpy as np

from timing import time_round_robin

# (name, shape, channel axis, dtype). The first two are the targets.
CASES = [
    ("32x28x28x64 NHWC f32", (32, 28, 28, 64), -1, "float32"),
    ("64x14x14x256 NHWC f32", (64, 14, 14, 256), -1, "float32"),
    ("32x64x28x28 NCHW f32", (32, 64, 28, 28), 1, "float32"),
    ("64x256x14x14 NCHW f32", (64, 256, 14, 14), 1, "float32"),
    ("32x28x28x64 NHWC bf16", (32, 28, 28, 64), -1, "bfloat16"),
    ("64x14x14x256 NHWC bf16", (64, 14, 14, 256), -1, "bfloat16"),
]
VARIANTS = ["copy", "fused", "syncbn", "synced-local", "keras"]
EPSILON = 1e-3


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20,
                        help="round-robin rounds per case (default 20)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="calls per variant per round, averaged (default 3)")
    parser.add_argument("--cases", default=None,
                        help="comma-separated substrings selecting cases, e.g. 'NHWC f32' "
                             "(default: all)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return parser.parse_args(argv)


def build_variants(shape, axis, dtype_name):
    """Name -> zero-argument callable running one forward+backward; all traced."""
    import keras
    import tensorflow as tf

    import syncbn
    from syncbn.collectives import PretendReplicas

    dtype = tf.as_dtype(dtype_name)
    rng = np.random.default_rng(0)
    x = tf.cast(tf.constant(rng.normal(0.5, 2.0, shape).astype(np.float32)), dtype)
    dy = tf.cast(tf.constant(rng.normal(size=shape).astype(np.float32)), dtype)
    num_channels = shape[axis]
    policy = "mixed_bfloat16" if dtype_name == "bfloat16" else "float32"

    def keras_layer_step(layer):
        layer.build(shape)

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            return (y,) + tuple(
                tape.gradient(y, [x, layer.gamma, layer.beta], output_gradients=dy)
            )

        return step

    gamma = tf.Variable(tf.ones([num_channels]))
    beta = tf.Variable(tf.zeros([num_channels]))
    data_format = "NHWC" if axis in (-1, len(shape) - 1) else "NCHW"

    @tf.function
    def fused():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=gamma, offset=beta, mean=tf.zeros([0]), variance=tf.zeros([0]),
                epsilon=EPSILON, is_training=True, data_format=data_format,
            )[0]
        return (y,) + tuple(tape.gradient(y, [x, gamma, beta], output_gradients=dy))

    @tf.function
    def copy():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.negative(x)
        return y, tape.gradient(y, x, output_gradients=dy)

    def sync_layer(communicator):
        return syncbn.SyncBatchNormalization(
            axis=axis, epsilon=EPSILON, communicator=communicator, dtype=policy
        )

    return {
        "copy": copy,
        "fused": fused,
        "syncbn": keras_layer_step(sync_layer("local")),
        "synced-local": keras_layer_step(sync_layer(PretendReplicas())),
        "keras": keras_layer_step(
            keras.layers.BatchNormalization(axis=axis, epsilon=EPSILON, dtype=policy)
        ),
    }


def run_once(step):
    for output in step():
        output.numpy()  # Forces completion; zero-copy for CPU tensors.


def summarize(samples):
    """Medians, IQRs (ms) and paired ratios (medians of per-round ratios)."""

    def ratio(a, b):
        return float(np.median(np.array(samples[a]) / np.array(samples[b])))

    ms = {name: np.array(values) * 1e3 for name, values in samples.items()}
    return {
        "median_ms": {name: float(np.median(v)) for name, v in ms.items()},
        "iqr_ms": {name: float(np.subtract(*np.percentile(v, [75, 25]))) for name, v in ms.items()},
        "ratios": {
            "syncbn/fused": ratio("syncbn", "fused"),
            "keras/syncbn": ratio("keras", "syncbn"),
            "synced-local/fused": ratio("synced-local", "fused"),
            "fused/copy": ratio("fused", "copy"),
        },
    }


def markdown(results):
    lines = [
        "| case | copy ms | fused ms | syncbn ms | synced-local ms | keras ms "
        "| syncbn/fused | keras/syncbn | synced-local/fused | fused/copy |",
        "| --- | " + " | ".join(["---:"] * 9) + " |",
    ]
    for case, summary in results.items():
        med, iqr, ratios = summary["median_ms"], summary["iqr_ms"], summary["ratios"]
        cells = [f"{med[v]:.2f} ±{iqr[v] / 2:.2f}" for v in VARIANTS]
        cells += [f"{ratios[k]:.2f}" for k in
                  ("syncbn/fused", "keras/syncbn", "synced-local/fused", "fused/copy")]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    cases = CASES
    if args.cases:
        wanted = [w.strip() for w in args.cases.split(",")]
        cases = [c for c in CASES if any(w in c[0] for w in wanted)]
        if not cases:
            raise ValueError(f"Argument `--cases` matched no case. Received: --cases={args.cases!r}")

    print("command: python " + shlex.join(sys.argv), flush=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, TensorFlow {tf.__version__}, "
          f"{args.rounds} rounds x {args.repeat} calls, medians (±half IQR) in ms per "
          "forward+backward; ratios are medians of per-round ratios", flush=True)
    results = {}
    for name, shape, axis, dtype_name in cases:
        steps = build_variants(shape, axis, dtype_name)
        timed = {step_name: functools.partial(run_once, step) for step_name, step in steps.items()}
        results[name] = summarize(time_round_robin(timed, args.rounds, args.repeat))
        print(f"done: {name}", file=sys.stderr, flush=True)
    print()
    print(markdown(results))
    targets = [c[0] for c in CASES[:2] if c[0] in results]
    if targets:
        print()
        for case in targets:
            ratios = results[case]["ratios"]
            fused_ok = ratios["syncbn/fused"] <= 1.1
            keras_ok = ratios["keras/syncbn"] >= 1.6
            print(f"target {case}: syncbn/fused {ratios['syncbn/fused']:.2f} (<= 1.1: "
                  f"{'met' if fused_ok else 'MISSED'}), keras/syncbn {ratios['keras/syncbn']:.2f} "
                  f"(>= 1.6: {'met' if keras_ok else 'MISSED'})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"command": sys.argv, "rounds": args.rounds, "repeat": args.repeat,
                       "cases": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
