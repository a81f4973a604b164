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


def counts_per_channel(rank, axis, masked):
    """True if each channel has its own sample count: a mask, and a channel axis that is not last.

    Keras's mask convention (`mask_weights`) broadcasts the mask over the
    LAST axis. With the channels last, every channel sees the same
    positions and one count serves all; with another channel axis the mask
    covers the channel axis, so the counts differ per channel. A static
    fact, known when tracing.
    """
    return masked and axis != rank - 1


def mask_weights(mask, x, axis):
    """A Keras mask -> 0/1 weights shaped like `x`, and the count they select.

    Keras's convention (`keras.layers.BatchNormalization`, and the masks
    `Masking` and `Embedding(mask_zero=True)` produce): `mask` has the rank
    of `x` minus one and broadcasts against `x`'s shape without its LAST
    axis; it is expanded at the last axis and broadcast over it, whatever the
    channel axis. Its entries are treated as booleans.

    Returns `(weights, count)`: float weights shaped like `x`, and the float32
    number of selected positions per channel, one scalar when the channel axis
    is last (every channel the same), `[C]` otherwise (`counts_per_channel`).
    """
    rank = x.shape.rank
    selected = tf.broadcast_to(tf.cast(tf.cast(mask, tf.bool), x.dtype), tf.shape(x)[:-1])
    weights = tf.broadcast_to(tf.expand_dims(selected, -1), tf.shape(x))
    if not counts_per_channel(rank, axis, True):
        return weights, tf.reduce_sum(selected)
    # The weights repeat along the last axis: count on the mask, times its length.
    other_axes = [i for i in range(rank - 1) if i != axis]
    last_size = tf.cast(tf.shape(x)[-1], x.dtype)
    return weights, tf.reduce_sum(selected, axis=other_axes) * last_size


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
        `(count, mean, m2)`: the float32 count of samples per channel (a
        scalar, or `[C]` when a mask gives each channel its own; may be 0),
        the float64 `[C]` mean and the float32 `[C]` centred sum of squares.
        Where the count is 0 the mean and `m2` are 0, never NaN.
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
    `[1], [C], [C] -> [2C + 1]`; with a count per channel (`[C]`, see
    `counts_per_channel`) `[C], [C], [C] -> [3C]`. `count` may be a Python
    float (a static shape), which costs no op.
    """
    if is_static_count(count):
        count64 = tf.constant([count], STATS_DTYPE)
    else:
        count64 = tf.reshape(tf.cast(count, STATS_DTYPE), [-1])
    mean64 = tf.cast(mean, STATS_DTYPE)  # already float64 from local_moments
    sum_x = count64 * mean64
    return tf.concat([count64, sum_x, tf.cast(m2, STATS_DTYPE) + sum_x * mean64], axis=0)


def unpack_moments(packed_sums, num_channels, per_channel_count=False):
    """Global count, mean and biased variance from the all-reduced vector.

    `[2C + 1] -> [], [C], [C]`, or with `per_channel_count`
    `[3C] -> [C], [C], [C]`: float32 count, float64 mean (see `split_mean`)
    and float32 variance; mean and variance are 0 where no replica had any
    sample (a global count of 0).
    """
    count_size = num_channels if per_channel_count else 1
    # One split op, not three strided slices: fewer nodes in every traced step.
    global_count, sum_x, sum_sq = tf.split(packed_sums, [count_size, num_channels, num_channels])
    safe_count = tf.maximum(global_count, 1.0)  # [1] or [C], against [C]
    mean = sum_x / safe_count
    # Clamp the float64 rounding residue; the combine itself cannot go negative.
    variance = tf.maximum((sum_sq - sum_x * mean) / safe_count, 0.0)
    if not per_channel_count:
        global_count = tf.squeeze(global_count, 0)
    return tf.cast(global_count, tf.float32), mean, tf.cast(variance, tf.float32)


def pack_grad_sums(sum_dy, sum_dy_xhat):
    """`[C], [C] -> [2C]`: the two per-channel sums the backward pass all-reduces."""
    return tf.concat([sum_dy, sum_dy_xhat], axis=0)


def unpack_grad_sums(packed_sums, num_channels):
    """`[2C] -> [C], [C]`."""
    del num_channels  # Two equal halves.
    sum_dy, sum_dy_xhat = tf.split(packed_sums, 2)
    return sum_dy, sum_dy_xhat
