"""Many multi-process checks in one launch: every rank pays TensorFlow's start-up once.

Run one copy per rank under any launcher. The job sets up its world once
(`syncbn.world`), runs the named checks one after the other in it, and writes
each check's records to `OUT/<check>.rank<R>.json`:

    {"records": [{"line": ..., "ok": ..., ...}, ...], "error": null or a traceback,
     "seconds": how long the check took on this rank}

tests/helpers.py's `WORLD_LAUNCHES` says which checks each launch can run;
the multi-process test modules assert on the records, through the
`world_launch` fixture (tests/conftest.py), which launches each world once per
session with the checks its selected tests name (`world_checks` marker). A
check that raises is recorded with its traceback and the job goes on with the
next; it exits 1 if any record failed or any check raised.

    horovodrun -np 4 --gloo python tests/jobs/world_checks.py --world auto \\
        --checks exactness,groups --out /tmp/checks

To add a check: write a function `(world, out_dir) -> list of records` (each
record a JSON-able dict with at least `line` and `ok`), add it to `CHECKS`,
add its name to the launches of `WORLD_LAUNCHES` that should run it, and write
the test that asserts on its records:

    @pytest.mark.world_checks("mycheck")
    @pytest.mark.parametrize("name", worlds_with("mycheck"))
    def test_mycheck(world_launch, name):
        records = world_launch(name).records("mycheck")  # every rank's, rank after rank
        assert all(r["ok"] for r in records), [r["line"] for r in records]
"""

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobs import convert_train_step, exactness, moving_stats  # noqa: E402
from jobs.common import WORLDS, open_world, say  # noqa: E402
from jobs.exactness import Case  # noqa: E402
from launch_jobs import collective_check  # noqa: E402


def _per_rank(values, world):
    """`values` cycled to one entry per rank."""
    return tuple(values[r % len(values)] for r in range(world.num_processes))


# The exactness cases: uneven batches with an empty rank on every layout; data
# far from zero (float64 reference); the fused kernels GPUs run; layers with
# communicator="auto"; consecutive groups of 2.
def check_exactness(world, out):
    return exactness.run_case(world, Case(), os.path.join(out, "exactness"))


def check_large_offset(world, out):
    return [record for name, offset in (("offset_1e4", 1e4), ("offset_1e5", 1e5))
            for record in exactness.run_case(world, Case(
                name=name, layouts=("2d",),
                counts=_per_rank((300, 0, 500, 200), world), offset=offset, tolerance=1e-3))]


def check_fused(world, out):
    return exactness.run_case(world, Case(name="fused", layouts=("2d", "nhwc"), offset=1e4,
                                          tolerance=1e-3, kernels="fused"))


def check_auto(world, out):
    return exactness.run_case(world, Case(name="auto", layouts=("2d",),
                                          counts=_per_rank((3, 5, 2, 6), world),
                                          communicator="auto"))


GROUP_SIZE = 2


def check_groups(world, out):
    return exactness.run_case(world, Case(name="groups", layouts=("2d", "nhwc"),
                                          counts=_per_rank((3, 2, 0, 5), world),
                                          group_size=GROUP_SIZE))


def check_moving(world, out):
    return moving_stats.run_checks(world, out=os.path.join(out, "moving"))


def check_convert(world, out):
    return [convert_train_step.run_check(world, counts=_per_rank((5, 2, 3, 4), world))]


def check_collective(world, out):
    return [collective_check.run_check(world)]


CHECKS = {
    "collective": check_collective,
    "exactness": check_exactness,
    "large_offset": check_large_offset,
    "fused": check_fused,
    "auto": check_auto,
    "groups": check_groups,
    "moving": check_moving,
    "convert": check_convert,
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=[*WORLDS, "auto"], default="auto",
                        help="the world to set up (default auto: from the launcher's environment)")
    parser.add_argument("--checks", required=True, help=f"comma-separated, from {sorted(CHECKS)}")
    parser.add_argument("--out", required=True, help="directory for <check>.rank<R>.json")
    args = parser.parse_args(argv)
    args.checks = args.checks.split(",")
    unknown = sorted(set(args.checks) - set(CHECKS))
    if unknown:
        parser.error(f"Argument `--checks` must name checks of {sorted(CHECKS)}. "
                     f"Received: {unknown}")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Horovod declares its process sets once, at init: those of the groups check.
    world = open_world(args.world, GROUP_SIZE if "groups" in args.checks else None)
    os.makedirs(args.out, exist_ok=True)
    failed = False
    for name in args.checks:
        records, error, started = [], None, time.monotonic()
        try:
            records = CHECKS[name](world, args.out)
        except Exception:  # recorded for the tests, which name the check that raised
            error = traceback.format_exc()
            say(f"world_checks rank={world.process_rank} check={name} raised:\n{error}")
        failed |= error is not None or not all(record["ok"] for record in records)
        path = os.path.join(args.out, f"{name}.rank{world.process_rank}.json")
        with open(path, "w") as stream:
            json.dump({"records": records, "error": error,
                       "seconds": time.monotonic() - started}, stream, indent=1)
    world.barrier()  # nobody shuts its backend down while another rank still sums
    say(f"world_checks rank={world.process_rank}/{world.num_processes} "
        f"{'FAIL' if failed else 'ok'} checks={','.join(args.checks)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
