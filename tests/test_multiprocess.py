"""Real processes on every backend: horovodrun (Gloo), mpirun (mpi4py) and
MultiWorkerMirroredStrategy workers, each running tests/jobs/exactness.py.

The job checks its own slice on every rank and exits non-zero on a
mismatch; the tests here also add up the per-rank gamma/beta gradients and
compare them with one Keras BatchNormalization on the global batch, which no
single rank can do.
"""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from jobs import exactness
from reference import relative_error

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
EXACTNESS = os.path.join(TESTS_DIR, "jobs", "exactness.py")
JOB_TIMEOUT = 300


def _env(**extra):
    env = dict(os.environ)
    env.update({"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": TESTS_DIR, **extra})
    if os.geteuid() == 0:
        env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    return env


def _horovodrun(np_, args, **env):
    command = ["horovodrun", "-np", str(np_), "--gloo", sys.executable, EXACTNESS] + args
    return subprocess.run(command, capture_output=True, text=True, timeout=JOB_TIMEOUT, env=_env(**env))


def _mpirun(np_, args, script=EXACTNESS, **env):
    command = ["mpirun", "-np", str(np_), "--oversubscribe", "--bind-to", "none",
               sys.executable, script] + args
    return subprocess.run(command, capture_output=True, text=True, timeout=JOB_TIMEOUT, env=_env(**env))


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _tf_workers(np_, args):
    workers = [f"127.0.0.1:{port}" for port in _free_ports(np_)]
    processes = []
    for index in range(np_):
        tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(
            [sys.executable, EXACTNESS] + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=_env(TF_CONFIG=tf_config),
        ))
    outputs, codes = [], []
    try:
        for process in processes:
            out, _ = process.communicate(timeout=JOB_TIMEOUT)
            outputs.append(out)
            codes.append(process.returncode)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return subprocess.CompletedProcess([], max(codes, key=abs), "".join(outputs), "")


def _run(backend, np_, args, **env):
    if backend == "horovod":
        return _horovodrun(np_, args, **env)
    if backend == "mpi":
        return _mpirun(np_, args, **env)
    return _tf_workers(np_, args)


def _result_lines(result):
    output = result.stdout + result.stderr
    return re.findall(r"exactness rank=\d+/\d+ .*? (?:ok|FAIL) ", output)


def _check_job(result, expected_lines):
    lines = _result_lines(result)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert len(lines) == expected_lines, lines
    assert all(" ok " in line for line in lines), lines
    return lines


def _check_summed_parameter_gradients(out_dir, counts, layouts, steps, offset=0.0):
    """Summed over ranks, dgamma/dbeta equal Keras's on the global batch (renorm and masks too)."""
    import tensorflow as tf

    for layout in layouts:
        reference = exactness.keras_reference_layer(layout)
        per_rank = [np.load(os.path.join(out_dir, f"rank{r}.{layout}.npz")) for r in range(len(counts))]
        batches = exactness.global_batches(layout, counts, steps, offset)
        masks = exactness.global_masks(layout, counts, steps)
        for step, ((x, dy), mask) in enumerate(zip(batches, masks)):
            _, _, dgamma, dbeta = exactness.layer_gradients(
                reference, tf.constant(x), dy, None if mask is None else tf.constant(mask))
            summed_dgamma = sum(r[f"dgamma_{step}"] for r in per_rank)
            summed_dbeta = sum(r[f"dbeta_{step}"] for r in per_rank)
            assert relative_error(summed_dgamma, dgamma.numpy()) < 2e-4, (layout, step)
            assert relative_error(summed_dbeta, dbeta.numpy()) < 2e-4, (layout, step)
        for r in per_rank:
            for name in exactness.weight_names(layout):
                assert relative_error(r[f"{name}_{steps - 1}"],
                                      getattr(reference, name).numpy()) < 2e-4, (layout, name)


# How each communicator sums: the MPI communicator has two kernels, and under
# mpirun the Horovod and tf.distribute communicators sum over MPI directly
# unless told not to.
# (launcher, --backend, extra environment, the `kernel=` every line must show);
# SYNCBN_MPI_KERNEL=compiled fails rather than fall back.
SUM_PATHS = {
    "horovod-gloo": ("horovodrun", "horovod", {}, "hvd.allreduce"),
    "horovod-mpi": ("mpirun", "horovod", {}, "mpi-direct"),
    "horovod-mpi-queue": ("mpirun", "horovod", {"SYNCBN_DIRECT_MPI": "0"}, "hvd.allreduce"),
    "mpi-compiled": ("mpirun", "mpi", {"SYNCBN_MPI_KERNEL": "compiled"}, "compiled"),
    "mpi-numpy_function": ("mpirun", "mpi", {"SYNCBN_MPI_KERNEL": "numpy_function"}, "numpy_function"),
    "tf": ("tf", "tf", {}, "tf.distribute"),
    "tf-mpi": ("syncbn-launch", "tf", {}, "mpi-direct"),
}


def _run_path(path, np_, args, **extra_env):
    launcher, backend, env, _ = SUM_PATHS[path]
    env = {**env, **extra_env}
    args = ["--backend", backend] + args
    if launcher == "horovodrun":
        return _horovodrun(np_, args, **env)
    if launcher == "mpirun":
        return _mpirun(np_, args, **env)
    if launcher == "syncbn-launch":  # tf workers under mpirun, TF_CONFIG from the launcher
        command = [sys.executable, "-m", "launch", "-np", str(np_), "--backend", backend, "--",
                   sys.executable, EXACTNESS] + args
        return subprocess.run(command, capture_output=True, text=True, timeout=JOB_TIMEOUT,
                              env=_env(**env), cwd=os.path.dirname(TESTS_DIR))
    return _tf_workers(np_, args)


def _check_sum_path(path, lines):
    kernel = SUM_PATHS[path][3]
    assert all(f"kernel={kernel} " in line for line in lines), lines


@pytest.mark.compat
@pytest.mark.parametrize("path", list(SUM_PATHS))
def test_three_ranks_uneven_with_empty_rank_match_global_batch(path, tmp_path):
    # The plain layouts, batch renormalization, and a Keras mask with channels on
    # axis 1 (a count per channel; rank 0's rows all masked out).
    counts, steps = [4, 0, 7], 3
    layouts = ["2d", "nhwc", "ncw", "renorm", "masked_ncw"]
    result = _run_path(path, 3, ["--counts", "4,0,7", "--steps", str(steps), "--out", str(tmp_path),
                                 "--layouts", ",".join(layouts)])
    lines = _check_job(result, expected_lines=3 * len(layouts))
    assert sum("rows=0 " in line for line in lines) == len(layouts)  # the empty rank took part
    assert all("kernels=elementwise " in line for line in lines), lines  # what CPUs run
    _check_sum_path(path, lines)
    _check_summed_parameter_gradients(str(tmp_path), counts, layouts, steps)


@pytest.mark.parametrize("backend", ["horovod", "mpi"])
@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_large_offset_across_ranks(backend, offset):
    result = _run(backend, 2, ["--backend", backend, "--counts", "300,500", "--layouts", "2d",
                               "--offset", str(offset), "--tolerance", "1e-3"])
    lines = _check_job(result, expected_lines=2)
    assert all("reference=float64" in line for line in lines)


@pytest.mark.parametrize("path", ["horovod-gloo", "mpi-compiled"])
def test_fused_kernels_across_ranks_uneven_with_empty_rank(path):
    # GPUs run the fused kernels (syncbn.ops.kernels_for); CPUs, as everywhere
    # else in these tests, the element-wise ones. Forced here, far from zero.
    result = _run_path(path, 3, ["--counts", "4,0,7", "--layouts", "2d,nhwc", "--offset", "1e4",
                                 "--tolerance", "1e-3"], SYNCBN_KERNELS="fused")
    lines = _check_job(result, expected_lines=3 * 2)
    assert all("reference=float64" in line and "kernels=fused " in line for line in lines), lines
    _check_sum_path(path, lines)


@pytest.mark.parametrize("path", ["horovod-gloo", "horovod-mpi", "mpi-compiled"])
def test_group_size_syncs_within_consecutive_groups(path):
    result = _run_path(path, 4, ["--counts", "3,2,0,5", "--layouts", "2d,nhwc", "--group-size", "2"])
    _check_sum_path(path, _check_job(result, expected_lines=8))


@pytest.mark.parametrize("backend", ["horovod", "mpi"])
def test_auto_communicator_detects_the_launcher(backend):
    # --backend auto builds the layers with communicator="auto".
    result = _run(backend, 2, ["--backend", "auto", "--counts", "3,5", "--layouts", "2d"])
    _check_job(result, expected_lines=2)


def test_ranks_fall_back_together_when_one_cannot_sum_over_mpi():
    # Rank 1 is barred from the compiled kernel: both ranks must then use
    # hvd.allreduce (a mixed job would hang), and say why.
    job = [sys.executable, EXACTNESS, "--backend", "horovod", "--counts", "3,5", "--layouts", "2d"]
    command = (["mpirun", "--oversubscribe", "--bind-to", "none", "-np", "1"] + job
               + [":", "-np", "1", "-x", "SYNCBN_MPI_KERNEL=numpy_function"] + job)
    result = subprocess.run(command, capture_output=True, text=True, timeout=JOB_TIMEOUT, env=_env())
    lines = _check_job(result, expected_lines=2)
    assert all("kernel=hvd.allreduce " in line for line in lines), lines
    output = result.stdout + result.stderr
    assert "this rank: SYNCBN_MPI_KERNEL=numpy_function" in output, output[-3000:]
    assert "this rank: can; another cannot" in output, output[-3000:]


MISMATCH_JOB = os.path.join(TESTS_DIR, "jobs", "mismatch.py")


MPI_KERNELS = ["compiled", "numpy_function"]


@pytest.mark.parametrize("kernel", MPI_KERNELS)
def test_mpi_detects_ranks_calling_layers_in_different_orders(kernel):
    result = _mpirun(2, ["order"], script=MISMATCH_JOB, SYNCBN_MPI_KERNEL=kernel)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    for rank, other in ((0, 1), (1, 0)):
        assert re.search(rf"syncbn: ranks disagree at a sync BN collective: this rank \({rank}\) "
                         rf"is at 'syncbn/\w+/forward' with float\d+\[7\]; rank {other} is at ",
                         output), output[-3000:]


@pytest.mark.parametrize("kernel", MPI_KERNELS)
def test_mpi_detects_the_same_layer_with_a_different_channel_count(kernel):
    # Issue #11: Open MPI summed the mismatched buffers and both ranks exited 0.
    result = _mpirun(2, ["shape"], script=MISMATCH_JOB, SYNCBN_MPI_KERNEL=kernel)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "finished without an error" not in output, output[-3000:]
    # Every rank names the layer, its own vector (2C + 1 values) and the other rank's.
    for rank, own, other, theirs in ((0, 17, 1, 9), (1, 9, 0, 17)):
        assert (f"this rank ({rank}) is at 'syncbn/first/forward' with float64[{own}]; "
                f"rank {other} is at 'syncbn/first/forward' with float64[{theirs}]") in output, (
            output[-3000:])


@pytest.mark.parametrize("kernel", MPI_KERNELS)
def test_mpi_rank_that_never_arrives_times_out_instead_of_hanging(kernel):
    result = _mpirun(2, ["absent"], script=MISMATCH_JOB, SYNCBN_COLLECTIVE_TIMEOUT="3",
                     SYNCBN_MPI_KERNEL=kernel)
    output = result.stdout + result.stderr
    assert result.returncode == 124, output[-3000:]  # the waiting rank's MPI_Abort code
    assert "waited more than 3 s (SYNCBN_COLLECTIVE_TIMEOUT)" in output, output[-3000:]


MASKED_MODEL = os.path.join(TESTS_DIR, "jobs", "masked_model.py")


@pytest.mark.parametrize("backend", ["horovod", "mpi", "tf"])
def test_masking_then_batch_norm_on_axis_1_trains_on_two_ranks_as_one_process(backend):
    # Masking, then SyncBatchNormalization(axis=1): Keras's mask covers the channel
    # axis, each channel has its own global count, rank 0's rows are all masked out.
    # Moving statistics, outputs and weights after 3 SGD steps equal one process's
    # keras.layers.BatchNormalization on the global batch (tests/jobs/masked_model.py).
    command = [sys.executable, "-m", "launch", "-np", "2", "--backend", backend, "--",
               sys.executable, MASKED_MODEL, "--counts", "4,6", "--steps", "3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=JOB_TIMEOUT,
                            env=_env(), cwd=os.path.dirname(TESTS_DIR))
    output = result.stdout + result.stderr
    lines = re.findall(r"masked_model rank=\d/2 world=\S+ rows=\d+ (?:ok|FAIL) [^\n]*", output)
    assert result.returncode == 0, output[-4000:]
    assert len(lines) == 2 and all(" ok " in line for line in lines), lines
    assert sum("rows=4 " in line for line in lines) == 1, lines  # the fully masked rank took part
    world = {"horovod": "horovod", "mpi": "mpi", "tf": "tf.distribute"}[backend]
    assert all(f"world={world} " in line for line in lines), lines
