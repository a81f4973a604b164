"""Long runs: 2,000 training steps on 2 ranks per backend, through syncbn-launch.

Runs tests/jobs/long_run.py (a two-layer model with two SyncBatchNormalization
layers, `training` passed as a tensor, epochs ending in a smaller batch) on 2
ranks for each backend and checks, on every rank:

- memory: resident set size at the end at most 5% above the one after warm-up
  (the first 20% of the steps);
- retracing: exactly one trace of the step per input signature (two: the full
  batch and the last batch of each epoch; `training=False` steps, a tensor too,
  add none);
- agreement: the moving statistics (and weights) bit-identical across ranks
  (SHA-256 of their bytes).

It prints one row per backend and exits 1 if any check fails.

    python bench/long_run.py                      # 2,000 steps, mpi and horovod (Gloo)
    python bench/long_run.py --steps 300 --backends mpi

tests/test_long_run.py runs a shorter version in CI.
"""

import argparse
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(REPO, "tests", "jobs", "long_run.py")
MAX_RSS_GROWTH = 0.05
# Launcher arguments and the job's --backend for each backend name.
BACKENDS = {
    "mpi": (["--backend", "mpi"], "mpi"),
    "horovod": (["--backend", "horovod"], "horovod"),
    "horovod-gloo": (["--backend", "horovod", "--horovod-controller", "gloo"], "horovod"),
}
_LINE = re.compile(r"long_run rank=(\d+)/(\d+) (.*)")


def run_job(backend, steps, num_proc=2, timeout=None, extra_job_args=()):
    """Runs the job through the launcher; returns `(results, seconds, output)`.

    `results` has one dict per rank (the `key=value` fields of its line, numbers
    converted), sorted by rank.
    """
    launcher_args, job_backend = BACKENDS[backend]
    command = [sys.executable, "-m", "launch", "-np", str(num_proc), *launcher_args,
               "--", sys.executable, JOB, "--backend", job_backend, "--steps", str(steps),
               *extra_job_args]
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"{backend}: launcher exited with {result.returncode}:\n{output[-4000:]}")
    results = []
    for match in _LINE.finditer(result.stdout):
        fields = dict(item.split("=", 1) for item in match.group(3).split())
        for key in ("steps", "traces", "signatures", "tracing_count"):
            fields[key] = int(fields[key])
        for key in ("rss_warm_mb", "rss_end_mb", "rss_growth"):
            fields[key] = float(fields[key])
        fields["rank"] = int(match.group(1))
        results.append(fields)
    if sorted(r["rank"] for r in results) != list(range(num_proc)):
        raise RuntimeError(f"{backend}: expected one result line per rank:\n{output[-4000:]}")
    return sorted(results, key=lambda r: r["rank"]), seconds, output


def failures(results, max_rss_growth=MAX_RSS_GROWTH):
    """The checks that fail for one job's per-rank results (empty if all pass)."""
    problems = []
    for r in results:
        if not r["traces"] == r["tracing_count"] == r["signatures"]:
            problems.append(f"rank {r['rank']}: {r['traces']} traces (tf.function counts "
                            f"{r['tracing_count']}) for {r['signatures']} input signatures")
        if not r["rss_growth"] < max_rss_growth:
            problems.append(f"rank {r['rank']}: resident memory grew {100 * r['rss_growth']:.1f}% "
                            f"after warm-up ({r['rss_warm_mb']:.0f} -> {r['rss_end_mb']:.0f} MiB)")
    for key in ("moving_sha256", "weights_sha256"):
        if len({r[key] for r in results}) != 1:
            problems.append(f"{key} differs across ranks: {[r[key] for r in results]}")
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--backends", default="mpi,horovod-gloo",
                        help="comma-separated, from: mpi, horovod (over MPI), horovod-gloo")
    args = parser.parse_args(argv)
    print(f"# {' '.join([os.path.relpath(sys.argv[0], REPO), *(argv or sys.argv[1:])])}")
    print("| backend | steps | seconds | traces / signatures (per rank) | RSS after warm-up "
          "-> end, MiB (per rank) | growth | moving statistics SHA-256 | checks |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    failed = False
    for backend in args.backends.split(","):
        if backend not in BACKENDS:
            parser.error(f"Argument `--backends` takes mpi, horovod, horovod-gloo. "
                         f"Received: {backend!r}")
        results, seconds, _ = run_job(backend, args.steps)
        problems = failures(results)
        failed |= bool(problems)
        traces = ", ".join("{traces}/{signatures}".format(**r) for r in results)
        memory = ", ".join("{rss_warm_mb:.0f} -> {rss_end_mb:.0f}".format(**r) for r in results)
        growth = ", ".join("{:+.2f}%".format(100 * r["rss_growth"]) for r in results)
        digests = " = ".join(r["moving_sha256"] for r in results)
        print(f"| {backend} | {args.steps} | {seconds:.0f} | {traces} | {memory} | {growth} | "
              f"{digests} | {'; '.join(problems) or 'ok'} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
