"""The package's modules import each other without cycles (lazy in-function imports aside)."""

from __future__ import annotations

import importlib.util

from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("import_cycles", ROOT / "tools" / "import_cycles.py")
import_cycles = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_cycles)


def test_package_has_no_module_level_import_cycles():
    graph = import_cycles.module_imports()
    assert len(graph) > 60 and "rewriter.passes.bottleneck" in graph  # it read the package
    assert import_cycles.cycles(graph) == []


def test_a_cycle_is_found():
    assert import_cycles.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        ["a", "b", "c"]]
