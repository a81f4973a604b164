"""What sync BN costs on this hardware: one sum's latency, one layer's step.

* Per-sum latency: one `tf.function` runs a chain of `all_sum` calls of a
  BN layer's forward payload (`2C + 1` float64, C = 64), each sum feeding the
  next, so they run one after another as sync BN's do. The chain starts from
  a random tensor: from a constant, Grappler could fold sums through ops it
  does not know to be stateful. Time per call divided by the chain's length.
* Step cost: forward and backward of one `SyncBatchNormalization` layer and
  of one `keras.layers.BatchNormalization` (local statistics), same input
  shape, interleaved round by round; the ratio is the median of per-round
  ratios, so load from other processes largely cancels.

Every sample starts after a barrier (the world's own sum), so ranks start
together; the figures are the chief's.
"""

import time

import numpy as np

CHAIN = 20
LATENCY_CHANNELS = 64
STEP_SHAPE = (16, 16, 16, 64)  # per replica, channels-last
REPEAT = 3


def resolve(communicator):
    """The communicator object for the layer's `communicator` argument, here and now."""
    from syncbn import collectives

    return collectives.resolve(communicator) if isinstance(communicator, str) else communicator


def _fetch(outputs):
    for replica_outputs in outputs:
        for output in replica_outputs:
            output.numpy()


def sum_latency(world, communicator, rounds):
    """Median seconds per `all_sum` over `rounds` chains of `CHAIN`; None with one replica."""
    import tensorflow as tf

    if world.num_replicas < 2:
        return None

    def replica_chain():
        comm = resolve(communicator)
        x = tf.random.uniform([2 * LATENCY_CHANNELS + 1], dtype=tf.float64)
        for index in range(CHAIN):
            x = comm.all_sum(x, f"syncbn_check/latency/{index}") * (1.0 / comm.num_replicas)
        return (x,)

    chain = world.compile(replica_chain)
    args = world.distribute({})
    for _ in range(2):  # trace and warm up
        _fetch(chain(args))
    samples = []
    for _ in range(rounds):
        world.barrier()
        started = time.perf_counter()
        _fetch(chain(args))
        samples.append((time.perf_counter() - started) / CHAIN)
    return float(np.median(samples))


def step_cost(world, communicator, rounds):
    """Median ms per training step of the sync layer and of Keras BN, and their ratio."""
    import keras

    import syncbn
    from syncbn.check.exactness import training_step

    with world.scope():
        layers = {
            "sync": syncbn.SyncBatchNormalization(communicator=communicator,
                                                  name="syncbn_check_timing"),
            "local": keras.layers.BatchNormalization(name="keras_check_timing"),
        }
        for layer in layers.values():
            layer.build((None,) + STEP_SHAPE[1:])
    rng = np.random.default_rng(world.process_rank)
    args = world.distribute({
        r: (rng.normal(0.5, 2.0, STEP_SHAPE).astype(np.float32),
            rng.normal(size=STEP_SHAPE).astype(np.float32))
        for r in world.local_replica_ids})
    steps = {name: world.compile(training_step(layer)) for name, layer in layers.items()}
    for step in steps.values():
        for _ in range(2):
            _fetch(step(args))
    samples = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(rounds):
        # Alternate which goes first, so neither always runs on a cold cache.
        for name in names[round_index % 2:] + names[:round_index % 2]:
            world.barrier()
            started = time.perf_counter()
            for _ in range(REPEAT):
                _fetch(steps[name](args))
            samples[name].append((time.perf_counter() - started) / REPEAT)
    ratios = np.array(samples["sync"]) / np.array(samples["local"])
    return {
        "sync_ms": 1e3 * float(np.median(samples["sync"])),
        "local_ms": 1e3 * float(np.median(samples["local"])),
        "sync_local_ratio": float(np.median(ratios)),
    }


def measure(world, communicator, rounds):
    """Both measurements, as a dict for the report and the JSON."""
    latency = sum_latency(world, communicator, rounds)
    return {
        "sum_latency_us": None if latency is None else 1e6 * latency,
        "chain": CHAIN,
        "payload": f"{2 * LATENCY_CHANNELS + 1} float64",
        "step_shape": list(STEP_SHAPE),
        "rounds": rounds,
        **step_cost(world, communicator, rounds),
    }
