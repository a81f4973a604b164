"""Whole models: time to the first training step and steady step, Keras BN against syncbn.

Three modes, each variant in a fresh process or job (so no variant inherits
another's traced functions, Grappler caches or warm allocator), side by side
in one run:

* default: one process, one replica. For each `keras.applications` model
  (`weights=None`, 10 classes), a `tf.function` train step (forward, backward,
  SGD) on a fixed batch:
  - `keras`: the model as built, with `keras.layers.BatchNormalization`;
  - `syncbn`: `syncbn.convert(model)` (one replica: no communication);
  - `synced`: `syncbn.convert(model, communicator=PretendReplicas())`, a
    communicator that says 2 replicas and whose `all_sum` returns its input
    (bench/layer.py): the synchronized path's graph, with no communication.
* `--mirrored N`: N replicas on N logical CPUs under `MirroredStrategy`, a
  custom `strategy.run` train step, `--batch` samples per replica:
  - `keras`: Keras BN, local statistics;
  - `keras-sync`: every BN cloned with `synchronized=True`;
  - `syncbn`: `syncbn.convert(model)` (the strategy's all-reduce);
  - `synced`: as above, with `PretendReplicas`: the same layers and math,
    no all-reduce in the BN layers. syncbn - synced is what the strategy's
    all-reduces cost.
* `--launch N --backends horovod,mpi,tf`: N ranks, one job per variant through
  `python -m launch -np N --backend B` (`syncbn-launch`), running
  bench/model_fit_job.py on every rank, two epochs of `--steps` steps on a
  fixed synthetic dataset, `--batch` samples per rank; each backend trained
  the way its docs show (horovod: `model.fit` with the `syncbn.horovod_keras`
  glue; mpi: a `tf.function` step averaging gradients over the MPI
  communicator; tf: MultiWorkerMirroredStrategy and `strategy.run`, since
  Keras 3's `model.fit` fails under it, keras-team/keras#20585):
  - `local`: Keras BN (local statistics), same glue;
  - `sync`: `syncbn.convert(model)` (communicator "auto": the backend's);
  - `synced`: as above, with `PretendReplicas`: no collective in the BN
    layers (the gradients are still averaged). sync - synced is what the BN
    layers' collectives cost.
  "First epoch" is rank 0's wall time from the start of training to the end of
  the first epoch; "steady step" rank 0's median step over the second epoch,
  each step timed from `on_train_batch_begin` to `on_train_batch_end`
  (bench/model_fit_job.py says exactly what is timed). Default model:
  mobilenetv2.

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
    python bench/model_step.py --launch 2 --backends horovod,mpi,tf --rounds 3
    python bench/model_step.py --launch 2 --quick      # smoke test: every backend, 1 step
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
# Not a default: a 6-BN CNN (bench/sync_step.py's) that traces in seconds, for --quick.
SMALL_MODEL = "small_cnn"
SINGLE_VARIANTS = ["keras", "syncbn", "synced"]
MIRRORED_VARIANTS = ["keras", "keras-sync", "syncbn", "synced"]
LAUNCH_VARIANTS = ["local", "sync", "synced"]
LAUNCH_MODEL = "mobilenetv2"
# The launcher's arguments for each backend name (the job's --backend is the name).
LAUNCH_BACKENDS = {
    "horovod": ["--backend", "horovod"],
    "mpi": ["--backend", "mpi"],
    "tf": ["--backend", "tf"],
}
# --quick: the smallest model at the smallest size, one step per epoch.
QUICK = {"models": SMALL_MODEL, "size": 32, "batch": 2, "steps": 1}
RESULT_MARK = "MODEL_STEP_RESULT "
WARMUP_STEPS = 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None,
                        help=f"comma-separated, from {MODELS + [SMALL_MODEL]} (default: "
                             f"{','.join(MODELS)}; with --launch, {LAUNCH_MODEL})")
    parser.add_argument("--batch", type=int, default=8, help="samples per replica (default 8)")
    parser.add_argument("--size", type=int, default=64, help="image height and width (default 64)")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steady steps per process; with --launch, steps per epoch "
                             "(default 5)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh processes per variant, interleaved (default 1)")
    parser.add_argument("--mirrored", type=int, default=0, metavar="N",
                        help="MirroredStrategy over N logical CPUs (default 0: one replica)")
    parser.add_argument("--launch", type=int, default=0, metavar="N",
                        help="N ranks through the launcher, one job per backend and variant "
                             "(default 0: off)")
    parser.add_argument("--backends", default=",".join(LAUNCH_BACKENDS),
                        help=f"with --launch: comma-separated, from {list(LAUNCH_BACKENDS)} "
                             f"(default: all)")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds per process or job before it is stopped (default 1800)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: " + " ".join(f"--{k} {v}" for k, v in QUICK.items())
                             + " (overrides them)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    # One variant in this process (the parent runs these).
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    if args.mirrored < 0 or args.mirrored == 1:
        raise ValueError(f"Argument `--mirrored` must be 0 or >= 2. Received: --mirrored={args.mirrored}")
    if args.launch < 0 or args.launch == 1:
        raise ValueError(f"Argument `--launch` must be 0 or >= 2. Received: --launch={args.launch}")
    if args.launch and args.mirrored:
        raise ValueError(f"Arguments `--launch` and `--mirrored` are separate modes: give one. "
                         f"Received: --launch={args.launch} --mirrored={args.mirrored}")
    if args.models is None:
        args.models = LAUNCH_MODEL if args.launch else ",".join(MODELS)
    models = [m.strip() for m in args.models.split(",")]
    unknown = [m for m in models if m not in MODELS + [SMALL_MODEL]]
    if unknown:
        raise ValueError(f"Argument `--models` must name models from {MODELS + [SMALL_MODEL]}. "
                         f"Received: --models={args.models!r}")
    backends = [b.strip() for b in args.backends.split(",")]
    if not backends or any(b not in LAUNCH_BACKENDS for b in backends):
        raise ValueError(f"Argument `--backends` must name backends from {list(LAUNCH_BACKENDS)}. "
                         f"Received: --backends={args.backends!r}")
    for name in ("batch", "size", "steps", "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"Argument `--{name}` must be >= 1. Received: --{name}={getattr(args, name)}")
    if not args.timeout > 0:
        raise ValueError(f"Argument `--timeout` must be > 0. Received: --timeout={args.timeout}")
    args.model_list = models
    args.backend_list = backends
    return args


# ---------------------------------------------------------------- in one process


def build_model(name, size, keras=None):
    """A `keras.applications` model (or `small_cnn`) with random weights (seeded), 10 classes.

    `keras`: the Keras module to build with (default Keras 3; `tf.keras` under
    `TF_USE_LEGACY_KERAS=1`, as bench/legacy_fit.py does, is tf_keras).
    """
    if keras is None:
        import keras

    keras.utils.set_random_seed(0)
    shape = (size, size, 3)
    if name == SMALL_MODEL:
        # 3 blocks of 2 x (3x3 Conv2D, BN, ReLU) and a max-pool: 6 BN layers.
        layers = [keras.Input(shape)]
        for filters in (16, 32, 64):
            for _ in range(2):
                layers += [keras.layers.Conv2D(filters, 3, padding="same", use_bias=False),
                           keras.layers.BatchNormalization(), keras.layers.ReLU()]
            layers.append(keras.layers.MaxPooling2D())
        layers += [keras.layers.GlobalAveragePooling2D(),
                   keras.layers.Dense(10, activation="softmax")]  # as keras.applications
        return keras.Sequential(layers, name=SMALL_MODEL)
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
        from syncbn.collectives import PretendReplicas

        return syncbn.convert(model, communicator=PretendReplicas())
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


def child_command(spec):
    """This module in one fresh process, running one variant of one model."""
    return [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]


def launch_command(spec):
    """One job through the launcher: bench/model_fit_job.py on `spec["launch"]` ranks."""
    backend = spec["backend"]
    return [sys.executable, "-m", "launch", "-np", str(spec["launch"]),
            *LAUNCH_BACKENDS[backend], "--timeout", str(spec["timeout"]), "--",
            sys.executable, os.path.join(BENCH_DIR, "model_fit_job.py"),
            "--backend", backend, "--model", spec["model"], "--variant", spec["variant"],
            "--batch", str(spec["batch"]), "--size", str(spec["size"]),
            "--steps", str(spec["steps"])]


def run_in_fresh_process(spec, command=None, results=1, timeout=1800):
    """Runs `command` (default: `child_command(spec)`) and returns its first result.

    `results` is how many result lines the command must print (one per rank);
    the first is rank 0's in launcher jobs, whose lines are sorted by rank.
    """
    command = command or child_command(spec)
    result = subprocess.run(command, capture_output=True, text=True, env=child_env(),
                            timeout=timeout, cwd=REPO_DIR)
    found = parse_results(result.stdout)
    if result.returncode or len(found) != results:
        raise RuntimeError(f"{spec} failed (exit {result.returncode}, {len(found)} of {results} "
                           f"result lines):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return sorted(found, key=lambda r: r.get("rank", 0))[0]


def cases(args):
    """(row label, spec without its variant) for each row of the table."""
    common = {"batch": args.batch, "size": args.size, "steps": args.steps}
    if args.launch:
        return [(f"{backend} {model}", {**common, "model": model, "backend": backend,
                                        "launch": args.launch, "timeout": args.timeout})
                for backend in args.backend_list for model in args.model_list]
    return [(model, {**common, "model": model, "mirrored": args.mirrored})
            for model in args.model_list]


def run_side_by_side(args, variants):
    """row label -> variant -> list of per-round results; variants rotated per round."""
    rows = cases(args)
    results = {label: {v: [] for v in variants} for label, _ in rows}
    for round_index in range(args.rounds):
        for label, base_spec in rows:
            order = variants[round_index % len(variants):] + variants[: round_index % len(variants)]
            for variant in order:
                spec = {**base_spec, "variant": variant}
                if args.launch:
                    # The launcher's own --timeout stops the ranks; this one is a backstop.
                    result = run_in_fresh_process(spec, launch_command(spec), results=args.launch,
                                                  timeout=args.timeout + 60)
                    first = f"first epoch {result['first_epoch_s']:.1f} s"
                else:
                    result = run_in_fresh_process(spec, timeout=args.timeout)
                    first = f"first step {result['first_step_s']:.1f} s"
                results[label][variant].append(result)
                print(f"done: round {round_index + 1} {label} {variant}: {first}, "
                      f"steady {result['steady_ms']:.1f} ms", file=sys.stderr, flush=True)
    return results


def median_ratio(runs, key, variant, base):
    return statistics.median(a[key] / b[key] for a, b in zip(runs[variant], runs[base]))


# (result key, column title, ratio column title, format) of the timed quantities, per mode.
STEP_COLUMNS = [("first_step_s", "first step s", "first-step ratio", "{:.1f}"),
                ("steady_ms", "steady ms", "steady ratio", "{:.0f}")]
LAUNCH_COLUMNS = [("first_epoch_s", "first epoch s", "first-epoch ratio", "{:.1f}"),
                  ("steady_ms", "steady step ms", "steady ratio", "{:.1f}")]


def markdown_side_by_side(results, variants, columns=STEP_COLUMNS, traced_ops=True,
                          row_title="model (BN layers)"):
    """One row per case: medians per variant and median per-round ratios to the first variant."""
    base = variants[0]
    others = variants[1:]
    titles = [row_title]
    for _, title, ratio_title, _ in columns:
        titles += [f"{title}, {' / '.join(variants)}",
                   f"{ratio_title} {', '.join(f'{v}/{base}' for v in others)}"]
    if traced_ops:
        titles.append(f"traced ops, {' / '.join(variants)}")
    lines = ["| " + " | ".join(titles) + " |",
             "| --- |" + " ---: |" * (len(titles) - 1)]
    for label, runs in results.items():
        cells = [f"{label} ({runs[base][0]['bn_layers']})"]
        for key, _, _, fmt in columns:
            cells.append(" / ".join(fmt.format(statistics.median(r[key] for r in runs[v]))
                                    for v in variants))
            cells.append(", ".join(f"{median_ratio(runs, key, v, base):.2f}" for v in others))
        if traced_ops:
            cells.append(" / ".join(str(runs[v][0]["traced_ops"]) for v in variants))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return run_child(json.loads(args.child))
    load = os.getloadavg()[0]
    print("command: python " + shlex.join(sys.argv), flush=True)
    per = "rank" if args.launch else "replica"
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, load average {load:.1f} "
          f"at start; batch {args.batch} per {per} at {args.size}x{args.size}; "
          f"{args.rounds} round(s), each variant in a fresh "
          f"{'job' if args.launch else 'process'}", flush=True)
    if args.launch:
        variants = LAUNCH_VARIANTS
    else:
        variants = MIRRORED_VARIANTS if args.mirrored else SINGLE_VARIANTS
    results = run_side_by_side(args, variants)
    if args.launch:
        print(f"\n{args.launch} ranks through the launcher; 2 epochs of {args.steps} steps; "
              f"first epoch and median step of the second, rank 0; medians over rounds\n")
        print(markdown_side_by_side(results, variants, LAUNCH_COLUMNS, traced_ops=False,
                                    row_title="backend model (BN layers)"))
    else:
        setup = f"MirroredStrategy, {args.mirrored} logical CPUs" if args.mirrored else "one replica"
        print(f"\n{setup}; {args.steps} steady steps per process, medians\n")
        print(markdown_side_by_side(results, variants))
    finish(args.json, results)
    return 0


def finish(json_path, results):
    """Prints the load average at the end; with `--json PATH`, writes the command and results there."""
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
    if json_path:
        with open(json_path, "w") as handle:
            json.dump({"command": sys.argv, "results": results}, handle, indent=2)


if __name__ == "__main__":
    sys.exit(main())
