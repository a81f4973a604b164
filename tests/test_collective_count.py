"""Collectives per step: exactly two per BN layer in training, none at inference.

`syncbn.collectives.counting.CountingCommunicator` counts `all_sum` calls that *run*: each call adds a
`tf.py_function` whose side effect increments a Python counter, tied to the
returned sum by a control dependency. A call that is only traced (e.g. the
training branch of a `tf.cond` on a `training` tensor that is False) does not
count, so the counts are those of the executed graph, eagerly, inside
`tf.function`, in `model.fit` / `model.predict` and under MirroredStrategy.

A single process has one replica, which would make the layer skip
communication altogether; the counting communicator then says it has 2
replicas and returns its input unchanged, so the synchronized path runs.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import NUM_VIRTUAL_CPUS
from syncbn import SyncBatchNormalization, ops
from syncbn.collectives.counting import CountingCommunicator

NUM_BN = 3
BATCH = 8

pytestmark = pytest.mark.unit
IMAGE_SHAPE = (6, 6, 3)


def make_model(communicator):
    """Three SyncBatchNormalization layers: two after convolutions, one after a Dense."""
    layers = keras.layers
    return keras.Sequential([
        keras.Input(IMAGE_SHAPE),
        layers.Conv2D(4, 3, padding="same", use_bias=False),
        SyncBatchNormalization(communicator=communicator, name="bn_conv1"),
        layers.ReLU(),
        layers.Conv2D(4, 3, padding="same", use_bias=False),
        SyncBatchNormalization(communicator=communicator, name="bn_conv2"),
        layers.ReLU(),
        layers.GlobalAveragePooling2D(),
        layers.Dense(5),
        SyncBatchNormalization(communicator=communicator, name="bn_dense"),
        layers.Dense(1),
    ])


def data(num_samples=BATCH, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(num_samples,) + IMAGE_SHAPE).astype(np.float32),
            rng.normal(size=(num_samples, 1)).astype(np.float32))


def assert_one_forward_one_backward_per_layer(counter, steps, replicas=1):
    expected = {}
    for layer in ("bn_conv1", "bn_conv2", "bn_dense"):
        expected[f"syncbn/{layer}/forward"] = steps * replicas
        expected[f"syncbn/{layer}/backward"] = steps * replicas
    assert dict(counter.calls) == expected


def train_step_fn(model, optimizer):
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
def test_two_collectives_per_layer_per_training_step(compiled):
    counter = CountingCommunicator()
    model = make_model(counter)
    step = train_step_fn(model, keras.optimizers.SGD(0.01))
    if compiled:
        step = tf.function(step)
    x, y = data()
    steps = 3
    for _ in range(steps):
        step(tf.constant(x), tf.constant(y))
    assert counter.total == 2 * NUM_BN * steps
    assert_one_forward_one_backward_per_layer(counter, steps)


def test_forward_alone_makes_one_collective_per_layer():
    counter = CountingCommunicator()
    model = make_model(counter)
    model(data()[0], training=True)
    assert counter.total == NUM_BN
    assert all(name.endswith("/forward") for name in counter.calls)


def test_fit_makes_two_collectives_per_layer_per_step_and_predict_none():
    counter = CountingCommunicator()
    model = make_model(counter)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", jit_compile=False)
    x, y = data(num_samples=4 * BATCH)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    steps = len(x) // BATCH
    assert counter.total == 2 * NUM_BN * steps
    assert_one_forward_one_backward_per_layer(counter, steps)

    counter.reset()
    model.predict(x, batch_size=BATCH, verbose=0)
    model(x, training=False)
    model.evaluate(x, y, batch_size=BATCH, verbose=0)
    assert counter.total == 0


def test_training_tensor_counts_only_the_branch_that_runs():
    # Both branches of the layer's tf.cond are traced; only the executed one counts.
    counter = CountingCommunicator()
    model = make_model(counter)
    x, _ = data()

    @tf.function
    def forward_backward(x, training):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(model(x, training=training))
        return tape.gradient(loss, x)

    forward_backward(tf.constant(x), tf.constant(False))
    assert counter.total == 0
    forward_backward(tf.constant(x), tf.constant(True))
    assert counter.total == 2 * NUM_BN


def test_frozen_layers_communicate_nothing():
    counter = CountingCommunicator()
    model = make_model(counter)
    for layer in model.layers:
        if isinstance(layer, SyncBatchNormalization):
            layer.trainable = False
    step = tf.function(train_step_fn(model, keras.optimizers.SGD(0.01)))
    step(*map(tf.constant, data()))
    assert counter.total == 0


def test_counter_sees_an_extra_collective(monkeypatch):
    # The counts above could not pass by accident: a third collective per layer shows.
    original = ops.sync_batch_norm

    def with_extra_collective(x, gamma, beta, *, all_sum, name, **kwargs):
        all_sum(tf.zeros([1]), name + "/extra")
        return original(x, gamma, beta, all_sum=all_sum, name=name, **kwargs)

    monkeypatch.setattr(ops, "sync_batch_norm", with_extra_collective)
    counter = CountingCommunicator()
    model = make_model(counter)
    tf.function(train_step_fn(model, keras.optimizers.SGD(0.01)))(*map(tf.constant, data()))
    assert counter.total == 3 * NUM_BN


def _tf_distribute_counter():
    from syncbn.collectives.tf_distribute import TFDistributeCommunicator

    return CountingCommunicator(NUM_VIRTUAL_CPUS, TFDistributeCommunicator)


def test_mirrored_custom_loop_two_collectives_per_layer_per_replica(mirrored_strategy):
    strategy = mirrored_strategy
    with strategy.scope():
        counter = _tf_distribute_counter()
        model = make_model(counter)
        optimizer = keras.optimizers.SGD(0.01)
    step = train_step_fn(model, optimizer)

    @tf.function
    def distributed_step(x, y):
        return strategy.run(step, args=(x, y))

    x, y = data(num_samples=NUM_VIRTUAL_CPUS * BATCH)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(NUM_VIRTUAL_CPUS * BATCH)
    steps = 2
    for _ in range(steps):
        for batch in strategy.experimental_distribute_dataset(dataset):
            distributed_step(*batch)
    assert counter._delegate is not None  # the real communicator summed
    assert counter.total == 2 * NUM_BN * steps * NUM_VIRTUAL_CPUS
    assert_one_forward_one_backward_per_layer(counter, steps, replicas=NUM_VIRTUAL_CPUS)


def test_mirrored_fit_and_predict(mirrored_strategy):
    strategy = mirrored_strategy
    with strategy.scope():
        counter = _tf_distribute_counter()
        model = make_model(counter)
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", jit_compile=False)
    global_batch = NUM_VIRTUAL_CPUS * BATCH
    x, y = data(num_samples=2 * global_batch)
    model.fit(x, y, batch_size=global_batch, epochs=1, shuffle=False, verbose=0)
    steps = len(x) // global_batch
    assert counter.total == 2 * NUM_BN * steps * NUM_VIRTUAL_CPUS
    assert_one_forward_one_backward_per_layer(counter, steps, replicas=NUM_VIRTUAL_CPUS)

    counter.reset()
    model.predict(x, batch_size=global_batch, verbose=0)
    assert counter.total == 0
