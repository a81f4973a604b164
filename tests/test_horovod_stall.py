"""Horovod's stall check derived from the collective timeout, no processes."""

import pytest

from syncbn.collectives.horovod import stall_settings

pytestmark = pytest.mark.unit


def _seconds(settings):
    return (int(settings["HOROVOD_STALL_CHECK_TIME_SECONDS"]),
            int(settings["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"]))


@pytest.mark.parametrize("timeout,period,shutdown", [
    (20, 2, 16), (20.0, 2, 16), (600, 10, 580), (80, 10, 60), (40, 5, 30), (16, 2, 12), (3, 1, 1), (0.5, 1, 1)])
def test_stall_settings(timeout, period, shutdown):
    assert _seconds(stall_settings(timeout)) == (period, shutdown)


@pytest.mark.parametrize("timeout", [1, 3, 4, 7, 12, 20, 39, 41, 100, 600, 3600])
def test_a_stall_ends_within_a_period_after_the_timeout(timeout):
    period, shutdown = _seconds(stall_settings(timeout))
    # Horovod ignores a shutdown time shorter than its check period.
    assert shutdown >= period
    # A collective that waits in Horovod's response cache counts as stalled
    # after up to 2 periods, then the shutdown time, then up to one more period
    # (Horovod counts whole seconds, so below 3 s the floor is 1 s periods).
    assert shutdown + 3 * period <= max(timeout, 3) + period <= timeout + 10


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), "20", None, True])
def test_stall_settings_rejects_a_bad_timeout(timeout):
    with pytest.raises(ValueError, match=r"Argument `timeout` .* Received: timeout="):
        stall_settings(timeout)
