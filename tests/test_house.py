"""The house (issue 16): the package's import graph has no cycle and no import that runs back up
its declared layers, and no function is longer than 60 lines (no allow-list). Both read the
source with scripts/import_graph.py (AST only)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "import_graph.py"


def _graph():
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_import_graph_has_no_cycle_and_no_import_running_back_up():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 cycle(s), 0 import(s) running back up" in proc.stdout


def test_no_function_is_longer_than_60_lines():
    long = _graph().long_functions()
    assert long == [], "split these functions:\n" + "\n".join(long)


def test_the_checks_can_fail(tmp_path):
    """A circle, an import that runs back up and a long function are each found (a toy package)."""
    g = _graph()
    pkg = tmp_path / "cggm"
    (pkg / "metrics").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "metrics" / "__init__.py").write_text("")
    (pkg / "types.py").write_text("def f():\n    from .metrics import tracker\n")
    (pkg / "metrics" / "tracker.py").write_text("from ..types import f\n")
    (pkg / "data.py").write_text("def g():\n    from .training import x\n")
    (pkg / "training.py").write_text("x = 1\n")
    (pkg / "runner.py").write_text("def h():\n" + "    pass\n" * 60)
    mods = g.modules(tmp_path)
    graph = g.imports(mods)
    assert g.cycles(graph) == [["cggm.metrics.tracker", "cggm.types"]]
    g.ROOT = tmp_path
    wrong = g.back_up(graph, mods)
    assert any("cggm.data -> cggm.training" in w for w in wrong)
    assert any("cggm.metrics.tracker -> cggm.types" in w for w in wrong)
    assert [line.split(": ")[1] for line in g.long_functions(tmp_path)] == ["h 61 lines"]
