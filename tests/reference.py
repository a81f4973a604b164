"""Batch normalization in float64 NumPy: the ground truth the tests compare with.

Written from the textbook definition (Ioffe & Szegedy, 2015) with masks, on
the global batch, independently of syncbn's packing and collectives.
"""

import numpy as np

# Keras's moving-average update: one definition, the library's.
from syncbn.check.reference import moving_average  # noqa: F401


def _channel_shape(x, axis):
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return shape


def _weights(x, axis, mask):
    if mask is None:
        return np.ones_like(x)
    return np.broadcast_to(np.expand_dims(np.asarray(mask, bool), axis), x.shape).astype(np.float64)


def batch_norm(x, gamma, beta, dy, axis, epsilon=1e-3, mask=None):
    """Forward and backward of training-mode batch norm on one (global) batch.

    Returns a dict with `y`, `dx`, `dgamma`, `dbeta`, `mean`, `variance`
    (biased), all float64.
    """
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    axis = axis % x.ndim
    axes = tuple(i for i in range(x.ndim) if i != axis)
    shape = _channel_shape(x, axis)
    w = _weights(x, axis, mask)
    count = w.sum(axis=axes)[0] if x.size else 0.0
    mean = (w * x).sum(axis=axes) / count
    variance = (w * (x - mean.reshape(shape)) ** 2).sum(axis=axes) / count
    inv_std = 1.0 / np.sqrt(variance + epsilon)
    x_hat = (x - mean.reshape(shape)) * inv_std.reshape(shape)
    gamma = np.asarray(gamma, np.float64)
    y = gamma.reshape(shape) * x_hat + np.asarray(beta, np.float64).reshape(shape)
    sum_dy = dy.sum(axis=axes)
    sum_dy_xhat = (dy * x_hat).sum(axis=axes)
    dx = (gamma * inv_std).reshape(shape) * (
        dy - w / count * (sum_dy.reshape(shape) + x_hat * sum_dy_xhat.reshape(shape))
    )
    return {
        "y": y,
        "dx": dx,
        "dgamma": sum_dy_xhat,
        "dbeta": sum_dy,
        "mean": mean,
        "variance": variance,
    }
