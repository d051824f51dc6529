"""Every Python block in the README and the docs runs as written, or is marked a fragment.

A fragment is a block preceded by ``<!-- fragment: why -->`` (invisible on GitHub and the docs
site): it needs the reader's own tensors, model or a GPU. Blocks that only include an example
file (``--8<--``) are the examples' business (``tests/test_examples.py`` runs those).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
MARK = "<!-- fragment:"


def doc_blocks() -> list[tuple[str, int, str, bool]]:
    """``(file, line, code, is_fragment)`` of every ``python`` block."""
    blocks = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        for match in FENCE.finditer(text):
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            code = match.group(1)
            if code.lstrip().startswith("--8<--"):
                continue
            line = text[: match.start()].count("\n") + 1
            blocks.append((str(path.relative_to(ROOT)), line, code, before.startswith(MARK)))
    return blocks


BLOCKS = doc_blocks()


def test_blocks_are_found_and_fragments_are_the_exception():
    assert len(BLOCKS) >= 10
    assert sum(not fragment for *_, fragment in BLOCKS) >= 5


@pytest.mark.parametrize(
    "code",
    [pytest.param(code, id=f"{file}:{line}") for file, line, code, fragment in BLOCKS if not fragment],
)
def test_block_runs_as_written(code):
    exec(compile(code, "<doc block>", "exec"), {"__name__": "__doc_block__"})
