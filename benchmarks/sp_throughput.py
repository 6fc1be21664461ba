"""Side-by-side throughput of autosp and its peers on one model shape and several sequence lengths.

One run executes every mode one after another on the same GPUs and prints one table (and
appends it to benchmarks/RESULTS.md with the date, device and command):

  autosp            torch.compile(model, backend="autosp"), SP = number of GPUs
  single            one GPU, plain torch.compile (inductor), the full sequence
  single-autosp     one GPU, the autosp backend (SP=1: causal-mask and fused-loss passes, no collectives)
  deepspeed-autosp  DeepSpeed 0.19.8 AutoSP (ZeRO-1) via ../shared/tools/peer_probe.py
  alst              DeepSpeed Ulysses for HF + ALST memory features via ../shared/tools/alst_probe.py
  emulated-autosp   one GPU running rank 0 of an SP=--nproc autosp run, its collectives on torch's
                    fake process group: they complete at once, each returning this rank's own
                    data where a peer's would come (an all-to-all its input: one device copy),
                    so that every kernel runs over values like a real rank's. It measures one
                    rank's compute time and memory, never communication, and its loss is
                    meaningless (its attention mixes its own rows, not the peer's). Inductor's schedule
                    for it is rank 0's of a real run (tests/test_benchmark_dry_run.py checks that
                    on CPU), so its memory is the real rank's less NCCL's own buffers and what a
                    collective's stream holds a little longer (no collective runs). For when
                    only one GPU is there; its rows are marked and never a target's evidence.

Every mode does forward, backward and an AdamW step (the DeepSpeed probes: their own
recipes) on a random batch; step time is the fastest after the first step. MFU counts
6 * params * tokens plus causal attention (6 * S^2 * heads * head_dim * layers for forward and
backward; with ``--documents`` per document, with ``--window`` 12 * the pairs inside the window)
over 792 TFLOP/s bf16 per GPU, the measured matmul ceiling on H200.

  python benchmarks/sp_throughput.py --seqs 16384,65536 --nproc 2 [--modes autosp,single,alst,deepspeed-autosp]
  python benchmarks/sp_throughput.py --dry-run       # tiny CPU form: 2 gloo processes, tiny model

``shard_optimizer=True`` among an autosp mode's options is the benchmark's, not the backend's:
the AdamW step split over the ranks (``autosp.ShardedOptimizer``, ZeRO stage 1, as the
DeepSpeed modes run theirs); with it, ``optimizer_rounds=N``, ``optimizer_replicate=N`` and
``optimizer_gather=all_gather|peer_copy`` are that optimizer's ``rounds``, ``replicate`` and
``gather``.

The option sets measured against ALST (benchmarks/RESULTS.md, 2026-11-28): speed at ALST's memory,
``--modes autosp:recompute=selective+offload=True+tile_mlp=8,alst``; the longest sequences,
``autosp:recompute=full+tile_mlp=8+offload=True``; the fastest at 16K (2026-11-30, the scaling
against ``single-autosp``), ``autosp:overlap_grad_reduce=True+shard_optimizer=True+optimizer_rounds=16+
optimizer_replicate=2``. On a machine with twice the GPUs of one run,
two runs can share it: ``CUDA_VISIBLE_DEVICES=0,1 ... &`` and ``CUDA_VISIBLE_DEVICES=2,3 ...``
(each run's ratios are its own).

The peers need the DeepSpeed wheels (../shared/tools/peer_wheels.sh) installed to PYTHONPATH and
the probe scripts in --peer-dir (default: .peer, copied there from ../shared/tools).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import datetime
import json
import math
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
import traceback

PEAK_FLOPS = 792e12
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ----------------------------------------------------------------------------- worker (one mode)
def llama_config(tiny: bool, layers: int, window: int | None = None):
    """The reference shape (Llama-3.2-1B); with ``window`` the same shape as a Mistral model (Llama's
    architecture with a sliding window on every layer)."""
    from transformers import LlamaConfig, MistralConfig

    make = LlamaConfig if window is None else (lambda **kw: MistralConfig(sliding_window=window, **kw))
    if tiny:
        return make(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
                    max_position_embeddings=1 << 16)
    return make(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=1 << 20,
                rope_theta=500000.0, attn_implementation="sdpa")


def moe_config(tiny: bool, layers: int):
    """``--model qwen3_moe``: Qwen3-30B-A3B's widths (hidden 2048, 32 heads of 128, 4 KV heads,
    128 experts of 768, 8 a token, every layer routed) at ``layers`` layers; transformers' grouped
    experts (sort, grouped_mm, inverse permutation)."""
    from transformers import Qwen3MoeConfig

    if tiny:
        return Qwen3MoeConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                              moe_intermediate_size=32, decoder_sparse_step=1, max_position_embeddings=1 << 16,
                              attn_implementation="sdpa")
    return Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, num_hidden_layers=layers, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                          moe_intermediate_size=768, decoder_sparse_step=1, max_position_embeddings=1 << 20,
                          rope_theta=1000000.0, attn_implementation="sdpa")


def active_params(model, cfg) -> int:
    """Parameters a token passes through: all, less the experts it is not routed to (MFU's count)."""
    total = sum(p.numel() for p in model.parameters())
    experts = getattr(cfg, "num_experts", None)
    if not experts:
        return total
    routed = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    return total - routed * (experts - cfg.num_experts_per_tok) // experts


def parse_options(text: str) -> dict:
    """``"recompute=full+tile_mlp=8+offload=True+host_memory_gb=96.5"`` -> autosp options (ints,
    decimals and booleans typed; ``disable_passes=a/b`` a tuple of pass names)."""
    pairs = dict(kv.split("=", 1) for kv in text.split("+") if kv)
    out = {k: _typed(v) for k, v in pairs.items()}
    if "disable_passes" in out:
        out["disable_passes"] = tuple(n for n in str(out["disable_passes"]).split("/") if n)
    return out


def _typed(v: str):
    if v in ("True", "False"):
        return v == "True"
    if v.lower().lstrip("+-") in ("inf", "infinity", "nan"):
        return v  # a word, left for Config to refuse
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(v)
    return v


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import autosp

    cuda = torch.cuda.is_available() and not args.dry_run
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    emulated = args.worker == "emulated-autosp"
    if emulated:  # one process is rank 0 of args.nproc; the others exist only as the fake group's size
        from autosp._torch_private import collectives_moving_own_data, init_fake_process_group

        world = args.emulated_world
        init_fake_process_group(rank=0, world_size=world)
        # the kernels see this rank's own values where a peer's would come, never unwritten memory
        # (a GEMM over zeros or stale values runs at another speed); held till the worker returns
        # (a context manager nothing holds is closed when collected)
        emulation = contextlib.ExitStack()
        emulated_calls = emulation.enter_context(collectives_moving_own_data(world))
    elif world > 1:
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.model == "qwen3_moe":
        cfg = moe_config(args.dry_run, args.layers)
    else:
        cfg = llama_config(args.dry_run, args.layers, args.window)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    n_params = active_params(model, cfg)
    grads_reduced, shard_optimizer, sharding = False, False, {}
    if args.worker in AUTOSP_WORKERS:
        more = parse_options(args.autosp_options)
        # not a backend option: the optimizer step split over the ranks (autosp.ShardedOptimizer)
        shard_optimizer = more.pop("shard_optimizer", False)
        if shard_optimizer not in (True, False):
            raise SystemExit(f"shard_optimizer={shard_optimizer}: True or False")
        shard_optimizer = shard_optimizer and world > 1 and not emulated
        sharding = {k: more.pop(f"optimizer_{k}") for k in ("rounds", "replicate", "gather") if f"optimizer_{k}" in more}
        if sharding and not shard_optimizer:
            raise SystemExit(f"{', '.join(f'optimizer_{k}' for k in sharding)}: options of shard_optimizer=True "
                             "(with more than one rank)")
        if emulated:
            more["check_plan"] = False  # the plan agreement gathers objects: nothing comes back from a fake group
        dump = {"dump_dir": os.path.join(args.log_dir, "plan")} if args.profile and args.log_dir else {}
        # ALST's tiled loss returns no logits either: the fused loss drops them (Config.logits).
        backend = autosp.backend(compiler="aot_eager" if args.dry_run else "inductor", logits="drop", **dump, **more)
        grads_reduced = bool(more.get("overlap_grad_reduce"))
        compiled = torch.compile(model, backend=backend, dynamic=False)
    else:
        compiled = torch.compile(model, backend="aot_eager" if args.dry_run else "inductor", dynamic=False)
    if shard_optimizer:
        opt = autosp.ShardedOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-5, fused=cuda, **sharding)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    prime_optimizer(opt)
    for seq in args.seqs:
        ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(seq)).to(device)
        pos = packed_positions(seq, args.documents).to(device) if args.documents != 1 else None
        rec = {"mode": args.worker, "seq": seq, "world": world, **({"emulated": True} if emulated else {}),
               **({"documents": args.documents} if pos is not None else {}),
               **({"window": args.window} if args.window else {})}
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                if hasattr(torch.cuda, "reset_peak_host_memory_stats"):
                    torch.cuda.reset_peak_host_memory_stats()
                autosp_pinned_pool().reset_peaks()
            pinned_before = pinned_bytes("current")  # blocks of the last length not yet released
            times, loss = [], None
            for i in range(args.steps):
                if args.pipelined and i == 1:  # the rest as one stretch: sync at its two ends alone
                    t0 = time.perf_counter()
                    for _ in range(args.steps - 1):
                        train_step(compiled, model, opt, ids, args.worker, rec, grads_reduced, pos)
                    if cuda:
                        torch.cuda.synchronize()
                    times += [(time.perf_counter() - t0) / (args.steps - 1)] * (args.steps - 1)
                    break
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                step_loss = train_step(compiled, model, opt, ids, args.worker, rec, grads_reduced, pos)
                loss = step_loss if loss is None else loss  # the loss before any update
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            step = min(times[1:]) if len(times) > 1 else times[0]
            rec["timing"] = "pipelined mean" if args.pipelined else "fastest step"
            rec["one_step"] = len(times) == 1
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
            from autosp.kernels.peer_exchange import peer_bytes as exchange_bytes

            peer_gib = (getattr(opt, "peer_bytes", 0) + exchange_bytes()) / 2**30  # symmetric memory: outside
            # the allocator's count (the optimizer's blocks, the exchanges' receive buffers)
            if peer_gib:
                peak += peer_gib
                rec["peer_gib"] = round(peer_gib, 2)
            if world > 1 and not emulated:
                t = torch.tensor([peak], device=device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                peak = t.item()
            pinned = pinned_bytes("peak")
            rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
            rec.update(host_pinned_gib=None if pinned is None else round((pinned - (pinned_before or 0)) / 2**30, 2),
                       host_rss_gib=round(rss_gib, 1))
            rec.update(step_s=round(step, 4), first_step_s=round(times[0], 1), peak_gib=round(peak, 2),
                       loss=round(float(loss), 4), loss_at="first step", params=n_params, layers=cfg.num_hidden_layers,
                       heads=cfg.num_attention_heads,
                       head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
            if emulated:  # how many collectives moved this rank's own data (none: the emulation was lost)
                rec["emulated_collectives"] = sum(emulated_calls.values())
            if args.profile and (cuda or args.dry_run):  # the dry run: the same protocol over gloo, on CPU
                ok = True
                try:  # diagnostics: never lose the timing above to them
                    rec.update(profile_step(compiled, model, opt, ids, args, rank, seq, grads_reduced, pos))
                except Exception as e:  # noqa: BLE001
                    rec["profile_error"], ok = repr(e)[:200], False
                kernels_us = rec.pop("a2a_kernels_us", [])
                if world > 1 and args.worker == "autosp":  # not emulated: no peer to measure with
                    agreed = torch.tensor([int(ok)], device=device)
                    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)  # a rank whose profile failed: none measure
                    if agreed.item():
                        per_rank = [None] * world
                        dist.all_gather_object(per_rank, kernels_us)
                        last = last_arriver_ms(per_rank)
                        if last is not None:
                            rec["a2a_last_arriver_ms"] = last
                        rec.update(all_to_all_alone_ms(rec["a2a_sizes"], world, device))
        except torch.OutOfMemoryError as e:
            rec["error"] = f"OOM in the {rec.pop('phase', '?')}"
            rec["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            rec["oom_message"] = str(e).split("\n")[0][:240]
            traceback.print_exc()  # into the mode's log: which kernel asked for the memory
        if rank == 0:
            print("RESULT " + json.dumps(rec), flush=True)
        if "error" in rec:
            break
        if cuda:
            torch.cuda.empty_cache()
            autosp_pinned_pool().release()  # the next length's blocks are of other sizes
    if world > 1:
        dist.destroy_process_group()


AUTOSP_WORKERS = ("autosp", "single-autosp", "emulated-autosp")
_START = time.perf_counter()


def progress(message: str) -> None:
    """A timestamped line on stderr (kept in the mode's log even when the mode runs out of time)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"[{time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


def autosp_pinned_pool():
    from autosp.kernels.pinned_pool import POOL

    return POOL


def pinned_bytes(key: str) -> int | None:
    """Pinned host memory (``key`` "current" or "peak"): what torch's caching host allocator
    has handed out (ALST's checkpoint offload) plus what autosp's offload pool has pinned;
    None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch_stats = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
    pool = autosp_pinned_pool().stats()
    return torch_stats.get(f"allocated_bytes.{key}", 0) + pool["reserved" if key == "current" else "peak_reserved"]


def packed_positions(seq: int, documents: int):
    """``[1, seq]`` position ids of ``documents`` documents packed in a row (the last takes the
    remainder), restarting at 0 in each."""
    import torch

    if not 1 <= documents <= seq:
        raise SystemExit(f"--documents {documents}: between 1 and the sequence length {seq}")
    n = seq // documents
    lengths = [n] * (documents - 1) + [seq - n * (documents - 1)]
    return torch.cat([torch.arange(m) for m in lengths])[None]


def train_step(compiled, model, opt, ids, worker: str, marks: dict | None = None, grads_reduced: bool = False,
               position_ids=None):
    """Forward, backward, gradient mean over the group (unless the compiled backward took it:
    ``grads_reduced``, autosp's ``overlap_grad_reduce``), AdamW step; returns the loss (detached).
    ``position_ids``: packed rows (``--documents``), passed to the model as they are.

    ``use_cache=False``, as ALST's recipe and HF training do: with the cache on, the model
    returns every layer's K and V (16 layers x 2 x S x 512 bf16: 8 GiB at 256K on one GPU), kept
    through the forward, and the backward is handed a zero gradient for each of them. Under
    torch.compile transformers still builds the causal mask; autosp's causal_mask pass removes it
    (plain torch.compile keeps it)."""
    import torch

    import autosp

    marks = {} if marks is None else marks
    marks["phase"] = "forward"
    progress(f"seq {ids.shape[1]}: forward (compiles on the first step)")
    extra = {} if position_ids is None else {"position_ids": position_ids}
    out = compiled(input_ids=ids, labels=ids, use_cache=False, **extra)
    if torch.cuda.is_available():
        marks["fwd_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    marks["phase"] = "backward"
    progress(f"seq {ids.shape[1]}: backward; forward peak {marks.get('fwd_peak_gib')} GiB")
    out.loss.backward()
    if worker in AUTOSP_WORKERS and not grads_reduced:
        autosp.reduce_gradients(model)
    marks["phase"] = "optimizer"
    opt.step()
    marks.pop("phase")
    progress(f"seq {ids.shape[1]}: step done")
    opt.zero_grad(set_to_none=True)
    return out.loss.detach()


def prime_optimizer(opt) -> None:
    """Make AdamW's states before the first step: torch makes them in the first ``opt.step()``,
    so a one-step run's forward and backward would hold 2x the parameters less than every later
    step's (5.6 GiB at the reference shape), and its peak would not be the run's. A step with
    zero gradients and no weight decay leaves every parameter as it was (0 / (0 + eps))."""
    import torch

    decay = [g["weight_decay"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["weight_decay"] = 0.0
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    for g, d in zip(opt.param_groups, decay, strict=True):
        g["weight_decay"] = d
    opt.zero_grad(set_to_none=True)


def profile_step(compiled, model, opt, ids, args, rank: int, seq: int, grads_reduced: bool, position_ids=None
                 ) -> dict:
    """One more step under the torch profiler; rank 0 writes the kernel table (by CUDA time).
    Returns what :func:`all_to_all_profile` reads from it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = ids.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                 record_shapes=True) as prof:
        train_step(compiled, model, opt, ids, args.worker, grads_reduced=grads_reduced, position_ids=position_ids)
        if cuda:
            torch.cuda.synchronize()
    if rank == 0 and args.log_dir:
        try:  # rank 0 alone: its failure must not keep it from the baseline the others wait in
            table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=40,
                                              max_name_column_width=90)
            stem = file_stem(args.label or args.worker)
            with open(os.path.join(args.log_dir, f"profile_{stem}_{seq}.txt"), "w") as f:
                f.write(table)
            if args.trace:
                prof.export_chrome_trace(os.path.join(args.log_dir, f"trace_{stem}_{seq}.json.gz"))
        except Exception as e:  # noqa: BLE001
            progress(f"profile table not written: {e!r}")
    events = prof.events()
    return {**all_to_all_profile(events, default_element_bytes=next(model.parameters()).element_size()),
            "breakdown": step_breakdown(events)}


ELEMENT_BYTES = {"c10::BFloat16": 2, "c10::Half": 2, "float": 4, "double": 8}


def _device_kernels(events) -> list:
    """The profiled events that are device kernels (not the compiled regions' annotations)."""
    return [e for e in events if str(e.device_type).endswith("CUDA") and not getattr(e, "is_user_annotation", False)]


def all_to_all_profile(events, default_element_bytes: int = 2) -> dict:
    """From a profiled step's events: the all-to-all kernels' device time (``a2a_ms``; it includes
    waiting for the peer), the part of it during which no compute kernel ran
    (``a2a_exposed_ms``: what the step waits for), and the calls' sizes (``a2a_sizes``:
    ``[elements, bytes per element, calls]``), for the NCCL baseline on the same calls. Where the
    profiler records no dtypes (``input_dtypes`` is newer than torch 2.11) the sizes take
    ``default_element_bytes`` (the run's activations)."""
    kernels = _device_kernels(events)
    a2a_kernels = sorted((e for e in kernels if _all_to_all_kernel(e.name)), key=lambda e: e.time_range.start)
    a2a = _union([(e.time_range.start, e.time_range.end) for e in a2a_kernels])
    compute = [(e.time_range.start, e.time_range.end) for e in kernels
               if not e.name.startswith(("nccl", "Memcpy", "Memset"))]
    sizes: dict[tuple[int, int], int] = {}
    calls = [e for e in events if e.name == "_c10d_functional::all_to_all_single"]
    for e in calls:
        dtype = (getattr(e, "input_dtypes", None) or [None])[0]
        if dtype is not None and dtype not in ELEMENT_BYTES:
            raise ValueError(f"all-to-all of dtype {dtype!r}: its element size is not known here")
        key = (math.prod(e.input_shapes[0]), ELEMENT_BYTES.get(dtype, default_element_bytes))
        sizes[key] = sizes.get(key, 0) + 1
    kernels_us = [e.time_range.end - e.time_range.start for e in a2a_kernels]
    out = {"a2a_ms": round(sum(b - a for a, b in a2a) / 1e3, 2), "a2a_exposed_ms": round(exposed_us(a2a, compute) / 1e3, 2),
           "a2a_calls": len(calls), "a2a_sizes": [[n, b, c] for (n, b), c in sorted(sizes.items())],
           "a2a_kernels_us": kernels_us}
    delays = start_delays_us(a2a_kernels, kernels)
    if delays:
        out["a2a_start_delay_us"] = {"median": round(statistics.median(delays)), "max": round(max(delays)),
                                     "total_ms": round(sum(delays) / 1e3, 2)}
    return out


def start_delays_us(a2a_kernels: list, kernels: list) -> list[float]:
    """For each all-to-all kernel, the time from the end of the kernel that made what it sends to
    its own start: NCCL's kernel gets SMs only when a kernel queued beside it lets them go
    (autosp/passes/defer_weight_grads.py). The sending kernel is found by name: Inductor names a
    kernel fused into a collective's input after the op (``triton_poi_fused_all_to_all_single_...``),
    the latest such kernel before the all-to-all. Empty without such kernels (``aot_eager``, CPU)."""
    packs = sorted((e.time_range.start, e.time_range.end) for e in kernels
                   if "all_to_all" in e.name and not e.name.startswith("nccl"))
    starts = [start for start, _ in packs]
    delays = []
    for e in a2a_kernels:
        i = bisect.bisect_left(starts, e.time_range.start)  # packs[i - 1]: the latest that began before it
        if i:
            delays.append(max(0.0, e.time_range.start - packs[i - 1][1]))
    return delays


KERNEL_KINDS = (  # (kind, does the name match); the first that matches names a kernel's kind
    ("all_to_all", lambda n: _all_to_all_kernel(n)),
    ("nccl_other", lambda n: n.startswith("nccl")),
    ("attention", lambda n: any(k in n.lower() for k in ("sdpa", "fmha", "flash", "attn", "attention"))),
    ("gemm", lambda n: n.startswith("triton_tem") or any(k in n.lower() for k in ("gemm", "nvjet", "cutlass", "xmma",
                                                                                 "cublas", "wgmma"))),
    ("optimizer", lambda n: any(k in n.lower() for k in ("adam", "multi_tensor"))),
    ("triton", lambda n: n.startswith("triton")),
    ("copy", lambda n: n.startswith(("Memcpy", "Memset"))),
)


def kernel_kind(name: str) -> str:
    return next((kind for kind, match in KERNEL_KINDS if match(name)), "other")


GAP_US = 100  # a stretch with no compute kernel longer than this is a gap in the step breakdown


def step_breakdown(events) -> dict:
    """Where a profiled step's device time goes: kernel time by kind (``KERNEL_KINDS``; kernels on
    different streams both count), the span from the first kernel's start to the last one's end,
    the part of the span no kernel ran in (``idle_ms``: the device waiting for the host; a wait
    for a peer is spent inside a communication kernel), the communication no compute kernel ran
    beside (``comm_exposed_ms``), the gaps between compute kernels longer than ``GAP_US``
    (``compute_gaps``: how many, their total, and what filled them: all-to-all kernels first, then
    other communication, else nothing), and the five largest kernels of kind ``other``. Inductor's
    matmul templates (``triton_tem_*``) count as gemm; ``multi_tensor_apply`` kernels (AdamW, and
    gradient clipping where a step has it) as optimizer. Empty where no device kernel was
    recorded (CPU)."""
    kernels = _device_kernels(events)
    if not kernels:
        return {}
    spans = [(e.time_range.start, e.time_range.end) for e in kernels]
    by_kind: dict[str, float] = {}
    other: dict[str, float] = {}
    comm, compute, a2a = [], [], []
    for e, span in zip(kernels, spans, strict=True):
        kind = kernel_kind(e.name)
        by_kind[kind] = by_kind.get(kind, 0.0) + span[1] - span[0]
        if kind == "other":
            other[e.name] = other.get(e.name, 0.0) + span[1] - span[0]
        (comm if kind in ("all_to_all", "nccl_other") else compute if kind != "copy" else []).append(span)
        if kind == "all_to_all":
            a2a.append(span)
    merged = _union(compute)
    gaps = [(b, a) for (_, b), (a, _) in zip(merged, merged[1:], strict=False) if a - b > GAP_US]
    total = sum(b - a for a, b in gaps)
    not_a2a = exposed_us(gaps, a2a)  # the gaps' time no all-to-all covered
    nothing = exposed_us(gaps, comm)
    first, last = min(a for a, _ in spans), max(b for _, b in spans)
    busy = sum(b - a for a, b in _union(spans))
    top = sorted(other.items(), key=lambda kv: -kv[1])[:5]
    return {"span_ms": round((last - first) / 1e3, 2), "idle_ms": round((last - first - busy) / 1e3, 2),
            "comm_exposed_ms": round(exposed_us(comm, compute) / 1e3, 2),
            "compute_gaps": {"count": len(gaps), "ms": round(total / 1e3, 2),
                             "all_to_all_ms": round((total - not_a2a) / 1e3, 2),
                             "other_comm_ms": round((not_a2a - nothing) / 1e3, 2), "nothing_ms": round(nothing / 1e3, 2)},
            "kinds_ms": {k: round(v / 1e3, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_other_ms": [[n[:80], round(v / 1e3, 2)] for n, v in top]}


def last_arriver_ms(per_rank: list[list[float]]) -> float | None:
    """The all-to-all kernels' time without the wait for the peers: call by call (every rank
    runs them in the same order), the shortest of the ranks' kernel times, which is the rank
    that arrived last and waited for no one; summed, in ms. None where the ranks' lists differ
    in length or hold nothing (no kernels: the CPU dry run)."""
    if not per_rank or not per_rank[0] or any(len(k) != len(per_rank[0]) for k in per_rank):
        return None
    return round(sum(min(call) for call in zip(*per_rank, strict=True)) / 1e3, 2)


def _all_to_all_kernel(name: str) -> bool:
    return name.startswith("nccl") and ("SendRecv" in name or "AllToAll" in name)


def exposed_us(comm: list[tuple[float, float]], compute: list[tuple[float, float]]) -> float:
    """The time inside the ``comm`` intervals that no ``compute`` interval covers."""
    merged = _union(compute)
    starts = [a for a, _ in merged]
    total = 0.0
    for a, b in _union(comm):
        covered = 0.0
        i = max(0, bisect.bisect_right(starts, a) - 1)
        while i < len(merged) and merged[i][0] < b:
            covered += max(0.0, min(b, merged[i][1]) - max(a, merged[i][0]))
            i += 1
        total += (b - a) - covered
    return total


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def all_to_all_alone_ms(sizes: list[list[int]], world: int, device) -> dict:
    """The process group's all-to-all alone (NCCL on GPUs, gloo in the dry run) on the calls of a
    profiled step (``a2a_sizes``: elements, bytes per element, calls; rank 0's, the same on
    every rank): what the profiled time is compared with."""
    import torch
    import torch.distributed as dist

    shared = [sizes]
    dist.broadcast_object_list(shared, src=0, device=device)  # every rank times the same calls
    dtypes = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}
    cuda = device.type == "cuda"
    total_ms = 0.0
    for numel, width, count in shared[0]:
        x = torch.randn(numel, device=device, dtype=dtypes[width])
        out = torch.empty_like(x)
        for _ in range(3):
            dist.all_to_all_single(out, x)
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(10):
            dist.all_to_all_single(out, x)
        if cuda:
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            ms = (time.perf_counter() - t0) * 1e3
        total_ms += ms / 10 * count
    return {"a2a_nccl_ms": round(total_ms, 3), "a2a_alone_backend": dist.get_backend()}


# ----------------------------------------------------------------------------- driver
def run_mode(mode: str, args) -> list[dict]:
    """Run one mode in its own torchrun; ``autosp:k=v+k=v`` passes autosp options, and
    ``...@NAME=value`` (repeatable) sets an environment variable for that mode's processes alone
    (``autosp@CUDA_DEVICE_MAX_CONNECTIONS=1``: settings read when CUDA or NCCL start, compared
    in one run)."""
    label = mode
    mode, environment = mode_environment(mode)
    mode, _, options = mode.partition(":")
    nproc = 1 if mode.startswith("single") or mode == "emulated-autosp" else args.nproc
    lengths = args.single_seqs if mode.startswith("single") and args.single_seqs else args.seqs
    seqs = ",".join(map(str, lengths))
    port = ["--master-port", str(args.master_port)] if args.master_port else ["--standalone"]  # standalone: a free port
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *port]
    if mode in ("single", *AUTOSP_WORKERS):
        cmd = torchrun + [os.path.abspath(__file__), "--worker", mode, "--label", label, "--seqs", seqs,
                          "--layers", str(args.layers), "--steps", str(args.steps), "--autosp-options", options,
                          "--documents", str(args.documents), "--model", args.model] \
            + (["--window", str(args.window)] if args.window else []) \
            + (["--emulated-world", str(args.nproc)] if mode == "emulated-autosp" else []) \
            + (["--dry-run"] if args.dry_run else []) \
            + (["--profile", "--log-dir", args.log_dir] if args.profile and args.log_dir else []) \
            + (["--trace"] if args.profile and args.log_dir and args.trace else []) \
            + (["--pipelined"] if args.pipelined else [])
    elif args.documents != 1 or args.window or args.model != "llama":
        raise SystemExit(f"--documents, --window, --model: mode {mode!r} is not set up for them (its peer script "
                         "builds its own model and batch)")
    elif mode == "deepspeed-autosp":
        cmd = torchrun + [os.path.join(args.peer_dir, "peer_probe.py"), "--mode", "ds_autosp", "--seqs", seqs,
                          "--layers", str(args.layers)]
    elif mode == "alst":
        cmd = torchrun + [os.path.join(args.peer_dir, "alst_probe.py"), "--seqs", seqs, "--layers", str(args.layers),
                          "--steps", str(args.steps)]
    else:
        raise ValueError(f"unknown mode {mode!r}")
    # Every mode runs under the allocator setting of ALST's recipe (expandable segments: less
    # fragmentation at long lengths), unless the caller set one.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, args.peer_dir, os.environ.get("PYTHONPATH")])))
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env.update(environment)
    t0 = time.time()
    stdout, stderr, why = run_with_timeout(cmd, env, args.mode_timeout)
    records = []
    for line in stdout.splitlines():
        line = line.removeprefix("RESULT ").strip()
        if line.startswith("{") and '"seq"' in line:
            rec = json.loads(line)
            rec["mode"] = label
            records.append(rec)
    if not records:
        records = [{"mode": label, "seq": lengths[0], "error": f"{why}: {stderr.strip()[-300:]}"}]
    elif why.startswith("timeout") and len(records) < len(lengths):
        records.append({"mode": label, "seq": lengths[len(records)], "error": why})
    if args.log_dir:
        with open(os.path.join(args.log_dir, file_stem(label) + ".log"), "w") as f:
            f.write(" ".join(cmd) + f"\n# {time.time() - t0:.0f} s, {why}\n" + stdout + "\n--- stderr ---\n" + stderr)
    return records


def mode_environment(mode: str) -> tuple[str, dict[str, str]]:
    """``"autosp:k=v@A=1@B=x"`` -> ``("autosp:k=v", {"A": "1", "B": "x"})``."""
    mode, *settings = mode.split("@")
    environment = {}
    for setting in settings:
        name, eq, value = setting.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise SystemExit(f"mode {mode!r}: {setting!r} is no environment setting (NAME=value)")
        environment[name] = value
    return mode, environment


def file_stem(label: str) -> str:
    """A mode's label (``autosp:overlap_grad_reduce=True``) as a file name: its logs, profile and
    trace, one set a mode (two option sets of one worker write apart)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


def run_with_timeout(cmd: list[str], env: dict, timeout: float) -> tuple[str, str, str]:
    """Run ``cmd``; past ``timeout`` seconds end it and every process under it. (torchrun starts
    each worker in a session of its own: killing torchrun alone leaves them running on the GPUs,
    beside the next mode.) Returns stdout, stderr and why it ended."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        return stdout, stderr, f"rc={proc.returncode}"
    except subprocess.TimeoutExpired:
        pass
    below = descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()  # torchrun's own shutdown: it stops its workers
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=GRACE_S)
    for pid in [proc.pid, *below, *descendants(proc.pid)]:
        for kill in (os.killpg, os.kill):  # a worker leads its own process group (its compile workers)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(pid, signal.SIGKILL)
    try:  # what the lengths that finished printed
        stdout, stderr = proc.communicate(timeout=GRACE_S)
    except subprocess.TimeoutExpired:  # a pipe still held open: give up on the rest of the output
        stdout, stderr = "", ""
    return _text(stdout), _text(stderr), f"timeout after {timeout:.0f} s"


GRACE_S = 20


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), from /proc; [] elsewhere."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _text(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def flops_per_step(rec: dict, cfg_fallback: dict) -> float:
    params = rec.get("params", cfg_fallback["params"])
    layers, heads, hd = (rec.get(k, cfg_fallback[k]) for k in ("layers", "heads", "head_dim"))
    s = rec["seq"]
    docs = rec.get("documents", 1)  # packed rows: causal attention inside each document only
    lengths = [s // docs] * (docs - 1) + [s - (s // docs) * (docs - 1)]
    return 6 * params * s + 12 * sum(attended_pairs(n, rec.get("window")) for n in lengths) * heads * hd * layers


def attended_pairs(n: int, window: int | None) -> float:
    """(query, key) pairs of causal attention over ``n`` tokens: n^2 / 2 (as MFU conventions count
    it), or under a sliding window the exact count, ``W (W + 1) / 2 + (n - W) W``."""
    if window is None or window >= n:
        return n * n / 2
    return window * (window + 1) / 2 + (n - window) * window


def table(records: list[dict], args) -> str:
    ref_cfg = {"params": 1_498_482_688 if not args.dry_run else 0, "layers": args.layers, "heads": 32, "head_dim": 64}
    by = {(r["mode"], r["seq"]): r for r in records}
    lines = ["| mode | seq | GPUs | step s | tok/s/GPU | MFU | peak GiB | pinned host GiB | loss | vs alst | vs deepspeed-autosp |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['seq']} | {r.get('world', '')} | {r['error'][:60]} | | | {r.get('peak_gib', '')} | | | | |")
            continue
        world = r.get("world", 1)
        tps = r["seq"] / r["step_s"] / world
        mfu = flops_per_step(r, ref_cfg) / r["step_s"] / (PEAK_FLOPS * world)
        ratios = []
        for peer in ("alst", "deepspeed-autosp"):
            p = by.get((peer, r["seq"]))
            ok = p is not None and "error" not in p and not r.get("emulated")  # no ratio of compute alone to a real run
            ratios.append(f"{tps / (p['seq'] / p['step_s'] / p.get('world', 1)):.2f}x" if ok else "")
        star = "*" if r.get("one_step") else ""
        mark = "†" if r.get("emulated") else ""
        pinned = r.get("host_pinned_gib")
        loss = "" if r.get("emulated") else r.get("loss", "")
        lines.append(f"| {r['mode']} | {r['seq']} | {world}{mark} | {r['step_s']:.3f}{star} | {tps:,.0f}{star} | {mfu:.1%}{star} | "
                     f"{r.get('peak_gib', '')} | {'' if pinned is None else pinned} | {loss} | "
                     f"{ratios[0]} | {ratios[1]} |")
    notes = []
    if getattr(args, "documents", 1) != 1:
        notes.append(f"packed rows: {args.documents} documents a row (position_ids restart in each); MFU counts "
                     "the attention FLOPs of the documents")
    if getattr(args, "window", None):
        notes.append(f"sliding window of {args.window} on every layer (the shape as a Mistral model); MFU counts the "
                     "attention FLOPs inside the window")
    for seq in sorted({r["seq"] for r in records}):
        losses = {r["mode"]: r["loss"] for r in records if r["seq"] == seq and "loss" in r
                  and r["mode"] != "deepspeed-autosp" and not r.get("emulated")}
        if len(losses) > 1:
            spread = max(losses.values()) - min(losses.values())
            verdict = "agree" if spread <= 0.05 else "DIFFER"
            notes.append(f"seq {seq}: losses {verdict} across {sorted(losses)} (spread {spread:.4f}; bf16 tolerance 0.05)")
    notes += scaling_notes(records)
    for r in records:
        if r.get("a2a_nccl_ms") and r.get("a2a_ms"):
            exposed = f", {r['a2a_exposed_ms']} ms of it with no compute kernel beside it" \
                if "a2a_exposed_ms" in r else ""
            notes.append(f"{r['mode']} seq {r['seq']}: all-to-all kernels {r['a2a_ms']} ms a step in the profile "
                         f"({r['a2a_calls']} calls{exposed}), {r.get('a2a_alone_backend', 'nccl').upper()} alone on the same "
                         f"calls {r['a2a_nccl_ms']} ms: "
                         f"{r['a2a_ms'] / r['a2a_nccl_ms']:.2f}x (kernel time includes waiting for the peer)"
                         + (f"; the last rank to arrive at each call spent {r['a2a_last_arriver_ms']} ms in them "
                            f"(no wait for a peer): {r['a2a_last_arriver_ms'] / r['a2a_nccl_ms']:.2f}x"
                            if r.get("a2a_last_arriver_ms") else "")
                         + (f"; from the kernel that made what it sends to its start, median "
                            f"{d['median']} us, max {d['max']} us, {d['total_ms']} ms together"
                            if (d := r.get("a2a_start_delay_us")) else ""))
    for r in records:
        b = r.get("breakdown")
        if b:
            kinds = ", ".join(f"{k} {v}" for k, v in b["kinds_ms"].items())
            g = b.get("compute_gaps", {})
            notes.append(f"{r['mode']} seq {r['seq']}: profiled step's device span {b['span_ms']} ms, {b['idle_ms']} ms "
                         f"of it with no kernel running, {b['comm_exposed_ms']} ms of communication with no compute "
                         f"beside it; kernel ms by kind: {kinds}"
                         + (f"; {g['count']} gaps over {GAP_US} us between compute kernels, {g['ms']} ms (all-to-all "
                            f"{g['all_to_all_ms']}, other communication {g['other_comm_ms']}, nothing "
                            f"{g['nothing_ms']})" if g else ""))
    if any(r.get("emulated") for r in records):
        notes.append("† emulated: one GPU ran rank 0 of that many, its collectives on a fake process group (no "
                     "communication; each returns the rank's own data as its peers'): one rank's compute time and "
                     "memory, no loss, no ratio to a peer.")
    if any(r.get("one_step") for r in records):
        notes.append("* one step (--steps 1): its time includes compiling; a bound, not a throughput figure.")
    notes.append("deepspeed-autosp losses are recorded, not tuned against.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def scaling_notes(records: list[dict]) -> list[str]:
    """Per length: each multi-GPU row's scaling, the one-GPU step over P x its step, against the mean
    of the call's one-GPU rows of the fastest kind there (``single-autosp``, autosp's backend on
    one GPU, else plain ``single``; a mode run again under ``@AUTOSP_RUN=k`` is one more row)."""
    notes = []
    ok = [r for r in records if "error" not in r and not r.get("emulated") and not r.get("one_step")]
    for seq in sorted({r["seq"] for r in ok}):
        rows = [r for r in ok if r["seq"] == seq]
        for kind in ("single-autosp", "single"):
            ref = [r["step_s"] for r in rows if r.get("world", 1) == 1 and r["mode"].split("@")[0] == kind]
            if ref:
                break
        multi = [r for r in rows if r.get("world", 1) > 1]
        if not ref or not multi:
            continue
        one = sum(ref) / len(ref)
        spread = f", {min(ref):.3f}-{max(ref):.3f}" if len(ref) > 1 else ""
        each = "; ".join(f"{r['mode']}: {one / (r['world'] * r['step_s']):.1%}" for r in multi)
        notes.append(f"seq {seq}: scaling against {kind} (the one-GPU step over P x the step; one GPU {one:.4f} s, "
                     f"mean of {len(ref)} row{'s' if len(ref) > 1 else ''}{spread}): {each}")
    return notes


def device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        names = [n for n in out.stdout.splitlines() if n.strip()]
        return f"{len(names)}x {names[0]}" if names else "cpu"
    except FileNotFoundError:
        return "cpu"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=lambda s: [int(x) for x in s.split(",")], default=[16384, 65536])
    p.add_argument("--modes", default="autosp,single,alst,deepspeed-autosp",
                   help="comma-separated; 'autosp:recompute=selective' passes autosp options (joined by '+'); "
                        "'...@NAME=value' sets an environment variable for that mode alone")
    p.add_argument("--autosp-options", default="", help=argparse.SUPPRESS)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--model", choices=("llama", "qwen3_moe"), default="llama",
                   help="llama: the reference shape (Llama-3.2-1B); qwen3_moe: Qwen3-30B-A3B's widths at --layers "
                        "layers (autosp and single modes; MFU over the active parameters)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--documents", type=int, default=1,
                   help="pack each row with this many equal documents (position_ids restart in each; the models "
                        "build a causal-within-documents mask); autosp, single-autosp, emulated-autosp and single only")
    p.add_argument("--window", type=int, default=None,
                   help="a sliding window on every layer (the shape as a Mistral model); autosp, single-autosp, "
                        "emulated-autosp and single only")
    p.add_argument("--peer-dir", default=os.path.join(ROOT, ".peer"))
    p.add_argument("--log-dir", default=None)
    p.add_argument("--mode-timeout", type=float, default=1800)
    p.add_argument("--single-seqs", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="the lengths the one-GPU modes run (default: --seqs)")
    p.add_argument("--master-port", type=int, default=None, help="torchrun's port (default: a free one, "
                   "torchrun --standalone)")
    p.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    p.add_argument("--profile", action="store_true", help="autosp/single: one more step under the profiler, "
                   "its kernel table written to --log-dir; autosp at SP>1: its all-to-all kernels' time, the part "
                   "of it no compute kernel ran beside, the same without the wait for a peer (call by call, the rank "
                   "that arrived last), and NCCL alone on the same calls")
    p.add_argument("--trace", action="store_true", help="with --profile: rank 0's chrome trace of the profiled step "
                   "into --log-dir (trace_<mode and options>_<seq>.json.gz)")
    p.add_argument("--pipelined", action="store_true",
                   help="autosp/single: the steps after the first timed as one stretch (their mean), no "
                        "synchronization between them: what one step leaves running overlaps the next, as in "
                        "a training loop; default: each step alone, the fastest")
    p.add_argument("--dry-run", action="store_true", help="tiny CPU form: gloo, tiny model, autosp and single")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    # the mode as the driver names it (options and environment settings): the worker's file names
    p.add_argument("--label", default=None, help=argparse.SUPPRESS)
    p.add_argument("--emulated-world", type=int, default=2, help=argparse.SUPPRESS)  # not --nproc: torchrun takes its prefix
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.window and args.model != "llama":
        raise SystemExit("--window: the llama shape only (made a Mistral model)")
    if args.dry_run:  # the one-process modes at one length (--single-seqs): each length costs CI a compile
        args.seqs, args.single_seqs, args.modes, args.steps = [64, 67], [67], \
            "autosp,autosp:recompute=selective+overlap_grad_reduce=True+shard_optimizer=True+optimizer_replicate=1,single,single-autosp,"\
            "emulated-autosp", 2
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
    records = []
    for mode in args.modes.split(","):
        records += run_mode(mode, args)
    text = table(records, args)
    print(text)
    if not args.dry_run:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(args.results, "a") as f:
            f.write(f"\n## {stamp}, {device_name()}, {args.layers} layers\n\n`python {' '.join(sys.argv)}`\n\n{text}\n")


if __name__ == "__main__":
    main()
