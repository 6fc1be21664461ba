"""Document attention (packed sequences, sliding windows) against SDPA, one GPU.

    python benchmarks/document_attention.py [--seq 16384] [--heads 16] [--dims 64,128] [--docs 1,16]
                                            [--windows none,4096] [--softcap 50]

For each head dim, document count (equal documents filling the row) and window it times
``autosp.kernels.document_attention`` forward and forward + backward (bf16, B = 1); beside it
SDPA (torch's default kernel: cuDNN on Hopper) with ``is_causal=True`` for one document and no
window (the bound), else with the dense boolean mask the model would build (what autosp
replaces). With ``--softcap C`` (Gemma 2's logit softcap) both bound their scores by C: the
kernel in its tiles, and beside it ``softcap_attention``, the torch-ops form that builds the
scores (what a softcap call with a mask autosp cannot prove still runs). It prints ms and TFLOP/s, counting the visible (query, key) pairs as
``sp_throughput.attended_pairs`` does: 4 D H pairs a forward, 3.5x that forward + backward. ``--dry-run``: a tiny CPU form (the reference path),
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
    p.add_argument("--windows", default="none", help="comma-separated sliding windows; 'none': no window")
    p.add_argument("--softcap", type=float, default=None, help="bound the scores by C * tanh(s / C)")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    cuda = not args.dry_run
    if cuda and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --dry-run)")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    seq, heads = (64, 2) if args.dry_run else (args.seq, args.heads)
    dims = [16] if args.dry_run else [int(d) for d in args.dims.split(",")]
    print("| D | documents | window | kernel | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for dim in dims:
        g = torch.Generator(device=device).manual_seed(dim)
        q, k, v, do = (torch.randn(1, heads, seq, dim, generator=g, device=device, dtype=dtype) for _ in range(4))
        windows = [None if w == "none" else int(w) for w in args.windows.split(",")]
        for docs in [int(n) for n in args.docs.split(",")]:
            if seq % docs:
                raise SystemExit(f"--docs {docs} does not divide --seq {seq}")
            for window in windows:
                _rows(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do, docs, window, args.softcap,
                      cuda)


def _rows(q, k, v, do, docs: int, window: int | None, softcap: float | None, cuda: bool) -> None:
    """Table rows for document attention over ``docs`` equal documents under ``window`` (scores
    bounded by ``softcap``), and SDPA (softcap_attention with a softcap)."""
    from sp_throughput import attended_pairs  # this script's folder: benchmarks/

    from autosp.kernels.document_attention import document_attention, document_mask
    from autosp.kernels.softcap_attention import softcap_attention

    _, heads, seq, dim = q.shape
    doc = torch.arange(docs, device=q.device).repeat_interleave(seq // docs)[None]
    flops = 3.5 * docs * 4 * attended_pairs(seq // docs, window) * heads * dim
    kernels = {"document_attention": lambda: document_attention(q, k, v, doc, window=window, softcap=softcap)}
    if softcap is not None:
        causal = docs == 1 and window is None
        mask = None if causal else document_mask(doc, window)[:, None]
        kernels["softcap_attention" + (" causal" if causal else " dense mask")] = (
            lambda: softcap_attention(q, k, v, attn_mask=mask, is_causal=causal, softcap=softcap))
    elif docs == 1 and window is None:
        kernels["SDPA causal"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        mask = document_mask(doc, window)[:, None]
        kernels["SDPA dense mask"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    for name, fn in kernels.items():
        fwd = _time_ms(fn, cuda)
        both = _time_ms(lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), do), cuda)
        print(f"| {dim} | {docs} | {window or '-'} | {name} | {fwd:.3f} | {both:.3f} | {flops / both / 1e9:.0f} |")


if __name__ == "__main__":
    main()
