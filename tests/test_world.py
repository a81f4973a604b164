"""`syncbn.world`: what launchers' variables say, what "auto" picks, the chief, GPU pinning."""

import json
import os
from unittest import mock

import pytest
import tensorflow as tf

import syncbn
from syncbn import world

pytestmark = pytest.mark.unit


def _tf_config(workers, index, chief=False):
    cluster = {"worker": [f"h{i}:1" for i in range(workers)]}
    if chief:
        cluster["chief"] = ["c:1"]
    return json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})


@pytest.mark.parametrize("env,launcher,size,rank,local_rank,mpi", [
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3",
      "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, "mpirun", 4, 3, 1, True),
    ({"PMI_SIZE": "2", "PMI_RANK": "1", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "1"},
     "srun", 2, 1, 1, True),
    ({"PMI_SIZE": "3", "PMI_RANK": "2", "MPI_LOCALRANKID": "0"}, "PMI", 3, 2, 0, True),
    ({"PMIX_RANK": "5", "PMIX_NAMESPACE": "slurm.pmix.7.0", "SLURM_STEP_ID": "0",
      "SLURM_STEP_NUM_TASKS": "6", "SLURM_LOCALID": "2"}, "srun", 6, 5, 2, True),
    ({"PMIX_RANK": "1", "PMIX_NAMESPACE": "prterun-x"}, "PMI", 0, 1, 0, True),
    ({"HOROVOD_SIZE": "2", "HOROVOD_RANK": "1", "HOROVOD_LOCAL_RANK": "1"},
     "horovodrun", 2, 1, 1, False),
    ({"TF_CONFIG": _tf_config(3, 2)}, "TF_CONFIG", 3, 2, 0, False),
    ({"TF_CONFIG": _tf_config(2, 0, chief=True)}, "TF_CONFIG", 3, 1, 0, False),
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_STEP_ID": "0"},
     "srun", 2, 1, 0, False),
    # A batch script's own process: one task, no launcher of several.
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"}, "none", 1, 0, 0,
     False),
    ({}, "none", 1, 0, 0, False),
])
def test_launch_from_environment(env, launcher, size, rank, local_rank, mpi):
    launch = world.launch_from_environment(env)
    assert (launch.launcher, launch.size, launch.rank, launch.local_rank, launch.mpi) == (
        launcher, size, rank, local_rank, mpi)


@pytest.mark.parametrize("env,variable,fix", [
    ({"HOROVOD_SIZE": "2", "HOROVOD_RANK": "1"}, "HOROVOD_SIZE=2", "syncbn.init_horovod()"),
    ({"TF_CONFIG": _tf_config(2, 1)}, "TF_CONFIG with 2 tasks", "MultiWorkerMirroredStrategy"),
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "0"}, "SLURM_STEP_NUM_TASKS=2",
     "srun --mpi=pmix"),
])
def test_a_process_alone_among_several_raises_with_the_variable_and_the_fix(env, variable, fix):
    with pytest.raises(world.LauncherWorldError) as raised:
        world.detect(env)
    assert variable in str(raised.value) and fix in str(raised.value)
    assert 'communicator="local"' in str(raised.value)


def test_the_first_synchronized_training_call_raises_not_inference(monkeypatch):
    monkeypatch.setenv("HOROVOD_SIZE", "2")
    layer = syncbn.SyncBatchNormalization()
    x = tf.random.normal((4, 3))
    layer(x, training=False)  # inference communicates nothing: no error
    with pytest.raises(world.LauncherWorldError, match="HOROVOD_SIZE=2"):
        layer(x, training=True)
    syncbn.SyncBatchNormalization(communicator="local")(x, training=True)  # on purpose: fine


@pytest.mark.parametrize("env,expected", [
    ({}, "local"),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, "local"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "local"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "mpi"),
    ({"PMIX_RANK": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "0"}, "mpi"),
])
def test_detect_outside_any_framework(monkeypatch, env, expected):
    # A launcher's world of 2 as MPI_Init would report it in such a job.
    monkeypatch.setattr(world, "mpi_world_size", lambda: 2)
    assert world.detect(env) == expected


def test_detect_raises_when_mpis_world_is_not_the_launchers():
    # This process's MPI_COMM_WORLD has 1 process, where mpirun said 2.
    with pytest.raises(world.LauncherWorldError, match=r"OMPI_COMM_WORLD_SIZE=2.*has 1"):
        world.detect({"OMPI_COMM_WORLD_SIZE": "2"})


@pytest.mark.parametrize("env,chief", [
    ({}, True), ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}, False),
    ({"PMIX_RANK": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "0"}, True),
    ({"TF_CONFIG": _tf_config(2, 1)}, False), ({"TF_CONFIG": _tf_config(2, 0)}, True),
])
def test_is_chief_from_the_launchers_variables(monkeypatch, env, chief):
    for name in ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "TF_CONFIG",
                 "SLURM_STEP_NUM_TASKS", "SLURM_STEP_ID", "HOROVOD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert world.is_chief() is chief


class FakeDevices:
    """`tf.config`'s device functions on a machine with `count` GPUs, recorded."""

    def __init__(self, count, initialized=False):
        self.gpus = [tf.config.PhysicalDevice(f"/physical_device:GPU:{i}", "GPU")
                     for i in range(count)]
        self.initialized = initialized
        self.visible = None
        self.growth = []

    def get_visible_devices(self, device_type=None):
        assert device_type == "GPU"
        return list(self.gpus)

    def set_visible_devices(self, devices, device_type=None):
        if self.initialized:
            raise RuntimeError("Visible devices cannot be modified after being initialized")
        self.visible = devices

    def set_memory_growth(self, device, enable):
        if self.initialized:
            raise RuntimeError("Physical devices cannot be modified after being initialized")
        self.growth.append((device.name, enable))

    def patch(self):
        return mock.patch.multiple(
            tf.config, get_visible_devices=self.get_visible_devices,
            set_visible_devices=self.set_visible_devices), \
            mock.patch.object(tf.config.experimental, "set_memory_growth", self.set_memory_growth)


@pytest.mark.parametrize("count,local_rank,visible", [(4, 1, 1), (4, 6, 2), (2, 0, 0)])
def test_pin_gpu_gives_each_local_rank_its_own(count, local_rank, visible):
    devices = FakeDevices(count)
    patch_visible, patch_growth = devices.patch()
    with patch_visible, patch_growth:
        world.pin_gpu(local_rank)
    assert devices.visible is devices.gpus[visible]
    assert devices.growth == [(devices.gpus[visible].name, True)]


@pytest.mark.parametrize("count", [0, 1])
def test_pin_gpu_keeps_one_gpu_or_none_as_it_is(count):
    devices = FakeDevices(count)
    patch_visible, patch_growth = devices.patch()
    with patch_visible, patch_growth:
        world.pin_gpu(3)
    assert devices.visible is None
    assert devices.growth == [(gpu.name, True) for gpu in devices.gpus]


def test_pin_gpu_after_tensorflow_initialized_several_gpus_says_what_to_do():
    devices = FakeDevices(2, initialized=True)
    patch_visible, patch_growth = devices.patch()
    with patch_visible, patch_growth, pytest.raises(RuntimeError, match="pin_gpu=False"):
        world.pin_gpu(1)


@pytest.mark.parametrize("pin", [True, False])
def test_init_horovod_pins_by_local_rank_unless_asked_not_to(monkeypatch, pin):
    import horovod.tensorflow as hvd

    monkeypatch.setattr(hvd, "is_initialized", lambda: True)
    monkeypatch.setattr(hvd, "local_rank", lambda: 3)
    devices = FakeDevices(4)
    patch_visible, patch_growth = devices.patch()
    # init_horovod also sets Horovod's stall variables: keep them out of this process.
    with patch_visible, patch_growth, mock.patch.dict(os.environ):
        syncbn.init_horovod(pin_gpu=pin)
    assert devices.visible is (devices.gpus[3] if pin else None)
