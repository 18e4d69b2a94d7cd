"""Sampling for evaluation at scale: sharded over processes, resumable, one compiled sweep per setting.

    python -m gmflow_jax.evaluate --workdir DIR --out DIR [--num_samples 50000] [--solver gm-ode] [--order 2]
        [--num_steps 8] [--num_substeps 1] [--guidance 0.0,0.1,...] [--seed 0]

For one solver setting and a list of guidance values it writes one folder per guidance value
(a pi-Flow student, ``--solver piflow``, its default: one guidance value, 0; guidance is baked into it),
``<out>/<setting>/samples.npz`` in the ADM evaluator's format (``arr_0`` uint8 ``(N, H, W, 3)``, plus
``labels``), a picture grid ``grid.png`` (the same classes and seeds in every setting) and a row in
``<out>/metrics.json``.

* Labels: ``eval_labels(N, classes, seed)``, the same list for every setting (each class equally
  often, shuffled by the seed), so settings differ only in the solver and the guidance.
* Sample ``i`` lives in chunk ``c = i // chunk_size``; chunk ``c`` is drawn by one compiled call of the
  whole guidance sweep with the key ``fold_in(key(seed), c)`` and the starting noise of each sample
  drawn from ``(seed, i)``. JAX process ``p`` of ``P`` draws the chunks ``c ≡ p (mod P)`` on its local
  devices, so the samples depend on (checkpoint, setting, seed, chunk size) only: not on the number
  of hosts or devices.
* Resumable: every chunk is written (atomically) to ``<out>/<setting>/chunks/`` as soon as it is
  drawn; a rerun skips the chunks that exist and assembles the same ``samples.npz``.
* ``out`` is a local, ``file://`` or ``gs://`` path (``storage.workdir_path``): on a pod, whose hosts share no
  disk, every process writes its chunks into the one bucket folder and process 0 assembles them from there.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any

import jax
import numpy as np
from etils import epath

from gmflow_jax import solvers
from gmflow_jax.multihost import barrier
from gmflow_jax.sampling import NOISE_KEY, PIFLOW, Sampler
from gmflow_jax.storage import open_npz, workdir_path, write_atomic, write_npz
from gmflow_jax.viz import save_grid_png

GRID_CLASSES, GRID_PER_CLASS = 8, 8


@dataclasses.dataclass(frozen=True)
class Setting:
    """One solver setting; ``guidance`` values are swept within it. ``None``: the model's default
    (``Sampler.settings``; ``resolve`` fills them in): 'gm-ode', 8 steps, shift 1, or for a pi-Flow student
    'piflow' and its ``config.distill`` (``total_substeps`` and ``temperature`` are pi-Flow's only)."""

    solver: str | None = None
    order: int = 2
    num_steps: int | None = None
    num_substeps: int = 1
    orthogonal: float | None = None
    shift: float | None = None
    total_substeps: int | None = None
    temperature: float | None = None

    def name(self, guidance: float) -> str:
        if self.solver == PIFLOW:
            return f"{PIFLOW}_{self.num_steps}x{self.total_substeps}_T{self.temperature:g}_w{guidance:g}"
        return f"{self.solver}{self.order}_{self.num_steps}x{self.num_substeps}_w{guidance:g}"

    def resolve(self, sampler: Sampler) -> Setting:
        """This setting with the model's defaults filled in; ValueError, one line, for one the model refuses."""
        s = sampler.settings(self.solver, self.num_steps, self.shift, self.total_substeps, self.temperature)
        fields = ("solver", "num_steps", "shift", "total_substeps", "temperature")
        return dataclasses.replace(self, **{k: s.get(k) for k in fields})


def eval_labels(num_samples: int, num_classes: int, seed: int) -> np.ndarray:
    """(N,) int32: every class equally often (up to one), shuffled by ``seed``; None classes: zeros."""
    if num_classes == 0:
        return np.zeros((num_samples,), np.int32)
    labels = np.tile(np.arange(num_classes, dtype=np.int32), -(-num_samples // num_classes))[:num_samples]
    return np.random.default_rng(seed).permutation(labels).astype(np.int32)


def to_uint8_rgb(x: np.ndarray) -> np.ndarray:
    """Samples in [-1, 1] (N, H, W, C) -> uint8 (N, H, W, 3) (one channel repeated), rounded and clipped."""
    x = np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x[..., :3]


@functools.partial(jax.jit, static_argnums=2)
def _noise(key: jax.Array, indices: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The starting noise of samples ``indices`` (B,) -> (B, *shape): a function of (seed, i) only."""
    k = jax.random.fold_in(key, NOISE_KEY)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(k, i), shape))(indices)


def evaluate_samples(
    sampler: Sampler,
    out: str | epath.PathLike,
    setting: Setting,
    guidance: list[float],
    *,
    num_samples: int = 50_000,
    seed: int = 0,
    chunk_size: int = 256,
) -> list[dict[str, Any]]:
    """Draws (or completes) the samples of ``setting`` for every value of ``guidance``; returns one row per
    value (the setting, the number of network evaluations per sample and the ``samples.npz`` path)."""
    if num_samples < 1 or chunk_size < 1:
        raise ValueError(f"num_samples and chunk_size must be >= 1; got {num_samples} and {chunk_size}.")
    if not guidance:
        raise ValueError("guidance must list at least one value.")
    setting = setting.resolve(sampler)
    if setting.solver == PIFLOW:
        if list(guidance) != [0.0]:
            raise ValueError(f"guidance is baked into a pi-Flow student: guidance must be [0.0]; got {guidance}.")
    else:
        solvers.check_settings(
            setting.solver, setting.order, setting.num_steps, setting.num_substeps, np.asarray(guidance)
        )
    policy = {"total_substeps": setting.total_substeps, "temperature": setting.temperature}
    labels = eval_labels(num_samples, sampler.num_classes, seed)
    folders = [workdir_path(out) / setting.name(w) for w in guidance]
    chunks = -(-num_samples // chunk_size)
    mine = [c for c in range(jax.process_index(), chunks, jax.process_count())]
    for f in folders:
        (f / "chunks").mkdir(parents=True, exist_ok=True)
    written = [_names(f / "chunks") for f in folders]  # one listing per folder
    todo = [c for c in mine if not all(_chunk_path(f, c).name in w for f, w in zip(folders, written, strict=True))]
    t0, drawn = time.time(), 0
    for c in todo:
        idx = np.arange(c * chunk_size, min((c + 1) * chunk_size, num_samples))
        padded = np.arange(c * chunk_size, (c + 1) * chunk_size)  # every call the same shape: one compilation
        x = sampler.sample(
            jax.random.fold_in(jax.random.PRNGKey(seed), c),
            np.resize(labels[idx], chunk_size) if sampler.num_classes else None,
            None if sampler.num_classes else chunk_size,
            solver=setting.solver,
            order=setting.order,
            num_steps=setting.num_steps,
            num_substeps=setting.num_substeps,
            guidance=0.0 if setting.solver == PIFLOW else list(guidance),
            orthogonal=setting.orthogonal,
            shift=setting.shift,
            batch_size=chunk_size,
            noise=np.asarray(_noise(jax.random.PRNGKey(seed), padded, sampler.data_shape)),
            progress=False,
            **(policy if setting.solver == PIFLOW else {}),
        )
        x = (x[None] if setting.solver == PIFLOW else x)[:, : len(idx)]
        for f, xs in zip(folders, x, strict=True):
            images = sampler.decode(xs) if sampler.config.model.get("vae", "") else to_uint8_rgb(xs)
            write_npz(_chunk_path(f, c), images=images, labels=labels[idx], indices=idx)
        drawn += len(idx)
        rate = drawn * len(guidance) / (time.time() - t0)
        left = sum(min(chunk_size, num_samples - k * chunk_size) for k in todo[todo.index(c) + 1 :])
        print(
            f"evaluate {setting.name(guidance[0])}..: chunk {c + 1}/{chunks}, {rate:.1f} samples/s, "
            f"ETA {left * len(guidance) / rate:.0f} s",
            flush=True,
        )
    barrier("gmflow_evaluate_chunks")
    rows = []
    for w, f in zip(guidance, folders, strict=True):
        path = f / "samples.npz"
        if jax.process_index() == 0:
            _assemble(f, chunks, path)
            _grid(path, sampler.num_classes, f / "grid.png", f"{setting.name(w)} (step {sampler.step})")
        guided = w != 0.0
        rows.append(
            dict(
                dataclasses.asdict(setting),
                guidance=w,
                num_samples=num_samples,
                seed=seed,
                network_evals_per_sample=setting.num_steps * (2 if guided else 1),
                samples=str(path),
            )
        )
    barrier("gmflow_evaluate_assembled")
    return rows


def _names(folder: epath.Path) -> set[str]:
    """The names in ``folder`` (none where it does not exist: an object store has no empty folders)."""
    try:
        return {p.name for p in folder.iterdir()}
    except FileNotFoundError:
        return set()


def _chunk_path(folder: epath.Path, c: int) -> epath.Path:
    return folder / "chunks" / f"chunk-{c:06d}.npz"


def _assemble(folder: epath.Path, chunks: int, path: epath.Path) -> None:
    """``samples.npz`` (ADM format: ``arr_0`` uint8 (N, H, W, 3), ``labels``) from the chunks, in order."""
    images, labels = [], []
    for c in range(chunks):
        with open_npz(_chunk_path(folder, c)) as f:
            images.append(f["images"])
            labels.append(f["labels"])
    write_npz(path, arr_0=np.concatenate(images), labels=np.concatenate(labels))


def _grid(path: epath.Path, num_classes: int, png: epath.Path, title: str) -> None:
    """The first ``GRID_PER_CLASS`` samples of the first ``GRID_CLASSES`` classes (same in every setting)."""
    with open_npz(path) as f:
        images, labels = f["arr_0"], f["labels"]
    if num_classes:
        picked = [np.flatnonzero(labels == k) for k in range(min(GRID_CLASSES, num_classes))]
        per_class = min(GRID_PER_CLASS, *(len(i) for i in picked))
        grid, rows = np.concatenate([images[i[:per_class]] for i in picked]), len(picked)
    else:
        grid, rows = images[: GRID_PER_CLASS * GRID_CLASSES], GRID_CLASSES
    if len(grid) >= rows:
        save_grid_png(grid[: len(grid) // rows * rows].astype(np.float32) / 127.5 - 1.0, png, rows, title)


def read_metrics(out: str | epath.PathLike) -> list[dict[str, Any]]:
    """The rows of ``<out>/metrics.json`` ([] when there is none)."""
    path = workdir_path(out) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else []


def write_metrics(out: str | epath.PathLike, rows: list[dict[str, Any]]) -> str:
    """Merges ``rows`` into ``<out>/metrics.json`` (one row per setting × guidance; a rerun replaces its rows)."""
    path = workdir_path(out) / "metrics.json"
    keys = {r["samples"] for r in rows}
    merged = [r for r in read_metrics(out) if r.get("samples") not in keys] + rows
    write_atomic(path, json.dumps(merged, indent=2))
    return str(path)
