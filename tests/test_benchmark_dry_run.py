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


def test_table_ratios_and_all_to_all_note():
    import argparse

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import sp_throughput
    finally:
        sys.path.pop(0)
    args = argparse.Namespace(dry_run=False, layers=16)
    recs = [
        {"mode": "autosp", "seq": 1024, "world": 2, "step_s": 1.0, "peak_gib": 1.0, "loss": 12.0,
         "a2a_ms": 30.0, "a2a_calls": 128, "a2a_nccl_ms": 20.0},
        {"mode": "alst", "seq": 1024, "world": 2, "step_s": 2.0, "peak_gib": 1.0, "loss": 12.01},
        {"mode": "deepspeed-autosp", "seq": 1024, "world": 2, "error": "timeout after 9 s"},
    ]
    text = sp_throughput.table(recs, args)
    assert "| autosp | 1024 | 2 | 1.000 | 512 |" in text and "| 2.00x |" in text
    assert "1.50x (kernel time includes waiting for the peer)" in text
    assert "losses agree across ['alst', 'autosp']" in text
