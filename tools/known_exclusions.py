"""Reports pyproject.toml's known exclusions (`!=` pins) against what is installed (`make test-latest`).

A release the project excludes because it breaks us is a known exclusion, not a failure: this
prints each one with its reason (the comment above its requirement) and whether it is still the
newest release installed instead of, so that lifting the pin is a decision, not a surprise.
"""

from __future__ import annotations

import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def exclusions(pyproject: Path) -> list[tuple[Requirement, list[str], str]]:
    """(requirement, excluded versions, reason) for every dependency with a `!=` pin."""
    text = pyproject.read_text()
    project = tomllib.loads(text)["project"]
    deps = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        deps += extra
    lines = text.splitlines()
    found = []
    for dep in deps:
        req = Requirement(dep)
        excluded = [s.version for s in req.specifier if s.operator == "!="]
        if not excluded:
            continue
        at = next(i for i, ln in enumerate(lines) if f'"{dep}"' in ln)
        reason = []
        for ln in reversed(lines[:at]):  # the comment block right above the requirement
            if not ln.strip().startswith("#"):
                break
            reason.insert(0, ln.strip().lstrip("#").strip())
        found.append((req, excluded, " ".join(reason) or "(no reason given)"))
    return found


def main() -> int:
    for req, excluded, reason in exclusions(ROOT / "pyproject.toml"):
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            installed = None
        newer = [v for v in excluded if installed is None or Version(v) > Version(installed)]
        state = (f"still newer than the installed {installed}: the pin is in force" if newer
                 else f"installed {installed} is past it: the pin may be dropped")
        print(f"known exclusion: {req.name} {', '.join(excluded)} ({state}). Reason: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
