"""Checkpoint → ``Sampler``: jitted (and, for guidance sweeps, vmapped) GM-ODE / GM-SDE sampling, and its CLI.

Colab use::

    from gmflow_jax.sampling import Sampler
    sampler = Sampler.from_checkpoint("runs/digits")              # latest good step, EMA weights
    x0 = sampler.sample(0, labels=sampler.class_grid(8))          # (80, 8, 8, 1) numpy, classes in order
    xs = sampler.sample(0, labels=3, num_samples=16, solver="gm-sde", guidance=[0.0, 0.1, 0.3])  # (3, 16, 8, 8, 1)

``sample`` compiles one function per static configuration (solver, order, steps, sub-steps,
guided or not, sweep length, chunk size); the guidance ``w̃``, ``orthogonal`` and ``shift`` are
traced, so a sweep never recompiles. Sample ``i`` starts from noise drawn with
``fold_in(key, i)``, so GM-ODE samples do not depend on ``batch_size`` (GM-SDE noise is drawn per
chunk). Command line::

    python -m gmflow_jax.sampling --workdir runs/digits --out samples.npz [--num_per_class 8] \\
        [--solver gm-ode] [--steps 8] [--guidance 0.0 0.3]

writes ``samples`` ((N, ...) or (G, N, ...) for several guidance values), ``labels`` and
``guidance`` to the npz, plus a PNG grid per guidance value (images: one class per row; 2-D
points: a log-density histogram).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gmflow_jax import checkpoint as ckpt_lib
from gmflow_jax import solvers
from gmflow_jax.model_builder import build_model, data_shape
from gmflow_jax.preview import render, save_png
from gmflow_jax.train_state import split_params

SOLVERS = solvers.GM_SOLVERS + solvers.BASELINE_SOLVERS
NOISE_KEY, SOLVER_KEY = 0, 1  # fold_in offsets of the user's key


class SamplingCheckpointError(ckpt_lib.CheckpointError, ValueError):
    """The path holds no usable checkpoint (missing, or the requested step is damaged)."""


# --- reading checkpoints ----------------------------------------------------------------


class _CheckpointReader(ckpt_lib.Checkpointer):
    """Read-only view of a trainer workdir: ``steps`` and ``verify_files`` (the manifest check).

    It deliberately creates no orbax ``CheckpointManager``: that cleans up temporary directories on
    start-up and would delete the in-flight save of a trainer still running in the same workdir.
    """

    def __init__(self, workdir: str):  # no super().__init__: see the class docstring
        self.workdir = workdir
        self.directory = os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR)
        self.manifest_dir = os.path.join(workdir, ckpt_lib.MANIFEST_DIR)

    def steps(self) -> list[int]:
        """Committed steps (numbered directories holding ``state/``), ascending."""
        if not os.path.isdir(self.directory):
            return []
        names = os.listdir(self.directory)
        return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(self.directory, n, "state")))

    def problem(self, step: int) -> str | None:
        """What is wrong with the files of ``step`` per its manifest, or None (manifests absent: None)."""
        if not os.path.isdir(self.manifest_dir):
            return None
        return self.verify_files(step)


def _locate(path: str) -> tuple[_CheckpointReader, int | None]:
    """``(reader, pinned step)`` for a workdir, a checkpoint root, or one step directory."""
    p = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(p):
        raise SamplingCheckpointError(f"checkpoint path {path!r} does not exist (resolved to {p}).")
    if os.path.isdir(os.path.join(p, "state")) and os.path.basename(p).isdigit():
        return _CheckpointReader(os.path.dirname(os.path.dirname(p))), int(os.path.basename(p))
    if os.path.basename(p) == ckpt_lib.CHECKPOINT_DIR and not os.path.isdir(os.path.join(p, ckpt_lib.CHECKPOINT_DIR)):
        return _CheckpointReader(os.path.dirname(p)), None
    return _CheckpointReader(p), None


def available_steps(path: str) -> list[int]:
    """Committed checkpoint steps under ``path`` (a workdir, checkpoint root or step directory); [] if none."""
    try:
        reader, pinned = _locate(path)
    except SamplingCheckpointError:
        return []
    steps = reader.steps()
    return [pinned] if pinned is not None and pinned in steps else steps


def _read_config(reader: _CheckpointReader, step: int) -> ml_collections.ConfigDict:
    """The run's config from ``<step>/meta`` (written by the trainer), else ``<workdir>/config.json``."""
    candidates = [
        os.path.join(reader.directory, str(step), "meta", "metadata"),
        os.path.join(reader.workdir, "config.json"),
    ]
    for path in candidates:
        if os.path.isfile(path):
            with open(path) as f:
                d = json.load(f)
            return ml_collections.ConfigDict(d["config"] if "meta" in path else d)
    raise SamplingCheckpointError(
        f"checkpoint step {step} in {reader.directory} has no config (looked at {candidates})."
    )


def _restore_params(reader: _CheckpointReader, step: int, which: str, sharding: NamedSharding) -> tuple[Any, ...]:
    """``(graphdef, params, config)`` of one step; ``which`` is 'ema' or 'params'. Raises on any problem."""
    problem = reader.problem(step)
    if problem is not None:
        raise SamplingCheckpointError(problem)
    config = _read_config(reader, step)
    graphdef, abstract = split_params(nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0))))
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), nnx.to_pure_dict(abstract)
    )
    target = {which: abstract}
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(
            os.path.join(reader.directory, str(step), "state"),
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
            ),
        )
    params = out[which]
    if not ckpt_lib.all_finite(params):
        raise SamplingCheckpointError(f"non-finite {which} weights")
    return graphdef, params, config


# --- the sampler ------------------------------------------------------------------------


def _sample_mesh() -> Mesh:
    """A 1-D ``('data',)`` mesh over this process's devices: the batch is split, the weights replicated."""
    return Mesh(np.asarray(jax.local_devices()), ("data",))


class Sampler:
    """A trained GMFlow model (``graphdef`` + ``params`` pure dict ``{'net', 'spectrum'}``) and its config.

    ``sample`` returns numpy float32 ``x0``: ``(N, H, W, C)`` images or ``(N, C)`` points, or
    ``(G, N, ...)`` for a guidance sweep of ``G`` values.
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        params: Any,
        config: ml_collections.ConfigDict,
        *,
        step: int | None = None,
        path: str | None = None,
    ):
        self.mesh = _sample_mesh()
        self._replicated = NamedSharding(self.mesh, P())
        self._batch_sharding = NamedSharding(self.mesh, P("data"))
        self.graphdef = graphdef
        self.params = jax.device_put(params, self._replicated)
        self.config = config
        self.step = step
        self.path = path
        self.data_shape: tuple[int, ...] = data_shape(config.model)
        self.num_classes = int(config.model.get("num_classes", 0) or 0)
        self.null_label = self.num_classes if self.num_classes > 0 else None
        self.has_spectrum = bool(config.model.get("spectrum", False))
        self._fns: dict[tuple, Callable[..., jax.Array]] = {}
        self.traces: dict[tuple, int] = {}  # static configuration -> times traced (compiled)

    @classmethod
    def from_checkpoint(cls, path: str, step: int | None = None, use_ema: bool = True) -> Sampler:
        """Loads ``path`` (a trainer workdir, its ``checkpoints/`` root, or one ``checkpoints/<step>`` directory).

        ``step=None``: the newest good step (a damaged newest step is skipped with a warning, never
        moved). An explicit ``step`` that is missing or damaged raises ``SamplingCheckpointError``
        (a ``ValueError`` and a ``checkpoint.CheckpointError``) naming the path.
        """
        reader, pinned = _locate(path)
        if step is not None and (not isinstance(step, int | np.integer) or step < 0):
            raise ValueError(f"step must be a non-negative int or None; got {step!r}.")
        if pinned is not None:
            if step is not None and step != pinned:
                raise ValueError(f"step={step} contradicts the step directory {path!r} (step {pinned}).")
            step = pinned
        steps = reader.steps()
        if not steps:
            raise SamplingCheckpointError(
                f"no checkpoint in {path!r}: expected a trainer workdir with '{ckpt_lib.CHECKPOINT_DIR}/<step>/state', "
                f"a checkpoint root, or a step directory (looked in {reader.directory})."
            )
        if step is not None and step not in steps:
            raise SamplingCheckpointError(f"checkpoint step {step} not found in {reader.directory}; it has {steps}.")
        mesh = _sample_mesh()
        which = "ema" if use_ema else "params"
        problems = []
        for s in [step] if step is not None else list(reversed(steps)):
            try:
                graphdef, params, config = _restore_params(reader, s, which, NamedSharding(mesh, P()))
            except Exception as e:  # any failure to read a step makes it unusable
                msg = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
                problems.append(f"step {s}: {msg}")
                if step is None:
                    logging.warning("checkpoint step %d in %s is damaged (%s); trying the previous one", s, path, msg)
                continue
            if problems:
                logging.warning("sampling from the previous good checkpoint, step %d", s)
            return cls(graphdef, params, config, step=s, path=os.path.join(reader.directory, str(s)))
        raise SamplingCheckpointError(f"no usable checkpoint in {path!r} ({'; '.join(problems)}).")

    # --- helpers ------------------------------------------------------------------------

    def class_grid(self, num_per_class: int) -> np.ndarray:
        """Labels ``(num_classes · num_per_class,)``: ``num_per_class`` of class 0, then of class 1, ..."""
        if self.num_classes == 0:
            raise ValueError("class_grid needs a class-conditional model; this one has num_classes=0.")
        return np.repeat(np.arange(self.num_classes, dtype=np.int32), num_per_class)

    @property
    def num_traces(self) -> int:
        """Total number of times any sampling function was traced (= compiled)."""
        return sum(self.traces.values())

    def _labels(self, labels: Any, num_samples: int | None) -> tuple[np.ndarray | None, int]:
        if num_samples is not None and (
            not isinstance(num_samples, int | np.integer) or isinstance(num_samples, bool) or num_samples < 1
        ):
            raise ValueError(f"num_samples must be an int >= 1 or None; got {num_samples!r}.")
        if labels is None:
            if num_samples is None:
                raise ValueError("give labels (N,) or num_samples (or both).")
            if self.num_classes == 0:
                return None, int(num_samples)
            return np.arange(num_samples, dtype=np.int32) % self.num_classes, int(num_samples)
        if self.num_classes == 0:
            raise ValueError("labels must be None: this model is unconditional (config.model.num_classes=0).")
        arr = np.asarray(labels)
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"labels must be integers in [0, {self.num_classes}); got dtype {arr.dtype}.")
        if arr.ndim == 0:
            if num_samples is None:
                raise ValueError("a scalar label needs num_samples (how many samples of that class).")
            arr = np.full((num_samples,), arr)
        if arr.ndim != 1 or arr.shape[0] == 0:
            raise ValueError(f"labels must have shape (N,) with N >= 1; got shape {arr.shape}.")
        if num_samples is not None and arr.shape[0] != num_samples:
            raise ValueError(f"labels has {arr.shape[0]} entries but num_samples={num_samples}.")
        bad = arr[(arr < 0) | (arr >= self.num_classes)]
        if bad.size:
            n_cls = self.num_classes
            raise ValueError(f"labels must lie in [0, {n_cls}) (class {n_cls} is the null class); got {bad[:8]}.")
        return arr.astype(np.int32), int(arr.shape[0])

    def _guidance(self, guidance: Any, solver: str) -> tuple[np.ndarray, bool]:
        """``(values as float32 0-d or (G,), sweep?)``; ValueError naming ``guidance``."""
        try:
            g = np.asarray(guidance, np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"guidance must be a number or a 1-D sequence of numbers; got {guidance!r}.") from e
        if g.ndim > 1 or (g.ndim == 1 and g.shape[0] == 0):
            raise ValueError(f"guidance must be a scalar or a non-empty 1-D sweep (G,); got shape {g.shape}.")
        if not np.all(np.isfinite(g)):
            raise ValueError(f"guidance must be finite; got {g}.")
        if solver in solvers.GM_SOLVERS and not np.all((g >= 0.0) & (g < 1.0)):
            raise ValueError(f"guidance for {solver!r} is the probabilistic w̃ and must lie in [0, 1); got {g}.")
        if solver in solvers.BASELINE_SOLVERS and not np.all(g >= 0.0):
            raise ValueError(f"guidance for {solver!r} is the CFG scale w and must be >= 0; got {g}.")
        if np.any(g != 0.0):
            if self.null_label is None:
                raise ValueError(f"guidance={g} needs a class-conditional model with a null class; this one has none.")
            if float(self.config.get("loss", {}).get("label_dropout", 0.1)) == 0.0:
                logging.warning("guidance with a model trained without label dropout: its null class is untrained")
        return g.astype(np.float32), g.ndim == 1

    def _function(self, static: tuple) -> Callable[..., jax.Array]:
        """The jitted sampler of one static configuration (built once, then cached)."""
        if static in self._fns:
            return self._fns[static]
        solver, order, num_steps, num_substeps, guided, sweep, use_spectrum = static
        graphdef, null_label, shape = self.graphdef, self.null_label, self.data_shape

        def run(params, k_noise, k_solver, index, labels, guidance, orthogonal, shift):
            self.traces[static] = self.traces.get(static, 0) + 1  # Python side effect: runs once per trace
            model = nnx.merge(graphdef, params)
            noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(k_noise, i), shape, jnp.float32))(index)
            spectrum_fn = model.spectrum if use_spectrum else None

            def one(w: jax.Array) -> jax.Array:
                return solvers.sample(
                    model.net,
                    noise,
                    labels,
                    key=k_solver,
                    solver=solver,
                    order=order,
                    num_steps=num_steps,
                    num_substeps=num_substeps,
                    guidance=w if guided else 0.0,
                    orthogonal=orthogonal,
                    null_label=null_label,
                    shift=shift,
                    spectrum_fn=spectrum_fn,
                )

            return jax.vmap(one)(guidance) if sweep else one(guidance)

        fn = jax.jit(run)
        self._fns[static] = fn
        return fn

    # --- sampling -----------------------------------------------------------------------

    def sample(
        self,
        key: jax.Array | int,
        labels: Any = None,
        num_samples: int | None = None,
        *,
        solver: str = "gm-ode",
        order: int = 2,
        num_steps: int = 8,
        num_substeps: int = 1,
        guidance: float | Sequence[float] | np.ndarray = 0.0,
        orthogonal: float = 1.0,
        shift: float = 1.0,
        batch_size: int = 512,
        use_spectrum: bool = True,
        progress: bool | None = None,
    ) -> np.ndarray:
        """Draws ``x0``: (N, *data_shape), or (G, N, *data_shape) when ``guidance`` is a 1-D sweep of G values.

        ``key``: a PRNG key or an int seed. ``labels``: (N,) ints in ``[0, num_classes)``, a single
        int (with ``num_samples``), or None (classes ``i % num_classes``; unconditional models: None).
        ``solver`` ∈ {'gm-ode', 'gm-sde', 'euler', 'ddpm', 'dpmpp-2m'}; ``guidance``: the
        probabilistic ``w̃ ∈ [0, 1)`` (GM solvers) or the CFG scale (baselines); ``num_substeps``
        for 'gm-ode' only. 'gm-sde' uses the model's SpectrumMLP on images when it has one and
        ``use_spectrum``. Samples are drawn ``batch_size`` at a time (all G sweep values at once),
        with a progress line per chunk when there is more than one (``progress``).
        """
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}.")
        for name, value in (("order", order), ("num_steps", num_steps), ("num_substeps", num_substeps)):
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}.")
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2; got {order!r}.")
        if num_substeps != 1 and solver != "gm-ode":
            raise ValueError(f"num_substeps must be 1 for solver {solver!r} (only 'gm-ode' has sub-steps).")
        if not isinstance(batch_size, int | np.integer) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}.")
        if not (isinstance(shift, int | float) and shift > 0):
            raise ValueError(f"shift must be a number > 0; got {shift!r}.")
        if not (isinstance(orthogonal, int | float) and 0.0 <= orthogonal <= 1.0):
            raise ValueError(f"orthogonal must be a number in [0, 1]; got {orthogonal!r}.")
        labels_np, n = self._labels(labels, num_samples)
        g, sweep = self._guidance(guidance, solver)
        if isinstance(key, int | np.integer):
            key = jax.random.PRNGKey(int(key))
        spectrum = use_spectrum and self.has_spectrum and solver == "gm-sde" and len(self.data_shape) == 3
        static = (solver, int(order), int(num_steps), int(num_substeps), bool(np.any(g != 0.0)), sweep, spectrum)
        fn = self._function(static)

        ndev = self.mesh.size
        chunk = -(-min(int(batch_size), n) // ndev) * ndev  # a multiple of the device count
        starts = list(range(0, n, chunk))
        show = progress if progress is not None else len(starts) > 1
        k_noise, k_solver = jax.random.fold_in(key, NOISE_KEY), jax.random.fold_in(key, SOLVER_KEY)
        rep = self._replicated
        g_dev = jax.device_put(jnp.asarray(g), rep)
        orth_dev, shift_dev = jax.device_put(jnp.float32(orthogonal), rep), jax.device_put(jnp.float32(shift), rep)

        def launch(start: int) -> jax.Array:
            index = np.arange(start, start + chunk, dtype=np.int32)
            lab = None
            if labels_np is not None:
                lab = np.zeros((chunk,), np.int32)
                lab[: min(chunk, n - start)] = labels_np[start : start + chunk]
                lab = jax.device_put(lab, self._batch_sharding)
            return fn(
                self.params,
                k_noise,
                jax.random.fold_in(k_solver, start),
                jax.device_put(index, self._batch_sharding),
                lab,
                g_dev,
                orth_dev,
                shift_dev,
            )

        outs: list[np.ndarray] = []
        t0 = time.time()
        pending = launch(starts[0])
        for i, start in enumerate(starts):
            nxt = launch(starts[i + 1]) if i + 1 < len(starts) else None  # keep the device busy while we copy
            out = np.asarray(jax.device_get(pending), np.float32)
            outs.append(out[:, : n - start] if sweep else out[: n - start])
            pending = nxt
            if show:
                done, elapsed = min(start + chunk, n), time.time() - t0
                print(
                    f"sampling {solver}: {done}/{n} samples, {elapsed:.1f} s, ETA {elapsed * (n - done) / done:.1f} s",
                    flush=True,
                )
        return np.concatenate(outs, axis=1 if sweep else 0)


# --- rendering ----------------------------------------------------------------------------


def save_grid_png(samples: np.ndarray, path: str, rows: int, title: str | None = None, min_height: int = 480) -> None:
    """Writes samples as a PNG: images (N, H, W, C) in [-1, 1] as a ``rows`` × N/rows grid (upscaled to at
    least ``min_height`` pixels), or 2-D points (N, 2) as a log-density histogram; ``title`` on top."""
    from PIL import Image, ImageDraw, ImageFont

    img = render(samples, rows)
    scale = max(1, -(-min_height // img.shape[0]))
    img = np.kron(img, np.ones((scale, scale, 1), np.uint8)) if scale > 1 else img
    if title:
        font = ImageFont.load_default(size=max(14, img.shape[1] // 40))
        pad = int(font.size * 1.8)
        canvas = Image.new("RGB", (img.shape[1], img.shape[0] + pad), "white")
        canvas.paste(Image.fromarray(img), (0, pad))
        ImageDraw.Draw(canvas).text((6, pad // 5), title, fill="black", font=font)
        img = np.asarray(canvas)
    save_png(img, path)


# --- command line -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m gmflow_jax.sampling", description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True, help="trainer workdir, its checkpoints/ root, or a step directory")
    ap.add_argument("--out", required=True, help="output .npz (PNG grids are written beside it)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest good one)")
    ap.add_argument("--no_ema", action="store_true", help="use the raw parameters instead of the EMA")
    ap.add_argument("--num_per_class", type=int, default=8, help="samples per class (class-conditional models)")
    ap.add_argument("--num_samples", type=int, default=4096, help="samples (unconditional models)")
    ap.add_argument("--solver", default="gm-ode", choices=SOLVERS)
    ap.add_argument("--order", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--substeps", type=int, default=1)
    ap.add_argument("--guidance", type=float, nargs="+", default=[0.0], help="one value, or several (one sweep)")
    ap.add_argument("--orthogonal", type=float, default=1.0)
    ap.add_argument("--shift", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch_size", type=int, default=512)
    ap.add_argument("--no_png", action="store_true")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.out.endswith(".npz"):
        print(f"gmflow_jax.sampling: error: --out must end in .npz; got {args.out!r}", file=sys.stderr)
        return 2
    try:
        sampler = Sampler.from_checkpoint(args.workdir, step=args.step, use_ema=not args.no_ema)
        if sampler.num_classes:
            labels, num = sampler.class_grid(args.num_per_class), None
        else:
            labels, num = None, args.num_samples
        guidance = args.guidance[0] if len(args.guidance) == 1 else args.guidance
        t0 = time.time()
        x = sampler.sample(
            args.seed,
            labels,
            num,
            solver=args.solver,
            order=args.order,
            num_steps=args.steps,
            num_substeps=args.substeps,
            guidance=guidance,
            orthogonal=args.orthogonal,
            shift=args.shift,
            batch_size=args.batch_size,
        )
        wall = time.time() - t0
    except (ValueError, ckpt_lib.CheckpointError) as e:
        print(f"gmflow_jax.sampling: error: {e}", file=sys.stderr)
        return 1
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out[: -len(".npz")] + ".tmp.npz"
    np.savez(
        tmp,
        samples=x,
        labels=np.asarray([] if labels is None else labels, np.int32),
        guidance=np.asarray(args.guidance, np.float32),
        step=np.int64(sampler.step),
        settings=json.dumps({k: v for k, v in vars(args).items() if k not in ("out",)}),
    )
    os.replace(tmp, out)
    written = [out]
    if not args.no_png:
        per_value = x if len(args.guidance) > 1 else x[None]
        rows = sampler.num_classes if sampler.num_classes else 1
        for w, xs in zip(args.guidance, per_value, strict=True):
            png = out[: -len(".npz")] + (f"_w{w:g}.png" if len(args.guidance) > 1 else ".png")
            title = f"{args.solver} order {args.order}, {args.steps} steps, guidance {w:g} (step {sampler.step})"
            save_grid_png(xs, png, rows, title)
            written.append(png)
    print(f"sampled {x.shape} in {wall:.1f} s from {sampler.path}; wrote {', '.join(written)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
