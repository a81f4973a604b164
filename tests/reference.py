"""Batch normalization in float64 NumPy: the ground truth the tests compare with.

Written from the textbook definitions (Ioffe & Szegedy, 2015; batch
renormalization: Ioffe, 2017) with Keras's masks, on the global batch,
independently of syncbn's packing and collectives.
"""

import numpy as np

from syncbn.check import reference as library_reference


def _channel_shape(x, axis):
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return shape


def _weights(x, mask):
    """Keras's mask convention: the shape of `x` without its LAST axis, broadcast over it."""
    if mask is None:
        return np.ones_like(x)
    return np.broadcast_to(np.expand_dims(np.asarray(mask, bool), -1), x.shape).astype(np.float64)


def batch_norm(x, gamma, beta, dy, axis, epsilon=1e-3, mask=None, renorm=None):
    """Forward and backward of training-mode batch norm on one (global) batch.

    A channel with no selected sample (an empty batch, or all masked out)
    gets mean 0 and variance 0, as Keras's and syncbn's layers give it.
    `renorm`, if given, is a dict with `mean` and `stddev` (the renorm
    moving statistics before the step) and optional `rmin`, `rmax`, `dmax`:
    `y = gamma * (x_hat * r + d) + beta`, `r` and `d` constant to the gradient.

    Returns a dict with `y`, `dx`, `dgamma`, `dbeta`, `mean`, `variance`
    (biased) and `count` (per channel), all float64.
    """
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    axis = axis % x.ndim
    axes = tuple(i for i in range(x.ndim) if i != axis)
    shape = _channel_shape(x, axis)
    w = _weights(x, mask)
    count = w.sum(axis=axes)
    safe_count = np.maximum(count, 1.0)
    mean = (w * x).sum(axis=axes) / safe_count
    variance = (w * (x - mean.reshape(shape)) ** 2).sum(axis=axes) / safe_count
    inv_std = 1.0 / np.sqrt(variance + epsilon)
    x_hat = (x - mean.reshape(shape)) * inv_std.reshape(shape)
    gamma = np.asarray(gamma, np.float64)
    r, d = renorm_correction(mean, variance, epsilon, renorm)
    y = gamma.reshape(shape) * (x_hat * r.reshape(shape) + d.reshape(shape)) + np.asarray(
        beta, np.float64).reshape(shape)
    sum_dy = dy.sum(axis=axes)
    sum_dy_xhat = (dy * x_hat).sum(axis=axes)
    dx = (gamma * r * inv_std).reshape(shape) * (
        dy - w / safe_count.reshape(shape) * (sum_dy.reshape(shape)
                                              + x_hat * sum_dy_xhat.reshape(shape))
    )
    return {
        "y": y,
        "dx": dx,
        "dgamma": r * sum_dy_xhat + d * sum_dy,
        "dbeta": sum_dy,
        "mean": mean,
        "variance": variance,
        "count": count,
    }


def renorm_correction(mean, variance, epsilon, renorm):
    """Batch renormalization's `(r, d)` per channel; `(1, 0)` without renorm."""
    if renorm is None:
        return np.ones_like(mean), np.zeros_like(mean)
    stddev = np.maximum(np.asarray(renorm["stddev"], np.float64), np.sqrt(epsilon))
    r = np.sqrt(variance + epsilon) / stddev
    d = (mean - np.asarray(renorm["mean"], np.float64)) / stddev
    if renorm.get("rmin") is not None:
        r = np.maximum(r, renorm["rmin"])
    if renorm.get("rmax") is not None:
        r = np.minimum(r, renorm["rmax"])
    if renorm.get("dmax") is not None:
        d = np.clip(d, -renorm["dmax"], renorm["dmax"])
    return r, d


def moving_average(moving, batch_value, momentum, count=None):
    """Keras's update (the library's one definition); with `count`, channels with no sample
    keep `moving` (syncbn's rule)."""
    updated = library_reference.moving_average(moving, batch_value, momentum)
    return updated if count is None else np.where(np.asarray(count) > 0, updated, moving)


RENORM_WEIGHTS = ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")


def renorm_moving_statistics(state, mean, variance, count, epsilon, momentum, renorm_momentum):
    """Keras's five renorm moving weights after one step (channels with no sample keep theirs)."""
    stddev = np.sqrt(variance + epsilon)
    moving_stddev = moving_average(state["moving_stddev"], stddev, momentum)
    new = {
        "renorm_mean": moving_average(state["renorm_mean"], mean, renorm_momentum),
        "renorm_stddev": moving_average(state["renorm_stddev"], stddev, renorm_momentum),
        "moving_mean": moving_average(state["moving_mean"], mean, momentum),
        "moving_stddev": moving_stddev,
        "moving_variance": np.maximum(moving_stddev ** 2 - epsilon, 0.0),
    }
    return {name: np.where(np.asarray(count) > 0, new[name], state[name]) for name in RENORM_WEIGHTS}
