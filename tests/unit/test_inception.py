"""The JAX FID Inception against pytorch-fid's own ``InceptionV3`` (unmodified), with random weights in a ``.pth`` file.

The reference stack is torch 2.13.0 (CPU) + torchvision 0.28.0 + pytorch-fid 0.3.0; ``tests/conftest.py`` says why
and how torchvision imports there (one submodule of fake-kernel registrations stood in for, no network code).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

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


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(pth path, pytorch-fid model, its outputs per image size) for uint8 images at 299 and 64 px."""
    fid, torchvision = _import_pytorch_fid()
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(_random_state_dict(torchvision), path)
    with pytest.MonkeyPatch.context() as m:  # pytorch-fid downloads its weights; ours come from the file
        m.setattr(fid, "load_state_dict_from_url", lambda *a, **k: torch.load(path, weights_only=True))
        model = fid.InceptionV3([fid.InceptionV3.DEFAULT_BLOCK_INDEX]).eval()
    fc = torch.load(path, weights_only=True)["fc.weight"]
    captured = {}
    model.blocks[2][6].branch1x1.register_forward_hook(lambda mod, inp, out: captured.update(spatial=out))
    rng = np.random.default_rng(0)
    outputs = {}
    for size in (299, 64):
        images = rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8)
        with torch.no_grad():
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # pytorch-fid's input: [0, 1], NCHW
            pool = model(x)[0][:, :, 0, 0]
            spatial = captured["spatial"][:, :7].permute(0, 2, 3, 1).reshape(len(images), -1)  # (H, W, C) as ADM
            logits = pool @ fc.T
        outputs[size] = images, {"pool": pool.numpy(), "spatial": spatial.numpy(), "logits": logits.numpy()}
    return path, outputs


@pytest.fixture(scope="module")
def jax_net(reference):
    return InceptionV3.from_pytorch_fid(reference[0])


@pytest.mark.parametrize("size", [299, 64])
def test_matches_pytorch_fid(reference, jax_net, size):
    images, want = reference[1][size]
    got = jax.jit(lambda x: jax_net(x))(images)
    assert {k: v.shape for k, v in got.items()} == {"pool": (3, 2048), "spatial": (3, 2023), "logits": (3, 1008)}
    # relative to the largest magnitude of each output (elementwise relative error is meaningless at ReLU zeros)
    for key, tol in (("pool", 1e-4), ("logits", 1e-4), ("spatial", 1e-3)):
        err = np.max(np.abs(np.asarray(got[key]) - want[key])) / np.max(np.abs(want[key]))
        assert err < tol, (key, size, err)
        assert np.std(want[key]) > 1e-3 * np.max(np.abs(want[key])), key  # not a degenerate (constant) output


@pytest.mark.parametrize("size_in", [8, 64, 256, 299, 512, 1000])
def test_resize_is_pytorch_bilinear(size_in):
    x = np.random.default_rng(size_in).random((1, 2, size_in, size_in), dtype=np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x), size=(299, 299), mode="bilinear", align_corners=False)
    m = resize_matrix(size_in, 299)
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
