"""The experiment configs load, lock and validate; bad values are refused with the field named."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from gmflow_jax.train_config import validate_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    config.lock()
    return config


@pytest.mark.parametrize(
    "name,arg", [("digits_gmdit", None), ("checkerboard_k64", None), ("checkerboard_k64", "baseline")]
)
def test_configs_validate(name, arg):
    validate_config(load(name, arg))


def test_checkerboard_variants():
    gm, fm = load("checkerboard_k64"), load("checkerboard_k64", "baseline")
    assert (gm.model.kind, gm.model.num_gaussians, gm.loss.objective) == ("toy", 64, "gm")
    assert (gm.loss.trans_ratio, gm.loss.t_mode, gm.loss.weight) == (0.9, "uniform", 1.0)
    assert (fm.model.num_gaussians, fm.model.learn_std, fm.loss.objective) == (1, False, "l2")
    with pytest.raises(ValueError, match="variant"):
        load("checkerboard_k64", "k32")


def test_imagenet_recipe_and_missing_dataset():
    c = load("imagenet_gmdit_k8")
    assert (c.model.arch, c.model.num_gaussians, c.batch_size, c.num_steps) == ("XL/2", 8, 4096, 200_000)
    assert (c.optim.lr, c.optim.b2, c.optim.weight_decay, c.optim.clip_norm, c.optim.clip_start) == (
        2e-4,
        0.95,
        0.05,
        10.0,
        1000,
    )
    assert (c.loss.trans_ratio, c.loss.t_mode, c.loss.weight, c.model.dtype) == (0.5, "logit_normal", 2.0, "bfloat16")
    assert c.sharding.embed == "fsdp"
    with pytest.raises(ValueError, match=r"config\.data\.dataset='imagenet_latents'.*later issue"):
        validate_config(c)


def test_locked_config_refuses_typos():
    c = load("digits_gmdit")
    with pytest.raises(AttributeError, match="num_steps"):
        c.num_stepz = 3


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("loss.trans_ratio", 1.5, r"config\.loss\.trans_ratio must be a number >= 0.0 and <= 1.0"),
        ("loss.t_mode", "gaussian", r"config\.loss\.t_mode must be one of"),
        ("data.dataset", "mnist", r"config\.data\.dataset must be one of"),
        ("num_steps", 0, r"config\.num_steps must be an int >= 1"),
        ("optim.lr", -1.0, r"config\.optim\.lr must be a number > 0.0"),
        ("model.dtype", "float16", r"config\.model\.dtype must be one of"),
        ("data.read", "sharded", r"config\.data\.read must be one of"),
        ("mesh", (1, 2, 3), r"config\.mesh must be a tuple \(data, fsdp\)"),
    ],
)
def test_bad_values_name_the_field(field, value, match):
    c = load("digits_gmdit")
    *parents, leaf = field.split(".")
    node = c
    for p in parents:
        node = node[p]
    with c.unlocked():
        node[leaf] = value
    with pytest.raises(ValueError, match=match):
        validate_config(c)


def test_l2_objective_needs_single_fixed_std_component():
    c = load("checkerboard_k64")
    c.loss.objective = "l2"
    with pytest.raises(ValueError, match=r"config\.model must be num_gaussians=1"):
        validate_config(c)


def test_mesh_resolution():
    from gmflow_jax.sharding import resolve_mesh_shape

    assert resolve_mesh_shape((-1, 1), 8) == (8, 1)
    assert resolve_mesh_shape((2, -1), 8) == (2, 4)
    with pytest.raises(ValueError, match=r"config\.mesh=\(3, 1\) needs 3 devices but this run has 8"):
        resolve_mesh_shape((3, 1), 8)
    with pytest.raises(ValueError, match=r"config\.mesh=\(3, -1\)"):
        resolve_mesh_shape((3, -1), 8)
