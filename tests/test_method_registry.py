"""Every registered method has a one-line summary and a source in `cggm methods`."""

from __future__ import annotations

import subprocess
import sys

from cggm.methods import list_methods
from cggm.methods.registry import method_info


def test_every_method_has_a_summary_and_a_source():
    for name in list_methods():
        info = method_info(name)
        assert info.summary and "\n" not in info.summary, name
        assert info.source, f"{name}: give its class a `source` (paper and code) or register it with source=..."


def test_cggm_methods_lists_them():
    out = subprocess.run([sys.executable, "-m", "cggm", "methods"], capture_output=True, text=True, check=True).stdout
    for name in list_methods():
        assert f"\n{name} " in "\n" + out, name
    assert "source: -" not in out
