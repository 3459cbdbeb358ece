"""Every ```python block of the README runs as written, in order, in one namespace (as a
reader pasting them into one session would). A block whose first line is ``# needs: pkg[, pkg]``
uses an optional extra: it runs when those packages import, and is skipped (with the rest of
the README still run) when they do not."""
import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
NEEDS = re.compile(r"^# needs: *([\w., -]+)$")


def _blocks():
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _missing(code):
    m = NEEDS.match(code.splitlines()[0]) if code.strip() else None
    if not m:
        return []
    return [p.strip() for p in m.group(1).split(",") if importlib.util.find_spec(p.strip()) is None]


def test_readme_python_blocks_run():
    blocks = _blocks()
    assert blocks, "no python blocks found"
    ns = {"__name__": "__readme__"}
    skipped = []
    for i, code in enumerate(blocks):
        missing = _missing(code)
        if missing:
            skipped.append((i + 1, missing))
            continue
        exec(compile(code, f"README.md block {i + 1}", "exec"), ns)
    if skipped:
        pytest.skip(f"README blocks {skipped} need packages that are not installed (the rest ran)")
