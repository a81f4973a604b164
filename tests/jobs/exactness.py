"""Cross-process exactness check for SyncBatchNormalization.

Run one copy per rank (horovodrun, mpirun, syncbn-launch, or processes with a
TF_CONFIG each). Every rank builds the same global batches from a seed, takes
its own slice (`--counts`, one entry per rank, zeros allowed), and runs
several training steps of a SyncBatchNormalization layer. It then runs one
`tf.keras.layers.BatchNormalization` on the whole global batch itself and
compares, for its own slice: outputs, input gradients, its share of the
gamma/beta gradients (their sum over ranks is the global gradient) and the
moving statistics after every step. Under `TF_USE_LEGACY_KERAS=1` both
layers are tf_keras's (`syncbn.SyncBatchNormalization` follows `tf.keras`).
With `--offset`, the data has that mean and std 1, and the reference is
float64 NumPy instead (Keras's float32 layer cancels there).

It prints one line per layout with the largest relative errors and exits 1
if any exceeds `--tolerance`. With `--out DIR` it also saves its results as
`DIR/rank<R>.<layout>.npz` for a test to combine across ranks.

    horovodrun -np 3 --gloo python tests/jobs/exactness.py --backend horovod --counts 4,0,7

`run_case` runs one `Case` in a world that is already set up
(`syncbn.world.create_world`); tests/jobs/world_checks.py runs several in one
launch.
"""

import argparse
import contextlib
import dataclasses
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobs.common import WORLDS, open_world, say  # noqa: E402
from syncbn.check.reference import relative_error  # noqa: E402

LAYOUTS = {"2d": ((6,), -1), "nhwc": ((3, 3, 5), -1), "ncw": ((4, 5), 1)}
MOMENTUM = 0.7
EPSILON = 1e-3
NAMES = ["y", "dx", "dgamma", "dbeta", "moving_mean", "moving_variance"]


@dataclasses.dataclass(frozen=True)
class Case:
    """One exactness run: layouts, per-rank batch sizes and how the layer is set up.

    Attributes:
        name: names the case in the output lines and its `out` directory.
        layouts: keys of `LAYOUTS`.
        counts: rows per rank, zeros allowed; None: 4, 0, 7 cycled.
        steps: training steps.
        offset: the data's mean (std 1); 0: mean 2, std 3, against Keras's
            layer, else against float64 NumPy.
        group_size: the layer's `group_size`.
        tolerance: the largest relative error that passes.
        kernels: `SYNCBN_KERNELS` while the step is traced; None leaves it.
        communicator: the layer's `communicator`; None: the world's own.
    """

    name: str = "exactness"
    layouts: tuple = ("2d", "nhwc", "ncw")
    counts: tuple = None
    steps: int = 3
    offset: float = 0.0
    group_size: int = None
    tolerance: float = 2e-4
    kernels: str = None
    communicator: str = None

    def counts_for(self, world_size):
        counts = self.counts or tuple((4, 0, 7)[i % 3] for i in range(world_size))
        if len(counts) != world_size:
            raise ValueError(f"Argument `counts` needs one entry per rank ({world_size}). "
                             f"Received: counts={counts}")
        return list(counts)


def global_batches(layout, counts, steps, offset, seed=1234):
    """The same `(x, dy)` global batches on every rank and in the tests."""
    feature_shape, _ = LAYOUTS[layout]
    rng = np.random.default_rng([seed, sorted(LAYOUTS).index(layout)])
    shape = (sum(counts),) + feature_shape
    if offset:
        make_x = lambda: (offset + rng.normal(0.0, 1.0, shape)).astype(np.float32)  # noqa: E731
    else:
        make_x = lambda: rng.normal(2.0, 3.0, shape).astype(np.float32)  # noqa: E731
    return [(make_x(), rng.normal(size=shape).astype(np.float32)) for _ in range(steps)]


def initial_weights(layout):
    feature_shape, axis = LAYOUTS[layout]
    channels = feature_shape[axis if axis < 0 else axis - 1]
    rng = np.random.default_rng(99)
    return [
        rng.normal(1.0, 0.3, channels).astype(np.float32),  # gamma
        rng.normal(0.0, 0.3, channels).astype(np.float32),  # beta
        np.zeros(channels, np.float32),  # moving_mean
        np.ones(channels, np.float32),  # moving_variance
    ]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=[*WORLDS, "auto"], default="auto",
                        help="how ranks are set up; 'auto': from the launcher's environment "
                             "(syncbn.world), with layers of communicator='auto' (default)")
    parser.add_argument("--counts", default=None,
                        help="per-rank batch sizes, e.g. 4,0,7 (default: 4,0,7,... cycled)")
    parser.add_argument("--layouts", default="2d,nhwc,ncw")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--offset", type=float, default=0.0)
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--tolerance", type=float, default=2e-4)
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def layer_gradients(layer, x, dy):
    """`y` and the gradients of `sum(y * dy)` w.r.t. `x`, gamma and beta, in training mode."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * dy)
    dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma, layer.beta])
    return y, dx, dgamma, dbeta


def run_synced(layer, batches, lo, hi, strategy):
    import functools

    import tensorflow as tf

    step = functools.partial(layer_gradients, layer)

    if strategy is not None:
        compiled = tf.function(lambda x, dy: strategy.run(step, args=(x, dy)))
    else:
        compiled = tf.function(step)
    results = []
    for x, dy in batches:
        outputs = compiled(tf.constant(x[lo:hi]), tf.constant(dy[lo:hi]))
        if strategy is not None:
            outputs = [strategy.experimental_local_results(o)[0] for o in outputs]
        results.append([o.numpy() for o in outputs]
                       + [layer.moving_mean.numpy().copy(), layer.moving_variance.numpy().copy()])
    return results


def run_reference(layout, batches, lo, hi):
    """tf.keras's BatchNormalization on the global batch, restricted to this rank's rows."""
    import tensorflow as tf

    feature_shape, axis = LAYOUTS[layout]
    layer = tf.keras.layers.BatchNormalization(axis=axis, momentum=MOMENTUM, epsilon=EPSILON)
    layer.build((None,) + feature_shape)
    layer.set_weights(initial_weights(layout))
    gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
    channel_shape = [1] * (len(feature_shape) + 1)
    channel_shape[axis] = -1
    reduce_axes = tuple(i for i in range(len(channel_shape)) if i != axis % len(channel_shape))
    results = []
    for x, dy in batches:
        y, dx, _, _ = layer_gradients(layer, tf.constant(x), dy)
        y, dx = y.numpy(), dx.numpy()
        # This rank's share of dgamma / dbeta: sum over its rows of dy * x_hat / dy.
        x_hat = (y[lo:hi] - beta.reshape(channel_shape)) / gamma.reshape(channel_shape)
        results.append([
            y[lo:hi], dx[lo:hi],
            (dy[lo:hi] * x_hat).sum(axis=reduce_axes), dy[lo:hi].sum(axis=reduce_axes),
            layer.moving_mean.numpy().copy(), layer.moving_variance.numpy().copy(),
        ])
    return results


def run_float64_reference(layout, batches, lo, hi):
    """The same quantities from the float64 NumPy reference (tests/reference.py).

    Used for data far from zero, where Keras's own float32 BatchNormalization
    is not accurate enough to be the reference.
    """
    import reference

    _, axis = LAYOUTS[layout]
    gamma, beta, moving_mean, moving_variance = [w.astype(np.float64) for w in initial_weights(layout)]
    results = []
    for x, dy in batches:
        want = reference.batch_norm(x, gamma, beta, dy, axis, EPSILON)
        reduce_axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
        x_hat = (want["y"][lo:hi] - np.reshape(beta, _channel_shape(x.ndim, axis))) / np.reshape(
            gamma, _channel_shape(x.ndim, axis))
        moving_mean = reference.moving_average(moving_mean, want["mean"], MOMENTUM)
        moving_variance = reference.moving_average(moving_variance, want["variance"], MOMENTUM)
        results.append([
            want["y"][lo:hi], want["dx"][lo:hi],
            (dy[lo:hi] * x_hat).sum(axis=reduce_axes), dy[lo:hi].sum(axis=reduce_axes),
            moving_mean, moving_variance,
        ])
    return results


def _channel_shape(ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return shape


@contextlib.contextmanager
def kernels_set(kernels):
    """`SYNCBN_KERNELS=kernels` while the block runs (None: as it is)."""
    if kernels is None:
        yield
        return
    before = os.environ.get("SYNCBN_KERNELS")
    os.environ["SYNCBN_KERNELS"] = kernels
    try:
        yield
    finally:
        if before is None:
            del os.environ["SYNCBN_KERNELS"]
        else:
            os.environ["SYNCBN_KERNELS"] = before


def run_case(world, case, out=None):
    """Runs `case` on this rank of `world`; returns one record per layout.

    Each record holds the line printed for it (`exactness rank=R/W case=...
    layout=... ok|FAIL ...`), the largest relative error of each quantity
    and `ok`. With `out`, this rank's results are saved as
    `out/rank<R>.<layout>.npz` (`<quantity>_<step>` arrays).
    """
    import tensorflow as tf

    import syncbn
    from syncbn import collectives, ops

    rank, world_size = world.process_rank, world.num_processes
    communicator = case.communicator or world.name  # a World's name is a communicator's
    # Every communicator but local reports what sums (e.g. compiled, mpi-direct).
    with world.scope():
        kernel = world.in_replica(lambda: collectives.resolve(communicator, case.group_size).kernel)
    counts = case.counts_for(world_size)
    group = case.group_size or world_size
    group_start = rank // group * group
    # Each rank's reference is BN over the concatenation of its group's batches.
    group_counts = counts[group_start:group_start + group]
    lo = sum(group_counts[: rank - group_start])
    hi = lo + counts[rank]
    records = []
    with kernels_set(case.kernels):
        # The channels-last kernels this rank's layers run (syncbn.ops.kernels_for).
        kernels = ops.kernels_for(tf.zeros([1]))
        for layout in case.layouts:
            feature_shape, axis = LAYOUTS[layout]
            batches = global_batches(layout, counts, case.steps, case.offset)
            group_rows = slice(sum(counts[:group_start]), sum(counts[:group_start + group]))
            batches = [(x[group_rows], dy[group_rows]) for x, dy in batches]
            with world.scope():
                layer = syncbn.SyncBatchNormalization(
                    axis=axis, momentum=MOMENTUM, epsilon=EPSILON, communicator=communicator,
                    group_size=case.group_size, name=f"bn_{case.name}_{layout}")
                layer.build((None,) + feature_shape)
                layer.set_weights(initial_weights(layout))
            got = run_synced(layer, batches, lo, hi, world.strategy)
            # Far from zero, Keras's float32 layer is itself inexact (it folds the mean
            # into an offset, which cancels), so float64 NumPy is the reference there.
            reference = run_float64_reference if case.offset else run_reference
            want = reference(layout, batches, lo, hi)
            errors = {name: max(relative_error(g[i], w[i]) for g, w in zip(got, want))
                      for i, name in enumerate(NAMES)}
            ok = all(error <= case.tolerance for error in errors.values())
            summary = " ".join(f"{k}={v:.2e}" for k, v in errors.items())
            line = (f"exactness rank={rank}/{world_size} case={case.name} layout={layout} "
                    f"rows={hi - lo} reference={'float64' if case.offset else 'keras'} "
                    f"offset={case.offset:g} kernel={kernel} kernels={kernels} "
                    f"{'ok' if ok else 'FAIL'} {summary}")
            say(line)
            records.append({"line": line, "case": case.name, "layout": layout, "rows": hi - lo,
                            "kernel": kernel, "kernels": kernels, "errors": errors, "ok": ok})
            if out:
                os.makedirs(out, exist_ok=True)
                np.savez(os.path.join(out, f"rank{rank}.{layout}.npz"),
                         **{f"{name}_{s}": g[i] for s, g in enumerate(got)
                            for i, name in enumerate(NAMES)})
    return records


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    world = open_world(args.backend, args.group_size)
    case = Case(layouts=tuple(args.layouts.split(",")),
                counts=tuple(int(c) for c in args.counts.split(",")) if args.counts else None,
                steps=args.steps, offset=args.offset, group_size=args.group_size,
                tolerance=args.tolerance, communicator="auto" if args.backend == "auto" else None)
    records = run_case(world, case, args.out)
    # A group that finishes first must not shut its backend down (at exit) while
    # another group is still summing.
    world.barrier()
    return 0 if all(record["ok"] for record in records) else 1


if __name__ == "__main__":
    sys.exit(main())
