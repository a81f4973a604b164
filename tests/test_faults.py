"""The fault matrix of issue #11 in CI: a misbehaving rank ends the job, loudly and cleanly.

Each case runs one cell of `tests/fault_matrix.py` (2 ranks through
`syncbn-launch`, `SYNCBN_COLLECTIVE_TIMEOUT=20`) and checks that the job ends
with a non-zero exit code, that the launcher names the rank that failed
first, that the output names the layer where it is known, and that nothing
is left behind (processes, network namespaces, Open MPI session directories,
launcher files), and, where syncbn knows what failed (an exception, a
collective timeout over MPI), that the verdict comes from the failing rank's
error file. The only time assertion is the issue's bound: the job stops
within the collective timeout + 10 s of the fault.

CI runs faults (a) kill, (b) raise, (e) shape and (f) skip on every backend,
(c) stall on every backend but tf-grpc, and (d) network cut on mpi; the
other cells run from `python tests/fault_matrix.py` (docs/faults.md has the
table). `SCRIPT_ONLY_CELLS` names each cell left out, and says why.
"""

import re

import pytest

import fault_matrix

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
# Cells whose output may name no layer. (tf-grpc and tf-mpi (e) used to: there
# the weights' initial broadcast fails first; the layer now checks at build time.)
LAYER_NOT_NAMED = set()


def test_every_ci_cell_is_a_real_cell():
    # The parametrization below cannot silently drop a cell: every cell of the
    # matrix is either in CI or excluded by name, and every exclusion is a real cell.
    assert SCRIPT_ONLY_CELLS <= set(ALL_CELLS)
    assert set(CI_CELLS) == set(ALL_CELLS) - SCRIPT_ONLY_CELLS
    assert {b for b, _ in CI_CELLS} == set(fault_matrix.BACKENDS)
    assert {f for _, f in CI_CELLS} == set(fault_matrix.FAULTS)
    assert len(set(CI_CELLS)) == len(CI_CELLS) == 25
    assert {("mpi", "stall"), ("tf-mpi", "stall"), ("mpi", "netcut")} <= set(CI_CELLS)


@pytest.mark.parametrize("backend,fault", CI_CELLS, ids=[f"{b}-{f}" for b, f in CI_CELLS])
def test_fault_ends_the_job(backend, fault, tmp_path):
    result = fault_matrix.run_cell(backend, fault, TIMEOUT, tmp_root=str(tmp_path))
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
    if fault in LAYER_NAMED and (backend, fault) not in LAYER_NOT_NAMED:
        assert result.names_layer, output
    assert result.leftovers == [], output


def test_control_job_without_a_fault_succeeds(tmp_path):
    # Negative control: the job itself, the launcher and the cleanup checks pass
    # when nobody misbehaves, so the failures above come from the faults.
    result = fault_matrix.run_cell("mpi", "none", TIMEOUT, tmp_root=str(tmp_path))
    assert result.exit_code == 0, result.output[-6000:]
    assert result.output.count("fault_job rank") == 2, result.output[-6000:]
    assert result.leftovers == []


def test_build_mismatch_message_names_the_layer_and_both_sides():
    # The error every worker raises at build time under MultiWorkerMirroredStrategy
    # (cells tf-grpc-shape and tf-mpi-shape above run it for real).
    import numpy as np
    from syncbn.collectives.tf_distribute import build_mismatch_message

    same = np.array([[7, 8, 1], [7, 8, 1]])
    assert build_mismatch_message("bn_a", [7, 8, 1], same, 0) is None
    channels = build_mismatch_message("bn_a", [7, 8, 1], np.array([[7, 8, 1], [7, 4, 1]]), 0)
    assert channels.startswith("syncbn: workers disagree when building SyncBatchNormalization "
                               "layer 'bn_a': this worker (rank 0) has 8 channels of float32; "
                               "rank 1 has 4 channels of float32.")
    dtype = build_mismatch_message("bn_a", [7, 8, 1], np.array([[7, 8, 1], [7, 8, 2]]), 0)
    assert "rank 1 has 8 channels of float64" in dtype
    # Two local replicas per worker: rows 2 and 3 are worker 1, named once.
    layer = build_mismatch_message("bn_a", [7, 8, 1], np.array([[7, 8, 1]] * 2 + [[9, 8, 1]] * 2),
                                   0, local_replicas=2)
    assert layer.count("rank 1 ") == 1
    assert "rank 1 has 8 channels of float32 at another layer (name fingerprint 00000009" in layer
