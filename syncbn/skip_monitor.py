"""Telling the user about skipped non-finite steps, from the host, off the training step.

`SyncBatchNormalization(nonfinite="skip")` leaves a step with non-finite
global statistics out of the moving statistics with a select and counts it in
an int64 variable per layer (`layer.skipped_steps`), inside the step and with
arithmetic only: the traced step holds no branch and no host callback, so on
a GPU the host never waits for a predicate.

The warning comes from here instead. A process-wide monitor watches every
layer traced with `"skip"` (through weak references: it keeps no layer
alive). A daemon thread, started with the first such layer, reads the
counters every `CHECK_INTERVAL_SECONDS` and logs one warning per layer when
its counter first rises. The same check runs when `layer.skipped_steps` is
read, and once more at interpreter exit, which also reports the total of a
layer that skipped more steps after its warning.

Reading a counter is a read of a local variable in the monitor's thread: no
collective, and the training thread never waits for it (on a GPU only the
monitor's thread waits for the 8-byte copy, once per interval). The thread
ends when no watched layer is left, and at exit it is stopped and joined
before Python tears down, so it neither keeps a process alive nor runs into
interpreter shutdown.
"""

import atexit
import logging
import os
import threading
import weakref

# The layer's own warning: under the logger that the layer's documentation names.
logger = logging.getLogger("syncbn.layers")

CHECK_INTERVAL_SECONDS = 5.0
# How long interpreter exit waits for the monitor's last check (a counter
# read stuck behind a hung device must not hang the exit).
EXIT_TIMEOUT_SECONDS = 10.0


class _LayerState:
    __slots__ = ("warned_at",)

    def __init__(self):
        self.warned_at = 0  # the counter when the warning was logged; 0: not yet


class SkippedStepsMonitor:
    """Logs one warning per layer whose skipped-steps counter rises.

    Args:
        interval: Seconds between two checks by the monitor's thread, `> 0`.
    """

    def __init__(self, interval=CHECK_INTERVAL_SECONDS):
        if isinstance(interval, bool) or not isinstance(interval, (int, float)):
            raise TypeError(f"Argument `interval` must be a number. Received: interval={interval!r}")
        if not interval > 0:
            raise ValueError(f"Argument `interval` must be > 0. Received: interval={interval!r}")
        self.interval = float(interval)
        self._lock = threading.RLock()
        self._layers = weakref.WeakKeyDictionary()  # layer -> _LayerState
        self._thread = None
        self._stopping = threading.Event()
        self._exit_hook = False

    def watch(self, layer):
        """Watches `layer` (built, with a `_skipped_steps` variable); starts the thread if needed.

        Cheap and idempotent: the layer calls it each time it traces (or, in
        eager mode, runs) a training step with `nonfinite="skip"`.
        """
        with self._lock:
            if layer not in self._layers:
                self._layers[layer] = _LayerState()
            if self._thread is None and not self._stopping.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="syncbn-skipped-steps", daemon=True)
                self._thread.start()
                if not self._exit_hook:
                    atexit.register(self.stop)
                    self._exit_hook = True

    def is_watching(self, layer):
        with self._lock:
            return layer in self._layers

    @property
    def running(self):
        """True while the monitor's thread is alive."""
        with self._lock:
            thread = self._thread
        return thread is not None and thread.is_alive()

    def observe(self, layer, count):
        """Logs the layer's warning if `count` is its first non-zero counter value seen."""
        # Logged under the lock: whoever returns from here second finds it logged.
        with self._lock:
            state = self._layers.get(layer)
            if state is None or state.warned_at or count <= 0:
                return
            state.warned_at = count
            logger.warning(
                "SyncBatchNormalization '%s': %d training step(s) had non-finite global batch "
                "statistics (NaN or inf); the moving statistics were left unchanged for them "
                "(nonfinite='skip'). Later skipped steps are counted, not logged: read "
                "layer.skipped_steps.", layer.name, count)

    def check(self, final=False):
        """Reads every watched counter and logs what is new; returns how many layers are watched.

        With `final=True`, also logs the total of each layer that skipped
        more steps after its warning.
        """
        with self._lock:
            watched = list(self._layers.items())
        for layer, state in watched:
            try:
                count = int(layer._skipped_steps.numpy())
            except Exception:  # noqa: BLE001 - a diagnostic must never fail the program
                logger.debug("could not read the skipped steps of '%s'", layer.name, exc_info=True)
                continue
            self.observe(layer, count)
            if final and 0 < state.warned_at < count:
                logger.warning(
                    "SyncBatchNormalization '%s': %d training steps skipped in all "
                    "(nonfinite='skip').", layer.name, count)
        return len(watched)

    def stop(self, timeout=EXIT_TIMEOUT_SECONDS):
        """Stops the thread after one last check (`final=True`); registered for interpreter exit."""
        self._stopping.set()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self):
        try:
            while True:
                stopping = self._stopping.wait(self.interval)
                self.check(final=stopping)
                with self._lock:
                    if stopping or not self._layers:
                        self._thread = None
                        return
        except Exception:  # noqa: BLE001 - never let the diagnostic thread crash the program
            logger.debug("the skipped-steps monitor stopped", exc_info=True)
            with self._lock:
                self._thread = None

    def _after_fork_in_child(self):
        # The parent's thread does not exist in the child, and its lock may
        # have been held at the fork: start over (the next watch() restarts).
        self._lock = threading.RLock()
        self._thread = None


_monitor = SkippedStepsMonitor()


def monitor():
    """The process-wide monitor that `SyncBatchNormalization` layers report to."""
    return _monitor


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _monitor._after_fork_in_child())
