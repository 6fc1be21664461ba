"""infer_sequence: which dimension of which data input carries the sequence.

Legend: B batch, S sequence, D hidden, N heads.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from autosp.passes._context import SEQ_DIM
from tests.harness_fake import capture, fake_group
from tests.passes.models_tiny import tiny_llama

VOCAB, D, N = 64, 16, 4


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.qkv = nn.Linear(D, 3 * D)

    def forward(self, ids_BS, scale_3=None):
        x_BSD = self.emb(ids_BS)
        B, S, _ = x_BSD.shape
        q, k, v = (t.view(B, S, N, -1).transpose(1, 2) for t in self.qkv(x_BSD).split(D, dim=-1))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = o.transpose(1, 2).reshape(B, S, D)
        if scale_3 is not None:
            out = out * scale_3.sum()
        return out.sum()


def _placeholders(gm):
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _data_and_params(gm):
    data = [n for n in _placeholders(gm) if not n.meta["val"].requires_grad]
    params = [n for n in _placeholders(gm) if n.meta["val"].requires_grad]
    return data, params


def test_input_ids_carry_the_sequence_on_dim_1_and_parameters_do_not():
    ids = torch.randint(0, 128, (2, 17))
    [(gm, plan, _)] = capture(tiny_llama(), input_ids=ids, labels=ids, use_cache=False, world=2)
    data, params = _data_and_params(gm)
    [ids_node] = [n for n in data if n.meta["val"].dtype == torch.int64]
    assert list(ids_node.meta["autosp.global_val"].shape) == [2, 17]
    assert ids_node.meta[SEQ_DIM] == 1
    assert len(params) == 12  # embedding, 7 linear, 3 norms, lm_head
    assert all(SEQ_DIM not in p.meta for p in params)
    assert all(SEQ_DIM not in n.meta for n in data if n is not ids_node)  # e.g. the rotary inv_freq buffer
    assert plan.inputs == [f"{ids_node.name} [2, 17] torch.int64: sequence on dim 1"]


def test_parameters_whose_size_is_S_are_not_the_sequence():
    """A hidden size equal to S must not make a weight look like a data input."""
    ids = torch.randint(0, 128, (2, 32))
    [(gm, plan, _)] = capture(tiny_llama(), input_ids=ids, labels=ids, use_cache=False, world=2)
    _, params = _data_and_params(gm)
    assert any(32 in p.meta["val"].shape for p in params)
    assert all(SEQ_DIM not in p.meta for p in params)
    assert len(plan.inputs) == 1


def test_batch_equal_to_S_takes_the_dim_after_the_batch():
    [(gm, plan, _)] = capture(Block(), torch.randint(0, VOCAB, (17, 17)), world=2)
    [ids_node] = [n for n in _placeholders(gm) if SEQ_DIM in n.meta]
    assert ids_node.meta[SEQ_DIM] == 1


def test_inputs_without_the_sequence_are_not_marked():
    [(gm, plan, _)] = capture(Block(), torch.randint(0, VOCAB, (2, 17)), torch.randn(3), world=2)
    data, _ = _data_and_params(gm)
    marked = {n.meta["val"].dtype: n.meta.get(SEQ_DIM) for n in data}
    assert marked == {torch.int64: 1, torch.float32: None}
    assert len(plan.inputs) == 1


def test_one_rank_marks_nothing():
    [(gm, plan, _)] = capture(Block(), torch.randint(0, VOCAB, (2, 17)))
    assert all(SEQ_DIM not in n.meta for n in _placeholders(gm))
    assert plan.inputs == []


def test_a_dynamic_sequence_is_matched_by_its_symbol():
    ids = torch.randint(0, VOCAB, (2, 17))
    torch._dynamo.mark_dynamic(ids, 1)
    with fake_group(2):
        [(gm, plan, _)] = capture(Block(), ids, dynamic=None)
    [ids_node] = [n for n in _placeholders(gm) if SEQ_DIM in n.meta]
    assert ids_node.meta[SEQ_DIM] == 1
    seq = ids_node.meta["autosp.global_val"].shape[1]
    assert isinstance(seq, torch.SymInt)
    assert plan.seq_len == str(seq) and plan.seq_len != "17"


def test_frozen_parameters_are_not_the_sequence():
    model = tiny_llama()
    model.requires_grad_(False)  # inference, or the frozen base of an adapter
    ids = torch.randint(0, 128, (2, 32))  # S == hidden size
    [(gm, plan, _)] = capture(model, input_ids=ids, labels=ids, use_cache=False, world=2)
    params = [n for n in _placeholders(gm) if isinstance(n.meta["val"], torch.nn.Parameter)]
    assert len(params) == 12
    assert [p.name for p in params if SEQ_DIM in p.meta] == []
    assert len(plan.inputs) == 1, plan.inputs
