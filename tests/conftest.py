"""Test-session setup and the fixtures every test module may use.

The in-process replica tests need several CPU devices; TensorFlow only
accepts the split before it initializes its devices, so it happens here,
before any test module runs a TensorFlow op.

Every test belongs to one tier (markers registered in setup.cfg): `unit`
(in this process, `bash tests/run.sh --quick`) or `multiprocess` (launches
jobs of several processes). Each test module says which with a module-level
`pytestmark`; a test with neither, or both, stops the run at collection.
Doctests are unit tests.
"""

import os
import re
import subprocess

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import helpers  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * helpers.NUM_VIRTUAL_CPUS
)

TIERS = ("unit", "multiprocess")


def pytest_collection_modifyitems(config, items):
    untiered = []
    for item in items:
        if not isinstance(item, pytest.Function):  # a doctest
            item.add_marker(pytest.mark.unit)
        tiers = [tier for tier in TIERS if item.get_closest_marker(tier)]
        if len(tiers) != 1:
            untiered.append(f"{item.nodeid} (tiers: {tiers or 'none'})")
    if untiered:
        raise pytest.UsageError(
            "Every test must be in exactly one tier, `unit` or `multiprocess`: give its module "
            "`pytestmark = pytest.mark.unit` (or `.multiprocess`). Not so:\n  "
            + "\n  ".join(untiered[:20]))


@pytest.fixture(params=helpers.KERNELS)
def kernels(request, monkeypatch):
    """Runs a test with each kernel set for channels-last data.

    On a CPU syncbn runs element-wise kernels and on a GPU TensorFlow's fused
    ones (syncbn.ops.kernels_for); no GPU reaches the tests, so the fused
    path is forced here, through `SYNCBN_KERNELS`.
    """
    monkeypatch.setenv("SYNCBN_KERNELS", request.param)
    return request.param


@pytest.fixture(scope="session")
def mirrored_strategy():
    """The one MirroredStrategy over the virtual CPUs that every test shares.

    TF 2.18 gives the collectives of two strategies on the same devices
    colliding instance keys ("Shape mismatch in the collective instance"),
    so no test module may create its own.
    """
    return tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(helpers.NUM_VIRTUAL_CPUS)])


@pytest.fixture(scope="session")
def world_launch(request, tmp_path_factory):
    """`world_launch(name)`: the `helpers.WorldResults` of launch `helpers.WORLD_LAUNCHES[name]`.

    Each launch runs once per session, when a test first asks for it, with the
    checks that the session's selected tests of that launch read (their
    `world_checks` markers; a test parametrized by `name`), or all of them if
    none says; every such test, in any module, then reads its records.
    """
    finished = {}

    def get(name):
        if name not in finished:
            wanted = set()
            for item in request.session.items:
                marker = item.get_closest_marker("world_checks")
                callspec = getattr(item, "callspec", None)
                if marker and callspec and callspec.params.get("name") == name:
                    wanted.update(marker.args)
            checks = [c for c in helpers.WORLD_LAUNCHES[name].checks if not wanted or c in wanted]
            finished[name] = helpers.launch_world(
                name, tmp_path_factory.mktemp(f"world-{name}"), checks)
        return finished[name]

    return get


@pytest.fixture(scope="session")
def slurm_conf():
    """`SLURM_CONF` of a Slurm cluster of 2 simulated nodes, one per test session.

    `syncbn-launch --simulate-hosts 2 --slurm` runs in the background (munged,
    slurmctld, a slurmd per node: launch/slurm.py) with a login command that
    only waits. A command run here, in this process's network namespace (the
    cluster's login node), with `SLURM_CONF` set to it uses the cluster
    (`helpers.job_env(SLURM_CONF=slurm_conf)`). Stopping the launcher when the
    session ends tears the cluster down. Needs root, Debian's Slurm and munge.
    """
    # The launcher's --timeout ends a cluster that outlives a killed test session.
    cluster = helpers.RunningLauncher(helpers.launcher(
        "--simulate-hosts", "2", "--slurm", "--timeout", "7200", "--",
        "sh", "-c", 'echo "slurm_conf=$SLURM_CONF"; exec sleep 7200'))
    try:
        cluster.wait_for(r"slurm_conf=", 1, seconds=180)
        yield re.search(r"slurm_conf=(\S+)", cluster.output)[1]
    finally:
        cluster.process.terminate()
        try:
            cluster.finish(seconds=60)
        except subprocess.TimeoutExpired:
            cluster.process.kill()
            cluster.finish()


# Job scripts run inside launched processes; they are not for import by pytest
# (tests/run.sh collects doctests with --doctest-modules).
collect_ignore = ["jobs", "launch_jobs"]
