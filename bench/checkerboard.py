"""The 2-D checkerboard experiment (paper §5.1): GMFlow (K = 64) vs a flow-matching baseline.

Trains both models with the project's trainer (``gmflow_jax.train.train``) from
``configs/checkerboard_k64.py`` (GMFlow) and ``configs/checkerboard_k64.py:baseline`` (L2 flow
matching) in ``<out>/train_gmflow`` and ``<out>/train_baseline``; a rerun resumes an unfinished
run and reuses a finished one. Then it rebuilds both EMA models from their final checkpoints,
samples every (method, NFE) pair and reports the sliced Wasserstein-1 distance to fresh data and
the fraction of samples inside the white squares. Writes ``metrics.json``, ``samples.npz`` and
``grid.png`` into ``--out``.

    python bench/checkerboard.py                     # the full run (18 min on 2 CPU cores, 9 of them training)
    python bench/checkerboard.py --preset demo       # a small version (3 min)

The full preset trains exactly the configs; the demo shrinks the MLP and the step count and
trains on the 2**16-point ``checkerboard/64k`` dataset (built in seconds). Datasets are built on
first use in ``--data-dir`` (default: the trainer's, ``$GMFLOW_DATA_DIR`` or
``~/tensorflow_datasets``). The evaluation points continue the dataset's random stream past its
2**20 points, so with the default seed they are disjoint from the training set.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from common import machine, today
from flax import nnx

from gmflow_jax import checkpoint as ckpt_lib
from gmflow_jax import solvers
from gmflow_jax.data.builders import CHECKERBOARD_SIZE, checkerboard_inside, checkerboard_sample
from gmflow_jax.sampling import Sampler
from gmflow_jax.train import train
from gmflow_jax.train.config import load_config

PRESETS = {  # overrides: config field -> value, on top of configs/checkerboard_k64.py
    "full": dict(overrides={}, samples=100_000, nfes=(1, 2, 4, 8, 16, 32)),
    "demo": dict(
        overrides={"num_steps": 1500, "model.hidden": 128, "data.dataset": "checkerboard/64k"},
        samples=20_000,
        nfes=(1, 2, 4, 8),
    ),
}
MODELS = {"gmflow": None, "baseline": "baseline"}  # name -> get_config argument
GM_METHODS = {  # label -> (solver, order)
    "GM-SDE": ("gm-sde", 1),
    "GM-SDE 2": ("gm-sde", 2),
    "GM-ODE 2": ("gm-ode", 2),
}
BASELINE_METHODS = {"Euler": "euler", "DDPM": "ddpm", "DPM++ 2M": "dpmpp-2m"}
FINAL_LOSS_WINDOW = 0.1  # final_train_loss: mean logged loss over the last 10 % of the steps


def bench_config(arg: str | None, overrides: dict, args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The trainer config of one model: the config file, the preset's overrides and the command line."""
    c = load_config("checkerboard_k64", arg)
    for field, value in overrides.items():
        *parents, leaf = field.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    if args.steps:
        c.num_steps = args.steps
    c.optim.decay_steps = c.num_steps  # the cosine decay spans the whole (possibly shortened) run
    c.seed = args.seed
    c.data.data_dir = args.data_dir
    c.log.sample_every_steps = 0  # no preview grids: the bench draws its own
    c.log.progress_every_steps = 1000
    return c


def read_losses(logdir: Path) -> dict[int, float]:
    """``{step: loss}`` from the trainer's TensorBoard event files (TFRecord framing, no TensorFlow)."""
    from tensorboardX.proto import event_pb2

    losses = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = np.frombuffer(data[pos : pos + 8], "<u8")
            start, pos = pos + 12, pos + 12 + int(length) + 4  # length, its CRC, the record, its CRC
            if pos > len(data):
                break  # a record being written
            event = event_pb2.Event.FromString(data[start : start + int(length)])
            for value in event.summary.value:
                if value.tag == "loss":
                    losses[int(event.step)] = float(value.simple_value)
    return losses


def ema_model(config: ml_collections.ConfigDict, workdir: Path) -> nnx.Module:
    """The EMA network (``ToyGMFlow``) of the final checkpoint in ``workdir``."""
    sampler = Sampler.from_checkpoint(str(workdir))  # newest good step, EMA weights
    if sampler.step != config.num_steps:
        raise SystemExit(f"{workdir}: the newest good checkpoint is step {sampler.step}, not {config.num_steps}.")
    return nnx.merge(sampler.graphdef, sampler.params).net


def train_model(name: str, config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """Trains (or resumes, or reuses) one model; returns what metrics.json records of its training."""
    before = ckpt_lib.list_steps(str(workdir / ckpt_lib.CHECKPOINT_DIR))
    start = before[-1] if before else 0
    if start > config.num_steps:
        raise SystemExit(
            f"{workdir} holds a checkpoint at step {start}, beyond this run's {config.num_steps} steps; "
            "use another --out (or delete that workdir)."
        )
    print(f"[{name}] training {workdir} from step {start} to {config.num_steps}", flush=True)
    t0 = time.perf_counter()
    state = train(config, str(workdir))
    seconds = time.perf_counter() - t0
    step = int(jax.device_get(state.step))
    if step < config.num_steps:
        raise SystemExit(f"[{name}] training stopped at step {step} (signal); run the bench again to resume.")
    losses = read_losses(workdir / "tensorboard")
    window = [v for s, v in losses.items() if s > config.num_steps * (1.0 - FINAL_LOSS_WINDOW)]
    final = float(np.mean(window)) if window else float("nan")
    print(f"[{name}] done: {step - start} steps in {seconds:.0f}s; final loss {final:.4f}", flush=True)
    return dict(seconds=seconds, start_step=start, steps=step, final_loss=final)


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, num_directions: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-1 between equal-size point sets (N, 2), averaged over random directions."""
    angles = np.random.default_rng(seed).uniform(0.0, math.pi, num_directions)
    dirs = np.stack([np.cos(angles), np.sin(angles)], axis=0)  # (2, D)
    pa, pb = np.sort(a @ dirs, axis=0), np.sort(b @ dirs, axis=0)
    return float(np.mean(np.abs(pa - pb)))


def run_method(model, solver: str, order: int, nfe: int, noise: jax.Array, key: jax.Array) -> tuple[np.ndarray, float]:
    """Samples with one configuration; returns the samples and the sampling seconds (after compile)."""
    substeps = max(math.ceil(128 / nfe), 2) if solver == "gm-ode" else 1
    fn = jax.jit(
        lambda n, k: solvers.sample(model, n, key=k, solver=solver, order=order, num_steps=nfe, num_substeps=substeps)
    )
    fn(noise[:8], key).block_until_ready()  # compile on a small batch (shape-specialised, but warms caches)
    start = time.perf_counter()
    out = np.asarray(fn(noise, key).block_until_ready())
    return out, time.perf_counter() - start


def plot_grid(samples: dict[str, dict[int, np.ndarray]], nfes, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(samples)
    fig, axes = plt.subplots(len(methods), len(nfes), figsize=(1.6 * len(nfes), 1.6 * len(methods)), squeeze=False)
    for r, method in enumerate(methods):
        for c, nfe in enumerate(nfes):
            ax = axes[r, c]
            pts = samples[method][nfe]
            ax.hist2d(pts[:, 0], pts[:, 1], bins=160, range=[[-5, 5], [-5, 5]], cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"NFE {nfe}", fontsize=9)
            if c == 0:
                ax.set_ylabel(method, fontsize=9)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    from PIL import Image

    Image.open(path).convert("RGB").quantize(colors=64).save(path, optimize=True)  # ~4x smaller


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--out", type=Path, default=Path("results/checkerboard"))
    parser.add_argument("--steps", type=int, help="training steps per model (overrides the preset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default="", help="dataset directory ('': the trainer's default)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    args.out.mkdir(parents=True, exist_ok=True)
    logging.set_verbosity(logging.INFO)  # the trainer's progress lines
    t_start = time.perf_counter()

    configs = {name: bench_config(arg, preset["overrides"], args) for name, arg in MODELS.items()}
    training = {name: train_model(name, configs[name], args.out / f"train_{name}") for name in MODELS}
    models = {name: ema_model(configs[name], args.out / f"train_{name}") for name in MODELS}

    n = preset["samples"]
    rng = np.random.default_rng(args.seed)
    checkerboard_sample(rng, CHECKERBOARD_SIZE)  # the dataset's points (seed 0): skip them
    reference = checkerboard_sample(rng, n)
    floor = sliced_wasserstein(checkerboard_sample(rng, n), reference)
    noise = jax.random.normal(jax.random.PRNGKey(args.seed + 1), (n, 2), jnp.float32)
    key = jax.random.PRNGKey(args.seed + 2)
    methods = {label: ("gmflow", solver, order) for label, (solver, order) in GM_METHODS.items()}
    methods.update({label: ("baseline", solver, 1) for label, solver in BASELINE_METHODS.items()})

    samples, rows = {}, []
    for label, (model_name, solver, order) in methods.items():
        samples[label] = {}
        for nfe in preset["nfes"]:
            pts, seconds = run_method(models[model_name], solver, order, nfe, noise, key)
            finite = np.all(np.isfinite(pts), axis=-1)
            row = dict(
                method=label,
                nfe=nfe,
                sliced_w1=sliced_wasserstein(np.where(finite[:, None], pts, 0.0), reference),
                inside=float(np.mean(checkerboard_inside(pts[finite]))) * float(finite.mean()),
                nonfinite=int((~finite).sum()),
                seconds=seconds,
            )
            rows.append(row)
            samples[label][nfe] = pts
            print(f"{label:>9} NFE {nfe:>2}: SW1 {row['sliced_w1']:.4f}  inside {row['inside']:.4f}  ({seconds:.1f}s)")

    gm = configs["gmflow"]
    metrics = dict(
        preset=args.preset,
        config=dict(
            steps=gm.num_steps,
            batch=gm.batch_size,
            hidden=gm.model.hidden,
            dataset=gm.data.dataset,
            samples=n,
            nfes=list(preset["nfes"]),
        ),
        trainer_configs={name: json.loads(c.to_json_best_effort()) for name, c in configs.items()},
        data_noise_floor_sliced_w1=floor,
        results=rows,
        train_seconds={name: t["seconds"] for name, t in training.items()},
        training=training,
        final_train_loss={name: t["final_loss"] for name, t in training.items()},
        total_seconds=time.perf_counter() - t_start,
        machine=machine(),
        date=today(),
    )
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    np.savez_compressed(
        args.out / "samples.npz", **{f"{m}|{nfe}": pts for m, per in samples.items() for nfe, pts in per.items()}
    )
    plot_grid(samples, preset["nfes"], args.out / "grid.png")
    print(f"data noise floor SW1 {floor:.4f}; wrote {args.out}/metrics.json, samples.npz, grid.png")
    print(f"total {metrics['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
