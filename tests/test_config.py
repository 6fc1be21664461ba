"""Options: one frozen Config, the same through options={...} and autosp.backend(...), errors that name the option."""

from __future__ import annotations

import dataclasses
import importlib.metadata

import pytest
import torch

import autosp


@pytest.mark.parametrize(
    "options,name",
    [
        ({"fooo": 1}, "fooo"),
        ({"compiler": "tvm"}, "compiler"),
        ({"outputs": "gathered"}, "outputs"),
        ({"attention": "xformers"}, "attention"),
        ({"sp_dim": "sp"}, "sp_dim"),
        ({"disable_passes": ["no_such_pass"]}, "disable_passes"),
        ({"disable_passes": "shard_sequence"}, "disable_passes"),
        ({"check_plan": "yes"}, "check_plan"),
    ],
)
def test_bad_options_raise_naming_the_option(options, name):
    with pytest.raises(ValueError, match=name):
        autosp.Config.from_options(options)
    with pytest.raises(ValueError, match=name):
        autosp.backend(**options)


def test_group_and_mesh_contradict():
    with pytest.raises(ValueError, match="'group' and 'mesh'"):
        autosp.Config(group="g", mesh=object())


def test_config_is_frozen():
    cfg = autosp.Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.compiler = "eager"


def test_entry_point_is_registered():
    names = [ep.name for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")]
    assert "autosp" in names


def test_backend_by_name_with_options():
    torch._dynamo.reset()
    model = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    out = torch.compile(model, backend="autosp", options={"compiler": "eager"})(x)
    torch.testing.assert_close(out, model(x))


def test_bad_option_by_name_raises():
    torch._dynamo.reset()
    model = torch.nn.Linear(4, 4)
    with pytest.raises(Exception, match="bogus"):
        torch.compile(model, backend="autosp", options={"bogus": 1})(torch.randn(2, 4))
