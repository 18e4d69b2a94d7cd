"""The feature plumbing: batch-sharded calls over local devices equal one unsharded call, ``.npz`` files stream
row for row, per-chunk feature caches are reused and refreshed for another network."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gmflow_jax.evaluate import features


def test_sharded_network_on_two_devices_equals_the_module():
    code = textwrap.dedent(
        """
        import numpy as np, jax, jax.numpy as jnp
        from flax import nnx
        from gmflow_jax.evaluate.features import ShardedNetwork

        class Tiny(nnx.Module):
            name = "tiny"

            def __init__(self):
                self.conv = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))

            def __call__(self, images):
                h = self.conv(images.astype(jnp.float32) / 255.0)
                return {"pool": h.mean(axis=(1, 2)), "logits": h.max(axis=(1, 2))}

        assert jax.local_device_count() == 2
        module = Tiny()
        net = ShardedNetwork(module, batch_size=3)  # rounded up to 4: a multiple of the devices
        assert net.batch_size == 4 and net.name == "tiny"
        x = np.random.default_rng(0).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)  # a full and a padded batch
        got, want = net(x), module(x)
        for k in ("pool", "logits"):
            assert got[k].shape == want[k].shape and isinstance(got[k], np.ndarray)
            np.testing.assert_allclose(got[k], np.asarray(want[k]), rtol=1e-5, atol=1e-6)
        print("OK")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_npz_streams_row_for_row(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (23, 4, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=x, labels=np.arange(23))
    shape, batches = features.npz_array_batches(str(tmp_path / "s.npz"), batch=10)
    parts = list(batches)
    assert shape == x.shape and [len(p) for p in parts] == [10, 10, 3]
    np.testing.assert_array_equal(np.concatenate(parts), x)
    np.savez(tmp_path / "f.npz", arr_0=x.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        features.npz_array_batches(str(tmp_path / "f.npz"))


class Net:
    def __init__(self, name):
        self.name, self.resolution, self.calls = name, None, 0

    def __call__(self, images):
        self.calls += 1
        return {"pool": images.reshape(len(images), -1)[:, :4].astype(np.float32), "logits": np.zeros((len(images), 2))}


def test_cached_features_are_reused_and_refreshed_for_another_network(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    loads = []

    def images():
        loads.append(1)
        return x

    path = str(tmp_path / "chunk.npz")
    a = Net("a")
    first = features.cached_features(a, images, path, "chunk")
    assert first["count"] == 6 and first["saturation"] == pytest.approx(features.hsv_saturation(x))
    again = features.cached_features(a, images, path, "chunk")
    assert a.calls == 1 and len(loads) == 1  # neither the images nor the network were needed
    np.testing.assert_array_equal(again["pool"], first["pool"])
    b = Net("b")
    features.cached_features(b, images, path, "chunk")
    assert b.calls == 1 and len(loads) == 2

    np.savez(tmp_path / "samples.npz", arr_0=x)  # the ADM sample format, streamed
    streamed = features.npz_features(Net("a"), str(tmp_path / "samples.npz"), batch=4)
    np.testing.assert_array_equal(streamed["pool"], a(x)["pool"])
