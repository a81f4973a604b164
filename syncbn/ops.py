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
"""

import tensorflow as tf

from syncbn import stats


def _as_vector(value, num_channels, fill):
    if value is None:
        return tf.fill([num_channels], tf.constant(fill, tf.float32))
    return tf.cast(value, tf.float32)


def sync_batch_norm(x, gamma, beta, *, axis, epsilon, all_sum, name, mask=None):
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
    channel_shape = [1] * rank
    channel_shape[axis] = num_channels

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        global_count, mean, variance = stats.global_moments(
            x, axes, num_channels, lambda t: all_sum(t, name + "/forward"), selection
        )
        inv_std = tf.math.rsqrt(variance + epsilon)
        scale = gamma * inv_std
        mean_high, mean_low = stats.split_mean(mean)

        def centre(x):
            # Not x * scale + (beta - mean * scale): that cancels when |mean| >> std.
            return (x - tf.reshape(mean_high, channel_shape)) - tf.reshape(mean_low, channel_shape)

        y = centre(x) * tf.reshape(scale, channel_shape) + tf.reshape(beta, channel_shape)

        def grad(dy, d_mean, d_variance, d_count):
            del d_mean, d_variance, d_count  # Statistics are not differentiable.
            dy = tf.cast(dy, tf.float32)
            x_hat = centre(x) * tf.reshape(inv_std, channel_shape)
            sum_dy = tf.reduce_sum(dy, axis=axes)
            sum_dy_xhat = tf.reduce_sum(dy * x_hat, axis=axes)
            global_sum_dy, global_sum_dy_xhat = stats.unpack_grad_sums(
                all_sum(stats.pack_grad_sums(sum_dy, sum_dy_xhat), name + "/backward"),
                num_channels,
            )
            inv_count = 1.0 / tf.maximum(global_count, 1.0)
            correction = (
                tf.reshape(global_sum_dy * inv_count, channel_shape)
                + x_hat * tf.reshape(global_sum_dy_xhat * inv_count, channel_shape)
            )
            if selection is not None:
                correction = correction * selection[0]
            dx = tf.reshape(scale, channel_shape) * (dy - correction)
            return dx, sum_dy_xhat, sum_dy

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
