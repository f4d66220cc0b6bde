"""The benchmark scripts that the README and issue notes quote still run (tiny settings)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_overhead_script_prints_ratios_phases_and_memory():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "benchmarks/overhead.py", "--arch", "mlp", "--steps", "3", "--warmup", "1",
                        "--modalities", "2", "--threads", "1", "--phases"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    ratios = next(line for line in lines if line.startswith("2 ")).split()
    assert len(ratios) == 7 and all(float(v) > 0 for v in ratios[1:])  # M, joint ms, 5 ratios
    assert "targets: magnitude only <= 1.30" in r.stdout
    phases = [line for line in lines if line.startswith("2  ") and "|" in line]
    assert len(phases) == 6  # one row per variant: forward | loss | backward | step
    memory = lines[lines.index(next(line for line in lines if line.startswith("memory, MB"))) + 2].split()
    # joint holds no method state; CGGM holds its classifiers and their optimizer state
    assert memory[0] == "2" and memory[2] == "[0.00]" and float(memory[4].strip("[]")) > 0 and float(memory[6].strip("[]")) > 0
    assert "USDT" not in r.stdout + r.stderr  # (the CPU profiler's own lines are kept out)
