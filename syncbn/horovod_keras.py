"""Horovod glue for Keras 3: broadcast, gradient and metric averaging, chief-only output.

Horovod 0.28's Keras helpers are written for Keras 2 and fail on Keras 3
(measured with TF 2.18 / Keras 3.15): `horovod.tensorflow.keras` needs the
Keras 2 API; `hvd.broadcast_variables` fails with "'SymbolicTensor' object
has no attribute 'assign'"; `hvd.DistributedGradientTape` fails with
"'Variable' object has no attribute 'ref'" (Keras 3 variables are not
`tf.Variable`s); and a gradient taken *through* `hvd.allreduce` comes back
None, so gradients are reduced after differentiation, never inside the loss.
This module replaces those helpers using only Horovod's core ops
(`hvd.grouped_allreduce`, `hvd.allreduce`, `hvd.broadcast`, `hvd.rank`,
`hvd.size`) on plain tensors, never on Keras variables:

* `hvd.broadcast_variables` -> `broadcast_variables(variables, root_rank)`.
* `hvd.callbacks.BroadcastGlobalVariablesCallback` -> `BroadcastInitialState(root_rank)`,
  which also builds and broadcasts the optimizer's state (Keras 3 creates it lazily).
* `hvd.DistributedOptimizer` (Keras) -> `DistributedOptimizer(optimizer)`.
* `hvd.DistributedGradientTape` -> `allreduce_gradients(grads, op)` after `tape.gradient`.
* `hvd.callbacks.MetricAverageCallback` -> `MetricAverage()`.
* `if hvd.rank() == 0:` around callbacks and printing -> `rank()`, `size()`,
  `is_chief()`, `chief_only(*callbacks)`.
* `chief_only(keras.callbacks.ModelCheckpoint(...))` -> `ConsistentModelCheckpoint(...)`
  on every rank, which refuses to save from replicas that diverged.

Gradient convention (Horovod's): each rank's loss is the mean over its own
batch, and every parameter gradient is averaged over the ranks. With
`SyncBatchNormalization` this is consistent: each rank's gamma/beta gradient
is its local share of the global one, and the gradient flowing to the layer's
inputs already includes the other ranks' contributions (the layer's backward
all-reduce), so averaging all parameter gradients gives the gradient of the
mean of the per-rank losses.

The one fallback rule: with a single Horovod process nothing is communicated.
Every rank must make the same calls in the same order (same number of
training steps per epoch, same model); a rank that skips one stalls the
others until Horovod's stall timeout (`syncbn.init_horovod` sets it from
`SYNCBN_COLLECTIVE_TIMEOUT`). Horovod ops do not run under XLA: on GPUs,
compile with `jit_compile=False` (Keras's "auto" turns XLA on there).

Importing this module does not import Horovod; the functions do, and they
need Horovod initialized (`syncbn.init_horovod()`).

Example (run with `horovodrun -np 2 --gloo python train.py`):

```python
import keras, syncbn
from syncbn import horovod_keras as hk

syncbn.init_horovod()
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4),
                          syncbn.SyncBatchNormalization(), keras.layers.Dense(1)])
model.compile(optimizer=hk.DistributedOptimizer(keras.optimizers.Adam(1e-3)), loss="mse")
model.fit(x, y, epochs=2, verbose=1 if hk.is_chief() else 0, callbacks=[
    hk.BroadcastInitialState(), hk.MetricAverage(),
    *hk.chief_only(keras.callbacks.ModelCheckpoint("model.keras")),
])
```
"""

import numbers

import keras
import tensorflow as tf

from syncbn import world
from syncbn.collectives.horovod import initialized_horovod

OPS = ("average", "sum")


def _hvd():
    """`horovod.tensorflow`, imported and initialized, or a RuntimeError that says how."""
    return initialized_horovod("syncbn.horovod_keras")


def _check_root_rank(root_rank):
    if isinstance(root_rank, bool) or not isinstance(root_rank, int):
        raise TypeError(
            f"Argument `root_rank` must be an integer. Received: root_rank={root_rank!r}"
        )
    if root_rank < 0:
        raise ValueError(f"Argument `root_rank` must be >= 0. Received: root_rank={root_rank!r}")
    return root_rank


def _check_root_rank_in_world(hvd, root_rank):
    if root_rank >= hvd.size():
        raise ValueError(
            f"Argument `root_rank` must be a rank of this job, in [0, {hvd.size()}). "
            f"Received: root_rank={root_rank!r}"
        )


def _is_variable(value):
    return isinstance(value, (keras.Variable, tf.Variable))


def _describe(value):
    if _is_variable(value):
        return f"<variable {getattr(value, 'path', value.name)}>"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_sequence(argument, value, is_item, items):
    """Raises TypeError unless `value` is a list or tuple whose items all pass `is_item`."""
    message = f"Argument `{argument}` must be a list or tuple of {items}. Received: "
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{message}{argument}={_describe(value)}")
    for index, item in enumerate(value):
        if not is_item(item):
            raise TypeError(f"{message}{argument}[{index}]={_describe(item)}")


def rank():
    """This process's Horovod rank.

    Returns:
        An int in `[0, size())`.

    Raises:
        RuntimeError: if Horovod is missing or not initialized.
    """
    return _hvd().rank()


def size():
    """The number of Horovod processes (e.g. to scale the learning rate).

    Returns:
        An int >= 1.

    Raises:
        RuntimeError: if Horovod is missing or not initialized.
    """
    return _hvd().size()


def is_chief():
    """True on rank 0, the one rank that prints, logs and saves.

    Example:

    ```python
    model.fit(x, y, verbose=1 if hk.is_chief() else 0)
    ```

    Raises:
        RuntimeError: if Horovod is missing or not initialized.
    """
    _hvd()
    return world.is_chief()


def chief_only(*callbacks):
    """The given callbacks on rank 0, and none on the other ranks.

    For callbacks that write (`ModelCheckpoint`, `TensorBoard`, `CSVLogger`):
    every rank holds the same weights, so one writer is enough, and several
    would race on the same files. Put `MetricAverage()` before them in the
    callback list so that what they monitor is the global value.

    Args:
        *callbacks: `keras.callbacks.Callback` instances.

    Returns:
        A list: `callbacks` on rank 0, `[]` elsewhere.

    Raises:
        TypeError: if an argument is not a Keras callback.
        RuntimeError: if Horovod is missing or not initialized.

    Example:

    ```python
    callbacks = [hk.BroadcastInitialState(), hk.MetricAverage(),
                 *hk.chief_only(keras.callbacks.ModelCheckpoint("ckpt/{epoch:02d}.keras"))]
    ```
    """
    for index, callback in enumerate(callbacks):
        if not isinstance(callback, keras.callbacks.Callback):
            raise TypeError(
                "Arguments of `chief_only` must be `keras.callbacks.Callback` instances. "
                f"Received: callbacks[{index}]={_describe(callback)}"
            )
    return list(callbacks) if is_chief() else []


def broadcast_variables(variables, root_rank=0):
    """Sets every variable, on every rank, to its value on `root_rank`.

    Works on Keras 3 variables (and `tf.Variable`s), eagerly or inside a
    `tf.function`: the values are read as plain tensors, packed into one
    buffer per dtype (`# [n_i] ... -> [sum n_i]`), broadcast with one
    `hvd.broadcast` each, and assigned back. Every rank must pass the same
    variables (shapes and dtypes) in the same order.

    Args:
        variables: list or tuple of `keras.Variable` / `tf.Variable`, e.g.
            `model.weights + optimizer.variables`.
        root_rank: the rank whose values win (default 0).

    Raises:
        TypeError: if `variables` is not a list or tuple of variables, or
            `root_rank` is not an integer.
        ValueError: if `root_rank` is not a rank of the job.
        RuntimeError: if Horovod is missing or not initialized.

    Example:

    ```python
    syncbn.init_horovod()
    keras.utils.set_random_seed(hk.rank())     # different initial weights...
    model = make_model()
    optimizer = keras.optimizers.Adam()
    optimizer.build(model.trainable_variables)
    hk.broadcast_variables(model.weights + optimizer.variables)   # ...made equal
    ```
    """
    _check_sequence("variables", variables, _is_variable, "Keras or TensorFlow variables")
    _check_root_rank(root_rank)
    hvd = _hvd()
    _check_root_rank_in_world(hvd, root_rank)
    if hvd.size() == 1 or not variables:
        return
    by_dtype = {}
    for variable in variables:
        by_dtype.setdefault(tf.as_dtype(variable.dtype), []).append(variable)
    # Sorted so that every rank issues the broadcasts in the same order.
    for dtype in sorted(by_dtype, key=lambda d: d.name):
        group = by_dtype[dtype]
        values = [tf.convert_to_tensor(variable) for variable in group]
        # [n_1], [n_2], ... -> [sum n_i]
        packed = tf.concat([tf.reshape(value, [-1]) for value in values], axis=0)
        packed = hvd.broadcast(packed, root_rank, name=f"syncbn_broadcast_variables_{dtype.name}")
        sizes = [value.shape.num_elements() for value in values]
        for variable, value, flat in zip(group, values, tf.split(packed, sizes)):  # -> [n_i]
            variable.assign(tf.reshape(flat, value.shape))


def allreduce_gradients(grads, op="average"):
    """Averages (or sums) gradients over all ranks with one fused all-reduce.

    The Keras 3 replacement for `hvd.DistributedGradientTape`: call it on the
    result of `tape.gradient(...)`, eagerly or inside a `tf.function`, then
    apply. `None` entries stay `None` (every rank must have them at the same
    positions, as it does with the same model); `tf.IndexedSlices` (embedding
    gradients) are gathered, as Horovod does. All dense gradients travel in
    one `hvd.grouped_allreduce`.

    Average is Horovod's convention: with each rank's loss the mean over its
    own batch, the averaged gradient is that of the mean of the per-rank
    losses (see the module docstring for SyncBatchNormalization).

    Args:
        grads: list or tuple of gradient tensors, `tf.IndexedSlices` or None.
        op: `"average"` (default) or `"sum"`.

    Returns:
        A list of the reduced gradients, in the same order.

    Raises:
        TypeError: if `grads` is not a list or tuple of tensors/None.
        ValueError: if `op` is not `"average"` or `"sum"`.
        RuntimeError: if Horovod is missing or not initialized.

    Example:

    ```python
    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = keras.losses.mean_squared_error(y, model(x, training=True))
            loss = tf.reduce_mean(loss)
        grads = tape.gradient(loss, model.trainable_variables)
        grads = hk.allreduce_gradients(grads)
        optimizer.apply(grads, model.trainable_variables)
        return loss
    ```
    """
    _check_sequence(
        "grads", grads,
        lambda grad: grad is None or tf.is_tensor(grad) or isinstance(grad, tf.IndexedSlices),
        "gradients (tensors, tf.IndexedSlices or None)")
    if op not in OPS:
        raise ValueError(f"Argument `op` must be one of {OPS}. Received: op={op!r}")
    hvd = _hvd()
    grads = list(grads)
    if hvd.size() == 1:
        return grads
    positions = [index for index, grad in enumerate(grads) if grad is not None]
    if not positions:
        return grads
    reduced = hvd.grouped_allreduce(
        [grads[index] for index in positions],
        op=hvd.Average if op == "average" else hvd.Sum,
        # Eager ops need a name to be matched across ranks; traced ones get one from their inputs.
        name="syncbn_allreduce_gradients" if tf.executing_eagerly() else None,
    )
    for index, grad in zip(positions, reduced):
        grads[index] = grad
    return grads


_DISTRIBUTED_CLASSES = {}


def _distributed_class(base):
    """A subclass of `base` whose `apply` averages the gradients first.

    It keeps `base`'s name and module so that saving stores `base` itself.
    """
    if getattr(base, "_syncbn_allreduces_gradients", False):
        return base
    if base not in _DISTRIBUTED_CLASSES:

        def apply(self, grads, trainable_variables=None):
            # `apply_gradients` and `model.fit` both come through here.
            return base.apply(self, allreduce_gradients(list(grads)), trainable_variables)

        _DISTRIBUTED_CLASSES[base] = type(
            base.__name__,
            (base,),
            {
                "apply": apply,
                "_syncbn_allreduces_gradients": True,
                "__module__": base.__module__,
                "__qualname__": base.__qualname__,
                "__doc__": base.__doc__,
            },
        )
    return _DISTRIBUTED_CLASSES[base]


def DistributedOptimizer(optimizer):  # noqa: N802 -- Horovod's name, for drop-in migration.
    """A copy of `optimizer` that averages gradients over all ranks before applying.

    The result is an instance of a subclass of `type(optimizer)` (so
    `isinstance(result, keras.optimizers.Adam)` holds) whose `apply` (and so
    `apply_gradients` and `model.fit`'s train step, inside its `tf.function`)
    first calls `allreduce_gradients(grads)`: one fused `hvd.grouped_allreduce`
    of all gradients, averaged. Clipping (`clipnorm`, `global_clipnorm`), loss
    scaling and weight decay then act on the averaged gradients, identically on
    every rank.

    It is built from `optimizer.get_config()`; if `optimizer` is already built
    (e.g. it comes from `keras.models.load_model`), its variables (iterations,
    moments, ...) are copied too. `optimizer` itself is left unchanged.

    Saving: `get_config()` is the wrapped optimizer's own, and a saved model
    records the plain class (e.g. `Adam`), as Horovod's wrapper did. A loaded
    model's optimizer therefore no longer averages; wrap it again, keeping its
    state:

    ```python
    model = keras.models.load_model("model.keras")
    model.optimizer = hk.DistributedOptimizer(model.optimizer)
    ```

    Args:
        optimizer: a `keras.optimizers.Optimizer` instance.

    Returns:
        The distributed optimizer.

    Raises:
        TypeError: if `optimizer` is not a Keras optimizer instance.
        RuntimeError: if the Keras backend is not TensorFlow.

    Example:

    ```python
    model.compile(optimizer=hk.DistributedOptimizer(keras.optimizers.Adam(1e-3 * hk.size())),
                  loss="sparse_categorical_crossentropy", jit_compile=False)
    ```
    """
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(
            "Argument `optimizer` must be a `keras.optimizers.Optimizer` instance "
            f"(e.g. `keras.optimizers.Adam()`). Received: optimizer={_describe(optimizer)}"
        )
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "DistributedOptimizer needs the TensorFlow Keras backend (Horovod's "
            f"TensorFlow ops). Received: KERAS_BACKEND={keras.backend.backend()!r}"
        )
    distributed = _distributed_class(type(optimizer)).from_config(optimizer.get_config())
    if optimizer.built:
        distributed.build(optimizer._trainable_variables)
        for target, source in zip(distributed.variables, optimizer.variables):
            target.assign(source)
    return distributed


class BroadcastInitialState(keras.callbacks.Callback):
    """Broadcasts the model's weights and optimizer state from `root_rank` when training starts.

    At the first `on_train_begin`, it builds the optimizer if Keras has not
    yet (Keras 3 creates optimizer variables lazily), then calls
    `broadcast_variables(model.weights + optimizer.variables, root_rank)`: all
    weights (including SyncBatchNormalization's moving statistics) and the
    optimizer's iterations, learning rate and slots (e.g. Adam's moments).
    Later `fit` calls find the ranks already in step and broadcast nothing.
    Use it when ranks initialize differently or only the root restored a
    checkpoint.

    Args:
        root_rank: the rank whose state wins (default 0).

    Raises:
        TypeError: if `root_rank` is not an integer.
        ValueError: if `root_rank` is negative (or, at train begin, not a
            rank of the job).

    Example:

    ```python
    model.fit(x, y, callbacks=[hk.BroadcastInitialState(), hk.MetricAverage()])
    ```
    """

    def __init__(self, root_rank=0):
        super().__init__()
        self.root_rank = _check_root_rank(root_rank)
        self.broadcast_done = False

    def on_train_begin(self, logs=None):
        if self.broadcast_done:
            return
        variables = list(self.model.weights)
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None:
            if not optimizer.built:
                optimizer.build(self.model.trainable_variables)
            variables += list(optimizer.variables)
        broadcast_variables(variables, self.root_rank)
        self.broadcast_done = True


class MetricAverage(keras.callbacks.Callback):
    """Averages the epoch-end logs (loss, metrics, `val_*`) over all ranks.

    Every rank then reports, and the callbacks after it (checkpointing,
    early stopping, the progress bar, `History`) see, the same numbers. All
    numeric values travel in one float64 `hvd.allreduce`. Put it before the
    callbacks that read the logs.

    The average of per-rank means is the global mean when the ranks saw the
    same number of samples (true for equal shards); for other metrics (AUC,
    precision) it is an approximation, as with Horovod's
    `MetricAverageCallback`.

    Example:

    ```python
    history = model.fit(x, y, callbacks=[hk.MetricAverage()])
    # history.history["loss"] is the same on every rank.
    ```
    """

    def on_epoch_end(self, epoch, logs=None):
        if not logs:
            return
        hvd = _hvd()
        if hvd.size() == 1:
            return
        # Same order on every rank, so position i means the same metric everywhere.
        names = sorted(
            name for name, value in logs.items()
            if isinstance(value, numbers.Real) and not isinstance(value, bool)
        )
        packed = tf.constant([float(logs[name]) for name in names], tf.float64)  # -> [num_metrics]
        averaged = hvd.allreduce(packed, op=hvd.Average, name="syncbn_metric_average").numpy()
        for name, value in zip(names, averaged):
            logs[name] = float(value)


class ConsistentModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """`keras.callbacks.ModelCheckpoint` that checks the replicas agree before the chief saves.

    Give it to `fit` on *every* rank (not through `chief_only`): whenever a
    checkpoint is due (each epoch, or each `save_freq` batches, decided the
    same way on every rank), all ranks first run
    `syncbn.check_consistency(model, strict=True)`, one collective, and then
    only the chief saves. If some SyncBatchNormalization's `gamma`, `beta`
    or moving statistics differ across replicas, every rank raises
    `syncbn.InconsistentReplicasError` naming the layers, and no checkpoint
    is written from the diverged job. Arguments are ModelCheckpoint's, plus:

    Args:
        tolerance: relative tolerance of the check (default 1e-6).

    Example:

    ```python
    model.fit(x, y, callbacks=[hk.BroadcastInitialState(), hk.MetricAverage(),
                               hk.ConsistentModelCheckpoint("best.keras", save_best_only=True)])
    ```
    """

    def __init__(self, filepath, *args, tolerance=None, **kwargs):
        super().__init__(filepath, *args, **kwargs)
        from syncbn import consistency

        self.tolerance = consistency.DEFAULT_TOLERANCE if tolerance is None else tolerance
        self.checks = 0

    def _save_model(self, epoch, batch, logs):
        from syncbn import consistency

        consistency.check_consistency(self.model, strict=True, tolerance=self.tolerance)
        self.checks += 1
        if is_chief():
            super()._save_model(epoch, batch, logs)
