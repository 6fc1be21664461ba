"""autosp's kernels, one file a kernel family, each with a plain-torch reference in
``reference.py`` that tests and benchmarks share.

    linear_cross_entropy.py  the fused lm_head + cross-entropy op (``torch.ops.autosp.linear_cross_entropy``):
                             chunked, gradients computed in the forward; runs the reference math
                             today (no Triton kernel yet)
    attention_merge.py       log-sum-exp merge of two partial attentions (Triton, reference fallback):
                             the combining step of chunked attention; no pass calls it yet
    host_offload.py          ``autosp::offload`` / ``autosp::reload``: saved activations to pinned host
                             memory and back on a side stream, with a layer-ahead prefetch

Everything else lowers through Inductor and torch's own kernels (cuDNN attention on Hopper).
"""
