"""The rank's error file (syncbn/error_file.py), written in this process, read as the launcher does.

Real ranks write them in tests/test_launch_jobs.py (an exception, a collective
timeout through either MPI kernel) and tests/test_faults.py.
"""

import json
import os
import subprocess
import sys

import pytest

from launch.environment import ERROR_FILE_OWNER_VARIABLE, ERROR_FILE_VARIABLE, error_file_path
from launch.failures import read_error_records
from syncbn import error_file

pytestmark = pytest.mark.unit


@pytest.fixture
def hook(monkeypatch, tmp_path):
    """Installs the hook over a recording stand-in for Python's own; yields (path, calls)."""
    path = error_file_path(str(tmp_path), 1)
    calls = []
    monkeypatch.setenv(ERROR_FILE_VARIABLE, path)
    monkeypatch.setenv(ERROR_FILE_OWNER_VARIABLE, "")  # as the launcher leaves it
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")  # the rank comes from syncbn.world
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setattr(sys, "excepthook", lambda *args: calls.append(args))
    error_file.install()
    return path, calls


def _raise(kind, message):
    try:
        raise kind(message)
    except BaseException:
        return sys.exc_info()


def test_the_variables_are_the_same_on_both_sides():
    assert ERROR_FILE_VARIABLE == error_file.ENV_VARIABLE
    assert ERROR_FILE_OWNER_VARIABLE == error_file.OWNER_VARIABLE


def test_an_uncaught_exception_writes_the_record_then_calls_the_previous_hook(hook, tmp_path):
    path, calls = hook
    info = _raise(ValueError, "bad batch\nsecond line")
    sys.excepthook(*info)
    assert calls == [info]  # chained: Python's own hook still prints the traceback
    with open(path) as handle:
        record = json.load(handle)
    assert record["rank"] == 1 and record["type"] == "ValueError"
    assert record["message"] == "bad batch\nsecond line" and record["exit_code"] == 1
    assert record["traceback"].startswith("Traceback (most recent call last):")
    assert record["traceback"].rstrip().endswith("second line")
    assert {"host", "pid", "time"} <= set(record)
    [read] = read_error_records(str(tmp_path))  # the launcher's reader agrees
    assert (read.rank, read.type, read.exit_code) == (1, "ValueError", 1)
    assert read.summary() == "ValueError: bad batch"


def test_the_first_record_stays(hook):
    path, _ = hook
    sys.excepthook(*_raise(ValueError, "first"))
    sys.excepthook(*_raise(KeyError, "second"))
    assert error_file.record_failure("other", "third") is None
    with open(path) as handle:
        assert json.load(handle)["message"] == "first"


def test_a_keyboard_interrupt_records_the_exit_code_of_sigint(hook):
    path, _ = hook
    sys.excepthook(*_raise(KeyboardInterrupt, ""))
    with open(path) as handle:
        assert json.load(handle)["exit_code"] == 130


class CustomError(Exception):
    pass


def test_classes_outside_builtins_are_named_with_their_module(hook):
    path, _ = hook
    sys.excepthook(*_raise(CustomError, "x"))
    with open(path) as handle:
        assert json.load(handle)["type"] == f"{__name__}.CustomError"


@pytest.mark.parametrize("order", ["abort hook installed after", "abort hook installed before"])
def test_the_record_exists_before_an_mpi_abort_hook_ends_the_process(monkeypatch, tmp_path, order):
    # syncbn's abort_on_uncaught_exception calls the hook it chains, then MPI_Abort.
    path = error_file_path(str(tmp_path), 0)
    monkeypatch.setenv(ERROR_FILE_VARIABLE, path)
    monkeypatch.setenv(ERROR_FILE_OWNER_VARIABLE, "")
    monkeypatch.setattr(sys, "excepthook", lambda *args: None)
    seen_at_abort = []

    def install_abort_hook():
        previous = sys.excepthook

        def abort_hook(*args):
            previous(*args)
            seen_at_abort.append(tmp_path.joinpath("rank.0.json").exists())  # MPI_Abort here

        sys.excepthook = abort_hook

    if order == "abort hook installed before":
        install_abort_hook()
        error_file.install()
    else:
        error_file.install()
        install_abort_hook()
    sys.excepthook(*_raise(RuntimeError, "boom"))
    assert seen_at_abort == [True]


def test_the_ranks_children_write_no_record(hook, tmp_path):
    # This process claimed the rank's record; a child that imports syncbn and fails
    # (a helper the rank runs and may recover from) writes nothing.
    path, _ = hook
    assert os.environ[ERROR_FILE_OWNER_VARIABLE] == str(os.getpid())
    child = subprocess.run([sys.executable, "-c", "import syncbn; raise ValueError('child')"],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 1 and "ValueError: child" in child.stderr
    assert not os.path.exists(path)
    assert error_file.record_failure("ValueError", "x", environ={
        ERROR_FILE_VARIABLE: path, ERROR_FILE_OWNER_VARIABLE: "1"}) is None  # pid 1's
    sys.excepthook(*_raise(ValueError, "the rank's own"))
    assert read_error_records(str(tmp_path))[0].message == "the rank's own"


def test_nothing_is_written_without_the_variable_or_the_directory(monkeypatch, tmp_path):
    assert error_file.record_failure("ValueError", "x", environ={}) is None
    missing = tmp_path / "gone" / "rank.0.json"
    assert error_file.record_failure(
        "ValueError", "x", environ={ERROR_FILE_VARIABLE: str(missing)}) is None
    assert not (tmp_path / "gone").exists()  # a rank never creates the launcher's directory
    monkeypatch.delenv(ERROR_FILE_VARIABLE, raising=False)
    before = sys.excepthook
    error_file.install()
    assert sys.excepthook is before


def test_a_collective_timeout_record(tmp_path):
    path = error_file_path(str(tmp_path), 0)
    assert error_file.record_failure(
        error_file.COLLECTIVE_TIMEOUT, "syncbn: MPI all-reduce 'bn/forward' waited more than 3 s",
        exit_code=124, environ={ERROR_FILE_VARIABLE: path}) == path
    [record] = read_error_records(str(tmp_path))
    assert record.summary() == (
        "CollectiveTimeout: syncbn: MPI all-reduce 'bn/forward' waited more than 3 s")
    assert record.exit_code == 124 and record.rank == 0
    assert [p.name for p in tmp_path.iterdir()] == ["rank.0.json"]  # no partial file left
