"""Every BN layer of a model at once: which kernels suit its layer shapes on this machine.

`bench/layer.py` times one large layer; a whole model is mostly small ones
(MobileNetV2 at 64x64 has 52 BN layers, most under 10k values). This
benchmark takes the input shapes of every BatchNormalization layer of a
`keras.applications` model, builds one layer per shape, and times one
`tf.function` that runs all of them forward and backward (loss
`sum(y * y)`, gradients with respect to every input, gamma and beta), the
way they run inside the model's step, without the convolutions.

Variants, interleaved round-robin in one process, each traced once:

* `keras`: `keras.layers.BatchNormalization`;
* `syncbn-elementwise`, `syncbn-fused`: `SyncBatchNormalization` (one replica)
  traced with `SYNCBN_KERNELS=elementwise` / `=fused`;
* `synced-elementwise`, `synced-fused`: the same with a communicator that says
  2 replicas and whose `all_sum` returns its input (the synchronized path, no
  communication).

Ratios are medians of per-round ratios to `keras`. On a CPU this is the
measurement behind `syncbn.ops.kernels_for` choosing element-wise kernels.

    python bench/model_layers.py                         # MobileNetV2, batch 8 at 64x64, ~1 min
    python bench/model_layers.py --model resnet50 --batch 32
"""

import argparse
import os
import platform
import shlex
import sys
import time
from unittest import mock

import numpy as np

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
sys.path.insert(0, os.path.dirname(BENCH_DIR))

from tables import median_and_ratio_table  # noqa: E402

MODELS = ("mobilenetv2", "resnet50", "efficientnetb0")
VARIANTS = ("keras", "syncbn-elementwise", "syncbn-fused", "synced-elementwise", "synced-fused")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenetv2", help=f"one of {MODELS} (default mobilenetv2)")
    parser.add_argument("--batch", type=int, default=8, help="samples (default 8)")
    parser.add_argument("--size", type=int, default=64, help="image height and width (default 64)")
    parser.add_argument("--rounds", type=int, default=15, help="round-robin rounds (default 15)")
    parser.add_argument("--repeat", type=int, default=5, help="calls per variant per round (default 5)")
    args = parser.parse_args(argv)
    if args.model not in MODELS:
        raise ValueError(f"Argument `--model` must be one of {MODELS}. Received: --model={args.model!r}")
    for name in ("batch", "size", "rounds", "repeat"):
        if getattr(args, name) < 1:
            raise ValueError(f"Argument `--{name}` must be >= 1. Received: --{name}={getattr(args, name)}")
    return args


def bn_input_shapes(model_name, batch, size):
    """`[batch, H, W, C]` of every BatchNormalization layer's input, in model order."""
    import keras

    from model_step import build_model

    model = build_model(model_name, size)
    return [(batch,) + tuple(layer.input.shape[1:]) for layer in model.layers
            if isinstance(layer, keras.layers.BatchNormalization)]


def build_step(variant, shapes):
    """A traced forward+backward over one fresh layer per shape, for `variant`."""
    import keras
    import tensorflow as tf

    import syncbn
    from syncbn.collectives import PretendReplicas

    rng = np.random.default_rng(0)
    xs = [tf.constant(rng.normal(3.0, 2.0, shape).astype(np.float32)) for shape in shapes]
    if variant == "keras":
        layers = [keras.layers.BatchNormalization() for _ in shapes]
        kernels = None
    else:
        path, kernels = variant.split("-")
        communicator = "local" if path == "syncbn" else PretendReplicas()
        layers = [syncbn.SyncBatchNormalization(communicator=communicator) for _ in shapes]
    for layer, shape in zip(layers, shapes):
        layer.build(shape)
    weights = [w for layer in layers for w in (layer.gamma, layer.beta)]

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(xs)
            loss = tf.add_n([tf.reduce_sum(tf.square(layer(x, training=True)))
                             for layer, x in zip(layers, xs)])
        return loss, tape.gradient(loss, xs + weights)

    # SYNCBN_KERNELS is read when the step is traced.
    with mock.patch.dict(os.environ, {} if kernels is None else {"SYNCBN_KERNELS": kernels}):
        step.get_concrete_function()
    return step


def run_once(step):
    loss, grads = step()
    loss.numpy()
    for grad in grads:
        grad.numpy()


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    shapes = bn_input_shapes(args.model, args.batch, args.size)
    steps = {variant: build_step(variant, shapes) for variant in VARIANTS}
    for step in steps.values():
        for _ in range(2):
            run_once(step)
    samples = {variant: [] for variant in VARIANTS}
    for round_index in range(args.rounds):
        order = VARIANTS[round_index % len(VARIANTS):] + VARIANTS[:round_index % len(VARIANTS)]
        for variant in order:
            start = time.perf_counter()
            for _ in range(args.repeat):
                run_once(steps[variant])
            samples[variant].append((time.perf_counter() - start) / args.repeat)
    values = [int(np.prod(shape)) for shape in shapes]
    print("command: python " + shlex.join(sys.argv))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, TensorFlow {tf.__version__}; "
          f"{args.model}: {len(shapes)} BN layers at batch {args.batch}, {args.size}x{args.size}, "
          f"{min(values)} to {max(values)} values each (median {int(np.median(values))}); "
          f"{args.rounds} rounds x {args.repeat} calls")
    print()
    header = ("variant", "ms per forward + backward over every layer", "ratio to keras")
    print("\n".join(median_and_ratio_table(samples, VARIANTS, header, scale=1e3)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
