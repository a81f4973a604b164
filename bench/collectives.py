"""Collectives and bytes per training step and at inference, counted at run time.

Each `SyncBatchNormalization` gets a counting communicator: every `all_sum`
adds a `tf.py_function` whose side effect records the call (name, payload
bytes), tied to the returned sum by a control dependency. Only executed calls
count: a traced branch that does not run (a `tf.cond` on a False `training`
tensor) counts nothing.

In one process the communicator says it has 2 replicas and returns its input,
so the layers take the synchronized path; under `--mirrored N` the model runs
in MirroredStrategy on N virtual CPUs and the counter wraps the real
`TFDistributeCommunicator` (counts are then per replica).

Expected, from syncbn's packing: 2 collectives per BN layer per training step
(forward: count + sums, `2C + 1` float64 = `8(2C + 1)` bytes; backward: two
gradient sums, `2C` float32 = `8C` bytes) and 0 at inference.
`tests/test_collective_count.py` asserts the counts.

    python bench/collectives.py                        # small CNN and ResNet-50, < 1 minute
    python bench/collectives.py --mirrored 2 --json collectives.json
"""

import argparse
import contextlib
import json
import os
import shlex
import sys

import numpy as np

from syncbn.collectives.counting import CountingCommunicator

BATCH = 4


def small_cnn(communicator):
    """3 conv blocks, 6 BN layers, 32x32x3 input (the model of bench/sync_step.py)."""
    import keras

    import syncbn

    layers = keras.layers
    model_layers = [keras.Input((32, 32, 3))]
    for filters in (16, 32, 64):
        for _ in range(2):
            model_layers += [
                layers.Conv2D(filters, 3, padding="same", use_bias=False),
                syncbn.SyncBatchNormalization(communicator=communicator),
                layers.ReLU(),
            ]
        model_layers.append(layers.MaxPooling2D())
    model_layers += [layers.GlobalAveragePooling2D(), layers.Dense(10)]
    return keras.Sequential(model_layers, name="small_cnn")


def resnet50(communicator):
    """keras.applications.ResNet50 (weights=None, 32x32 input), BN layers converted."""
    import keras

    import syncbn

    original = keras.applications.ResNet50(
        weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None)
    return syncbn.convert(original, communicator=communicator)


MODELS = {"small_cnn": small_cnn, "resnet50": resnet50}


def expected_bytes(model):
    """Per training step: 8(2C + 1) forward + 8C backward bytes per BN layer."""
    import syncbn

    channels = [layer.gamma.shape[0] for layer in model._flatten_layers()
                if isinstance(layer, syncbn.SyncBatchNormalization)]
    return len(channels), sum(8 * (2 * c + 1) + 8 * c for c in channels)


def measure(model_name, strategy=None, steps=2):
    """Rows of (mode, executed collectives per step, bytes per step)."""
    import keras
    import tensorflow as tf

    from syncbn.collectives.tf_distribute import TFDistributeCommunicator

    replicas = 1 if strategy is None else strategy.num_replicas_in_sync
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        if strategy is None:
            counter = CountingCommunicator()
        else:
            counter = CountingCommunicator(replicas, TFDistributeCommunicator)
        model = MODELS[model_name](counter)
        model.compile(optimizer=keras.optimizers.SGD(0.01), jit_compile=False,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    num_bn, bytes_expected = expected_bytes(model)
    global_batch = BATCH * replicas
    rng = np.random.default_rng(0)
    x = rng.normal(size=(global_batch * steps, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, size=(global_batch * steps,))
    rows = []

    def row(mode, executions):
        calls, num_bytes = counter.take()
        # Per replica and per executed step.
        setup = ("1 process (says 2 replicas)" if strategy is None
                 else f"MirroredStrategy, {replicas} CPUs")
        rows.append({"model": model_name, "setup": setup, "replicas": replicas, "mode": mode,
                     "bn_layers": num_bn,
                     "collectives_per_step": calls / executions / replicas,
                     "bytes_per_step": num_bytes / executions / replicas,
                     "expected_bytes_training": bytes_expected})

    if strategy is None:
        optimizer = keras.optimizers.SGD(0.01)

        def train_step(x, y):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = tf.reduce_mean(
                    keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))

        xb, yb = tf.constant(x[:BATCH]), tf.constant(y[:BATCH])
        train_step(xb, yb)
        row("train step, eager", 1)
        compiled = tf.function(train_step)
        for _ in range(steps):
            compiled(xb, yb)
        row("train step, tf.function", steps)

        @tf.function
        def forward(x, training):
            return model(x, training=training)

        forward(xb, tf.constant(False))
        row("forward, tf.function, training=tf.constant(False)", 1)
    model.fit(x, y, batch_size=global_batch, epochs=1, shuffle=False, verbose=0)
    row("model.fit", steps)
    model.predict(x, batch_size=global_batch, verbose=0)
    row("model.predict", steps)
    model.evaluate(x, y, batch_size=global_batch, verbose=0)
    row("model.evaluate", steps)
    return rows


def markdown(rows):
    lines = ["| model | setup | mode | BN layers | collectives/step | per BN layer "
             "| bytes/step (per replica) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        per_layer = r["collectives_per_step"] / r["bn_layers"]
        lines.append(f"| {r['model']} | {r['setup']} | {r['mode']} | {r['bn_layers']} "
                     f"| {r['collectives_per_step']:g} | {per_layer:g} | {r['bytes_per_step']:,.0f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small_cnn,resnet50",
                        help=f"comma-separated, of {sorted(MODELS)} (default: both)")
    parser.add_argument("--mirrored", type=int, default=0, metavar="N",
                        help="also count under MirroredStrategy on N virtual CPUs (default 0: off)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    models = [m.strip() for m in args.models.split(",")]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"Argument `--models` must name models of {sorted(MODELS)}. "
                         f"Received: --models={args.models!r}")
    if args.mirrored < 0 or args.mirrored == 1:
        raise ValueError(f"Argument `--mirrored` must be 0 (off) or >= 2. "
                         f"Received: --mirrored={args.mirrored}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if args.mirrored:
        # Must happen before TensorFlow initializes its devices.
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * args.mirrored)

    print("command: python " + shlex.join(sys.argv), flush=True)
    # One strategy for all models: a second MirroredStrategy on the same devices
    # reuses the first one's collective keys, and TF then mixes their collectives
    # ("Shape mismatch in the collective instance 100", measured with TF 2.18.1).
    strategy = (tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(args.mirrored)])
                if args.mirrored else None)
    rows = []
    for name in models:
        rows += measure(name)
        if strategy is not None:
            rows += measure(name, strategy)
    print()
    print(markdown(rows))
    print()
    for name in models:
        first = next(r for r in rows if r["model"] == name)
        print(f"expected for {name}: {2 * first['bn_layers']} collectives and "
              f"{first['expected_bytes_training']:,} bytes per training step (2 per BN layer: "
              "8(2C+1) + 8C bytes), 0 at inference")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"command": sys.argv, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
