"""What one SyncBatchNormalization layer adds to a traced training step.

Structural checks, not timings: the op types of a traced forward + backward
step (the function's graph and every function in its library, so the
branches of a `tf.cond` count too), minus those of the same step without the
layer. No path, whatever `nonfinite`, may hold control flow (a `tf.cond` on
data becomes Switch/Merge, which on a GPU copies its predicate back to the
host) or a host callback (`tf.py_function`, which makes the step wait for
Python), and the op count stays near Keras's BatchNormalization's.
"""

import collections

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import KERNELS, kernels_env
from syncbn import SyncBatchNormalization, ops
from syncbn.collectives import PretendReplicas

pytestmark = pytest.mark.unit

CONTROL_FLOW = {"If", "StatelessIf", "Switch", "Merge", "While", "StatelessWhile", "Case",
                "StatelessCase"}
HOST_CALLBACKS = {"EagerPyFunc", "PyFunc", "PyFuncStateless"}
SHAPE = (8, 6, 6, 16)


def _op_types(concrete_function):
    graph_def = concrete_function.graph.as_graph_def()
    types = [node.op for node in graph_def.node]
    for function in graph_def.library.function:
        types += [node.op for node in function.node_def]
    return collections.Counter(types)


def _traced_step_op_types(layer, shape, axis=-1, masked=False, static_batch=False):
    """Op types of `tape.gradient(sum(layer(x)**2), [x, *weights])`, minus the same without a layer.

    The batch size is unknown when tracing unless `static_batch` (a model
    traced on a concrete batch knows it, and then its counts cost no op).
    """
    mask_shape = shape[:-1]  # Keras's convention, whatever the channel axis

    def traced(apply):
        @tf.function
        def step(x, mask):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = apply(x, mask)
                loss = tf.reduce_sum(y * y)
            return tape.gradient(loss, [x] + (layer.trainable_weights if layer else []))

        batch = shape[0] if static_batch else None
        return _op_types(step.get_concrete_function(
            tf.TensorSpec((batch,) + shape[1:]), tf.TensorSpec((batch,) + mask_shape[1:], tf.bool)))

    layer.build(shape)
    with_layer = traced(lambda x, mask: layer(x, training=True, mask=mask if masked else None))
    layer_free = traced(lambda x, mask: x)
    with_layer.subtract(layer_free)
    return +with_layer


PATHS = {
    # name: (layer factory, shape, axis, masked, fused kernels possible)
    "one replica, channels last": (lambda: SyncBatchNormalization(communicator="local"),
                                   SHAPE, -1, False, True),
    "synchronized, channels last": (lambda: SyncBatchNormalization(communicator=PretendReplicas(2)),
                                    SHAPE, -1, False, True),
    "one replica, channels first": (lambda: SyncBatchNormalization(axis=1, communicator="local"),
                                    (8, 16, 6, 6), 1, False, False),
    "synchronized, masked": (lambda: SyncBatchNormalization(communicator=PretendReplicas(2)),
                             (8, 5, 16), -1, True, False),
    # A Keras mask with channels on axis 1: a count per channel.
    "synchronized, masked, channels first": (
        lambda: SyncBatchNormalization(axis=1, communicator=PretendReplicas(2)),
        (8, 16, 6, 6), 1, True, False),
    "one replica, channels last, renorm": (
        lambda: SyncBatchNormalization(communicator="local", renorm=True,
                                       renorm_clipping={"rmax": 3.0, "dmax": 5.0}),
        SHAPE, -1, False, True),
    "synchronized, channels last, renorm": (
        lambda: SyncBatchNormalization(communicator=PretendReplicas(2), renorm=True,
                                       renorm_clipping={"rmax": 3.0, "dmax": 5.0}),
        SHAPE, -1, False, True),
    "synchronized, masked, channels first, renorm": (
        lambda: SyncBatchNormalization(axis=1, communicator=PretendReplicas(2), renorm=True),
        (8, 16, 6, 6), 1, True, False),
}


@pytest.mark.parametrize("nonfinite", ["update", "raise", "skip"])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_no_control_flow_on_any_path(path, nonfinite, kernels):
    make_layer, shape, axis, masked, fusable = PATHS[path]
    layer = make_layer()
    layer.nonfinite = nonfinite
    types = _traced_step_op_types(layer, shape, axis, masked)
    assert not CONTROL_FLOW & set(types), types
    assert not HOST_CALLBACKS & set(types), types
    if nonfinite == "skip":
        # The skip is a select and a counter (the warning is logged off the step).
        assert types["AssignAddVariableOp"] == 1 and types["SelectV2"] >= 2, types
    # The count saw the layer's own ops (it cannot pass on an empty count).
    if fusable and kernels == "fused":
        assert types["FusedBatchNormGradV3"] == 1, types
    else:
        assert types["Rsqrt"] >= 1 and "FusedBatchNormV3" not in types, types


def test_check_sees_a_cond_on_data():
    # Negative control: a layer with a data-dependent tf.cond is flagged.
    class CondLayer(keras.layers.Layer):
        def build(self, input_shape):
            self.gamma = self.add_weight(shape=(input_shape[-1],), initializer="ones")

        def call(self, x, training=None, mask=None):
            return tf.cond(tf.reduce_sum(x) > 0, lambda: x * self.gamma, lambda: -x * self.gamma)

    types = _traced_step_op_types(CondLayer(), SHAPE)
    assert CONTROL_FLOW & set(types), types


def test_check_sees_a_host_callback():
    # Negative control: a layer that calls back into Python is flagged.
    class CallbackLayer(keras.layers.Layer):
        def build(self, input_shape):
            self.gamma = self.add_weight(shape=(input_shape[-1],), initializer="ones")

        def call(self, x, training=None, mask=None):
            tf.py_function(lambda: None, [], [])
            return x * self.gamma

    types = _traced_step_op_types(CallbackLayer(), SHAPE)
    assert HOST_CALLBACKS & set(types), types


@pytest.mark.parametrize("static_batch", [False, True], ids=["batch unknown", "batch static"])
def test_ops_per_layer_stay_near_keras_batch_normalization(kernels, static_batch):
    # Keras BatchNormalization adds about 90 ops here. The design with a
    # tf.cond per sub-step added 2.9x (one replica) and 4.0x (synchronized)
    # as many, its branch functions included; the first branch-free design
    # 1.2x and 1.6x. The default nonfinite='skip' adds its counter (a few ops).
    def ops(layer):
        return sum(_traced_step_op_types(layer, SHAPE, static_batch=static_batch).values())

    keras_ops = ops(keras.layers.BatchNormalization())
    single = ops(SyncBatchNormalization(communicator="local"))
    synced = ops(SyncBatchNormalization(communicator=PretendReplicas(2)))
    assert single <= 1.05 * keras_ops, (single, keras_ops)
    assert synced <= 1.45 * keras_ops, (synced, keras_ops)


@pytest.mark.parametrize("static_batch", [False, True], ids=["batch unknown", "batch static"])
def test_renorm_ops_per_layer_stay_near_keras_renorm(kernels, static_batch):
    # Batch renormalization: r and d from the statistics the op already has (an
    # effective gamma and beta), and Keras's five moving weights. Keras's renorm
    # layer adds about 140 ops here; with the element-wise kernels syncbn's one
    # replica adds about as many, the synchronized layer 1.25x.
    def ops(layer):
        return sum(_traced_step_op_types(layer, SHAPE, static_batch=static_batch).values())

    clipping = {"rmax": 3.0, "rmin": 0.3, "dmax": 5.0}
    keras_ops = ops(keras.layers.BatchNormalization(renorm=True, renorm_clipping=clipping))
    single = ops(SyncBatchNormalization(communicator="local", renorm=True,
                                        renorm_clipping=clipping))
    synced = ops(SyncBatchNormalization(communicator=PretendReplicas(2), renorm=True,
                                        renorm_clipping=clipping))
    plain = ops(SyncBatchNormalization(communicator="local"))
    assert single > plain + 30, (single, plain)  # the count saw the renorm ops
    # The one-replica fused kernels (GPUs, large tensors) apply r and d in an extra
    # affine op, whose gradient autodiff writes out.
    assert single <= (1.05 if kernels == "elementwise" else 1.1) * keras_ops, (single, keras_ops)
    assert synced <= 1.35 * keras_ops, (synced, keras_ops)


def test_kernels_follow_the_device_the_size_and_syncbn_kernels(monkeypatch):
    monkeypatch.delenv("SYNCBN_KERNELS", raising=False)
    small = tf.zeros([8, 4, 4, 16])
    large = tf.TensorSpec([None, 1024, 512, 4])  # 2M values per sample: fused with one replica
    assert ops.FUSED_MIN_VALUES_ON_CPU == 1024 * 512 * 4
    assert ops.kernels_for(small) == ops.kernels_for(small, single_replica=True) == "elementwise"
    assert ops.kernels_for(large, single_replica=True) == "fused"
    assert ops.kernels_for(large, single_replica=False) == "elementwise"
    one = _traced_step_op_types(SyncBatchNormalization(communicator="local"), (2, 1024, 512, 4))
    synced = _traced_step_op_types(SyncBatchNormalization(communicator=PretendReplicas(2)),
                                   (2, 1024, 512, 4))
    assert one["FusedBatchNormV3"] == 1 and "FusedBatchNormV3" not in synced, (one, synced)
    monkeypatch.setenv("SYNCBN_KERNELS", "fused")
    assert ops.kernels_for(small) == "fused"
    monkeypatch.setenv("SYNCBN_KERNELS", "Elementwise")
    assert ops.kernels_for(large, single_replica=True) == "elementwise"
    monkeypatch.setenv("SYNCBN_KERNELS", "gpu")
    with pytest.raises(ValueError, match=r"SYNCBN_KERNELS must be one of auto, fused, "
                                         r"elementwise\. Received: SYNCBN_KERNELS='gpu'"):
        ops.kernels_for(small)


def test_shifted_kernels_stay_exact_with_one_and_no_sample(kernels):
    # The selects that replace the old `count < 2` branch: a batch of one
    # normalizes to beta with zero variance, an empty one updates nothing.
    for communicator in ("local", PretendReplicas(2)):
        layer = SyncBatchNormalization(momentum=0.5, communicator=communicator,
                                       beta_initializer="ones")
        layer.build((None, 3))
        one = tf.constant([[1e4, 2.0, -3.0]])
        np.testing.assert_allclose(layer(one, training=True).numpy(), 1.0, atol=1e-6)
        np.testing.assert_allclose(layer.moving_mean.numpy(), [5e3, 1.0, -1.5])
        np.testing.assert_allclose(layer.moving_variance.numpy(), 0.5)
        empty = tf.zeros((0, 3))
        with tf.GradientTape() as tape:
            tape.watch(empty)
            y = layer(empty, training=True)
        grads = tape.gradient(y, [empty, layer.gamma, layer.beta])
        assert y.shape == (0, 3)
        np.testing.assert_array_equal(grads[1].numpy(), 0.0)
        np.testing.assert_array_equal(grads[2].numpy(), 0.0)
        np.testing.assert_allclose(layer.moving_mean.numpy(), [5e3, 1.0, -1.5])
        assert np.isfinite(layer.moving_variance.numpy()).all()


def print_node_counts(shape=(8, 16, 16, 32)):
    """The per-layer counts of docs/performance.md's "Node counts" table."""
    channels_first = (shape[0], shape[-1]) + shape[1:-1]
    rows = [("keras.layers.BatchNormalization", keras.layers.BatchNormalization, shape, -1),
            ("keras.layers.BatchNormalization(synchronized=True)",
             lambda: keras.layers.BatchNormalization(synchronized=True), shape, -1),
            ("keras.layers.BatchNormalization(renorm=True)",
             lambda: keras.layers.BatchNormalization(renorm=True), shape, -1),
            ("syncbn, one replica, renorm=True",
             lambda: SyncBatchNormalization(communicator="local", renorm=True), shape, -1),
            ("syncbn, synchronized, renorm=True",
             lambda: SyncBatchNormalization(communicator=PretendReplicas(2), renorm=True),
             shape, -1)]
    for nonfinite in ("skip", "update", "raise"):
        rows += [
            (f"syncbn, one replica, nonfinite={nonfinite!r}",
             lambda n=nonfinite: SyncBatchNormalization(communicator="local", nonfinite=n),
             shape, -1),
            (f"syncbn, synchronized, nonfinite={nonfinite!r}",
             lambda n=nonfinite: SyncBatchNormalization(communicator=PretendReplicas(2),
                                                        nonfinite=n), shape, -1),
            (f"syncbn, element-wise (axis=1), nonfinite={nonfinite!r}",
             lambda n=nonfinite: SyncBatchNormalization(axis=1, communicator="local",
                                                        nonfinite=n), channels_first, 1),
        ]
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, input {shape[1:]}; "
          f"ops with the batch unknown / static ({shape[0]}), then control flow and callbacks")
    for kernels in KERNELS:
        print(f"SYNCBN_KERNELS={kernels} (syncbn's channels-last rows)")
        with kernels_env(kernels):
            for name, make_layer, layer_shape, axis in rows:
                types, static_types = (
                    _traced_step_op_types(make_layer(), layer_shape, axis, static_batch=static)
                    for static in (False, True))
                flagged = {op: n for op, n in types.items() if op in CONTROL_FLOW | HOST_CALLBACKS}
                print(f"  {name:60s} {sum(types.values()):4d} / {sum(static_types.values()):4d}"
                      f"  {flagged or 'none'}")


if __name__ == "__main__":
    print_node_counts()
