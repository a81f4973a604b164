"""Starts worker processes, prefixes their output, and stops all of them on the first failure.

Process model (see STYLE.md, "Launcher"):

- Each worker starts in its own session (so its process group can be signalled as a
  whole) with a parent-death signal set through `prctl(PR_SET_PDEATHSIG)` between
  fork and exec: if the launcher is SIGKILLed, the kernel signals the workers too.
  All workers are started from the main thread, because Linux sends the parent-death
  signal when the *thread* that forked the child exits.
- The first worker that exits non-zero ends the job: every other worker gets its
  stop signal, a grace period, then SIGKILL. The rank that failed first is named
  from the ranks' error files, else from the output (`launch.failures`).
- SIGINT/SIGTERM/SIGHUP to the launcher stop every worker the same way.
- `timeout` ends a job that runs too long (exit code 124, like coreutils' timeout).

Output: each worker's stdout and stderr are merged; every line is written to the
launcher's stdout as `[label] line` and, with `output_dir`, to `output_dir/rank.N.log`.
"""

import collections
import ctypes
import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

from launch import failures
from launch.failures import describe_exit

logger = logging.getLogger("launch")

PR_SET_PDEATHSIG = 1
TIMEOUT_EXIT_CODE = 124
_POLL_SECONDS = 0.05
# Lines kept for describe_failure: mpirun's verdict may follow long tracebacks of every rank.
_TAIL_LINES = 400
# Lines matching a spec's keep_line that scroll out of the tail are kept, up to this many.
_KEPT_LINES = 1000
FATAL_LINE_GRACE = 2.0
# After a worker exits, its reader gets this long to reach the end of its output when
# describe_failure names no rank yet (a busy machine can hold a reader back).
DRAIN_SECONDS = 10.0
_PREFIXED = re.compile(rb"^\[(\d+)\] ?(.*)$", re.S)
_TRACEBACK = b"Traceback (most recent call last):"


def _child_setup(death_signal, parent_pid):
    """Runs in the child between fork and exec (async-signal-safe enough: no locks)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0)
    # The launcher may have died before prctl: then no signal will ever come.
    if os.getppid() != parent_pid:
        os._exit(1)


@dataclasses.dataclass
class WorkerSpec:
    """One process to supervise.

    Attributes:
        label: how the worker is named in output and reports, e.g. "1" or "mpirun".
        argv: the command, as given to `subprocess.Popen`.
        env: its full environment.
        rank: the rank whose log file gets the output, or None.
        stop_signal: sent to the worker's process group to stop it.
        death_signal: what the kernel sends the worker when the launcher dies.
        demux_ranks: True if the worker's lines already carry `[N] ` rank prefixes
            (mpirun with our rank wrapper); they are then routed to rank N's log.
        describe_failure: optional function(lines, exit_code) -> message or None, for
            workers (mpirun) whose output says which rank failed, read when no rank
            wrote an error file (`launch.failures`). It gets the lines in
            the order they came: those that matched `keep_line` and scrolled out of the
            last `_TAIL_LINES`, then those.
        keep_line: optional compiled bytes regex of the lines describe_failure needs.
        fatal_code: optional function(line) -> exit code or None: a line that means the
            job has failed with that code even if the worker does not exit. mpirun can
            wait forever after MPI_Abort for the daemon of a host it can no longer reach
            (issue #11, a cut network); the worker is stopped `FATAL_LINE_GRACE` seconds
            after such a line.
    """

    label: str
    argv: list
    env: dict
    rank: Optional[int] = None
    cwd: Optional[str] = None
    stop_signal: int = signal.SIGTERM
    death_signal: int = signal.SIGKILL
    demux_ranks: bool = False
    describe_failure: Optional[Callable] = None
    keep_line: Optional[re.Pattern] = None
    fatal_code: Optional[Callable] = None


class _Output:
    """Writes prefixed lines to stdout and per-rank log files, one line at a time."""

    def __init__(self, output_dir):
        self._lock = threading.Lock()
        self._dir = output_dir
        self._logs = {}
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)

    def _log(self, name):
        if not self._dir:
            return None
        if name not in self._logs:
            self._logs[name] = open(os.path.join(self._dir, f"{name}.log"), "ab")
        return self._logs[name]

    def write(self, spec, line):
        if not line.endswith(b"\n"):
            line += b"\n"
        match = _PREFIXED.match(line) if spec.demux_ranks else None
        if match:
            log_name, text, shown = f"rank.{int(match.group(1))}", match.group(2), line
        else:
            log_name = f"rank.{spec.rank}" if spec.rank is not None else spec.label
            text, shown = line, b"[" + spec.label.encode() + b"] " + line
        with self._lock:
            sys.stdout.buffer.write(shown)
            sys.stdout.buffer.flush()
            log = self._log(log_name)
            if log:
                log.write(text)
                log.flush()

    def close(self):
        with self._lock:
            for log in self._logs.values():
                log.close()
            self._logs.clear()


class _Worker:
    def __init__(self, spec, process):
        self.spec = spec
        self.process = process
        self.tail = collections.deque(maxlen=_TAIL_LINES)  # for describe_failure
        self.kept = []  # keep_line lines that left the tail
        self.reader = None
        self.fatal = None  # (time seen, exit code) of a fatal line
        self.traceback_at = None  # when it printed its first Python traceback
        # When it had ended at the latest: its output closed (the kernel closes a dying
        # process's pipes and sockets together), or it was seen exited.
        self.ended_at = None

    def end_seen(self):
        self.ended_at = min(self.ended_at or time.time(), time.time())


def shell_exit_code(code):
    """A `Popen.returncode` as a shell exit status (death by signal N -> 128 + N)."""
    return 128 - code if code < 0 else code


class Supervisor:
    """Runs `WorkerSpec`s to completion or first failure.

    Args:
        specs: the workers.
        output_dir: directory for `rank.N.log` files, or None.
        grace_period: seconds between the stop signal and SIGKILL.
        timeout: seconds before the job is ended with exit code 124, or None.
        error_dir: the directory of the ranks' error files (`rank.N.json`), or None.

    Example:
        >>> import sys
        >>> Supervisor([WorkerSpec("0", [sys.executable, "-c", "pass"], {}, rank=0)]).run()
        0
    """

    def __init__(self, specs, output_dir=None, grace_period=3.0, timeout=None, error_dir=None):
        self.specs = list(specs)
        self.output = _Output(output_dir)
        self.grace_period = grace_period
        self.timeout = timeout
        self.error_dir = error_dir
        self._stop_signal = None

    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def _start(self, spec):
        parent = os.getpid()
        process = subprocess.Popen(
            spec.argv,
            env=spec.env,
            cwd=spec.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: _child_setup(spec.death_signal, parent),
        )
        return _Worker(spec, process)

    def _pump(self, worker):
        spec = worker.spec
        for line in iter(worker.process.stdout.readline, b""):
            if len(worker.tail) == worker.tail.maxlen and spec.keep_line is not None:
                leaving = worker.tail[0]
                if len(worker.kept) < _KEPT_LINES and spec.keep_line.search(leaving):
                    worker.kept.append(leaving)
            worker.tail.append(line)
            if worker.traceback_at is None and line.startswith(_TRACEBACK):
                worker.traceback_at = time.monotonic()
            if spec.fatal_code is not None and worker.fatal is None:
                code = spec.fatal_code(line)
                if code is not None:
                    worker.fatal = (time.monotonic(), code)
            self.output.write(worker.spec, line)
        worker.end_seen()
        worker.process.stdout.close()

    def _signal_group(self, worker, signum):
        try:
            os.killpg(worker.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def _stop_all(self, workers):
        live = [w for w in workers if w.process.poll() is None]
        for worker in live:
            self._signal_group(worker, worker.spec.stop_signal)
        deadline = time.monotonic() + self.grace_period
        while live and time.monotonic() < deadline:
            time.sleep(_POLL_SECONDS)
            live = [w for w in live if w.process.poll() is None]
        for worker in live:
            logger.warning("%s did not stop within %.1f s; sending SIGKILL",
                           _name(worker.spec), self.grace_period)
        # SIGKILL every group, even of exited leaders: stray children may remain in it.
        for worker in workers:
            self._signal_group(worker, signal.SIGKILL)
        for worker in workers:
            worker.process.wait()

    def run(self):
        """Starts every worker and supervises them. Returns the launcher's exit code."""
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                handlers[signum] = signal.signal(signum, self._on_signal)
        workers = []
        try:
            for spec in self.specs:
                if self._stop_signal is not None:
                    break
                workers.append(self._start(spec))
            for worker in workers:
                worker.reader = threading.Thread(target=self._pump, args=(worker,), daemon=True)
                worker.reader.start()
            return self._supervise(workers)
        finally:
            if workers:
                self._stop_all(workers)
                for worker in workers:
                    if worker.reader:
                        worker.reader.join(timeout=2.0)
            self.output.close()
            for signum, handler in handlers.items():
                signal.signal(signum, handler)

    def _supervise(self, workers):
        started = time.monotonic()
        running = list(workers)
        while running:
            if self._stop_signal is not None:
                name = signal.Signals(self._stop_signal).name
                logger.error("launcher received %s; stopping all ranks", name)
                return 128 + self._stop_signal
            if self.timeout is not None and time.monotonic() - started > self.timeout:
                logger.error("job timed out after %g s (--timeout); stopping all ranks",
                             self.timeout)
                return TIMEOUT_EXIT_CODE
            for worker in list(running):
                code = worker.process.poll()
                if code is None and worker.fatal is not None:
                    seen_at, fatal_code = worker.fatal
                    if time.monotonic() - seen_at > FATAL_LINE_GRACE:
                        logger.error("%s announced a failure %.0f s ago and has not exited",
                                     _name(worker.spec), FATAL_LINE_GRACE)
                        return self._report_failure(worker, fatal_code, workers)
                if code is None:
                    continue
                worker.end_seen()
                running.remove(worker)
                if code != 0:
                    return self._report_failure(worker, code, workers)
            time.sleep(_POLL_SECONDS)
        logger.info("job finished: every process exited with code 0")
        return 0

    def _report_failure(self, worker, code, workers):
        for each in workers:
            if each.process.poll() is not None:
                each.end_seen()
        deaths = [failures.Death(_name(w.spec), w.spec.rank, w.ended_at, w.process.returncode)
                  for w in workers if w.process.poll() not in (None, 0)]
        failed = failures.Death(_name(worker.spec), worker.spec.rank,
                                worker.ended_at or time.time(), code)
        records = failures.read_error_records(self.error_dir) if self.error_dir else []
        logger.debug("error files: %s; ended: %s",
                     ", ".join(f"rank {r.rank} at {r.time:.3f}" for r in records) or "none",
                     ", ".join(f"{d.name} by {d.ended_at:.3f}" for d in deaths) or "none")
        message = failures.verdict(records, deaths, failed,
                                   lambda: self._verdict_from_output(worker, code, workers))
        logger.error("%s; stopping the other ranks", message)
        return shell_exit_code(code)

    def _describe(self, worker, code):
        # The reader thread moves lines from the tail to `kept` while this reads: copy
        # the tail first, so that a line moving meanwhile is seen twice, never missed.
        tail = list(worker.tail)
        return worker.spec.describe_failure(list(worker.kept) + tail, code)

    def _verdict_from_output(self, worker, code, workers):
        """The failure as the output tells it: the worker's own account (mpirun), else
        the rank whose Python traceback came first; None if neither names a rank."""
        exited = worker.process.poll() is not None
        if worker.reader and exited:
            worker.reader.join(timeout=2.0)  # its last lines may explain the failure
        if worker.spec.describe_failure:
            message = self._describe(worker, code)
            # The lines that name the rank may still be in the pipe, behind a reader
            # that the machine's load holds back: wait for them, or for the end of output.
            deadline = time.monotonic() + DRAIN_SECONDS
            while (not message and exited and worker.reader and worker.reader.is_alive()
                   and time.monotonic() < deadline):
                worker.reader.join(timeout=_POLL_SECONDS)
                message = self._describe(worker, code)
            return message
        # A rank that raised can take longer to exit (framework teardown) than a
        # rank that fails because of it; the first traceback is the first failure.
        first = min((w for w in workers if w.traceback_at is not None),
                    key=lambda w: w.traceback_at, default=None)
        if first is None or first is worker or (
                worker.traceback_at is not None and worker.traceback_at <= first.traceback_at):
            return None
        return (f"{_name(first.spec)} failed first (its traceback came first); "
                f"{_name(worker.spec)} exited first, with {describe_exit(code)}")


def _name(spec):
    return f"rank {spec.rank}" if spec.rank is not None else spec.label
