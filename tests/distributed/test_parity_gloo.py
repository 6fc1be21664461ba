"""Tier 2: autosp on 2, 4 and 8 CPU processes (gloo) against the one-process run of the same batch."""

from __future__ import annotations

import os

import pytest

from tests.distributed.harness import run_group
from tests.distributed.parity import TOL, Case, check, run_cases

CASES = {
    2: [
        Case("llama", batch=1, seq=17),
        Case("llama", batch=2, seq=16, labels="spans"),
        Case("llama", batch=2, seq=19, labels="rank_masked"),
        Case("llama_mha", batch=1, seq=16, outputs="dtensor"),
        Case("qwen2", batch=2, seq=17, labels="spans"),
        Case("qwen3", batch=1, seq=18),
        Case("mistral", batch=1, seq=21),
        Case("gpt2", batch=2, seq=17, labels="spans"),
        Case("plain", batch=1, seq=16, outputs="dtensor"),
        Case("plain", batch=2, seq=15, labels="spans"),
        # rotary angles by the matmul inv_freq @ positions (transformers <= 5.17): made whole, then cut
        Case("plain_rope", batch=2, seq=17, labels="spans"),
        # grouped KV repeated by the model's own repeat_interleave: sent at 2 KV heads, repeated after
        Case("plain_gqa", batch=2, seq=17, labels="spans"),
        # Falcon's fused q/k/v: K and V picked by a list index and broadcast to the query heads
        Case("falcon", batch=2, seq=17, labels="spans"),
        # DeepSeek-V3's latent attention: K written into a new_empty buffer by copy_ into its slices
        # (gathered, correct), a dense first layer and a routed MoE layer (its group-limited router's
        # topk, gather and scatter_ on local tokens); Apertus' xIELU (min, expm1)
        Case("deepseek_v3", batch=2, seq=17, labels="spans"),
        # Qwen3-MoE at as many tokens as its hidden size (32): the tokens picked by index for the
        # experts ([64, 32] after the gather) carry no sequence dim, though one of their dims is S long
        Case("qwen3_moe", batch=1, seq=32),
        # the routing (sort, grouped experts, inverse permutation) on each rank's own tokens: padded
        # positions routed too, their rows never reaching a real one
        Case("qwen3_moe", batch=2, seq=17, labels="spans"),
        # x[:, 0] = 0 on a sharded value: run on a whole copy, this rank's shard written back
        Case("plain_write", batch=2, seq=17, labels="spans"),
        Case("apertus", batch=1, seq=17),
        # attention spelled out: one SDPA call each (eager_attention), the additive mask proven causal
        Case("llama_eager", batch=2, seq=17, labels="spans"),
        Case("gpt2_eager", batch=1, seq=17, labels="padded"),  # its float mask padded with -inf for P*L
        Case("qwen2_sw_eager", batch=2, seq=16, labels="packed"),  # the additive mask proven: document attention
        # Gemma 2's logit softcap, packed documents: both layers (causal, windowed) in the document
        # attention kernel, the scores bounded there; at 17 tokens padded to 18, the masks kept:
        # softcap_attention on the local heads
        Case("gemma2", batch=2, seq=18, labels="packed"),
        Case("gemma2", batch=1, seq=17),
        Case("llama", batch=1, seq=17, labels="none", mode="eval", outputs="local"),
        Case("llama", batch=2, seq=16, mode="no_grad"),
        Case("plain", batch=1, seq=17, seqs=(23, 30)),  # recompiled for each length
        Case("llama", batch=2, seq=17, labels="padded"),  # 2-D padding mask -> HF's 4-D mask, padded to P*L
        Case("qwen2", batch=2, seq=16, labels="padded"),
        # packed documents (position_ids): document attention on the document ids, no mask built;
        # at 17 tokens the sequence is padded to 18 and the mask is kept (exact either way)
        Case("llama", batch=2, seq=16, labels="packed"),
        Case("llama", batch=1, seq=17, labels="packed"),
        Case("qwen2", batch=2, seq=18, labels="packed", options=(("recompute", "selective"), ("offload", True))),
        # sliding windows: document attention with the window (alone, or with packed documents);
        # at 17 tokens the padded sequence keeps its mask
        Case("mistral_sw", batch=1, seq=16),
        Case("mistral_sw", batch=2, seq=17, labels="spans"),
        Case("qwen2_sw", batch=2, seq=16, labels="packed"),
        Case("gemma3", batch=2, seq=18, labels="spans", options=(("recompute", "attention_out"), ("offload", True))),
        Case("llama", batch=2, seq=17, labels="spans", options=(("loss_chunk", 5), ("logits", "drop"))),
        Case("llama", batch=1, seq=16, options=(("logits", "detach"),)),
        Case("qwen3", batch=2, seq=17, labels="spans", options=(("recompute", "full"),)),
        Case("qwen2", batch=1, seq=17, options=(("fused_loss", False),)),
        Case("llama", batch=2, seq=19, labels="spans",
             options=(("recompute", "selective"), ("logits", "drop"), ("tile_mlp", 3))),
        Case("llama", batch=2, seq=17, labels="spans", options=(("recompute", "full"), ("offload", True))),
        Case("llama", batch=2, seq=17, labels="spans", options=(("attention_chunks", 3),)),
        Case("qwen2", batch=1, seq=19, options=(("recompute", "full"), ("offload", True), ("attention_chunks", 2))),
        Case("llama", batch=2, seq=19, labels="spans",
             options=(("recompute", "blocks"), ("offload", True), ("tile_mlp", 2), ("overlap_grad_reduce", True))),
        # a tied table (lm_head reads it too) with a padding row: lm_head's gradient all-reduced, the
        # embedding's made on every rank from the gathered token gradients
        Case("gemma3", batch=2, seq=17, labels="spans", options=(("overlap_grad_reduce", True),)),
        # one attention call per group of the local heads (2 of 4 heads each, KV unrepeated)
        Case("llama_mha", batch=2, seq=17, labels="spans",
             options=(("attention_head_groups", 2), ("recompute", "selective"), ("offload", True))),
        # attention's output kept (to host), its inputs and the all-to-alls recomputed
        Case("llama", batch=2, seq=19, labels="spans",
             options=(("recompute", "attention_out"), ("offload", True), ("tile_mlp", 2))),
        # a host budget below the layers' saved tensors (the pass's choice of layers: tests/passes/test_offload.py)
        Case("llama_l4", batch=2, seq=17, labels="spans",
             options=(("recompute", "attention_out"), ("offload", True), ("host_memory_gb", 1.5e-5))),
        # chunked attention streams its saved chunks through host memory (selective keeps attention)
        Case("llama", batch=1, seq=19, labels="spans",
             options=(("recompute", "selective"), ("offload", True), ("attention_chunks", 3))),
        # the planner under a budget nothing meets: its least-memory plan, offload turned on by it
        Case("llama", batch=2, seq=19, labels="spans", options=(("recompute", "auto"), ("memory_budget_gb", 1e-6))),
        # Inductor: the planner under a budget with MLP tiles; q/k/v the peer's head chunks first
        # (biases narrowed too), the exchange's input held by Inductor until its wait (a buffer
        # reused under it broke this case once). One case: each Inductor compile costs CI ~30 s
        Case("qwen2", batch=2, seq=17, labels="spans", compiler="inductor",
             options=(("split_projections", True), ("recompute", "auto"), ("memory_budget_gb", 1e-6), ("tile_mlp", 2))),
    ],
    4: [  # what 4 ranks change: head and KV splits (KV heads fewer than ranks, also chunked),
        #   padding, routing on few tokens, 3 peers' chunks, the mean over 4 as the backward leaves it.
        #   Options alone are the 2-rank group's: at 4 ranks each case costs CI about 9 s
        Case("llama", batch=1, seq=18),
        Case("llama_kv1", batch=2, seq=16, labels="spans"),
        Case("qwen2", batch=1, seq=13, labels="rank_masked"),
        Case("plain", batch=1, seq=21),
        # MoE routing on 5 local tokens of 17 (padded to 20): Mixtral's router renormalizes in place
        Case("mixtral", batch=2, seq=17, labels="spans"),
        Case("llama_kv1", batch=1, seq=18, labels="spans", options=(("recompute", "selective"), ("attention_chunks", 4))),
        Case("gemma3", batch=1, seq=18, options=(("overlap_grad_reduce", True), ("recompute", "attention_out"))),
        Case("llama_mha", batch=2, seq=17, labels="spans", options=(("split_projections", True),)),  # 3 peers' chunks
    ],
    8: [  # 8 processes: KV x2, 19 tokens padded to 24 (8 KV heads sent as they are: the NCCL file's
        #   8-GPU cases). Not in CI (AUTOSP_TEST_8_RANKS=1 runs it): 8 processes on CI's 2 cores
        #   took 54 s, and DESIGN's tier 2 is 2 and 4 processes
        Case("llama_h8kv4", batch=1, seq=19, labels="spans", options=(("recompute", "selective"),)),
    ],
}
WORLDS = (2, 4, 8) if os.environ.get("AUTOSP_TEST_8_RANKS") == "1" else (2, 4)


@pytest.fixture(scope="module")
def results():
    cache = {}

    def get(world):
        if world not in cache:
            per_rank = run_group(world, run_cases, CASES[world], timeout=900)
            cache[world] = {r["case"]: [per_rank[k][i] for k in range(world)] for i, r in enumerate(per_rank[0])}
        return cache[world]

    return get


@pytest.mark.parametrize("world,case", [(w, c) for w in WORLDS for c in CASES[w]], ids=lambda x: getattr(x, "id", str(x)))
def test_parity(results, world, case):
    for r in results(world)[case.id]:
        check(r, TOL)
