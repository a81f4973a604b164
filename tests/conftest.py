"""Test-session setup shared by every test module.

The in-process replica tests need several CPU devices; TensorFlow only
accepts the split before it initializes its devices, so it happens here,
before any test module runs a TensorFlow op.
"""

import os
import re
import subprocess
import sys
import time
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


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """The login node of a Slurm cluster of 2 simulated nodes, one per test session.

    `syncbn-launch --simulate-hosts 2 --slurm` runs in the background (munged,
    slurmctld, a slurmd per node, launch/slurm.py) with a login command that
    only waits; commands run with the returned environment (`SLURM_CONF` set,
    this checkout and the test jobs on `PYTHONPATH`) from this process's
    network namespace, the login node. Stopping the launcher at the end of the
    session tears the cluster down. Needs root and Debian's Slurm and munge.
    """
    repo = os.path.dirname(TESTS_DIR)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, TESTS_DIR]),
           "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path_factory.mktemp("slurm-cluster") / "launcher.log"
    with open(log_path, "w") as log:
        # The launcher's --timeout ends a cluster that outlives a killed test session.
        launcher = subprocess.Popen(
            [sys.executable, "-m", "launch", "--simulate-hosts", "2", "--slurm",
             "--timeout", "7200", "--", "sh", "-c", 'echo "slurm_conf=$SLURM_CONF"; sleep 7200'],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=repo)
    try:
        deadline = time.monotonic() + 180
        while not re.search(r"slurm_conf=(\S+)", log_path.read_text()):
            assert launcher.poll() is None and time.monotonic() < deadline, (
                f"no Slurm cluster: {log_path.read_text()[-4000:]}")
            time.sleep(0.1)
        yield {**env, "SLURM_CONF": re.search(r"slurm_conf=(\S+)", log_path.read_text())[1]}
    finally:
        launcher.terminate()
        try:
            launcher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()


# Job scripts run inside launched processes; they are not for import by pytest
# (tests/run.sh collects doctests with --doctest-modules).
collect_ignore = ["jobs", "launch_jobs"]
