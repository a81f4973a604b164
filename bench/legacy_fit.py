"""Legacy tf.keras under horovodrun: syncbn against Horovod's SyncBatchNormalization and tf_keras BN.

A 6-BN CNN (bench/model_step.py's `small_cnn`, built with tf_keras) trained
by `model.fit` on N ranks through `horovodrun` with `TF_USE_LEGACY_KERAS=1`,
the way legacy Horovod scripts train: `hvd.init()`,
`hvd.DistributedOptimizer(SGD)`, `BroadcastGlobalVariablesCallback` and
`MetricAverageCallback`. One job per variant, each in fresh processes,
variants rotated per round:

* `local`: tf_keras's BatchNormalization (each rank's own statistics);
* `syncbn`: `syncbn.convert(model)`, the tf_keras SyncBatchNormalization;
* `horovod`: every BatchNormalization replaced by
  `horovod.tensorflow.SyncBatchNormalization` with the same config (and name);
* `synced` (with `--variants`): `syncbn.convert(model,
  communicator=PretendReplicas())`, syncbn's layers with no collective, so
  syncbn - synced is what its collectives cost and synced - local its math.

The data, the sharding and the timing are bench/model_fit_job.py's: two
epochs of `--steps` steps, `--batch` samples per rank; "first step" is rank
0's first `model.fit` step (tracing included), "steady step" its median step
over the second epoch. Ratios are per round, medians over rounds.

    python bench/legacy_fit.py                     # 2 ranks, horovodrun --gloo, 3 rounds
    python bench/legacy_fit.py --controller mpi    # horovodrun over MPI
    python bench/legacy_fit.py --cycle-time 0.1 --variants local,syncbn,horovod,synced
    python bench/legacy_fit.py --quick             # smoke test: 1 round, 2 steps
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
import model_fit_job  # noqa: E402
import model_step  # noqa: E402

VARIANTS = ["local", "syncbn", "horovod", "synced"]
DEFAULT_VARIANTS = "local,syncbn,horovod"
COLUMNS = [("first_step_s", "first step s", "first-step ratio", "{:.2f}"),
           ("steady_ms", "steady step ms", "steady ratio", "{:.1f}")]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--np", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--controller", choices=["gloo", "mpi"], default="gloo",
                        help="horovodrun's controller: --gloo, or MPI (default gloo)")
    parser.add_argument("--batch", type=int, default=8, help="samples per rank and step (default 8)")
    parser.add_argument("--size", type=int, default=32, help="image height and width (default 32)")
    parser.add_argument("--steps", type=int, default=20, help="steps per epoch (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="jobs per variant (default 3)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated, from {VARIANTS}, the first the base of the "
                             f"ratios (default {DEFAULT_VARIANTS})")
    parser.add_argument("--cycle-time", type=float, default=None, metavar="MS",
                        help="HOROVOD_CYCLE_TIME for every job (default: Horovod's own, 1 ms)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per job (default 900)")
    parser.add_argument("--quick", action="store_true", help="smoke test: --rounds 1 --steps 2")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one rank's job
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 1, 2
    args.variant_list = [v.strip() for v in args.variants.split(",")]
    if any(v not in VARIANTS for v in args.variant_list) or not {"syncbn", "horovod"} <= set(
            args.variant_list) or len(set(args.variant_list)) != len(args.variant_list):
        raise ValueError(f"Argument `--variants` must name syncbn, horovod and others from "
                         f"{VARIANTS}, once each. Received: --variants={args.variants!r}")
    for name in ("np", "batch", "size", "steps", "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"Argument `--{name}` must be >= 1. Received: --{name}={getattr(args, name)}")
    return args


# ---------------------------------------------------------------- one rank of one job


def horovod_sync_bn(model, tf, hvd_tf):
    """A copy of `model` whose BatchNormalization layers are Horovod's SyncBatchNormalization."""
    def clone(layer):
        if type(layer) is tf.keras.layers.BatchNormalization:
            # Named from the original: Horovod's layer names every instance alike otherwise.
            return hvd_tf.SyncBatchNormalization(**layer.get_config())
        return layer.__class__.from_config(layer.get_config())

    copy = tf.keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def run_job(args):
    if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        raise RuntimeError("Run with TF_USE_LEGACY_KERAS=1 (the parent sets it).")
    import horovod.tensorflow as hvd_tf
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    import syncbn

    hvd.init()
    rank, ranks = hvd.rank(), hvd.size()
    x, y = model_fit_job.shard(*model_fit_job.synthetic_dataset(ranks, args.batch, args.steps,
                                                                args.size), rank, ranks)
    model = model_step.build_model(model_step.SMALL_MODEL, args.size, keras=tf.keras)
    if args.variant == "syncbn":
        model = syncbn.convert(model)
    elif args.variant == "synced":
        from syncbn.collectives import PretendReplicas

        model = syncbn.convert(model, communicator=PretendReplicas())
    elif args.variant == "horovod":
        model = horovod_sync_bn(model, tf, hvd_tf)
    model.compile(optimizer=hvd.DistributedOptimizer(tf.keras.optimizers.SGD(0.01)),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy())
    timer = model_fit_job.step_timer_class(tf.keras)()
    start = time.perf_counter()
    timer.start()
    model.fit(x, y, batch_size=args.batch, epochs=model_fit_job.EPOCHS, shuffle=False, verbose=0,
              callbacks=[timer, hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                         hvd.callbacks.MetricAverageCallback()])
    bn_classes = {type(layer).__module__ + "." + type(layer).__name__ for layer in model.layers
                  if "BatchNormalization" in type(layer).__name__}
    result = {"variant": args.variant, "rank": rank, "ranks": ranks, "batch": args.batch,
              "size": args.size, "steps": args.steps, "job_s": time.perf_counter() - start,
              "bn_layers": sum("BatchNormalization" in type(layer).__name__ for layer in model.layers),
              "bn_classes": sorted(bn_classes), **timer.result()}
    sys.stdout.write(model_step.RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


# ---------------------------------------------------------------- the parent


def job_command(args, variant):
    controller = ["--gloo"] if args.controller == "gloo" else []
    return ["horovodrun", "-np", str(args.np), *controller, sys.executable, os.path.abspath(__file__),
            "--variant", variant, "--batch", str(args.batch), "--size", str(args.size),
            "--steps", str(args.steps)]


def versions():
    import importlib.metadata as metadata

    return ", ".join(f"{name} {metadata.version(name)}"
                     for name in ("tensorflow-cpu", "tf-keras", "horovod"))


def main(argv=None):
    args = parse_args(argv)
    if args.variant:
        return run_job(args)
    os.environ["TF_USE_LEGACY_KERAS"] = "1"  # for every job (model_step.child_env copies it)
    if args.cycle_time is not None:
        os.environ["HOROVOD_CYCLE_TIME"] = str(args.cycle_time)
    print("command: python " + shlex.join(sys.argv), flush=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.1f} at start; {versions()}; {time.strftime('%Y-%m-%d')}", flush=True)
    variants = args.variant_list
    results = {"legacy small_cnn": {variant: [] for variant in variants}}
    runs = results["legacy small_cnn"]
    for round_index in range(args.rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            spec = {"variant": variant}
            result = model_step.run_in_fresh_process(spec, job_command(args, variant),
                                                      results=args.np, timeout=args.timeout)
            runs[variant].append(result)
            print(f"done: round {round_index + 1} {variant} ({', '.join(result['bn_classes'])}): "
                  f"first step {result['first_step_s']:.2f} s, steady {result['steady_ms']:.1f} ms",
                  file=sys.stderr, flush=True)
    cycle = "Horovod's default cycle" if args.cycle_time is None else f"HOROVOD_CYCLE_TIME={args.cycle_time:g}"
    print(f"\n{args.np} ranks, horovodrun {'--gloo' if args.controller == 'gloo' else 'over MPI'}, {cycle}, "
          f"model.fit, {args.batch} samples per rank at {args.size}x{args.size}, 2 epochs of "
          f"{args.steps} steps; rank 0; medians over {args.rounds} round(s)\n")
    print(model_step.markdown_side_by_side(results, variants, COLUMNS, traced_ops=False,
                                           row_title="model (BN layers)"))
    for key, _, title, _ in COLUMNS:
        ratio = model_step.median_ratio(runs, key, "syncbn", "horovod")
        print(f"\n{title} syncbn/horovod: {ratio:.2f}", end="")
    print()
    model_step.finish(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
