"""Keras's compile defaults on a machine that reports a GPU, on real processes of every backend.

tests/jobs/xla_compile.py compiles with `jit_compile="auto"` and `True` where
Keras sees a GPU: Keras must leave XLA off (the layer's sums cannot compile),
training must run, and the moving statistics must be identical on every rank.
"""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.multiprocess

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
JOB = os.path.join(TESTS_DIR, "jobs", "xla_compile.py")
BACKENDS = {
    "horovod-mpi": ["--backend", "horovod", "--horovod-controller", "mpi"],
    "horovod-gloo": ["--backend", "horovod", "--horovod-controller", "gloo"],
    "mpi": ["--backend", "mpi"],
    "tf": ["--backend", "tf"],
}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_keras_compile_defaults_train_on_two_ranks(backend):
    command = [sys.executable, "-m", "launch", "-np", "2", *BACKENDS[backend], "--timeout", "240",
               "--", sys.executable, JOB]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(TESTS_DIR),
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if "xla_compile rank=" in line]
    assert result.returncode == 0, output[-4000:]
    assert len(lines) == 4 and all(line.endswith(" ok") for line in lines), lines
    assert sum("jit_compile=True resolved=False" in line for line in lines) == 2, lines
