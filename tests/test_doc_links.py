"""Every relative link and anchor in README.md, CHANGELOG.md, docs/ and bench/README.md resolves.

Anchors follow GitHub's rule for headings: lower case, punctuation other than
`-` and `_` dropped, spaces to `-`, and `-1`, `-2` ... for repeated headings.
"""

import glob
import os
import re

import pytest

from helpers import REPO

pytestmark = pytest.mark.unit

PAGES = sorted([os.path.join(REPO, "README.md"), os.path.join(REPO, "CHANGELOG.md"),
                os.path.join(REPO, "bench", "README.md"),
                *glob.glob(os.path.join(REPO, "docs", "*.md"))])
# [text](target), not images' sources nor code spans.
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)


def slug(heading):
    """GitHub's anchor for a heading's text.

    Example:
        >>> slug("XLA (`jit_compile=True`)")
        'xla-jit_compiletrue'
    """
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    found, seen = set(), {}
    with open(path, encoding="utf-8") as page:
        text = re.sub(r"```.*?```", "", page.read(), flags=re.S)
    for heading in re.findall(r"^#+\s+(.*?)\s*#*$", text, re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path):
    with open(path, encoding="utf-8") as page:
        text = CODE.sub("", page.read())
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, REPO))
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in links(page):
        file_part, _, anchor = target.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(page), file_part)) if file_part else page
        if not os.path.exists(path):
            broken.append(f"{target}: no file {os.path.relpath(path, REPO)}")
        elif anchor and path.endswith(".md") and anchor not in anchors(path):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, broken


def test_the_check_finds_a_broken_link_and_a_broken_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Second part\n\n[ok](#second-part) "
                                   "[gone](b.md) [bad](#third) `[code](c.md)`\n")
    assert links(str(tmp_path / "a.md")) == ["#second-part", "b.md", "#third"]
    assert anchors(str(tmp_path / "a.md")) == {"title", "second-part"}
