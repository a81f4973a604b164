"""`python -m syncbn.check`: arguments, the run, the table, the JSON, the exit code."""

import argparse
import importlib
import json
import logging
import os
import sys

from syncbn.check import environment, exactness, timing
from syncbn.world import WORLDS, LauncherWorldError, create_world

COMMUNICATOR_NAMES = ("auto", "horovod", "tf.distribute", "mpi", "local")
DEFAULT_ROUNDS = 10
SHORT_NAMES = {"moving_mean": "moving mean", "moving_variance": "moving var"}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m syncbn.check",
        description="Check that SyncBatchNormalization is exact on this job's hardware and "
                    "measure what it costs. Run one copy per rank, under any launcher.",
        epilog="Example: syncbn-launch -np 4 -- python -m syncbn.check --json check.json")
    parser.add_argument(
        "--communicator", default="auto",
        help="what the layer sums with: auto (default: the job is set up from the launcher's "
             "environment, TF_CONFIG: tf.distribute, HOROVOD_*: Horovod (horovodrun sets "
             "them only over Gloo: over MPI pass horovod), an MPI launcher: "
             "MPI, else one process, and the layer uses communicator='auto'), horovod, "
             "tf.distribute (MultiWorkerMirroredStrategy from TF_CONFIG, else "
             "MirroredStrategy over this process's devices), mpi, local, or MODULE:ATTRIBUTE "
             "naming a communicator object (or a class or zero-argument function returning one) to "
             "check your own; the job is then set up as for auto")
    parser.add_argument("--json", metavar="PATH",
                        help="the chief also writes the results as JSON (default: off)")
    parser.add_argument(
        "--tolerance", type=float, default=exactness.DEFAULT_TOLERANCE,
        help="largest relative error that passes (default: %(default)g)")
    parser.add_argument(
        "--rounds", type=int, default=DEFAULT_ROUNDS,
        help="timing rounds; 0 skips the latency and step-cost measurements "
             "(default: %(default)s)")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.communicator not in COMMUNICATOR_NAMES and ":" not in args.communicator:
        parser.error(f"argument --communicator must be one of {', '.join(COMMUNICATOR_NAMES)} "
                     f"or MODULE:ATTRIBUTE. Received: --communicator={args.communicator}")
    if not args.tolerance > 0:
        parser.error(f"argument --tolerance must be > 0. Received: --tolerance={args.tolerance}")
    if args.rounds < 0:
        parser.error(f"argument --rounds must be >= 0. Received: --rounds={args.rounds}")
    return args


def load_communicator(spec):
    """The communicator object `MODULE:ATTRIBUTE` names (called if it is a factory).

    Raises:
        ValueError: if the module or attribute cannot be found.
        TypeError: if the object is not a communicator.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError("Argument `--communicator` must be MODULE:ATTRIBUTE for a custom "
                         f"communicator. Received: --communicator={spec!r}")
    try:
        found = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"Argument `--communicator` names a module that cannot be imported "
                         f"({error}). Received: --communicator={spec!r}") from error
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise ValueError(f"Argument `--communicator` names an attribute {attribute!r} that "
                             f"{module_name} does not have. Received: --communicator={spec!r}")
        found = getattr(found, part)
    if isinstance(found, type) or (callable(found) and not hasattr(found, "all_sum")):
        found = found()  # a communicator class or factory
    if not (hasattr(found, "all_sum") and hasattr(found, "num_replicas")):
        raise TypeError("Argument `--communicator` must name a communicator (an object with "
                        "`num_replicas` and `all_sum(tensor, name)`) or a zero-argument callable "
                        f"returning one. Received: --communicator={spec!r}, giving {found!r}")
    return found


def format_errors(errors):
    largest = max(errors, key=errors.get)
    listed = ", ".join(f"{SHORT_NAMES.get(q, q)} {e:.1e}" for q, e in errors.items())
    return f"largest {errors[largest]:.1e} ({SHORT_NAMES.get(largest, largest)}): {listed}"


def report_rows(summary):
    """The table's rows: `(what, value, tolerance, result)`."""
    env = summary["environment"]
    comm = summary["communicator"]
    rows = [
        ("versions", ", ".join(f"{k} {v}" for k, v in env["versions"].items()), "", ""),
        ("Horovod", env["horovod"], "", ""),
        ("mpi4py / MPI library", f"{env['mpi4py']} / {env['mpi_library']}", "", ""),
        ("job", f"{summary['processes']} processes, {summary['replicas']} replicas "
                f"({summary['world']})", "", ""),
    ]
    rows += [(f"ranks {ranks}", text, "", "") for ranks, text in env["hosts"]]
    if summary.get("launcher_error"):
        rows.append(("launcher", summary["launcher_error"], "", "FAIL"))
    rows += [
        ("communicator checked", f"{comm['requested']} -> kernel {comm['kernel']}, "
                                 f"{comm['replicas']} replicas", "", ""),
        ("auto picks here", comm["auto_picks"], "", ""),
        ("collective timeout", env["collective_timeout"], "", ""),
    ]
    for record in summary["exactness"]:
        counts = ",".join(str(c) for c in record["counts"])
        what = f"exact: {record['layout']}, batches {counts} vs "
        what += "Keras" if record["reference"] == "keras" else "float64"
        what += f" ({record['reference_device']})" if record["reference"] == "keras" else ""
        rows.append((what, format_errors(record["errors"]), f"{record['tolerance']:.0e}",
                     "OK" if record["ok"] else "FAIL"))
    perf = summary["performance"]
    if perf is None:
        why = "the launcher's world is broken" if summary.get("launcher_error") else "--rounds 0"
        rows.append(("performance", f"not measured ({why})", "", ""))
    else:
        latency = perf["sum_latency_us"]
        rows.append(("per-sum latency",
                     "n/a: one replica" if latency is None else
                     f"{latency:.1f} us (chains of {perf['chain']} sums of {perf['payload']}, "
                     f"median of {perf['rounds']}, rank 0)", "", ""))
        shape = "x".join(str(d) for d in perf["step_shape"])
        rows.append(("one layer's step, sync / local",
                     f"{perf['sync_local_ratio']:.2f} (sync {perf['sync_ms']:.2f} ms, Keras BN "
                     f"{perf['local_ms']:.2f} ms; {shape} channels-last per replica, forward + "
                     "backward, rank 0)", "", ""))
    passed = sum(r["ok"] for r in summary["exactness"])
    total = len(summary["exactness"])
    rows.append(("all checks", f"{passed} of {total} OK on every rank", "",
                 "OK" if summary["passed"] else "FAIL"))
    return rows


def table(rows):
    """A Markdown table, padded so that it also reads as plain text."""
    header = ("what", "value", "tolerance", "result")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(4)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    rule = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def run(args):
    """Runs the check in this process (one rank); returns the summary dict."""
    from syncbn import collectives

    spec = args.communicator
    world = create_world(spec if spec in WORLDS else None)
    communicator = spec if spec in COMMUNICATOR_NAMES else load_communicator(spec)
    launcher_error = None
    try:
        auto_picks, kernel, replicas = world.in_replica(
            lambda: environment.describe_communicator(communicator))
    except LauncherWorldError as error:
        # The job that would train local BN in silence: a failed check, not a crash.
        launcher_error = str(error)
        auto_picks, kernel, replicas = "none: " + launcher_error, "none", 1
    mpi4py_version, mpi_library = environment.mpi()
    timeout_source = ("SYNCBN_COLLECTIVE_TIMEOUT" if "SYNCBN_COLLECTIVE_TIMEOUT" in os.environ
                      else "default; SYNCBN_COLLECTIVE_TIMEOUT sets it")
    summary = {
        "processes": world.num_processes,
        "replicas": world.num_replicas,
        "world": world.name,
        "communicator": {"requested": spec, "auto_picks": auto_picks, "kernel": kernel,
                         "replicas": replicas},
        "environment": {
            "versions": environment.versions(),
            "horovod": environment.horovod(),
            "mpi4py": mpi4py_version,
            "mpi_library": mpi_library,
            "hosts": environment.hosts(world),
            "collective_timeout": f"{collectives.collective_timeout_seconds():g} s "
                                  f"({timeout_source})",
        },
        "launcher_error": launcher_error,
        "exactness": [] if launcher_error else exactness.check(world, communicator, args.tolerance),
        "performance": (timing.measure(world, communicator, args.rounds)
                        if args.rounds and not launcher_error else None),
    }
    summary["passed"] = launcher_error is None and all(
        record["ok"] for record in summary["exactness"])
    summary["is_chief"] = world.is_chief
    return summary


def main(argv=None):
    args = parse_args(argv)
    import tensorflow as tf

    # Each case traces its own layer's step; TensorFlow's retracing advice does not apply.
    tf.get_logger().setLevel(logging.ERROR)
    summary = run(args)
    if summary.pop("is_chief"):
        print(f"syncbn.check: {summary['processes']} processes, {summary['replicas']} replicas, "
              f"communicator {summary['communicator']['requested']}\n")
        print(table(report_rows(summary)), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
    # The errors are combined over processes, so every rank exits alike.
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
