"""Whole models: time to the first training step and steady step, Keras BN against syncbn.

Two modes, each variant in a fresh process (so no variant inherits another's
traced functions, Grappler caches or warm allocator), side by side in one run:

* default: one process, one replica. For each `keras.applications` model
  (`weights=None`, 10 classes), a `tf.function` train step (forward, backward,
  SGD) on a fixed batch:
  - `keras`: the model as built, with `keras.layers.BatchNormalization`;
  - `syncbn`: `syncbn.convert(model)` (one replica: no communication);
  - `synced`: `syncbn.convert(model, communicator=PretendTwoReplicas())`, a
    communicator that says 2 replicas and whose `all_sum` returns its input
    (bench/layer.py): the synchronized path's graph, with no communication.
* `--mirrored N`: N replicas on N logical CPUs under `MirroredStrategy`, a
  custom `strategy.run` train step, `--batch` samples per replica:
  - `keras`: Keras BN, local statistics;
  - `keras-sync`: every BN cloned with `synchronized=True`;
  - `syncbn`: `syncbn.convert(model)` (the strategy's all-reduce).

"First step" is the wall time of the first call of the traced step (tracing,
Grappler, function instantiation and the step itself), after the model is
built and converted. "Steady step" is the median of `--steps` timed calls
after 2 warm-up calls, each call waited for (`.numpy()` on the loss).
"traced ops" counts the nodes of the step's traced graph and of every
function in its library (before Grappler). Ratios are per round, medians over
`--rounds`; on a shared machine, compare ratios, not absolute times.

    python bench/model_step.py                               # ~5 min on a quiet 2-core machine
    python bench/model_step.py --models mobilenetv2 --rounds 3 --steps 20
    python bench/model_step.py --mirrored 2
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
MODELS = ["resnet50", "mobilenetv2", "efficientnetb0"]
SINGLE_VARIANTS = ["keras", "syncbn", "synced"]
MIRRORED_VARIANTS = ["keras", "keras-sync", "syncbn"]
RESULT_MARK = "MODEL_STEP_RESULT "
WARMUP_STEPS = 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, from {MODELS} (default: all)")
    parser.add_argument("--batch", type=int, default=8, help="samples per replica (default 8)")
    parser.add_argument("--size", type=int, default=64, help="image height and width (default 64)")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steady steps per process (default 5)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh processes per variant, interleaved (default 1)")
    parser.add_argument("--mirrored", type=int, default=0, metavar="N",
                        help="MirroredStrategy over N logical CPUs (default 0: one replica)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    # One variant in this process (the parent runs these).
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",")]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"Argument `--models` must name models from {MODELS}. "
                         f"Received: --models={args.models!r}")
    for name in ("batch", "size", "steps", "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"Argument `--{name}` must be >= 1. Received: --{name}={getattr(args, name)}")
    if args.mirrored < 0 or args.mirrored == 1:
        raise ValueError(f"Argument `--mirrored` must be 0 or >= 2. Received: --mirrored={args.mirrored}")
    args.model_list = models
    return args


# ---------------------------------------------------------------- in one process


def build_model(name, size):
    """A `keras.applications` model with random weights (seeded) and 10 classes."""
    import keras

    keras.utils.set_random_seed(0)
    shape = (size, size, 3)
    if name == "resnet50":
        return keras.applications.ResNet50(weights=None, input_shape=shape, classes=10)
    if name == "mobilenetv2":
        return keras.applications.MobileNetV2(weights=None, input_shape=shape, classes=10, alpha=0.35)
    return keras.applications.EfficientNetB0(weights=None, input_shape=shape, classes=10)


def keras_synchronized(model):
    """A copy of `model` whose BatchNormalization layers have `synchronized=True`."""
    import keras

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.BatchNormalization):
            config["synchronized"] = True
        return layer.__class__.from_config(config)

    return keras.models.clone_model(model, clone_function=clone)


def make_variant(variant, model):
    import syncbn

    if variant == "keras":
        return model
    if variant == "keras-sync":
        return keras_synchronized(model)
    if variant == "syncbn":
        return syncbn.convert(model)
    if variant == "synced":
        from layer import PretendTwoReplicas

        return syncbn.convert(model, communicator=PretendTwoReplicas())
    raise ValueError(f"Unknown variant. Received: variant={variant!r}")


def count_bn_layers(model):
    import keras

    import syncbn

    return sum(isinstance(layer, (keras.layers.BatchNormalization, syncbn.SyncBatchNormalization))
               for layer in model.layers)


def traced_ops(concrete_function):
    """Nodes of a traced function's graph plus every function in its library."""
    graph_def = concrete_function.graph.as_graph_def()
    return len(graph_def.node) + sum(len(f.node_def) for f in graph_def.library.function)


def random_batch(batch, size, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return (rng.normal(size=(batch, size, size, 3)).astype(np.float32),
            rng.integers(0, 10, size=(batch,)).astype(np.int32))


def time_calls(step, args, steps):
    """(seconds of the first call, [seconds of each steady call]), each call waited for."""
    start = time.perf_counter()
    step(*args).numpy()
    first = time.perf_counter() - start
    for _ in range(WARMUP_STEPS):
        step(*args).numpy()
    steady = []
    for _ in range(steps):
        start = time.perf_counter()
        step(*args).numpy()
        steady.append(time.perf_counter() - start)
    return first, steady


def run_child(spec):
    """One variant of one model in this process; prints one result line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    replicas = spec["mirrored"]
    if replicas:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    import keras

    start = time.perf_counter()
    if replicas:
        strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
        with strategy.scope():
            model = make_variant(spec["variant"], build_model(spec["model"], spec["size"]))
            optimizer = keras.optimizers.SGD(0.01)
    else:
        strategy = None
        model = make_variant(spec["variant"], build_model(spec["model"], spec["size"]))
        optimizer = keras.optimizers.SGD(0.01)
    build_seconds = time.perf_counter() - start
    global_batch = spec["batch"] * max(replicas, 1)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction=None)

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            per_sample = loss_fn(y, model(x, training=True))
            loss = tf.reduce_sum(per_sample) / global_batch
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    x, y = random_batch(global_batch, spec["size"])
    if strategy is None:
        step = tf.function(replica_step)
        inputs = (tf.constant(x), tf.constant(y))
    else:
        @tf.function
        def step(x, y):
            losses = strategy.run(replica_step, args=(x, y))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

        dataset = tf.data.Dataset.from_tensors((x, y))
        inputs = next(iter(strategy.experimental_distribute_dataset(dataset)))
    first, steady = time_calls(step, inputs, spec["steps"])
    result = {**spec, "first_step_s": first, "steady_ms": 1e3 * statistics.median(steady),
              "steady_all_ms": [1e3 * s for s in steady], "build_s": build_seconds,
              "bn_layers": count_bn_layers(model),
              "traced_ops": traced_ops(step.get_concrete_function(*inputs))}
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


def child_env():
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_DIR, BENCH_DIR, env.get("PYTHONPATH")]))
    return env


def parse_results(output):
    return [json.loads(line.split(RESULT_MARK, 1)[1]) for line in output.splitlines()
            if RESULT_MARK in line]


def run_in_fresh_process(spec, timeout=1800):
    command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    result = subprocess.run(command, capture_output=True, text=True, env=child_env(),
                            timeout=timeout)
    found = parse_results(result.stdout)
    if result.returncode or not found:
        raise RuntimeError(f"{spec} failed (exit {result.returncode}):\n"
                           f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return found[0]


def run_side_by_side(args, variants):
    """model -> variant -> list of per-round results; variants rotated per round."""
    results = {model: {v: [] for v in variants} for model in args.model_list}
    for round_index in range(args.rounds):
        for model in args.model_list:
            order = variants[round_index % len(variants):] + variants[: round_index % len(variants)]
            for variant in order:
                spec = {"model": model, "variant": variant, "batch": args.batch,
                        "size": args.size, "steps": args.steps, "mirrored": args.mirrored}
                result = run_in_fresh_process(spec)
                results[model][variant].append(result)
                print(f"done: round {round_index + 1} {model} {variant}: first step "
                      f"{result['first_step_s']:.1f} s, steady {result['steady_ms']:.1f} ms",
                      file=sys.stderr, flush=True)
    return results


def median_ratio(runs, key, variant, base):
    return statistics.median(a[key] / b[key] for a, b in zip(runs[variant], runs[base]))


def markdown_side_by_side(results, variants):
    base = variants[0]
    others = variants[1:]
    header = (f"| model (BN layers) | first step s, {' / '.join(variants)} | first-step ratio "
              f"{', '.join(f'{v}/{base}' for v in others)} | steady ms, {' / '.join(variants)} "
              f"| steady ratio {', '.join(f'{v}/{base}' for v in others)} "
              f"| traced ops, {' / '.join(variants)} |")
    lines = [header, "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for model, runs in results.items():
        bn = runs[base][0]["bn_layers"]

        def med(variant, key):
            return statistics.median(r[key] for r in runs[variant])

        firsts = " / ".join(f"{med(v, 'first_step_s'):.1f}" for v in variants)
        steadies = " / ".join(f"{med(v, 'steady_ms'):.0f}" for v in variants)
        first_ratios = ", ".join(f"{median_ratio(runs, 'first_step_s', v, base):.2f}" for v in others)
        steady_ratios = ", ".join(f"{median_ratio(runs, 'steady_ms', v, base):.2f}" for v in others)
        ops = " / ".join(str(runs[v][0]["traced_ops"]) for v in variants)
        lines.append(f"| {model} ({bn}) | {firsts} | {first_ratios} | {steadies} | "
                     f"{steady_ratios} | {ops} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return run_child(json.loads(args.child))
    load = os.getloadavg()[0]
    print("command: python " + shlex.join(sys.argv), flush=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, load average {load:.1f} "
          f"at start; batch {args.batch} per replica at {args.size}x{args.size}; "
          f"{args.rounds} round(s), each variant in a fresh process", flush=True)
    variants = MIRRORED_VARIANTS if args.mirrored else SINGLE_VARIANTS
    results = run_side_by_side(args, variants)
    setup = f"MirroredStrategy, {args.mirrored} logical CPUs" if args.mirrored else "one replica"
    print(f"\n{setup}; {args.steps} steady steps per process, medians\n")
    print(markdown_side_by_side(results, variants))
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"command": sys.argv, "results": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
