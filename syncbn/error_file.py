"""A rank's own account of how it failed, for the launcher: its error file.

`syncbn-launch` gives every rank a path in `SYNCBN_ERROR_FILE`
(`rank.<N>.json` in a directory the launcher owns and removes). When the
variable is set, `import syncbn` installs an exception hook (chaining the hook
already there), so that a rank whose Python dies of an uncaught exception
first writes there, as one JSON object:

    {"rank": 1, "host": "node2", "pid": 4242, "type": "RuntimeError",
     "message": "out of data", "traceback": "Traceback (most recent call last): ...",
     "time": 1767225600.125, "exit_code": 1}

`type` is the exception's class (with its module unless a builtin), `time` the
Unix time of the failure, and `exit_code` the one the process will die with (1;
130 for KeyboardInterrupt). syncbn's collective timeouts write a record of
`type` `COLLECTIVE_TIMEOUT` and exit code 124 just before `MPI_Abort`, from
Python (`syncbn.collectives.mpi`) and from the compiled kernel (`mpi_all_sum.cc`
writes the same fields). The launcher names the rank whose record is earliest.

The hook writes before it calls the hook it chains, so the record exists
before syncbn's MPI abort (`abort_on_uncaught_exception`) ends the job, in
whichever order the two were installed. The first record of a process stays.

The record is the rank's: the first process of the rank that imports syncbn
claims it (`SYNCBN_ERROR_FILE_OWNER`, its pid, which the launcher leaves
empty). Processes the rank starts inherit both variables and write nothing,
so a helper script that fails, and whose failure the rank handles, is not
taken for the rank's own failure.

A record is written only into a directory that exists (the launcher's): a rank
on a machine that cannot see it, or one that outlives the job, writes nothing.

This module imports no TensorFlow: `syncbn/__init__.py` imports it first.

Example:
    >>> record_failure("ValueError", "boom", environ={})  # no SYNCBN_ERROR_FILE: no record
"""

import contextlib
import json
import os
import socket
import sys
import tempfile
import time
import traceback

ENV_VARIABLE = "SYNCBN_ERROR_FILE"
OWNER_VARIABLE = "SYNCBN_ERROR_FILE_OWNER"
COLLECTIVE_TIMEOUT = "syncbn.CollectiveTimeout"
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: Python dies of SIGINT after KeyboardInterrupt


def _owned_elsewhere(environ):
    owner = environ.get(OWNER_VARIABLE, "")
    return owner not in ("", str(os.getpid()))


def _rank(environ):
    try:
        from syncbn import world

        return world.launch_from_environment(environ).rank
    except Exception:  # a rank that failed while importing syncbn's dependencies
        return None


def record_failure(kind, message, *, traceback_text="", exit_code=1, environ=None):
    """Writes the rank's error record to `SYNCBN_ERROR_FILE`: if set, not written yet,
    and not claimed by another process of the rank (see the module docstring).

    Args:
        kind: what failed: an exception's class name, or `COLLECTIVE_TIMEOUT`.
        message: the error message.
        traceback_text: the formatted traceback, or "".
        exit_code: the exit code the process is about to die with.
        environ: the environment to read (default: `os.environ`).

    Returns:
        The path written, or None.
    """
    environ = os.environ if environ is None else environ
    path = environ.get(ENV_VARIABLE)
    directory = os.path.dirname(os.path.abspath(path)) if path else None
    if (not path or _owned_elsewhere(environ) or os.path.exists(path)
            or not os.path.isdir(directory)):
        return None
    record = {"rank": _rank(environ), "host": socket.gethostname(), "pid": os.getpid(),
              "type": kind, "message": message, "traceback": traceback_text,
              "time": time.time(), "exit_code": exit_code}
    # Written aside and linked into place: a reader never sees half a record, and
    # a second record of the same process never replaces the first.
    try:
        descriptor, partial = tempfile.mkstemp(prefix=".partial-", dir=directory)
    except OSError:  # the launcher has removed its directory meanwhile
        return None
    try:
        with os.fdopen(descriptor, "w") as handle:
            json.dump(record, handle)
        os.link(partial, path)
    except OSError:  # a record is there already, or the disk is full
        return None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(partial)
    return path


def _type_name(kind):
    return kind.__qualname__ if kind.__module__ == "builtins" else (
        f"{kind.__module__}.{kind.__qualname__}")


def install():
    """Makes an uncaught exception write the error record first, and claims the record
    for this process; a no-op without `SYNCBN_ERROR_FILE`, when another process of
    the rank has claimed it, or when already installed."""
    if (not os.environ.get(ENV_VARIABLE) or _owned_elsewhere(os.environ)
            or getattr(sys.excepthook, "syncbn_error_file", False)):
        return
    os.environ[OWNER_VARIABLE] = str(os.getpid())  # inherited: the rank's children see it
    previous = sys.excepthook

    def excepthook(kind, value, trace):
        try:
            record_failure(
                _type_name(kind), str(value),
                traceback_text="".join(traceback.format_exception(kind, value, trace)),
                exit_code=INTERRUPTED_EXIT_CODE if issubclass(kind, KeyboardInterrupt) else 1)
        except Exception as error:  # the failure itself must still be reported
            sys.stderr.write(f"syncbn: could not write the error file: {error!r}\n")
        previous(kind, value, trace)

    excepthook.syncbn_error_file = True
    sys.excepthook = excepthook


install()
