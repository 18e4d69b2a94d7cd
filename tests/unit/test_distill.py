"""pi-Flow distillation in the trainer (``gmflow_jax.train.distill``): the teacher, the student's start
from it, the step, and the one-line refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import logsumexp
from tree_helpers import assert_trees_close

from gmflow_jax.sharding import make_mesh
from gmflow_jax.train.config import load_config
from gmflow_jax.train.distill import (
    TeacherError,
    check_student,
    fresh_tensors,
    load_teacher,
    setup_teacher,
    student_from_teacher,
    teacher_velocity,
)
from gmflow_jax.train.state import init_state, setup_state
from gmflow_jax.train.step import make_train_step


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    """A ``digits_gmdit:tiny`` teacher (K = 2) trained for 3 steps."""
    from gmflow_jax.train import train

    root = tmp_path_factory.mktemp("teacher")
    c = load_config("digits_gmdit:tiny")
    c.data.data_dir = str(root / "tfds")
    c.num_steps, c.checkpoint.every_steps, c.optim.warmup_steps = 3, 3, 0
    train(c, str(root / "run"))
    return str(root / "run")


def student_config(teacher_dir: str, **model):
    c = load_config("digits_piflow:tiny")  # K = 8 on the tiny trunk
    c.distill.teacher = teacher_dir
    c.model.update(model)
    return c


def gm_logdensity(gm, x) -> np.ndarray:
    """Per-pixel log density of a u-GM, float64 NumPy: means (N,H,W,K,C), logweights (N,H,W,K), logstds."""
    means, logw = np.asarray(gm.means, np.float64), np.asarray(gm.logweights, np.float64)
    logstd = np.asarray(gm.logstds, np.float64)[..., 0]  # (N,1,1,1)
    c = means.shape[-1]
    sq = np.sum((np.asarray(x, np.float64)[..., None, :] - means) ** 2, axis=-1)
    return logsumexp(logw - 0.5 * sq * np.exp(-2 * logstd), axis=-1) - c * logstd[..., 0] - 0.5 * c * np.log(2 * np.pi)


def test_student_starts_as_the_teachers_mixture(teacher_dir):
    config = student_config(teacher_dir)
    mesh = make_mesh((-1, 1))
    teacher = setup_teacher(config, mesh)
    assert teacher.step == 3 and not teacher.flow_matching
    t_params = load_teacher(teacher)
    setup = setup_state(config, mesh)
    fresh_student = init_state(setup, 0).params
    assert fresh_tensors(fresh_student, t_params) == []  # everything comes from the teacher
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32)
    tau = jnp.asarray([900.0, 500.0, 100.0, 10.0])
    labels = jnp.asarray([0, 3, 7, 10], jnp.int32)  # 10: the null class
    points = jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32)
    gm_t = nnx.merge(teacher.graphdef, t_params).net(x, tau, labels)
    key = jax.random.PRNGKey(1)
    exact = student_from_teacher(config, fresh_student, teacher, t_params, key, mean_noise=0.0)
    gm_s = nnx.merge(setup.graphdef, exact).net(x, tau, labels)
    assert gm_s.means.shape[-2] == 4 * gm_t.means.shape[-2]
    # the same distribution: 8 components, each teacher component's weight split over its 4 copies
    np.testing.assert_allclose(gm_logdensity(gm_s, points), gm_logdensity(gm_t, points), rtol=1e-5, atol=1e-5)
    nudged = student_from_teacher(config, fresh_student, teacher, t_params, key)
    gm_n = nnx.merge(setup.graphdef, nudged).net(x, tau, labels)
    offsets = np.asarray(gm_n.means - gm_s.means)  # (N,H,W,K,C): one offset per component, everywhere
    np.testing.assert_allclose(offsets, np.broadcast_to(offsets[:1, :1, :1], offsets.shape), atol=1e-6)
    assert 0.01 < offsets[0, 0, 0].std() < 0.15  # N(0, 0.05²) over 8 components
    np.testing.assert_allclose(np.asarray(gm_n.logweights), np.asarray(gm_s.logweights), atol=1e-6)


def test_distillation_step_learns_and_does_not_depend_on_micro_batches(teacher_dir):
    config = student_config(teacher_dir)
    config.optim.warmup_steps = 0
    # AdamW's first step is lr · g / (|g| + eps): with the default eps a gradient element at rounding-noise level
    # becomes a full ±lr step whose sign depends on the summation order. An eps above that noise keeps the
    # update continuous in the gradient, so the comparison below sees the gradients, not the signs of their noise.
    config.optim.eps = 1e-4
    mesh = make_mesh((-1, 1))
    teacher = setup_teacher(config, mesh)
    t_params = load_teacher(teacher)
    setup = setup_state(config, mesh)
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.uniform(-1, 1, (16, 8, 8, 1)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32),
    }
    state = init_state(setup, 0)
    state = state.replace(params=student_from_teacher(config, state.params, teacher, t_params, jax.random.PRNGKey(0)))
    out = {}
    for k in (1, 2):
        c = config.copy_and_resolve_references()
        c.grad_accum_steps = k
        step = jax.jit(make_train_step(setup.graphdef, setup.tx, setup.schedule, c, None, teacher))
        out[k] = step(state, batch, t_params)
    new, metrics = out[1]
    assert np.isfinite(float(metrics["loss_piid"])) and float(metrics["loss_piid"]) > 0
    assert float(metrics["grad_norm"]) > 0
    # the teacher's batch (the N · M intermediate states of one pass) changes size with the micro-batches, and its
    # float32 rounding then runs through the 128-sub-step rollouts (measured: one element of a zero-initialised
    # adaLN kernel off by 2.7e-8, 2.9e-3 of itself but 1e-5 of its leaf's largest)
    assert_trees_close(out[1], out[2], rtol=1e-3)  # every leaf, the attention key bias included
    # the teacher is not part of the state: its weights are unchanged inputs
    assert jax.tree.structure(new.params) == jax.tree.structure(state.params)


def test_flow_matching_teacher_gives_cfg_only_inside_the_interval(teacher_dir):
    config = student_config(teacher_dir)
    teacher = setup_teacher(config, make_mesh((-1, 1)))
    teacher = teacher.__class__(**{**teacher.__dict__, "config": teacher.config.copy_and_resolve_references()})
    teacher.config.loss.objective = "l2"  # read as a flow-matching teacher: velocity = the GM's mean
    t_params = load_teacher(teacher)
    d = config.distill.copy_and_resolve_references()
    d.guidance, d.guidance_interval = 2.5, (0.0, 0.6)
    fn = teacher_velocity(teacher, t_params, d)
    net = nnx.merge(teacher.graphdef, t_params).net
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 1)), jnp.float32)
    tau, labels = jnp.asarray([300.0, 800.0]), jnp.asarray([4, 5], jnp.int32)

    def mean_u(lab):
        gm = net(x, tau, jnp.asarray(lab, jnp.int32))
        w = np.exp(np.asarray(gm.logweights, np.float64))[..., None]
        return np.sum(w * np.asarray(gm.means, np.float64), axis=-2)

    u_c, u_u = mean_u([4, 5]), mean_u([10, 10])
    got = np.asarray(fn(x, tau, labels))
    np.testing.assert_allclose(got[0], u_u[0] + 2.5 * (u_c[0] - u_u[0]), rtol=1e-4, atol=1e-5)  # σ = 0.3: guided
    np.testing.assert_allclose(got[1], u_c[1], rtol=1e-4, atol=1e-5)  # σ = 0.8: outside, conditional


@pytest.mark.parametrize(
    "model,message",
    [
        (dict(num_gaussians=3), r"num_gaussians=3 cannot be initialised from the teacher's 2 Gaussians"),
        (
            dict(hidden_size=64, num_heads=2),
            r"cannot be initialised from the teacher: hidden_size 64 vs the teacher's 32",
        ),
        (dict(num_classes=12), r"the teacher has 10 classes, config\.model\.num_classes=12"),
        (dict(input_size=16), r"the teacher works on examples of shape \(8, 8, 1\), config\.model on \(16, 16, 1\)"),
    ],
)
def test_student_that_cannot_start_from_the_teacher_is_refused(teacher_dir, model, message):
    config = student_config(teacher_dir, **model)
    with pytest.raises(TeacherError, match=message):
        check_student(config, setup_teacher(student_config(teacher_dir), make_mesh((-1, 1))).config, "here")
    with pytest.raises(TeacherError, match=r"^config\.distill\.teacher=.*" + message):
        setup_teacher(config, make_mesh((-1, 1)))


def test_missing_teacher_is_one_line(tmp_path):
    config = student_config(str(tmp_path / "nowhere"))
    with pytest.raises(TeacherError, match=r"^config\.distill\.teacher='.*nowhere': .*") as e:
        setup_teacher(config, make_mesh((-1, 1)))
    assert "\n" not in str(e.value)
