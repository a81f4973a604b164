"""Every Python code block in README.md and docs/*.md runs, so the docs cannot rot.

Each ```python block runs as a script in a fresh interpreter, in an empty
temporary directory. A block that needs several processes says how to start
them in an HTML comment on the line just above it, which readers do not see:

    <!-- syncbn-launch -np 2 --backend mpi -->
    ```python
    ...
    ```

The test then runs the block through `syncbn-launch` with those options, as
the docs tell users to. There is no way to exempt a block: code that
cannot run belongs in a ```bash block or in prose.

A ```bash block runs only under a directive that gives it a place to run:
`<!-- syncbn-launch --simulate-hosts 2 --slurm -->` runs it with `bash -e` on
the login node of a simulated Slurm cluster of 2 nodes, as that command would;
the blocks share the session's cluster (`slurm_conf`, tests/conftest.py).
"""

import glob
import os
import re
import sys

import pytest

from helpers import REPO as REPO_DIR
from helpers import job_env, launcher, run

pytestmark = pytest.mark.multiprocess

DOC_FILES = [os.path.join(REPO_DIR, "README.md")] + sorted(
    glob.glob(os.path.join(REPO_DIR, "docs", "*.md"))
)
BLOCK = re.compile(
    r"(?:<!--\s*(?P<directive>[^\n]*?)\s*-->\s*\n)?```python\n(?P<code>.*?)\n```", re.DOTALL
)
BASH_BLOCK = re.compile(r"<!--\s*(?P<directive>syncbn-launch [^\n]*?--slurm[^\n]*?)\s*-->\s*\n"
                        r"```bash\n(?P<code>.*?)\n```", re.DOTALL)
BLOCK_TIMEOUT = 600
SLURM_DIRECTIVE = "syncbn-launch --simulate-hosts 2 --slurm"  # what slurm_conf runs


def code_blocks(path):
    """`(line number, directive or None, code)` for every python block of `path`."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    return [
        (text.count("\n", 0, match.start("code")) + 1, match.group("directive"), match.group("code"))
        for match in BLOCK.finditer(text)
    ]


def bash_blocks(path):
    """`(line number, directive, code)` for every bash block of `path` that has a directive."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    return [(text.count("\n", 0, match.start("code")) + 1, match.group("directive"),
             match.group("code")) for match in BASH_BLOCK.finditer(text)]


def _cases():
    cases = []
    for path in DOC_FILES:
        blocks = [(line, directive, code, "python") for line, directive, code in code_blocks(path)]
        blocks += [(line, directive, code, "bash") for line, directive, code in bash_blocks(path)]
        for line, directive, code, language in blocks:
            name = f"{os.path.relpath(path, REPO_DIR)}:{line}"
            cases.append(pytest.param(directive, code, language, id=name))
    return cases


CASES = _cases()


def test_the_docs_have_python_blocks_to_run():
    # Guards the extraction itself: a broken pattern would make every test vanish.
    assert len(CASES) >= 10, [case.id for case in CASES]
    with open(os.path.join(REPO_DIR, "README.md"), encoding="utf-8") as handle:
        assert handle.read().count("```python") == len(code_blocks(DOC_FILES[0]))


def test_bash_blocks_with_a_directive_are_found():
    assert any(case.values[2] == "bash" for case in CASES), [case.id for case in CASES]


@pytest.mark.parametrize("directive, code, language", CASES)
def test_doc_block_runs(directive, code, language, tmp_path, request):
    script = tmp_path / ("block.py" if language == "python" else "block.sh")
    script.write_text(code + "\n")
    # This checkout's syncbn only, as a user has it: no test module on the path.
    env = job_env(path=(REPO_DIR,))
    if language == "bash":
        assert directive == SLURM_DIRECTIVE, f"bash blocks run on {SLURM_DIRECTIVE!r} only"
        env["SLURM_CONF"] = request.getfixturevalue("slurm_conf")
        command = ["bash", "-e", str(script)]
    elif directive is None:
        command = [sys.executable, str(script)]
    elif directive.startswith("syncbn-launch "):
        command = launcher(*directive.split()[1:], "--timeout", str(BLOCK_TIMEOUT - 30), "--",
                           sys.executable, str(script))
    else:
        raise AssertionError(f"unknown directive above a python block: {directive!r}")
    result = run(command, timeout=BLOCK_TIMEOUT, env=env, cwd=tmp_path)
    assert result.returncode == 0, (
        f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n"
        f"{result.stderr[-4000:]}"
    )
