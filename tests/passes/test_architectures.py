"""Hugging Face decoders beyond the parity set, traced as rank 0 of SP=2 (fake group): every
attention found and rewritten, and no fallback (each would gather the whole sequence: correct,
slow). The parity of the ops these models use is in tests/distributed/test_parity_gloo.py."""

from __future__ import annotations

import pytest
import torch

from tests.harness_fake import capture, fake_group

V = 96
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)


def _build(name: str):
    import transformers as tf

    torch.manual_seed(0)
    if name == "phi3":  # fused q/k/v sliced by width, fused gate/up
        return tf.Phi3ForCausalLM(tf.Phi3Config(**COMMON, pad_token_id=0))
    if name == "olmo2":  # q/k norms over all heads
        return tf.Olmo2ForCausalLM(tf.Olmo2Config(**COMMON))
    if name == "gpt_neox":  # partial rotary, parallel residual
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                                      num_hidden_layers=2, num_attention_heads=4,
                                                      max_position_embeddings=512))
    if name == "cohere":  # interleaved rotary, parallel block, logit scale
        return tf.CohereForCausalLM(tf.CohereConfig(**COMMON))
    from tests.distributed.models import build

    return build(name)  # falcon (list index, broadcast_to), apertus (min, expm1), plain_gqa (repeat_interleave)


@pytest.mark.parametrize("name", ["phi3", "olmo2", "gpt_neox", "cohere", "falcon", "apertus", "plain_gqa"])
def test_attention_rewritten_with_no_fallback(name):
    model = _build(name)
    if hasattr(model, "config"):
        model.config._attn_implementation = "sdpa"
    ids = torch.randint(0, V, (2, 17), generator=torch.Generator().manual_seed(0))
    with fake_group(2):
        if name == "plain_gqa":  # its own loss slices the logits (a fallback of the loss, not of a layer)
            regions = capture(model, ids)
        else:
            regions = capture(model, input_ids=ids, labels=ids, use_cache=False)
    sites = [s for _, plan, _ in regions for s in plan.sites]
    assert len(sites) == 2 and all(s.rewritten for s in sites), sites
    assert [f for _, plan, _ in regions for f in plan.fallbacks] == []
