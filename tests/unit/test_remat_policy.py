"""Remat policies of the GM-DiT (``config.model.remat_policy``): same loss and gradients, different residuals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from gmflow_jax.models import gmdit
from gmflow_jax.models.factory import build_model, remat_policy
from gmflow_jax.train.config import load_config, validate_config
from gmflow_jax.utilization import recomputed_forward_share


def _model(remat) -> gmdit.GMDiT:
    net = gmdit.GMDiT(
        input_size=8,
        in_channels=3,
        num_gaussians=4,
        num_classes=5,
        patch_size=2,
        hidden_size=32,
        depth=1,
        num_heads=2,
        logstd_inner_dim=16,
        remat=remat,
        rngs=nnx.Rngs(0),
    )
    rng = np.random.RandomState(1)  # every parameter non-zero (adaLN and logstd layers start at zero)
    state = nnx.state(net, nnx.Param)
    nnx.update(net, jax.tree.map(lambda a: a + 0.1 * rng.randn(*a.shape).astype(np.float32), state))
    return net


def _inputs():
    rng = np.random.RandomState(0)
    x = rng.randn(3, 8, 8, 3).astype(np.float32)
    return x, np.array([3.0, 420.0, 990.0], np.float32), np.array([0, 2, 5], np.int32)


def _loss(net: gmdit.GMDiT, x, tau, labels) -> jax.Array:
    """A GM negative log-likelihood of a fixed target u (every head output, every parameter in play)."""
    gm = net(x, tau, labels)
    u = jnp.sin(jnp.asarray(x))[..., None, :]  # (N, H, W, 1, C)
    var = jnp.exp(2 * gm.logstds)
    logp = gm.logweights - 0.5 * jnp.sum((u - gm.means) ** 2 / var + jnp.log(var), axis=-1)
    return -jnp.mean(jax.nn.logsumexp(logp, axis=-1))


@nnx.jit
def _loss_and_grads(net, x, tau, labels):
    return nnx.value_and_grad(_loss)(net, x, tau, labels)


@pytest.fixture(scope="module")
def plain():
    loss, grads = _loss_and_grads(_model("none"), *_inputs())
    return float(loss), nnx.to_pure_dict(grads)


@pytest.mark.parametrize("policy", [p for p in gmdit.REMAT_POLICIES if p != "none"])
def test_every_policy_gives_the_loss_and_gradients_of_no_remat(plain, policy):
    loss, grads = _loss_and_grads(_model(policy), *_inputs())
    ref_loss, ref_grads = plain
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-6)
    grads = nnx.to_pure_dict(grads)
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads), strict=True):
        if "'key'" in str(path) and "'bias'" in str(path):  # softmax ignores a shift of the keys: zero gradient
            scale = np.abs(ref_grads["blocks"][0]["attn"]["query"]["bias"]).max()
            assert np.abs(g).max() < 1e-5 * scale and np.abs(r).max() < 1e-5 * scale, path
            continue
        assert np.abs(r).max() > 0, path  # every gradient is in play
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-6 * np.abs(r).max(), err_msg=str(path))


def _saved(policy: str, capsys) -> list[str]:
    """What the backward pass keeps of the forward, one line per residual as JAX prints them."""
    graphdef, params = nnx.split(_model(policy))
    x, tau, labels = _inputs()

    def loss(p):
        return _loss(nnx.merge(graphdef, p), x, tau, labels)

    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(loss, params)
    return [line for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_policies_keep_what_they_name(capsys):
    full, minimal, qkv, none = (_saved(p, capsys) for p in ("full", "minimal", "save_qkv_proj", "none"))
    named = {
        name
        for where in minimal
        for name in ("query", "key", "value", "attn_out", "mlp_hidden", "mlp_out")
        if f"named '{name}'" in where
    }
    assert named == {"query", "key", "value", "attn_out", "mlp_hidden", "mlp_out"}
    assert not [w for w in full if "named" in w]
    assert {n for w in qkv for n in ("query", "key", "value", "mlp_hidden") if f"named '{n}'" in w} == {
        "query",
        "key",
        "value",
    }
    assert len(full) < len(none)


def test_recomputed_share():
    config = load_config("imagenet_gmdit_k8")
    shares = {p: recomputed_forward_share(config.model, p) for p in gmdit.REMAT_POLICIES}
    assert shares["full"] == 1.0 and shares["none"] == 0.0
    # XL/2: attention scores and context are 4·T·D of 8·D² + 4·D·M + 4·T·D per token and block (~3.6 %)
    assert 0.02 < shares["minimal"] < 0.05
    assert shares["minimal_with_context"] < shares["minimal"] < shares["save_dot_except_mlp"]
    assert shares["save_dot_except_mlp"] < shares["save_qkv_proj"] < 1.0


def test_config_policy_and_the_older_bool():
    config = load_config("imagenet_gmdit_k8:tiny")
    assert remat_policy(config.model) == "none"
    config.model.update(remat=True, remat_policy="")  # the older spelling
    assert remat_policy(config.model) == "full"
    validate_config(config)
    config.model.remat_policy = "none"
    with pytest.raises(ValueError, match="model.remat must be False"):
        validate_config(config)
    config.model.remat_policy = "minimal"
    with pytest.raises(ValueError, match="model.remat must be False"):
        validate_config(config)
    config.model.remat = False
    validate_config(config)
    assert build_model(config.model, nnx.Rngs(0)).net.remat == "minimal"
    config.model.remat_policy = "most"
    with pytest.raises(ValueError, match="model.remat_policy must be one of"):
        validate_config(config)
    # a saved config of an older run: no remat_policy field, remat=True
    saved = ml_collections.ConfigDict(config.to_dict())
    del saved.model["remat_policy"]
    saved.model.remat = True
    assert build_model(saved.model, nnx.Rngs(0)).net.remat == "full"
    assert build_model(saved.model, nnx.Rngs(0), remat=False).net.remat == "none"
