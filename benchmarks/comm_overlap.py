"""Does a collective run beside a step's kernels, or in their way? One process a GPU.

For one rank's share of the reference shape at 16K tokens on 2 GPUs (attention over
``[1, 16, 16384, 64]`` bf16, causal; the MLP's GEMM ``[8192, 2048] x [2048, 8192]``), it times,
in ms a repetition (mean of ``--reps``):

  - each piece of work alone: attention forward, attention forward and backward, 8 GEMMs;
  - the collectives alone: ``--calls`` all-to-alls of ``--bytes`` (the q/k/v all-to-all's size at
    16K is 48 MiB), and as many all-reduces of 32 MiB (an MLP weight's gradient);
  - the work with the collectives issued just before it (``async_op=True``) and waited after;

on communicators made with each option set: the default, a high-priority stream, and NCCL's
CTA cap (``--max-ctas``). "serial" is the sum of the two alone: a joint time above it means the
two slow each other more than running them one after the other would. The answers decide what
autosp overlaps (autosp/passes/defer_weight_grads.py: all-to-alls beside GEMMs, never beside
attention; benchmarks/RESULTS.md, 2026-11-30).

  torchrun --nproc-per-node=2 benchmarks/comm_overlap.py [--bytes 25165824] [--max-ctas 4,16]
  torchrun --nproc-per-node=2 benchmarks/comm_overlap.py --dry-run    # tiny, gloo, CPU
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bytes", type=int, default=24 << 20, help="bytes of one all-to-all")
    p.add_argument("--calls", type=int, default=4, help="collectives beside one piece of work")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--max-ctas", type=lambda s: [int(x) for x in s.split(",") if x], default=[4, 16])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, gloo, CPU")
    args = p.parse_args()

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    cuda = torch.cuda.is_available() and not args.dry_run
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    seq, heads, head_dim, rows, hidden, inter = (16384, 16, 64, 8192, 2048, 8192) if cuda else (256, 2, 16, 64, 32, 64)
    nbytes = args.bytes if cuda else 64 << 10
    q, k, v = (torch.randn(1, heads, seq, head_dim, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn(1, heads, seq, head_dim, device=dev, dtype=dtype)
    a = torch.randn(rows, hidden, device=dev, dtype=dtype)
    w = torch.randn(hidden, inter, device=dev, dtype=dtype)
    elem = torch.tensor([], dtype=dtype).element_size()
    x = torch.randn(nbytes // elem // world * world, device=dev, dtype=dtype)
    y = torch.empty_like(x)
    grad = torch.randn((32 << 20) // elem if cuda else 4096, device=dev, dtype=dtype)

    work = {
        "attention fwd": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "attention fwd+bwd": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do),
        "8 GEMMs": lambda: [a @ w for _ in range(8)],
    }

    def timed(fn) -> float:
        for _ in range(2):
            fn()
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(args.reps):
            fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3 / args.reps

    def beside(fn, group, kind: str):
        def step():
            if kind == "all-to-all":
                handles = [dist.all_to_all_single(y, x, group=group, async_op=True) for _ in range(args.calls)]
            else:
                handles = [dist.all_reduce(grad, group=group, async_op=True) for _ in range(args.calls)]
            if fn is not None:
                fn()
            for h in handles:
                h.wait()
        return step

    groups = {"default": dist.new_group(list(range(world)))}
    if cuda:  # NCCL's own options (gloo has none of these)
        high = dist.ProcessGroupNCCL.Options()
        high.is_high_priority_stream = True
        groups["high priority"] = dist.new_group(list(range(world)), pg_options=high)
        for ctas in args.max_ctas:
            capped = dist.ProcessGroupNCCL.Options()
            capped.config.max_ctas, capped.config.min_ctas = ctas, 1
            groups[f"max_ctas {ctas}"] = dist.new_group(list(range(world)), pg_options=capped)

    alone = {name: timed(fn) for name, fn in work.items()}
    rows_out = []
    for gname, group in groups.items():
        for kind in ("all-to-all", "all-reduce"):
            comm = timed(beside(None, group, kind))
            for wname, fn in work.items():
                joint = timed(beside(fn, group, kind))
                rows_out.append((gname, f"{args.calls} x {kind}", wname, alone[wname], comm, joint,
                                 alone[wname] + comm))
    if rank == 0:
        where = torch.cuda.get_device_name() if cuda else "CPU (gloo, tiny)"
        print(f"{world} x {where}; all-to-all {x.numel() * elem / 2**20:.2f} MiB, all-reduce "
              f"{grad.numel() * elem / 2**20:.2f} MiB; ms a repetition, mean of {args.reps}\n")
        print("| communicator | collectives | work | work alone | collectives alone | together | serial |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for g, c, wname, w_ms, c_ms, j_ms, s_ms in rows_out:
            print(f"| {g} | {c} | {wname} | {w_ms:.3f} | {c_ms:.3f} | {j_ms:.3f} | {s_ms:.3f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
