"""The speed benchmark's tiny CPU form runs end to end (a program, never timed here)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sp_throughput_dry_run():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sp_throughput.py"), "--dry-run"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| autosp") or line.startswith("| single")]
    assert len(rows) == 8, out.stdout  # autosp, autosp:recompute=selective, single, single-autosp at two lengths
    assert "seq 64: losses agree" in out.stdout and "seq 67: losses agree" in out.stdout, out.stdout
