"""`syncbn.convert`: every BatchNormalization becomes SyncBatchNormalization and back.

Contract tests in one process (keras.applications models, Sequential,
Functional, nested and shared sub-models, subclassed models, bad input,
saving, mixed precision); tests/test_convert_multiprocess.py trains a
converted model on real Horovod ranks.
"""

import logging

import keras
import numpy as np
import pytest

import syncbn

pytestmark = pytest.mark.unit

OUTPUT_TOLERANCE = 1e-6

BN = keras.layers.BatchNormalization
SYNC_BN = syncbn.SyncBatchNormalization


def all_layers(model):
    return model._flatten_layers(include_self=False)


def count_exact(model, layer_class):
    # Exact class: SyncBatchNormalization is not a BatchNormalization subclass,
    # but a count of either must not include the other by accident.
    return sum(type(layer) is layer_class for layer in all_layers(model))


def randomize_bn_state(model, seed=0):
    """Non-trivial gamma/beta/moving statistics, so that copying them matters."""
    rng = np.random.default_rng(seed)
    for layer in all_layers(model):
        if isinstance(layer, (BN, SYNC_BN)) and layer.built:
            layer.set_weights([
                rng.uniform(0.5, 2.0, w.shape).astype(w.dtype) if "variance" in v.path
                else rng.normal(0.0, 0.5, w.shape).astype(w.dtype)
                for v, w in zip(layer.weights, layer.get_weights())
            ])
    return model


def max_abs_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def assert_same_weights(original, converted):
    original_weights, converted_weights = original.get_weights(), converted.get_weights()
    assert len(original_weights) == len(converted_weights)
    for a, b in zip(original_weights, converted_weights):
        np.testing.assert_array_equal(a, b)


def images(shape, batch=2, seed=1):
    return np.random.default_rng(seed).normal(size=(batch,) + tuple(shape)).astype(np.float32)


def conv_bn(filters, name=None):
    return [keras.layers.Conv2D(filters, 3, padding="same", use_bias=False),
            keras.layers.BatchNormalization(name=name)]


# -- keras.applications ------------------------------------------------------

APPLICATIONS = {
    "ResNet50": dict(input_shape=(32, 32, 3)),
    "MobileNetV2": dict(input_shape=(32, 32, 3), alpha=0.35),
    "EfficientNetB0": dict(input_shape=(32, 32, 3)),
}


@pytest.mark.parametrize("name", sorted(APPLICATIONS))
def test_application_converts_every_bn_and_back(name):
    # The applications' own softmax outputs. Their logits differ by about
    # 1e-6 in absolute terms (EfficientNetB0: 1.07e-6 in one run), since
    # SyncBatchNormalization's inference computes (x - mean) * scale + beta
    # and rounds differently from Keras; the round trip back is bit-exact.
    model = getattr(keras.applications, name)(weights=None, classes=10, **APPLICATIONS[name])
    randomize_bn_state(model)
    num_bn = count_exact(model, BN)
    assert num_bn > 40  # the parametrization really built the application

    converted = syncbn.convert(model)
    assert count_exact(converted, SYNC_BN) == num_bn
    assert count_exact(converted, BN) == 0
    assert len(converted.syncbn_converted_layers) == num_bn
    assert_same_weights(model, converted)

    x = images(APPLICATIONS[name]["input_shape"])
    expected = model(x, training=False)
    diff = max_abs_diff(converted(x, training=False), expected)
    print(f"{name}: {num_bn} BN layers converted, max abs output diff {diff:.3g}")
    assert diff <= OUTPUT_TOLERANCE

    exported = syncbn.convert(converted, to="local")
    assert count_exact(exported, BN) == num_bn
    assert count_exact(exported, SYNC_BN) == 0
    assert len(exported.syncbn_converted_layers) == num_bn
    assert_same_weights(model, exported)
    assert max_abs_diff(exported(x, training=False), expected) <= OUTPUT_TOLERANCE


# -- model kinds --------------------------------------------------------------


def sequential_model():
    return keras.Sequential(
        [keras.Input((8, 8, 3)), *conv_bn(4), keras.layers.ReLU(), *conv_bn(5),
         keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3),
         keras.layers.BatchNormalization()],
        name="sequential_bn",
    )


def functional_model():
    inputs = keras.Input((8, 8, 3))
    left = keras.layers.BatchNormalization(name="left_bn")(inputs)
    right = keras.layers.BatchNormalization(axis=1, momentum=0.5, epsilon=0.1, center=False,
                                            name="right_bn")(inputs)
    x = keras.layers.Concatenate()([left, right])
    x = keras.layers.Conv2D(4, 1)(x)
    return keras.Model(inputs, keras.layers.BatchNormalization(scale=False)(x), name="functional_bn")


def nested_model():
    """BN at three levels: Functional > Sequential > Functional."""
    inner_input = keras.Input((8, 8, 4))
    inner = keras.Model(inner_input, keras.Sequential(conv_bn(4))(inner_input), name="level3")
    middle = keras.Sequential([keras.Input((8, 8, 3)), *conv_bn(4), inner], name="level2")
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.BatchNormalization(name="level1_bn")(middle(inputs))
    return keras.Model(inputs, outputs, name="level1")


def shared_submodel_model():
    """One sub-model with BN called on two inputs: one set of weights."""
    block = keras.Sequential([keras.Input((8, 8, 3)), *conv_bn(4, name="shared_bn")],
                             name="shared_block")
    first, second = keras.Input((8, 8, 3)), keras.Input((8, 8, 3))
    outputs = keras.layers.Add()([block(first), block(second)])
    return keras.Model([first, second], keras.layers.BatchNormalization()(outputs), name="shared")


MODELS = {
    "sequential": (sequential_model, 3),
    "functional": (functional_model, 3),
    "nested": (nested_model, 3),
    "shared_submodel": (shared_submodel_model, 2),
}


def model_inputs(model):
    shapes = [tuple(t.shape[1:]) for t in model.inputs]
    return [images(shape, seed=i) for i, shape in enumerate(shapes)] if len(shapes) > 1 \
        else images(shapes[0])


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_model_kinds_convert_and_round_trip(kind):
    build, num_bn = MODELS[kind]
    model = randomize_bn_state(build())
    assert count_exact(model, BN) == num_bn
    x = model_inputs(model)
    expected = model(x, training=False)

    converted = syncbn.convert(model, group_size=2, communicator="local")
    assert count_exact(converted, SYNC_BN) == num_bn
    assert count_exact(converted, BN) == 0
    assert sorted(converted.syncbn_converted_layers) == sorted(
        layer.name for layer in all_layers(model) if type(layer) is BN)
    assert_same_weights(model, converted)
    assert max_abs_diff(converted(x, training=False), expected) <= OUTPUT_TOLERANCE

    exported = syncbn.convert(converted, to="local")
    assert count_exact(exported, BN) == num_bn and count_exact(exported, SYNC_BN) == 0
    assert_same_weights(model, exported)
    assert max_abs_diff(exported(x, training=False), expected) <= OUTPUT_TOLERANCE


def test_config_is_carried_over_and_extended():
    model = functional_model()
    converted = syncbn.convert(model, group_size=2, communicator="mpi")
    for name in ("left_bn", "right_bn"):
        original_config = model.get_layer(name).get_config()
        config = converted.get_layer(name).get_config()
        assert config["communicator"] == "mpi" and config["group_size"] == 2
        for key, value in original_config.items():
            if key != "synchronized":
                assert config[key] == value, key
    back = syncbn.convert(converted, to="local").get_layer("right_bn").get_config()
    assert back["synchronized"] is False
    assert "communicator" not in back and "group_size" not in back
    assert {k: v for k, v in back.items() if k != "synchronized"} == {
        k: v for k, v in model.get_layer("right_bn").get_config().items() if k != "synchronized"}


def test_converted_model_is_a_copy():
    model = randomize_bn_state(nested_model())
    before = model.get_weights()
    converted = syncbn.convert(model)
    original_ids = {id(layer) for layer in all_layers(model)}
    assert not original_ids & {id(layer) for layer in all_layers(converted)}
    # Training the copy (moving statistics and weights) leaves the original alone.
    converted.compile(optimizer="sgd", loss="mse")
    x = images((8, 8, 3), batch=4)
    converted.fit(x, np.ones((4, 8, 8, 4), np.float32), epochs=1, verbose=0)
    assert any(max_abs_diff(a, b) > 0 for a, b in zip(before, converted.get_weights()))
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_shared_submodel_stays_shared():
    converted = syncbn.convert(shared_submodel_model())
    blocks = [layer for layer in converted.layers if layer.name == "shared_block"]
    assert len(blocks) == 1
    assert len(blocks[0]._inbound_nodes) == 2  # called on both inputs
    assert count_exact(converted, SYNC_BN) == 2


def test_trainable_flags_are_preserved():
    model = nested_model()
    model.get_layer("level2").trainable = False
    model.get_layer("level1_bn").trainable = False
    converted = syncbn.convert(model)
    assert not converted.get_layer("level2").trainable
    assert not converted.get_layer("level2").get_layer("level3").trainable
    assert not converted.get_layer("level1_bn").trainable
    assert converted.trainable and not converted.trainable_weights


def test_frozen_functional_model_stays_frozen():
    model = functional_model()
    model.trainable = False
    assert not syncbn.convert(model).trainable


def test_model_without_bn_is_copied_with_zero_converted(caplog):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)], name="no_bn")
    with caplog.at_level(logging.INFO, logger="syncbn.convert"):
        converted = syncbn.convert(model)
    assert converted is not model and converted.syncbn_converted_layers == []
    assert_same_weights(model, converted)
    assert "Converted 0 layers in model 'no_bn'" in caplog.text


def test_count_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="syncbn.convert"):
        syncbn.convert(sequential_model())
    assert ("Converted 3 BatchNormalization layers to SyncBatchNormalization "
            "in model 'sequential_bn'") in caplog.text


def test_already_synchronized_layers_are_kept():
    model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(),
                              syncbn.SyncBatchNormalization(group_size=4)])
    converted = syncbn.convert(model)
    assert count_exact(converted, SYNC_BN) == 2
    assert converted.layers[1].group_size == 4  # untouched, not overwritten
    assert len(converted.syncbn_converted_layers) == 1


def test_compiled_model_is_recompiled():
    model = sequential_model()
    model.compile(optimizer="adam", loss="mse")
    converted = syncbn.convert(model)
    assert converted.compiled
    assert converted.get_compile_config()["loss"] == "mse"


# -- mixed precision ----------------------------------------------------------


# Machine epsilon of each policy's compute dtype. Keras's BN and syncbn's fused
# kernel round a half-precision output differently (Keras normalizes in float32
# and casts back), so the two agree to an ulp of that dtype, not to float32's.
# With unseeded weights a fresh-clone run once measured 7.9e-6 on mixed_float16.
COMPUTE_EPSILON = {"mixed_float16": 2.0**-10, "mixed_bfloat16": 2.0**-7}


@pytest.mark.parametrize("policy", sorted(COMPUTE_EPSILON))
def test_mixed_precision_policy_is_preserved(policy):
    keras.utils.set_random_seed(0)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        model = keras.Sequential([keras.Input((8, 8, 3)), *conv_bn(4),
                                  keras.layers.BatchNormalization(dtype="float32")])
    finally:
        keras.config.set_dtype_policy(previous)
    randomize_bn_state(model)
    converted = syncbn.convert(model)
    for original, copy in zip(model.layers, converted.layers):
        assert copy.dtype_policy.name == original.dtype_policy.name
    assert converted.layers[1].dtype_policy.name == policy
    assert converted.layers[2].dtype_policy.name == "float32"
    x = images((8, 8, 3))
    expected, actual = model(x, training=False), converted(x, training=False)
    assert actual.dtype == expected.dtype
    # Two ulps of the compute dtype at the output's scale; a wrong statistic or
    # a lost policy is off by orders of magnitude more.
    tolerance = 2 * COMPUTE_EPSILON[policy] * max(1.0, float(np.max(np.abs(expected))))
    assert max_abs_diff(actual, expected) <= tolerance
    back = syncbn.convert(converted, to="local")
    assert [layer.dtype_policy.name for layer in back.layers] == [
        layer.dtype_policy.name for layer in model.layers]


# -- saving -------------------------------------------------------------------


def test_saved_converted_model_loads_and_predicts_the_same(tmp_path):
    model = randomize_bn_state(nested_model())
    converted = syncbn.convert(model)
    path = str(tmp_path / "converted.keras")
    converted.save(path)
    loaded = keras.models.load_model(path)
    assert count_exact(loaded, SYNC_BN) == 3 and count_exact(loaded, BN) == 0
    x = images((8, 8, 3))
    assert max_abs_diff(loaded(x, training=False), converted(x, training=False)) == 0.0
    exported = syncbn.convert(loaded, to="local")
    assert max_abs_diff(exported(x, training=False), model(x, training=False)) <= OUTPUT_TOLERANCE


# -- what cannot be converted -------------------------------------------------


class ResidualBlock(keras.layers.Layer):
    """A custom layer holding its BN layers in a list."""

    def __init__(self, filters=4, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.convs = [keras.layers.Conv2D(filters, 3, padding="same") for _ in range(2)]
        self.norms = [keras.layers.BatchNormalization(name=f"norm_{i}") for i in range(2)]

    def call(self, inputs, training=None):
        x = inputs
        for conv, norm in zip(self.convs, self.norms):
            x = norm(conv(x), training=training)
        return x + inputs

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


class SubclassedNet(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(4, 3)
        self.bn = keras.layers.BatchNormalization(name="sub_bn")

    def call(self, inputs, training=None):
        return self.bn(self.conv(inputs), training=training)


def test_subclassed_model_with_bn_is_refused_with_the_list():
    model = SubclassedNet(name="subnet")
    model(images((8, 8, 3)))
    with pytest.raises(TypeError, match=r"subclassed model SubclassedNet 'subnet'.*sub_bn"):
        syncbn.convert(model)


def test_subclassed_model_without_bn_is_refused():
    class Plain(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, inputs):
            return self.dense(inputs)

    with pytest.raises(TypeError, match="Argument `model` must be a Functional or Sequential"):
        syncbn.convert(Plain())


def test_bn_inside_a_custom_layer_is_refused_with_every_path():
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.BatchNormalization(name="reachable_bn")(inputs)
    model = keras.Model(inputs, ResidualBlock(name="res")(x), name="outer")
    with pytest.raises(TypeError) as error:
        syncbn.convert(model)
    message = str(error.value)
    assert "outer/res/.../norm_0" in message and "outer/res/.../norm_1" in message
    assert "reachable_bn" not in message and "nothing was converted" in message


def test_bn_subclass_and_renorm_are_refused():
    class MyBN(keras.layers.BatchNormalization):
        pass

    model = keras.Sequential([keras.Input((4,)), MyBN(name="custom_bn")], name="m")
    with pytest.raises(TypeError, match=r"m/custom_bn \(MyBN subclasses BatchNormalization"):
        syncbn.convert(model)
    model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(
        renorm=True, name="renorm_bn")], name="r")
    with pytest.raises(ValueError, match=r"r/renorm_bn \(renorm=True is not supported"):
        syncbn.convert(model)


def test_custom_layer_without_bn_is_copied_with_its_weights():
    inputs = keras.Input((8, 8, 4))
    block = keras.layers.Conv2D(4, 3, padding="same")
    model = keras.Model(inputs, keras.layers.BatchNormalization()(block(inputs)))
    normalizer = keras.layers.Normalization(mean=0.5, variance=4.0)
    model = keras.Sequential([keras.Input((8, 8, 4)), normalizer, model])
    converted = syncbn.convert(randomize_bn_state(model))
    x = images((8, 8, 4))
    assert max_abs_diff(converted(x), model(x)) <= OUTPUT_TOLERANCE


# -- bad arguments ------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(to="gpu"), ValueError, r"Argument `to` must be one of \('sync', 'local'\). Received: to='gpu'"),
        (dict(to=None), ValueError, r"Received: to=None"),
        (dict(group_size=0), ValueError, r"Argument `group_size`.*Received: group_size=0"),
        (dict(group_size=2.0), ValueError, r"Received: group_size=2.0"),
        (dict(group_size=True), ValueError, r"Received: group_size=True"),
        (dict(communicator="nccl"), ValueError, r"Argument `communicator`.*Received: communicator='nccl'"),
        (dict(communicator=3), TypeError, r"Argument `communicator`.*Received: communicator=3"),
        (dict(to="local", group_size=2), ValueError, r"only apply to to='sync'.*group_size=2"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        syncbn.convert(sequential_model(), **kwargs)


@pytest.mark.parametrize("value", [None, "resnet", keras.layers.Dense(2)])
def test_model_must_be_a_keras_model(value):
    with pytest.raises(TypeError, match=r"Argument `model` must be a Keras model.*Received: model="):
        syncbn.convert(value)
