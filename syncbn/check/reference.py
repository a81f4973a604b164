"""Batch normalization in float64 NumPy, written from the textbook definition.

The check's ground truth (Ioffe & Szegedy, 2015): forward and backward of
training-mode batch norm on one global batch, with no packing, no
collectives and no float32 shortcuts. No TensorFlow here, so it can be
tested on its own.
"""

import numpy as np


def _channel_shape(ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return shape


def batch_norm(x, gamma, beta, dy, axis, epsilon):
    """Training-mode batch norm of `x` and its gradient for the upstream `dy`.

    Args:
        x: the global batch, any rank >= 2, not empty.
        gamma, beta: `[C]` scale and offset.
        dy: upstream gradient, shaped like `x`.
        axis: the channel axis.
        epsilon: added to the variance.

    Returns:
        A dict of float64 arrays: `y` and `dx` shaped like `x`; `dgamma`,
        `dbeta`, `mean` and the biased `variance`, each `[C]`.

    Example:
        >>> x = np.array([[1.0], [3.0]])
        >>> out = batch_norm(x, [1.0], [0.0], np.ones_like(x), axis=1, epsilon=0.0)
        >>> out["y"].ravel().tolist(), out["mean"].tolist(), out["variance"].tolist()
        ([-1.0, 1.0], [2.0], [1.0])
    """
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(
            "Argument `x` must be a non-empty batch of rank >= 2. "
            f"Received: x.shape={x.shape}"
        )
    axis = axis % x.ndim
    axes = tuple(i for i in range(x.ndim) if i != axis)
    shape = _channel_shape(x.ndim, axis)
    count = x.size / x.shape[axis]
    mean = x.mean(axis=axes)
    centred = x - mean.reshape(shape)
    variance = (centred**2).mean(axis=axes)
    inv_std = 1.0 / np.sqrt(variance + epsilon)
    x_hat = centred * inv_std.reshape(shape)
    gamma = np.asarray(gamma, np.float64)
    beta = np.asarray(beta, np.float64)
    y = gamma.reshape(shape) * x_hat + beta.reshape(shape)
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * x_hat).sum(axis=axes)
    # d/dx of gamma * x_hat through the batch mean and variance.
    dx = (gamma * inv_std).reshape(shape) * (
        dy - (dbeta.reshape(shape) + x_hat * dgamma.reshape(shape)) / count
    )
    return {"y": y, "dx": dx, "dgamma": dgamma, "dbeta": dbeta, "mean": mean,
            "variance": variance}


def moving_average(moving, batch_value, momentum):
    """Keras's update: `moving * momentum + batch_value * (1 - momentum)`."""
    return np.asarray(moving, np.float64) * momentum + np.asarray(batch_value, np.float64) * (
        1.0 - momentum)


def relative_error(actual, expected):
    """`max |actual - expected| / max |expected|`: one number per pair of arrays.

    A NaN or an infinity on either side gives `inf`, so that it fails every
    tolerance: a NaN compares as neither above nor below one.

    Example:
        >>> round(relative_error([1.0, 2.001], [1.0, 2.0]), 6)
        0.0005
        >>> relative_error([float("nan")], [1.0]), relative_error([1.0], [float("nan")])
        (inf, inf)
    """
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        raise ValueError(
            "Arguments `actual` and `expected` must have the same shape. "
            f"Received: actual.shape={actual.shape}, expected.shape={expected.shape}"
        )
    if expected.size == 0:
        return 0.0
    if not (np.all(np.isfinite(actual)) and np.all(np.isfinite(expected))):
        return float("inf")
    scale = max(float(np.max(np.abs(expected))), np.finfo(np.float64).tiny)
    return float(np.max(np.abs(actual - expected)) / scale)
