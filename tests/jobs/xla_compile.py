"""Keras's compile defaults on a machine that reports a GPU, on every rank of a job.

Run one copy per rank (syncbn-launch, any backend). Keras's
`compile(jit_compile="auto")` turns XLA on when `tf.config.list_physical_devices()`
shows a GPU and no tf.distribute strategy is in use; this job makes that
list show one (the process still runs on its CPU). For `jit_compile` in
("auto", True), it builds the same model (SyncBatchNormalization first, so
its statistics depend on the data only), compiles, trains two epochs with
`model.fit` (under tf.distribute, four steps of its own loop), and checks on
every rank that:

- XLA stayed off, since the layer's sums are Horovod, MPI or tf.distribute
  collectives between processes, which XLA cannot compile;
- the layer trained (its moving mean moved) and its moving statistics are
  bit-identical on every rank.

Prints one line per setting and exits 1 on a failed check.

    syncbn-launch -np 2 --backend horovod -- python tests/jobs/xla_compile.py
"""

import sys
from unittest import mock

import numpy as np


def fake_gpu_devices(tf):
    """`tf.config.list_physical_devices` as on a machine with one GPU besides its CPUs."""
    real = tf.config.list_physical_devices
    gpu = tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")

    def list_physical_devices(device_type=None):
        devices = real(device_type)
        return devices + [gpu] if device_type in (None, "GPU") else devices

    return mock.patch.object(tf.config, "list_physical_devices", list_physical_devices)


def train(world, jit_compile):
    """Compiles and fits one model; returns `(model.jit_compile, moving mean, moving variance)`."""
    import keras
    import tensorflow as tf

    import syncbn

    keras.utils.set_random_seed(7)  # the same initial weights on every rank
    with world.scope():
        model = keras.Sequential([keras.Input((6,)), syncbn.SyncBatchNormalization(name="bn"),
                                  keras.layers.Dense(1)])
        with fake_gpu_devices(tf):
            model.compile(optimizer="sgd", loss="mse", jit_compile=jit_compile)
    rng = np.random.default_rng(world.process_rank)  # each rank its own shard
    x = rng.normal(3.0, 2.0, (64, 6)).astype("float32")
    if world.strategy is None:
        model.fit(x, x.sum(axis=1), batch_size=16, epochs=2, verbose=0)
    else:
        # Keras 3.15's fit fails under MultiWorkerMirroredStrategy, with any layer
        # (docs/troubleshooting.md): the strategy's users train in their own loop.
        step = world.compile(lambda batch: (model(batch, training=True),))
        for batch in np.split(x, 4):
            step(world.distribute({r: (batch,) for r in world.local_replica_ids}))
    layer = model.get_layer("bn")
    return model.jit_compile, layer.moving_mean.numpy(), layer.moving_variance.numpy()


def main():
    from syncbn.world import create_world

    world = create_world()
    failed = False
    for jit_compile in ("auto", True):
        xla, mean, variance = train(world, jit_compile)
        statistics = np.concatenate([mean, variance]).astype(np.float64)
        every_rank = world.gather_per_process(statistics)
        identical = bool(np.all(every_rank == every_rank[0]))
        moved = bool(np.all(mean != 0.0))
        ok = xla is False and identical and moved
        failed |= not ok
        print(f"xla_compile rank={world.process_rank}/{world.num_processes} world={world.name} "
              f"jit_compile={jit_compile!r} resolved={xla!r} identical={identical} "
              f"moved={moved} {'ok' if ok else 'FAIL'}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
