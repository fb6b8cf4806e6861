"""Every ```python block of README.md and docs/*.md runs as written.

Each block runs alone in a fresh interpreter, in an empty working directory, so a snippet that
leans on a name from another block, on a file it did not write, or on an API that has changed
fails here. A block that must not run (it needs a GPU, a cluster, or has placeholders) is
fenced with another info string (```text), and its text says why.
"""
import glob
import os
import re
import subprocess
import sys

import mxnet as mx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MXNET2 = int(mx.__version__.split(".")[0]) >= 2
FENCE = re.compile(r"^```(\S*)\s*$")


def python_blocks(path):
    """(first line number, code) of each block fenced ```python in a Markdown file."""
    blocks, info, start, lines = [], None, 0, []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fence = FENCE.match(line)
            if fence and info is None:
                info, start, lines = fence.group(1), number + 1, []
            elif line.rstrip() == "```" and info is not None:
                if info == "python":
                    blocks.append((start, "".join(lines)))
                info = None
            elif info is not None:
                lines.append(line)
    assert info is None, "%s: a code block opened at line %d is never closed" % (path, start - 1)
    return blocks


def documents():
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


BLOCKS = [pytest.param(code, id="%s:%d" % (os.path.relpath(path, ROOT), line))
          for path in documents() for line, code in python_blocks(path)]


def test_the_documents_have_python_blocks():
    # The README's quickstart at least; an extraction that finds nothing would pass vacuously.
    readme = python_blocks(os.path.join(ROOT, "README.md"))
    assert readme and any("Trainer" in code for _, code in readme)


def test_fences_are_found_as_markdown_renders_them(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("text ```python inline\n```python\na = 1\n```\n```text\nnot run\n```\n"
                   "```python\nb = 2\n\n```\n")
    assert python_blocks(str(doc)) == [(3, "a = 1\n"), (9, "b = 2\n\n")]


@pytest.mark.skipif(MXNET2, reason="the documents' snippets are written for MXNet 1.9.1, the "
                                   "version the README installs; MXNet 2.0 has its own section")
@pytest.mark.parametrize("code", BLOCKS)
def test_block_runs_as_written(code, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, MPLBACKEND="Agg")
    done = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:]


def anchors(path):
    """The anchors a Git host makes of a Markdown file's headings."""
    found = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#"):
                title = line.lstrip("#").strip().lower()
                title = re.sub(r"[^\w\- ]", "", title)
                found.add(title.replace(" ", "-"))
    return found


@pytest.mark.parametrize("path", documents(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_lead_somewhere(path):
    text = open(path, encoding="utf-8").read()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file_part, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(linked):
            broken.append(target)
        elif anchor and linked.endswith(".md") and anchor not in anchors(linked):
            broken.append(target)
    assert not broken, "%s links to what is not there: %s" % (os.path.relpath(path, ROOT), broken)
