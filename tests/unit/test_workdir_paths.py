"""Workdirs given as URLs: ``file:///...`` (local) and ``gs://`` on a stand-in object store (fsspec's
in-memory filesystem under gcsfs's names, behind epath's fsspec backend as gcsfs is). Orbax's arrays go
through TensorStore's own GCS client: tests/integration/test_remote_workdir.py runs a whole trainer
against a GCS emulator."""

from __future__ import annotations

import importlib
import io
import json
import os
import struct
import time

import fsspec
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from gmflow_jax import checkpoint as ckpt
from gmflow_jax import storage
from gmflow_jax.train import lock as lock_lib
from gmflow_jax.train import writers
from gmflow_jax.train.config import write_config
from gmflow_jax.train.lock import LOCK_FILE, WorkdirLock, WorkdirLockedError
from gmflow_jax.viz import save_png


def state(step: int) -> dict:
    return {"step": jnp.int32(step), "params": {"w": jnp.full((3, 2), float(step))}, "ema": {"w": jnp.ones((3, 2))}}


def save_steps(workdir: str, steps: tuple[int, ...]) -> None:
    writer = ckpt.Checkpointer(workdir, keep=5, async_save=False)
    for step in steps:
        writer.save(step, state(step), b'{"pos": 0}', {"step": step, "config": {"model": {"depth": step}}})
    writer.close()


# --- workdir_path ----------------------------------------------------------------------------------


def test_workdir_path_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.workdir_path("runs/a") == epath.Path(tmp_path / "runs" / "a")
    assert storage.workdir_path("~/x") == epath.Path(os.path.expanduser("~/x"))
    assert storage.workdir_path("file:///tmp/a%20b/c") == epath.Path("/tmp/a b/c")
    assert storage.workdir_path("file://localhost/tmp/x") == epath.Path("/tmp/x")
    gs = storage.workdir_path("gs://bucket/run")
    assert str(gs) == "gs://bucket/run" and str(gs / "checkpoints") == "gs://bucket/run/checkpoints"
    assert storage.is_url(gs) and not storage.is_url(storage.workdir_path("file:///tmp/x"))
    assert storage.workdir_path(gs) == gs  # idempotent


@pytest.mark.parametrize(
    "bad,message",
    [
        ("file://otherhost/x", "is not a local file URL"),
        ("s3://bucket/x", "is not supported"),
        ("gs:///x", "is not supported"),
        ("http://host/x", "is not supported"),
    ],
)
def test_workdir_path_refuses_other_urls_naming_them(bad, message):
    with pytest.raises(ValueError, match=f"{bad!r} {message}"):
        storage.workdir_path(bad)


# --- a file:// workdir -------------------------------------------------------------------------------


def test_checkpoints_through_a_file_url(tmp_path):
    url = f"file://{tmp_path}"
    save_steps(url, (1, 2))
    directory = str(tmp_path / ckpt.CHECKPOINT_DIR)
    assert sorted(os.listdir(tmp_path / ckpt.MANIFEST_DIR)) == ["1.json", "2.json"]  # written at the local path
    assert ckpt.list_steps(f"{url}/checkpoints") == [1, 2]
    assert ckpt.locate(url) == (directory, None)
    assert ckpt.locate(f"{url}/checkpoints/2") == (directory, 2)
    assert ckpt.verify_step(f"{url}/checkpoints", 2) is None
    assert ckpt.read_meta(f"{url}/checkpoints", 1)["config"] == {"model": {"depth": 1}}
    restored = ckpt.restore(f"{url}/checkpoints", 2)
    np.testing.assert_array_equal(restored["params"]["w"], np.full((3, 2), 2.0))
    files = [p for p in (tmp_path / "checkpoints" / "2" / "state").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    size = biggest.stat().st_size
    biggest.write_bytes(biggest.read_bytes()[:10])
    rel = biggest.relative_to(tmp_path / "checkpoints" / "2")
    assert ckpt.verify_step(f"{url}/checkpoints", 2) == f"file {rel} has 10 bytes, expected {size}"
    moved = ckpt.set_aside(url)
    assert moved.startswith(str(tmp_path / ckpt.SET_ASIDE_DIR)) and ckpt.list_steps(f"{url}/checkpoints") == []
    assert ckpt.list_steps(os.path.join(moved, ckpt.CHECKPOINT_DIR)) == [1, 2]


# --- a gs:// workdir on a stand-in object store -------------------------------------------------------


class FakeGCS(MemoryFileSystem):
    """fsspec's in-memory filesystem under gcsfs's names: paths ``bucket/key`` without the scheme, and, as on
    GCS, no folders of their own (a folder exists while a file is below it)."""

    protocol = ("gs", "gcs")
    root_marker = ""
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        return str(path).removeprefix("gs://").removeprefix("gcs://").rstrip("/")

    def mkdir(self, path, create_parents=True, **kwargs):
        pass

    def info(self, path, **kwargs):  # GCS reports when an object was written (gcsfs: mtime)
        out = super().info(path, **kwargs)
        return {**out, "mtime": out["created"]} if "created" in out else out

    def makedirs(self, path, exist_ok=False):
        pass


@pytest.fixture
def gcs():
    """``gs://`` paths go to a fresh ``FakeGCS`` (through epath's fsspec backend, as with gcsfs)."""
    before = {name: fsspec.registry.get(name) for name in FakeGCS.protocol}
    for name in FakeGCS.protocol:
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    FakeGCS.store.clear()
    yield "gs://bucket/run"
    FakeGCS.store.clear()
    registry = importlib.import_module("fsspec.registry")._registry  # the package exports a read-only view
    for name, cls in before.items():
        registry.pop(name, None)
        if cls is not None:
            fsspec.register_implementation(name, cls)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()


def upload(local: str, url: str, skip: tuple[str, ...] = ()) -> None:
    """Copies the files of a local folder below ``url``."""
    for rel in storage.file_sizes(local):
        if not rel.startswith(skip):
            epath.Path(f"{url}/{rel}").write_bytes(epath.Path(local, rel).read_bytes())


def test_checkpoints_on_an_object_store(gcs, tmp_path):
    save_steps(str(tmp_path), (1, 2, 3))
    (tmp_path / "config.json").write_text(json.dumps({"model": {"depth": 99}}))
    (tmp_path / "notes.txt").write_text("a file of the run")
    # orbax commits a step on GCS by writing this file last: without it, step 3 is half-written
    upload(str(tmp_path), gcs, skip=(f"checkpoints/3/{ckpt.COMMIT_FILE}",))
    directory = f"{gcs}/checkpoints"
    assert ckpt.list_steps(directory) == [1, 2]
    assert ckpt.locate(gcs) == (directory, None)
    assert ckpt.locate(f"{directory}/2") == (directory, 2)
    assert ckpt.once_held_checkpoints(gcs) and not ckpt.once_held_checkpoints(f"{gcs}/elsewhere")
    assert ckpt.verify_step(directory, 2) is None
    assert ckpt.read_meta(directory, 2)["config"] == {"model": {"depth": 2}}
    sizes = storage.file_sizes(f"{directory}/2")
    assert sizes == storage.file_sizes(tmp_path / "checkpoints" / "2")
    rel = max(sizes, key=sizes.get)
    epath.Path(f"{directory}/2/{rel}").write_bytes(b"0123456789")
    assert ckpt.verify_step(directory, 2) == f"file {rel} has 10 bytes, expected {sizes[rel]}"
    everything = storage.file_sizes(gcs)
    moved = ckpt.set_aside(gcs, keep=("config.json",))
    assert moved.startswith(f"{gcs}/{ckpt.SET_ASIDE_DIR}/")
    assert storage.file_sizes(moved) == {k: v for k, v in everything.items() if k != "config.json"}  # all moved
    assert sorted(p.name for p in epath.Path(gcs).iterdir()) == ["config.json", ckpt.SET_ASIDE_DIR]
    assert ckpt.list_steps(f"{moved}/checkpoints") == [1, 2] and ckpt.list_steps(directory) == []


def test_lock_on_an_object_store(gcs, monkeypatch):
    monkeypatch.setattr(lock_lib, "SETTLE_S", 0.0)
    path = epath.Path(gcs) / LOCK_FILE
    with WorkdirLock(gcs, 0.4) as held:
        assert json.loads(path.read_text())["token"] == held.info["token"]
        with pytest.raises(WorkdirLockedError, match=rf"in use by pid {os.getpid()} .*{LOCK_FILE}"):
            WorkdirLock(gcs, 0.4).acquire()  # watched, and renewed by the holder meanwhile
        assert json.loads(path.read_text())["beat"] >= 1
    assert not path.exists()  # released
    path.write_text(json.dumps({"host": "pod-7", "pid": 7, "started": "earlier", "lease_s": 0.3}))
    with WorkdirLock(gcs, 600):  # a lock left by a killed pod job, not renewed: taken over after its lease
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_lock_race_on_an_object_store_is_lost_to_the_last_writer(gcs, monkeypatch):
    other = {"host": "pod-7", "pid": 7, "started": "now", "lease_s": 60, "beat": 0}
    path = epath.Path(gcs) / LOCK_FILE

    def winner_writes(_):  # the other trainer found no lock either; its writes land while this one waits
        other["beat"] += 1
        path.write_text(json.dumps(other))

    monkeypatch.setattr(lock_lib.time, "sleep", winner_writes)
    with pytest.raises(WorkdirLockedError, match="in use by pid 7 on pod-7"):
        WorkdirLock(gcs).acquire()
    assert json.loads(path.read_text()) == other  # the winner's lock stays


def test_config_and_samples_on_an_object_store(gcs):
    config = ml_collections.ConfigDict({"model": {"depth": 2}, "num_steps": 10})
    write_config(config, gcs)
    assert json.loads((epath.Path(gcs) / "config.json").read_text()) == config.to_dict()
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    save_png(image, f"{gcs}/samples/latest.png")
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(epath.Path(gcs, "samples", "latest.png").read_bytes()))), image
    )
    assert sorted(p.name for p in epath.Path(gcs).glob("*/*")) == ["latest.png"]  # no temporary file left


def read_events(data: bytes) -> list[tuple[str, int, float]]:
    """``(tag, step, value)`` of the scalar events in a TFRecord event file."""
    from tensorboardX.proto import event_pb2

    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
        out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
        i += 16 + n
    return out


def test_tensorboard_events_on_an_object_store(gcs):
    writer = writers.create_writer(f"{gcs}/tensorboard")
    for step in range(5):
        writer.write_scalars(step, {"loss": step / 4})
    writer.close()
    (events,) = epath.Path(gcs, "tensorboard").iterdir()
    assert "tfevents" in events.name
    assert read_events(events.read_bytes()) == [("loss", step, step / 4) for step in range(5)]


def test_object_store_event_file_goes_on_in_a_new_file_past_the_part_size(gcs, monkeypatch):
    monkeypatch.setattr(writers, "EVENT_PART_BYTES", 10)
    name = f"{gcs}/tensorboard/events.out.tfevents.1.host"
    events = writers.ObjectStoreEventFile(name)
    events.write(b"a" * 6)
    events.flush()
    events.write(b"b" * 6)
    events.flush()  # 12 bytes uploaded: the next records start a new file
    events.write(b"c")
    events.close()
    assert epath.Path(name).read_bytes() == b"a" * 6 + b"b" * 6
    assert epath.Path(f"{name}.0001").read_bytes() == b"c"


# --- every other path a pod job touches, on the stand-in object store ----------------------------------


def test_gs_path_without_a_gcs_client_is_one_line(monkeypatch):
    monkeypatch.setattr(storage.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"'gs://pod/eval' needs gcsfs: pip install 'gmflow_jax\[gcs\]'"):
        storage.workdir_path("gs://pod/eval")


def test_npz_files_and_copies_on_an_object_store(gcs, tmp_path):
    from gmflow_jax.evaluate.features import npz_array_batches

    images = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    storage.write_npz(f"{gcs}/a.npz", arr_0=images, labels=np.arange(10))
    with storage.open_npz(f"{gcs}/a.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], images)
        np.testing.assert_array_equal(f["labels"], np.arange(10))
    shape, batches = npz_array_batches(f"{gcs}/a.npz", batch=4)
    assert shape == images.shape and np.array_equal(np.concatenate(list(batches)), images)
    storage.copy_file(f"{gcs}/a.npz", tmp_path / "a.npz")  # object store -> disk, and back
    storage.copy_file(tmp_path / "a.npz", f"{gcs}/b.npz")
    assert (
        storage.file_size(f"{gcs}/b.npz")
        == storage.file_size(tmp_path / "a.npz")
        == (tmp_path / "a.npz").stat().st_size
    )
    assert np.load(tmp_path / "a.npz")["arr_0"].tobytes() == images.tobytes()
    storage.write_npz(tmp_path / "c.npz", x=np.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "c.npz"]  # no temporary file left


def test_dataset_copies_complete_files_and_its_info_last(gcs, tmp_path, monkeypatch):
    from gmflow_jax.data import staging

    for name, size in (("dataset_info.json", 3), ("features.json", 5), ("x.array_record-00000-of-00002", 40)):
        epath.Path(f"{gcs}/data/ds/1.0.0/{name}").write_bytes(b"z" * size)
    epath.Path(f"{gcs}/data/ds/1.0.0/x.array_record-00001-of-00002").write_bytes(b"y" * 7)
    order = []
    copy = storage.copy_file
    monkeypatch.setattr(staging, "copy_file", lambda s, d: (order.append(epath.Path(s).name), copy(s, d)))
    monkeypatch.setenv("GMFLOW_JAX_CACHE", str(tmp_path / "cache"))
    local = staging.stage("ds", f"{gcs}/data")
    assert local == str(tmp_path / "cache" / "datasets" / "bucket" / "run" / "data")
    assert order[-1] == "dataset_info.json" and len(order) == 4  # a copy cut short is no dataset
    copied = {k: v for k, v in storage.file_sizes(f"{local}/ds").items() if k != staging.SYNC_MANIFEST}
    assert copied == storage.file_sizes(f"{gcs}/data/ds")
    (tmp_path / "cache/datasets/bucket/run/data/ds/1.0.0/features.json").write_bytes(b"zz")  # cut short
    order.clear()
    staging.stage("ds", f"{gcs}/data")
    assert order == ["features.json"]  # a rerun copies only what is missing or differs
    time.sleep(1.1)  # object stores give times in seconds
    epath.Path(f"{gcs}/data/ds/1.0.0/dataset_info.json").write_bytes(b"new")  # rebuilt: same size, new content
    order.clear()
    staging.stage("ds", f"{gcs}/data")
    assert order == ["dataset_info.json"]
    assert (tmp_path / "cache/datasets/bucket/run/data/ds/1.0.0/dataset_info.json").read_bytes() == b"new"


def test_evaluation_metrics_and_plots_on_an_object_store(gcs):
    from gmflow_jax.evaluate import plots
    from gmflow_jax.evaluate.sampling import read_metrics, write_metrics

    setting = dict(solver="gm-ode", order=2, num_steps=8, num_substeps=1, num_samples=100)
    metrics = dict(precision=0.5, recall=0.5, saturation=0.1)
    rows = [dict(setting, **metrics, guidance=w, fid=10 - w, samples=f"{gcs}/eval/w{w}/s.npz") for w in (0.0, 1.0)]
    write_metrics(f"{gcs}/eval", rows[:1])
    write_metrics(f"{gcs}/eval", rows)  # a rerun replaces its rows
    assert read_metrics(f"{gcs}/eval") == rows
    plots.write_csv(rows, epath.Path(gcs, "eval", "metrics.csv"))
    assert epath.Path(gcs, "eval", "metrics.csv").read_text().count("\n") == 3
    pictures = plots.plot_sweep(rows, f"{gcs}/eval")
    assert [p.rsplit("/", 1)[1] for p in pictures] == ["fid_vs_guidance.png", "precision_recall.png",
                                                       "saturation_vs_guidance.png"]  # fmt: skip
    assert Image.open(io.BytesIO(epath.Path(pictures[0]).read_bytes())).size == (640, 480)


def test_imagenet_source_and_vae_folder_on_an_object_store(gcs, tmp_path):
    import tarfile

    from gmflow_jax.data import imagenet, images, staging, synthetic
    from gmflow_jax.models.convert import read_diffusers_folder

    src = synthetic.write_synthetic_imagenet(tmp_path / "src", num_synsets=2, per_class=2)
    staging.sync_folder(src, f"{gcs}/src", last=())
    local, remote = images.list_images(src), images.list_images(f"{gcs}/src")
    assert local[0] == remote[0] and [r.name for r in local[1]] == [r.name for r in remote[1]]
    assert [r.read() for r in local[1]] == [r.read() for r in remote[1]]
    for synset in local[0]:  # a folder of per-synset tars, read by offsets
        with tarfile.open(tmp_path / f"{synset}.tar", "w") as tar:
            tar.add(tmp_path / "src" / synset, arcname=synset)
        storage.copy_file(tmp_path / f"{synset}.tar", f"{gcs}/tars/{synset}.tar")
    tars = images.list_images(f"{gcs}/tars")
    assert sorted(r.read() for r in tars[1]) == sorted(r.read() for r in local[1])

    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"latent_channels": 4, "block_out_channels": [8, 16]}))
    from safetensors.numpy import save_file

    save_file({"w": np.arange(6, dtype=np.float16)}, str(vae / "diffusion_pytorch_model.fp16.safetensors"))
    staging.sync_folder(vae, f"{gcs}/vae", last=())
    config, state = read_diffusers_folder(f"{gcs}/vae")
    assert config == json.loads((vae / "config.json").read_text())
    np.testing.assert_array_equal(state["w"], np.arange(6, dtype=np.float32))
    assert imagenet.vae_fingerprint(f"{gcs}/vae") == imagenet.vae_fingerprint(vae)


def test_unwritable_output_folder_is_one_line_before_any_work(gcs, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(
        ValueError, match=rf"--out {tmp_path}/a_file/eval cannot be written \((FileExistsError|NotADir)"
    ):
        storage.check_writable(tmp_path / "a_file" / "eval", "--out")
    assert storage.check_writable(tmp_path / "new" / "eval", "--out") == epath.Path(tmp_path / "new" / "eval")
    assert sorted(os.listdir(tmp_path)) == ["a_file"]  # nothing left behind
    assert storage.check_writable(f"{gcs}/eval", "--out") == epath.Path(f"{gcs}/eval")
    assert not list(epath.Path(gcs).glob("eval/*"))  # the test write is gone

    def refused(self, *args, **kwargs):
        raise FileNotFoundError("b/nobucket/o")

    monkeypatch.setattr(FakeGCS, "open", refused)
    with pytest.raises(ValueError, match=r"--out gs://bucket/run/x cannot be written .*does the bucket exist"):
        storage.check_writable(f"{gcs}/x", "--out")
