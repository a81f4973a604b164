"""Precise batch norm across replicas: `recalibrate` and the `PreciseBN` callback.

The moving averages lag behind the weights and start from arbitrary values;
after training, one pass over some training batches in training mode gives
every SyncBatchNormalization layer the statistics it actually sees. Each
step's forward pass already computes the *global* batch statistics (the same
on every replica of a synchronization group), so accumulating those, weighted
by the global count, gives the same totals on every replica without any
collective beyond the forward pass's own one per layer and batch.

See docs/moving-statistics.md.
"""

import contextlib
import functools
import logging
import sys
import threading

import keras
import numpy as np
import tensorflow as tf

from syncbn import collectives, world
from syncbn.layers import KERAS, SyncBatchNormalizationBase

logger = logging.getLogger(__name__)

def synchronized_layers(model):
    """Every SyncBatchNormalization inside `model` (nested models included), once each."""
    return [layer for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, SyncBatchNormalizationBase)]


def _check_model(model):
    # A tf_keras model's class comes from an imported tf_keras.
    tf_keras = sys.modules.get("tf_keras")
    if not (isinstance(model, keras.Model)
            or (tf_keras is not None and isinstance(model, tf_keras.Model))):
        raise TypeError(f"Argument `model` must be a Keras model. Received: model={model!r}")


def _strategy(model):
    """The model's tf.distribute strategy, or None for the default one."""
    # Keras records the strategy whose scope the model was created in.
    strategy = getattr(model, "_distribute_strategy", None)
    if strategy is None and tf.distribute.has_strategy():
        strategy = tf.distribute.get_strategy()
    return strategy


def _features(element):
    """`x` of a batch given as `x` or as a tuple `(x, ...)`."""
    return element[0] if isinstance(element, tuple) else element


def _to_numpy(x):
    return tf.nest.map_structure(lambda a: np.asarray(a), x)


def _empty_like(x):
    return tf.nest.map_structure(lambda a: a[:0], x)


def _empty_batch(model):
    """A batch of no samples shaped like the model's inputs, for a rank with no data."""
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ValueError(
            "This replica has no batch at all and the model has no known input shape to "
            "build an empty one from: give every replica at least one batch, or use a "
            "Functional or Sequential model with an Input."
        )
    arrays = [np.zeros((0,) + tuple(1 if d is None else d for d in t.shape[1:]),
                       keras.backend.standardize_dtype(t.dtype)) for t in inputs]
    return arrays[0] if len(arrays) == 1 else arrays


def _expected_steps(data, steps):
    if steps is not None:
        return steps
    if isinstance(data, tf.data.Dataset):
        cardinality = int(data.cardinality())
        return cardinality if cardinality >= 0 else None
    try:
        return len(data)
    except TypeError:
        return None


class _Recorder:
    """Collects, per replica thread, the global statistics the layers report in a trace."""

    def __init__(self, layers):
        self.index = {id(layer): i for i, layer in enumerate(layers)}
        self.local = threading.local()
        self.order = []  # layer index of each record, the same in every trace

    def start(self):
        self.local.records = []
        self.local.order = []

    def record(self, layer, mean, variance, count):
        self.local.order.append(self.index[id(layer)])
        self.local.records.append((count, mean, variance))

    def finish(self):
        self.order = self.local.order
        return tuple(self.local.records)


@contextlib.contextmanager
def _recording(layers, recorder):
    """Points each layer's `_statistics_recorder` hook at `recorder` for the block."""
    for layer in layers:
        layer._statistics_recorder = functools.partial(recorder.record, layer)
    try:
        yield
    finally:
        for layer in layers:
            layer._statistics_recorder = None


@contextlib.contextmanager
def _preserved(variables):
    """Restores `variables` after the block: training mode may move other layers' state."""
    saved = [np.array(v.numpy()) for v in variables]
    try:
        yield
    finally:
        for variable, value in zip(variables, saved):
            variable.assign(value)


class _StepRunner:
    """Runs the model forward in training mode on one batch; returns each layer call's record.

    With a strategy, each local replica gets its slice of the batch (uneven
    splits are exact) and the records are the first local replica's: the
    global statistics are the same on every replica of a group.
    """

    def __init__(self, model, recorder, strategy):
        self._strategy = strategy
        self._recorder = recorder
        self._local_replicas = len(strategy.extended.worker_devices) if strategy else 1

        def replica_step(x):
            recorder.start()
            model(x, training=True)
            return recorder.finish()

        self._function = tf.function(
            replica_step if strategy is None else
            (lambda x: strategy.run(replica_step, args=(x,))), reduce_retracing=True)

    def _distribute(self, x):
        if self._strategy is None:
            return x

        def piece(context):
            index = context.replica_id_in_sync_group % self._local_replicas
            return tf.nest.map_structure(
                lambda a: np.array_split(a, self._local_replicas)[index], x)

        return self._strategy.experimental_distribute_values_from_function(piece)

    def __call__(self, x):
        """`[(layer index, global count, mean, variance)]` of one batch, in call order."""
        records = self._function(self._distribute(x))
        if self._strategy is not None:
            records = tf.nest.map_structure(
                lambda value: self._strategy.experimental_local_results(value)[0], records)
        return [(index, float(count), np.asarray(mean, np.float64),
                 np.asarray(variance, np.float64))
                for index, (count, mean, variance) in zip(self._recorder.order, records)]


def _batches(iterator, model, one_replica):
    """The features of each batch of `iterator`; then, with several replicas, empty batches.

    A replica whose data runs out goes on with empty batches shaped like its
    last one (or the model's inputs) until the global counts say every
    replica of its group is done; with one replica the data's end is the end.
    """
    last_batch = None
    while True:
        element = next(iterator, None)
        if element is None and one_replica:
            return
        if element is None:
            yield _empty_like(last_batch) if last_batch is not None else _empty_batch(model)
        else:
            last_batch = _to_numpy(_features(element))
            yield last_batch


class _Totals:
    """Per layer: `sum n`, `sum n * mean`, `sum n * variance`, in float64 on the host."""

    def __init__(self, layers):
        self.layers = layers
        self.sums = [[0.0, 0.0, 0.0] for _ in layers]

    def add(self, records):
        for index, count, mean, variance in records:
            if count > 0:
                total = self.sums[index]
                total[0] += count
                total[1] = total[1] + count * mean
                total[2] = total[2] + count * variance

    def assign(self):
        """Sets each layer's moving statistics to its weighted averages."""
        for layer, (count, sum_mean, sum_variance) in zip(self.layers, self.sums):
            if count == 0:
                logger.warning("recalibrate: layer '%s' saw no sample; its moving statistics "
                               "are unchanged.", layer.name)
                continue
            layer.moving_mean.assign((sum_mean / count).astype(np.float32))
            layer.moving_variance.assign((sum_variance / count).astype(np.float32))


def _check_arguments(model, data, steps, verbose):
    """Validates `recalibrate`'s arguments; returns `(iterator over data, layers)`."""
    _check_model(model)
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"Argument `steps` must be a positive integer or None. Received: steps={steps!r}")
    if verbose not in ("auto", 0, 1):
        raise ValueError(f"Argument `verbose` must be 'auto', 0 or 1. Received: verbose={verbose!r}")
    try:
        iterator = iter(data)
    except TypeError:
        raise TypeError(
            "Argument `data` must be a tf.data.Dataset or an iterable of batches. "
            f"Received: data of type {type(data).__name__}"
        ) from None
    layers = synchronized_layers(model)
    if not layers:
        raise ValueError(
            f"Model '{model.name}' has no SyncBatchNormalization layer to recalibrate "
            "(convert it first: `syncbn.convert(model)`)."
        )
    return iterator, layers


def recalibrate(model, data, steps=None, verbose="auto"):
    """Sets every SyncBatchNormalization's moving statistics to precise global averages.

    Runs `model` in training mode over `steps` batches of `data` (every
    layer normalizes with its global batch statistics, as in a training
    step), then sets each SyncBatchNormalization layer's `moving_mean` and
    `moving_variance` to the averages over those global batches, weighted by
    their sample counts: `sum_b n_b * mean_b / sum_b n_b` and
    `sum_b n_b * var_b / sum_b n_b` (biased variances, as Keras stores). No
    trainable weight and no optimizer slot changes, and every other
    non-trainable variable (e.g. a Keras `BatchNormalization`'s, a dropout
    seed) is restored afterwards; `moving_updates` of debiased layers is left
    as it is.

    Every replica passes its own shard; batch sizes may differ across
    replicas and steps, empty included. Accumulation is in float64 on the
    host, of the global statistics, so it adds no collective: the forward
    pass's own all-reduce per layer and batch is all it costs, and every
    replica of a group ends with the same values. A replica whose data runs
    out goes on with empty batches; the pass ends after `steps` batches, or
    at the first step in which no replica of the group has a sample (which
    is also how replicas with different numbers of batches stop together;
    in one process, empty batches are simply skipped).
    As in training, every replica must call `recalibrate` (a replica that
    does not hangs the others at their first batch).

    Works with Horovod, MPI and MultiWorkerMirroredStrategy (one replica per
    worker, each passing its own data), with MirroredStrategy (each batch is
    split across the local replicas) and in one process. Not supported:
    `group_size` with several replicas in one process (their groups would
    need different values in one variable).

    Args:
        model: a Keras model with SyncBatchNormalization layers.
        data: a `tf.data.Dataset` or any iterable of batches, each `x` or a
            tuple `(x, ...)` (targets and sample weights are ignored; a list
            or dict is one multi-input `x`).
        steps: number of batches (None: all of `data`). Must be >= 1.
        verbose: `"auto"` (a progress bar on the chief only), 0 or 1.

    Returns:
        The number of steps run.

    Raises:
        TypeError: if `model` is not a Keras model or `data` not iterable.
        ValueError: if `steps` or `verbose` is invalid, or `model` has no
            SyncBatchNormalization layer.

    Example:

    ```python
    import keras, numpy as np, syncbn

    model = keras.Sequential([keras.Input((4,)), syncbn.SyncBatchNormalization(momentum=0.999)])
    data = [np.random.default_rng(b).normal(5.0, 2.0, (32, 4)).astype("float32") for b in range(10)]
    syncbn.recalibrate(model, data, verbose=0)
    print(model.layers[0].moving_mean.numpy())   # about 5, not 0
    ```
    """
    iterator, layers = _check_arguments(model, data, steps, verbose)
    strategy = _strategy(model)
    if strategy is not None and len(strategy.extended.worker_devices) > 1 and any(
            layer.group_size for layer in layers):
        raise ValueError("recalibrate does not support `group_size` with several replicas in one "
                         "process (MirroredStrategy): their groups would need different values.")
    # With one replica the data's end is the end; with more, the replicas must
    # stop together, which only the global counts tell them all at once.
    one_replica = strategy is None and all(
        collectives.resolve(layer.communicator, layer.group_size).num_replicas == 1
        for layer in layers)
    recorder = _Recorder(layers)
    run_step = _StepRunner(model, recorder, strategy)
    totals = _Totals(layers)
    own_state = {id(v) for layer in layers for v in layer.non_trainable_weights}
    others = [v for v in model.non_trainable_variables if id(v) not in own_state]
    if verbose == "auto":
        verbose = 1 if world.is_chief(strategy) else 0
    progress = keras.utils.Progbar(_expected_steps(data, steps)) if verbose else None
    done = 0
    batches = _batches(iterator, model, one_replica)
    with _preserved(others), _recording(layers, recorder):
        while steps is None or done < steps:
            x = next(batches, None)
            if x is None:
                break
            records = run_step(x)
            # The global counts are the same on every replica of a group: all stop together.
            if not one_replica and not any(count > 0 for _, count, _, _ in records):
                break
            totals.add(records)
            done += 1
            if progress is not None:
                progress.update(done)
    totals.assign()
    return done


class PreciseBN(KERAS.callbacks.Callback):
    """Recalibrates the moving statistics during `fit`, before each epoch's validation.

    A callback of the Keras that `tf.keras` is (tf_keras under
    `TF_USE_LEGACY_KERAS=1`), like `syncbn.SyncBatchNormalization`.

    Every `every_n_epochs` epochs, after the epoch's training steps,
    `recalibrate(model, data, steps)` runs on every replica, so that the
    epoch's validation metrics (and checkpoints chosen by them) use the
    recalibrated statistics. Keras runs validation inside `fit` after the
    epoch's last step; this callback recalibrates when that validation
    begins (`on_test_begin`), or at the epoch's end when there is none.

    Args:
        data: a `tf.data.Dataset` or an iterable of batches that can be
            iterated once per recalibration (a list, a dataset; not a
            one-shot generator), each rank its own shard.
        steps: batches per recalibration (None: all of `data`).
        every_n_epochs: recalibrate after epochs `n - 1, 2n - 1, ...` (0-based).
        verbose: as for `recalibrate` (default 0).

    Example:

    ```python
    model.fit(x, y, validation_data=(x_val, y_val),
              callbacks=[syncbn.PreciseBN(calibration_batches, steps=20)])
    ```
    """

    def __init__(self, data, steps=None, every_n_epochs=1, verbose=0):
        super().__init__()
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError("Argument `every_n_epochs` must be a positive integer. "
                             f"Received: every_n_epochs={every_n_epochs!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"Argument `steps` must be a positive integer or None. Received: steps={steps!r}")
        self.data = data
        self.steps = steps
        self.every_n_epochs = every_n_epochs
        self.verbose = verbose
        self.recalibrations = 0
        self._epoch = None
        self._done = True

    def _recalibrate(self):
        self._done = True
        recalibrate(self.model, self.data, self.steps, verbose=self.verbose)
        self.recalibrations += 1

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._done = (epoch + 1) % self.every_n_epochs != 0

    def on_test_begin(self, logs=None):
        # Also called by a plain `evaluate`, outside `fit`: only the epoch's own validation counts.
        if self._epoch is not None and not self._done:
            self._recalibrate()

    def on_epoch_end(self, epoch, logs=None):
        if not self._done:
            self._recalibrate()

    def on_train_end(self, logs=None):
        self._epoch = None
        self._done = True
