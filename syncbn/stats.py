"""Batch-norm statistics as pure TensorFlow functions.

Nothing here knows about processes or Keras. A cross-replica reduction enters
only as the `all_sum` callable that the caller passes in, so every function can
be tested in one process with `all_sum=tf.identity` (one replica) or with a
hand-made sum over several simulated replicas.

How statistics are combined, and why it is exact for uneven batches:

Each replica `i` holds `n_i` samples (possibly 0) and computes, in float32,
its local mean `mu_i` and its *centred* sum of squares
`M2_i = sum((x - mu_i)**2)` with two passes over its data. It then sends, in
float64, the three sums

    n_i,    n_i * mu_i,    M2_i + n_i * mu_i**2

to one all-reduce. From the totals `N, S1, S2`:

    mean = S1 / N
    var  = (S2 - S1**2 / N) / N  =  (sum_i M2_i + sum_i n_i (mu_i - mean)**2) / N

which is Chan et al.'s pairwise update summed over all replicas at once. The
subtraction happens only on the float64 totals, so its relative error is about
`2**-52 * (mean / std)**2` (1e-6 at mean/std = 1e5), whereas the E[x^2]-E[x]^2
formula on float32 data loses everything once mean/std passes ~3e3.
Counts weight every replica, so replicas with 0 samples add nothing and
uneven batches combine exactly.
"""

import tensorflow as tf

STATS_DTYPE = tf.float64


def reduction_axes(rank, axis):
    """All axes of a rank-`rank` tensor except the (non-negative) channel axis."""
    return [i for i in range(rank) if i != axis]


def mask_weights(mask, x, axis):
    """Turns a mask without the channel axis into 0/1 weights shaped like `x`.

    `mask` has the shape of `x` with `axis` removed (Keras's convention); its
    entries are treated as booleans. Returns `(weights, count)` where `count`
    is the float32 number of selected positions (per channel).
    """
    selected = tf.cast(tf.cast(mask, tf.bool), x.dtype)
    count = tf.reduce_sum(selected)
    weights = tf.broadcast_to(tf.expand_dims(selected, axis), tf.shape(x))
    return weights, count


def local_moments(x, axes, mask=None):
    """Count, mean and centred sum of squares of one replica's batch.

    The sums run on `x - shift`, where `shift` is the mean of this replica's
    first sample: any shift is exact algebra, and one close to the data keeps
    the float32 sums small, so the mean of data at 1e5 with std 1 is not lost
    to rounding in a float32 sum of 1e5-sized values.

    Args:
        x: float32 tensor.
        axes: axes to reduce (every axis but the channel axis).
        mask: optional `(weights, count)` pair from `mask_weights`.

    Returns:
        `(count, mean, m2)`: a float32 scalar (samples per channel, may be
        0), the float64 `[C]` mean and the float32 `[C]` centred sum of
        squares. With `count == 0` the mean and `m2` are 0, never NaN.
    """
    first = x[:1]
    first_size = tf.cast(tf.size(first), tf.float32) / tf.cast(tf.shape(x)[_channel_axis(x, axes)], tf.float32)
    shift = tf.reduce_sum(first, axis=axes) / tf.maximum(first_size, 1.0)
    shifted = x - _expand(shift, x, axes)
    if mask is None:
        shape = tf.shape(x, out_type=tf.int64)
        count = tf.cast(tf.reduce_prod(tf.gather(shape, axes)), tf.float32)
        mean_offset = tf.reduce_sum(shifted, axis=axes) / tf.maximum(count, 1.0)
        centred = shifted - _expand(mean_offset, x, axes)
    else:
        weights, count = mask
        mean_offset = tf.reduce_sum(shifted * weights, axis=axes) / tf.maximum(count, 1.0)
        centred = (shifted - _expand(mean_offset, x, axes)) * weights
    m2 = tf.reduce_sum(tf.square(centred), axis=axes)
    mean = tf.cast(shift, STATS_DTYPE) + tf.cast(mean_offset, STATS_DTYPE)
    return count, mean, m2


def split_mean(mean):
    """float64 `[C]` -> float32 `(high, low)` with `high + low` ~= `mean`.

    `(x - high) - low` centres float32 data to float32 precision even when
    |mean| >> std: `x - high` is exact for data near the mean (Sterbenz).
    """
    high = tf.cast(mean, tf.float32)
    low = tf.cast(mean - tf.cast(high, STATS_DTYPE), tf.float32)
    return high, low


def _channel_axis(x, axes):
    return [a for a in range(x.shape.rank) if a not in axes][0]


def _expand(vector, x, axes):
    """Reshapes a `[C]` vector so it broadcasts against `x` (reduced on `axes`)."""
    shape = [1] * x.shape.rank
    shape[_channel_axis(x, axes)] = -1
    return tf.reshape(vector, shape)


def is_static_count(count):
    """True if `count` is known when tracing: a Python float, from a static shape.

    Static counts, and what is derived from them, cost no op in the traced
    graph; a count that depends on the batch is a float32 tensor.
    """
    return isinstance(count, float)


def pack_moments(count, mean, m2):
    """Packs one replica's moments into the float64 vector that is all-reduced.

    Layout: `[count] + [count * mean] + [m2 + count * mean**2]`, shapes
    `[1], [C], [C] -> [2C + 1]`. `count` may be a Python float (a static
    shape), which costs no op.
    """
    if is_static_count(count):
        count64 = tf.constant([count], STATS_DTYPE)
    else:
        count64 = tf.reshape(tf.cast(count, STATS_DTYPE), [1])
    mean64 = tf.cast(mean, STATS_DTYPE)  # already float64 from local_moments
    sum_x = count64 * mean64
    return tf.concat([count64, sum_x, tf.cast(m2, STATS_DTYPE) + sum_x * mean64], axis=0)


def unpack_moments(packed_sums, num_channels):
    """Global count, mean and biased variance from the all-reduced vector.

    `[2C + 1] -> [], [C], [C]`: float32 count, float64 mean (see
    `split_mean`) and float32 variance; mean and variance are 0 when no
    replica had any sample (`global_count == 0`).
    """
    # One split op, not three strided slices: fewer nodes in every traced step.
    global_count, sum_x, sum_sq = tf.split(packed_sums, [1, num_channels, num_channels])
    safe_count = tf.maximum(global_count, 1.0)  # [1], broadcast against [C]
    mean = sum_x / safe_count
    # Clamp the float64 rounding residue; the combine itself cannot go negative.
    variance = tf.maximum((sum_sq - sum_x * mean) / safe_count, 0.0)
    return tf.cast(tf.squeeze(global_count, 0), tf.float32), mean, tf.cast(variance, tf.float32)


def pack_grad_sums(sum_dy, sum_dy_xhat):
    """`[C], [C] -> [2C]`: the two per-channel sums the backward pass all-reduces."""
    return tf.concat([sum_dy, sum_dy_xhat], axis=0)


def unpack_grad_sums(packed_sums, num_channels):
    """`[2C] -> [C], [C]`."""
    del num_channels  # Two equal halves.
    sum_dy, sum_dy_xhat = tf.split(packed_sums, 2)
    return sum_dy, sum_dy_xhat
