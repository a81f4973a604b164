"""The statistics math alone: no processes, no Keras.

Several replicas are simulated by splitting a batch and adding the packed
vectors, which is exactly what any all-reduce computes.
"""

import numpy as np
import pytest
import tensorflow as tf

from helpers import relative_error
from syncbn import stats

pytestmark = pytest.mark.unit


def _simulated_global_moments(chunks, axes):
    packed = [stats.pack_moments(*stats.local_moments(tf.constant(c), axes)) for c in chunks]
    return stats.unpack_moments(tf.add_n(packed), chunks[0].shape[-1])


@pytest.mark.parametrize("counts", [[5, 0, 11, 3], [1, 1], [0, 7], [16]])
def test_uneven_and_empty_replicas_combine_exactly(counts):
    rng = np.random.default_rng(1)
    data = rng.normal(2.0, 3.0, (sum(counts), 3, 4)).astype(np.float32)
    chunks = np.split(data, np.cumsum(counts)[:-1])
    count, mean, variance = _simulated_global_moments(chunks, [0, 1])
    expected = data.astype(np.float64).reshape(-1, 4)
    assert float(count) == sum(counts) * 3
    assert relative_error(mean, expected.mean(0)) < 1e-6
    assert relative_error(variance, expected.var(0)) < 1e-6


def test_all_replicas_empty_gives_zeros_not_nan():
    chunks = [np.zeros((0, 5), np.float32)] * 3
    count, mean, variance = _simulated_global_moments(chunks, [0])
    assert float(count) == 0.0
    np.testing.assert_array_equal(mean.numpy(), 0.0)
    np.testing.assert_array_equal(variance.numpy(), 0.0)


def _naive_variance(chunks):
    # The E[x^2] - E[x]^2 formula in float32, as many sync-BN layers compute it.
    total = sum(np.sum(c, 0, dtype=np.float32) for c in chunks)
    total_sq = sum(np.sum(np.square(c), 0, dtype=np.float32) for c in chunks)
    n = np.float32(sum(len(c) for c in chunks))
    return total_sq / n - np.square(total / n)


@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_large_offset_does_not_cancel(offset):
    rng = np.random.default_rng(2)
    data = (offset + rng.normal(0.0, 1.0, (4096, 8))).astype(np.float32)
    chunks = [data[:1000], data[1000:]]
    _, _, variance = _simulated_global_moments(chunks, [0])
    truth = data.astype(np.float64).var(0)
    assert relative_error(variance, truth) <= 1e-3
    # The same data breaks the naive formula: this test can tell the two apart.
    assert relative_error(_naive_variance(chunks), truth) > 1e-1


def test_mask_counts_only_selected_positions():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 5, 3)).astype(np.float32)
    mask = rng.random((6, 5)) > 0.4
    weights = stats.mask_weights(tf.constant(mask), tf.constant(x), 2)
    count, mean, m2 = stats.local_moments(tf.constant(x), [0, 1], weights)
    selected = x[mask].astype(np.float64)
    assert float(count) == mask.sum()
    assert relative_error(mean, selected.mean(0)) < 1e-6
    assert relative_error(m2, ((selected - selected.mean(0)) ** 2).sum(0)) < 1e-5


def test_pack_layout_is_count_sums_squares():
    packed = stats.pack_moments(tf.constant(2.0), tf.constant([1.0, 3.0]), tf.constant([0.5, 0.0]))
    # [1], [C], [C] -> [2C + 1]
    np.testing.assert_array_equal(packed.numpy(), [2.0, 2.0, 6.0, 2.5, 18.0])
    assert packed.dtype == tf.float64
