"""Peak memory (RSS) of training steps: syncbn against keras BatchNormalization.

Each variant runs in a fresh Python process (so peaks do not carry over),
which builds the same model (3 conv blocks of 2 x (Conv2D, BN, ReLU), 6 BN
layers of 32/32/64/64/128/128 channels, 32x32x3 inputs, batch 128 by
default), traces a `tf.function` train step (forward, backward, SGD) and runs
it `--steps` times. It reports `resource.getrusage(RUSAGE_SELF).ru_maxrss`
twice: after imports and model build (`baseline`), and after the steps
(`peak`); `peak - baseline` is what the training steps (tracing included)
added on top of TensorFlow's own footprint.

Variants:

* `syncbn`: `SyncBatchNormalization(communicator="local")` (one replica:
  the local path, element-wise kernels on a CPU);
* `synced-local`: the same with a communicator that says 2 replicas and sums
  nothing, so the synchronized path (custom gradient) runs;
* `keras`: `keras.layers.BatchNormalization`;
* `none`: no BN layers at all, the floor.

Processes of the variants run round-robin, `--repeats` times each; the table
shows medians.

    python bench/memory.py                 # about 1 minute on 2 cores
    python bench/memory.py --batch 256 --json memory.json
"""

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys

import numpy as np


VARIANTS = ["none", "keras", "syncbn", "synced-local"]
FILTERS = (32, 64, 128)


def max_rss_mib():
    # Linux reports kilobytes.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(variant, batch, steps):
    """Runs in the fresh process: prints one JSON line with the two readings."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    import syncbn
    from syncbn.collectives import PretendReplicas

    makers = {
        "none": None,
        "keras": lambda: keras.layers.BatchNormalization(),
        "syncbn": lambda: syncbn.SyncBatchNormalization(communicator="local"),
        "synced-local": lambda: syncbn.SyncBatchNormalization(communicator=PretendReplicas()),
    }
    make_bn = makers[variant]
    keras.utils.set_random_seed(0)
    layers = [keras.Input((32, 32, 3))]
    for filters in FILTERS:
        for _ in range(2):
            layers.append(keras.layers.Conv2D(filters, 3, padding="same", use_bias=False))
            if make_bn is not None:
                layers.append(make_bn())
            layers.append(keras.layers.ReLU())
        layers.append(keras.layers.MaxPooling2D())
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
    model = keras.Sequential(layers)
    optimizer = keras.optimizers.SGD(0.01)
    optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch, 32, 32, 3)).astype(np.float32))
    y = tf.constant(rng.integers(0, 10, size=(batch,)))

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    baseline = max_rss_mib()
    for _ in range(steps):
        train_step().numpy()
    print(json.dumps({"baseline_mib": baseline, "peak_mib": max_rss_mib()}))


def run_child(variant, batch, steps):
    command = [sys.executable, os.path.abspath(__file__), "--child", variant,
               "--batch", str(batch), "--steps", str(steps)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--steps", type=int, default=5, help="train steps per process (default 5)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="fresh processes per variant, round-robin (default 3)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        child(args.child, args.batch, args.steps)
        return 0
    print("command: python " + shlex.join(sys.argv), flush=True)
    readings = {variant: [] for variant in VARIANTS}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            readings[variant].append(run_child(variant, args.batch, args.steps))
    results = {}
    for variant, runs in readings.items():
        baseline = float(np.median([r["baseline_mib"] for r in runs]))
        peak = float(np.median([r["peak_mib"] for r in runs]))
        delta = float(np.median([r["peak_mib"] - r["baseline_mib"] for r in runs]))
        results[variant] = {"baseline_mib": baseline, "peak_mib": peak, "delta_mib": delta}
    print(f"batch {args.batch} x 32x32x3, 6 BN layers ({', '.join(str(f) for f in FILTERS)} "
          f"channels, 2 each), {args.steps} steps per process, median of {args.repeats} "
          "fresh processes per variant; ru_maxrss in MiB")
    print()
    print("| variant | baseline MiB | peak MiB | peak - baseline MiB | peak / keras peak "
          "| (peak - baseline) / keras's |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    keras_result = results["keras"]
    for variant, r in results.items():
        print(f"| {variant} | {r['baseline_mib']:.0f} | {r['peak_mib']:.0f} | {r['delta_mib']:.0f} "
              f"| {r['peak_mib'] / keras_result['peak_mib']:.3f} "
              f"| {r['delta_mib'] / keras_result['delta_mib']:.2f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"command": sys.argv, "batch": args.batch, "steps": args.steps,
                       "repeats": args.repeats, "results": results, "runs": readings},
                      handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
