"""Exactness on this hardware: syncbn against Keras BN and float64 NumPy on the global batch.

For each case (a layout and per-replica batch sizes, uneven, one of them
empty), every replica runs `STEPS` training steps of a
`SyncBatchNormalization` layer on its own data. The check then gathers the
global batch and every replica's results (through the world's own sums, not
the communicator under test) and computes, on every process, two references
on the global batch: `keras.layers.BatchNormalization` on the default device
(the device type the layer ran on) and `reference.batch_norm` in float64.

Compared, as the largest relative error over the steps:

* `y`, `dx`: every replica's rows against the reference's;
* `dgamma`, `dbeta`: summed over replicas (what a gradient all-reduce sums)
  against the reference's;
* `moving_mean`, `moving_variance`: every replica's against the reference's.

Each process computes the errors; the verdict uses the largest over
processes, so a check passes only if it passes on every rank.
"""

import collections

import numpy as np

from syncbn.check import reference

MOMENTUM = 0.7  # far from 1, so that two steps move the moving statistics visibly
EPSILON = 1e-3
STEPS = 2
# float32 rounding gives errors below 1e-6 on these sizes (measured on CPU); a lost
# contribution or a wrong formula gives 1e-3 to 1.
DEFAULT_TOLERANCE = 1e-5
QUANTITIES = ("y", "dx", "dgamma", "dbeta", "moving_mean", "moving_variance")
REFERENCES = ("keras", "float64")
SEED = 20240613

Layout = collections.namedtuple("Layout", "name feature_shape axis")
LAYOUTS = (
    Layout("[N,C]", (16,), -1),
    Layout("[N,H,W,C] channels-last", (4, 4, 8), -1),
    Layout("[N,C,W] channels-first, axis=1", (8, 6), 1),
)
Case = collections.namedtuple("Case", "index layout counts")


def replica_counts(num_replicas):
    """The per-replica batch sizes to check, one list per scenario. Pure.

    Uneven sizes, and replica 1 empty (with two replicas, one scenario
    without an empty replica and one with).

    Example:
        >>> replica_counts(2), replica_counts(4)
        ([[5, 9], [12, 0]], [[3, 0, 5, 10]])
    """
    if num_replicas < 1:
        raise ValueError(f"Argument `num_replicas` must be >= 1. Received: num_replicas={num_replicas}")
    if num_replicas == 1:
        return [[11]]
    if num_replicas == 2:
        return [[5, 9], [12, 0]]
    return [[0 if r == 1 else 3 + (5 * r) % 8 for r in range(num_replicas)]]


def cases(num_replicas):
    scenarios = replica_counts(num_replicas)
    combos = [(layout, counts) for counts in scenarios for layout in LAYOUTS]
    return [Case(index, layout, counts) for index, (layout, counts) in enumerate(combos)]


def num_channels(layout):
    return layout.feature_shape[layout.axis if layout.axis < 0 else layout.axis - 1]


def initial_weights(channels):
    """gamma, beta, moving mean, moving variance: the same on every replica."""
    rng = np.random.default_rng([SEED, channels])
    return [rng.normal(1.0, 0.3, channels).astype(np.float32),
            rng.normal(0.0, 0.3, channels).astype(np.float32),
            np.zeros(channels, np.float32), np.ones(channels, np.float32)]


def replica_batches(case, replica):
    """`[(x, dy)] * STEPS` of replica `replica`: its own data, known only to it."""
    rng = np.random.default_rng([SEED, case.index, replica])
    shape = (case.counts[replica],) + case.layout.feature_shape
    return [(rng.normal(2.0, 3.0, shape).astype(np.float32),
             rng.normal(0.0, 1.0, shape).astype(np.float32)) for _ in range(STEPS)]


def training_step(layer):
    """`(x, dy) -> (y, dx, dgamma, dbeta, moving_mean, moving_variance)` after one step."""
    import tensorflow as tf

    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        grads = tape.gradient(y, [x, layer.gamma, layer.beta], output_gradients=dy)
        grads = [tf.zeros_like(v) if g is None else g
                 for g, v in zip(grads, [x, layer.gamma, layer.beta])]
        # Read after the step's update: automatic control dependencies order it.
        return (y, *grads, tf.identity(layer.moving_mean.value),
                tf.identity(layer.moving_variance.value))

    return step


def run_synced(world, case, communicator):
    """Runs the case's steps on every replica; returns the global results, per step."""
    import syncbn

    layout = case.layout
    with world.scope():
        layer = syncbn.SyncBatchNormalization(
            axis=layout.axis, momentum=MOMENTUM, epsilon=EPSILON, communicator=communicator,
            name=f"syncbn_check_{case.index}")
        layer.build((None,) + layout.feature_shape)
        layer.set_weights(initial_weights(num_channels(layout)))
    step = world.compile(training_step(layer))
    batches = {r: replica_batches(case, r) for r in world.local_replica_ids}
    results = []
    for index in range(STEPS):
        outputs = step(world.distribute({r: batches[r][index] for r in batches}))
        local = {r: [o.numpy() for o in out] for r, out in zip(world.local_replica_ids, outputs)}

        def rows(position, source):
            return world.gather_rows({r: source[r][position] for r in source}, case.counts)

        def stacked(position):
            return world.gather_vectors({r: local[r][position] for r in local})

        results.append({
            "x": rows(0, {r: batches[r][index] for r in batches}),
            "dy": rows(1, {r: batches[r][index] for r in batches}),
            "y": rows(0, local), "dx": rows(1, local),
            "dgamma": stacked(2).sum(axis=0), "dbeta": stacked(3).sum(axis=0),
            "moving_mean": stacked(4), "moving_variance": stacked(5),  # [R, C]
        })
    return results


def keras_reference(layout, global_steps):
    """`keras.layers.BatchNormalization` on the global batches, on the default device.

    Returns the per-step results and the device type it ran on.
    """
    import keras
    import tensorflow as tf

    layer = keras.layers.BatchNormalization(axis=layout.axis, momentum=MOMENTUM, epsilon=EPSILON)
    layer.build((None,) + layout.feature_shape)
    layer.set_weights(initial_weights(num_channels(layout)))
    step = training_step(layer)
    results, device = [], "CPU"
    for batch in global_steps:
        x = tf.constant(batch["x"].astype(np.float32))  # float32 values, gathered exactly
        outputs = step(x, tf.constant(batch["dy"].astype(np.float32)))
        device = tf.DeviceSpec.from_string(outputs[0].device or "/device:CPU:0").device_type
        results.append(dict(zip(QUANTITIES, (o.numpy() for o in outputs))))
    return results, device


def float64_reference(layout, global_steps):
    gamma, beta, moving_mean, moving_variance = initial_weights(num_channels(layout))
    results = []
    for batch in global_steps:
        want = reference.batch_norm(batch["x"], gamma, beta, batch["dy"], layout.axis, EPSILON)
        moving_mean = reference.moving_average(moving_mean, want["mean"], MOMENTUM)
        moving_variance = reference.moving_average(moving_variance, want["variance"], MOMENTUM)
        results.append({**want, "moving_mean": moving_mean, "moving_variance": moving_variance})
    return results


def case_errors(got_steps, want_steps):
    """`{quantity: largest relative error over the steps}`."""
    errors = {}
    for quantity in QUANTITIES:
        per_step = []
        for got, want in zip(got_steps, want_steps):
            expected = np.asarray(want[quantity], np.float64)
            if quantity.startswith("moving_"):  # every replica's [C] against the one reference
                expected = np.broadcast_to(expected, got[quantity].shape)
            per_step.append(reference.relative_error(got[quantity], expected))
        errors[quantity] = max(per_step)
    return errors


def check(world, communicator, tolerance):
    """Runs every case; returns one record per (case, reference), combined over processes.

    Args:
        world: the `syncbn.world.World` of this job.
        communicator: the layer's `communicator` argument.
        tolerance: the largest relative error that passes.

    Returns:
        A list of dicts: `case`, `layout`, `counts`, `reference`,
        `reference_device`, `errors` (per quantity, the largest over
        processes), `largest`, `tolerance` and `ok`.
    """
    records, local_errors = [], []
    for case in cases(world.num_replicas):
        got = run_synced(world, case, communicator)
        keras_steps, device = keras_reference(case.layout, got)
        for name, want in (("keras", keras_steps), ("float64", float64_reference(case.layout, got))):
            errors = case_errors(got, want)
            local_errors.append([errors[q] for q in QUANTITIES])
            records.append({
                "case": case.index, "layout": case.layout.name,
                "shape": ["N", *case.layout.feature_shape], "axis": case.layout.axis,
                "counts": list(case.counts), "reference": name,
                "reference_device": device if name == "keras" else "NumPy float64",
            })
    # Largest error over processes: a check passes only if it passes on every rank.
    combined = world.gather_per_process(np.array(local_errors)).max(axis=0)
    for record, errors in zip(records, combined):
        record["errors"] = {q: float(e) for q, e in zip(QUANTITIES, errors)}
        record["largest"] = float(np.max(errors))
        record["tolerance"] = tolerance
        # `<=` is False for NaN: a NaN fails.
        record["ok"] = bool(np.all(errors <= tolerance))
    return records
