"""The fault matrix in CI: a misbehaving rank ends the job, loudly and cleanly.

Each case runs one cell of `tests/fault_matrix.py` (2 ranks through
`syncbn-launch`, `SYNCBN_COLLECTIVE_TIMEOUT=20`) and checks that the job ends
with a non-zero exit code, that the launcher names the rank that failed
first, that the output names the layer where it is known, and that nothing
is left behind (processes, network namespaces, Open MPI session directories,
launcher files), and, where syncbn knows what failed (an exception, a
collective timeout over MPI), that the verdict comes from the failing rank's
error file. The only time assertion is the fault handling's promise: the job
stops within the collective timeout + 10 s of the fault.

Most of a cell's time is waiting (for the timeout, for the launcher's grace
period), so the cells the session selected run two at a time, longest first,
in a module fixture; each test then asserts on its own cell's result. Every
cell has its own job marker, TMPDIR and launcher, so what one leaves behind is
its own.

CI runs faults (a) kill, (b) raise, (e) shape and (f) skip on every backend,
(c) stall on every backend but tf-grpc, and (d) network cut on mpi; the
other cells run from `python tests/fault_matrix.py` (docs/faults.md has the
table). `SCRIPT_ONLY_CELLS` names each cell left out, and says why.
"""

import re
from concurrent import futures

import pytest

import fault_matrix

pytestmark = pytest.mark.multiprocess

TIMEOUT = 20.0
ALL_CELLS = [(backend, fault) for fault in fault_matrix.FAULTS for backend in fault_matrix.BACKENDS]
# Cells that run from `python tests/fault_matrix.py` only.
SCRIPT_ONLY_CELLS = (
    # (c) stall over gRPC: not in CI for time (27.6 s measured, near the bound).
    # (On mpi and tf-mpi it is back: its one CI failure was the launcher's verdict
    # naming no rank when Open MPI lost its MPI_ABORT notice, which no longer matters.)
    {("tf-grpc", "stall")}
    # A network cut needs simulated hosts: CI runs it on mpi only, for time.
    | {(backend, "netcut") for backend in fault_matrix.BACKENDS if backend != "mpi"})
CI_CELLS = [cell for cell in ALL_CELLS
            if cell not in SCRIPT_ONLY_CELLS]
# Cells whose output must name the layer: the fault happens inside a collective
# that knows it (a mismatch, a timeout) rather than in user code.
LAYER_NAMED = {"shape", "skip", "stall", "netcut"}
# Cells whose verdict comes from a rank's error file, and the rank it names: the
# raising rank's exception, and the waiting rank's collective timeout over MPI.
FROM_ERROR_FILE = (
    {(backend, "raise"): fault_matrix.FAULT_RANK for backend in fault_matrix.BACKENDS}
    | {(backend, "stall"): 1 - fault_matrix.FAULT_RANK
       for backend in ("mpi", "horovod-mpi", "tf-mpi")})


def test_ci_runs_every_backend_and_fault_and_excludes_only_real_cells():
    # The matrix lives in fault_matrix.py: a backend or fault added there, or an
    # exclusion that names no cell (a typo), shows here.
    assert SCRIPT_ONLY_CELLS <= set(ALL_CELLS)
    assert {b for b, _ in CI_CELLS} == set(fault_matrix.BACKENDS)
    assert {f for _, f in CI_CELLS} == set(fault_matrix.FAULTS)
    assert len(CI_CELLS) == 25
    assert {("mpi", "stall"), ("tf-mpi", "stall"), ("mpi", "netcut")} <= set(CI_CELLS)


CELLS_AT_ONCE = 2
# Cells that wait out the collective timeout (or a network cut) first.
WAITING_FAULTS = ("netcut", "stall", "skip")


@pytest.fixture(scope="module")
def cell_results(request, tmp_path_factory):
    """`{(backend, fault): CellResult}` of the cells this session selected, run concurrently."""
    selected = [tuple(item.callspec.params[name] for name in ("backend", "fault"))
                for item in request.session.items
                if getattr(item, "originalname", None) == "test_fault_ends_the_job"]
    selected.sort(key=lambda cell: cell[1] not in WAITING_FAULTS)  # stable: longest first
    root = tmp_path_factory.mktemp("fault-cells")
    with futures.ThreadPoolExecutor(CELLS_AT_ONCE) as pool:
        running = {cell: pool.submit(fault_matrix.run_cell, *cell, TIMEOUT, tmp_root=str(root))
                   for cell in selected}
        return {cell: future.result() for cell, future in running.items()}


@pytest.mark.parametrize("backend,fault", CI_CELLS, ids=[f"{b}-{f}" for b, f in CI_CELLS])
def test_fault_ends_the_job(cell_results, backend, fault):
    result = cell_results[(backend, fault)]
    print(fault_matrix.format_table([result], TIMEOUT))
    output = result.output[-6000:]
    assert result.exit_code != 0, output
    assert result.seconds <= TIMEOUT + 10, output  # the bound; nan (no fault) fails too
    assert re.search(r"\brank \d+\b", result.verdict), output
    if (backend, fault) in FROM_ERROR_FILE:
        rank = FROM_ERROR_FILE[backend, fault]
        assert result.verdict.startswith(f"rank {rank} failed first: "), output
        assert "(its error file)" in result.verdict, output
    if fault == "kill":  # no record: its peers' errors, recorded a moment later, follow from it
        assert result.verdict.startswith(f"rank {fault_matrix.FAULT_RANK} failed first with "
                                         "signal SIGKILL"), output
    if fault in LAYER_NAMED:
        assert result.names_layer, output
    assert result.leftovers == [], output


def test_control_job_without_a_fault_succeeds(tmp_path):
    # Negative control: the job itself, the launcher and the cleanup checks pass
    # when nobody misbehaves, so the failures above come from the faults.
    result = fault_matrix.run_cell("mpi", "none", TIMEOUT, tmp_root=str(tmp_path))
    assert result.exit_code == 0, result.output[-6000:]
    assert result.output.count("fault_job rank") == 2, result.output[-6000:]
    assert result.leftovers == []
