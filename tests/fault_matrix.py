"""The fault matrix: every backend x every fault, measured.

Each cell runs `tests/jobs/fault_job.py` on 2 ranks through `syncbn-launch`
(on 2 simulated hosts for the network cut) with `SYNCBN_COLLECTIVE_TIMEOUT`
small, and records how the job ended: exit code, seconds from the fault to
the launcher's exit, the launcher's verdict (which rank failed first), the
first line that explains the failure, and what was left behind (processes,
network namespaces, Open MPI session directories, launcher temporary files).
Each cell gets its own TMPDIR, so leftovers are this cell's own.

    python tests/fault_matrix.py                     # every cell, prints the table
    python tests/fault_matrix.py --backends mpi --faults kill,stall --timeout 20

tests/test_faults.py runs the cells that fit CI time through `run_cell`.
"""

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from helpers import JOBS_DIR, REPO, processes_with

JOB = os.path.join(JOBS_DIR, "fault_job.py")
BACKEND_ARGS = {
    "horovod-mpi": ["--backend", "horovod", "--horovod-controller", "mpi"],
    "horovod-gloo": ["--backend", "horovod", "--horovod-controller", "gloo"],
    "mpi": ["--backend", "mpi"],
    "tf-mpi": ["--backend", "tf", "--tf-mpi", "yes"],
    "tf-grpc": ["--backend", "tf", "--tf-mpi", "no"],
}
BACKENDS = tuple(BACKEND_ARGS)
FAULTS = ("kill", "raise", "stall", "netcut", "shape", "skip")
FAULT_NAMES = {
    "none": "no fault (control)",
    "kill": "(a) SIGKILL between forward and backward",
    "raise": "(b) exception mid-step",
    "stall": "(c) stalled forever",
    "netcut": "(d) host network cut",
    "shape": "(e) shape mismatch",
    "skip": "(f) one layer call skipped",
}
FAULT_RANK = 1
DEFAULT_TIMEOUT = 20.0
# Lines that explain a failure, most specific first.
_EXPLANATIONS = [
    r"syncbn: [^\n]*",
    r"Mismatched [^\n]*(?:\n[^\n]*){0,3}",  # Horovod names the tensor a few lines on
    r"Missing ranks:[^\n]*(?:\n[^\n]*){0,2}",  # Horovod's stall check: rank: [tensor names]
    r"[^\n]*(?:[Ss]tall|Horovod has been shut down|DeadlineExceeded|Deadline Exceeded|"
    r"timed out|Connection reset|failed to connect|Broken pipe)[^\n]*",
    r"injected fault[^\n]*",
]


@dataclasses.dataclass
class CellResult:
    """How one cell ended. `seconds` runs from the fault's injection to the launcher's exit."""

    backend: str
    fault: str
    exit_code: int
    seconds: float
    verdict: str
    explanation: str
    leftovers: list
    output: str

    @property
    def names_layer(self):
        return bool(re.search(r"bn_[ab]", self.explanation))


def _leftovers(marker, tmpdir, launcher_pid):
    deadline = time.monotonic() + 5.0  # the kernel reaps the last ranks a moment later
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [f"process {pid}" for pid in processes_with(marker)]
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    left += [f"namespace {line.split()[0]}" for line in namespaces.splitlines()
             if line.startswith(f"sbn-{launcher_pid}-")]
    left += [f"{tmpdir}/{name}" for name in sorted(os.listdir(tmpdir))
             if name.startswith(("ompi.", "sbn-", "syncbn-launch-"))]
    return left


def _explain(output):
    # The job's own "rank 1 injects fault 'stall'" line explains nothing.
    output = "\n".join(line for line in output.splitlines() if "injects fault" not in line)
    for pattern in _EXPLANATIONS:
        match = re.search(pattern, output)
        if match:
            return " ".join(line.strip() for line in match.group(0).splitlines())
    return ""


def run_cell(backend, fault, timeout=DEFAULT_TIMEOUT, tmp_root=None, steps=3):
    """Runs one cell and returns its `CellResult`."""
    marker = f"syncbn-fault-{uuid.uuid4().hex}"
    topology = ["-np", "2"] + (["--simulate-hosts", "2"] if fault == "netcut" else [])
    tmpdir = tempfile.mkdtemp(prefix="fault-cell-", dir=tmp_root)
    env = {**os.environ, "TMPDIR": tmpdir, "SYNCBN_COLLECTIVE_TIMEOUT": str(timeout),
           "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "launch", *topology, *BACKEND_ARGS[backend],
            # A safety net only: every cell must end well before it.
            "--timeout", str(timeout * 6 + 120), "--",
            sys.executable, JOB, "--backend", backend.split("-")[0], "--fault", fault,
            "--fault-rank", str(FAULT_RANK), "--steps", str(steps), "--marker", marker]
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines, injected = [], []

    def read():
        for line in process.stdout:
            if not injected and "injects fault" in line:
                injected.append(time.monotonic())
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    code = process.wait()
    ended = time.monotonic()
    reader.join(timeout=10)
    output = "".join(lines)
    errors = [line.split("ERROR", 1)[1].strip() for line in lines
              if line.startswith("[launcher] ERROR")]
    verdict = next((e for e in errors if "failed first" in e), errors[0] if errors else "")
    seconds = ended - injected[0] if injected else float("nan")
    leftovers = _leftovers(marker, tmpdir, process.pid)
    shutil.rmtree(tmpdir, ignore_errors=True)  # also autograph's generated files
    return CellResult(backend, fault, code, seconds, verdict, _explain(output), leftovers, output)


def format_table(results, timeout):
    """The measured table, in Markdown."""
    rows = [f"| backend | fault | exit | seconds to stop (bound {timeout + 10:g}) "
            "| launcher's verdict | first explaining line | left behind |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        explanation = r.explanation.replace("|", "\\|")
        if len(explanation) > 300:
            explanation = explanation[:297] + "..."
        rows.append(f"| {r.backend} | {FAULT_NAMES[r.fault]} | {r.exit_code} | {r.seconds:.1f} "
                    f"| {r.verdict.replace('|', '/')} | {explanation} "
                    f"| {', '.join(r.leftovers) or 'nothing'} |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help=f"comma-separated, from {BACKENDS} (default: all)")
    parser.add_argument("--faults", default=",".join(FAULTS),
                        help=f"comma-separated, from {FAULTS} (default: all)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="SYNCBN_COLLECTIVE_TIMEOUT of the jobs, seconds (default: 20)")
    parser.add_argument("--show-output", action="store_true",
                        help="print each cell's whole output after the table")
    args = parser.parse_args(argv)
    backends, faults = args.backends.split(","), args.faults.split(",")
    for name, chosen, allowed in (("--backends", backends, BACKENDS), ("--faults", faults, FAULTS)):
        unknown = [c for c in chosen if c not in allowed]
        if unknown:
            parser.error(f"Argument `{name}` must name entries of {allowed}. Received: {unknown}")
    results = []
    for backend in backends:
        for fault in faults:
            result = run_cell(backend, fault, args.timeout)
            results.append(result)
            print(f"{backend:13s} {fault:7s} exit={result.exit_code} {result.seconds:6.1f} s "
                  f"{result.verdict} | {result.explanation[:160]} | "
                  f"left: {result.leftovers or 'nothing'}", flush=True)
    print()
    print(format_table(results, args.timeout))
    if args.show_output:
        for r in results:
            print(f"\n===== {r.backend} {r.fault} =====\n{r.output}")
    bad = [r for r in results if r.exit_code == 0 or r.leftovers
           or not r.seconds <= args.timeout + 10]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
