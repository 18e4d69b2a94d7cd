"""The ``make demo`` driver: train the digits GM-DiT, then sample it with GM-ODE 2 / GM-SDE 2 and measure the samples.

    python -m gmflow_jax.demo --workdir results/digits_demo

1. Trains the ``digits_gmdit`` config (0.76M-parameter GM-DiT, K = 8, with SpectrumMLP, on the
   1797 8×8 scikit-learn digits; about 6 minutes on 2 CPU cores) through ``gmflow_jax.train``,
   resuming from the workdir's checkpoint if there is one (``train_config='digits_gmdit:tiny'``:
   the tests' tiny model).
2. Loads the final checkpoint with ``Sampler.from_checkpoint`` (EMA weights) and draws
   ``--eval_per_class`` samples per class with GM-ODE 2 and GM-SDE 2 at 8 steps, each without
   guidance and with orthogonal probabilistic guidance ``w̃ = --guidance`` (default 0.3: enough
   to sharpen the class identity of the few ambiguous samples while keeping strokes varied; the
   paper's ImageNet sweep spans 0.02–0.75).
3. Writes into the workdir: ``demo_<setting>.png`` (10 classes as rows × 8 samples, titled),
   ``demo_overview.png`` (real digits, the four settings and the numbers), ``demo_samples.npz``
   and ``metrics.json``. Per setting it measures: the accuracy with which a logistic-regression
   classifier fitted on real digits recognises the *intended* class (its own held-out accuracy
   on real digits is the reference), the pixel statistics (mean, std, range, fraction saturated
   ``|x| ≥ 0.9`` and out of range ``|x| > 1.05``, against the real digits'), the within-class
   pixel std (diversity), the Fréchet distance to the real digits in pixel space, and wall times.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

CONFIG = "digits_gmdit"
GRID_PER_CLASS = 8
SEED = 2024


# --- measurements ---------------------------------------------------------------------------


def fit_classifier(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[Any, float]:
    """Logistic regression on flattened real digits (75 % split); returns (model, held-out accuracy)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    x = images.reshape(len(images), -1)
    x_tr, x_te, y_tr, y_te = train_test_split(x, labels, test_size=0.25, random_state=seed, stratify=labels)
    clf = LogisticRegression(max_iter=3000, C=1.0)
    clf.fit(x_tr, y_tr)
    return clf, float(clf.score(x_te, y_te))


def frechet_distance(a: np.ndarray, b: np.ndarray, ridge: float = 1e-4) -> float:
    """Fréchet distance between Gaussian fits of two sample sets (N, D), in float64.

    ``ridge`` is added to both covariances: the real digits have constant corner pixels (singular covariance).
    """
    from scipy import linalg

    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    eye = ridge * np.eye(a.shape[1])
    cov_a, cov_b = np.cov(a, rowvar=False) + eye, np.cov(b, rowvar=False) + eye
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2.0 * covmean))


def pixel_stats(x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Value range, saturation and within-class diversity of images (N, H, W, C) in [-1, 1]."""
    within = np.mean([x[labels == c].std(axis=0).mean() for c in np.unique(labels)])
    return {
        "pixel_mean": float(x.mean()),
        "pixel_std": float(x.std()),
        "pixel_min": float(x.min()),
        "pixel_max": float(x.max()),
        "frac_saturated": float(np.mean(np.abs(x) >= 0.9)),
        "frac_out_of_range": float(np.mean(np.abs(x) > 1.05)),
        "within_class_std": float(within),
    }


def measure(x: np.ndarray, labels: np.ndarray, clf: Any, real: np.ndarray) -> dict[str, float]:
    """All quality numbers of one setting's samples (N, 8, 8, 1) with intended ``labels`` (N,)."""
    flat = np.clip(x, -1.0, 1.0).reshape(len(x), -1)  # the classifier saw data in [-1, 1]
    proba = clf.predict_proba(flat)
    return {
        "classifier_accuracy": float(np.mean(clf.classes_[proba.argmax(1)] == labels)),
        "classifier_confidence": float(np.mean(proba[np.arange(len(labels)), labels])),
        "frechet_pixels": frechet_distance(np.clip(x, -1.0, 1.0), real),
        **pixel_stats(x, labels),
    }


# --- pictures -------------------------------------------------------------------------------


def grid_subset(x: np.ndarray, labels: np.ndarray, per_class: int) -> np.ndarray:
    """The first ``per_class`` samples of every class, class-major: (classes · per_class, ...)."""
    return np.concatenate([x[labels == c][:per_class] for c in np.unique(labels)])


def save_overview(panels: list[tuple[str, np.ndarray]], table: str, path: str) -> None:
    """2 × 3 figure: five (title, rendered grid) panels and a text panel with the numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 11))
    slots = [axes[0, 0], axes[0, 1], axes[0, 2], axes[1, 1], axes[1, 2]]
    for ax, (title, img) in zip(slots, panels, strict=True):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title.replace(": ", "\n", 1), fontsize=11)
        ax.axis("off")
    axes[1, 0].axis("off")
    axes[1, 0].text(0.0, 0.98, table, family="monospace", fontsize=9.5, va="top", ha="left")
    fig.suptitle("GMFlow GM-DiT on 8×8 digits: one class per row (0–9), EMA weights, 8 sampling steps", fontsize=14)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


# --- the demo -------------------------------------------------------------------------------


def train_model(workdir: str, data_dir: str, train_steps: int | None, config_name: str = CONFIG) -> dict[str, Any]:
    """Trains (or resumes) the digits GM-DiT in ``workdir``; returns the training numbers."""
    from gmflow_jax.checkpoint import CHECKPOINT_DIR, list_steps
    from gmflow_jax.train import train
    from gmflow_jax.train.config import load_config

    config = load_config(config_name)
    config.data.data_dir = data_dir
    if train_steps is not None:
        config.num_steps = train_steps
    start = max(list_steps(os.path.join(workdir, CHECKPOINT_DIR)), default=0)
    print(f"[demo] training {config_name} for {config.num_steps} steps in {workdir} (from step {start})", flush=True)
    t0 = time.time()
    state = train(config, workdir)
    wall = time.time() - t0
    end = int(np.asarray(state.step))
    return {
        "config": config_name,
        "num_steps": int(config.num_steps),
        "batch_size": int(config.batch_size),
        "start_step": int(start),
        "end_step": end,
        "steps_this_run": end - int(start),
        "wall_s_this_run": round(wall, 1),
    }


def run_demo(
    workdir: str,
    *,
    data_dir: str = "",
    guidance: float = 0.3,
    eval_per_class: int = 100,
    num_steps: int = 8,
    train_steps: int | None = None,
    train_config: str = CONFIG,
) -> dict[str, Any]:
    """Trains, samples, measures and draws (see the module docstring); returns the metrics dict."""
    from gmflow_jax.data import digits_arrays
    from gmflow_jax.sampling import Sampler
    from gmflow_jax.viz import render, save_grid_png

    workdir = os.path.abspath(workdir)
    t_demo = time.time()
    training = train_model(workdir, data_dir, train_steps, train_config)
    training["wall_s_total"] = round(training["wall_s_this_run"] + _earlier_training_s(workdir, training), 1)

    t0 = time.time()
    sampler = Sampler.from_checkpoint(workdir)
    load_s = time.time() - t0
    real, real_labels = digits_arrays()
    clf, real_acc = fit_classifier(real, real_labels)
    labels = sampler.class_grid(eval_per_class)
    settings = [("gm-ode", 0.0), ("gm-ode", guidance), ("gm-sde", 0.0), ("gm-sde", guidance)]
    results, panels, arrays = {}, [], {}
    real_grid = grid_subset(real, real_labels, GRID_PER_CLASS)
    panels.append(("real digits (training data)", render(real_grid, sampler.num_classes)))
    for solver, w in settings:
        name = f"{solver.replace('-', '')}2_w{w:g}"
        kw = dict(solver=solver, order=2, num_steps=num_steps, guidance=w)
        t0 = time.time()
        x = sampler.sample(SEED, labels, **kw)  # compiles, then runs
        first_s = time.time() - t0
        t0 = time.time()
        sampler.sample(SEED, labels, **kw)  # warm: the sampling time alone
        warm_s = time.time() - t0
        m = measure(x, labels, clf, real)
        m.update(
            {
                "solver": solver,
                "order": 2,
                "num_steps": num_steps,
                "guidance": w,
                "num_samples": len(x),
                "sample_wall_s_with_compile": round(first_s, 2),
                "sample_wall_s": round(warm_s, 2),
                "samples_per_s": round(len(x) / warm_s, 1),
            }
        )
        results[name] = m
        arrays[name] = x
        grid = grid_subset(x, labels, GRID_PER_CLASS)
        label = f"{solver.upper()} 2, {num_steps} steps, " + (f"probabilistic guidance {w:g}" if w else "no guidance")
        title = f"{label}: classifier acc {100 * m['classifier_accuracy']:.1f}%"
        save_grid_png(grid, os.path.join(workdir, f"demo_{name}.png"), sampler.num_classes, title)
        panels.append((title, render(grid, sampler.num_classes)))
        print(
            f"[demo] {label}: accuracy {m['classifier_accuracy']:.3f}, Fréchet {m['frechet_pixels']:.2f}, "
            f"{first_s:.1f} s with compile, {warm_s:.2f} s warm",
            flush=True,
        )
    real_stats = {"classifier_heldout_accuracy": real_acc, **pixel_stats(real, real_labels)}
    metrics = {
        "training": training,
        "checkpoint": {"path": sampler.path, "step": sampler.step, "ema": True, "load_s": round(load_s, 2)},
        "guidance_note": (
            f"w̃={guidance:g}: orthogonal probabilistic guidance (docs/method.md §7.2); "
            "w̃=0 is the plain conditional model"
        ),
        "classifier": "sklearn LogisticRegression on the 64 pixels of real digits (75% split, max_iter=3000)",
        "real": real_stats,
        "settings": results,
        "total_wall_s": round(time.time() - t_demo, 1),
    }
    table = _table(metrics)
    save_overview(panels, table, os.path.join(workdir, "demo_overview.png"))
    np.savez(os.path.join(workdir, "demo_samples.npz"), labels=labels, **arrays)
    tmp = os.path.join(workdir, "metrics.json.tmp")
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=2)
    os.replace(tmp, os.path.join(workdir, "metrics.json"))
    print(table, flush=True)
    print(f"[demo] wrote {os.path.join(workdir, 'demo_overview.png')} and metrics.json", flush=True)
    return metrics


def _earlier_training_s(workdir: str, training: dict[str, Any]) -> float:
    """Training seconds recorded by an earlier demo run in ``workdir`` up to this run's start step (else 0)."""
    path = os.path.join(workdir, "metrics.json")
    try:
        with open(path) as f:
            old = json.load(f)["training"]
    except (OSError, ValueError, KeyError):
        return 0.0
    if old.get("end_step", -1) > training["start_step"] or old.get("config") != training["config"]:
        return 0.0
    return float(old.get("wall_s_total", old.get("wall_s_this_run", 0.0)))


def _table(metrics: dict[str, Any]) -> str:
    t = metrics["training"]
    real = metrics["real"]
    lines = [
        f"training: {t['end_step']} steps × batch {t['batch_size']}",
        f"  ({t['wall_s_total']:.0f} s in all; {t['steps_this_run']} steps, {t['wall_s_this_run']:.0f} s this run)",
        f"classifier held-out acc on real: {real['classifier_heldout_accuracy']:.3f}",
        f"real: within-class std {real['within_class_std']:.3f}, saturated {real['frac_saturated']:.2f}",
        "",
        f"{'setting':<14}{'acc':>6}{'FD':>7}{'div':>6}{'sat':>6}{'s':>6}",
    ]
    for name, m in metrics["settings"].items():
        lines.append(
            f"{name:<14}{m['classifier_accuracy']:>6.3f}{m['frechet_pixels']:>7.2f}{m['within_class_std']:>6.3f}"
            f"{m['frac_saturated']:>6.2f}{m['sample_wall_s']:>6.2f}"
        )
    lines += [
        "",
        "acc: classifier recognises intended class",
        "FD: Fréchet distance to real (pixels)",
        "div: within-class pixel std",
        "sat: fraction of pixels with |x| >= 0.9",
        f"s: seconds for {m['num_samples']} samples (warm)",
    ]
    return "\n".join(lines)
