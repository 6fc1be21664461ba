"""The whole autosp pipeline for one compiled region, in order.

    eager_attention  rewrite: attention spelled out (matmul, softmax, matmul) becomes one SDPA call
                     (with a logit softcap, Gemma 2's: one softcap_attention call, SDPA's signature)
    causal_mask      rewrite: an attention mask proven to be the causal mask becomes is_causal=True
    find_attention   analysis: self-attention sites, the global sequence length S
    infer_sequence   analysis: which dim of which graph input is the sequence
    global_loss      rewrite: a mean cross-entropy becomes sum / count of valid targets
    shard_sequence   rewrite: layouts for every value, cuts, all-to-all around attention,
                     fallbacks (gathers) for ops without a rule
    split_projections  rewrite: q/k/v made one head chunk at a time, the peers' chunks first, sent
                     while this rank's own is made (Config.split_projections)
    document_mask    rewrite: attention masked to causal within documents (packed sequences)
                     and/or a sliding window runs on the document ids and the window; the
                     [B, S, S] mask is never built; causal/windowed softcap_attention too
                     (the softcap bounded in the kernel)
    output_layout    rewrite: outputs in the layout of ``Config.outputs``
    fused_loss       rewrite: cross_entropy(linear(h, W)) -> one chunked op (no logits for the loss)
    grouped_kv       rewrite: grouped-query attention reads K and V unrepeated (enable_gqa) where
                     the device's SDPA kernel takes it, and always in document attention
    head_groups      rewrite: self-attention as one call per group of heads (Config.attention_head_groups)
    chunk_attention  rewrite: self-attention over sequence chunks, merged by log-sum-exp (FPDT)
    tile_mlp         rewrite: each layer's MLP over sequence tiles (Config.tile_mlp)
    activation_policy  marks: what each repeated layer keeps for the backward and what it recomputes
    grad_reduce      rewrite: parameter gradients averaged over the group in the backward, each
                     as soon as it is complete, on their own communicator (Config.overlap_grad_reduce)

Then the backend hands the graph to the inner compiler (AOTAutograd derives the backward of
the inserted collectives; Inductor generates the kernels). With ``Config.offload``, two more
passes run on the graphs AOTAutograd's partitioner made (autosp/passes/offload.py):

    offload_saved    forward: the layers' saved activations -> pinned host copies
    reload_saved     backward: each reloaded before first use, its copy started ahead

with ``Config.recompute`` one on the backward graph, before ``reload_saved``
(autosp/passes/rematerialize.py):

    rematerialize    backward: cheap values (a layer's input norm) computed again after the
                     attention backward (or long compute), not held through it; across an
                     MLP backward also through matmuls and all-to-alls (o_proj's input and
                     output; with "full", q, k and v)

and, after ``reload_saved``, one more (autosp/passes/sum_products.py):

    sum_products     backward: a sum of matmul products (the q, k, v projections' input
                     gradients) becomes an addmm chain, one product alive at a time

and with ``Config.overlap_grad_reduce`` one on the backward graph (autosp/passes/grad_reduce.py):

    sink_grad_waits  backward: each gradient all-reduce issued where its gradient is made, the
                     waits moved to the graph's end (compiled in that order)

and on every backward with more than one rank (autosp/passes/defer_weight_grads.py):

    defer_weight_grads  backward: weight-gradient matmuls moved between each all-to-all and its
                     wait (they run while the data crosses; autograd waits at once), a long
                     first one split to start with a short head (NCCL's kernel starts when the
                     kernel beside it lets SMs go)

and, last, with ``Config.exchange="peer_copy"`` on both graphs (autosp/passes/peer_exchange.py):

    peer_exchange    forward and backward: each all-to-all of the group and its wait -> the
                     start and finish of an exchange the copy engines carry (no SMs), the
                     work placed between them kept there

Inductor compiles those backward graphs without fusing kernels across an attention backward
(``_torch_private.attention_fusion_barriers``). Any pass can be switched off by name with ``Config.disable_passes``. autosp/passes/README.md says what every pass keeps true.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from autosp.config import Config
from autosp.graph_utils import normalize_vals
from autosp.passes.activation_policy import activation_policy_pass
from autosp.passes.causal_mask import causal_mask_pass
from autosp.passes.chunk_attention import chunk_attention_pass
from autosp.passes.document_mask import document_mask_pass
from autosp.passes.eager_attention import eager_attention_pass
from autosp.passes.find_attention import find_attention_pass
from autosp.passes.fused_loss import fused_loss_pass
from autosp.passes.global_loss import global_loss_pass
from autosp.passes.grad_reduce import grad_reduce_pass
from autosp.passes.grouped_kv import grouped_kv_pass
from autosp.passes.head_groups import head_groups_pass
from autosp.passes.infer_sequence import infer_sequence_pass
from autosp.passes.output_layout import output_layout_pass
from autosp.passes.shard_sequence import shard_sequence_pass
from autosp.passes.split_projections import split_projections_pass
from autosp.passes.tile_mlp import tile_mlp_pass
from autosp.plan import Plan

PASSES = (
    ("eager_attention", eager_attention_pass),
    ("causal_mask", causal_mask_pass),
    ("find_attention", find_attention_pass),
    ("infer_sequence", infer_sequence_pass),
    ("global_loss", global_loss_pass),
    ("shard_sequence", shard_sequence_pass),
    ("split_projections", split_projections_pass),
    ("document_mask", document_mask_pass),
    ("output_layout", output_layout_pass),
    ("fused_loss", fused_loss_pass),
    ("grouped_kv", grouped_kv_pass),
    ("head_groups", head_groups_pass),
    ("chunk_attention", chunk_attention_pass),
    ("tile_mlp", tile_mlp_pass),
    ("activation_policy", activation_policy_pass),
    ("grad_reduce", grad_reduce_pass),
)
PASS_NAMES = tuple(name for name, _ in PASSES)
# Passes on the partitioned graphs (autosp/backend.py) that Config.disable_passes may name.
POST_PARTITION_PASSES = ("rematerialize", "sum_products", "defer_weight_grads", "peer_exchange")


@dataclass(frozen=True)
class PassConfig:
    """What every pass is given: the user's options and the resolved sequence-parallel group."""

    options: Config
    group_name: str | None
    world: int
    rank: int
    grad_group_name: str | None = None  # the gradient all-reduces' own communicator (Config.overlap_grad_reduce)


def run_passes(gm: fx.GraphModule, example_inputs: list[Any], cfg: PassConfig, plan: Plan) -> fx.GraphModule:
    """Run the enabled passes in order, recording each one's graph before and after in the plan."""
    gm.meta["autosp.plan"] = plan
    normalize_vals(gm)
    for name, fn in PASSES:
        if name in cfg.options.disable_passes:
            plan.note(f"pass {name} is disabled")
            continue
        before = gm.code
        gm = fn(gm, example_inputs, cfg=cfg)
        plan.passes.append((name, before, gm.code))
    return gm
