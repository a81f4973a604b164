"""Property-based replica equivalence: hypothesis draws the cases, float64 NumPy judges.

Each example draws an input rank (2-5), a channel axis, a dtype (float16,
bfloat16, float32), an optional mask (Keras's convention: the input's shape
without its last axis, so with channels not last each channel has its own
count), four per-replica batch sizes (0 and 1 included), a data offset up to
1e5, a `group_size` and batch renormalization or not, and runs one training
step of `SyncBatchNormalization` on `MirroredStrategy` with 4 in-process
replicas. Channels-last cases without a mask also draw the kernels
(`SYNCBN_KERNELS`: the element-wise ones CPUs run, or the fused ones GPUs
run). Outputs, input gradients, gamma/beta gradients (summed over each
group's replicas) and every replica's moving statistics (renorm's five
moving weights) must match
`tests/reference.py` on each group's samples concatenated.

Profiles (`HYPOTHESIS_PROFILE`):

- `ci` (default): 10 examples for each of the 21 buckets of `CI_BUCKETS`, derandomized,
  so every CI run checks the same 210 cases;
- `thorough`: 5000 random examples, for a local run:
  `HYPOTHESIS_PROFILE=thorough python -m pytest tests/test_properties.py`.

Speed: one traced step per "bucket" (rank, axis, dtype, mask or not,
group_size, renorm), kept across examples with its layer, whose weights are
reset per example; the batch axis of each replica is left unknown in the trace
(`reduce_retracing`), so batch sizes never retrace. The CI profile draws the
bucket from `CI_BUCKETS`, a fixed set that covers every rank, axis position,
dtype, group size and both mask states, with and without renorm; the
thorough profile draws any bucket.
"""

import os

import hypothesis
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import KERNELS, kernels_env, relative_error
from reference import batch_norm, moving_average, renorm_correction, renorm_moving_statistics
from syncbn import SyncBatchNormalization

pytestmark = pytest.mark.unit

NUM_REPLICAS = 4
CHANNELS = 3
SPATIAL = 2  # size of every axis that is neither batch nor channels
MAX_PER_REPLICA = 5
MOMENTUM = 0.8
EPSILON = 1e-3
DTYPES = ("float32", "float16", "bfloat16")
POLICIES = {"float32": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}
GROUP_SIZES = (None, 1, 2)
RENORM_MOMENTUM = 0.6
RENORM_CLIPPING = {"rmax": 1.5, "rmin": 0.7, "dmax": 1.0}

# "ci": every bucket of CI_BUCKETS gets its own examples (10 each, the same every run);
# "thorough": 5000 examples over buckets drawn as well.
settings.register_profile("ci", max_examples=10, derandomize=True, deadline=None,
                          print_blob=True,
                          suppress_health_check=[hypothesis.HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=5000, deadline=None, print_blob=True,
                          suppress_health_check=[hypothesis.HealthCheck.too_slow])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")

# (rank, axis, dtype, masked, group_size, renorm): every rank, first/middle/last
# channel axes (negative and positive spellings), every dtype and group size, with
# and without a mask, in 16 traces; and 5 with batch renormalization (synchronized
# and one replica, channels last and not, masked with per-channel counts).
CI_BUCKETS = (
    (2, -1, "float32", False, None, False), (2, 1, "float16", True, 2, False),
    (2, -1, "bfloat16", False, 1, False), (2, 1, "float32", True, None, False),
    (3, 1, "float32", False, 2, False), (3, -1, "float16", False, None, False),
    (3, 2, "bfloat16", True, None, False), (3, -1, "float32", True, 1, False),
    (4, -1, "float32", False, None, False), (4, 1, "bfloat16", False, 2, False),
    (4, 2, "float16", True, None, False), (4, 3, "float32", True, 2, False),
    (5, -1, "float16", False, 2, False), (5, 2, "float32", False, None, False),
    (5, 1, "float32", True, None, False), (5, -2, "bfloat16", True, 1, False),
    (2, -1, "float32", False, None, True), (3, 1, "float32", True, 2, True),
    (4, -1, "float16", True, 1, True), (4, 2, "bfloat16", False, None, True),
    (5, -1, "float32", False, 1, True),
)


@st.composite
def any_bucket(draw):
    rank = draw(st.integers(2, 5))
    axis = draw(st.integers(1, rank - 1))
    if draw(st.booleans()):
        axis -= rank  # the same axis, spelled negative
    return (rank, axis, draw(st.sampled_from(DTYPES)), draw(st.booleans()),
            draw(st.sampled_from(GROUP_SIZES)), draw(st.booleans()))


# The largest |offset| each dtype can carry with data around it: float16 ends
# at 65504, so its offsets stop at 1e4.
MAX_OFFSET = {"float32": 1e5, "bfloat16": 1e5, "float16": 1e4}
# Relative spacing of each dtype's numbers (its machine epsilon).
EPS = {"float32": 2.0 ** -23, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}


# What the property test runs over: each CI bucket in turn (so every one is
# checked, whatever Hypothesis draws), or, with the "thorough" profile, any bucket.
BUCKETS = CI_BUCKETS if PROFILE == "ci" else (None,)


def _bucket_id(bucket):
    return "any" if bucket is None else "-".join(str(part) for part in bucket)


@st.composite
def cases(draw, bucket=None):
    """A case of `bucket`, or of a bucket drawn from `any_bucket()` when it is None."""
    bucket = draw(any_bucket()) if bucket is None else bucket
    rank, axis, dtype, masked, group_size, _ = bucket
    counts = draw(st.lists(st.integers(0, MAX_PER_REPLICA), min_size=NUM_REPLICAS,
                           max_size=NUM_REPLICAS))
    offset = draw(st.one_of(st.just(0.0), st.sampled_from([1e2, 1e3, 1e4, 1e5]),
                            st.floats(-1e5, 1e5)))
    offset = float(np.clip(offset, -MAX_OFFSET[dtype], MAX_OFFSET[dtype]))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    channels_last = axis % rank == rank - 1 and not masked
    kernels = draw(st.sampled_from(KERNELS)) if channels_last else "elementwise"
    return bucket, counts, offset, seed, kernels


def input_shape(rank, axis, batch):
    shape = [batch] + [SPATIAL] * (rank - 2)
    shape.insert(axis % rank, CHANNELS)
    return tuple(shape)


def data_std(dtype, offset):
    """The data's standard deviation: 1, or enough to stay above the dtype's spacing.

    Around `offset`, a dtype can only tell values apart `EPS * |offset|` apart;
    with a smaller spread the quantized batch would be a handful of values (or
    one), which says nothing about the layer. So float16/bfloat16 data get 16
    steps of their spacing; float32 keeps std 1 up to 1e5 (|mean|/std = 1e5,
    the exact path's design point, see syncbn/ops.py).
    """
    return max(1.0, 16.0 * EPS[dtype] * abs(offset)) if dtype != "float32" else 1.0


def tolerance(dtype, ratio):
    """Largest relative error (max-abs normalized) allowed for one example.

    Args:
        dtype: the input dtype.
        ratio: |offset| / std of the data.

    - The output and input gradient are rounded to `dtype` at the end: half a
      unit in the last place, `EPS / 2`, relative to the largest value; twice
      that covers the float32 work before.
    - float32 work: statistics and gradient sums over at most 20 samples per
      channel, a few dozen float32 roundings: 1e-5.
    - Data off zero: the fused float32 kernels, used while |mean|/std stays under
      `FAR_FROM_ZERO` (1e3), lose about `ratio` float32 ulps in the sum behind
      the mean (8 x for the sums and the normalization after it); past that the
      exact path is taken, whose float64 combine loses `2**-52 * ratio**2`
      (syncbn/stats.py's docstring; 16 x for the moving variance's own
      rounding and the mean's square).
    """
    rounding = EPS[dtype] if dtype != "float32" else 0.0
    fused = 8.0 * EPS["float32"] * min(ratio, 1e3)
    combine = 16.0 * 2.0 ** -52 * ratio ** 2
    return rounding + 1e-5 + fused + combine


def quantized(array, dtype):
    """`array` rounded to `dtype`, as float64: what the layer actually receives."""
    return tf.cast(tf.cast(tf.constant(array), dtype), tf.float64).numpy()


def group_reference(x, dy, mask, gamma, beta, moving, axis, renorm):
    """The float64 reference on one group's samples, with syncbn's rule for no samples.

    A channel with no selected sample in the group (all batches empty, or all
    masked out) normalizes with mean 0 and variance 0, as Keras's layer does,
    and syncbn leaves its moving statistics alone (SyncBatchNormalization
    docstring). Masked-out positions are still normalized, so gamma/beta
    gradients sum over every position, as in `reference.batch_norm`.

    `moving` maps the moving weights' names to their values before the step;
    with `renorm`, `r` and `d` come from its renorm mean and stddev.
    """
    shape = [1] * x.ndim
    shape[axis] = -1
    reduce_axes = tuple(i for i in range(x.ndim) if i != axis)
    correction = None
    if renorm:
        correction = {"mean": moving["renorm_mean"], "stddev": moving["renorm_stddev"],
                      **RENORM_CLIPPING}
    want = batch_norm(x, gamma, beta, dy, axis, EPSILON, mask=mask, renorm=correction)
    mean, variance, count = want["mean"], want["variance"], want["count"]
    if renorm:
        new_moving = renorm_moving_statistics(moving, mean, variance, count, EPSILON, MOMENTUM,
                                              RENORM_MOMENTUM)
    else:
        new_moving = {name: moving_average(moving[name], value, MOMENTUM, count)
                      for name, value in (("moving_mean", mean), ("moving_variance", variance))}
    results = [want["y"], want["dx"], want["dgamma"], want["dbeta"], new_moving]
    # The size of the terms each result is a sum or difference of (see `compare`).
    r, d = renorm_correction(mean, variance, EPSILON, correction)
    inv_std = 1.0 / np.sqrt(variance + EPSILON)
    x_hat = (x - mean.reshape(shape)) * inv_std.reshape(shape)
    # dx's second term, x_hat * mean(dy * x_hat): x_hat comes from `x - mean`, a difference
    # of terms of size |x| + |mean|, and the mean sums dy * x_hat over every position,
    # masked ones included (their outputs use the statistics too). With one selected
    # sample and the rest masked, x_hat is 0 there but the masked x_hat are large, so
    # the float32 rounding of `x - mean` is what dx carries.
    size_of_x_hat = (np.abs(x).max(axis=reduce_axes, initial=0.0) + np.abs(mean)) * inv_std
    second_term = (np.abs(gamma * r * inv_std) * size_of_x_hat
                   * np.abs((dy * x_hat).sum(axis=reduce_axes)) / np.maximum(count, 1.0))
    scales = [0.0, max(_largest(np.abs(gamma * r * inv_std).reshape(shape) * np.abs(dy)),
                       _largest(second_term)),
              _largest(r * np.abs(dy * x_hat).sum(axis=reduce_axes)
                       + np.abs(d) * np.abs(dy).sum(axis=reduce_axes)),
              _largest(np.abs(dy).sum(axis=reduce_axes))]
    return results, scales


def _largest(array):
    return float(np.max(array)) if np.size(array) else 0.0


# Results below the smallest normal number are rounded to multiples of the
# smallest subnormal: an absolute error of half of it is exact rounding.
SUBNORMAL = {"float32": 2.0 ** -149, "float16": 2.0 ** -24, "bfloat16": 2.0 ** -133}


def compare(name, actual, expected, dtype, tol, scale=0.0):
    """Asserts max|actual - expected| <= tol * max(max|expected|, scale) + subnormal / 2.

    `scale` is the size of the terms a result is computed from. The input
    gradient `dx = gamma * inv_std * (dy - mean(dy) - x_hat * mean(dy * x_hat))`
    removes two components from `dy`; with few samples almost nothing is left
    (2 samples: only what epsilon keeps), so its rounding errors are those of
    the terms, `gamma * inv_std * |dy|`, not of the tiny difference; the same
    holds for the sums behind dgamma and dbeta.

    Where the exact value is beyond the dtype's largest finite number (float16
    with no selected sample: `x / sqrt(epsilon)` at x = 1e4), the layer's only
    right answer is the infinity of that sign, and the rest is compared as usual.
    """
    largest = float(tf.as_dtype(dtype).max)
    beyond = np.abs(expected) > largest
    if beyond.any():
        assert np.array_equal(actual[beyond], np.sign(expected[beyond]) * np.inf), name
        actual, expected = actual[~beyond], expected[~beyond]
    if not np.size(expected):
        return
    error = float(np.max(np.abs(np.asarray(actual, np.float64) - expected)))
    allowed = tol * max(_largest(np.abs(expected)), scale) + SUBNORMAL[dtype] / 2
    assert error <= allowed, (f"{name}: error {error:.3g} > {allowed:.3g} "
                              f"(relative {relative_error(actual, expected):.3g}, tol {tol:.3g})")


class Bucket:
    """One layer and its traced step, reused by every example of a bucket."""

    def __init__(self, strategy, rank, axis, dtype, masked, group_size, renorm, kernels):
        self.strategy = strategy
        self.masked = masked
        renorm_kwargs = dict(renorm=True, renorm_momentum=RENORM_MOMENTUM,
                             renorm_clipping=RENORM_CLIPPING) if renorm else {}
        with strategy.scope():
            self.layer = SyncBatchNormalization(axis=axis, momentum=MOMENTUM, epsilon=EPSILON,
                                                group_size=group_size, dtype=POLICIES[dtype],
                                                **renorm_kwargs)
            self.layer.build(input_shape(rank, axis, None))
        self.traces = 0

        def replica_step(x, dy, mask):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = self.layer(x, training=True, mask=mask)
                loss = tf.reduce_sum(tf.cast(y, tf.float32) * dy)
            dx, dgamma, dbeta = tape.gradient(loss, [x, self.layer.gamma, self.layer.beta])
            return y, dx, dgamma, dbeta

        @tf.function(reduce_retracing=True)
        def step(x, dy, mask):
            self.traces += 1  # Python side effect: runs once per trace
            with kernels_env(kernels):
                return strategy.run(replica_step, args=(x, dy, mask))

        @tf.function(reduce_retracing=True)
        def step_without_mask(x, dy):
            self.traces += 1
            with kernels_env(kernels):
                return strategy.run(replica_step, args=(x, dy, None))

        self.step = step if masked else step_without_mask

    def run(self, xs, dys, masks, weights):
        """One step on per-replica lists; returns per-replica numpy results.

        `weights` maps weight names (gamma, beta and the moving weights) to values.
        """
        for name, value in weights.items():
            getattr(self.layer, name).assign(value.astype(np.float32))

        def distribute(arrays, dtype):
            return self.strategy.experimental_distribute_values_from_function(
                lambda ctx: tf.cast(tf.constant(arrays[ctx.replica_id_in_sync_group]), dtype))

        dtype = self.layer.compute_dtype
        args = [distribute(xs, dtype), distribute(dys, tf.float32)]
        if self.masked:
            args.append(distribute(masks, tf.bool))
        y, dx, dgamma, dbeta = self.step(*args)
        local = self.strategy.experimental_local_results

        def as_float64(values):
            return [tf.cast(v, tf.float64).numpy() for v in local(values)]

        moving = {variable.name: [tf.cast(v, tf.float64).numpy() for v in local(variable.value)]
                  for variable in self.layer.non_trainable_weights}
        return as_float64(y), as_float64(dx), as_float64(dgamma), as_float64(dbeta), moving


_BUCKETS = {}


def bucket_for(strategy, key):
    if key not in _BUCKETS:
        _BUCKETS[key] = Bucket(strategy, *key)
    return _BUCKETS[key]


def check_case(strategy, case):
    (rank, axis, dtype, masked, group_size, renorm), counts, offset, seed, kernels = case
    rng = np.random.default_rng(seed)
    channel_axis = axis % rank
    std = data_std(dtype, offset)
    xs, dys, masks = [], [], []
    for count in counts:
        shape = input_shape(rank, axis, count)
        xs.append((offset + std * rng.normal(size=shape)).astype(np.float32))
        dys.append(rng.normal(size=shape).astype(np.float32))
        # Keras's convention: the input's shape without its LAST axis.
        masks.append(rng.random(shape[:-1]) < 0.7 if masked else None)
    weights = {"gamma": rng.normal(1.0, 0.3, CHANNELS), "beta": rng.normal(0.0, 0.3, CHANNELS),
               "moving_mean": offset + rng.normal(0.0, 1.0, CHANNELS),
               "moving_variance": rng.uniform(0.5, 2.0, CHANNELS)}
    if renorm:
        # Renorm statistics near the data's, so that r and d vary, some clipped.
        weights.update(moving_stddev=np.sqrt(weights["moving_variance"] + EPSILON),
                       renorm_mean=offset + std * rng.normal(0.0, 1.0, CHANNELS),
                       renorm_stddev=std * rng.uniform(0.5, 2.0, CHANNELS))
    weights = {name: value.astype(np.float32).astype(np.float64) for name, value in weights.items()}
    bucket = bucket_for(strategy, (rank, axis, dtype, masked, group_size, renorm, kernels))
    y, dx, dgamma, dbeta, moving = bucket.run(xs, dys, masks, weights)
    tol = tolerance(dtype, abs(offset) / std)
    size = group_size or NUM_REPLICAS
    initial_moving = {name: value for name, value in weights.items() if name in moving}
    for start in range(0, NUM_REPLICAS, size):
        replicas = range(start, start + size)
        x = np.concatenate([quantized(xs[r], dtype) for r in replicas])
        # The gradient reaching the layer is dy rounded to its compute dtype.
        dy = np.concatenate([quantized(dys[r], dtype) for r in replicas])
        mask = np.concatenate([masks[r] for r in replicas]) if masked else None
        want, scales = group_reference(x, dy, mask, weights["gamma"], weights["beta"],
                                       initial_moving, channel_axis, renorm)
        got = (np.concatenate([y[r] for r in replicas]), np.concatenate([dx[r] for r in replicas]),
               sum(dgamma[r] for r in replicas), sum(dbeta[r] for r in replicas))
        for name, actual, expected, scale in zip(("y", "dx"), got, want, scales):
            compare(f"{name} of group {start // size}", actual, expected, dtype, tol, scale)
        for name, actual, expected, scale in zip(("dgamma", "dbeta"), got[2:], want[2:],
                                                 scales[2:]):
            # Summed in float32 from float32 terms: the float32 part of the tolerance.
            compare(f"{name} of group {start // size}", actual, expected, "float32", tol, scale)
        for r in replicas:
            for name, expected in want[4].items():
                compare(f"{name} of replica {r}", moving[name][r], expected, "float32", tol)


@pytest.mark.parametrize("bucket", BUCKETS, ids=_bucket_id)
@settings(settings.get_profile(PROFILE))
@given(data=st.data())
def test_replicas_match_float64_reference(mirrored_strategy, bucket, data):
    check_case(mirrored_strategy, data.draw(cases(bucket), label="case"))


def test_float16_subnormal_input_gradients_of_a_two_sample_group(mirrored_strategy):
    # Found by the CI profile: float16 dx of a 2-sample group is ~1e-6, float16
    # subnormals, where the first tolerance (relative to max|dx|) was wrong.
    check_case(mirrored_strategy,
               ((2, 1, "float16", True, 2, False), [0, 1, 0, 2], 1000.0, 0, "elementwise"))


def _drawn_cases():
    """The cases the property test's settings draw, in order (no TensorFlow step runs)."""
    drawn = []
    for bucket in BUCKETS:
        @settings(settings.get_profile(PROFILE), database=None)
        @given(case=cases(bucket))
        def draw(case):
            drawn.append(case)

        draw()
    return drawn


@pytest.mark.skipif(PROFILE != "ci", reason="checks what the CI profile draws")
def test_ci_draws_are_repeatable_and_cover_every_rank_axis_position_dtype_group_and_mask():
    # What the CI profile really draws, twice: the same cases both times (every
    # CI run checks the same ones), at least 200 of them, and among them every
    # rank, axis position, dtype, group size, both mask states and both kernel sets.
    first, second = _drawn_cases(), _drawn_cases()
    assert first == second and len(first) >= 200
    buckets = {case[0] for case in first}
    assert {b[0] for b in buckets} == {2, 3, 4, 5}
    assert {b[2] for b in buckets} == set(DTYPES)
    assert {b[3] for b in buckets} == {False, True}
    assert {b[4] for b in buckets} == set(GROUP_SIZES)
    assert {case[4] for case in first} == set(KERNELS)
    # With and without renorm; renorm in every group size, with and without a mask,
    # and with a mask on a channel axis that is not last (per-channel counts).
    assert {b[5] for b in buckets} == {False, True}
    renorm = [b for b in buckets if b[5]]
    assert {b[4] for b in renorm} == set(GROUP_SIZES) and {b[3] for b in renorm} == {False, True}
    assert any(b[3] and b[1] % b[0] != b[0] - 1 for b in renorm)
    for rank in (3, 4, 5):  # first, a middle and the last non-batch axis
        positions = {b[1] % rank for b in buckets if b[0] == rank}
        assert {1, rank - 1} <= positions and len(positions) >= 2, rank


def test_a_wrong_layer_fails_the_check(mirrored_strategy, monkeypatch):
    """Negative control: the comparison catches an off-by-a-little normalization."""
    original = Bucket.run

    def off_run(self, *args):
        y, dx, dgamma, dbeta, moving = original(self, *args)
        return [v * 1.01 for v in y], dx, dgamma, dbeta, moving

    monkeypatch.setattr(Bucket, "run", off_run)
    case = ((2, -1, "float32", False, None, False), [3, 2, 0, 4], 0.0, 7, "elementwise")
    with pytest.raises(AssertionError, match="y of group 0: error"):
        check_case(mirrored_strategy, case)
