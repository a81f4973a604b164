"""Which rank failed first, and how: from the ranks' error files, else from their output.

Every rank gets a path in `SYNCBN_ERROR_FILE` (`launch.environment`), and a
rank that imports syncbn writes its record there when it dies of an uncaught
exception or of a collective timeout (`syncbn/error_file.py` has the format).
After a failure the supervisor reads them back and `verdict` decides:

1. The earliest record names the rank and what failed, unless a rank that left
   no record (killed by a signal, `os._exit`, a crash in C) had ended before
   it was written, or less than `SILENT_DEATH_WINDOW` seconds after: then the
   others' errors follow from that death, and the dead rank failed first. Its
   peers see its sockets close and record their errors within milliseconds,
   sooner than the launcher can see it end (its output closing, or its exit) on
   a busy machine; a rank that raised, on the other hand, records first and
   takes longer than the window to end (interpreter and framework teardown).
2. With no record at all (a program that is not syncbn's: a plain script, a C
   program), the processes' output: mpirun's own account of the job
   (`launch.backends.mpirun.describe_mpirun_failure`), or the rank whose
   Python traceback came first.
3. Else the process that exited first.

Records carry the writer's clock: on one machine (or simulated hosts) they
order exactly. Ranks on other machines write into their own file system,
where the launcher's directory does not exist, so they leave no record; with
such ranks in the job, the launcher reads no records and names the rank from
the output (`launch.placement.Placement.error_files_readable`).
"""

import dataclasses
import glob
import json
import logging
import os
import re
import signal
from typing import Optional

logger = logging.getLogger("launch")
_RECORD_FILE = re.compile(r"rank\.(\d+)\.json$")
_SUMMARY_CHARACTERS = 300
SILENT_DEATH_WINDOW = 1.0
_TF_FUNCTION = re.compile(r"^\{\{function_node [^}]*\}\}\s*")
_TF_GRAPH_ERROR = "Graph execution error:"


@dataclasses.dataclass(frozen=True)
class ErrorRecord:
    """One rank's error file: the rank the launcher gave the path to, and what it wrote."""

    rank: int
    type: str
    message: str
    time: float
    exit_code: Optional[int] = None
    host: str = ""
    traceback: str = ""

    def summary(self):
        """'RuntimeError: the message's first line', at most a few hundred characters.

        TensorFlow's errors from a traced function say "Graph execution error:",
        then where the failing node was defined (indented), then the error of the
        node, the line shown; eager ones start with the function's name.
        """
        lines = [line for line in self.message.splitlines() if line.strip()]
        if lines and lines[0].strip() == _TF_GRAPH_ERROR:
            lines = [line for line in lines[1:]
                     if not line.startswith(("Detected at node", " ", "\t"))]
        line = _TF_FUNCTION.sub("", lines[0].strip()) if lines else ""
        text = f"{self.type.rsplit('.', 1)[-1]}: {line}"
        return text if len(text) <= _SUMMARY_CHARACTERS else text[:_SUMMARY_CHARACTERS - 3] + "..."


@dataclasses.dataclass(frozen=True)
class Death:
    """A process seen to exit non-zero (or to announce a failure, for mpirun).

    Attributes:
        name: 'rank 3' or 'mpirun'.
        rank: its rank, or None for a process that runs several (mpirun).
        ended_at: the time (`time.time()`) by which it had ended: its output closed,
            or it was seen exited.
        code: its `Popen.returncode`.
    """

    name: str
    rank: Optional[int]
    ended_at: float
    code: int


def read_error_records(directory):
    """The `ErrorRecord`s in `directory`, one per `rank.<N>.json`; unreadable ones are skipped."""
    records = []
    for path in sorted(glob.glob(os.path.join(directory, "rank.*.json"))):
        match = _RECORD_FILE.search(path)
        try:
            with open(path) as handle:
                data = json.load(handle)
            records.append(ErrorRecord(
                rank=int(match.group(1)), type=str(data["type"]), message=str(data["message"]),
                time=float(data["time"]), exit_code=data.get("exit_code"),
                host=str(data.get("host", "")), traceback=str(data.get("traceback", ""))))
        except (AttributeError, OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("ignoring the error file %s: %s", path, error)
    return records


def describe_exit(code):
    """'exit code 3' or 'signal SIGKILL' for a `Popen.returncode`."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def verdict(records, deaths, failed, from_output):
    """Names the rank that failed first, and how (see the module docstring). Pure.

    Args:
        records: the ranks' `ErrorRecord`s.
        deaths: the `Death`s seen so far, `failed` among them.
        failed: the `Death` that ended the job.
        from_output: function() -> the verdict read from the output, or None.

    Example:
        >>> raised = ErrorRecord(1, "ValueError", "bad batch", time=10.0)
        >>> exited = Death("rank 0", 0, 12.0, 1)
        >>> print(verdict([raised], [exited], exited, None))  # doctest: +NORMALIZE_WHITESPACE
        rank 1 failed first: ValueError: bad batch (its error file);
        rank 0 exited first, with exit code 1
        >>> killed = Death("rank 0", 0, 9.0, -9)
        >>> verdict([raised], [killed], killed, None)
        'rank 0 failed first with signal SIGKILL'
    """
    first = min(records, key=lambda record: record.time, default=None)
    if first is None:
        return from_output() or f"{failed.name} failed first with {describe_exit(failed.code)}"
    recorded = {record.rank for record in records}
    silent = min((d for d in deaths if d.rank is not None and d.rank not in recorded),
                 key=lambda death: death.ended_at, default=None)
    if silent is not None and silent.ended_at < first.time + SILENT_DEATH_WINDOW:
        return f"{silent.name} failed first with {describe_exit(silent.code)}"
    message = f"rank {first.rank} failed first: {first.summary()} (its error file)"
    if failed.rank is not None and failed.rank != first.rank:
        message += f"; {failed.name} exited first, with {describe_exit(failed.code)}"
    return message
