"""Regenerate the shipped golden vectors (refcurv/golden/data): every quantity case and one
or more cases per registered method (the registry is iterated, so a method added since the
last run gets its vectors). Deterministic: two runs write the same bytes
(tests/test_golden.py checks it).

    python scripts/make_golden.py            # from the repository root

Changing a shipped vector (any sha256 in the manifest) needs a CHANGELOG entry saying why.
"""
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from refcurv.golden import DATA_DIR, export  # noqa: E402


def main():
    if os.path.isdir(DATA_DIR):  # stale cases of a renamed method must not linger
        shutil.rmtree(DATA_DIR)
    m = export(DATA_DIR)
    size = sum(os.path.getsize(os.path.join(DATA_DIR, f)) for f in os.listdir(DATA_DIR))
    print(f"wrote {len(m['cases'])} cases, {size / 1e6:.2f} MB, to {DATA_DIR}")


if __name__ == "__main__":
    main()
