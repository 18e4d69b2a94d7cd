"""The config loader (``load_config``) and the experiment configs: they load, lock and validate; bad values
are refused with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from gmflow_jax.train.config import load_config, packaged_configs, validate_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
load = load_config


@pytest.mark.parametrize(
    "name,arg",
    [
        ("digits_gmdit", None),
        ("digits_gmdit", "tiny"),
        ("checkerboard_k64", None),
        ("checkerboard_k64", "baseline"),
        ("checkerboard_k64", "tiny"),
        ("imagenet_gmdit_k8", "fm"),
        ("digits_piflow", None),
        ("digits_piflow", "2"),
        ("digits_piflow", "tiny"),
        ("checkerboard_piflow", None),
        ("checkerboard_piflow", "tiny"),
        ("imagenet_piflow_k32", None),
        ("imagenet_piflow_k32", "2"),
    ],
)
def test_configs_validate(name, arg):
    validate_config(load(name, arg))


def test_piflow_recipe_is_the_authors():
    c = load("imagenet_piflow_k32")
    assert (c.model.arch, c.model.num_gaussians, c.model.logstd_inner_dim, c.batch_size) == ("XL/2", 32, 1024, 4096)
    d = c.distill
    assert (d.nfe, d.total_substeps, d.num_intermediate_states, d.gm_dropout, d.scale) == (1, 128, 2, 0.05, 3.0)
    assert (d.guidance, tuple(d.guidance_interval), d.orthogonal) == (2.7, (0.0, 0.6), 0.0)
    assert (c.optim.lr, c.optim.weight_decay, c.optim.warmup_steps, c.optim.clip_norm, c.num_steps) == (
        5e-5,
        0.0,
        400,
        50.0,
        140_000,
    )
    teacher = load(d.teacher_config)
    assert teacher.loss.objective == "l2" and teacher.model.num_gaussians == 1 and teacher.model.arch == "XL/2"


def test_load_config_by_name_path_and_arg(tmp_path):
    assert packaged_configs() == sorted(p.stem for p in CONFIGS.glob("[!_]*.py"))
    by_name = load_config("checkerboard_k64", "baseline")
    assert load_config("checkerboard_k64:baseline").to_dict() == by_name.to_dict()
    assert load_config(str(CONFIGS / "checkerboard_k64.py") + ":baseline").to_dict() == by_name.to_dict()
    assert load_config("digits_gmdit:tiny").model.hidden_size == 32
    own = tmp_path / "mine.py"
    own.write_text(
        "from gmflow_jax.train.config import base_config\n\n"
        "def get_config(arg=None):\n    c = base_config()\n    c.seed = int(arg or 0)\n    return c\n"
    )
    assert load_config(f"{own}:7").seed == 7
    with pytest.raises(ValueError, match=r"config 'digit_gmdit' is neither .* expected one of \['checkerboard_k64'"):
        load_config("digit_gmdit")
    with pytest.raises(ValueError, match=r"config file 'nowhere/x\.py' does not exist"):
        load_config("nowhere/x.py")


def test_checkerboard_variants():
    gm, fm = load("checkerboard_k64"), load("checkerboard_k64", "baseline")
    assert (gm.model.kind, gm.model.num_gaussians, gm.loss.objective) == ("toy", 64, "gm")
    assert (gm.loss.trans_ratio, gm.loss.t_mode, gm.loss.weight) == (0.9, "uniform", 1.0)
    assert (fm.model.num_gaussians, fm.model.learn_std, fm.loss.objective) == (1, False, "l2")
    with pytest.raises(ValueError, match="variant"):
        load("checkerboard_k64", "k32")


def test_imagenet_recipe_and_tiny_variant():
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
    assert (c.data.dataset, c.data.image_size, c.model.input_size, c.model.in_channels) == (
        "imagenet_latents",
        256,
        32,
        4,
    )
    validate_config(c)
    tiny = load("imagenet_gmdit_k8", "tiny")
    assert (tiny.model.input_size, tiny.model.in_channels, tiny.data.image_size, tiny.batch_size) == (8, 4, 32, 8)
    assert (tiny.sharding.embed, tiny.data.read) == ("", "per_process")
    validate_config(tiny)


def test_loaded_config_is_locked_against_typos():
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
        ("grad_accum_steps", 0, r"config\.grad_accum_steps must be an int >= 1; got 0"),
        ("grad_accum_steps", 3, r"config\.grad_accum_steps must be a divisor of config\.batch_size=64; got 3"),
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


def test_grad_accum_steps_must_divide_the_per_device_batch():
    from gmflow_jax.train.loop import check_devices

    c = load("digits_gmdit")  # batch 64
    c.grad_accum_steps = 4
    check_devices(c, n_dev=16, n_proc=2)  # 4 per device: 4 micro-batches of 1
    message = (
        r"^config\.grad_accum_steps=4 must divide the per-device batch 2 \(config\.batch_size=64 over 32 devices\)"
    )
    with pytest.raises(ValueError, match=message):
        check_devices(c, n_dev=32, n_proc=4)
