"""Move imports of the top-level `passes` package under the installed namespace `rewriter.passes`.

The repository keeps `passes/` at the top; the wheel installs it as `rewriter.passes` (see
pyproject's package-dir). Run from the repository root (idempotent; re-run it on a merged tree):

    python tools/namespace_imports.py          # rewrite in place, list changed files
    python tools/namespace_imports.py --check  # exit 1 if anything is left to rewrite

Rewrites, in every .py file under rewriter/, passes/, tests/, bench/, examples/, models/, tools/:
    from passes import X          -> from rewriter.passes import X
    from passes.base import X     -> from rewriter.passes.base import X
    import passes                 -> import rewriter.passes as passes
    import passes.bottleneck      -> import rewriter.passes.bottleneck
    "passes.x" / 'passes.x'       -> "rewriter.passes.x" (module names in strings)
Import blocks it touched are re-sorted with `ruff check --select I --fix`.
Code should not refer to `passes.x.y` after a bare `import passes.x` (use `from ... import`).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

FOLDERS = ("rewriter", "passes", "tests", "bench", "examples", "models", "tools")
SELF = Path(__file__).resolve()

RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(\s*)from passes(\.[\w.]+)? import ", re.M),
     r"\1from rewriter.passes\2 import "),
    (re.compile(r"^(\s*)import passes(\s*(#.*)?)$", re.M), r"\1import rewriter.passes as passes\2"),
    (re.compile(r"^(\s*)import passes\.([\w.]+)", re.M), r"\1import rewriter.passes.\2"),
    (re.compile(r"""(["'])passes\.(\w)"""), r"\1rewriter.passes.\2"),
]


def rewrite_text(text: str) -> str:
    for pattern, replacement in RULES:
        text = pattern.sub(replacement, text)
    return text


def files(root: Path) -> list[Path]:
    out = []
    for folder in FOLDERS:
        base = root / folder
        if base.is_dir():
            out += sorted(p for p in base.rglob("*.py") if p.resolve() != SELF)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report only; exit 1 if needed")
    parser.add_argument("--root", default=".", help="repository root (default: .)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    changed = []
    for path in files(root):
        text = path.read_text()
        new = rewrite_text(text)
        if new != text:
            changed.append(path)
            if not args.check:
                path.write_text(new)
    for path in changed:
        print(path)
    if changed and not args.check:
        sort_imports(changed)
    return 1 if args.check and changed else 0


def sort_imports(paths: list[Path]) -> None:
    """Re-sort the import blocks the rename touched (ruff's isort rule), when ruff is there."""
    try:
        subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "I", "--fix", "-q",
                        *map(str, paths)], check=False)
    except OSError:
        print("ruff not found: run `ruff check --select I --fix` on the files above")


if __name__ == "__main__":
    sys.exit(main())
