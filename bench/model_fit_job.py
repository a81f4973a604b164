"""One rank of `bench/model_step.py --launch N`: a whole model trained on N ranks, timed.

Run by model_step.py through the launcher, one variant per job:

    python -m launch -np 2 --backend horovod -- python bench/model_fit_job.py \\
        --backend horovod --model mobilenetv2 --variant sync

The model is a `keras.applications` model (model_step.py's `build_model`,
same seed on every rank); `--variant local` keeps its Keras
BatchNormalization layers, `--variant sync` is `syncbn.convert(model)`
(communicator "auto": the backend's), and `--variant synced` is
`syncbn.convert(model, communicator=syncbn.collectives.PretendReplicas())`:
the synchronized path's math on each rank's own batch, with no collective in
the BN layers, while the gradients are still averaged over the ranks. So
sync - synced is what the BN layers' collectives cost, and synced - local
what their math costs. Each backend is trained the way its documentation
shows users:

* horovod: `syncbn.init_horovod()`, `model.fit` with the `syncbn.horovod_keras`
  glue (`hk.DistributedOptimizer`, `hk.BroadcastInitialState()`,
  `hk.MetricAverage()`; docs/horovod-keras.md);
* mpi: no Horovod; a `tf.function` train step that averages the gradients
  with one `all_sum` of the "auto" (MPI) communicator (examples/mpirun_train.py);
* tf: MultiWorkerMirroredStrategy with a `strategy.run` train step: Keras 3's
  `model.fit` fails under that strategy, with plain BatchNormalization too
  (keras-team/keras#20585, docs/troubleshooting.md; examples/multiworker_mirrored.py).

The data: a fixed synthetic dataset generated here (seed 0), `N * --batch *
--steps` images with labels; rank r trains on every N-th sample from r, so
both variants and every backend see the same batches. Two epochs of `--steps`
steps each, SGD, each rank's loss the mean over its own batch, gradients
averaged over the ranks.

Timed on every rank with `StepTimer` (a Keras callback; the custom loops call
the same hooks): "first epoch" from just before training starts (before
`model.fit` or the first step) to the end of the first epoch, so tracing,
graph optimization and the first epoch's steps; "steady step" the median over
the second epoch's steps of `on_train_batch_begin` to `on_train_batch_end`
(the step function returns when its work is done: TensorFlow runs eagerly
and synchronously, and a callback with `on_train_batch_end` keeps Keras from
dispatching callbacks asynchronously). Each rank prints one result line
(model_step.py's `RESULT_MARK` and JSON).
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_step  # noqa: E402

from syncbn.world import create_world  # noqa: E402

BACKENDS = ("horovod", "mpi", "tf")
VARIANTS = ("local", "sync", "synced")
EPOCHS = 2
NUM_CLASSES = 10


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True, choices=BACKENDS,
                        help="how the ranks train: horovod, mpi or tf (match the launcher's)")
    parser.add_argument("--model", required=True, choices=model_step.MODELS + [model_step.SMALL_MODEL])
    parser.add_argument("--variant", required=True, choices=VARIANTS,
                        help="local: Keras BN; sync: syncbn.convert(model); synced: the same "
                             "layers with no collective (PretendReplicas)")
    parser.add_argument("--batch", type=int, default=8, help="samples per rank and step (default 8)")
    parser.add_argument("--size", type=int, default=64, help="image height and width (default 64)")
    parser.add_argument("--steps", type=int, default=5, help="steps per epoch (default 5)")
    args = parser.parse_args(argv)
    for name in ("batch", "size", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"Argument `--{name}` must be >= 1. "
                             f"Received: --{name}={getattr(args, name)}")
    return args


def synthetic_dataset(ranks, batch, steps, size):
    """The same images and labels on every rank and in every variant (seed 0)."""
    import numpy as np

    rng = np.random.default_rng(0)
    count = ranks * batch * steps
    x = rng.normal(size=(count, size, size, 3)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, size=(count,)).astype(np.int32)
    return x, y


def shard(x, y, rank, ranks):
    return x[rank::ranks], y[rank::ranks]


# This job's variant names -> model_step.make_variant's.
MODEL_STEP_VARIANT = {"local": "keras", "sync": "syncbn", "synced": "synced"}


def make_model(args):
    model = model_step.build_model(args.model, args.size)  # seeded: the same on every rank
    return model_step.make_variant(MODEL_STEP_VARIANT[args.variant], model)


def step_timer_class(keras=None):
    """The `StepTimer` callback class of `keras` (default Keras 3; tf_keras for legacy fits)."""
    if keras is None:
        import keras

    class StepTimer(keras.callbacks.Callback):
        """Wall times of training: first epoch, and every step of the later epochs."""

        def __init__(self):
            super().__init__()
            self.started = None
            self.first_epoch_s = None
            self.step_s = {}  # epoch -> [seconds per step]
            self._epoch = 0
            self._step_start = None

        def start(self):
            self.started = time.perf_counter()

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch
            self.step_s[epoch] = []

        def on_train_batch_begin(self, batch, logs=None):
            self._step_start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.step_s[self._epoch].append(time.perf_counter() - self._step_start)

        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                self.first_epoch_s = time.perf_counter() - self.started

        def result(self):
            steady = [s for epoch, steps in self.step_s.items() if epoch > 0 for s in steps]
            return {"first_epoch_s": self.first_epoch_s,
                    "first_step_s": self.step_s[0][0],
                    "steady_ms": 1e3 * statistics.median(steady),
                    "steady_all_ms": [1e3 * s for s in steady]}

    return StepTimer


def custom_loop(timer, step, batches):
    """Runs `step` on each epoch's batches, calling `timer`'s hooks as `model.fit` does."""
    timer.start()
    for epoch in range(EPOCHS):
        timer.on_epoch_begin(epoch)
        for index, batch in enumerate(batches):
            timer.on_train_batch_begin(index)
            step(*batch)
            timer.on_train_batch_end(index)
        timer.on_epoch_end(epoch)


def train_horovod(args, timer):
    import keras

    from syncbn import horovod_keras as hk

    world = create_world("horovod")
    rank, ranks = world.process_rank, world.num_processes
    x, y = shard(*synthetic_dataset(ranks, args.batch, args.steps, args.size), rank, ranks)
    model = make_model(args)
    model.compile(optimizer=hk.DistributedOptimizer(keras.optimizers.SGD(0.01)),
                  loss=keras.losses.SparseCategoricalCrossentropy())
    timer.start()
    model.fit(x, y, batch_size=args.batch, epochs=EPOCHS, shuffle=False, verbose=0,
              callbacks=[timer, hk.BroadcastInitialState(), hk.MetricAverage()])
    return rank, ranks, model


def train_mpi(args, timer):
    import keras
    import tensorflow as tf

    from syncbn import collectives

    communicator = collectives.resolve("auto")
    if communicator.name != "mpi":
        raise RuntimeError(f"--backend mpi needs the MPI communicator; 'auto' resolved to "
                           f"{communicator.name!r}: run under `syncbn-launch --backend mpi`")
    world = create_world("mpi")
    rank, ranks = world.process_rank, world.num_processes
    x, y = shard(*synthetic_dataset(ranks, args.batch, args.steps, args.size), rank, ranks)
    model = make_model(args)
    optimizer = keras.optimizers.SGD(0.01)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    def average_gradients(grads):
        """One all-reduce for every gradient: flatten, sum, divide, split back."""
        sizes = [g.shape.num_elements() for g in grads]
        # [*shape_i] for each gradient -> [sum of sizes]
        flat = tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)
        flat = communicator.all_sum(flat, "gradients") / communicator.num_replicas
        return [tf.reshape(part, g.shape) for part, g in zip(tf.split(flat, sizes), grads)]

    @tf.function
    def train_step(images, labels):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(images, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(average_gradients(grads), model.trainable_variables)
        return loss

    batches = [(tf.constant(x[i:i + args.batch]), tf.constant(y[i:i + args.batch]))
               for i in range(0, len(x), args.batch)]
    custom_loop(timer, train_step, batches)
    return rank, ranks, model


def train_tf(args, timer):
    import keras
    import tensorflow as tf

    world = create_world("tf.distribute")
    strategy, rank, ranks = world.strategy, world.process_rank, world.num_processes
    x, y = shard(*synthetic_dataset(ranks, args.batch, args.steps, args.size), rank, ranks)
    with strategy.scope():
        model = make_model(args)
        optimizer = keras.optimizers.SGD(0.01)
        optimizer.build(model.trainable_variables)
    # Sum over the rank's batch / global batch: the sum over the replicas is the mean.
    loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction="sum")
    global_batch = args.batch * ranks

    @tf.function
    def train_step(images, labels):
        def replica_step(images, labels):
            with tf.GradientTape() as tape:
                loss = loss_fn(labels, model(images, training=True)) / global_batch
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)  # sums over replicas itself
            return loss

        losses = strategy.run(replica_step, args=(images, labels))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    # Each worker feeds its own shard: no auto-sharding, one batch of `--batch` per step.
    def dataset_fn(context):
        del context
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch)

    dataset = strategy.distribute_datasets_from_function(dataset_fn)
    batches = list(dataset)
    custom_loop(timer, train_step, batches)
    return rank, ranks, model


TRAIN = {"horovod": train_horovod, "mpi": train_mpi, "tf": train_tf}


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    timer = step_timer_class()()
    start = time.perf_counter()
    rank, ranks, model = TRAIN[args.backend](args, timer)
    result = {"backend": args.backend, "model": args.model, "variant": args.variant,
              "batch": args.batch, "size": args.size, "steps": args.steps,
              "rank": rank, "ranks": ranks, "bn_layers": model_step.count_bn_layers(model),
              "job_s": time.perf_counter() - start, **timer.result()}
    sys.stdout.write(model_step.RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
