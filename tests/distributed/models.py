"""Tiny models for parity tests: Hugging Face decoders built from configs (random weights) and a
plain transformer written here. Odd shapes on purpose (7 heads in the plain model)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 96


def _hf(name: str, **over):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
                  max_position_embeddings=512)
    common.update(over)
    if name.endswith("_eager") and not name.startswith("gpt2"):  # attention spelled out: pass eager_attention
        return _hf(name.removesuffix("_eager"), **{**over, "attn_implementation": "eager"})
    if name == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    if name == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    if name == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=8, **common))
    if name == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(sliding_window=None, **common))
    if name == "mistral_sw":  # a sliding window shorter than the test sequences, every layer
        return tf.MistralForCausalLM(tf.MistralConfig(sliding_window=6, **common))
    if name == "qwen2_sw":  # layer 0 full (causal), layer 1 a sliding window
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(use_sliding_window=True, sliding_window=5, max_window_layers=1,
                                                  **common))
    if name == "gemma3":  # local (sliding) and global layers, q/k norms, its own attention scale
        gemma = dict(head_dim=8, sliding_window=6, query_pre_attn_scalar=8,
                     layer_types=["sliding_attention", "full_attention"])
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**{**gemma, **common}))
    if name == "gemma2":  # a logit softcap in eager attention (low, so that tanh bends), windowed and full layers,
        # the final logits softcapped too
        gemma = dict(head_dim=8, sliding_window=6, query_pre_attn_scalar=8, attn_logit_softcapping=0.5,
                     final_logit_softcapping=3.0, layer_types=["sliding_attention", "full_attention"],
                     attn_implementation="eager")
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**{**common, **gemma}))
    if name == "falcon":  # fused q/k/v picked by a list index ([-2]), KV broadcast to the query heads
        cfg = tf.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              num_kv_heads=2, new_decoder_architecture=True, attn_implementation="sdpa")
        return tf.FalconForCausalLM(cfg)
    if name == "deepseek_v3":  # multi-head latent attention: K built in a new_empty buffer by two copy_ into slices
        cfg = tf.DeepseekV3Config(**{**common, "num_key_value_heads": 4}, kv_lora_rank=16, q_lora_rank=24,
                                  qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                                  num_experts_per_tok=2, first_k_dense_replace=1, moe_intermediate_size=16,
                                  n_group=1, topk_group=1)
        return tf.DeepseekV3ForCausalLM(cfg)
    if name == "qwen3_moe":  # experts over tokens picked by index (transformers' grouped_mm), every layer routed
        return tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(head_dim=8, num_experts=4, num_experts_per_tok=2,
                                                        moe_intermediate_size=16, decoder_sparse_step=1, **common))
    if name == "mixtral":  # transformers' grouped experts, the router's top-k weights renormalized in place (/=)
        return tf.MixtralForCausalLM(tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common))
    if name == "qwen2_moe":  # routed experts beside a gated shared expert
        return tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                                        shared_expert_intermediate_size=16, decoder_sparse_step=1,
                                                        **common))
    if name == "olmoe":
        return tf.OlmoeForCausalLM(tf.OlmoeConfig(num_experts=4, num_experts_per_tok=2, **common))
    if name == "apertus":  # xIELU activation: torch.min(x, eps) and expm1, elementwise
        return tf.ApertusForCausalLM(tf.ApertusConfig(**common))
    if name in ("gpt2", "gpt2_eager"):
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=512,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            attn_implementation="eager" if name.endswith("eager") else "sdpa")
        return tf.GPT2LMHeadModel(cfg)
    raise KeyError(name)


class PlainBlock(nn.Module):
    """Pre-norm block; with ``kv_heads`` fewer than ``heads``, K and V are repeated to the query
    heads with the tensor method ``repeat_interleave`` (not HF's repeat_kv)."""

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.kv_dim = dim // heads * self.kv_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim + 2 * self.kv_dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x_BSD, cos_sin=None):
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(self.norm1(x_BSD)).split([D, self.kv_dim, self.kv_dim], dim=-1)
        q = q.view(B, S, self.heads, D // self.heads).transpose(1, 2)
        k, v = (t.view(B, S, self.kv_heads, D // self.heads).transpose(1, 2) for t in (k, v))
        if cos_sin is not None:
            q, k = (_rotate(t, *cos_sin) for t in (q, k))
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x_BSD = x_BSD + self.proj(o.transpose(1, 2).reshape(B, S, D))
        return x_BSD + self.mlp(self.norm2(x_BSD))


def _rotate(x_BNSH, cos_BSH, sin_BSH):
    x1, x2 = x_BNSH.chunk(2, dim=-1)
    return x_BNSH * cos_BSH.unsqueeze(1) + torch.cat((-x2, x1), dim=-1) * sin_BSH.unsqueeze(1)


class PlainLM(nn.Module):
    """A decoder written with plain torch: learned positions (or, with ``rope``, rotary ones made
    as transformers <= 5.17 makes them: ``inv_freq [B, H/2, 1] @ positions [B, 1, S]``), 7
    heads, mean cross-entropy."""

    def __init__(self, dim: int = 28, heads: int = 7, layers: int = 2, kv_heads: int | None = None,
                 rope: bool = False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos = None if rope else nn.Embedding(512, dim)
        if rope:
            half = dim // heads // 2
            self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(half, dtype=torch.float) / half),
                                 persistent=False)
        self.blocks = nn.ModuleList(PlainBlock(dim, heads, kv_heads) for _ in range(layers))
        self.head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, input_ids, labels=None):
        B, S = input_ids.shape
        positions = torch.arange(S, device=input_ids.device)
        x, cos_sin = self.embed(input_ids), None
        x = self.edit(x)
        if self.pos is not None:
            x = x + self.pos(positions)
        else:
            inv_freq = self.inv_freq[None, :, None].float().expand(B, -1, 1)
            freqs = (inv_freq @ positions[None, None, :].expand(B, 1, S).float()).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos_sin = (emb.cos(), emb.sin())
        for block in self.blocks:
            x = block(x, cos_sin)
        logits = self.head(x)
        if labels is None:
            return logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
        return loss, logits


    def edit(self, x):
        return x


class PlainWriteLM(PlainLM):
    """Writes into a sharded activation with an op that has no layout rule (the first position's
    embedding zeroed, ``x[:, 0] = 0``): the op runs on a whole copy, and this rank's shard of the
    copy is written back."""

    def edit(self, x):
        x[:, 0] = 0.0
        return x


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if name == "plain":
        return PlainLM()
    if name == "plain_write":
        return PlainWriteLM()
    if name == "plain_rope":  # rotary positions by a matmul of inv_freq and the positions (transformers <= 5.17)
        return PlainLM(dim=32, heads=4, rope=True)
    if name == "plain_gqa":  # 4 query heads, 2 KV heads repeated by the tensor method repeat_interleave
        return PlainLM(dim=32, heads=4, kv_heads=2)
    if name == "llama_kv1":
        return _hf("llama", num_key_value_heads=1)
    if name == "llama_mha":
        return _hf("llama", num_key_value_heads=4)
    if name == "llama_h8kv8":  # 8 KV heads at SP=8: sent as they are
        return _hf("llama", hidden_size=64, num_attention_heads=8, num_key_value_heads=8)
    if name == "gemma3_d16":  # head dim 16: the Triton document attention kernels, a window of 40
        return _hf("gemma3", head_dim=16, sliding_window=40)
    if name == "llama_d16":  # head dim 16: the smallest the Triton attention kernels take
        return _hf("llama", hidden_size=64, intermediate_size=96)
    if name == "llama_l4":  # four layers: room for some layers on the host and some not
        return _hf("llama", num_hidden_layers=4)
    if name == "llama_h8kv4":  # 4 KV heads at SP=8: replicated x2
        return _hf("llama", hidden_size=64, num_attention_heads=8, num_key_value_heads=4)
    return _hf(name)


def forward(model: nn.Module, ids, labels, **kw):
    """(loss, logits) of a model of this file, whatever its calling convention."""
    if isinstance(getattr(model, "_orig_mod", model), PlainLM):
        if labels is None:
            return None, model(ids)
        return model(ids, labels)
    out = model(input_ids=ids, labels=labels, use_cache=False, **kw)
    return out.loss, out.logits
