"""The speed benchmark's tiny CPU form runs end to end (a program, never timed here)."""

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _benchmark(name: str):
    """A module of benchmarks/ (a script directory, not a package)."""
    import importlib

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_sp_throughput_dry_run(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sp_throughput.py"), "--dry-run",
                          "--profile", "--pipelined", "--log-dir", str(tmp_path), "--results", str(tmp_path / "RESULTS.md")],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    # --profile: a profiled step, then the process group's all-to-all alone on the same calls, with
    # the ranks' agreement before it (the protocol of the GPU runs, over gloo on CPU).
    records = [json.loads(x.removeprefix("RESULT ")) for x in (tmp_path / "autosp.log").read_text().splitlines()
               if x.startswith("RESULT ")]
    assert len(records) == 2
    for rec in records:
        assert "profile_error" not in rec, rec
        assert rec["timing"] == "pipelined mean" and not rec["one_step"], rec  # --pipelined: the steps after the first
        assert rec["a2a_calls"] == 4 * rec["layers"], rec  # q/k/v and o, forward and backward
        assert sum(c for _, _, c in rec["a2a_sizes"]) == rec["a2a_calls"], rec
        assert all(width == 4 for _, width, _ in rec["a2a_sizes"]), rec  # float32 in the dry run
        assert rec["a2a_nccl_ms"] > 0 and rec["a2a_alone_backend"] == "gloo", rec
        assert (tmp_path / f"profile_autosp_{rec['seq']}.txt").exists()
        # the second option set of the same worker profiles into its own file (not over the first's)
        assert (tmp_path / f"profile_autosp_recompute_selective_overlap_grad_reduce_True_shard_optimizer_True_"
                f"optimizer_replicate_1_{rec['seq']}.txt").exists()
    rows = [line for line in out.stdout.splitlines() if line.startswith("| autosp") or line.startswith("| single")]
    # autosp, autosp:recompute=selective+overlap_grad_reduce=True+shard_optimizer=True+optimizer_replicate=1
    # (the AdamW step split over the ranks, the last block whole on each) at two lengths; single and
    # single-autosp at the second (--single-seqs); every loss agrees
    assert len(rows) == 6, out.stdout
    assert sum(line.startswith("| single") and " | 67 | " in line for line in rows) == 2, out.stdout
    assert "seq 64: losses agree" in out.stdout and "seq 67: losses agree" in out.stdout, out.stdout
    # Rank 0 of SP=2 on a fake group: a row per length, marked, with no loss and kept out of the agreement.
    emulated = [line for line in out.stdout.splitlines() if line.startswith("| emulated-autosp | ")]
    assert len(emulated) == 2 and all(" | 2† | " in line for line in emulated), out.stdout
    assert all(line.split(" | ")[8] == "" for line in emulated), out.stdout  # the loss column
    assert "emulated-autosp'" not in out.stdout, out.stdout
    emulated_records = [json.loads(x.removeprefix("RESULT ")) for x in (tmp_path / "emulated-autosp.log").read_text()
                        .splitlines() if x.startswith("RESULT ")]
    assert [r["emulated_collectives"] > 0 for r in emulated_records] == [True, True], emulated_records


def test_table_ratios_and_all_to_all_note():
    import argparse

    sp_throughput = _benchmark("sp_throughput")
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
    assert sp_throughput.parse_options("recompute=full+tile_mlp=8+offload=True+disable_passes=sum_products/x") == \
        {"recompute": "full", "tile_mlp": 8, "offload": True, "disable_passes": ("sum_products", "x")}
    assert sp_throughput.parse_options("host_memory_gb=96.5+memory_budget_gb=1E-6+attention=cudnn+dump_dir=a.b") == \
        {"host_memory_gb": 96.5, "memory_budget_gb": 1e-6, "attention": "cudnn", "dump_dir": "a.b"}
    assert sp_throughput.parse_options("host_memory_gb=inf+loss_chunk=-3+x=") == \
        {"host_memory_gb": "inf", "loss_chunk": -3, "x": ""}  # left to Config to refuse


def test_scaling_against_the_one_gpu_rows():
    """The scaling note: the one-GPU step (the mean of the call's single-autosp rows, repeats
    included; plain single only where no single-autosp ran) over P x each multi-GPU row's step."""
    sp_throughput = _benchmark("sp_throughput")
    recs = [
        {"mode": "autosp:x=1", "seq": 16384, "world": 2, "step_s": 0.195},
        {"mode": "single-autosp", "seq": 16384, "world": 1, "step_s": 0.348},
        {"mode": "autosp:x=1@AUTOSP_RUN=2", "seq": 16384, "world": 2, "step_s": 0.196},
        {"mode": "single-autosp@AUTOSP_RUN=2", "seq": 16384, "world": 1, "step_s": 0.352},
        {"mode": "single", "seq": 16384, "world": 1, "step_s": 0.700},  # slower kind: not the reference
        {"mode": "emulated-autosp", "seq": 16384, "world": 2, "step_s": 0.1, "emulated": True},  # no ratio
        {"mode": "alst", "seq": 16384, "world": 2, "error": "timeout"},
        {"mode": "autosp", "seq": 65536, "world": 2, "step_s": 1.0},
        {"mode": "single", "seq": 65536, "world": 1, "step_s": 1.9},
    ]
    notes = sp_throughput.scaling_notes(recs)
    assert len(notes) == 2, notes
    assert notes[0].startswith("seq 16384: scaling against single-autosp") and "0.3500 s, mean of 2 rows, 0.348-0.352" \
        in notes[0], notes[0]
    assert "autosp:x=1: 89.7%; autosp:x=1@AUTOSP_RUN=2: 89.3%" in notes[0] and "emulated" not in notes[0], notes[0]
    assert notes[1] == ("seq 65536: scaling against single (the one-GPU step over P x the step; one GPU 1.9000 s, "
                        "mean of 1 row): autosp: 95.0%"), notes[1]
    assert sp_throughput.scaling_notes(recs[:1]) == []  # no one-GPU row: no figure


def test_packed_rows_positions_and_flops():
    """--documents N: positions restart in each of N documents (the last takes the remainder), and
    MFU counts the attention of the documents, not of the whole row."""
    import argparse

    sp_throughput = _benchmark("sp_throughput")
    assert sp_throughput.packed_positions(10, 3).tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 3]]
    cfg = {"params": 0, "layers": 1, "heads": 1, "head_dim": 1}
    whole = sp_throughput.flops_per_step({"seq": 1024}, cfg)
    assert sp_throughput.flops_per_step({"seq": 1024, "documents": 4}, cfg) == whole / 4
    args = argparse.Namespace(dry_run=False, layers=16, documents=4)
    text = sp_throughput.table([{"mode": "autosp", "seq": 1024, "world": 2, "step_s": 1.0, "documents": 4}], args)
    assert "packed rows: 4 documents a row" in text


def test_sliding_window_rows_and_flops():
    """--window W: the shape as a Mistral model (its tiny form trains one process with autosp), and
    MFU counts the pairs inside the window."""
    import argparse

    sp_throughput = _benchmark("sp_throughput")
    cfg = {"params": 0, "layers": 1, "heads": 1, "head_dim": 1}
    assert sp_throughput.flops_per_step({"seq": 100, "window": 10}, cfg) == 12 * (55 + 90 * 10)
    assert sp_throughput.flops_per_step({"seq": 100, "window": 100}, cfg) == sp_throughput.flops_per_step({"seq": 100}, cfg)
    args = argparse.Namespace(dry_run=False, layers=16, window=4096)
    text = sp_throughput.table([{"mode": "autosp", "seq": 1024, "world": 2, "step_s": 1.0, "window": 4096}], args)
    assert "sliding window of 4096" in text
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sp_throughput.py"), "--worker",
                          "single-autosp", "--dry-run", "--seqs", "64", "--steps", "1", "--window", "8"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    [line] = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    rec = json.loads(line.removeprefix("RESULT "))
    assert rec["window"] == 8 and rec["step_s"] > 0 and 5.0 < rec["loss"] < 7.0, rec


def test_memory_breakdown_finds_what_is_alive_at_the_peak():
    memory_breakdown = _benchmark("memory_breakdown")
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
    assert memory_breakdown.first_backward(trace) == 3
    assert memory_breakdown.report(trace, end=3).startswith("peak 5.00 GiB in the forward")


def test_inductor_peak_replays_allocations_hand_overs_and_frees():
    inductor_peak = _benchmark("inductor_peak")
    code = """
    def call(self, args):
        x, w = args
        assert_size_stride(x, (1, 8, 4), (32, 4, 1), 'input')
        assert_size_stride(w, (4, 4), (4, 1), 'input')
        buf0 = empty_strided_cpu((8, 4), (4, 1), torch.bfloat16)
        buf1 = empty_strided_cpu((8, 4), (4, 1), torch.float32)
        del x
        buf2 = torch.ops.aten.mm.default(buf0, w)
        assert_size_stride(buf2, (8, 4), (4, 1), 'torch.ops.aten.mm.default')
        buf3 = buf1; del buf1  # reuse
        del buf0
        del buf2
        buf4 = empty_strided_cpu((4, 4), (4, 1), torch.bfloat16)
        buf5 = empty_strided_cpu((16, 4), (4, 1), torch.float32)
        return (buf3, buf4, buf5)
    """
    r = inductor_peak.replay(code, tokens=8, hidden=4, pieces=(16,))
    # Units of [8, 4] bf16: x 1 until its del, buf0 1, buf1 2 (float32), buf2 1 -> 4 at most; then
    # buf1's bytes go on as buf3 (2), buf0 and buf2 are freed, w and buf4 have no token dim, and
    # buf5 (float32, two token blocks: 4) makes the peak, 6.
    assert r["peak_units"] == 6.0 and r["line"].startswith("buf5 = ")
    assert [(u, n) for u, n, _ in r["alive"]] == [(4.0, "buf5"), (2.0, "buf3")]


def test_priming_the_optimizer_makes_its_states_and_changes_no_parameter():
    import torch

    sp_throughput = _benchmark("sp_throughput")
    model = torch.nn.Linear(8, 4)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-1, weight_decay=0.5)
    sp_throughput.prime_optimizer(opt)
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q) and p.grad is None
        assert set(opt.state[p]) >= {"exp_avg", "exp_avg_sq"}
    assert opt.param_groups[0]["weight_decay"] == 0.5


def test_an_emulated_rank_runs_the_code_of_a_real_rank(tmp_path):
    """sp_throughput's ``emulated-autosp`` rows stand for rank 0 of a real SP=2 run: Inductor's
    schedule for it (``call()``: every kernel launch, allocation, collective and free) is the
    real rank's, at the reference widths with the long-sequence options. Only the kernels' C++
    differs (a gloo process here runs one thread)."""
    script = os.path.join(ROOT, "benchmarks", "inductor_peak.py")
    common = ["--seq", "512", "--layers", "2", "--as-if-tokens", "262144", "--options",
              "recompute=attention_out+tile_mlp=2+offload=True+buffer_reuse=False+attention_head_groups=2"]
    schedules = {}
    for name, more in (("real", []), ("emulated", ["--emulated"])):
        out = subprocess.run([sys.executable, script, *common, "--dump", str(tmp_path / name), *more],
                             capture_output=True, text=True, timeout=900, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        schedules[name] = []
        for part in ("code_0.py", "code_1.py"):  # forward, backward
            code = (tmp_path / name / part).read_text()
            body = code[code.index("def call(self, args):"):]
            schedules[name].append(body[:body.find("def benchmark_compiled_module")])
    assert "all_to_all_single" in schedules["real"][0] and "autosp.reload" in schedules["real"][1]
    assert schedules["emulated"] == schedules["real"]


def test_document_attention_benchmark_dry_run():
    """The document attention benchmark's tiny CPU form prints a row per kernel, document count and window."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "document_attention.py"), "--dry-run",
                          "--docs", "1,4", "--windows", "none,8"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [[c.strip() for c in line.split("|")[2:5]] for line in out.stdout.splitlines() if line.startswith("| 16 |")]
    kernels = ["document_attention", "SDPA causal"] + ["document_attention", "SDPA dense mask"] * 3
    assert [r[2] for r in rows] == kernels, out.stdout
    assert [r[:2] for r in rows[::2]] == [["1", "-"], ["1", "8"], ["4", "-"], ["4", "8"]], out.stdout


def test_document_attention_benchmark_softcap_dry_run():
    """With --softcap the comparison is softcap_attention (causal, or the dense mask)."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "document_attention.py"), "--dry-run",
                          "--docs", "1,4", "--softcap", "2"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("|")[4].strip() for line in out.stdout.splitlines() if line.startswith("| 16 |")]
    assert rows == ["document_attention", "softcap_attention causal",
                    "document_attention", "softcap_attention dense mask"], out.stdout


def test_comm_overlap_dry_run():
    """The overlap probe's tiny form (2 gloo processes): a row per collective kind and piece of
    work, with the serial sum of the two times alone."""
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                          os.path.join(ROOT, "benchmarks", "comm_overlap.py"), "--dry-run", "--reps", "2"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.stdout.splitlines()
            if line.startswith("| default |")]
    assert [(r[1], r[2]) for r in rows] == [(f"4 x {c}", w) for c in ("all-to-all", "all-reduce")
                                            for w in ("attention fwd", "attention fwd+bwd", "8 GEMMs")], out.stdout
    for r in rows:
        alone, comm, serial = float(r[3]), float(r[4]), float(r[6])
        assert abs(serial - (alone + comm)) < 2e-3 and float(r[5]) > 0, r


def test_a_timed_out_mode_leaves_no_worker_behind(tmp_path):
    # torchrun's workers are its children, each in a session of its own: a mode that runs out of
    # time must take them along, or they go on running on the GPUs beside the next mode
    # (2026-11-29: ALST's 256K row, halved).
    sp_throughput = _benchmark("sp_throughput")
    pid_file = tmp_path / "worker.pid"
    child = ("import os, subprocess, sys, time; "
             "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
             f"open({str(pid_file)!r}, 'w').write(str(w.pid)); print('started', flush=True); time.sleep(60)")
    start = time.monotonic()
    stdout, _, why = sp_throughput.run_with_timeout([sys.executable, "-c", child], dict(os.environ), timeout=5)
    assert why == "timeout after 5 s" and "started" in stdout
    assert time.monotonic() - start < 30  # not held until the worker ends by itself (60 s)
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)  # still there (or a zombie not yet reaped by init)
        except ProcessLookupError:
            return
        with open(f"/proc/{worker}/stat") as f:
            if f.read().split(") ")[1].startswith("Z"):
                return  # killed, waiting for init to reap it
        time.sleep(0.1)
    raise AssertionError(f"worker {worker} outlived its timed-out mode")


def test_exposed_all_to_all_time_is_what_no_compute_kernel_covers():
    sp_throughput = _benchmark("sp_throughput")
    exposed = sp_throughput.exposed_us
    assert exposed([(0, 10)], []) == 10
    assert exposed([(0, 10)], [(2, 4), (3, 6), (8, 20)]) == 10 - 4 - 2  # overlapping compute counted once
    assert exposed([(0, 10), (5, 12), (30, 31)], [(11, 40)]) == 11  # 0-11 and nothing of 30-31
    assert exposed([(5, 6)], [(0, 100)]) == 0


def test_the_profile_reads_all_to_all_kernels_and_calls():
    from types import SimpleNamespace as E

    sp_throughput = _benchmark("sp_throughput")

    def kernel(name, a, b):
        return E(name=name, device_type="DeviceType.CUDA", time_range=E(start=a, end=b))

    def call(shape, dtype):
        return E(name="_c10d_functional::all_to_all_single", device_type="DeviceType.CPU", input_shapes=[shape, []],
                 input_dtypes=[dtype, None], time_range=E(start=0, end=1))

    region = kernel("## Call CompiledFxGraph abc ##", 0, 9000)  # a user annotation on the GPU track
    region.is_user_annotation = True
    events = [region, kernel("ncclDevKernel_SendRecv(x)", 0, 1000), kernel("ncclDevKernel_SendRecv(x)", 3000, 3500),
              kernel("ncclDevKernel_AllReduce_Sum", 5000, 9000),  # a gradient all-reduce: not an all-to-all
              kernel("nvjet_sm90_gemm", 400, 3200), kernel("Memcpy HtoD (Pinned -> Device)", 0, 400),
              call([8, 1024, 64], "c10::BFloat16"), call([8, 1024, 64], "c10::BFloat16"), call([4, 16], "float")]
    out = sp_throughput.all_to_all_profile(events)
    assert out == {"a2a_ms": 1.5, "a2a_exposed_ms": 0.7, "a2a_calls": 3,
                   "a2a_sizes": [[64, 4, 1], [8 * 1024 * 64, 2, 2]], "a2a_kernels_us": [1000, 500]}
    # with Inductor's pack kernels (named after the collective): how long each all-to-all waited
    # after what it sends was made (the second: behind the matmul, 2700 us)
    packs = [kernel("triton_poi_fused_all_to_all_single_clone_0", -50, -20),
             kernel("triton_poi_fused_all_to_all_single_clone_1", 250, 300)]
    assert sp_throughput.all_to_all_profile(events + packs)["a2a_start_delay_us"] == \
        {"median": 1360, "max": 2700, "total_ms": 2.72}
    for e in events:  # torch 2.11's events carry no dtypes: the run's element size
        if hasattr(e, "input_dtypes"):
            del e.input_dtypes
    assert sp_throughput.all_to_all_profile(events, default_element_bytes=2)["a2a_sizes"] == \
        [[64, 2, 1], [8 * 1024 * 64, 2, 2]]
    with pytest.raises(ValueError, match="element size"):
        sp_throughput.all_to_all_profile([call([4], "c10::Float8_e4m3fn")])



def test_the_last_rank_to_arrive_waits_for_no_one():
    last = _benchmark("sp_throughput").last_arriver_ms
    assert last([[1000, 800, 300], [400, 900, 300]]) == 1.5  # per call the shorter: 400 + 800 + 300 us
    assert last([[1000], [400, 900]]) is None  # the ranks disagree on the calls: no figure
    assert last([[], []]) is None  # no kernels (the CPU dry run)


def test_the_step_breakdown_sorts_kernels_and_finds_idle_and_exposed_time():
    from types import SimpleNamespace as E

    sp_throughput = _benchmark("sp_throughput")

    def kernel(name, a, b):
        return E(name=name, device_type="DeviceType.CUDA", time_range=E(start=a, end=b))

    assert sp_throughput.step_breakdown([E(name="aten::mm", device_type="DeviceType.CPU")]) == {}  # CPU: nothing
    events = [kernel("nvjet_sm90_tst_128x256", 0, 2000),
              kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 2000, 5000),
              kernel("ncclDevKernel_SendRecv(x)", 4000, 6000),  # 1000 of it beside the attention
              kernel("triton_poi_fused_mul_0", 7000, 7500),  # 1000 idle before it
              kernel("ncclDevKernel_AllReduce_Sum_bf16", 7200, 9000),  # 300 beside the triton kernel
              kernel("Memcpy DtoH (Device -> Pinned)", 8000, 8500),  # a copy hides no communication
              kernel("multi_tensor_apply_kernel<FusedAdam>", 9000, 9400),
              kernel("void at::native::elementwise_kernel<4>", 9400, 10000),
              kernel("triton_tem_fused_mm_3", 10000, 10100)]  # an Inductor matmul template
    out = sp_throughput.step_breakdown(events)
    assert out["span_ms"] == 10.1 and out["idle_ms"] == 1.0
    assert out["comm_exposed_ms"] == 1.0 + 1.5
    assert out["kinds_ms"] == {"attention": 3.0, "gemm": 2.1, "all_to_all": 2.0, "nccl_other": 1.8, "other": 0.6,
                               "triton": 0.5, "copy": 0.5, "optimizer": 0.4}
    assert out["top_other_ms"] == [["void at::native::elementwise_kernel<4>", 0.6]]
    # compute runs 0-5000, 7000-7500, 9000-10100: gaps 5000-7000 (the all-to-all until 6000, then
    # nothing) and 7500-9000 (the all-reduce until 9000)
    assert out["compute_gaps"] == {"count": 2, "ms": 3.5, "all_to_all_ms": 1.0, "other_comm_ms": 1.5,
                                   "nothing_ms": 1.0}


def test_a_mode_carries_its_own_environment(monkeypatch):
    """``mode@NAME=value``: settings read when CUDA or NCCL start (``CUDA_DEVICE_MAX_CONNECTIONS``,
    ``TORCH_NCCL_HIGH_PRIORITY``) compared in one run, each in that mode's processes alone."""
    import argparse

    sp_throughput = _benchmark("sp_throughput")
    assert sp_throughput.mode_environment("autosp:tile_mlp=2@A=1@B_2=x=y") == ("autosp:tile_mlp=2", {"A": "1", "B_2": "x=y"})
    assert sp_throughput.mode_environment("single") == ("single", {})
    with pytest.raises(SystemExit, match="no environment setting"):
        sp_throughput.mode_environment("autosp@1A=2")
    seen = {}

    def run(cmd, env, timeout):
        seen.update(cmd=cmd, env=env)
        return 'RESULT {"seq": 64}', "", "ended"

    monkeypatch.setattr(sp_throughput, "run_with_timeout", run)
    args = argparse.Namespace(nproc=2, single_seqs=None, seqs=[64], master_port=None, layers=1, steps=1, documents=1,
                              window=None, dry_run=True, profile=False, log_dir=None, trace=False, peer_dir=".peer",
                              mode_timeout=10, pipelined=False, model="llama")
    [rec] = sp_throughput.run_mode("autosp:tile_mlp=2@CUDA_DEVICE_MAX_CONNECTIONS=1", args)
    assert rec["mode"] == "autosp:tile_mlp=2@CUDA_DEVICE_MAX_CONNECTIONS=1"
    assert seen["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert seen["cmd"][seen["cmd"].index("--autosp-options") + 1] == "tile_mlp=2"
    sp_throughput.run_mode("autosp", args)
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in seen["env"] or "CUDA_DEVICE_MAX_CONNECTIONS" in os.environ


def test_the_moe_shape_counts_only_the_experts_a_token_is_routed_to():
    """``--model qwen3_moe``: MFU over the active parameters (k of E experts' weights)."""
    import transformers

    sp_throughput = _benchmark("sp_throughput")
    cfg = sp_throughput.moe_config(tiny=True, layers=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert routed > 0
    assert sp_throughput.active_params(model, cfg) == total - routed * (cfg.num_experts - cfg.num_experts_per_tok) \
        // cfg.num_experts
    llama = transformers.AutoModelForCausalLM.from_config(sp_throughput.llama_config(tiny=True, layers=2))
    assert sp_throughput.active_params(llama, llama.config) == sum(p.numel() for p in llama.parameters())
