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

A step whose global batch is empty changes nothing (no update, no count). A
step whose global statistics are not finite (NaN or inf in any channel) is
handled by `nonfinite`: `"skip"` keeps the old values (selected, never
multiplied by 0, since `NaN * 0` is NaN), `"update"` averages them in as
Keras does, `"raise"` fails the step.
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


def next_moving_statistics(moving_mean, moving_variance, mean, variance, count, *,
                           momentum, moving_average="ema", updates=None, nonfinite="skip"):
    """The moving statistics after one step with global batch statistics `mean`, `variance`.

    Args:
        moving_mean, moving_variance: float32 `[C]`, the current values.
        mean, variance: float32 `[C]`, the global batch mean and biased
            variance (the same on every replica).
        count: float32 scalar, the global batch's sample count, or a Python
            float when it is known when tracing.
        momentum: Python float in `[0, 1)`.
        moving_average: `"ema"` or `"debiased"`.
        updates: float32 scalar, updates made so far (`"debiased"` only).
        nonfinite: `"skip"`, `"update"` or `"raise"` (the caller raises: see
            `Returns`).

    Returns:
        `(moving_mean, moving_variance, updates, nonfinite_step)`: the new
        values (`updates` is None for `"ema"`), and a scalar bool that is True
        if this step's statistics were not finite (and the batch not empty).
    """
    # One finiteness check for both: [C], [C] -> [2C].
    finite = tf.reduce_all(tf.math.is_finite(tf.concat([mean, variance], axis=0)))
    if stats.is_static_count(count):
        # Known when tracing (a static shape): the emptiness test costs no op.
        if count == 0:
            return moving_mean, moving_variance, updates, tf.constant(False)
        nonfinite_step = tf.logical_not(finite)
        update = True if nonfinite == "update" else finite
    else:
        nonempty = count > 0
        nonfinite_step = tf.logical_and(nonempty, tf.logical_not(finite))
        update = nonempty if nonfinite == "update" else tf.logical_and(nonempty, finite)

    def select(candidate, old):
        return candidate if update is True else tf.where(update, candidate, old)

    if moving_average == "debiased":
        new_updates = updates + 1.0
        rate = debiased_rate(momentum, new_updates)
        updates = select(new_updates, updates)
    else:
        rate = tf.constant(1.0 - momentum, tf.float32)
    # Keras's form, m - (m - s) * rate, so that "ema" rounds exactly as Keras BN does.
    return (select(moving_mean - (moving_mean - mean) * rate, moving_mean),
            select(moving_variance - (moving_variance - variance) * rate, moving_variance),
            updates, nonfinite_step)
