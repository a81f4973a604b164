"""Test-session setup shared by every test module.

The in-process replica tests need several CPU devices; TensorFlow only
accepts the split before it initializes its devices, so it happens here,
before any test module runs a TensorFlow op.
"""

import os
import sys
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS_DIR)

NUM_VIRTUAL_CPUS = 4

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_VIRTUAL_CPUS
)


KERNELS = ("elementwise", "fused")  # syncbn.ops.kernels_for's two answers


def kernels_env(kernels):
    """A context manager: `SYNCBN_KERNELS=kernels` for what is traced inside the block."""
    return mock.patch.dict(os.environ, {"SYNCBN_KERNELS": kernels})


@pytest.fixture(params=KERNELS)
def kernels(request, monkeypatch):
    """Runs a test with each kernel set for channels-last data.

    On a CPU syncbn runs element-wise kernels and on a GPU TensorFlow's fused
    ones (syncbn.ops.kernels_for); no GPU reaches the tests, so the fused
    path is forced here, through `SYNCBN_KERNELS`.
    """
    monkeypatch.setenv("SYNCBN_KERNELS", request.param)
    return request.param


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "compat: also run on every older supported TensorFlow (tests/run.sh's second pass)",
    )


@pytest.fixture(scope="session")
def mirrored_strategy():
    """The one MirroredStrategy over the virtual CPUs that every test shares.

    TF 2.18 gives the collectives of two strategies on the same devices
    colliding instance keys ("Shape mismatch in the collective instance"),
    so no test module may create its own.
    """
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(NUM_VIRTUAL_CPUS)])


# Job scripts run inside launched processes; they are not for import by pytest
# (tests/run.sh collects doctests with --doctest-modules).
collect_ignore = ["jobs", "launch_jobs"]
