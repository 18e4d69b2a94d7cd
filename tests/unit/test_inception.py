"""The JAX FID Inception against pytorch-fid's own ``InceptionV3`` (unmodified), with random weights in a ``.pth`` file;
its ``"tf"`` input path against TensorFlow's ``ResizeBilinear`` and normalisation (the ADM evaluator's).

The reference stack is torch 2.13.0 (CPU) + torchvision 0.28.0 + pytorch-fid 0.3.0; ``tests/conftest.py`` says why
and how torchvision imports there (one submodule of fake-kernel registrations stood in for, no network code).
TensorFlow (requirements-tf.txt) runs in a subprocess, ``tf_input_path.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from gmflow_jax.evaluate.inception import InceptionV3, resize_matrix

torch = pytest.importorskip("torch")


def _import_pytorch_fid():
    fid = pytest.importorskip("pytorch_fid.inception")
    import torchvision

    return fid, torchvision


def _random_state_dict(torchvision, seed: int = 0) -> dict:
    """Random weights for every tensor of the FID Inception (torchvision's InceptionV3 with 1008 classes has the same
    names and shapes as pytorch-fid's patched one): He-scaled convolutions, BatchNorm statistics around 1, so the
    activations stay O(1) through the 94 layers."""
    g = torch.Generator().manual_seed(seed)
    names = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    out = {}
    for key, t in names.items():
        if key.endswith("num_batches_tracked"):
            out[key] = t
        elif key.endswith("conv.weight"):
            fan_in = t[0].numel()
            out[key] = torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif key.endswith(("bn.weight", "bn.running_var")):
            out[key] = 0.5 + torch.rand(t.shape, generator=g)
        elif key.endswith(("bn.bias", "bn.running_mean")):
            out[key] = 0.1 * torch.randn(t.shape, generator=g)
        else:  # fc.weight, fc.bias
            out[key] = 0.05 * torch.randn(t.shape, generator=g)
    return out


def _pytorch_fid_outputs(model, fc, x) -> dict[str, np.ndarray]:
    """pool, spatial (ADM's (H, W, C) order) and logits of pytorch-fid's ``model`` on NCHW float input ``x``."""
    captured = {}
    hook = model.blocks[2][6].branch1x1.register_forward_hook(lambda mod, inp, out: captured.update(spatial=out))
    with torch.no_grad():
        pool = model(x)[0][:, :, 0, 0]
        spatial = captured["spatial"][:, :7].permute(0, 2, 3, 1).reshape(len(x), -1)
    hook.remove()
    return {"pool": pool.numpy(), "spatial": spatial.numpy(), "logits": (pool @ fc.T).numpy()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(pth path, pytorch-fid model, its outputs per image size) for uint8 images at 299 and 64 px, and the same
    module with its own resize and normalisation switched off (``raw``, fed TensorFlow's input path below)."""
    fid, torchvision = _import_pytorch_fid()
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(_random_state_dict(torchvision), path)
    with pytest.MonkeyPatch.context() as m:  # pytorch-fid downloads its weights; ours come from the file
        m.setattr(fid, "load_state_dict_from_url", lambda *a, **k: torch.load(path, weights_only=True))
        model = fid.InceptionV3([fid.InceptionV3.DEFAULT_BLOCK_INDEX]).eval()
        raw = fid.InceptionV3([fid.InceptionV3.DEFAULT_BLOCK_INDEX], resize_input=False, normalize_input=False)
    fc = torch.load(path, weights_only=True)["fc.weight"]
    rng = np.random.default_rng(0)
    outputs = {}
    for size in (299, 64):
        images = rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # pytorch-fid's input: [0, 1], NCHW
        outputs[size] = images, _pytorch_fid_outputs(model, fc, x)
    return path, outputs, lambda x: _pytorch_fid_outputs(raw.eval(), fc, x)


@pytest.fixture(scope="module")
def jax_net(reference):
    return InceptionV3.from_pytorch_fid(reference[0], input_transform="pytorch-fid")


def _relative_errors(got: dict, want: dict) -> dict[str, float]:
    """Max error of each output relative to its largest magnitude (elementwise relative error is meaningless at
    ReLU zeros); asserts the reference output is not degenerate (constant)."""
    out = {}
    for key in ("pool", "logits", "spatial"):
        assert np.std(want[key]) > 1e-3 * np.max(np.abs(want[key])), key
        out[key] = float(np.max(np.abs(np.asarray(got[key]) - want[key])) / np.max(np.abs(want[key])))
    return out


@pytest.fixture(scope="module")
def jax_features(jax_net):
    """The network proper (after the input path), jitted once for every test's (3, 299, 299, 3) input."""
    return jax.jit(lambda x: jax_net.features(x))


@pytest.mark.parametrize("size", [299, 64])
def test_matches_pytorch_fid(reference, jax_net, jax_features, size):
    images, want = reference[1][size]
    # the whole call at 64 px (one compilation); at 299 the input path and the network proper
    got = jax.jit(lambda x: jax_net(x))(images) if size == 64 else jax_features(jax.jit(jax_net.preprocess)(images))
    assert {k: v.shape for k, v in got.items()} == {"pool": (3, 2048), "spatial": (3, 2023), "logits": (3, 1008)}
    err = _relative_errors(got, want)
    assert err["pool"] < 1e-4 and err["logits"] < 1e-4 and err["spatial"] < 1e-3, (size, err)


TF_SIZES = ((256, 256), (299, 299), (64, 64), (173, 211))  # ADM's 256, the identity, an upscale, odd and non-square


@pytest.fixture(scope="module")
def tf_input_path(tmp_path_factory):
    """{(H, W): (uint8 images (3, H, W, 3), TensorFlow's resize + normalisation of them, float32 (3, 299, 299, 3))}."""
    site = os.path.join(sys.prefix, "tf-reference")
    if not os.path.isdir(os.path.join(site, "tensorflow")):
        pytest.skip(f"no TensorFlow in {site}: make install-test installs requirements-tf.txt there")
    folder = tmp_path_factory.mktemp("tf")
    rng = np.random.default_rng(1)
    images = {f"{h}x{w}": rng.integers(0, 256, (3, h, w, 3), dtype=np.uint8) for h, w in TF_SIZES}
    np.savez(folder / "in.npz", matrix_sizes=np.asarray(MATRIX_SIZES), **images)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")])))
    env.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    script = os.path.join(os.path.dirname(__file__), "tf_input_path.py")
    result = subprocess.run([sys.executable, script, folder / "in.npz", folder / "out.npz"], env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(folder / "out.npz") as f:
        assert str(f["tf_version"]) == "2.21.0"  # requirements-tf.txt's
        out = {(h, w): (images[f"{h}x{w}"], f[f"{h}x{w}"]) for h, w in TF_SIZES}
        return out | {n: f[f"matrix_{n}"] for n in MATRIX_SIZES}


MATRIX_SIZES = (8, 64, 173, 211, 256, 299, 512, 1000)


@pytest.mark.parametrize("size_in", MATRIX_SIZES)
def test_resize_matrix_is_tensorflows(tf_input_path, size_in):
    """TF's float32 positions (``i · fl(in/out)``) and weights, to the last bit (float64 positions differ by up to
    6e-5 at 1000 px, PyTorch's by up to 1)."""
    np.testing.assert_array_equal(resize_matrix(size_in, 299, "tf"), tf_input_path[size_in])


@pytest.mark.parametrize("size", TF_SIZES)
def test_tf_input_path_is_tensorflows(tf_input_path, size):
    images, want = tf_input_path[size]
    net = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0), input_transform="tf"))
    got = np.asarray(jax.jit(net.preprocess)(images))
    assert got.shape == want.shape == (3, 299, 299, 3)
    # the same float32 weights; float32 rounding of a blend done in another order (measured: ≤ 3.6e-7)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    torch_way = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0), input_transform="pytorch-fid"))
    other = np.asarray(jax.jit(torch_way.preprocess)(images))
    # the test tells the two pipelines apart: 255 → 1.0 vs 0.992, and (but at 299) a shifted resize
    assert np.max(np.abs(other - want)) > 5e-3


@pytest.fixture(scope="module")
def tf_net(reference):
    net = InceptionV3.from_pytorch_fid(reference[0])  # "tf" by default
    assert net.input_transform == "tf" and net.name == "inception-v3-fid:pt_inception-random.pth:tf"
    return net


@pytest.mark.parametrize("size", TF_SIZES)
def test_tf_transform_matches_tensorflow_then_pytorch_fid(reference, tf_input_path, tf_net, jax_features, size):
    """The ``"tf"`` network's features = pytorch-fid's module (resize and normalisation off) on TensorFlow's input."""
    images, tf_input = tf_input_path[size]
    want = reference[2](torch.from_numpy(tf_input).permute(0, 3, 1, 2))
    # the whole call at ADM's 256 px (one compilation); else the input path and the network proper (the same weights)
    if size == (256, 256):
        got = jax.jit(lambda x: tf_net(x))(images)
    else:
        got = jax_features(jax.jit(tf_net.preprocess)(images))
    err = _relative_errors(got, want)
    print(f"{size}: relative errors {err}")
    assert err["pool"] <= 1e-4 and err["logits"] <= 1e-4 and err["spatial"] <= 1e-3, (size, err)


@pytest.mark.parametrize("size_in", [8, 64, 256, 299, 512, 1000])
def test_resize_is_pytorch_bilinear(size_in):
    x = np.random.default_rng(size_in).random((1, 2, size_in, size_in), dtype=np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x), size=(299, 299), mode="bilinear", align_corners=False)
    m = resize_matrix(size_in, 299, "pytorch-fid")
    got = m.astype(np.float64) @ x.astype(np.float64) @ m.T.astype(np.float64)
    # the same float32 positions and weights; torch also blends in float32 (differences of a few 1e-7; positions in
    # float64 would give 2e-5 at 512 px, align_corners=True or an antialiasing filter more than 0.1)
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=5e-6)


def test_wrong_weights_are_named(reference, tmp_path):
    state = torch.load(reference[0], weights_only=True)
    bad = dict(state)
    bad["Mixed_6d.branch1x1.conv.weight"] = bad["Mixed_6d.branch1x1.conv.weight"][:100]
    del bad["Mixed_7c.branch_pool.bn.running_var"]
    bad["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as e:
        InceptionV3.from_pytorch_fid(tmp_path / "bad.pth")
    msg = str(e.value)
    assert "bad.pth" in msg and "\n" not in msg
    assert "'Mixed_6d.branch1x1.conv.weight' has shape (100, 768, 1, 1), expected (192, 768, 1, 1)" in msg
    assert "missing tensor 'Mixed_7c.branch_pool.bn.running_var' (192,)" in msg
    assert "unexpected tensor 'AuxLogits.fc.weight' (1000, 768)" in msg


def test_images_must_be_uint8_rgb(jax_net):
    with pytest.raises(ValueError, match="uint8"):
        jax_net(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(1, 64, 64, 1\)"):
        jax_net(np.zeros((1, 64, 64, 1), np.uint8))
