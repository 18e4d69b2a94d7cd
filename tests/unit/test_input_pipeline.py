"""The input pipeline's batched reads: grain's record-by-record stream and states, TFDS's values, the bench."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import grain
import numpy as np
import pytest

from gmflow_jax.data import LatentSource, load_source, make_loader

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("input_pipeline_bench", ROOT / "bench" / "input_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> str:
    """A 256-record ``imagenet_latents`` (random latents, the builder's files) written by the bench."""
    data_dir = tmp_path_factory.mktemp("latents")
    _bench().write_dataset(data_dir, 256, shard_size=100)
    return str(data_dir)


class _PerRecord(grain.transforms.Map):
    """The pipeline as it was: each record converted, then grain's own batching."""

    def map(self, record):
        return {"image": np.asarray(record["image"], np.float32), "label": np.asarray(record["label"], np.int32)}


def _reference(source, *, batch: int, seed: int, index: int = 0, count: int = 1, num_epochs=None, shuffle=True):
    shard = grain.sharding.ShardOptions(shard_index=index, shard_count=count, drop_remainder=False)
    sampler = grain.samplers.IndexSampler(
        num_records=len(source), shard_options=shard, shuffle=shuffle, num_epochs=num_epochs, seed=seed
    )
    ops = [_PerRecord(), grain.transforms.Batch(batch_size=batch, drop_remainder=True)]
    return grain.DataLoader(
        data_source=source, sampler=sampler, operations=ops, shard_options=shard, read_options=grain.ReadOptions(0)
    )


def _same(a: dict, b: dict) -> None:
    for key in ("image", "label"):
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
        np.testing.assert_array_equal(a[key], b[key])


def _range_source(n: int) -> list[dict]:
    return [{"image": np.full((2,), i, np.float64), "label": i % 10} for i in range(n)]


@pytest.mark.parametrize(
    "case",
    [
        dict(batch=4, seed=1, index=1, count=2),
        dict(batch=3, seed=0, num_epochs=2, shuffle=False),
        dict(batch=64, seed=7, read_threads=4),
        dict(batch=48, seed=2, index=2, count=3, read_threads=3),
    ],
)
def test_batched_reads_keep_grains_stream_and_state(case, latents):
    """Same batches and the same checkpoint state as grain reading and converting record by record."""
    case = dict(case)
    threads = case.pop("read_threads", 0)
    source = load_source("imagenet_latents", latents) if case["batch"] > 8 else _range_source(101)
    index, count = case.pop("index", 0), case.pop("count", 1)
    kw = dict(seed=case["seed"], num_epochs=case.get("num_epochs"), shuffle=case.get("shuffle", True))
    ref = iter(_reference(source, batch=case["batch"], index=index, count=count, **kw))
    new = iter(
        make_loader(
            source, local_batch_size=case["batch"], process_index=index, process_count=count, read_threads=threads, **kw
        )
    )
    for a, b in zip(itertools.islice(ref, 9), itertools.islice(new, 9), strict=True):
        _same(a, b)
    state = ref.get_state()
    assert new.get_state() == state  # a checkpoint of either restores into the other
    resumed = iter(
        make_loader(
            source, local_batch_size=case["batch"], process_index=index, process_count=count, read_threads=threads, **kw
        )
    )
    resumed.set_state(state)
    for a, b in zip(itertools.islice(ref, 3), itertools.islice(resumed, 3), strict=True):
        _same(a, b)


def test_latent_source_parses_records_as_tfds_decodes_them(latents):
    source = load_source("imagenet_latents", latents)
    assert source._shape == (32, 32, 4)  # the fast path
    keys = list(range(len(source)))
    for ours, theirs in zip(source.__getitems__(keys), source.source.__getitems__(keys), strict=True):
        assert ours["image"].dtype == theirs["latent"].dtype == np.float32
        np.testing.assert_array_equal(ours["image"], theirs["latent"])
        assert type(ours["label"]) is type(theirs["label"]) and ours["label"] == theirs["label"]
    np.testing.assert_array_equal(source[5]["image"], source.source[5]["latent"])

    class Other:  # no TFDS dataset info: read through the source's own decoding
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"latent": np.full((2,), i, np.float32), "label": i}

        def __getitems__(self, keys):
            return [self[i] for i in keys]

    other = LatentSource(Other(), {})
    assert other._shape is None and other[1]["label"] == 1 and other.__getitems__([0, 1])[1]["image"][0] == 1.0


def test_input_bench_runs_on_a_tiny_dataset(latents):
    result = _bench().measure(latents, worker_count=0, batch=32, seconds=0.3)
    assert result["batches"] >= 2 and result["latents_per_s"] > 0
    assert result["us_per_record"] == pytest.approx(1e6 / result["latents_per_s"])
