"""Whole models: time to the first training step and steady step, Keras BN against syncbn.

Three modes, each variant in a fresh process (so no variant inherits another's
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
* `--launch`: 2 ranks through `syncbn-launch` per backend, Keras BN against
  `syncbn.convert(model)`. Horovod runs `model.fit` with the
  `syncbn.horovod_keras` glue (as examples/horovodrun_fit.py); MPI and tf run
  a custom loop (Keras 3's `model.fit` does not run under
  MultiWorkerMirroredStrategy, keras-team/keras#20585; under plain MPI there
  is no Keras glue): one flattened gradient all-sum over the MPI communicator,
  and the strategy's own gradient all-reduce. Reports the first epoch
  (tracing included) and the steady step (later epochs).

"First step" is the wall time of the first call of the traced step (tracing,
Grappler, function instantiation and the step itself), after the model is
built and converted. "Steady step" is the median of `--steps` timed calls
after 2 warm-up calls, each call waited for (`.numpy()` on the loss).
"traced ops" counts the nodes of the step's traced graph and of every
function in its library (before Grappler). Ratios are per round, medians over
`--rounds`; on a shared machine, compare ratios, not absolute times.

    python bench/model_step.py                               # ~5 min on 2 loaded cores
    python bench/model_step.py --models mobilenetv2 --rounds 3 --steps 20
    python bench/model_step.py --mirrored 2
    python bench/model_step.py --launch --backends horovod,mpi,tf
"""

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
MODELS = ["resnet50", "mobilenetv2", "efficientnetb0"]
SINGLE_VARIANTS = ["keras", "syncbn", "synced"]
MIRRORED_VARIANTS = ["keras", "keras-sync", "syncbn"]
LAUNCH_VARIANTS = ["keras", "syncbn"]
BACKENDS = ["horovod", "mpi", "tf"]
RESULT_MARK = "MODEL_STEP_RESULT "
WARMUP_STEPS = 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, from {MODELS} (default: all; --launch: mobilenetv2)")
    parser.add_argument("--batch", type=int, default=8, help="samples per replica (default 8)")
    parser.add_argument("--size", type=int, default=64, help="image height and width (default 64)")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steady steps per process (default 5; --launch: steps per epoch, "
                             "default 10)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh processes per variant, interleaved (default 1)")
    parser.add_argument("--mirrored", type=int, default=0, metavar="N",
                        help="MirroredStrategy over N logical CPUs (default 0: one replica)")
    parser.add_argument("--launch", action="store_true",
                        help="2 ranks through syncbn-launch per backend in --backends")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help=f"for --launch (default {','.join(BACKENDS)})")
    parser.add_argument("--epochs", type=int, default=3, help="for --launch (default 3)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    # One variant in this process (the parent runs these).
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rank-job", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",")]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"Argument `--models` must name models from {MODELS}. "
                         f"Received: --models={args.models!r}")
    backends = [b.strip() for b in args.backends.split(",")]
    if any(b not in BACKENDS for b in backends):
        raise ValueError(f"Argument `--backends` must name backends from {BACKENDS}. "
                         f"Received: --backends={args.backends!r}")
    for name in ("batch", "size", "steps", "rounds", "epochs"):
        if getattr(args, name) < 1:
            raise ValueError(f"Argument `--{name}` must be >= 1. Received: --{name}={getattr(args, name)}")
    if args.mirrored < 0 or args.mirrored == 1:
        raise ValueError(f"Argument `--mirrored` must be 0 or >= 2. Received: --mirrored={args.mirrored}")
    if args.launch and args.models == ",".join(MODELS):
        models = ["mobilenetv2"]
    args.model_list, args.backend_list = models, backends
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


# ---------------------------------------------------------------- 2 ranks, launcher


class EpochTimer:
    """Epoch wall times and the gaps between consecutive step ends, per epoch."""

    def __init__(self):
        self.epochs = []
        self.step_gaps = []
        self._epoch_start = None
        self._last_end = None

    def epoch_begin(self):
        self._epoch_start = self._last_end = time.perf_counter()
        self.step_gaps.append([])

    def step_end(self):
        now = time.perf_counter()
        self.step_gaps[-1].append(now - self._last_end)
        self._last_end = now

    def epoch_end(self):
        self.epochs.append(time.perf_counter() - self._epoch_start)

    def summary(self):
        # Later epochs, first step of each left out (it waits for the epoch's setup).
        steady = [gap for gaps in self.step_gaps[1:] for gap in gaps[1:]]
        return {"first_epoch_s": self.epochs[0], "epochs_s": self.epochs,
                "steady_ms": 1e3 * statistics.median(steady) if steady else float("nan")}


def run_rank_job(spec):
    """One rank of a --launch job: trains `spec["variant"]` and prints rank 0's timings."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    backend = spec["backend"]
    if backend == "horovod":
        import syncbn

        syncbn.init_horovod()
    import keras
    import tensorflow as tf

    import syncbn

    timer = EpochTimer()
    steps, epochs, batch = spec["steps"], spec["epochs"], spec["batch"]
    if backend == "tf":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        rank, size = strategy.cluster_resolver.task_id, strategy.num_replicas_in_sync
    elif backend == "horovod":
        from syncbn import horovod_keras as hk

        rank, size = hk.rank(), hk.size()
    else:
        from mpi4py import MPI

        rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    x, y = random_batch(steps * batch * size, spec["size"], seed=1)

    def make_model():
        return make_variant(spec["variant"], build_model(spec["model"], spec["size"]))

    if backend == "horovod":
        from syncbn import horovod_keras as hk

        class Timing(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                timer.epoch_begin()

            def on_train_batch_end(self, batch, logs=None):
                timer.step_end()

            def on_epoch_end(self, epoch, logs=None):
                timer.epoch_end()

        model = make_model()
        model.compile(optimizer=hk.DistributedOptimizer(keras.optimizers.SGD(0.01)),
                      loss=keras.losses.SparseCategoricalCrossentropy(), jit_compile=False)
        shard = slice(rank * steps * batch, (rank + 1) * steps * batch)
        model.fit(x[shard], y[shard], batch_size=batch, epochs=epochs, shuffle=False, verbose=0,
                  callbacks=[hk.BroadcastInitialState(root_rank=0), Timing()])
    else:
        loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction=None)
        global_batch = batch * size
        if backend == "tf":
            with strategy.scope():
                model = make_model()
                optimizer = keras.optimizers.SGD(0.01)
        else:
            from syncbn import collectives

            communicator = collectives.resolve("mpi")
            model = make_model()
            optimizer = keras.optimizers.SGD(0.01)

        def replica_step(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(loss_fn(y, model(x, training=True))) / global_batch
            grads = tape.gradient(loss, model.trainable_variables)
            if backend == "mpi":
                # [*shape_i] for each gradient -> [sum of sizes]: one all-sum for all.
                flat = communicator.all_sum(tf.concat([tf.reshape(g, [-1]) for g in grads], 0),
                                            "gradients")
                grads = [tf.reshape(part, g.shape) for part, g in
                         zip(tf.split(flat, [g.shape.num_elements() for g in grads]), grads)]
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        if backend == "tf":
            @tf.function
            def step(x, y):
                return strategy.reduce(tf.distribute.ReduceOp.SUM,
                                       strategy.run(replica_step, args=(x, y)), axis=None)

            dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch)
            batches = list(strategy.experimental_distribute_dataset(dataset))
        else:
            step = tf.function(replica_step)
            batches = [(tf.constant(x[i * global_batch + rank * batch:][:batch]),
                        tf.constant(y[i * global_batch + rank * batch:][:batch]))
                       for i in range(steps)]
        for _ in range(epochs):
            timer.epoch_begin()
            for inputs in batches:
                step(*inputs).numpy()
                timer.step_end()
            timer.epoch_end()
    if rank == 0:
        result = {**spec, **timer.summary(), "ranks": size}
        sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


def launcher_command():
    found = shutil.which("syncbn-launch")
    return [found] if found else [sys.executable, "-m", "launch"]


def run_launch(args):
    """backend -> variant -> list of per-round results."""
    model = args.model_list[0]
    steps = args.steps if args.steps != 5 else 10
    results = {b: {v: [] for v in LAUNCH_VARIANTS} for b in args.backend_list}
    for round_index in range(args.rounds):
        for backend in args.backend_list:
            order = LAUNCH_VARIANTS[round_index % 2:] + LAUNCH_VARIANTS[: round_index % 2]
            for variant in order:
                spec = {"backend": backend, "variant": variant, "model": model, "batch": args.batch,
                        "size": args.size, "steps": steps, "epochs": args.epochs}
                command = launcher_command() + ["-np", "2", "--backend", backend, "--",
                                                sys.executable, os.path.abspath(__file__),
                                                "--rank-job", json.dumps(spec)]
                done = subprocess.run(command, capture_output=True, text=True, env=child_env(),
                                      timeout=3600, cwd=REPO_DIR)
                found = parse_results(done.stdout)
                if done.returncode or not found:
                    raise RuntimeError(f"{shlex.join(command)} failed (exit {done.returncode}):\n"
                                       f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
                results[backend][variant].append(found[0])
                print(f"done: round {round_index + 1} {backend} {variant}: first epoch "
                      f"{found[0]['first_epoch_s']:.1f} s, steady {found[0]['steady_ms']:.1f} ms",
                      file=sys.stderr, flush=True)
    return results


def markdown_launch(results):
    lines = ["| backend | training loop | first epoch s, keras / syncbn | ratio "
             "| steady step ms, keras / syncbn | ratio |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    loops = {"horovod": "model.fit + horovod_keras", "mpi": "custom loop, MPI all-sum",
             "tf": "custom loop, MultiWorkerMirrored"}
    for backend, runs in results.items():
        def med(variant, key):
            return statistics.median(r[key] for r in runs[variant])

        lines.append(
            f"| {backend} | {loops[backend]} | {med('keras', 'first_epoch_s'):.1f} / "
            f"{med('syncbn', 'first_epoch_s'):.1f} | "
            f"{median_ratio(runs, 'first_epoch_s', 'syncbn', 'keras'):.2f} | "
            f"{med('keras', 'steady_ms'):.0f} / {med('syncbn', 'steady_ms'):.0f} | "
            f"{median_ratio(runs, 'steady_ms', 'syncbn', 'keras'):.2f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return run_child(json.loads(args.child))
    if args.rank_job:
        return run_rank_job(json.loads(args.rank_job))
    load = os.getloadavg()[0]
    print("command: python " + shlex.join(sys.argv), flush=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, load average {load:.1f} "
          f"at start; batch {args.batch} per replica at {args.size}x{args.size}; "
          f"{args.rounds} round(s), each variant in a fresh process", flush=True)
    if args.launch:
        results = run_launch(args)
        print(f"\nmodel {args.model_list[0]}, 2 ranks, {args.epochs} epochs; steady step: "
              "median gap between step ends after the first epoch\n")
        print(markdown_launch(results))
    else:
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
