"""The moving-statistics update: Keras's EMA, its bias-corrected form, and bad batches.

Pure TensorFlow math on tensors, no Keras and no collectives: the layer
passes in the global batch statistics (identical on every replica, so every
decision made here is identical on every replica too) and assigns what comes
back. See docs/moving-statistics.md.

With momentum `a` and global batch statistics `s_1, ..., s_t`:

* `"ema"` (Keras): `m_t = a * m_{t-1} + (1 - a) * s_t`, starting from the
  initial value `m_0`, which keeps the weight `a**t`.
* `"debiased"`: `m_t = sum_i a**(t-i) * (1 - a) * s_i / (1 - a**t)`, the same
  weights normalized to sum to 1, so `m_0` has no weight (`m_1 = s_1`). As a
  recurrence it is Keras's update with the step-dependent rate
  `(1 - a) / (1 - a**t)` instead of `1 - a`.

A step whose global batch is empty changes nothing (no update, no count), and
neither does a channel with no sample (a mask on a channel axis that is not
last gives each channel its own count: Keras would average zeros in). A
step whose global statistics are not finite (NaN or inf in any channel) is
handled by `nonfinite`: `"skip"` keeps the old values (selected, never
multiplied by 0, since `NaN * 0` is NaN), `"update"` averages them in as
Keras does, `"raise"` fails the step.

With batch renormalization (`renorm=True`), `next_renorm_statistics` updates
Keras's five moving weights under the same decisions, all together.
"""

import tensorflow as tf

from syncbn import stats

MOVING_AVERAGES = ("ema", "debiased")
NONFINITE = ("skip", "update", "raise")


def check_moving_average(value):
    if not isinstance(value, str) or value not in MOVING_AVERAGES:
        raise ValueError(
            f"Argument `moving_average` must be one of {MOVING_AVERAGES}. "
            f"Received: moving_average={value!r}"
        )
    return value


def check_nonfinite(value):
    if not isinstance(value, str) or value not in NONFINITE:
        raise ValueError(
            f"Argument `nonfinite` must be one of {NONFINITE}. Received: nonfinite={value!r}"
        )
    return value


def debiased_rate(momentum, updates):
    """`(1 - a) / (1 - a**t)`: the weight of the t-th statistics in the debiased average.

    Computed in float64 (`1 - a**t` is small for momentum near 1 and few
    steps, where float32 would lose digits) and returned in float32.

    Args:
        momentum: Python float `a` in `[0, 1)`.
        updates: float tensor `t >= 1`, the number of updates including this one.
    """
    updates = tf.cast(updates, tf.float64)
    if momentum == 0.0:
        return tf.ones_like(updates, tf.float32)
    # 1 - a**t as -expm1(t * log a): exact even when a**t is close to 1.
    weight_sum = -tf.math.expm1(updates * tf.math.log(tf.constant(momentum, tf.float64)))
    return tf.cast((1.0 - momentum) / weight_sum, tf.float32)


def unbiased_variance(variance, count):
    """The biased `variance` of `count` samples with Bessel's correction, `n / (n - 1)`.

    As TensorFlow's fused batch-norm kernels correct it: by `n / max(n - 1, 1)`,
    so one sample (variance 0) stays 0. `count` is a float32 scalar or a
    Python float (a static count costs no op).
    """
    if stats.is_static_count(count):
        return variance * (count / max(count - 1.0, 1.0))
    return variance * (count / tf.maximum(count - 1.0, 1.0))


def _decision(mean, variance, count, nonfinite):
    """`(update, nonfinite_step)` of one step, from the global statistics only.

    `update` says what to update: True (every channel, known when tracing),
    False (nothing: a static count of 0), or a bool tensor, a scalar or, with
    a count per channel, `[C]` (a channel with no sample keeps its values).
    `nonfinite_step` is a scalar bool: some statistics are not finite (NaN
    or inf, in any channel) and some channel has samples.
    """
    # One finiteness check for both: [C], [C] -> [2C].
    finite = tf.reduce_all(tf.math.is_finite(tf.concat([mean, variance], axis=0)))
    if stats.is_static_count(count):
        # Known when tracing (a static shape): the emptiness test costs no op.
        if count == 0:
            return False, tf.constant(False)
        return (True if nonfinite == "update" else finite), tf.logical_not(finite)
    nonempty = count > 0
    any_nonempty = tf.reduce_any(nonempty) if count.shape.rank else nonempty
    nonfinite_step = tf.logical_and(any_nonempty, tf.logical_not(finite))
    return (nonempty if nonfinite == "update" else tf.logical_and(nonempty, finite)), nonfinite_step


def _select(update, candidate, old):
    return candidate if update is True else tf.where(update, candidate, old)


def _weights(momentum, moving_average, updates, update):
    """`(keep, rate, new updates)`: the weights of the old value and of this step's statistics.

    `"ema"`: `momentum` and `1 - momentum` rounded to float32 as Keras's
    update rounds them (one constant each, shared by every average);
    `"debiased"`: float32 tensors.
    """
    if moving_average != "debiased":
        return _constant(momentum), _constant(1.0 - momentum), None
    new_updates = updates + 1.0
    rate = debiased_rate(momentum, new_updates)
    return 1.0 - rate, rate, _select(update, new_updates, updates)


def _constant(value):
    return tf.constant(value, tf.float32)


def _average(moving, batch_value, keep, rate):
    # Keras's form, m * a + s * (1 - a), so that "ema" rounds exactly as Keras BN does.
    return moving * keep + batch_value * rate


def next_moving_statistics(moving_mean, moving_variance, mean, variance, count, *,
                           momentum, moving_average="ema", updates=None, nonfinite="skip"):
    """The moving statistics after one step with global batch statistics `mean`, `variance`.

    Args:
        moving_mean, moving_variance: float32 `[C]`, the current values.
        mean, variance: float32 `[C]`, the global batch mean and biased
            variance (the same on every replica).
        count: the global batch's sample count: a float32 scalar, a float32
            `[C]` when each channel has its own (a mask on a channel axis
            that is not last), or a Python float when it is known when
            tracing. Channels with no sample keep their values.
        momentum: Python float in `[0, 1)`.
        moving_average: `"ema"` or `"debiased"`.
        updates: float32 scalar or `[C]`, updates made so far (`"debiased"` only).
        nonfinite: `"skip"`, `"update"` or `"raise"` (the caller raises: see
            `Returns`).

    Returns:
        `(moving_mean, moving_variance, updates, nonfinite_step)`: the new
        values (`updates` is None for `"ema"`), and a scalar bool that is True
        if this step's statistics were not finite (and the batch not empty).
    """
    update, nonfinite_step = _decision(mean, variance, count, nonfinite)
    if update is False:
        return moving_mean, moving_variance, updates, nonfinite_step
    keep, rate, updates = _weights(momentum, moving_average, updates, update)
    return (_select(update, _average(moving_mean, mean, keep, rate), moving_mean),
            _select(update, _average(moving_variance, variance, keep, rate), moving_variance),
            updates, nonfinite_step)


RENORM_STATE = ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")


def next_renorm_statistics(state, mean, variance, count, *, epsilon, momentum, renorm_momentum,
                           moving_average="ema", updates=None, nonfinite="skip"):
    """Batch renormalization's five moving weights after one step, as Keras 3 updates them.

    With `stddev = sqrt(variance + epsilon)` of the global batch:
    `renorm_mean` and `renorm_stddev`, which give the next steps' `r` and
    `d`, are exponential averages at `renorm_momentum`, always (they are
    part of what training computes, so they follow Keras exactly);
    `moving_mean` and `moving_stddev` are averages at `momentum`, `"ema"` or
    `"debiased"` (then `updates` counts them); `moving_variance`, what
    inference uses, is derived: `relu(moving_stddev**2 - epsilon)`. The
    emptiness and `nonfinite` decisions are `next_moving_statistics`'s, for
    all five at once: a skipped step or an empty channel changes none of them.

    Args:
        state: dict of the current float32 `[C]` values, keyed by `RENORM_STATE`.
        mean, variance, count, momentum, moving_average, updates, nonfinite:
            as for `next_moving_statistics`.
        epsilon: the layer's epsilon.
        renorm_momentum: Python float in `[0, 1)`.

    Returns:
        `(state, updates, nonfinite_step)`: the new values, keyed as `state`.
    """
    update, nonfinite_step = _decision(mean, variance, count, nonfinite)
    if update is False:
        return dict(state), updates, nonfinite_step
    keep, rate, updates = _weights(momentum, moving_average, updates, update)
    stddev = tf.sqrt(variance + epsilon)
    moving_stddev = _average(state["moving_stddev"], stddev, keep, rate)
    renorm_keep, renorm_rate = _constant(renorm_momentum), _constant(1.0 - renorm_momentum)
    averages = {
        "renorm_mean": _average(state["renorm_mean"], mean, renorm_keep, renorm_rate),
        "renorm_stddev": _average(state["renorm_stddev"], stddev, renorm_keep, renorm_rate),
        "moving_mean": _average(state["moving_mean"], mean, keep, rate),
        "moving_stddev": moving_stddev,
        # ReLU, as Keras: rounding may take the square below epsilon.
        "moving_variance": tf.nn.relu(moving_stddev * moving_stddev - epsilon),
    }
    new_state = {name: _select(update, value, state[name]) for name, value in averages.items()}
    return new_state, updates, nonfinite_step
