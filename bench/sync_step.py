"""Training step of a small CNN on 2 ranks: sync BN against local BN, per backend.

Run it under the launcher, one backend at a time:

    python -m launch -np 2 --backend horovod -- python bench/sync_step.py
    python -m launch -np 2 --backend mpi -- python bench/sync_step.py
    python -m launch -np 2 --backend tf -- python bench/sync_step.py

and, for the launcher's other transports:

    python -m launch -np 2 --backend horovod --horovod-controller gloo -- python bench/sync_step.py
    python -m launch -np 2 --backend tf --tf-mpi no -- python bench/sync_step.py

The model: 3 conv blocks of 2 x (3x3 Conv2D, BN, ReLU) and a max-pool, so 6
BN layers (16, 16, 32, 32, 64, 64 channels), then global average pooling and
a Dense(10); 32x32x3 inputs, 16 samples per rank. The step is forward,
backward, the gradient all-reduce (average) as a real job does it on that
backend, and an SGD update; its loss is fetched with `.numpy()`.

* horovod: `hvd.grouped_allreduce(grads, op=hvd.Average)`;
* mpi: one mpi4py `Allreduce` of the flattened gradients in a
  `tf.numpy_function`;
* tf: MultiWorkerMirroredStrategy; Keras's optimizer all-reduces the
  gradients itself (replica context `all_reduce(SUM, grads)`, per-replica loss
  scaled by 1 / replicas).

Variants (same seed, same initial weights):

* `sync`: `syncbn.SyncBatchNormalization()` (communicator "auto": the
  backend's);
* `local`: `keras.layers.BatchNormalization()`, no BN sync, same gradient
  all-reduce;
* `synced-local`: syncbn's synchronized code path with a communicator that
  does not communicate (`syncbn.collectives.PretendReplicas`: it says 2
  replicas and returns its input): its local math in the same step, so `sync` minus `synced-local` is what the collectives cost,
  their latency plus each rank waiting for the slower one;
* `keras-sync` (tf only): `keras.layers.BatchNormalization(synchronized=True)`;
* `sync-hvd.allreduce` (horovod over MPI only): syncbn with its sums sent
  through `hvd.allreduce` (Horovod's queue and cycle) instead of directly
  over MPI, to show what bypassing Horovod saves;
* `sync-tf.distribute` (tf under mpirun only): syncbn with its sums sent
  through the strategy's all-reduce instead of directly over MPI;
* `sync-numpy_function` (mpi only): syncbn with the MPI communicator's
  fallback kernel (mpi4py from `tf.numpy_function`) instead of its compiled
  kernel, to show what the compiled kernel saves.

Besides the step, the gradient all-reduce alone is timed on each variant's
gradients (same mechanism as in its step), to show that sync BN's extra
collectives did not slow the gradient all-reduce down.

Variants run interleaved round-robin in the same job, every rank in the same
order; each sample starts after a barrier and averages `--repeat` steps.
Rank 0 prints medians over `--rounds` rounds and the median of per-round
ratios. HOROVOD_CYCLE_TIME / HOROVOD_FUSION_THRESHOLD are printed as in
effect (Horovod's own defaults: 1 ms and 128 MiB since Horovod 0.21;
`syncbn.init_horovod` sets a 0.1 ms cycle on Horovod's Gloo controller unless
told otherwise, and keeps Horovod's default on MPI).

`--sweep-cycle-time 0.1,1,5` is a driver mode: it runs the launcher itself
(horovod backend, `--horovod-controller` as given) `--sweep-repeats` times
per value, values interleaved, with `--horovod-cycle-time`, and prints one
table of the results. Jobs are
separate processes, so this comparison is across jobs, not within one: repeat
it (`--sweep-repeats 3`) on a shared machine.

    python bench/sync_step.py --sweep-cycle-time 0.1,1,5 --sweep-repeats 3
    python bench/sync_step.py --sweep-cycle-time 0.1,1,5 --sweep-repeats 3 --horovod-controller gloo
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

import numpy as np

from timing import time_round_robin

from syncbn.collectives import PretendReplicas
from syncbn.world import create_world

PER_RANK_BATCH = 16
NUM_CLASSES = 10
FILTERS = (16, 32, 64)
HOROVOD_DEFAULT_CYCLE_TIME_MS = 1.0
HOROVOD_DEFAULT_FUSION_THRESHOLD = 128 * 1024 * 1024
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["auto", "horovod", "mpi", "tf"], default="auto",
                        help="auto (default): from the launcher's environment (TF_CONFIG: tf, "
                             "HOROVOD_RANK or HOROVOD_CONTROLLER: horovod, OMPI_COMM_WORLD_SIZE/PMI_SIZE: mpi)")
    parser.add_argument("--rounds", type=int, default=20,
                        help="round-robin rounds (default 20)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="steps per sample, averaged (default 3)")
    parser.add_argument("--json", metavar="PATH", help="rank 0 also writes the results as JSON")
    parser.add_argument("--sweep-cycle-time", metavar="MS,MS,...",
                        help="driver mode: run the horovod job once per HOROVOD_CYCLE_TIME "
                             "value through the launcher and tabulate (default: off)")
    parser.add_argument("--horovod-controller", choices=["auto", "mpi", "gloo"], default="auto",
                        help="for --sweep-cycle-time: the launcher's --horovod-controller "
                             "(default auto: MPI when Horovod has it)")
    parser.add_argument("--sweep-repeats", type=int, default=1,
                        help="jobs per value for --sweep-cycle-time, interleaved (default 1)")
    parser.add_argument("-np", "--num-proc", type=int, default=2,
                        help="ranks for --sweep-cycle-time (default 2)")
    return parser.parse_args(argv)


# --backend names -> syncbn.world's.
WORLD_NAMES = {"horovod": "horovod", "mpi": "mpi", "tf": "tf.distribute"}


def average_gradients(world, grads):
    """The gradient all-reduce (average) as a real job does it on `world`'s backend."""
    import tensorflow as tf

    if world.name == "horovod":
        return world.hvd.grouped_allreduce(grads, op=world.hvd.Average)
    if world.name == "mpi":
        def allreduce_mean(flat):
            summed = np.empty_like(flat)
            world.comm.Allreduce(flat, summed)
            return summed / world.num_processes

        sizes = [g.shape.num_elements() for g in grads]
        # [*shape_i] for each gradient -> [sum of sizes]: one Allreduce for all.
        flat = tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)
        averaged = tf.numpy_function(allreduce_mean, [flat], tf.float32, stateful=True,
                                     name="bench_grad_allreduce")
        averaged.set_shape(flat.shape)
        return [tf.reshape(part, g.shape) for part, g in zip(tf.split(averaged, sizes), grads)]
    # What Keras's optimizer does under a strategy; the loss carries 1 / replicas.
    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)


def settings(world):
    """What decides the speed of `world`'s sums, for the report."""
    if world.name == "horovod":
        from syncbn.collectives.horovod import horovod_communicator

        cycle = os.environ.get("HOROVOD_CYCLE_TIME")
        fusion = os.environ.get("HOROVOD_FUSION_THRESHOLD")
        return {
            "Horovod controller": "mpi" if world.hvd.mpi_enabled() else "gloo",
            "sync's BN sums": horovod_communicator().kernel,
            "HOROVOD_CYCLE_TIME": cycle or f"unset (Horovod default {HOROVOD_DEFAULT_CYCLE_TIME_MS:g} ms)",
            "HOROVOD_FUSION_THRESHOLD": fusion
            or f"unset (Horovod default {HOROVOD_DEFAULT_FUSION_THRESHOLD} bytes)",
            "HOROVOD_CPU_OPERATIONS": os.environ.get("HOROVOD_CPU_OPERATIONS", "unset"),
        }
    if world.name == "mpi":
        from syncbn.collectives.mpi import mpi_communicator

        return {"sync's MPI kernel": mpi_communicator().kernel}
    return {}


def build_model(make_bn):
    import keras

    layers = keras.layers
    model_layers = [keras.Input((32, 32, 3))]
    for filters in FILTERS:
        for _ in range(2):
            model_layers += [layers.Conv2D(filters, 3, padding="same", use_bias=False),
                             make_bn(), layers.ReLU()]
        model_layers.append(layers.MaxPooling2D())
    model_layers += [layers.GlobalAveragePooling2D(), layers.Dense(NUM_CLASSES)]
    return keras.Sequential(model_layers)


def make_variant(world, make_bn):
    """(train_step, grad_allreduce_alone), both zero-argument, both fetch a result."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(1234)  # same weights on every rank and in every variant
    with world.scope():
        model = build_model(make_bn)
        optimizer = keras.optimizers.SGD(0.01)
        optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(world.process_rank)
    x = tf.constant(rng.normal(size=(PER_RANK_BATCH, 32, 32, 3)).astype(np.float32))
    y = tf.constant(rng.integers(0, NUM_CLASSES, size=(PER_RANK_BATCH,)))
    loss_scale = 1.0 / world.num_processes if world.strategy is not None else 1.0

    def gradients():
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
            scaled_loss = loss * loss_scale
        return loss, tape.gradient(scaled_loss, model.trainable_variables)

    def replica_step():
        loss, grads = gradients()
        if world.strategy is None:
            grads = average_gradients(world, grads)
        # Under a strategy, apply_gradients all-reduces (sums) the gradients itself.
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    def replica_allreduce(grads):
        return tf.add_n([tf.reduce_sum(g) for g in average_gradients(world, grads)])

    # No autograph: the step has no Python control flow to convert, and autograph's
    # rewrite of hvd.grouped_allreduce fails ("'NoneType' object has no attribute 'name'").
    if world.strategy is None:
        step_fn = tf.function(autograph=False)(replica_step)
        allreduce_fn = tf.function(autograph=False)(replica_allreduce)
        grads = tf.function(autograph=False)(gradients)()[1]

        def step():
            return step_fn().numpy()

        def allreduce():
            return allreduce_fn(grads).numpy()
    else:
        strategy = world.strategy
        step_fn = tf.function(autograph=False)(lambda: strategy.run(replica_step))
        grads_fn = tf.function(autograph=False)(lambda: strategy.run(lambda: gradients()[1]))
        # This worker's gradients as plain tensors, captured by the all-reduce function.
        grads = [tf.constant(strategy.experimental_local_results(g)[0]) for g in grads_fn()]
        allreduce_fn = tf.function(autograph=False)(
            lambda: strategy.run(lambda: replica_allreduce(grads)))

        def step():
            return strategy.experimental_local_results(step_fn())[0].numpy()

        def allreduce():
            return strategy.experimental_local_results(allreduce_fn())[0].numpy()

    return step, allreduce


class StrategyAllReduce:
    """The tf.distribute communicator with its direct MPI path off, built at call time
    (it needs the replica context)."""

    @staticmethod
    def _communicator():
        from syncbn.collectives.tf_distribute import TFDistributeCommunicator

        return TFDistributeCommunicator(direct_mpi=False)

    @property
    def num_replicas(self):
        import tensorflow as tf

        return tf.distribute.get_strategy().num_replicas_in_sync

    def all_sum(self, tensor, name):
        return self._communicator().all_sum(tensor, name)


def launch_command(world, name):
    """The launcher command line that reproduces this job's backend setup."""
    options = f"--backend {name}"
    if name == "horovod":
        options += f" --horovod-controller {'mpi' if world.hvd.mpi_enabled() else 'gloo'}"
    if name == "tf":
        options += f" --tf-mpi {'yes' if os.environ.get('OMPI_COMM_WORLD_SIZE') else 'no'}"
    return f"python -m launch -np {world.num_processes} {options} -- python " + shlex.join(sys.argv)


def variants_for(world):
    import keras

    import syncbn

    variants = {
        "sync": lambda: syncbn.SyncBatchNormalization(),
        "local": lambda: keras.layers.BatchNormalization(),
    }
    variants["synced-local"] = lambda: syncbn.SyncBatchNormalization(
        communicator=PretendReplicas())
    if world.name == "tf.distribute":
        variants["keras-sync"] = lambda: keras.layers.BatchNormalization(synchronized=True)
    if world.name == "horovod" and world.hvd.mpi_enabled():
        from syncbn.collectives.horovod import HorovodCommunicator

        # On MPI syncbn's BN sums bypass Horovod; this one sends them through it.
        variants["sync-hvd.allreduce"] = lambda: syncbn.SyncBatchNormalization(
            communicator=HorovodCommunicator(world.hvd))
    if world.name == "tf.distribute" and os.environ.get("OMPI_COMM_WORLD_SIZE"):
        # Under mpirun syncbn's BN sums bypass the strategy; this one uses its all-reduce.
        variants["sync-tf.distribute"] = lambda: syncbn.SyncBatchNormalization(
            communicator=StrategyAllReduce())
    if world.name == "mpi":
        from syncbn.collectives.mpi import MPICommunicator

        # The same MPI protocol with mpi4py called from tf.numpy_function.
        variants["sync-numpy_function"] = lambda: syncbn.SyncBatchNormalization(
            communicator=MPICommunicator(world.comm))
    return variants


def summarize(samples, variants):
    ms = {f"{v}/{k}": np.array(s) * 1e3 for (v, k), s in samples.items()}
    result = {"median_ms": {k: float(np.median(v)) for k, v in ms.items()},
              "iqr_ms": {k: float(np.subtract(*np.percentile(v, [75, 25]))) for k, v in ms.items()},
              "ratios": {}}
    for variant in variants:
        if variant == "local":
            continue
        for kind in ("step", "grad-allreduce"):
            ratio = np.median(ms[f"{variant}/{kind}"] / ms[f"local/{kind}"])
            result["ratios"][f"{variant}/local {kind}"] = float(ratio)
    return result


def markdown(result, variants):
    med, iqr, ratios = result["median_ms"], result["iqr_ms"], result["ratios"]
    lines = ["| variant | step ms | grad all-reduce alone ms | step / local step "
             "| all-reduce / local all-reduce |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for variant in variants:
        step, allreduce = f"{variant}/step", f"{variant}/grad-allreduce"
        if variant == "local":
            step_ratio = allreduce_ratio = "1"
        else:
            step_ratio = f"{ratios[f'{variant}/local step']:.2f}"
            allreduce_ratio = f"{ratios[f'{variant}/local grad-allreduce']:.2f}"
        lines.append(f"| {variant} | {med[step]:.2f} ±{iqr[step] / 2:.2f} "
                     f"| {med[allreduce]:.2f} ±{iqr[allreduce] / 2:.2f} "
                     f"| {step_ratio} | {allreduce_ratio} |")
    return "\n".join(lines)


def run_job(args):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # MultiWorkerMirroredStrategy must come before other TF work.
    world = create_world(None if args.backend == "auto" else WORLD_NAMES[args.backend])
    name = {v: k for k, v in WORLD_NAMES.items()}.get(world.name)
    if name is None:
        raise RuntimeError(
            "bench/sync_step.py runs under the launcher, e.g. `python -m launch -np 2 "
            "--backend horovod -- python bench/sync_step.py`; no TF_CONFIG, Horovod or "
            "MPI environment was found. Pass --backend to override.")
    import tensorflow as tf

    variants = variants_for(world)
    functions = {}
    for variant, make_bn in variants.items():
        step, allreduce = make_variant(world, make_bn)
        functions[(variant, "step")] = step
        functions[(variant, "grad-allreduce")] = allreduce
    samples = time_round_robin(functions, args.rounds, args.repeat, warmup=3,
                               before_each=world.barrier)
    result = summarize(samples, variants)
    if not world.is_chief:
        return 0
    command = launch_command(world, name)
    print("command: " + command)
    print(f"backend: {name}, {world.num_processes} ranks, {PER_RANK_BATCH} samples per rank, "
          f"6 BN layers, {os.cpu_count()} CPU cores, TensorFlow {tf.__version__}; "
          f"{args.rounds} rounds x {args.repeat} steps, medians (±half IQR) on rank 0, "
          "ratios are medians of per-round ratios")
    for key, value in settings(world).items():
        print(f"{key}: {value}")
    print()
    print(markdown(result, variants))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"command": command, "backend": name, "ranks": world.num_processes,
                       "settings": settings(world), "rounds": args.rounds,
                       "repeat": args.repeat, **result}, handle, indent=2)
    return 0


def sweep_cycle_time(args):
    """Driver: horovod jobs per HOROVOD_CYCLE_TIME value, interleaved, in one table."""
    try:
        values = [float(v) for v in args.sweep_cycle_time.split(",")]
    except ValueError:
        raise ValueError("Argument `--sweep-cycle-time` must be comma-separated milliseconds. "
                         f"Received: --sweep-cycle-time={args.sweep_cycle_time!r}") from None
    print("command: python " + shlex.join(sys.argv), flush=True)
    runs = {value: [] for value in values}
    with tempfile.TemporaryDirectory() as scratch:
        # Jobs for different values alternate, so a burst of load hits all values alike.
        for repeat in range(args.sweep_repeats):
            for value in values:
                path = os.path.join(scratch, f"cycle_{value:g}_{repeat}.json")
                command = [sys.executable, "-m", "launch", "-np", str(args.num_proc),
                           "--backend", "horovod", "--horovod-controller", args.horovod_controller,
                           "--horovod-cycle-time", f"{value:g}", "--",
                           sys.executable, os.path.abspath(__file__),
                           "--rounds", str(args.rounds), "--repeat", str(args.repeat),
                           "--json", path]
                print(f"running: {shlex.join(command)}", file=sys.stderr, flush=True)
                subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
                with open(path) as handle:
                    runs[value].append(json.load(handle))
    controllers = sorted({r["settings"].get("Horovod controller", "?") for rs in runs.values()
                          for r in rs})
    print(f"Horovod controller: {', '.join(controllers)}; {args.sweep_repeats} job(s) per value, "
          "interleaved; each cell is the median over the jobs of the job's own medians "
          "(ratios: of the job's median per-round ratio)")
    print()
    print("| HOROVOD_CYCLE_TIME ms | sync step ms | local step ms | sync/local step "
          "| sync/local per job | sync grad all-reduce ms | local grad all-reduce ms |")
    print("| ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for value, results in runs.items():
        def median(key, table="median_ms"):
            return float(np.median([r[table][key] for r in results]))

        per_job = ", ".join(f"{r['ratios']['sync/local step']:.2f}" for r in results)
        print(f"| {value:g} | {median('sync/step'):.2f} | {median('local/step'):.2f} "
              f"| {median('sync/local step', 'ratios'):.2f} | {per_job} "
              f"| {median('sync/grad-allreduce'):.2f} | {median('local/grad-allreduce'):.2f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"command": sys.argv,
                       "runs": [{"cycle_time_ms": v, **r} for v, rs in runs.items() for r in rs]},
                      handle, indent=2)
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.sweep_cycle_time:
        return sweep_cycle_time(args)
    return run_job(args)


if __name__ == "__main__":
    sys.exit(main())
