"""Ranks that sleep; optionally one of them fails after a delay. No collectives.

Usage: python crash_or_hang.py MARKER [--fail-rank R --fail-code C --fail-after S] [--sleep S]

MARKER is an unused token that only makes these processes findable in /proc.
"""

import argparse
import os
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("marker")
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--fail-code", type=int, default=3)
    parser.add_argument("--fail-after", type=float, default=1.0)
    parser.add_argument("--sleep", type=float, default=600.0)
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    print(f"rank {rank} pid {os.getpid()} started", flush=True)
    if rank == args.fail_rank:
        time.sleep(args.fail_after)
        print(f"rank {rank} fails with {args.fail_code}", flush=True)
        os._exit(args.fail_code)  # not sys.exit: no interpreter or MPI teardown to wait for
    time.sleep(args.sleep)


if __name__ == "__main__":
    main()
