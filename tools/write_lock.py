"""Writes the lock (`make lock`): every package version installed in a venv, as pip constraints.

Usage: python tools/write_lock.py VENV OUT. The project itself (installed editable) is left out.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEADER = """\
# The versions the suite was green with: every install in the Makefile and .ci/run uses this file
# as pip constraints (-c). Made by `make lock` from pyproject.toml's ranges; do not edit by hand.
# torch is the CPU build that lies on the development machines (the Makefile's TORCH_SPEC).
"""


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    venv, out = Path(argv[0]), Path(argv[1])
    frozen = subprocess.run([str(venv / "bin" / "pip"), "freeze", "--exclude-editable"], check=True,
                            capture_output=True, text=True).stdout
    lines = sorted((ln for ln in frozen.splitlines() if ln and not ln.startswith("#")), key=str.lower)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(HEADER + "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} pinned packages to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
