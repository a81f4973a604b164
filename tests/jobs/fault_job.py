"""A small sync BN training job in which one rank misbehaves, for the fault matrix.

Every rank trains two SyncBatchNormalization layers (`bn_a`, then `bn_b`,
8 channels) for `--steps` steps of a `tf.function`. At step `--fault-step`,
rank `--fault-rank` injects `--fault`:

* `none`: nothing (the control: the job must succeed);
* `kill`: SIGKILLs itself between the forward and the backward collectives;
* `raise`: raises a RuntimeError at the same point;
* `stall`: sleeps forever at the same point;
* `netcut`: takes its simulated host's network down at the same point
  (`ip link set sbn0 down` in its own namespace; needs `--simulate-hosts`);
* `shape`: its layers have 4 channels instead of 8 (from the first step);
* `skip`: it does not call `bn_a` in that step.

The fault point is a `tf.py_function` that the backward pass depends on (its
result is added, times zero, to the upstream gradient), so it runs after both
forward collectives and before both backward ones.

    syncbn-launch -np 2 --backend mpi -- python tests/jobs/fault_job.py --backend mpi --fault kill
"""

import argparse
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobs.common import open_world  # noqa: E402

FAULTS = ("none", "kill", "raise", "stall", "netcut", "shape", "skip")
CHANNELS = 8
BATCH = 6


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["horovod", "mpi", "tf"], required=True)
    parser.add_argument("--fault", choices=FAULTS, required=True)
    parser.add_argument("--fault-rank", type=int, default=1)
    parser.add_argument("--fault-step", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--marker", default="",
                        help="an unused token that makes the job's processes findable in /proc")
    return parser.parse_args(argv)


def inject(fault, rank, faulty):
    """The fault point inside the training step; only the faulty rank misbehaves."""
    if not faulty:
        return 0.0
    print(f"rank {rank} injects fault '{fault}' between forward and backward", flush=True)
    if fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "raise":
        raise RuntimeError(f"injected fault: rank {rank} raises mid-step")
    if fault == "stall":
        while True:
            time.sleep(3600)
    if fault == "netcut":
        # The line above reaches the launcher over this host's network (through
        # mpirun's daemon or ssh): give it a second to leave before the cut, or
        # the matrix cannot time the fault. The measured stop time then
        # includes that second, which only makes the bound harder to meet.
        time.sleep(1.0)
        subprocess.run(["ip", "link", "set", "sbn0", "down"], check=True)
        print(f"rank {rank}: sbn0 is down", flush=True)
    return 0.0


def make_step(layers, fault, rank, faulty):
    """A training step; `fault` None for the normal one.

    Every rank runs the step of the fault step with the fault point in it
    (a no-op on the other ranks), so that every rank traces the same
    functions: MultiWorkerMirroredStrategy keys its collectives by trace.
    """
    import tensorflow as tf

    bn_a, bn_b = layers

    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            h = x if fault == "skip" and faulty else bn_a(x, training=True)
            y = bn_b(h, training=True)
        if fault in ("kill", "raise", "stall", "netcut"):
            hook = tf.py_function(lambda: inject(fault, rank, faulty), [], tf.float32)
            hook.set_shape([])
            dy = dy + 0.0 * hook  # the backward collectives wait for the fault point
        return tape.gradient(y, [x, bn_a.gamma, bn_b.gamma], output_gradients=dy)[0]

    return step


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    world = open_world(args.backend)
    rank, communicator, strategy = world.process_rank, world.name, world.strategy
    import numpy as np
    import tensorflow as tf

    import syncbn

    faulty = rank == args.fault_rank and args.fault != "none"
    channels = CHANNELS // 2 if faulty and args.fault == "shape" else CHANNELS
    if faulty and args.fault == "shape":
        # tf.distribute meets the mismatch as soon as it broadcasts the weights.
        print(f"rank {rank} injects fault 'shape' when building the layers", flush=True)
    with world.scope():
        layers = [syncbn.SyncBatchNormalization(communicator=communicator, name=name)
                  for name in ("bn_a", "bn_b")]
        for layer in layers:
            layer.build((None, channels))

    def compile_step(fault):
        step = make_step(layers, fault, rank, faulty)
        if strategy is None:
            return tf.function(step)
        return tf.function(lambda x, dy: strategy.run(step, args=(x, dy)))

    normal = compile_step(None)
    faulty_step = compile_step(None if args.fault in ("none", "shape") else args.fault)
    rng = np.random.default_rng(rank)
    # Trace both steps before the first one runs, so that the time from a fault
    # to the end of the job does not include tracing.
    example = tf.zeros((BATCH, channels), tf.float32)
    for function in (normal, faulty_step):
        function.get_concrete_function(example, example)
    # A shape mismatch is there from the first step on.
    fault_step = 0 if args.fault == "shape" else args.fault_step
    for step in range(args.steps):
        if faulty and step == fault_step and args.fault == "skip":
            print(f"rank {rank} injects fault '{args.fault}' at step {step}", flush=True)
        x = tf.constant(rng.normal(size=(BATCH, channels)).astype(np.float32))
        dy = tf.constant(rng.normal(size=(BATCH, channels)).astype(np.float32))
        run = faulty_step if step == fault_step else normal
        run(x, dy)
        print(f"rank {rank} step {step} done", flush=True)
    print(f"fault_job rank {rank} finished", flush=True)


if __name__ == "__main__":
    sys.exit(main())
