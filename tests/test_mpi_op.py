"""Building, caching and choosing the MPI communicator's compiled kernel.

These run in one process; the kernel's collectives are exercised by the
mpirun jobs in test_multiprocess.py and bench/sync_step.py.
"""

import os
import stat

import pytest

from syncbn.collectives import mpi_op

pytestmark = pytest.mark.unit


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNCBN_CACHE_DIR", str(tmp_path))
    mpi_op.load.cache_clear()
    yield tmp_path
    mpi_op.load.cache_clear()


def _fake_compiler(directory, exit_code, message="", log=None):
    """An executable that records its calls and exits with `exit_code`."""
    path = directory / "fake-mpicxx"
    lines = ["#!/bin/sh"]
    if log:
        lines.append(f'echo "$@" >> "{log}"')
    if message:
        lines.append(f'echo "{message}" >&2')
    lines.append(f"exit {exit_code}")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_unknown_kernel_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("SYNCBN_MPI_KERNEL", "fast")
    with pytest.raises(ValueError, match=r"SYNCBN_MPI_KERNEL.*Received: SYNCBN_MPI_KERNEL='fast'"):
        mpi_op.requested_kernel()


def test_numpy_function_setting_builds_nothing(cache, monkeypatch):
    monkeypatch.setenv("SYNCBN_MPI_KERNEL", "numpy_function")
    monkeypatch.setenv("MPICXX", "no-such-compiler")
    assert mpi_op.load() is None
    assert not (cache / "ops").exists()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(cache dir, library path): one real build for the module, about 10 s."""
    directory = tmp_path_factory.mktemp("syncbn-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SYNCBN_CACHE_DIR", str(directory))
        return directory, mpi_op.build()


def test_builds_once_then_loads_from_the_cache(built, monkeypatch):
    directory, path = built
    monkeypatch.setenv("SYNCBN_CACHE_DIR", str(directory))
    assert os.path.dirname(path) == str(directory / "ops")
    built_at = os.stat(path).st_mtime_ns
    assert mpi_op.build() == path
    assert os.stat(path).st_mtime_ns == built_at  # not rebuilt
    assert os.listdir(directory / "ops") == [os.path.basename(path)]  # no partial files left


def test_loaded_op_has_the_declared_interface(built):
    import tensorflow as tf
    from tensorflow.python.framework import op_def_registry

    ops = tf.load_op_library(built[1])
    assert callable(ops.syncbn_mpi_all_sum)
    op_def = op_def_registry.get("SyncbnMpiAllSum")
    assert [attr.name for attr in op_def.attr] == [
        "T", "comm", "fingerprint", "timeout_seconds", "call_name"]
    assert op_def.is_stateful  # TensorFlow keeps the calls in program order
    allowed = op_def.attr[0].allowed_values.list.type
    assert sorted(allowed) == sorted([tf.float32.as_datatype_enum, tf.float64.as_datatype_enum])


def test_cache_key_follows_source_and_flags(cache):
    command = mpi_op.build_command("mpicxx", "SOURCE", "OUTPUT")
    base = mpi_op.library_path(command, "source")
    assert mpi_op.library_path(command, "source") == base
    assert mpi_op.library_path(command, "other source") != base
    assert mpi_op.library_path(command + ["-DX"], "source") != base


def test_compiler_failure_is_a_build_error_with_its_output(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("MPICXX", _fake_compiler(tmp_path, 1, message="mpi.h: No such file"))
    with pytest.raises(mpi_op.BuildError, match="(?s)exit code 1.*mpi.h: No such file"):
        mpi_op.build()
    assert os.listdir(cache / "ops") == []  # the partial file is removed


def test_auto_falls_back_to_numpy_function_with_a_warning(cache, monkeypatch):
    monkeypatch.setenv("SYNCBN_MPI_KERNEL", "auto")
    monkeypatch.setenv("MPICXX", "no-such-compiler")
    with pytest.warns(RuntimeWarning, match="no-such-compiler.*was not found"):
        assert mpi_op.load() is None


def test_compiled_setting_fails_instead_of_falling_back(cache, monkeypatch):
    monkeypatch.setenv("SYNCBN_MPI_KERNEL", "compiled")
    monkeypatch.setenv("MPICXX", "no-such-compiler")
    with pytest.raises(mpi_op.BuildError, match="SYNCBN_MPI_KERNEL=compiled"):
        mpi_op.load()


def test_communicator_reports_its_kernel():
    from syncbn.collectives.mpi import MPICommunicator

    class OneRank:
        def Get_size(self):
            return 1

    assert MPICommunicator(OneRank()).kernel == "numpy_function"
    assert MPICommunicator(OneRank(), op_library=object()).kernel == "compiled"
    assert "kernel=compiled" in repr(MPICommunicator(OneRank(), op_library=object()))
