"""The synchronized batch-norm op: statistics, normalization and exact gradient.

The layer decides *whether* to synchronize; this module computes. Forward
and backward each make exactly one call to `all_sum`:

* forward: `[count] + [sum x] + [sum of squares]`, float64, `[2C + 1]`;
* backward: `[sum dy] + [sum dy * x_hat]`, float32, `[2C]`.

The backward pass is written out rather than left to autodiff, because
autodiff through a collective is backend-specific (Horovod's allreduce
gradient comes back as None on Keras 3) and would cost more collectives.

With global count `N`, selection weights `w` (1 without a mask),
`x_hat = (x - mean) * inv_std` and `g = dy * gamma`, the gradient of
`y = gamma * x_hat + beta` through the global statistics is

    dx = gamma * inv_std * (dy - w / N * (sum(dy) + x_hat * sum(dy * x_hat)))

where both sums run over every element of every replica. `dgamma` and `dbeta`
are this replica's local sums: summing them over replicas, as a gradient
all-reduce does, gives the gradient of the global batch.

Speed. The element-wise work runs in TensorFlow's fused batch-norm kernels
(`FusedBatchNormV3` and its gradient) wherever they apply (channels-last
data without a mask, reshaped to `[P, 1, 1, C]`): local moments, normalization
with the global statistics, and the two gradient sums plus `dy * gamma *
inv_std` all come from one kernel call each; the global correction of `dx` is
one more per-channel affine pass. With one replica (`single_replica=True`)
the training-mode kernel and its gradient do all of it, one call each way.

Accuracy. Those kernels work in float32 throughout, which is exact enough
until |mean| / std passes about 1e3 (then the float32 sum behind the mean,
and `x * scale + (beta - mean * scale)`, start losing digits). Each replica
checks its kernel's statistics and, where a channel is that far from zero,
recomputes its moments with a shifted two-pass sum; the normalization and
gradient then take the exact path when the *global* statistics are that far
from zero, a decision that every replica makes identically. So the exactness
guarantees hold at any offset and the fast path costs nothing extra.
"""

import tensorflow as tf

from syncbn import stats

# |mean| / std beyond which the float32 fused kernels are not trusted (see above).
FAR_FROM_ZERO = 1e3


def _as_vector(value, num_channels, fill):
    if value is None:
        return tf.fill([num_channels], tf.constant(fill, tf.float32))
    return tf.cast(value, tf.float32)


def fused_kernels_apply(rank, axis, mask):
    """True if the layout can use the fused kernels: channels last, no mask."""
    return mask is None and axis == rank - 1


def _channels_last_4d(x):
    # [..., C] -> [P, 1, 1, C]: the fused kernels reduce over the first three axes.
    return tf.reshape(x, [-1, 1, 1, x.shape[-1]])


def _far_from_zero(mean, variance):
    """Scalar bool: some channel's |mean| exceeds FAR_FROM_ZERO standard deviations."""
    mean = tf.cast(mean, tf.float32)
    return tf.reduce_any(tf.abs(mean) > FAR_FROM_ZERO * tf.sqrt(variance))


def _fused_train(x4, gamma, beta, epsilon):
    """Training-mode kernel on a `[P, 1, 1, C]` batch.

    Returns `(y, mean, biased variance, reserve)`; `reserve` is the kernel's
    three reserve-space outputs, which its gradient kernel takes back.
    """
    empty = tf.zeros([0], tf.float32)
    y, mean, unbiased, *reserve = tf.raw_ops.FusedBatchNormV3(
        x=x4, scale=gamma, offset=beta, mean=empty, variance=empty,
        epsilon=epsilon, is_training=True,
    )
    # The kernel's variance output carries Bessel's correction; undo it.
    count = tf.cast(tf.shape(x4)[0], tf.float32)
    return y, mean, unbiased * (count - 1.0) / tf.maximum(count, 1.0), reserve


def _fused_affine(x4, scale, offset):
    """`x * scale + offset` per channel, in one pass of the inference kernel."""
    num_channels = x4.shape[-1]
    return tf.raw_ops.FusedBatchNormV3(
        x=x4,
        scale=scale,
        offset=offset,
        mean=tf.zeros([num_channels]),
        variance=tf.fill([num_channels], 1.0 - 1e-6),
        epsilon=1e-6,
        is_training=False,
    )[0]


def sync_batch_norm(x, gamma, beta, *, axis, epsilon, all_sum, name, mask=None, single_replica=False):
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
        mask: optional boolean tensor shaped like `x` without `axis`; masked
            positions are left out of the (global) statistics but still
            normalized.
        single_replica: True when `all_sum` is the identity (one replica): the
            fused training kernel and its gradient then do everything, and
            `all_sum` is not called.

    Returns:
        `(y, mean, variance, count)`: `y` in float32, shaped like `x`; the
        global batch mean and biased variance (`[C]`, float32) and the global
        sample count (float32 scalar). The statistics are not differentiable
        (their gradient is ignored): they are meant for moving averages.
    """
    rank = x.shape.rank
    num_channels = x.shape[axis]
    axes = stats.reduction_axes(rank, axis)
    x = tf.cast(x, tf.float32)
    gamma = _as_vector(gamma, num_channels, 1.0)
    beta = _as_vector(beta, num_channels, 0.0)
    selection = stats.mask_weights(mask, x, axis) if mask is not None else None
    use_kernels = fused_kernels_apply(rank, axis, mask)
    channel_shape = [1] * rank
    channel_shape[axis] = num_channels

    def local_moments_exact():
        return stats.local_moments(x, axes, selection)

    def local_moments():
        if not use_kernels:
            return local_moments_exact()
        x4 = _channels_last_4d(x)
        count = tf.cast(tf.shape(x4)[0], tf.float32)

        def from_kernel():
            _, mean, variance, _ = _fused_train(x4, gamma, beta, epsilon)
            return tf.cond(
                _far_from_zero(mean, variance),
                local_moments_exact,
                lambda: (count, tf.cast(mean, stats.STATS_DTYPE), variance * count),
            )

        return tf.cond(count < 2.0, local_moments_exact, from_kernel)

    fused_single = single_replica and use_kernels

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        if fused_single:
            # One replica: the training kernel's own statistics are the global ones.
            x4 = _channels_last_4d(x)
            count = tf.cast(tf.shape(x4)[0], tf.float32)
            y4, batch_mean, batch_variance, reserve = _fused_train(x4, gamma, beta, epsilon)
            exact_path = tf.logical_or(count < 2.0, _far_from_zero(batch_mean, batch_variance))
            global_count, mean, variance = tf.cond(
                exact_path,
                lambda: stats.unpack_moments(
                    stats.pack_moments(*local_moments_exact()), num_channels
                ),
                lambda: (count, tf.cast(batch_mean, stats.STATS_DTYPE), batch_variance),
            )
        else:
            count, local_mean, m2 = local_moments()
            global_count, mean, variance = stats.unpack_moments(
                all_sum(stats.pack_moments(count, local_mean, m2), name + "/forward"),
                num_channels,
            )
        inv_std = tf.math.rsqrt(variance + epsilon)
        scale = gamma * inv_std
        mean_high, mean_low = stats.split_mean(mean)
        if use_kernels and not fused_single:
            # Identical on every replica: it depends on global statistics only.
            exact_path = _far_from_zero(mean_high, variance)

        def choose(exact_fn, fused_fn):
            if not use_kernels:
                return exact_fn()
            return tf.cond(exact_path, exact_fn, fused_fn)

        def centre(x):
            # Not x * scale + (beta - mean * scale): that cancels when |mean| >> std.
            return (x - tf.reshape(mean_high, channel_shape)) - tf.reshape(mean_low, channel_shape)

        def normalize_exact():
            return centre(x) * tf.reshape(scale, channel_shape) + tf.reshape(beta, channel_shape)

        def normalize_fused():
            if fused_single:
                return tf.reshape(y4, tf.shape(x))
            y4_global = _fused_affine(_channels_last_4d(x), scale, beta - mean_high * scale)
            return tf.reshape(y4_global, tf.shape(x))

        y = choose(normalize_exact, normalize_fused)

        def sums_exact(dy):
            x_hat = centre(x) * tf.reshape(inv_std, channel_shape)
            return (
                tf.reduce_sum(dy, axis=axes),
                tf.reduce_sum(dy * x_hat, axis=axes),
                dy * tf.reshape(scale, channel_shape),
            )

        def sums_fused(dy):
            # Inference-mode gradient kernel: dy * gamma * inv_std and both sums.
            dx_partial, sum_dy_xhat, sum_dy, _, _ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=_channels_last_4d(dy),
                x=_channels_last_4d(x),
                scale=gamma,
                reserve_space_1=mean_high,
                reserve_space_2=variance,
                reserve_space_3=tf.zeros([0]),
                epsilon=epsilon,
                is_training=False,
            )
            return sum_dy, sum_dy_xhat, tf.reshape(dx_partial, tf.shape(x))

        def corrections(global_sum_dy, global_sum_dy_xhat):
            # dx = dx_partial - scale * w / N * (sum dy + x_hat * sum dy x_hat)
            #    = dx_partial + w * (x_hat * slope + intercept), per channel.
            inv_count = 1.0 / tf.maximum(global_count, 1.0)
            return -scale * global_sum_dy_xhat * inv_count, -scale * global_sum_dy * inv_count

        def dx_exact(dx_partial, slope, intercept):
            x_hat = centre(x) * tf.reshape(inv_std, channel_shape)
            correction = x_hat * tf.reshape(slope, channel_shape) + tf.reshape(
                intercept, channel_shape
            )
            if selection is not None:
                correction = correction * selection[0]
            return dx_partial + correction

        def dx_fused(dx_partial, slope, intercept):
            # x_hat * slope + intercept == x * (slope * inv_std) + (intercept - mean * ...)
            per_x = slope * inv_std
            correction = _fused_affine(_channels_last_4d(x), per_x, intercept - mean_high * per_x)
            return dx_partial + tf.reshape(correction, tf.shape(x))

        def synced_grad(dy):
            sum_dy, sum_dy_xhat, dx_partial = choose(
                lambda: sums_exact(dy), lambda: sums_fused(dy)
            )
            global_sums = stats.unpack_grad_sums(
                all_sum(stats.pack_grad_sums(sum_dy, sum_dy_xhat), name + "/backward"),
                num_channels,
            )
            slope, intercept = corrections(*global_sums)
            dx = choose(
                lambda: dx_exact(dx_partial, slope, intercept),
                lambda: dx_fused(dx_partial, slope, intercept),
            )
            return dx, sum_dy_xhat, sum_dy

        def single_exact_grad(dy):
            # One replica far from zero, or with < 2 samples: no collective at all.
            sum_dy, sum_dy_xhat, dx_partial = sums_exact(dy)
            slope, intercept = corrections(sum_dy, sum_dy_xhat)
            return dx_exact(dx_partial, slope, intercept), sum_dy_xhat, sum_dy

        def single_fused_grad(dy):
            dx4, dgamma, dbeta, _, _ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=_channels_last_4d(dy),
                x=_channels_last_4d(x),
                scale=gamma,
                reserve_space_1=reserve[0],
                reserve_space_2=reserve[1],
                reserve_space_3=reserve[2],
                epsilon=epsilon,
                is_training=True,
            )
            return tf.reshape(dx4, tf.shape(x)), dgamma, dbeta

        def grad(dy, d_mean, d_variance, d_count):
            del d_mean, d_variance, d_count  # Statistics are not differentiable.
            dy = tf.cast(dy, tf.float32)
            if fused_single:
                return tf.cond(
                    exact_path, lambda: single_exact_grad(dy), lambda: single_fused_grad(dy)
                )
            return synced_grad(dy)

        stat_outputs = (tf.cast(mean, tf.float32), tf.identity(variance), tf.identity(global_count))
        return (y,) + stat_outputs, grad

    y, mean, variance, count = normalize(x, gamma, beta)
    return y, tf.stop_gradient(mean), tf.stop_gradient(variance), tf.stop_gradient(count)


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
