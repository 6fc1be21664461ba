"""Tier 3: the parity cases on 2 (and, where there are four GPUs, 4) GPUs with NCCL in bf16."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_group
from tests.distributed.parity import TOL_BF16, Case, check, run_cases

BF16 = dict(dtype="bfloat16")
CASES = {
    2: [
        Case("llama", batch=1, seq=256, compiler="inductor", **BF16),
        Case("llama", batch=2, seq=255, labels="spans", compiler="aot_eager", **BF16),
        Case("llama_kv1", batch=1, seq=129, labels="rank_masked", compiler="aot_eager", **BF16),
        Case("qwen2", batch=1, seq=200, outputs="dtensor", compiler="inductor", **BF16),
        Case("qwen3", batch=1, seq=128, compiler="aot_eager", **BF16),
        Case("mistral", batch=1, seq=130, compiler="aot_eager", **BF16),
        Case("gpt2", batch=2, seq=127, labels="spans", compiler="inductor", **BF16),
        # attention spelled out (eager_attention): one SDPA call, on cuDNN/flash in bf16
        Case("llama_eager", batch=2, seq=255, labels="spans", compiler="inductor", **BF16),
        # the MoE routing on each rank's own tokens (torch._grouped_mm in bf16 on the GPU)
        Case("qwen3_moe", batch=2, seq=255, labels="spans", compiler="inductor", **BF16),
        Case("plain", batch=1, seq=131, compiler="inductor", seqs=(200,), **BF16),
        Case("llama", batch=1, seq=256, compiler="aot_eager", mode="eval", labels="none", **BF16),
        Case("llama", batch=1, seq=64, compiler="inductor", dtype="float32"),
        Case("llama", batch=2, seq=255, labels="spans", compiler="inductor",
             options=(("recompute", "selective"), ("logits", "drop"), ("loss_chunk", 100), ("tile_mlp", 4)), **BF16),
        Case("llama", batch=1, seq=256, compiler="inductor", options=(("fused_loss", False),), **BF16),
        Case("llama", batch=2, seq=255, labels="spans", compiler="inductor",
             options=(("recompute", "full"), ("offload", True), ("tile_mlp", 2)), **BF16),
        Case("qwen2", batch=1, seq=256, compiler="inductor", options=(("recompute", "selective"), ("offload", True)),
             **BF16),
        Case("llama", batch=2, seq=255, labels="spans", compiler="inductor", options=(("attention_chunks", 3),), **BF16),
        Case("qwen2", batch=1, seq=256, compiler="inductor",
             options=(("recompute", "full"), ("offload", True), ("attention_chunks", 4)), **BF16),
        Case("llama", batch=1, seq=256, labels="spans", compiler="inductor",
             options=(("recompute", "selective"), ("offload", True), ("attention_chunks", 4)), **BF16),
        Case("llama", batch=2, seq=255, labels="spans", compiler="inductor",
             options=(("recompute", "blocks"), ("offload", True), ("tile_mlp", 2), ("overlap_grad_reduce", True),
                      ("buffer_reuse", False)), **BF16),
        Case("llama_mha", batch=2, seq=255, labels="spans", compiler="inductor",
             options=(("recompute", "blocks"), ("offload", True), ("attention_head_groups", 2)), **BF16),
        # q/k/v made the peers' head chunks first, sent while the own chunk is made (a bias, a norm per head)
        Case("qwen2", batch=2, seq=255, labels="spans", compiler="inductor",
             options=(("split_projections", True), ("overlap_grad_reduce", True)), **BF16),
        Case("qwen3", batch=1, seq=256, compiler="inductor", options=(("split_projections", True),), **BF16),
        # every all-to-all carried by the copy engines: plain, with the head split, with offload's side stream
        Case("llama", batch=2, seq=256, labels="spans", compiler="inductor",
             options=(("exchange", "peer_copy"), ("overlap_grad_reduce", True)), **BF16),
        Case("qwen2", batch=1, seq=255, compiler="inductor",
             options=(("exchange", "peer_copy"), ("split_projections", True)), **BF16),
        Case("llama", batch=1, seq=256, compiler="inductor",
             options=(("exchange", "peer_copy"), ("recompute", "selective"), ("offload", True)), **BF16),
        # a tied table with a padding row: the embedding's gradient from the gathered token gradients
        # (fewer tokens than the table's 96 rows), lm_head's averaged; and the table all-reduced (more tokens)
        Case("gemma3", batch=1, seq=89, labels="spans", compiler="inductor", options=(("overlap_grad_reduce", True),),
             **BF16),
        Case("gemma3", batch=2, seq=255, labels="spans", compiler="inductor", options=(("overlap_grad_reduce", True),),
             **BF16),
        Case("llama_mha", batch=2, seq=255, labels="spans", compiler="inductor",
             options=(("recompute", "attention_out"), ("offload", True), ("attention_head_groups", 2),
                      ("tile_mlp", 2)), **BF16),
        # sliding windows (Gemma 3's local layer, a window of 40): the kernels with the window
        Case("gemma3_d16", batch=2, seq=256, labels="spans", compiler="inductor", **BF16),
        Case("gemma3_d16", batch=2, seq=256, labels="packed", compiler="inductor",
             options=(("recompute", "attention_out"), ("offload", True)), **BF16),
        # packed documents: the document attention kernels (head dim 16) between the all-to-alls
        Case("llama_d16", batch=2, seq=256, labels="packed", compiler="inductor", **BF16),
        Case("llama_d16", batch=2, seq=256, labels="packed", compiler="inductor",
             options=(("recompute", "attention_out"), ("offload", True), ("tile_mlp", 2)), **BF16),
        # the planner on the device's own memory (keeps what fits), and under a budget nothing meets
        Case("llama", batch=2, seq=255, labels="spans", compiler="inductor", options=(("recompute", "auto"),), **BF16),
        Case("llama", batch=2, seq=255, labels="spans", compiler="inductor",
             options=(("recompute", "auto"), ("memory_budget_gb", 1e-6)), **BF16),
    ],
    4: [
        Case("llama", batch=1, seq=258, compiler="inductor", **BF16),  # 2 KV heads < 4 ranks: replicated
        Case("llama_mha", batch=2, seq=255, labels="spans", compiler="aot_eager", **BF16),
        Case("qwen2", batch=1, seq=131, labels="rank_masked", compiler="aot_eager", **BF16),
        Case("plain", batch=1, seq=130, compiler="inductor", **BF16),  # 7 heads over 4 ranks: padded
        Case("llama", batch=1, seq=258, compiler="inductor", options=(("recompute", "selective"),), **BF16),
        Case("llama", batch=1, seq=258, compiler="inductor", options=(("overlap_grad_reduce", True),), **BF16),
    ],
    8: [
        Case("llama_h8kv8", batch=1, seq=515, compiler="inductor", **BF16),
        Case("llama_h8kv4", batch=2, seq=256, labels="spans", compiler="aot_eager", **BF16),
        Case("llama", batch=1, seq=261, labels="rank_masked", compiler="aot_eager", **BF16),  # 4 heads, 2 KV < 8
    ],
}
FP32_GPU = {"loss": 1e-4, "logits": 1e-3, "grad": 1e-3}  # fp32 on GPU: cuBLAS/SDPA kernels differ by shape


@pytest.fixture(scope="module")
def results(request):
    cache = {}
    # the cases of this session's selected tests alone (pytest -k peer_copy: three cases, not all)
    selected = {item.callspec.params["case"] for item in request.session.items
                if item.originalname == "test_parity_nccl"}

    def get(world):
        if torch.cuda.device_count() < world:
            pytest.skip(f"needs {world} GPUs")
        if world not in cache:
            cases = [c for c in CASES[world] if c in selected]
            with pytest.MonkeyPatch.context() as env:  # the spawned ranks inherit it
                if any(dict(c.options).get("exchange") == "peer_copy" for c in cases):
                    env.setenv("CUDA_MODULE_LOADING", "EAGER")  # as the peer exchange asks
                per_rank = run_group(world, run_cases, cases, timeout=1200, backend="nccl")
            cache[world] = {r["case"]: [per_rank[k][i] for k in range(world)] for i, r in enumerate(per_rank[0])}
        return cache[world]

    return get


@pytest.mark.multigpu
@pytest.mark.parametrize("world,case", [(w, c) for w, cs in CASES.items() for c in cs], ids=lambda x: getattr(x, "id", str(x)))
def test_parity_nccl(results, world, case):
    tol = TOL_BF16 if case.dtype == "bfloat16" else FP32_GPU
    for r in results(world)[case.id]:
        print(world, r)
        check(r, tol)


@pytest.mark.multigpu
def test_every_window_split_on_nccl():
    """``defer_weight_grads``' head split on NCCL, Inductor on the GPU, float32: with the pass's
    rates patched every window's first matmul is split (the parity cases' shapes are too small
    to trigger it; the benchmark's are), and every rank's loss and gradients are one device's,
    with ``overlap_grad_reduce`` (the average all-reduce), bit-equal across ranks."""
    from tests.distributed.test_grad_reduce_gloo import _grads, check_gradients

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    names = ["inductor, split windows"]
    check_gradients(run_group(2, _grads, names, "cuda", timeout=900, backend="nccl"), names)
