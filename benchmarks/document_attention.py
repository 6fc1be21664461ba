"""Document attention (packed sequences) against SDPA's causal attention, one GPU.

    python benchmarks/document_attention.py [--seq 16384] [--heads 16] [--dims 64,128] [--docs 1,16]

For each head dim and each document count (equal documents filling the row) it times
``autosp.kernels.document_attention`` forward and forward + backward (bf16, B = 1), and SDPA
with ``is_causal=True`` (torch's default kernel: cuDNN on Hopper) on the same q, k, v as the
one-document bound, and prints ms and TFLOP/s (causal FLOPs of the documents: 4 S_doc^2 H D / 2
a document forward, 2.5x that backward). ``--dry-run``: a tiny CPU form (the reference path),
timed once, for the tests.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def _time_ms(fn, cuda: bool) -> float:
    if not cuda:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return do_bench(fn)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dims", default="64,128")
    p.add_argument("--docs", default="1,16")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    cuda = not args.dry_run
    if cuda and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --dry-run)")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    seq, heads = (64, 2) if args.dry_run else (args.seq, args.heads)
    dims = [16] if args.dry_run else [int(d) for d in args.dims.split(",")]
    print("| D | documents | kernel | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s |\n| --- | --- | --- | --- | --- | --- |")
    for dim in dims:
        g = torch.Generator(device=device).manual_seed(dim)
        q, k, v, do = (torch.randn(1, heads, seq, dim, generator=g, device=device, dtype=dtype) for _ in range(4))
        for docs in [int(n) for n in args.docs.split(",")]:
            if seq % docs:
                raise SystemExit(f"--docs {docs} does not divide --seq {seq}")
            _rows(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do, docs, cuda)


def _rows(q, k, v, do, docs: int, cuda: bool) -> None:
    """One table row for document attention over ``docs`` equal documents (and SDPA causal at 1)."""
    from autosp.kernels.document_attention import document_attention

    _, heads, seq, dim = q.shape
    doc = torch.arange(docs, device=q.device).repeat_interleave(seq // docs)[None]
    flops = 3.5 * docs * 4 * (seq // docs) ** 2 * heads * dim / 2
    kernels = {"document_attention": lambda: document_attention(q, k, v, doc)}
    if docs == 1:
        kernels["SDPA causal"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for name, fn in kernels.items():
        fwd = _time_ms(fn, cuda)
        both = _time_ms(lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), do), cuda)
        print(f"| {dim} | {docs} | {name} | {fwd:.3f} | {both:.3f} | {flops / both / 1e9:.0f} |")

if __name__ == "__main__":
    main()
