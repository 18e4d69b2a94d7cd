"""Pictures and tables of a guidance sweep: ``metrics.csv``, ``fid_vs_guidance.png``, ``precision_recall.png``,
``saturation_vs_guidance.png`` (one curve per solver setting), and a printed table."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from gmflow_jax.evaluate.scoring import METRIC_KEYS
from gmflow_jax.storage import workdir_path, write_atomic

CSV_KEYS = ("solver", "order", "num_steps", "num_substeps", "guidance", "num_samples", "network_evals_per_sample")


def curve_name(row: dict[str, Any]) -> str:
    """'GM-ODE 2, 8×16' (a pi-Flow student: 'PIFLOW, 1 NFE, T 1') for a row of metrics.json."""
    if row["solver"] == "piflow":
        return f"PIFLOW, {row['num_steps']} NFE, T {row.get('temperature', 1.0):g}"
    return f"{row['solver'].upper()} {row['order']}, {row['num_steps']}×{row['num_substeps']}"


def curves(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows with metrics grouped by solver setting, each sorted by guidance."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("fid") is not None:
            out.setdefault(curve_name(r), []).append(r)
    return {k: sorted(v, key=lambda r: r["guidance"]) for k, v in sorted(out.items())}


def write_csv(rows: Sequence[dict[str, Any]], path: str) -> None:
    """One line per row: the setting, then the metrics (empty where absent)."""
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow([*CSV_KEYS, *METRIC_KEYS, "samples"])
    for r in sorted(rows, key=lambda r: (curve_name(r), r["guidance"])):
        w.writerow([r.get(k, "") if r.get(k) is not None else "" for k in (*CSV_KEYS, *METRIC_KEYS, "samples")])
    write_atomic(workdir_path(path), text.getvalue())


def plot_sweep(rows: Sequence[dict[str, Any]], out: str, title: str = "") -> list[str]:
    """Writes the three sweep plots into ``out``; returns their paths ([] when no row has metrics)."""
    groups = curves(rows)
    if not groups:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = [
        ("fid_vs_guidance.png", "guidance w̃", "guidance", "FID (lower is better)", "fid"),
        ("precision_recall.png", "recall", "recall", "precision", "precision"),
        ("saturation_vs_guidance.png", "guidance w̃", "guidance", "saturation − real (0 = as real)", "saturation"),
    ]
    paths = []
    for name, xlabel, xkey, ylabel, ykey in specs:
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        for label, group in groups.items():
            xs, ys = [r[xkey] for r in group], [r[ykey] for r in group]
            ax.plot(xs, ys, marker="o", label=label)
            if xkey == "recall":  # mark the guidance of each point along the curve's ends
                for r in (group[0], group[-1]):
                    ax.annotate(f"w̃={r['guidance']:g}", (r["recall"], r["precision"]), fontsize=8)
        if ykey == "saturation":
            ax.axhline(0.0, color="gray", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
        ax.set_title(title or _title(rows), fontsize=10)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        plt.close(fig)
        path = workdir_path(out) / name
        write_atomic(path, png.getvalue())
        paths.append(str(path))
    return paths


def _title(rows: Sequence[dict[str, Any]]) -> str:
    """'1800 samples per point, digits-cnn-… features' from the scored rows."""
    scored = [r for r in rows if r.get("fid") is not None]
    sizes = sorted({r["num_samples"] for r in scored})
    return f"{'/'.join(map(str, sizes))} samples per point, {scored[0].get('feature_network', '?')} features"


def table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table of every scored row (setting, guidance, NFE, the metrics)."""
    fmt = lambda v, p: "—" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = [f"{'setting':<18}{'w̃':>6}{'NFE':>5}{'FID':>8}{'sFID':>8}{'IS':>8}{'prec':>7}{'rec':>7}{'sat':>8}"]
    for label, group in curves(rows).items():
        for r in group:
            lines.append(
                f"{label:<18}{r['guidance']:>6g}{r['network_evals_per_sample']:>5}{fmt(r['fid'], 2):>8}"
                f"{fmt(r['sfid'], 2):>8}{fmt(r['is'], 2):>8}{fmt(r['precision'], 3):>7}{fmt(r['recall'], 3):>7}"
                f"{fmt(r['saturation'], 3):>8}"
            )
    return "\n".join(lines)
