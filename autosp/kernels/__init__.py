"""autosp's kernels, one file a kernel family, each with a plain-torch reference in
``reference.py`` that tests and benchmarks share.

    linear_cross_entropy.py  the fused lm_head + cross-entropy op (``torch.ops.autosp.linear_cross_entropy``):
                             chunked, gradients computed in the forward; a Triton kernel turns
                             each chunk's logits into their gradient in place (reference on CPU)
    attention_merge.py       log-sum-exp merge of two partial attentions (Triton, reference fallback):
                             the combining step of chunked attention
    chunked_attention.py     ``autosp::chunked_attention``: exact attention over (query chunk, key
                             chunk) pairs, skipping those above the diagonal, merged by log-sum-exp;
                             its backward recomputes each pair; saved chunks optionally on the host
    host_offload.py          ``autosp::offload`` / ``autosp::reload``: saved activations to pinned host
                             memory and back on a side stream, with a layer-ahead prefetch
    pinned_pool.py           the pinned host blocks those copies use: the size asked for (to the
                             page, not torch's power of two), pinned once, reused every step
    document_attention.py    ``autosp::document_attention``: causal attention inside the documents of
                             packed rows (from their ids) and/or a sliding window; Triton forward and
                             backward kernels that visit only the key blocks a query block sees
                             (reference on CPU); the kernels in document_attention_triton.py

    peer_exchange.py         ``autosp::peer_exchange_start`` / ``_finish``: an all-to-all the copy engines
                             carry between the GPUs of one host (symmetric-memory receive buffers,
                             flags written and waited for by the streams; no kernel)
    softcap_attention.py     SDPA's function with the scores bounded (Gemma 2's logit softcap), in torch
                             ops: the scores built; AOTAutograd derives its backward
    embedding_grad.py        ``autosp::embedding_grad``: torch's embedding backward, opaque to Inductor
                             (whose atomic adds differ run to run): the same bits on every rank

Everything else lowers through Inductor and torch's own kernels (cuDNN attention on Hopper).
"""
