"""causal_mask: masks proven causal become is_causal=True; every other mask is kept, and the
rewritten graph computes what the model computes.

Legend: B batch, S sequence, N heads, H head dim.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autosp
from autosp.passes._attention import SDPA_TARGETS, sdpa_args
from tests.harness_fake import capture
from tests.passes.models_tiny import tiny_llama

B, S, N, H = 2, 12, 2, 4


def _arange_mask(kind: str, S: int, device=None):
    """Masks written the way transformers writes them (index tensors broadcast against each other)."""
    q = (torch.arange(S, device=device) + 3)[None, None, :, None]
    kv = (torch.arange(S, device=device) + 3)[None, None, None, :]
    if kind == "causal":  # transformers' causal_mask_function, with equal offsets
        return (kv <= q).expand(B, -1, S, S)
    if kind == "causal_lt":
        return (kv < q + 1).expand(B, 1, S, S)
    if kind == "causal_ge_and_ones":
        return q.new_ones((), dtype=torch.bool) & (q >= kv)
    if kind == "anti_causal":
        return kv >= q
    if kind == "strict":  # no diagonal: every first row is empty
        return kv < q
    if kind == "window":
        return (kv <= q) & (q - kv < 4)
    if kind == "transposed":
        return (q <= kv).transpose(-1, -2).contiguous()
    if kind == "wrapped":  # gathers with a negative index (wraps around): not affine, kept
        pos = torch.arange(S, device=device)
        return (pos[kv - 3 - 1] <= pos[q - 3 - 1]).expand(B, -1, S, S)
    if kind == "alpha":  # kv - 2 * q <= 0: alpha scales the second operand
        return torch.sub(kv, q, alpha=2) <= 0
    if kind == "narrow_cast":  # uint8 positions wrap at 256
        return kv.to(torch.uint8) <= q.to(torch.uint8)
    if kind == "int8_cumsum":  # positions from an int8 cumsum wrap past 127: refused at any length
        pos = torch.ones(S, dtype=torch.bool, device=device).cumsum(0, dtype=torch.int8).long()
        return pos[None, :] <= pos[:, None]
    if kind == "int8_arange":
        pos = torch.arange(S, dtype=torch.int8, device=device)
        return pos[None, :] <= pos[:, None]
    if kind == "setitem":  # causal, then every query also sees the last key
        mask = (kv <= q).clone()
        mask[..., S - 1] = True
        return mask
    if kind == "and_in_place":  # causal AND a window, written in place
        mask = kv <= q
        mask.logical_and_((q - kv) < 4)
        return mask
    if kind == "index_in_place":  # queries moved two ahead in place
        q2 = q.clone()
        q2.add_(2)
        return kv <= q2
    if kind == "overflow":  # the offsets wrap int64
        big = 2**63 - 6
        return kv + big <= q + big
    if kind == "shifted":  # one position ahead: not causal
        return kv <= q + 1
    if kind == "wide_prepend":  # diff with two columns prepended: [5, 1, 2, ...] (found by review)
        c = torch.cumsum(torch.diff(torch.arange(S - 1, device=device), prepend=torch.arange(-1, 9, 5, device=device)), 0)
        return c[None, None, None, :] <= c[None, None, :, None]
    if kind == "bits":  # the bits of the indices as float64 (tiny denormals), not their values: causal
        return (kv <= q) & ((q.view(torch.float64) - kv.view(torch.float64)) < 1)
    if kind == "offsets":  # the same predicate written with offsets on both sides
        return kv + 1 <= q - 1 + 2
    raise ValueError(kind)


class MaskedAttention(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(N * H, 3 * N * H)

    def forward(self, x_BSD, pad_BS=None):
        S = x_BSD.shape[1]
        q, k, v = (t.view(B, S, N, H).transpose(1, 2) for t in self.proj(x_BSD).chunk(3, dim=-1))
        if self.kind == "input":
            mask = pad_BS[:, None, None, :].bool() & _arange_mask("causal", S, x_BSD.device)
        elif self.kind == "float":
            mask = torch.zeros(S, S).masked_fill(~_arange_mask("causal", S)[0, 0], float("-inf"))
        else:
            kind = self.kind.removesuffix("_scaled_in_place").removeprefix("positional_")
            mask = _arange_mask(kind, S, x_BSD.device)
        if self.kind == "causal_scaled_in_place":  # an in-place op whose result is unused must survive
            q = q.clone()
            q.mul_(0.5)
        if self.kind.startswith("positional"):  # the mask (and dropout, is_causal) passed by position
            return F.scaled_dot_product_attention(q, k, v, mask, 0.0, False).transpose(1, 2).reshape(B, S, N * H)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return o.transpose(1, 2).reshape(B, S, N * H)


def _sdpa(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]


def _run(kind: str, world: int = 1):
    torch.manual_seed(0)
    model = MaskedAttention(kind)
    x = torch.randn(B, S, N * H)
    pad = torch.ones(B, S, dtype=torch.long)
    [(gm, plan, inputs)] = capture(model, x, pad, world=world)
    return model, (x, pad), gm, plan, inputs


@pytest.mark.parametrize("kind", ["causal", "causal_lt", "causal_ge_and_ones", "offsets", "causal_scaled_in_place",
                                  "positional_causal"])
def test_causal_masks_become_is_causal(kind):
    model, args, gm, plan, inputs = _run(kind)
    [sdpa] = _sdpa(gm)
    a = sdpa_args(sdpa)
    assert a["attn_mask"] is None and a["is_causal"] is True
    assert not any(isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dtype == torch.bool
                   for n in gm.graph.nodes), "the mask's nodes are dead code and removed"
    assert any("proven causal" in n for n in plan.notes)
    torch.testing.assert_close(gm(*inputs)[0], model(*args), rtol=0, atol=1e-6)


def test_a_window_is_not_causal_and_runs_as_document_attention():
    """``(j <= i) & (i - j < 4)`` is not the causal mask: not ``is_causal``; pass document_mask
    runs it with the window."""
    from autosp.kernels.document_attention import DOCUMENT_ATTENTION
    from tests.harness_fake import nodes_calling

    model, args, gm, plan, inputs = _run("window")
    assert _sdpa(gm) == [] and not any("proven causal" in n for n in plan.notes)
    [call] = nodes_calling(gm, DOCUMENT_ATTENTION)
    assert call.args[3] is None and call.args[5] == 4
    torch.testing.assert_close(gm(*inputs)[0], model(*args), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["anti_causal", "strict", "shifted", "wrapped", "transposed", "input", "float",
                                  "alpha", "narrow_cast", "int8_arange", "int8_cumsum", "setitem", "and_in_place",
                                  "index_in_place", "overflow", "wide_prepend", "bits"])
def test_other_masks_are_kept(kind):
    model, args, gm, plan, inputs = _run(kind)
    [sdpa] = _sdpa(gm)
    a = sdpa_args(sdpa)
    assert a["attn_mask"] is not None and a["is_causal"] is False
    assert not any("proven causal" in n for n in plan.notes)
    assert any("not provably causal and is kept" in n for n in plan.notes), plan.notes
    torch.testing.assert_close(gm(*inputs)[0], model(*args), equal_nan=True)


@pytest.mark.parametrize("world", [1, 2])
def test_hf_llama_mask_built_under_compile_is_proven_causal(world):
    """use_cache=False: transformers builds a packed-sequence mask from the position ids
    (cumsum of steps != 1), then ANDs it with kv_idx <= q_idx; all of it folds to causal."""
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    [(gm, plan, _)] = capture(tiny_llama(layers=2), input_ids=ids, labels=ids, use_cache=False, world=world)
    sdpas = _sdpa(gm)
    assert len(sdpas) == 2
    assert all(sdpa_args(n)["attn_mask"] is None and sdpa_args(n)["is_causal"] for n in sdpas)
    assert plan.fallbacks == []


def test_a_padding_mask_from_the_inputs_is_kept():
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    [(gm, plan, _)] = capture(tiny_llama(layers=5), input_ids=ids, labels=ids, use_cache=False,
                              attention_mask=torch.ones(2, 16, dtype=torch.long), world=1)
    sdpa = _sdpa(gm)[0]
    assert sdpa_args(sdpa)["attn_mask"] is not None
    [note] = [n for n in plan.notes if "not provably causal" in n]  # one note for the mask the 5 layers share
    assert note.startswith(f"{sdpa.name} and 4 more calls: "), note
    assert "[2, 1, 16, 16] bool, 512 B built on every rank" in note


def test_the_pass_can_be_disabled():
    torch.manual_seed(0)
    [(gm, plan, _)] = capture(MaskedAttention("causal"), torch.randn(B, S, N * H), world=1,
                              disable_passes=["causal_mask"])
    [sdpa] = _sdpa(gm)
    assert sdpa_args(sdpa)["attn_mask"] is not None


def test_comparisons_recorded_as_dunder_methods_are_proven():
    """torch 2.11's Dynamo records transformers' ``packed[q] == packed[kv]`` as the method
    ``__eq__`` (2.13 records ``operator.eq``): the proof reads both (else a 512 GiB mask at 512K)."""
    import operator

    from autosp.backend import plan_region

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    seen = []

    def backend(gm, example_inputs):
        renamed = 0
        for n in gm.graph.nodes:
            name = {operator.eq: "__eq__", operator.le: "__le__", operator.ne: "__ne__"}.get(n.target)
            if n.op == "call_function" and name:
                n.op, n.target = "call_method", name
                renamed += 1
        gm.recompile()
        assert renamed >= 2  # the causal comparison and the packed-sequence equality at least
        gm, plan = plan_region(gm, example_inputs, autosp.Config(compiler="eager"))
        seen.append((gm, plan))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(tiny_llama(layers=1), backend=backend, dynamic=False)(input_ids=ids, use_cache=False)
    [(gm, plan)] = seen
    [sdpa] = _sdpa(gm)
    assert sdpa_args(sdpa)["attn_mask"] is None and sdpa_args(sdpa)["is_causal"]
