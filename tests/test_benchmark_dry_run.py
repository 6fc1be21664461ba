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
    assert len(rows) == 8, out.stdout  # autosp, autosp:recompute=selective+overlap_grad_reduce=True, single, single-autosp at two lengths
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


def test_memory_breakdown_finds_what_is_alive_at_the_peak():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import memory_breakdown
    finally:
        sys.path.pop(0)
    fw = [{"filename": "/tmp/torchinductor_x/ab.py", "line": 7, "name": "call"}]
    bw = [{"filename": "/tmp/torchinductor_x/cd.py", "line": 9, "name": "call"},
          {"filename": "runtime_wrappers.py", "line": 1, "name": "backward"}]
    trace = [
        {"action": "alloc", "addr": 1, "size": 4 << 30, "frames": fw},
        {"action": "alloc", "addr": 2, "size": 1 << 30, "frames": fw},
        {"action": "free_requested", "addr": 1, "size": 4 << 30},  # still counted until completed
        {"action": "alloc", "addr": 3, "size": 2 << 30, "frames": bw},  # the peak: 7 GiB
        {"action": "free_completed", "addr": 1, "size": 4 << 30},
        {"action": "alloc", "addr": 4, "size": 3 << 30, "frames": bw},  # 6 GiB: not the peak
        {"action": "free_completed", "addr": 99, "size": 1},  # allocated before the history: ignored
    ]
    peak, blocks, at = memory_breakdown.live_at_peak(trace)
    assert peak == 7 << 30 and at == 3 and sorted(b["addr"] for b in blocks) == [1, 2, 3]
    text = memory_breakdown.report(trace)
    assert text.startswith("peak 7.00 GiB in the backward")
    assert text.index("[forward] ab.py:7") < text.index("[backward] cd.py:9")  # 5 GiB before 2 GiB
