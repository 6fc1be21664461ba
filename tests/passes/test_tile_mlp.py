"""tile_mlp: each layer's MLP over sequence tiles; same loss and gradients, no full-width intermediate.

Legend: B batch, L local sequence, T tile rows, D hidden, I MLP width (intermediate_size).
Tolerances (fp32): loss 1e-6 relative, gradients 1e-5 (weight gradients sum over tiles).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autosp
from tests.harness_fake import capture
from tests.passes.models_tiny import tiny_llama

WIDTH_I = 64  # tiny_llama's intermediate_size (I)


def _wide(gm):
    """Shapes of the values as wide as the MLP (the ones tiling is for)."""
    return [tuple(n.meta["val"].shape) for n in gm.graph.nodes
            if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() == 3 and n.meta["val"].shape[-1] == WIDTH_I]


@pytest.mark.parametrize("world,L,T", [(1, 17, 6), (2, 9, 3)])
def test_mlp_intermediates_exist_one_tile_at_a_time(world, L, T):
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    [(gm, plan, _)] = capture(tiny_llama(layers=2), input_ids=ids, labels=ids, world=world, tile_mlp=3)
    wide = _wide(gm)
    assert wide and all(s[1] <= T for s in wide), wide  # ceil(L / 3) rows, never L
    assert len(wide) == 2 * 3 * 4  # 2 layers x 3 tiles x (gate, up, silu, product)
    assert any("2 MLP regions run over 3 sequence tiles" in n for n in plan.notes)


@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_one_device_loss_and_gradients_are_unchanged(recompute):
    torch._dynamo.reset()
    ids = torch.randint(0, 128, (2, 23), generator=torch.Generator().manual_seed(1))
    ref_model, model = tiny_llama(layers=2), tiny_llama(layers=2)
    ref = ref_model(input_ids=ids, labels=ids).loss
    ref.backward()
    compiled = torch.compile(model, backend=autosp.backend(compiler="aot_eager", tile_mlp=4, recompute=recompute))
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


class MixingMLP(nn.Module):
    """A 'MLP' that mixes tokens (a cumsum along the sequence): never tiled."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.down(torch.cumsum(F.silu(self.up(x)), dim=1))


class Layers(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"mlp": mlp()}) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["mlp"](x)
        return x.sum()


def test_a_region_that_mixes_tokens_is_left_alone():
    [(gm, plan, inputs)] = capture(Layers(MixingMLP), torch.randn(2, 12, 8), world=1, tile_mlp=3)
    assert not any(n.target is torch.tensor_split for n in gm.graph.nodes)
    assert not any("tile_mlp" in n for n in plan.notes)


def test_bad_option():
    for bad in (0, -2, True, 2.5):
        with pytest.raises(ValueError, match="tile_mlp"):
            autosp.Config(tile_mlp=bad)


class PositionalMLP(nn.Module):
    """A MLP scaled by a learned per-position table [L, 4D]: not per token, never tiled."""

    def __init__(self, length=12):
        super().__init__()
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)
        self.pos = nn.Parameter(torch.randn(length, 32))

    def forward(self, x):
        return self.down(F.silu(self.up(x)) * self.pos)


def test_a_parameter_with_a_token_dim_is_not_tiled():
    torch.manual_seed(0)
    model = Layers(PositionalMLP)
    x = torch.randn(2, 12, 8)
    [(gm, plan, inputs)] = capture(model, x, world=1, tile_mlp=3)
    assert not any(n.target is torch.tensor_split for n in gm.graph.nodes)
    torch.testing.assert_close(gm(*inputs)[0], model(x))
