"""The synchronized batch-norm op: statistics, normalization and exact gradient.

The layer decides *whether* to synchronize; this module computes. The path is
chosen once per call, in Python, from static facts only: the layout (channels
last or not), whether there is a mask, and whether there is one replica. The
traced graph then holds that one path and no data-dependent control flow (no
`tf.cond`, hence no Switch/Merge, and on a GPU no predicate copied back to the
host in the middle of a step). Every choice that depends on data (empty or
one-sample batches) is a per-channel select, `tf.where`, on `[C]` vectors.

Synchronized paths make exactly one call to `all_sum` each way:

* forward: `[count] + [sum x] + [sum of squares]`, float64, `[2C + 1]`
  (`[3C]`, a count per channel, when a mask covers the channel axis:
  Keras's masks broadcast over the last axis, see `stats.mask_weights`);
* backward: `[sum dy] + [sum dy * x_hat]`, float32, `[2C]`.

The backward pass is written out rather than left to autodiff, because
autodiff through a collective is backend-specific (Horovod's allreduce
gradient comes back as None on Keras 3) and would cost more collectives.

With global count `N`, selection weights `w` (1 without a mask),
`x_hat = (x - mean) * inv_std` and `g = dy * gamma`, the gradient of
`y = gamma * x_hat + beta` through the global statistics is

    dx = gamma * inv_std * (dy - w / N * (sum(dy) + x_hat * sum(dy * x_hat)))

where both sums run over every element of every replica (`N` per channel
when each has its own count). `dgamma` and `dbeta` are this replica's local
sums: summing them over replicas, as a gradient all-reduce does, gives the
gradient of the global batch.

Batch renormalization (`renorm`) changes only the affine step: `r` and `d`
come from the global statistics (`renorm_correction`) and, constant to the
gradient as in Keras, turn `gamma` and `beta` into `r * gamma` and
`d * gamma + beta`, which every path above uses where it used `gamma` and
`beta`; `dgamma = r * sum(dy * x_hat) + d * sum(dy)`. No extra collective,
and no extra pass over the data but on the one-replica fused path, whose
training kernel takes no `r` (one affine op after it).

Exact at any offset, with no branch. Channels-last data without a mask runs
in TensorFlow's fused batch-norm kernels (`FusedBatchNormV3` and its
gradient), which work in float32: fed raw data whose |mean| / std is large
(1e4, 1e5), their float32 sums lose the variance. So they are never fed raw
data: each replica subtracts a per-channel *shift*, the first position of its
own batch (`x[0, 0, 0, :]` for NHWC), a value of the data itself. `x - shift`
is exact (Sterbenz) or rounded at the scale of the data's spread, and its
mean is a few standard deviations from zero at most, where the kernels are
accurate. Batch norm is invariant to the shift, so the kernels' output and
gradient need no correction; only the mean gets the shift back, in float64,
before the replicas combine their moments (Chan et al., see `stats`). The
synchronized normalization and gradient kernels are then fed the same
shifted data and `global mean - shift`, a small float32 number. One
subtraction pass per layer buys exactness with no far-from-zero check.

* One replica, channels last, no mask: `x - shift` through the
  training-mode kernel; autodiff through it gives the training-mode gradient
  kernel (the shift is a constant to the gradient: the output does not depend
  on it). Two kernels, no collective, no custom gradient.
* Synchronized, channels last, no mask: the training-mode kernel for this
  replica's moments, one all-sum, the inference-mode kernel to normalize with
  the global statistics; backward, the inference-mode gradient kernel for
  `dy * gamma * inv_std` and both sums, one all-sum, one per-channel affine
  pass for the global correction.
* A mask or another channel axis: element-wise float32 math, centred on the
  first sample's mean (`stats.local_moments`) and on the float64 global mean
  split into two float32 parts (`stats.split_mean`).

Fused kernels on a GPU, element-wise math on a CPU. The two channels-last
paths above are what a GPU runs: cuDNN's fused kernels are one launch each,
where element-wise math is several. On a CPU the fused kernels are the slow
choice for the small tensors of most of a model's layers (1.7x the
element-wise path at 50k values, bench/model_layers.py and
docs/performance.md), so channels-last data on a CPU runs
`_channels_last_elementwise`: the same shift, the same one all-sum each way,
a handful of element-wise ops. One exception: with one replica, from 2M
values on, the fused training kernel is faster and runs. `kernels_for` makes
that choice statically, from the device and the static shape;
`SYNCBN_KERNELS=fused` or `=elementwise` overrides it (the tests run both on
CPUs).
"""

import collections
import math
import os

import numpy as np
import tensorflow as tf

from syncbn import stats


def _as_vector(value, num_channels, fill):
    if value is None:
        return tf.fill([num_channels], tf.constant(fill, tf.float32))
    return tf.cast(value, tf.float32)


class Renorm(collections.namedtuple("Renorm", ["mean", "stddev", "rmin", "rmax", "dmax"])):
    """Batch renormalization's inputs to one training call (Ioffe, 2017, arXiv:1702.03275).

    `mean` and `stddev` are float32 `[C]` tensors, the layer's `renorm_mean`
    and `renorm_stddev` before this step's update; `rmin`, `rmax`, `dmax`
    the clipping, Python floats or None (no bound).
    """


def renorm_correction(mean, variance, epsilon, renorm):
    """Batch renormalization's `(r, d)`, float32 `[C]`, from the global batch statistics.

    As Keras 3 computes them: with `s = max(renorm_stddev, sqrt(epsilon))`,
    `r = sqrt(variance + epsilon) / s` clipped to `[rmin, rmax]` and
    `d = (mean - renorm_mean) / s` clipped to `[-dmax, dmax]`. Both are
    constants to the gradient (the callers' custom gradients treat them so,
    as Keras's `stop_gradient` does).

    Data far from zero keep `d` exact: `mean` is float64 (the difference is
    then taken in float64), or a float32 pair `(shift, offset)` whose sum is
    the mean, a value of the data and a small offset from it
    (`((shift - renorm_mean) + offset)`: the first difference is exact when
    the renorm mean is near the data).
    """
    renorm_stddev = tf.maximum(renorm.stddev, np.sqrt(np.float32(epsilon)))
    r = tf.sqrt(variance + epsilon) / renorm_stddev
    if isinstance(mean, tuple):
        shift, offset = mean
        d = ((shift - renorm.mean) + offset) / renorm_stddev
    else:
        d = tf.cast(mean - tf.cast(renorm.mean, mean.dtype), tf.float32) / renorm_stddev
    if renorm.rmin is not None:
        r = tf.maximum(r, renorm.rmin)
    if renorm.rmax is not None:
        r = tf.minimum(r, renorm.rmax)
    if renorm.dmax is not None:
        d = tf.clip_by_value(d, -renorm.dmax, renorm.dmax)
    return r, d


def _effective_affine(gamma, beta, mean, variance, epsilon, renorm):
    """`(gamma', beta', r, d)`: what scales and offsets `x_hat` in this call.

    Without renorm `gamma`, `beta` (and `r`, `d` None); with it Keras's
    composition `(x_hat * r + d) * gamma + beta = x_hat * (r * gamma) + (d * gamma + beta)`.
    """
    if renorm is None:
        return gamma, beta, None, None
    r, d = renorm_correction(mean, variance, epsilon, renorm)
    return gamma * r, d * gamma + beta, r, d


def _parameter_grads(sum_dy_xhat, sum_dy, r, d):
    """`(dgamma, dbeta)` from this replica's `sum(dy * x_hat)` and `sum(dy)`.

    With renorm `gamma' = r * gamma` and `beta' = d * gamma + beta`, `r` and
    `d` constant: `dgamma = r * sum(dy * x_hat) + d * sum(dy)`.
    """
    if r is None:
        return sum_dy_xhat, sum_dy
    return r * sum_dy_xhat + d * sum_dy, sum_dy


KERNELS_ENV = "SYNCBN_KERNELS"
KERNELS = ("auto", "fused", "elementwise")


def fused_kernels_apply(rank, axis, mask):
    """True if the layout can use the fused kernels: channels last, no mask."""
    return mask is None and axis == rank - 1


# One replica on a CPU: from this many values per replica on, the fused
# training kernel beats element-wise math (bench/model_layers.py, and the
# size sweep in docs/performance.md: 1.08x at 1.6M values, 1.33x at 3.2M).
FUSED_MIN_VALUES_ON_CPU = 1 << 21


def _static_size(x):
    """Values in `x`, counting each unknown dimension (usually the batch) as 1."""
    return math.prod(1 if d is None else d for d in x.shape.as_list())


def kernels_for(x, single_replica=False):
    """`"fused"` or `"elementwise"`: the kernels for channels-last data `x`, a static choice.

    `$SYNCBN_KERNELS` (`auto`, `fused` or `elementwise`) decides; with `auto`
    (the default) the fused kernels run where `x` is placed on a GPU, or,
    placed nowhere yet (inside a `tf.function`), when the machine has a GPU.
    On a CPU the element-wise kernels run, except with one replica on a
    tensor of at least `FUSED_MIN_VALUES_ON_CPU` values (static shape), where
    the fused training kernel is faster.
    """
    choice = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if choice not in KERNELS:
        raise ValueError(
            f"{KERNELS_ENV} must be one of {', '.join(KERNELS)}. "
            f"Received: {KERNELS_ENV}={os.environ[KERNELS_ENV]!r}"
        )
    if choice != "auto":
        return choice
    device = (getattr(x, "device", "") or "").upper()
    on_gpu = "GPU" in device or (
        "CPU" not in device and bool(tf.config.list_logical_devices("GPU")))
    if on_gpu or (single_replica and _static_size(x) >= FUSED_MIN_VALUES_ON_CPU):
        return "fused"
    return "elementwise"


def _channels_last_4d(x):
    # [..., C] -> [P, 1, 1, C]: the fused kernels reduce over the first three
    # axes. NHWC data is already in that form and is not reshaped.
    if x.shape.rank == 4:
        return x
    return tf.reshape(x, [-1, 1, 1, x.shape[-1]])


def _shifted(x, stop_gradient=False):
    """`(x - shift, shift)` for channels-last `x`, shift `[C]` the batch's first position (0 if empty).

    A sum over a `[0 or 1, 1, ..., 1, C]` slice: the first position, or zeros
    for an empty batch, with no branch. The gradient must treat the shift as
    a constant, which is exact: batch norm's output does not depend on it.
    The custom gradients do by construction; a path differentiated by
    autodiff asks for `stop_gradient`.
    """
    rank = x.shape.rank
    shift = tf.reduce_sum(x[(slice(0, 1),) * (rank - 1)], axis=list(range(rank - 1)))
    if stop_gradient:
        shift = tf.stop_gradient(shift)
    return x - shift, shift


def _position_count(x):
    """Samples per channel of channels-last `x`: `N * H * W` of `[N, H, W, C]`.

    A Python float when the shape is static, as it is inside most traced
    steps: the count, and what is derived from it, then cost no op at all.
    Otherwise a float32 scalar, exact up to 2**24 samples per channel.
    """
    if x.shape.is_fully_defined():
        return float(x.shape.num_elements() // x.shape[-1])
    # Integer division before the cast.
    return tf.cast(tf.size(x, out_type=tf.int64) // x.shape[-1], tf.float32)


def _at_least(count, low):
    """`max(count, low)`, computed in Python when `count` is a Python float."""
    return max(count, low) if stats.is_static_count(count) else tf.maximum(count, low)


def _inverse_count(count):
    """float32 `1 / max(count, 1)`; for a static count, rounded as TensorFlow's float32 division."""
    if stats.is_static_count(count):
        return np.float32(1.0) / np.float32(max(count, 1.0))
    return 1.0 / tf.maximum(count, 1.0)


def _fused_train(x4, gamma, beta, epsilon):
    """Training-mode kernel on a `[N, H, W, C]` batch: `(y, mean, Bessel-corrected variance)`."""
    empty = tf.zeros([0], tf.float32)
    y, mean, unbiased_variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=x4, scale=gamma, offset=beta, mean=empty, variance=empty,
        epsilon=epsilon, is_training=True,
    )
    return y, mean, unbiased_variance


def _kernel_moments(count, kernel_mean, unbiased_variance):
    """`(mean offset, m2)` of this replica's shifted data from the kernel's statistics.

    The kernel's variance carries Bessel's correction, `n / (n - 1)`, so
    `m2 = variance * (n - 1)`. An empty batch gives NaN statistics, one
    sample an infinite correction: `multiply_no_nan` by a factor that is 0
    there makes both 0, with no branch. A static count of 2 or more needs
    neither guard.
    """
    if stats.is_static_count(count) and count >= 2.0:
        return kernel_mean, unbiased_variance * (count - 1.0)
    mean_offset = tf.math.multiply_no_nan(kernel_mean, tf.minimum(count, 1.0))
    m2 = tf.math.multiply_no_nan(unbiased_variance, tf.maximum(count - 1.0, 0.0))
    return mean_offset, m2


def _like(x4, x):
    """`x4` in the shape of `x` (a no-op for NHWC data)."""
    return x4 if x4.shape.rank == x.shape.rank else tf.reshape(x4, tf.shape(x))


def _fused_affine(x4, scale, offset):
    """`x * scale + offset` per channel, in one pass of the inference kernel."""
    num_channels = x4.shape[-1]
    return tf.raw_ops.FusedBatchNormV3(
        x=x4,
        scale=scale,
        offset=offset,
        mean=tf.zeros([num_channels]),
        variance=tf.constant(1.0 - 1e-6, shape=[num_channels]),
        epsilon=1e-6,
        is_training=False,
    )[0]


def _global_moments(all_sum, name, local_moments, num_channels, per_channel_count=False):
    """Global `(count, mean, biased variance)` from this replica's `(count, mean, m2)`.

    Packed into one float64 vector, summed over the group in one collective
    (`name/forward`), and unpacked: `[2C + 1]`, or `[3C]` with a count per channel.
    """
    packed = stats.pack_moments(*local_moments)
    return stats.unpack_moments(all_sum(packed, name + "/forward"), num_channels,
                                per_channel_count)


def _global_grad_sums(all_sum, name, sum_dy, sum_dy_xhat):
    """`sum(dy)` and `sum(dy * x_hat)` over the group, in one collective (`name/backward`)."""
    packed = stats.pack_grad_sums(sum_dy, sum_dy_xhat)
    return stats.unpack_grad_sums(all_sum(packed, name + "/backward"), sum_dy.shape[0])


def _single_replica_kernels(x, gamma, beta, epsilon, renorm):
    """One replica, channels last, no mask: the training kernel on shifted data.

    With renorm the kernel returns `x_hat` (scale 1, offset 0) and one
    affine op applies `r * gamma` and `d * gamma + beta`, `r` and `d`
    stopped for autodiff.
    """
    x4 = _channels_last_4d(x)
    # Autodiff runs through this path: the shift must stop the gradient.
    shifted, shift = _shifted(x4, stop_gradient=True)
    count = _position_count(x4)
    if renorm is None:
        y4, kernel_mean, unbiased_variance = _fused_train(shifted, gamma, beta, epsilon)
    else:
        ones = tf.ones_like(gamma)
        y4, kernel_mean, unbiased_variance = _fused_train(
            shifted, ones, tf.zeros_like(gamma), epsilon)
    mean_offset, m2 = _kernel_moments(count, kernel_mean, unbiased_variance)
    # float32 is enough here: the moving mean is float32, and the output
    # never uses this sum.
    mean = shift + mean_offset
    variance = m2 / _at_least(count, 1.0)
    if renorm is not None:
        scale, offset, _, _ = _effective_affine(
            gamma, beta, (shift, tf.stop_gradient(mean_offset)), tf.stop_gradient(variance),
            epsilon, renorm)
        y4 = y4 * scale + offset
    return _like(y4, x), mean, variance, count


def _synced_kernels(x, gamma, beta, epsilon, all_sum, name, renorm):
    """Synchronized, channels last, no mask: fused kernels on shifted data, custom gradient."""
    num_channels = x.shape[-1]

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        x4 = _channels_last_4d(x)
        shifted, shift = _shifted(x4)
        _, kernel_mean, unbiased_variance = _fused_train(shifted, gamma, beta, epsilon)
        count = _position_count(x4)
        mean_offset, m2 = _kernel_moments(count, kernel_mean, unbiased_variance)
        shift64 = tf.cast(shift, stats.STATS_DTYPE)
        local_mean = shift64 + tf.cast(mean_offset, stats.STATS_DTYPE)
        # [1], [C], [C] -> [2C + 1] -> [], [C], [C]
        global_count, mean, variance = _global_moments(all_sum, name, (count, local_mean, m2),
                                                       num_channels)
        # The global mean as seen from this replica's shifted data: small, so
        # exact in float32 even when the mean itself is 1e5.
        shifted_mean = tf.cast(mean - shift64, tf.float32)
        scale, offset, r, d = _effective_affine(gamma, beta, mean, variance, epsilon, renorm)
        y4 = tf.raw_ops.FusedBatchNormV3(
            x=shifted, scale=scale, offset=offset, mean=shifted_mean, variance=variance,
            epsilon=epsilon, is_training=False,
        )[0]

        def grad(dy, d_mean, d_variance, d_count):
            del d_mean, d_variance, d_count  # Statistics are not differentiable.
            # dy * gamma * inv_std, sum(dy * x_hat) and sum(dy), in one kernel call.
            dx_partial, sum_dy_xhat, sum_dy, _, _ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=_channels_last_4d(tf.cast(dy, tf.float32)),
                x=shifted,
                scale=scale,
                reserve_space_1=shifted_mean,
                reserve_space_2=variance,
                reserve_space_3=tf.zeros([0]),
                epsilon=epsilon,
                is_training=False,
            )
            # [C], [C] -> [2C] -> [C], [C]
            global_sum_dy, global_sum_dy_xhat = _global_grad_sums(all_sum, name, sum_dy,
                                                                  sum_dy_xhat)
            # dx = dx_partial - gamma * inv_std / N * (sum dy + x_hat * sum dy x_hat),
            # with x_hat = (shifted - shifted_mean) * inv_std: one affine pass in `shifted`.
            inv_std = tf.math.rsqrt(variance + epsilon)
            minus_scale_per_count = -(scale * inv_std) / _at_least(global_count, 1.0)
            per_shifted = minus_scale_per_count * inv_std * global_sum_dy_xhat
            constant = minus_scale_per_count * global_sum_dy - shifted_mean * per_shifted
            dx4 = dx_partial + _fused_affine(shifted, per_shifted, constant)
            return (_like(dx4, x), *_parameter_grads(sum_dy_xhat, sum_dy, r, d))

        return (_like(y4, x), tf.cast(mean, tf.float32), variance, global_count), grad

    return normalize(x, gamma, beta)


def _channels_last_elementwise(x, gamma, beta, epsilon, all_sum, name, single_replica, renorm):
    """Channels last, no mask, on a CPU: element-wise float32 math on shifted data, custom gradient.

    The same shift as the fused paths (`_shifted`), then two passes for this
    replica's moments, one for `c = shifted - (global mean - shift)` and two
    for `y = c * gamma * inv_std + beta`. With one replica the moments are the
    global ones and stay in float32; otherwise they are packed in float64 for
    one all-sum, as on every path. Backward: `sum(dy)` and `sum(dy * c)`, one
    all-sum (none with one replica), and `dx` in four element-wise passes.
    """
    num_channels = x.shape[-1]
    axes = list(range(x.shape.rank - 1))
    # Outside the custom gradient: a static count is a Python float, not an output.
    count = _position_count(x)

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        shifted, shift = _shifted(x)
        inv_count = _inverse_count(count)
        mean_offset = tf.reduce_sum(shifted, axis=axes) * inv_count
        m2 = tf.reduce_sum(tf.math.squared_difference(shifted, mean_offset), axis=axes)
        if single_replica:
            global_count, shifted_mean, variance = count, mean_offset, m2 * inv_count
            mean = shift + mean_offset
            statistics = (mean, variance)
            # For renorm's d: the global mean, exact (see renorm_correction).
            mean_for_renorm = (shift, mean_offset)
        else:
            shift64 = tf.cast(shift, stats.STATS_DTYPE)
            local_mean = shift64 + tf.cast(mean_offset, stats.STATS_DTYPE)
            # [1], [C], [C] -> [2C + 1] -> [], [C], [C]
            global_count, mean64, variance = _global_moments(
                all_sum, name, (count, local_mean, m2), num_channels)
            # Small, so exact in float32 even when the mean itself is 1e5.
            shifted_mean = tf.cast(mean64 - shift64, tf.float32)
            statistics = (tf.cast(mean64, tf.float32), variance, global_count)
            mean_for_renorm = mean64
        effective_gamma, offset, r, d = _effective_affine(
            gamma, beta, mean_for_renorm, variance, epsilon, renorm)
        inv_std = tf.math.rsqrt(variance + epsilon)
        scale = effective_gamma * inv_std
        centred = shifted - shifted_mean
        y = centred * scale + offset

        def grad(dy, *statistics_gradients):
            del statistics_gradients  # Statistics are not differentiable.
            dy = tf.cast(dy, tf.float32)
            sum_dy = tf.reduce_sum(dy, axis=axes)
            sum_dy_centred = tf.reduce_sum(dy * centred, axis=axes)
            if single_replica:
                global_sum_dy, global_sum_dy_centred = sum_dy, sum_dy_centred
            else:
                # [C], [C] -> [2C] -> [C], [C]
                global_sum_dy, global_sum_dy_centred = _global_grad_sums(
                    all_sum, name, sum_dy, sum_dy_centred)
            # dx = scale * (dy - (sum dy + x_hat * sum dy x_hat) / N), x_hat = centred * inv_std.
            minus_scale_per_count = -scale / _at_least(global_count, 1.0)
            per_centred = minus_scale_per_count * tf.square(inv_std) * global_sum_dy_centred
            dx = dy * scale + (centred * per_centred + minus_scale_per_count * global_sum_dy)
            return (dx, *_parameter_grads(sum_dy_centred * inv_std, sum_dy, r, d))

        return (y, *statistics), grad

    outputs = normalize(x, gamma, beta)
    return (*outputs, count) if single_replica else outputs


def _elementwise(x, gamma, beta, epsilon, all_sum, name, axis, selection, renorm):
    """A mask or channels not last: float32 element-wise math, custom gradient.

    With a count per channel (`stats.counts_per_channel`) the packed
    statistics carry `[C]` counts, and the backward pass divides each
    channel by its own.
    """
    rank = x.shape.rank
    num_channels = x.shape[axis]
    axes = stats.reduction_axes(rank, axis)
    channel_shape = [1] * rank
    channel_shape[axis] = num_channels
    per_channel_count = stats.counts_per_channel(rank, axis, selection is not None)

    def per_channel(vector):
        return tf.reshape(vector, channel_shape)

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        # [1], [C], [C] -> [2C + 1] -> [], [C], [C]; per channel [C] x 3 -> [3C] -> [C] x 3
        global_count, mean, variance = _global_moments(
            all_sum, name, stats.local_moments(x, axes, selection), num_channels, per_channel_count)
        effective_gamma, offset, r, d = _effective_affine(gamma, beta, mean, variance, epsilon,
                                                          renorm)
        inv_std = tf.math.rsqrt(variance + epsilon)
        scale = effective_gamma * inv_std
        mean_high, mean_low = stats.split_mean(mean)
        # Not x * scale + (beta - mean * scale): that cancels when |mean| >> std.
        centred = (x - per_channel(mean_high)) - per_channel(mean_low)
        y = centred * per_channel(scale) + per_channel(offset)

        def grad(dy, d_mean, d_variance, d_count):
            del d_mean, d_variance, d_count  # Statistics are not differentiable.
            dy = tf.cast(dy, tf.float32)
            x_hat = centred * per_channel(inv_std)
            sum_dy = tf.reduce_sum(dy, axis=axes)
            sum_dy_xhat = tf.reduce_sum(dy * x_hat, axis=axes)
            # [C], [C] -> [2C] -> [C], [C]
            global_sum_dy, global_sum_dy_xhat = _global_grad_sums(all_sum, name, sum_dy,
                                                                  sum_dy_xhat)
            inv_count = 1.0 / tf.maximum(global_count, 1.0)  # [] or [C]
            correction = x_hat * per_channel(global_sum_dy_xhat * inv_count) + per_channel(
                global_sum_dy * inv_count
            )
            if selection is not None:
                correction = correction * selection[0]
            dx = per_channel(scale) * (dy - correction)
            return (dx, *_parameter_grads(sum_dy_xhat, sum_dy, r, d))

        return (y, tf.cast(mean, tf.float32), tf.identity(variance), tf.identity(global_count)), grad

    return normalize(x, gamma, beta)


def sync_batch_norm(x, gamma, beta, *, axis, epsilon, all_sum, name, mask=None,
                    single_replica=False, renorm=None):
    """Batch-normalizes `x` with statistics of the global batch.

    Args:
        x: tensor of any rank >= 2, float16, bfloat16, float32 or float64.
            Normalization runs in float32.
        gamma: `[C]` scale, or None for 1.
        beta: `[C]` offset, or None for 0.
        axis: non-negative channel axis.
        epsilon: added to the variance.
        all_sum: `all_sum(tensor, name)`, sums over the synchronization group.
        name: unique name of the call site, used to match collectives.
        mask: optional Keras mask: the rank of `x` minus one, broadcast over
            `x`'s LAST axis whatever `axis` is (`stats.mask_weights`).
            Masked positions are left out of the (global) statistics and of
            the gradient through them, but still normalized. With `axis` not
            last the mask covers the channel axis, and each channel has its
            own count.
        single_replica: True when `all_sum` is the identity (one replica): on
            channels-last data without a mask, `all_sum` is then not called
            (on a GPU the fused training kernel and its gradient do everything).
        renorm: optional `Renorm`: batch renormalization, with `r` and `d`
            from the global statistics (`renorm_correction`).

    Returns:
        `(y, mean, variance, count)`: `y` in float32, shaped like `x`; the
        global batch mean and biased variance (`[C]`, float32) and the global
        sample count: a float32 scalar, a float32 `[C]` when each channel has
        its own (a mask with `axis` not last), or a Python float where it is
        known when tracing (one replica, static shape). The statistics are
        not differentiable (their gradient is ignored): they are meant for
        moving averages.
    """
    rank = x.shape.rank
    num_channels = x.shape[axis]
    x = tf.cast(x, tf.float32)
    gamma = _as_vector(gamma, num_channels, 1.0)
    beta = _as_vector(beta, num_channels, 0.0)
    # The one decision, from static facts: no branch in the graph.
    if not fused_kernels_apply(rank, axis, mask):
        selection = stats.mask_weights(mask, x, axis) if mask is not None else None
        return _elementwise(x, gamma, beta, epsilon, all_sum, name, axis, selection, renorm)
    # The custom-gradient paths ignore the statistics' gradients; autodiff
    # runs through the one-replica fused path, so its statistics stop them.
    if kernels_for(x, single_replica) == "elementwise":
        return _channels_last_elementwise(x, gamma, beta, epsilon, all_sum, name, single_replica,
                                          renorm)
    if single_replica:
        y, mean, variance, count = _single_replica_kernels(x, gamma, beta, epsilon, renorm)
        return y, tf.stop_gradient(mean), tf.stop_gradient(variance), count
    return _synced_kernels(x, gamma, beta, epsilon, all_sum, name, renorm)


def batch_norm_inference(x, mean, variance, gamma, beta, *, axis, epsilon):
    """Normalizes with given (moving) statistics, in float32. No communication."""
    rank = x.shape.rank
    num_channels = x.shape[axis]
    channel_shape = [1] * rank
    channel_shape[axis] = num_channels
    inv_std = tf.math.rsqrt(tf.cast(variance, tf.float32) + epsilon)
    scale = _as_vector(gamma, num_channels, 1.0) * inv_std
    centred = tf.cast(x, tf.float32) - tf.reshape(tf.cast(mean, tf.float32), channel_shape)
    return centred * tf.reshape(scale, channel_shape) + tf.reshape(
        _as_vector(beta, num_channels, 0.0), channel_shape
    )
