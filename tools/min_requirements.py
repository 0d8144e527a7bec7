"""Print the declared lower bounds of pyproject.toml as exact pins (`onnx>=1.17` -> `onnx==1.17`).

`make test-min` installs these into a separate venv and runs the fast tests, so the floors in
pyproject are versions that were actually tested. Usage: python tools/min_requirements.py [EXTRA...]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def pins(requirements: list[str]) -> list[str]:
    out = []
    for req in requirements:
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*>=\s*([\w.]+)", req)
        out.append(f"{match.group(1)}=={match.group(2)}" if match else req)
    return out


def main(extras: list[str]) -> int:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    print("\n".join(pins(requirements)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
