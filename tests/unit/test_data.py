"""TFDS builders (digits, checkerboard) and the grain pipeline: determinism, epochs, resume, sharding."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from scipy import stats

from gmflow_jax.data import (
    KNOWN_DATASETS,
    WHITE_SQUARES,
    checkerboard_cell,
    checkerboard_inside,
    checkerboard_sample,
    get_builder,
    load_source,
    make_iterator,
)
from gmflow_jax.data.builders import Checkerboard


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def digits(data_dir):
    return load_source("digits", data_dir)


def _range_source(n: int) -> list[dict[str, np.ndarray]]:
    """In-memory source whose record i has image [i, i] and label i % 10."""
    return [{"image": np.full((2,), i, np.float32), "label": i % 10} for i in range(n)]


def _ids(batch) -> np.ndarray:
    return np.asarray(batch["image"])[:, 0].astype(np.int64)


def _take(it, k: int) -> list[dict[str, np.ndarray]]:
    return [{key: np.asarray(v) for key, v in next(it).items()} for _ in range(k)]


def _assert_same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


# --- builders ------------------------------------------------------------------------


def test_digits_builds_once_and_matches_sklearn(data_dir, digits):
    from sklearn.datasets import load_digits

    assert len(digits) == 1797
    records = digits.__getitems__(list(range(len(digits))))
    images = np.stack([r["image"] for r in records])
    labels = np.array([r["label"] for r in records])
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.float32
    assert images.min() == -1.0 and images.max() == 1.0
    assert set(labels.tolist()) == set(range(10))
    ref = load_digits()
    np.testing.assert_allclose(images[..., 0], ref.images / 16.0 * 2.0 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(labels, ref.target)

    files = [f for f in os.scandir(get_builder("digits", data_dir).data_dir) if "array_record" in f.name]
    assert files, "no array_record file written"
    mtimes = {f.path: f.stat().st_mtime_ns for f in files}
    again = load_source("digits", data_dir)  # second call: reuses the built files
    assert len(again) == 1797
    assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes


def test_unknown_dataset_or_missing_dir_raises(data_dir):
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'.*checkerboard.*digits"):
        load_source("mnist", data_dir)
    with pytest.raises(ValueError, match="data_dir"):
        load_source("digits", None)
    with pytest.raises(ValueError, match="data_dir"):
        make_iterator("digits", global_batch_size=8, seed=0)
    assert "checkerboard" in KNOWN_DATASETS and "digits" in KNOWN_DATASETS


def test_checkerboard_parity_and_default_config(tmp_path):
    white = [[1, 1], [-1, -1], [3, 3], [-3, -3], [3, -1], [-1, 3], [0.0, 0.0], [-4.0, -4.0]]
    black = [[-1, 1], [1, -1], [3, -3], [0.5, 2.5], [-0.1, 0.1], [4.5, 0.5], [-5, -5], [4.0, 4.0]]
    np.testing.assert_array_equal(checkerboard_inside(np.array(white + black)), [True] * 8 + [False] * 8)
    assert len(WHITE_SQUARES) == 8
    assert Checkerboard(data_dir=str(tmp_path)).builder_config.num_points == 2**20  # default config, not built


def _assert_uniform_on_white_squares(points: np.ndarray) -> None:
    cells = checkerboard_cell(points)
    assert (cells >= 0).all(), f"{(cells < 0).sum()} points outside the white squares"
    counts = np.bincount(cells, minlength=8)
    assert stats.chisquare(counts).pvalue > 1e-4, counts
    # uniform inside each square too: 4×4 sub-bins of the offset within the square
    sub = np.floor((points / 2.0 - np.floor(points / 2.0)) * 4).astype(np.int64)
    fine = np.bincount(cells * 16 + sub[:, 0] * 4 + sub[:, 1], minlength=128)
    assert stats.chisquare(fine).pvalue > 1e-4


def test_checkerboard_sample_uniform_on_white_squares():
    points = checkerboard_sample(np.random.default_rng(3), 64_000)
    assert points.shape == (64_000, 2) and points.dtype == np.float32
    assert np.abs(points).max() <= 4.0
    _assert_uniform_on_white_squares(points)


def test_checkerboard_built_dataset(data_dir):
    source = load_source("checkerboard/64k", data_dir)
    assert len(source) == 2**16
    idx = np.random.default_rng(0).choice(len(source), 16_384, replace=False)
    records = source.__getitems__(idx.tolist())
    points = np.stack([r["image"] for r in records])
    assert points.dtype == np.float32 and all(r["label"] == 0 for r in records)
    _assert_uniform_on_white_squares(points)
    np.testing.assert_array_equal(points, checkerboard_sample(np.random.default_rng(0), 2**16)[idx])


# --- pipeline ------------------------------------------------------------------------


def test_seeded_shuffle_is_deterministic(data_dir, digits):
    kw = dict(global_batch_size=16, prefetch=0)
    a = _take(make_iterator(digits, seed=7, **kw), 4)
    b = _take(make_iterator("digits", data_dir=data_dir, seed=7, **kw), 4)  # by name: same source
    c = _take(make_iterator(digits, seed=8, **kw), 4)
    _assert_same(a, b)
    assert not all(np.array_equal(x["label"], y["label"]) for x, y in zip(a, c, strict=True))
    assert a[0]["image"].shape == (16, 8, 8, 1) and a[0]["image"].dtype == np.float32
    assert a[0]["label"].shape == (16,) and a[0]["label"].dtype == np.int32


@pytest.mark.parametrize("prefetch", [0, 2])
def test_drop_remainder_gives_full_batches(prefetch):
    it = make_iterator(_range_source(10), global_batch_size=4, seed=0, num_epochs=1, read_threads=0, prefetch=prefetch)
    batches = list(it)
    assert [len(_ids(b)) for b in batches] == [4, 4]
    assert len(set(np.concatenate([_ids(b) for b in batches]).tolist())) == 8


def test_repeat_goes_past_one_epoch():
    it = make_iterator(_range_source(10), global_batch_size=4, seed=0, read_threads=0, prefetch=0)
    ids = np.concatenate([_ids(b) for b in _take(it, 10)])  # 40 records = 4 epochs
    for epoch in ids.reshape(4, 10):
        assert sorted(epoch.tolist()) == list(range(10))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_from_state_sees_the_same_batches(digits, prefetch):
    kw = dict(global_batch_size=32, seed=3, prefetch=prefetch)
    it = make_iterator(digits, **kw)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 4)
    it.close()
    fresh = make_iterator(digits, **kw)
    fresh.set_state(state)
    _assert_same(_take(fresh, 4), expected)
    fresh.close()


def test_resume_with_grain_worker_processes(digits):
    kw = dict(global_batch_size=32, seed=4, worker_count=1, prefetch=0)
    it = make_iterator(digits, **kw)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 2)
    fresh = make_iterator(digits, **kw)
    fresh.set_state(state)
    _assert_same(_take(fresh, 2), expected)
    del it, fresh, expected  # release grain's shared-memory batches before the worker pools go


def test_resume_through_orbax_checkpoint(digits, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    kw = dict(global_batch_size=32, seed=5, prefetch=2)
    it = make_iterator(digits, **kw)
    _take(it, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(
            2,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"step": np.array(2, np.int32)}), data=grain.checkpoint.CheckpointSave(it)
            ),
        )
        mngr.wait_until_finished()
    expected = _take(it, 3)
    it.close()

    fresh = make_iterator(digits, **kw)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        restored = mngr.restore(
            mngr.latest_step(),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore({"step": np.array(0, np.int32)}),
                data=grain.checkpoint.CheckpointRestore(fresh),
            ),
        )
    assert int(restored.state["step"]) == 2 and restored.data is fresh
    _assert_same(_take(fresh, 3), expected)
    fresh.close()


def test_process_shards_are_disjoint_and_cover_the_data():
    # 101 records over 2 simulated processes: shards of 51 and 50 (grain's even_split, no record dropped).
    source = _range_source(101)
    seen = []
    for process_index, shard_size in ((0, 51), (1, 50)):
        kw = dict(global_batch_size=2, seed=1, process_index=process_index, process_count=2, read_threads=0)
        it = make_iterator(source, prefetch=0, **kw)
        ids = np.concatenate([_ids(b) for b in _take(it, 3 * shard_size)])  # 3 epochs of this shard
        epochs = [set(e.tolist()) for e in ids.reshape(3, shard_size)]
        assert all(len(e) == shard_size for e in epochs) and epochs[0] == epochs[1] == epochs[2]
        seen.append(epochs[0])
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(101))
    local = make_iterator(source, global_batch_size=8, seed=1, process_index=1, process_count=2, prefetch=0)
    assert _ids(next(local)).shape == (4,)  # per-process batch = global / process count


def test_bad_arguments_raise(digits):
    with pytest.raises(ValueError, match=r"global_batch_size=3 .*process count 2"):
        make_iterator(digits, global_batch_size=3, seed=0, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="process_index=2"):
        make_iterator(digits, global_batch_size=4, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="seed"):
        make_iterator(digits, global_batch_size=4, seed=-1)


_MESH_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from gmflow_jax.data import load_source, make_iterator

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    source = load_source("digits", sys.argv[1])
    it = make_iterator(source, global_batch_size=16, seed=2, mesh=mesh, prefetch=2)
    host = make_iterator(source, global_batch_size=16, seed=2, prefetch=0)
    for _ in range(2):
        batch, ref = next(it), next(host)
        for key, shape in (("image", (16, 8, 8, 1)), ("label", (16,))):
            arr = batch[key]
            assert isinstance(arr, jax.Array) and arr.shape == shape, (key, arr.shape)
            assert arr.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), arr.ndim), arr.sharding
            assert len(arr.addressable_shards) == 8
            assert all(s.data.shape == (2, *shape[1:]) for s in arr.addressable_shards)
            np.testing.assert_array_equal(np.asarray(arr), ref[key])
    it.close()
    try:
        make_iterator(source, global_batch_size=12, seed=2, mesh=mesh)
    except ValueError as e:
        assert "global_batch_size=12" in str(e) and "device count 8" in str(e), e
    else:
        raise AssertionError("no ValueError for a batch not divisible by 8 devices")
    only_data = make_iterator(source, global_batch_size=12, seed=2, mesh=mesh, batch_axes=("data",), prefetch=0)
    arr = next(only_data)["image"]
    assert arr.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), arr.ndim), arr.sharding
    assert all(s.data.shape == (3, 8, 8, 1) for s in arr.addressable_shards)
    print("MESH_OK")
    """
)


def test_global_array_sharded_over_8_cpu_devices(data_dir, digits):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", _MESH_SCRIPT, data_dir], env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0 and "MESH_OK" in out.stdout, out.stdout + out.stderr
