"""document_mask: a mask proven causal within documents and/or inside a sliding window becomes
document attention on the document ids and the window; every other mask is kept; the rewritten
graph computes what the model computes.

Legend: B batch, S sequence, N heads, H head dim.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autosp.kernels.document_attention import DOCUMENT_ATTENTION
from autosp.passes._attention import SDPA_TARGETS, sdpa_args
from tests.harness_fake import capture, nodes_calling
from tests.passes.models_tiny import tiny_llama

B, S, N, H = 2, 12, 2, 4


def _positions(lengths_per_row: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row])


def _sdpa(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]


class DocumentAttention(nn.Module):
    """Attention masked the way ``kind`` says, from positions ``pos`` (as transformers does)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.qkv = nn.Linear(N * H, 3 * N * H)

    def forward(self, x_BSD, pos_BS):
        q, k, v = (t.view(B, S, N, H).transpose(1, 2) for t in self.qkv(x_BSD).split(N * H, dim=-1))
        b = torch.arange(B)[:, None, None, None]
        i = torch.arange(S)[None, None, :, None]
        j = torch.arange(S)[None, None, None, :]
        step = torch.diff(pos_BS, prepend=pos_BS[:, :1] - 1, dim=-1)
        doc = (step != 1).cumsum(-1)
        same_doc = doc[b, i] == doc[b, j]
        by_position = pos_BS[b, j] <= pos_BS[b, i]
        if self.kind == "transformers":  # causal_mask_function on remapped positions AND the packed mask
            mask = i.new_ones((), dtype=torch.bool) & by_position & same_doc
        elif self.kind == "by_index":  # the order by index instead of by position
            mask = (j <= i) & same_doc
        elif self.kind == "flags":  # any cumulative sum of flags, ordered by index
            starts = pos_BS == 0
            doc2 = starts.cumsum(-1)
            mask = (j <= i) & (doc2[b, i] == doc2[b, j])
        elif self.kind == "no_order":  # documents, both directions: not causal
            mask = same_doc
        elif self.kind == "strict":  # no diagonal
            mask = (pos_BS[b, j] < pos_BS[b, i]) & same_doc
        elif self.kind == "other_positions":  # ordered by positions the ids were not made from
            other = pos_BS.flip(-1)
            mask = (other[b, j] <= other[b, i]) & same_doc
        elif self.kind == "steps_of_two":  # ids from steps != 2: positions inside a document step by 1, not 2
            doc2 = (step != 2).cumsum(-1)
            mask = by_position & (doc2[b, i] == doc2[b, j])
        elif self.kind == "ids_from_input":  # document ids given, not made from flags: not known monotone
            mask = (j <= i) & (pos_BS[b, i] == pos_BS[b, j])
        elif self.kind == "ids_written_in_place":  # the ids changed after they were made: not a cumsum any more
            doc2 = (step != 1).cumsum(-1)
            doc2[:, 3] = 7
            mask = by_position & (doc2[b, i] == doc2[b, j])
        elif self.kind == "positions_written_through_alias":  # .long() of int64 is the tensor itself
            P = pos_BS.clone()
            doc2 = (torch.diff(P, prepend=P[:, :1] - 1, dim=-1) != 1).cumsum(-1)
            P.long().mul_(-1)
            mask = (P[b, j] <= P[b, i]) & (doc2[b, i] == doc2[b, j])
        elif self.kind == "ids_written_through_a_view":  # torch.unsqueeze: a view made by a function
            mask = (j <= i) & same_doc
            torch.unsqueeze(doc, 0).zero_()
        elif self.kind == "ids_written_with_out":
            mask = by_position & same_doc
            torch.neg(doc, out=doc)
        elif self.kind == "int8_positions":  # steps wrap around at 127
            P = pos_BS.to(torch.int8) + 120
            doc2 = (torch.diff(P, prepend=P[:, :1] - 1, dim=-1) != 1).cumsum(-1)
            mask = (P[b, j] <= P[b, i]) & (doc2[b, i] == doc2[b, j])
        elif self.kind == "bits_window":  # i.view(float64): the bits of i, not its value (found by review)
            mask = (j <= i) & ((i.view(torch.float64) - j.view(torch.float64)) < 3) & same_doc
        elif self.kind == "wide_prepend":  # diff with two columns prepended: not one step before
            c = torch.cumsum(torch.diff(torch.arange(S - 1), prepend=torch.arange(-1, 9, 5)), 0)
            mask = (c[None, None, None, :] <= c[None, None, :, None]) & same_doc
        elif self.kind == "ids_filled_by_an_aten_overload":  # its name is "fill_.Scalar"
            mask = (j <= i) & same_doc
            torch.ops.aten.fill_.Scalar(doc, 0)
        elif self.kind == "ids_written_by_foreach":  # torch._foreach_add_: in place, its name starts with "_"
            mask = (j <= i) & same_doc
            torch._foreach_add_([doc], 1)
        elif self.kind == "window":  # documents and a window by index
            mask = by_position & same_doc & ((i - j) < 3)
        elif self.kind == "window_alone":  # a sliding window by index, one document a row
            mask = (j <= i) & ((i - j) < 3)
        elif self.kind == "transformers_window":  # transformers' packed sliding window: by positions
            mask = by_position & (pos_BS[b, j] > pos_BS[b, i] - 3) & same_doc
        elif self.kind == "two_windows":  # the narrower one holds
            mask = (j <= i) & ((i - j) < 5) & (pos_BS[b, i] < pos_BS[b, j] + 3) & same_doc
        elif self.kind == "window_of_other_positions":  # a window by positions the ids were not made from
            other = pos_BS.flip(-1)
            mask = by_position & (other[b, j] > other[b, i] - 3) & same_doc
        elif self.kind == "position_window_without_documents":  # positions say nothing about indices then
            mask = (j <= i) & (pos_BS[b, j] > pos_BS[b, i] - 3)
        elif self.kind == "reversed_window":  # j - i < 3: keys ahead of the query
            mask = (j <= i) & ((j - i) < 3)
        elif self.kind == "empty_window":  # i - j < 0: no key at all
            mask = (j <= i) & ((i - j) < 0)
        elif self.kind == "window_without_order":  # both directions
            mask = ((i - j) < 3) & ((j - i) < 3)
        elif self.kind == "offset_order":  # j <= i + 1 by positions: one key ahead
            mask = (pos_BS[b, j] <= pos_BS[b, i] + 1) & same_doc
        else:
            raise ValueError(self.kind)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(B, 1, S, S))
        if self.kind == "ids_written_by_foreach":  # the write is seen by what follows (not dead code)
            o = o + doc[:, None, :, None]
        return o.transpose(1, 2).reshape(B, S, N * H)


LAYOUTS = [[5, 1, 6], [3, 9]]  # row 0: three documents (one of one token), row 1: two


def _run(kind: str):
    torch.manual_seed(0)
    model = DocumentAttention(kind)
    x, pos = torch.randn(B, S, N * H), _positions(LAYOUTS)
    [(gm, plan, inputs)] = capture(model, x, pos, world=1)
    return model, (x, pos), gm, plan, inputs


@pytest.mark.parametrize("kind,documents,window", [
    ("transformers", True, None), ("by_index", True, None), ("flags", True, None), ("window", True, 3),
    ("window_alone", False, 3), ("transformers_window", True, 3), ("two_windows", True, 3)])
def test_document_masks_become_document_attention(kind, documents, window):
    model, args, gm, plan, inputs = _run(kind)
    assert _sdpa(gm) == []
    [call] = nodes_calling(gm, DOCUMENT_ATTENTION)
    assert (call.args[3] is not None) == documents and call.args[5] == window
    assert not any(isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dtype == torch.bool
                   and n.meta["val"].dim() == 4 for n in gm.graph.nodes), "the mask's nodes are dead code"
    said = "causal within documents" if documents else "a sliding window of 3"
    assert any(n.startswith(f"attention masked to {said}") for n in plan.notes), plan.notes
    torch.testing.assert_close(gm(*inputs)[0], model(*args), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["no_order", "strict", "other_positions", "steps_of_two", "ids_from_input",
                                  "ids_written_in_place", "positions_written_through_alias",
                                  "ids_written_through_a_view", "ids_written_with_out", "int8_positions",
                                  "window_of_other_positions", "position_window_without_documents", "reversed_window",
                                  "empty_window", "window_without_order", "offset_order", "bits_window",
                                  "wide_prepend", "ids_filled_by_an_aten_overload", "ids_written_by_foreach"])
def test_other_masks_are_kept(kind):
    model, args, gm, plan, inputs = _run(kind)
    [sdpa] = _sdpa(gm)
    assert sdpa_args(sdpa)["attn_mask"] is not None
    assert nodes_calling(gm, DOCUMENT_ATTENTION) == []
    assert any("not provably causal and is kept" in n for n in plan.notes), plan.notes
    torch.testing.assert_close(gm(*inputs)[0], model(*args), equal_nan=True)


@pytest.mark.parametrize("world", [1, 2])
def test_hf_llama_with_packed_position_ids(world):
    """transformers' own packed-sequence mask (position_ids, no attention_mask) is proven, on one
    device and between the all-to-alls of SP=2, and the document ids are the whole sequence's."""
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = _positions([[5, 1, 10], [7, 9]])
    [(gm, plan, inputs)] = capture(tiny_llama(layers=2), input_ids=ids, labels=ids, use_cache=False,
                                   position_ids=pos, world=world)
    assert _sdpa(gm) == []
    calls = nodes_calling(gm, DOCUMENT_ATTENTION)
    assert len(calls) == 2
    assert all(list(c.args[3].meta["val"].shape) == [2, 16] for c in calls)  # D: [B, S], the whole sequence
    assert all(list(c.args[0].meta["val"].shape)[2] == 16 for c in calls)  # attention over all of S
    # grouped-query attention: K and V at their own head count (4 query heads on 2 KV heads, split over ranks)
    assert all(c.args[0].meta["val"].shape[1] == 4 // world and c.args[1].meta["val"].shape[1] == 2 // world
               for c in calls)
    assert any(n.startswith("grouped_kv: 2 attention calls read K and V at their own head count") for n in plan.notes)
    assert plan.fallbacks == []
    if world == 1:
        model = tiny_llama(layers=2)
        ref = model(input_ids=ids, labels=ids, use_cache=False, position_ids=pos)
        out = gm(*inputs)
        torch.testing.assert_close(out[0], ref.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("world", [1, 2])
def test_hf_sliding_window_layers(world, packed):
    """Gemma 3's local layer (a window of 6, its own scale) runs as document attention with the
    window, with or without packed documents; its global layer is causal (or document-causal)."""
    from tests.distributed.models import build

    torch.manual_seed(0)
    model = build("gemma3")
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    kw = {"position_ids": _positions([[5, 1, 10], [16]])} if packed else {}
    [(gm, plan, inputs)] = capture(model, input_ids=ids, labels=ids, use_cache=False, world=world, **kw)
    calls = nodes_calling(gm, DOCUMENT_ATTENTION)
    assert sorted((c.args[3] is not None, c.args[5] or 0) for c in calls) == \
        ([(True, 0), (True, 6)] if packed else [(False, 6)])
    assert all(c.args[4] == 8 ** -0.5 for c in calls)  # query_pre_attn_scalar, not the head dim
    assert len(_sdpa(gm)) == (0 if packed else 1) and plan.fallbacks == []
    if world == 1:
        ref = model(input_ids=ids, labels=ids, use_cache=False, **kw)
        torch.testing.assert_close(gm(*inputs)[0], ref.loss, rtol=1e-5, atol=1e-6)


def test_positions_are_checked_at_run_time():
    """The proof read the order from positions (transformers' packed mask), assuming them below
    2**40: one check in the graph for both layers, and a compiled step with positions past it
    fails instead of computing something else (aot_eager and Inductor, on CPU)."""
    import autosp
    from autosp.kernels.document_attention import check_positions

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = _positions([[5, 1, 10], [7, 9]])
    [(gm, _, _)] = capture(tiny_llama(layers=2), input_ids=ids, labels=ids, use_cache=False, position_ids=pos,
                           world=1)
    assert len(nodes_calling(gm, check_positions)) == 1 and len(nodes_calling(gm, DOCUMENT_ATTENTION)) == 2
    for compiler in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        model = torch.compile(tiny_llama(layers=2), backend=autosp.backend(compiler=compiler), dynamic=False)
        model(input_ids=ids, labels=ids, use_cache=False, position_ids=pos)  # within the bound: runs
        with pytest.raises(RuntimeError, match="position_ids must lie strictly between"):
            model(input_ids=ids, labels=ids, use_cache=False, position_ids=pos + 2**40)


def test_positions_of_one_row_for_a_batch_of_two():
    """position_ids [1, S] with a batch of 2: transformers expands them twice (for the ids and
    for the order); both are read as the same positions."""
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = _positions([[5, 11]])
    [(gm, plan, inputs)] = capture(tiny_llama(), input_ids=ids, labels=ids, use_cache=False, position_ids=pos,
                                   world=1)
    assert _sdpa(gm) == [] and len(nodes_calling(gm, DOCUMENT_ATTENTION)) == 1
    ref = tiny_llama()(input_ids=ids, labels=ids, use_cache=False, position_ids=pos)
    torch.testing.assert_close(gm(*inputs)[0], ref.loss, rtol=1e-5, atol=1e-6)


def test_a_padded_sequence_keeps_its_mask():
    """17 tokens over 2 ranks: the attention runs over 18 (padded), the ids are 17 long."""
    ids = torch.randint(0, 128, (1, 17), generator=torch.Generator().manual_seed(0))
    [(gm, plan, _)] = capture(tiny_llama(), input_ids=ids, labels=ids, use_cache=False,
                              position_ids=_positions([[5, 12]]), world=2)
    assert nodes_calling(gm, DOCUMENT_ATTENTION) == []
    assert any("keeps its mask (causal within documents" in n and "padded" in n for n in plan.notes), plan.notes


def test_options_for_sdpa_calls_are_reported_unused():
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    [(gm, plan, _)] = capture(tiny_llama(), input_ids=ids, labels=ids, use_cache=False,
                              position_ids=_positions([[5, 11], [16]]), world=1, attention_chunks=2)
    assert len(nodes_calling(gm, DOCUMENT_ATTENTION)) == 1
    assert any("runs whole: attention_chunks=2" in n for n in plan.notes), plan.notes


def test_the_pass_can_be_disabled():
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    [(gm, plan, _)] = capture(tiny_llama(), input_ids=ids, labels=ids, use_cache=False,
                              position_ids=_positions([[5, 11], [16]]), world=1, disable_passes=["document_mask"])
    [sdpa] = _sdpa(gm)
    assert sdpa_args(sdpa)["attn_mask"] is not None
    assert any("not provably causal and is kept" in n for n in plan.notes), plan.notes  # and what it costs


@pytest.mark.gpu
def test_cuda_compiled_llama_with_packed_documents_matches_eager():
    """On a GPU under Inductor: the document attention kernels (Triton, D = 16) in a compiled
    model give eager's loss and gradients (float32; kernel sums in another order)."""
    import autosp

    torch.manual_seed(0)
    model = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128).cuda()
    ref = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128).cuda()
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, 128, (2, 200), generator=torch.Generator().manual_seed(0)).cuda()
    pos = _positions([[70, 1, 129], [200]]).cuda()
    report = autosp.explain(model, input_ids=ids, labels=ids, use_cache=False, position_ids=pos)
    assert "run as document attention" in str(report), str(report)
    _assert_compiled_step_matches_eager(model, ref, input_ids=ids, labels=ids, use_cache=False, position_ids=pos)


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_cuda_compiled_gemma3_with_a_sliding_window_matches_eager(packed):
    """On a GPU under Inductor: Gemma 3 (head dim 16, a window of 40 on its local layer) gives
    eager's loss and gradients with the Triton document attention kernels (float32)."""
    import autosp
    from tests.distributed.models import build

    torch.manual_seed(0)
    model, ref = build("gemma3_d16").cuda(), build("gemma3_d16").cuda()
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, 96, (2, 200), generator=torch.Generator().manual_seed(0)).cuda()
    kw = {"position_ids": _positions([[70, 1, 129], [200]]).cuda()} if packed else {}
    report = str(autosp.explain(model, input_ids=ids, labels=ids, use_cache=False, **kw))
    assert "sliding window of 40" in report and "run as document attention" in report, report
    _assert_compiled_step_matches_eager(model, ref, input_ids=ids, labels=ids, use_cache=False, **kw)


def _assert_compiled_step_matches_eager(model, ref, **batch):
    """``model`` compiled by autosp and ``ref`` (the same weights) in eager: the same loss, and
    every gradient within 1e-4 of the largest (float32; the kernels sum in another order)."""
    import autosp

    loss = torch.compile(model, backend=autosp.backend())(**batch).loss
    ref_loss = ref(**batch).loss
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        err = (p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-12)
        assert err < 1e-4, (name, err.item())
