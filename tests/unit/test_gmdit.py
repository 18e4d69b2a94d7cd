"""GM-DiT and SpectrumMLP: parity with diffusers' DiT, checkpoint conversion, shapes, dtypes, init."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gmflow_jax import losses
from gmflow_jax.gm import GM, Gaussian
from gmflow_jax.models import GMDiT, SpectrumMLP, gmdit
from gmflow_jax.models.convert import (
    convert_gmdit_state_dict,
    load_gmdit_state_dict,
    load_spectrum_state_dict,
)
from gmflow_jax.models.gmdit import LOGICAL_AXES
from gmflow_jax.models.spectrum import spectrum_features

K, C, NUM_CLASSES, SIZE, PATCH, HEADS, HEAD_DIM, DEPTH = 2, 4, 10, 8, 2, 2, 16, 2
HIDDEN = HEADS * HEAD_DIM
LOGSTD_INNER = 64


def _small_model(**kwargs) -> GMDiT:
    cfg = dict(
        input_size=SIZE,
        in_channels=C,
        num_gaussians=K,
        num_classes=NUM_CLASSES,
        patch_size=PATCH,
        hidden_size=HIDDEN,
        depth=DEPTH,
        num_heads=HEADS,
        logstd_inner_dim=LOGSTD_INNER,
    )
    cfg.update(kwargs)
    return GMDiT(rngs=nnx.Rngs(0), **cfg)


def _randomize(model: nnx.Module, seed: int, scale: float = 0.1) -> None:
    """Adds N(0, scale²) noise to every parameter (zero-initialised ones included)."""
    rng = np.random.RandomState(seed)
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda a: a + scale * rng.randn(*a.shape).astype(np.float32), state))


@nnx.jit
def _gm(model: GMDiT, x, tau, labels) -> GM:
    return model(x, tau, labels)


@nnx.jit
def _raw(model: GMDiT, x, tau, labels) -> jax.Array:
    return model.raw_output(x, tau, labels)


def _inputs(n: int = 3, size: int = SIZE, channels: int = C):
    x = np.random.RandomState(0).randn(n, size, size, channels).astype(np.float32)
    tau = np.array([0.5, 250.3, 999.0, 731.7][:n], np.float32)
    labels = np.array([0, 3, NUM_CLASSES, 7][:n], np.int32)  # includes the null class
    return x, tau, labels


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# --- parity with diffusers' DiTTransformer2DModel --------------------------------------


@pytest.fixture(scope="module")
def torch_dit():
    return make_torch_dit()


def make_torch_dit():
    """diffusers' DiT (random weights, per-block embeddings tied) and a torch logstd head."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=C,
        out_channels=K * (C + 1),
        num_layers=DEPTH,
        sample_size=SIZE,
        patch_size=PATCH,
        num_embeds_ada_norm=NUM_CLASSES,
    ).eval()
    logstd = torch.nn.Sequential(
        torch.nn.SiLU(), torch.nn.Linear(HIDDEN, LOGSTD_INNER), torch.nn.SiLU(), torch.nn.Linear(LOGSTD_INNER, 1)
    )
    with torch.no_grad():
        for p in list(dit.parameters()) + list(logstd.parameters()):
            p.add_(0.1 * torch.randn_like(p))
        emb0 = dit.transformer_blocks[0].norm1.emb.state_dict()
        for block in dit.transformer_blocks[1:]:  # GM-DiT shares one conditioning embedding
            block.norm1.emb.load_state_dict(emb0)
    return torch, dit, logstd


def _torch_reference(torch_dit, freq_shift: float):
    torch, dit, logstd = torch_dit
    for block in dit.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = freq_shift
    x, tau, labels = _inputs()
    with torch.no_grad():
        args = torch.from_numpy(tau), torch.from_numpy(labels).long()
        raw = dit(torch.from_numpy(x.transpose(0, 3, 1, 2)), timestep=args[0], class_labels=args[1]).sample
        c = dit.transformer_blocks[0].norm1.emb(*args, hidden_dtype=torch.float32)
        ref_logstd = logstd(c)
    state = dict(dit.state_dict())
    state.update({f"gm_out.logstd_layers.{k}": v for k, v in logstd.state_dict().items()})
    for block in dit.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 1
    return state, raw.numpy().transpose(0, 2, 3, 1), ref_logstd.numpy()


@pytest.mark.parametrize("freq_shift", [1.0, 0.0])
def test_parity_with_diffusers_dit(torch_dit, freq_shift):
    """Pins patch/position embedding, time embedding (both shifts), modulation order, unpatchify, logstd head."""
    state, ref_raw, ref_logstd = _torch_reference(torch_dit, freq_shift)
    model = _small_model(freq_shift=freq_shift)
    load_gmdit_state_dict(model, state)
    x, tau, labels = _inputs()
    raw = _raw(model, x, tau, labels)
    err = _rel_err(raw, ref_raw)
    print(f"freq_shift={freq_shift}: max relative error of the raw head output {err:.2e}")
    assert err < 1e-4

    gm = _gm(model, x, tau, labels)
    n = x.shape[0]
    ref_means = ref_raw[..., : K * C].reshape(n, SIZE, SIZE, K, C)
    logits = ref_raw[..., K * C :]
    ref_logweights = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert _rel_err(gm.means, ref_means) < 1e-4
    np.testing.assert_allclose(gm.logweights, ref_logweights, atol=1e-4 * np.abs(ref_logweights).max())
    np.testing.assert_allclose(gm.logstds.reshape(n, 1), ref_logstd, rtol=1e-4, atol=1e-5)

    # the same weights with the other frequency shift must not match: the test is sensitive to it
    other = _small_model(freq_shift=1.0 - freq_shift)
    load_gmdit_state_dict(other, state)
    assert _rel_err(_raw(other, x, tau, labels), ref_raw) > 1e-3


def test_diffusers_stock_dit_uses_frequency_shift_one(torch_dit):
    _, dit, _ = torch_dit
    assert dit.transformer_blocks[0].norm1.emb.time_proj.downscale_freq_shift == 1
    assert dit.transformer_blocks[0].norm3.eps == 1e-5  # MLP-branch LayerNorm eps (diffusers' norm_eps)
    assert dit.transformer_blocks[0].norm1.norm.eps == 1e-6


def _gmflow_layout(stock: dict, v2: bool = False) -> dict:
    """Rewrites a stock-diffusers state dict into GMFlow's layout (shared ``emb``; V2 split head)."""
    out = {}
    for name, value in stock.items():
        if ".norm1.emb." in name:
            if name.startswith("transformer_blocks.0."):
                out["emb." + name.split(".norm1.emb.")[1]] = value
            continue
        out[name] = value
    if v2:
        pp = PATCH * PATCH
        for suffix in ("weight", "bias"):
            w = out.pop(f"proj_out_2.{suffix}").numpy()
            w = w.reshape((pp, K * (C + 1)) + w.shape[1:])
            out[f"proj_out_means.{suffix}"] = w[:, : K * C].reshape((-1,) + w.shape[2:])
            out[f"proj_out_logweights.{suffix}"] = w[:, K * C :].reshape((-1,) + w.shape[2:])
        for name in [k for k in out if k.startswith("gm_out.logstd_layers.")]:
            out[name.replace("gm_out.logstd_layers.", "proj_out_logstds.")] = out.pop(name)
    return out


@pytest.mark.parametrize("v2", [False, True])
def test_gmflow_checkpoint_layouts_convert_identically(torch_dit, v2):
    stock, _, _ = _torch_reference(torch_dit, 0.0)
    model = _small_model()
    ref = convert_gmdit_state_dict(stock, model)
    got = convert_gmdit_state_dict(
        {"transformer." + k: v for k, v in _gmflow_layout(stock, v2).items()}, model, prefix="transformer."
    )
    flat_ref = dict(nnx.traversals.flatten_mapping(ref))
    flat_got = dict(nnx.traversals.flatten_mapping(got))
    assert flat_ref.keys() == flat_got.keys()
    for path in flat_ref:
        np.testing.assert_array_equal(flat_got[path], flat_ref[path], err_msg=str(path))


def test_conversion_errors(torch_dit):
    stock, _, _ = _torch_reference(torch_dit, 0.0)
    model = _small_model()
    untied = dict(stock)
    name = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"
    untied[name] = untied[name] + 1.0
    with pytest.raises(ValueError, match="shares one conditioning embedding"):
        convert_gmdit_state_dict(untied, model)
    with pytest.raises(ValueError, match="does not use"):
        convert_gmdit_state_dict({**stock, "extra.weight": np.zeros(3)}, model)
    no_logstd = {k: v for k, v in stock.items() if "logstd" not in k}
    with pytest.raises(KeyError, match="logstd_fc1"):
        convert_gmdit_state_dict(no_logstd, model)
    convert_gmdit_state_dict(no_logstd, model, strict=False)  # keeps the model's logstd head
    with pytest.raises(ValueError, match="shape"):
        convert_gmdit_state_dict(stock, _small_model(num_gaussians=3))


# --- shapes, dtypes, axis names, init ---------------------------------------------------


@pytest.mark.parametrize(
    "size,patch,k,c,hidden,heads",
    [(8, 2, 1, 4, 32, 2), (16, 4, 3, 3, 48, 3), (16, 8, 8, 4, 32, 4), (12, 2, 2, 1, 16, 1)],
)
def test_output_shapes_and_dtypes(size, patch, k, c, hidden, heads):
    model = GMDiT(
        input_size=size,
        in_channels=c,
        num_gaussians=k,
        num_classes=5,
        patch_size=patch,
        hidden_size=hidden,
        depth=1,
        num_heads=heads,
        logstd_inner_dim=8,
        rngs=nnx.Rngs(1),
    )
    _randomize(model, 1)
    x = jnp.ones((2, size, size, c))
    gm = _gm(model, x, jnp.array([10.0, 900.0]), jnp.array([0, 5]))
    assert gm.means.shape == (2, size, size, k, c)
    assert gm.logweights.shape == (2, size, size, k)
    assert gm.logstds.shape == (2, 1, 1, 1, 1)
    assert all(a.dtype == jnp.float32 for a in gm)
    np.testing.assert_allclose(jax.nn.logsumexp(gm.logweights, axis=-1), 0.0, atol=1e-5)


@pytest.mark.parametrize("name,params", [("S/2", 33), ("B/4", 130), ("L/8", 458), ("XL/2", 675)])
def test_standard_sizes(name, params):
    """Abstract construction of the DiT sizes; parameter counts (millions) near DiT's, at K=1."""
    kw = dict(input_size=32, in_channels=4, num_gaussians=1, num_classes=1000, logstd_inner_dim=1)
    model = nnx.eval_shape(lambda: GMDiT.from_name(name, rngs=nnx.Rngs(0), **kw))
    count = sum(math.prod(a.shape) for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert abs(count / 1e6 - params) < 0.02 * params
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, 32, 32, 4), jnp.float32)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, jnp.zeros((2,)), jnp.zeros((2,), jnp.int32)), state, x)
    assert out.means.shape == (2, 32, 32, 1, 4)
    with pytest.raises(ValueError, match="model name"):
        GMDiT.from_name("XXL/2", rngs=nnx.Rngs(0))


def test_bfloat16_compute_gives_float32_outputs_close_to_float32():
    f32, bf16 = _small_model(), _small_model(dtype=jnp.bfloat16)
    _randomize(f32, 2)
    nnx.update(bf16, nnx.state(f32, nnx.Param))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    x, tau, labels = _inputs()
    a, b = _gm(f32, x, tau, labels), _gm(bf16, x, tau, labels)
    assert all(t.dtype == jnp.float32 for t in b)
    assert _rel_err(b.means, a.means) < 3e-2
    np.testing.assert_allclose(b.logweights, a.logweights, atol=5e-2)
    np.testing.assert_allclose(b.logstds, a.logstds, atol=5e-2)


def test_every_param_has_logical_axis_names():
    model = _small_model()
    spectrum = SpectrumMLP(rngs=nnx.Rngs(0))
    for m in (model, spectrum):
        n = 0
        for path, var in nnx.iter_graph(m):
            if isinstance(var, nnx.Param):
                names = var.get_metadata().get("out_sharding")
                assert names is not None and len(names) == var.get_value().ndim, path
                assert all(a is None or a in LOGICAL_AXES for a in names), (path, names)
                n += 1
        assert n > 0
    rules = [("embed", "fsdp"), ("mlp", None), ("heads", None), ("vocab", None)]
    with nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert tuple(specs["blocks"][0]["fc1"]["kernel"].get_value()) == ("fsdp", None)
    assert tuple(specs["class_embed"]["embedding"].get_value()) == (None, "fsdp")


def test_initialisation():
    model = _small_model()
    x, tau, labels = _inputs()
    gm = _gm(model, x, tau, labels)
    np.testing.assert_array_equal(gm.logstds, 0.0)  # zero last logstd layer
    for block in model.blocks:
        np.testing.assert_array_equal(block.adaln.kernel[...], 0.0)
    np.testing.assert_array_equal(model.final_adaln.kernel[...], 0.0)
    assert np.abs(model.head.kernel[...]).max() > 0  # the final linear stays xavier (method.md §8)
    fan_in, fan_out = model.patch_embed.kernel[...].shape
    assert np.abs(model.patch_embed.kernel[...]).max() <= math.sqrt(6.0 / (fan_in + fan_out))
    assert 0.015 < float(jnp.std(model.class_embed.embedding[...])) < 0.025
    assert model.class_embed.embedding[...].shape == (NUM_CLASSES + 1, HIDDEN)


def test_remat_gives_the_same_gradients():
    plain, remat = _small_model(), _small_model(remat=True)
    _randomize(plain, 3)
    nnx.update(remat, nnx.state(plain, nnx.Param))
    x, tau, labels = _inputs()

    def loss(m):
        gm = m(x, tau, labels)
        return jnp.mean(gm.means**2) + jnp.mean(gm.logweights) + jnp.mean(gm.logstds)

    grad = nnx.jit(nnx.grad(loss))
    g1, g2 = jax.tree.leaves(grad(plain)), jax.tree.leaves(grad(remat))
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_residual_barrier_backward_is_the_identity():
    """The residual-stream barrier's cotangent is the incoming one, bit for bit, for finite values."""
    rng = np.random.default_rng(0)
    g = (rng.standard_normal((4, 5, 6)) * 10.0 ** rng.integers(-30, 38, (4, 5, 6))).astype(np.float32)
    g[0, 0, :3] = [0.0, -0.0, np.finfo(np.float32).max]
    x = jnp.zeros_like(g)
    out, vjp = jax.vjp(gmdit.residual_barrier, x)
    np.testing.assert_array_equal(out, x)
    (back,) = jax.jit(vjp)(jnp.asarray(g))
    np.testing.assert_array_equal(np.asarray(back).view(np.uint32), g.view(np.uint32))


def _without_barrier(monkeypatch):
    monkeypatch.setattr(gmdit, "residual_barrier", lambda x: x)


@pytest.mark.parametrize("remat", [False, True])
def test_residual_barrier_does_not_change_gradients(monkeypatch, remat):
    model = _small_model(depth=3, remat=remat)
    _randomize(model, 4)
    x, tau, labels = _inputs()

    def loss(m):
        gm = m(x, tau, labels)
        return jnp.mean(gm.means**2) + jnp.mean(gm.logweights) + jnp.mean(gm.logstds)

    with_barrier = nnx.to_pure_dict(nnx.grad(loss)(model))
    _without_barrier(monkeypatch)
    plain = nnx.to_pure_dict(nnx.grad(loss)(model))
    assert jax.tree.structure(with_barrier) == jax.tree.structure(plain)
    for a, b in zip(jax.tree.leaves(with_barrier), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _widest_backward_fusion(depth: int) -> int:
    """Operands of the largest fusion in the compiled gradient of a depth-``depth`` GM-DiT (CPU)."""
    graphdef, params = nnx.split(_small_model(depth=depth))
    x, tau, labels = _inputs()

    def loss(p):
        gm = nnx.merge(graphdef, p)(x, tau, labels)
        return jnp.sum(gm.means) + jnp.sum(gm.logweights)

    entry = jax.jit(jax.grad(loss)).lower(params).compile().as_text().split("ENTRY")[1]
    return max(len(re.findall(r"%[A-Za-z_]", line)) - 1 for line in entry.splitlines() if " fusion(" in line)


def test_backward_fusions_do_not_grow_with_depth(monkeypatch):
    """XLA:CPU computes the residual stream's cotangent once per block (docs/performance.md): without
    the barrier, its fusions absorb the whole chain of later blocks and grow with depth."""
    if jax.default_backend() != "cpu":
        pytest.skip("the fusion behaviour is XLA:CPU's")
    shallow, deep = _widest_backward_fusion(2), _widest_backward_fusion(6)
    assert deep == shallow, f"largest backward fusion: {shallow} operands at depth 2, {deep} at depth 6"
    _without_barrier(monkeypatch)
    shallow, deep = _widest_backward_fusion(2), _widest_backward_fusion(6)
    assert deep > shallow + 10, (
        f"without the barrier the largest fusion has {shallow} operands at depth 2 and {deep} at depth 6: "
        "XLA no longer duplicates the cotangent chain, so models.gmdit.residual_barrier may be unnecessary"
    )


def test_input_validation():
    model = _small_model()
    x, tau, labels = _inputs()
    with pytest.raises(ValueError, match="x must have shape"):
        model(x[..., :3], tau, labels)
    with pytest.raises(ValueError, match="tau"):
        model(x, tau[:2], labels)
    with pytest.raises(ValueError, match="labels"):
        model(x, tau, labels.astype(np.float32))
    with pytest.raises(ValueError, match="divisible"):
        _small_model(input_size=9)
    with pytest.raises(ValueError, match="compute dtype"):
        _small_model(dtype=jnp.float16)


# --- SpectrumMLP --------------------------------------------------------------------------


def _gaussian(n=3, h=6, w=8, c=4, per_pixel_var=True) -> Gaussian:
    rng = np.random.RandomState(5)
    mean = rng.randn(n, h, w, c).astype(np.float32) * rng.uniform(0.5, 2.0, (n, 1, 1, 1)).astype(np.float32)
    shape = (n, h, w, 1) if per_pixel_var else (n, 1, 1, 1)
    return Gaussian(mean, rng.uniform(0.1, 2.0, shape).astype(np.float32))


@pytest.mark.parametrize("per_pixel_var", [True, False])
def test_spectrum_features_match_numpy(per_pixel_var):
    g = _gaussian(per_pixel_var=per_pixel_var)
    mean, var = np.asarray(g.mean, np.float64), np.asarray(g.var, np.float64)
    n = mean.shape[0]
    expected_var = np.broadcast_to(var, mean.shape[:-1] + (1,)).reshape(n, -1).mean(1)
    flat = mean.reshape(n, -1, mean.shape[-1])
    expected_mean = (((flat - flat.mean(1, keepdims=True)) ** 2).sum(1) / (flat.shape[1] - 1)).mean(-1)
    np.testing.assert_allclose(spectrum_features(g), np.stack([expected_var, expected_mean], -1), rtol=1e-5)
    with pytest.raises(ValueError, match="var"):
        spectrum_features(Gaussian(g.mean, np.ones((3, 6, 8, 4))))


def _np_spectrum(layers, feats, h, w, c=4, hb=32, wb=32):
    """NumPy reference of method.md §4 from torch-layout weights [(W (out, in), b), ...]."""
    x = feats.astype(np.float64)
    for i, (wt, b) in enumerate(layers):
        x = x @ wt.T.astype(np.float64) + b
        if i < len(layers) - 1:
            x = x / (1.0 + np.exp(-x))
    spec = x.reshape(-1, c, hb, wb)
    rows = list(range(math.ceil(h / 2))) + list(range(hb - h // 2, hb))
    cols = list(range(math.ceil(w / 2))) + list(range(wb - w // 2, wb))
    spec = spec[:, :, rows][:, :, :, cols].reshape(-1, c, h * w)
    spec = spec - spec.max(-1, keepdims=True)
    logp = spec - np.log(np.exp(spec).sum(-1, keepdims=True)) + math.log(h * w)
    return logp.reshape(-1, c, h, w).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("hw", [(6, 8), (7, 5), (32, 32)])
def test_spectrum_mlp_conversion_and_normalisation(hw):
    h, w = hw
    rng = np.random.RandomState(7)
    widths = [2, 64, 8, 4 * 32 * 32]
    layers = [
        (rng.randn(o, i).astype(np.float32) * 0.5, rng.randn(o).astype(np.float32))
        for i, o in zip(widths[:-1], widths[1:], strict=True)
    ]
    state = {}
    for j, (wt, b) in enumerate(layers):
        state[f"mlp.{2 * j}.weight"], state[f"mlp.{2 * j}.bias"] = wt, b
    model = SpectrumMLP(rngs=nnx.Rngs(0))
    load_spectrum_state_dict(model, state)
    g = _gaussian(h=h, w=w)
    log_spec = model(g)
    assert log_spec.shape == (3, h, w, 4) and log_spec.dtype == jnp.float32
    np.testing.assert_allclose(jnp.mean(jnp.exp(log_spec), axis=(1, 2)), 1.0, rtol=1e-5)
    expected = _np_spectrum(layers, np.asarray(spectrum_features(g)), h, w)
    np.testing.assert_allclose(log_spec, expected, rtol=1e-4, atol=1e-4)


def test_spectrum_mlp_init_and_use_as_spectrum_fn():
    model = SpectrumMLP(rngs=nnx.Rngs(0))
    g = _gaussian(h=4, w=4)
    np.testing.assert_allclose(model(g), 0.0, atol=1e-6)  # zero last layer: flat spectrum
    with pytest.raises(ValueError, match="channels"):
        model(Gaussian(np.zeros((1, 4, 4, 3)), np.ones((1, 1, 1, 1))))

    rng = np.random.RandomState(0)
    n, hw, k = 2, 4, 2
    gm_u = GM(
        jnp.asarray(rng.randn(n, hw, hw, k, 4), jnp.float32),
        jax.nn.log_softmax(jnp.asarray(rng.randn(n, hw, hw, k), jnp.float32)),
        jnp.full((n, 1, 1, 1, 1), -0.5),
    )
    x0 = jnp.asarray(rng.randn(n, hw, hw, 4), jnp.float32)
    x_t = 0.5 * x0 + 0.5 * jnp.asarray(rng.randn(n, hw, hw, 4), jnp.float32)

    def loss(m):
        return jnp.mean(losses.spectral_loss(gm_u, x_t, x0, jnp.full((n,), 0.5), m))

    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    assert np.isfinite(float(value))
    assert float(jnp.abs(grads["layers"][2]["kernel"].get_value()).max()) > 0
