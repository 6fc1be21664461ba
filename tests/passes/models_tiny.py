"""Small modules for graph tests."""

import torch
import torch.nn as nn
import torch.nn.functional as F


def tiny_llama(kv_heads=2, heads=4, hidden=32, layers=1, intermediate=64):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, attn_implementation="sdpa")
    return tf.LlamaForCausalLM(cfg)


class Attn(nn.Module):
    """Self-attention (or cross-attention when ``memory`` is given) with ``heads`` heads of 4."""

    def __init__(self, heads=4, cumsum=False):
        super().__init__()
        self.heads, self.cumsum = heads, cumsum
        self.emb = nn.Embedding(64, 4 * heads)
        self.qkv = nn.Linear(4 * heads, 12 * heads)

    def forward(self, ids, memory=None):
        x = self.emb(ids)
        if self.cumsum:
            x = torch.cumsum(x, dim=1)  # mixes positions along the sequence: no rule, gathered
        B, S, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        if memory is not None:
            k = v = self.emb(memory)
        q = q.view(B, S, self.heads, 4).transpose(1, 2)
        k = k.reshape(B, k.shape[1], self.heads, 4).transpose(1, 2)
        v = v.reshape(B, v.shape[1], self.heads, 4).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=memory is None)
        return o.transpose(1, 2).reshape(B, S, D).sum()
