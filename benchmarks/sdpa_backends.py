"""Which SDPA kernels take grouped KV heads natively on this GPU, and at what speed.

For the benchmark's attention shape (32 query heads, 8 KV heads, head dim 64, bf16, causal) it
times forward + backward of each SDPA backend twice: with K and V repeated to 32 heads (what HF's
``repeat_kv`` does) and with ``enable_gqa=True`` (K and V at 8 heads), and prints TFLOP/s and
the memory the step took beyond its inputs, or why the backend refused the shape.

  python benchmarks/sdpa_backends.py --seqs 16384,65536
"""

from __future__ import annotations

import argparse
import functools


def _step(q, k, v, gqa: bool) -> None:
    import torch
    import torch.nn.functional as F

    if gqa:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        kk, vv = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        o = F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
    o.backward(torch.ones_like(o))


def main() -> None:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=lambda s: [int(x) for x in s.split(",")], default=[16384, 65536])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    args = p.parse_args()
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    h, hk, d = args.heads, args.kv_heads, args.head_dim
    print("| seq | backend | KV | TFLOP/s fwd+bwd | extra GiB |\n| --- | --- | --- | --- | --- |")
    for s in args.seqs:
        q = torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, hk, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, hk, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        flops = 3.5 * 2 * s * s * h * d  # causal: half of 4 s^2 h d forward; backward 2.5x forward
        for name, backend in backends.items():
            for gqa in (False, True):
                step = functools.partial(_step, q, k, v, gqa)
                label = "native (enable_gqa)" if gqa else f"repeated to {h}"
                try:
                    with sdpa_kernel([backend]):
                        step()
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        for _ in range(3):
                            step()
                        end.record()
                        torch.cuda.synchronize()
                    ms = start.elapsed_time(end) / 3
                    extra = (torch.cuda.max_memory_allocated() - base) / 2**30
                    print(f"| {s} | {name} | {label} | {flops / ms / 1e9:.0f} | {extra:.2f} |")
                except RuntimeError as e:
                    print(f"| {s} | {name} | {label} | refused: {str(e).splitlines()[0][:90]} | |")
                q.grad = k.grad = v.grad = None


if __name__ == "__main__":
    main()
