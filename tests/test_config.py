"""Options: one frozen Config, the same through options={...} and autosp.backend(...), errors that name the option."""

from __future__ import annotations

import dataclasses
import importlib.metadata

import pytest
import torch
import torch.distributed as dist

import autosp
from autosp.backend import resolve_group
from autosp.pipeline import PASS_NAMES
from tests.harness_fake import fake_group


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
        ({"overlap_grad_reduce": 1}, "overlap_grad_reduce"),
        ({"buffer_reuse": "no"}, "buffer_reuse"),
        ({"buffer_reuse": False, "compiler": "aot_eager"}, "buffer_reuse"),
        ({"exchange_timeout_s": 0}, "exchange_timeout_s"),
        ({"exchange_timeout_s": "10"}, "exchange_timeout_s"),
    ],
)
def test_bad_options_raise_naming_the_option(options, name):
    with pytest.raises(ValueError, match=name):
        autosp.Config.from_options(options)
    with pytest.raises(ValueError, match=name):
        autosp.backend(**options)


def test_unknown_option_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        autosp.Config.from_options({"foo": 1}, bar=2)
    text = str(err.value)
    assert "'bar'" in text and "'foo'" in text
    assert all(f.name in text for f in dataclasses.fields(autosp.Config))


def test_unknown_pass_name_lists_the_passes():
    with pytest.raises(ValueError, match="no_such_pass") as err:
        autosp.Config(disable_passes=("global_loss", "no_such_pass"))
    assert all(name in str(err.value) for name in PASS_NAMES)


def test_group_and_mesh_contradict():
    with pytest.raises(ValueError, match="'group' and 'mesh'"):
        autosp.Config(group="g", mesh=object())


def test_defaults_and_normalization():
    cfg = autosp.Config.from_options(None)
    assert (cfg.compiler, cfg.outputs, cfg.attention, cfg.check_plan) == ("inductor", "dtensor", "auto", True)
    assert (cfg.group, cfg.mesh, cfg.sp_dim, cfg.dump_dir, cfg.disable_passes) == (None, None, None, None, ())
    cfg = autosp.Config.from_options({"disable_passes": ["global_loss"]}, compiler="eager")
    assert cfg.disable_passes == ("global_loss",) and cfg.compiler == "eager"


def test_config_is_frozen():
    cfg = autosp.Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.compiler = "eager"


def test_groups_resolve_by_object_name_and_mesh_dim():
    assert resolve_group(autosp.Config()) == (None, 1, 0)  # no process group: size 1
    from torch.distributed.device_mesh import init_device_mesh

    with fake_group(4, rank=3):
        assert resolve_group(autosp.Config())[1:] == (4, 3)
        assert resolve_group(autosp.Config(group=dist.group.WORLD.group_name))[1:] == (4, 3)
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
        group, world, rank = resolve_group(autosp.Config(mesh=mesh, sp_dim="sp"))
        assert (world, rank) == (2, 1) and group is mesh.get_group("sp")
        assert resolve_group(autosp.Config(mesh=mesh, sp_dim=0))[1:] == (2, 1)
        assert resolve_group(autosp.Config(mesh=mesh["sp"]))[1:] == (2, 1)
        with pytest.raises(ValueError, match="'mesh' has 2 dimensions"):
            autosp.Config(mesh=mesh)
        assert autosp.Config(group=dist.group.WORLD).summary()["group"] == dist.group.WORLD.group_name


def test_entry_point_is_registered():
    [ep] = [ep for ep in importlib.metadata.entry_points(group="torch_dynamo_backends") if ep.name == "autosp"]
    assert ep.load() is autosp.autosp_backend


def test_backend_by_name_with_options(tmp_path):
    model = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    options = {"compiler": "eager", "dump_dir": str(tmp_path), "disable_passes": ["global_loss"]}
    out = torch.compile(model, backend="autosp", options=options)(x)
    torch.testing.assert_close(out, model(x))
    [report] = tmp_path.glob("*.txt")  # the options reached the backend
    assert "pass global_loss is disabled" in report.read_text()


def test_bad_option_by_name_raises():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(Exception, match="bogus") as err:
        torch.compile(model, backend="autosp", options={"bogus": 1})(torch.randn(2, 4))
    assert isinstance(err.value, ValueError) or isinstance(err.value.__cause__, ValueError) or "ValueError" in str(err.value)
