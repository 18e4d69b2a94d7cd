"""Checkpoint → ``Sampler``: jitted (and, for guidance sweeps, vmapped) GM-ODE / GM-SDE sampling.

Colab use::

    from gmflow_jax.sampling import Sampler
    sampler = Sampler.from_checkpoint("runs/digits")              # latest good step, EMA weights
    x0 = sampler.sample(0, labels=sampler.class_grid(8))          # (80, 8, 8, 1) numpy, classes in order
    xs = sampler.sample(0, labels=3, num_samples=16, solver="gm-sde", guidance=[0.0, 0.1, 0.3])  # (3, 16, 8, 8, 1)

A pi-Flow student (a run whose ``config.distill.nfe`` is N ≥ 1, docs/method.md §10) is sampled with its
own policy, ``solver='piflow'``, the default for it::

    student = Sampler.from_checkpoint("runs/piflow_1step")
    x0 = student.sample(0, labels=[88, 207], decode=True)      # N = distill.nfe network evaluations
    x0 = student.sample(0, labels=[88, 207], solver="piflow", num_steps=2, total_substeps=128, temperature=0.3)

``num_steps``, ``total_substeps``, ``temperature``, ``final_step_size_scale`` and ``shift`` default to the
run's ``config.distill``. A student takes no guidance (it is baked in by distillation) and no other
solver (its network is trained only at the starts of its N steps); ``'piflow'`` on a model that is not
a student is refused too. Each is one line naming the value.

``sample`` compiles one function per static configuration (solver, order, steps, sub-steps,
guided or not, sweep length, chunk size); the guidance ``w̃``, ``orthogonal``, ``shift`` and pi-Flow's
``temperature`` and ``final_step_size_scale`` are traced, so a sweep never recompiles. Sample ``i``
starts from noise drawn with ``fold_in(key, i)``, so GM-ODE and pi-Flow samples do not depend on
``batch_size`` (GM-SDE noise is drawn per chunk). The command line is ``python -m gmflow_jax.sampling``
(``__main__``).

This package reads checkpoints only through ``gmflow_jax.checkpoint`` and imports neither the
trainer nor the data pipeline (grain, TFDS).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gmflow_jax import checkpoint as ckpt_lib
from gmflow_jax import recovery, solvers, storage
from gmflow_jax.models.factory import data_shape
from gmflow_jax.sampling import labels as labels_lib
from gmflow_jax.sampling.function import PIFLOW, SOLVERS, sample_fn
from gmflow_jax.sampling.loading import SamplingCheckpointError, distill_settings, load_step

__all__ = ["NOISE_KEY", "PIFLOW", "SOLVERS", "SOLVER_KEY", "Sampler", "SamplingCheckpointError", "sample_fn"]

NOISE_KEY, SOLVER_KEY = 0, 1  # fold_in offsets of the user's key


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
        workdir: str | None = None,
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
        self.distill = distill_settings(config)
        self.workdir = workdir
        self._vae: Any = None
        self._fns: dict[tuple, Callable[..., jax.Array]] = {}
        self.traces: dict[tuple, int] = {}  # static configuration -> times traced (compiled)

    @classmethod
    def from_checkpoint(cls, path: str, step: int | None = None, use_ema: bool = True) -> Sampler:
        """Loads ``path`` (a trainer workdir, its ``checkpoints/`` root, or one ``checkpoints/<step>`` directory).

        ``step=None``: the newest good step (a damaged newest step is skipped with a warning, never
        moved). An explicit ``step`` that is missing or damaged raises ``SamplingCheckpointError``
        (a ``ValueError`` and a ``checkpoint.CheckpointError``) naming the path.
        """
        try:
            directory, pinned = ckpt_lib.locate(path)
        except ckpt_lib.CheckpointError as e:
            raise SamplingCheckpointError(str(e)) from None
        if step is not None and (not isinstance(step, int | np.integer) or step < 0):
            raise ValueError(f"step must be a non-negative int or None; got {step!r}.")
        if pinned is not None:
            if step is not None and step != pinned:
                raise ValueError(f"step={step} contradicts the step directory {path!r} (step {pinned}).")
            step = pinned
        steps = ckpt_lib.list_steps(directory)
        if not steps:
            raise SamplingCheckpointError(
                f"no checkpoint in {path!r}: expected a trainer workdir with '{ckpt_lib.CHECKPOINT_DIR}/<step>/state', "
                f"a checkpoint root, or a step directory (looked in {directory})."
            )
        if step is not None and step not in steps:
            raise SamplingCheckpointError(f"checkpoint step {step} not found in {directory}; it has {steps}.")
        sharding = NamedSharding(_sample_mesh(), P())
        which = "ema" if use_ema else "params"
        found, problems = recovery.newest_good(
            [step] if step is not None else steps,
            recovery.with_retries(lambda s: load_step(directory, s, which, sharding)),
            where=path,
        )
        if found is None:
            raise SamplingCheckpointError(f"no usable checkpoint in {path!r} ({'; '.join(problems)}).")
        s, (graphdef, params, config) = found
        if problems:
            logging.warning("sampling from the previous good checkpoint, step %d", s)
        root = storage.workdir_path(directory)
        return cls(graphdef, params, config, step=s, path=str(root / str(s)), workdir=str(root.parent))

    # --- helpers ------------------------------------------------------------------------

    def class_grid(self, num_per_class: int) -> np.ndarray:
        """Labels ``(num_classes · num_per_class,)``: ``num_per_class`` of class 0, then of class 1, ..."""
        if self.num_classes == 0:
            raise ValueError("class_grid needs a class-conditional model; this one has num_classes=0.")
        return np.repeat(np.arange(self.num_classes, dtype=np.int32), num_per_class)

    def label_ids(self, names: str | Sequence[str | int]) -> list[int]:
        """Class names (ImageNet: ``["macaw", "golden retriever"]`` → ``[88, 207]``; digits: ``"7"`` or
        ``"seven"``) → label ids; case- and whitespace-insensitive (``sampling.labels``). ValueError, one line,
        for an unknown name (suggesting the nearest) or a model whose classes have no names."""
        return labels_lib.class_index(self.config).ids(names)

    def decode(self, latents: Any) -> np.ndarray:
        """Latents in the model's scaled space (as sampled), (N, h, w, C) or (G, N, h, w, C), -> uint8 images
        (N, H, W, 3) or (G, N, H, W, 3) through the run's VAE (``config.model.vae``)."""
        latents = np.asarray(latents, np.float32)
        if latents.ndim == 5:
            return np.stack([self.decode(x) for x in latents])
        if latents.ndim != 4 or latents.shape[1:] != self.data_shape:
            raise ValueError(
                f"latents must have shape (N, {', '.join(map(str, self.data_shape))}); got {latents.shape}."
            )
        from gmflow_jax.models import vae_apply

        return vae_apply.decode(self.vae, latents)

    @property
    def vae(self) -> Any:
        """The VAE of ``config.model.vae`` (a diffusers folder; relative to the workdir), loaded on first use."""
        if self._vae is None:
            folder = str(self.config.model.get("vae", "") or "")
            if not folder:
                raise ValueError("decode needs a latent model: this run's config.model.vae is '' (pixel-space data).")
            from gmflow_jax.models import vae as vae_lib

            self._vae = vae_lib.load_vae(vae_lib.vae_folder(folder, self.workdir))
        return self._vae

    @property
    def is_student(self) -> bool:
        """A pi-Flow student (``config.distill.nfe >= 1``): sampled with ``solver='piflow'`` only."""
        return self.distill["nfe"] >= 1

    @property
    def default_solver(self) -> str:
        """``'piflow'`` for a pi-Flow student, else ``'gm-ode'``."""
        return PIFLOW if self.is_student else "gm-ode"

    def settings(
        self,
        solver: str | None = None,
        num_steps: int | None = None,
        shift: float | None = None,
        total_substeps: int | None = None,
        temperature: float | None = None,
        final_step_size_scale: float | None = None,
    ) -> dict[str, Any]:
        """The settings ``sample`` uses for these arguments (None: the model's default), checked against the
        model: ``{'solver', 'num_steps', 'shift'}`` plus, for 'piflow', ``total_substeps``, ``temperature`` and
        ``final_step_size_scale``. ValueError, one line naming the value, for 'piflow' on a model that is not a
        student, another solver on a student, or a pi-Flow setting with another solver."""
        solver = self.default_solver if solver is None else solver
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}.")
        nfe = self.distill["nfe"]
        policy = dict(
            total_substeps=total_substeps, temperature=temperature, final_step_size_scale=final_step_size_scale
        )
        if solver != PIFLOW:
            if self.is_student:
                raise ValueError(
                    f"solver={solver!r}: this model is a pi-Flow student (config.distill.nfe = {nfe}), trained to be "
                    f"sampled by its own policy only: use solver={PIFLOW!r} (the default for it)."
                )
            given = [k for k, v in policy.items() if v is not None]
            if given:
                raise ValueError(f"{given[0]} is a setting of solver={PIFLOW!r}; got solver={solver!r}.")
            return {
                "solver": solver,
                "num_steps": 8 if num_steps is None else num_steps,
                "shift": 1.0 if shift is None else shift,
            }
        if not self.is_student:
            raise ValueError(
                f"solver={PIFLOW!r}: this model is not a pi-Flow student (config.distill.nfe = {nfe}); "
                f"use one of {solvers.SOLVERS}."
            )
        out = {"solver": solver, "num_steps": nfe if num_steps is None else num_steps}
        out["shift"] = self.distill["shift"] if shift is None else shift
        out.update({k: self.distill[k] if v is None else v for k, v in policy.items()})
        for name in ("num_steps", "total_substeps"):
            value = out[name]
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")
        for name in ("temperature", "final_step_size_scale"):
            value = out[name]
            if not (isinstance(value, int | float | np.floating) and not isinstance(value, bool) and value > 0):
                raise ValueError(f"{name} must be a number > 0; got {value!r}.")
        if out["num_steps"] != nfe:
            logging.warning(
                "sampling a %d-step pi-Flow student with num_steps=%d: its network was trained at the starts of "
                "its own %d steps only",
                nfe,
                out["num_steps"],
                nfe,
            )
        return out

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
        if np.any(g != 0.0):
            if self.null_label is None:
                raise ValueError(f"guidance={g} needs a class-conditional model with a null class; this one has none.")
            if float(self.config.get("loss", {}).get("label_dropout", 0.1)) == 0.0:
                logging.warning("guidance with a model trained without label dropout: its null class is untrained")
        return g.astype(np.float32), g.ndim == 1

    def _check_student_arguments(self, guidance: Any, orthogonal: Any, num_substeps: Any) -> None:
        """ValueError, one line, for a GM-solver argument given to 'piflow' (a student is sampled without guidance)."""
        try:
            unguided = np.all(np.asarray(guidance, np.float64) == 0.0) and np.ndim(guidance) == 0
        except (TypeError, ValueError):
            unguided = False
        if not unguided or orthogonal is not None:
            raise ValueError(
                f"guidance is baked into a pi-Flow student by distillation: solver={PIFLOW!r} takes guidance=0.0 "
                f"and orthogonal=None; got guidance={guidance!r}, orthogonal={orthogonal!r}."
            )
        if num_substeps != 1:
            raise ValueError(
                f"num_substeps is GM-ODE's; solver={PIFLOW!r} takes total_substeps (the policy's Euler sub-steps "
                f"over the whole trajectory); got num_substeps={num_substeps!r}."
            )

    def _function(self, static: tuple) -> Callable[..., jax.Array]:
        """The jitted sampler of one static configuration (built once, then cached)."""
        if static in self._fns:
            return self._fns[static]
        run = sample_fn(self.graphdef, self.data_shape, self.null_label, static)

        def counted(*args):
            self.traces[static] = self.traces.get(static, 0) + 1  # Python side effect: runs once per trace
            return run(*args)

        fn = jax.jit(counted)
        self._fns[static] = fn
        return fn

    # --- sampling -----------------------------------------------------------------------

    def sample(
        self,
        key: jax.Array | int,
        labels: Any = None,
        num_samples: int | None = None,
        *,
        solver: str | None = None,
        order: int = 2,
        num_steps: int | None = None,
        num_substeps: int = 1,
        guidance: float | Sequence[float] | np.ndarray = 0.0,
        orthogonal: float | None = None,
        shift: float | None = None,
        batch_size: int = 512,
        use_spectrum: bool = True,
        progress: bool | None = None,
        noise: Any = None,
        decode: bool = False,
        total_substeps: int | None = None,
        temperature: float | None = None,
        final_step_size_scale: float | None = None,
    ) -> np.ndarray:
        """Draws ``x0``: (N, *data_shape), or (G, N, *data_shape) when ``guidance`` is a 1-D sweep of G values.

        ``key``: a PRNG key or an int seed. ``labels``: (N,) ints in ``[0, num_classes)``, a single
        int (with ``num_samples``), or None (classes ``i % num_classes``; unconditional models: None).
        ``solver`` ∈ {'gm-ode', 'gm-sde', 'euler', 'ddpm', 'dpmpp-2m', 'unipc'} (default 'gm-ode', ``num_steps`` 8,
        ``shift`` 1) or, for a pi-Flow student only, 'piflow' (its default; see the module docstring:
        ``num_steps``, ``shift``, ``total_substeps``, ``temperature``, ``final_step_size_scale`` default to its
        ``config.distill``; ``order`` is not used; no guidance); ``guidance``: the
        probabilistic ``w̃ ∈ [0, 1)`` (GM solvers) or the CFG scale (baselines); ``orthogonal``: the
        guidance bias projection (None: 1 for GM solvers, 0 = plain CFG for baselines); ``num_substeps``
        for 'gm-ode' only. 'gm-sde' uses the model's SpectrumMLP on images when it has one and
        ``use_spectrum``. Samples are drawn ``batch_size`` at a time (all G sweep values at once),
        with a progress line per chunk when there is more than one (``progress``). ``noise``
        (N, *data_shape): the starting ``x`` at t = 1 instead of the drawn noise (to reproduce a sample
        made elsewhere). ``decode``: return uint8 images (N, H, W, 3) (or (G, N, H, W, 3)) through the
        run's VAE (see ``decode``).
        """
        setting = self.settings(solver, num_steps, shift, total_substeps, temperature, final_step_size_scale)
        solver, num_steps, shift = setting["solver"], setting["num_steps"], setting["shift"]
        if solver == PIFLOW:
            self._check_student_arguments(guidance, orthogonal, num_substeps)
            num_substeps, orthogonal, order = setting["total_substeps"], 0.0, 0
        else:
            solvers.check_settings(solver, order, num_steps, num_substeps, guidance)
        if not isinstance(batch_size, int | np.integer) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}.")
        if not (isinstance(shift, int | float) and shift > 0):
            raise ValueError(f"shift must be a number > 0; got {shift!r}.")
        if orthogonal is None:
            orthogonal = solvers.default_orthogonal(solver)
        if not (isinstance(orthogonal, int | float) and 0.0 <= orthogonal <= 1.0):
            raise ValueError(f"orthogonal must be a number in [0, 1] or None; got {orthogonal!r}.")
        if noise is not None:
            noise = np.asarray(noise, np.float32)
            if noise.ndim != 1 + len(self.data_shape) or noise.shape[1:] != self.data_shape:
                raise ValueError(f"noise must have shape (N, *{self.data_shape}); got {noise.shape}.")
            if num_samples is None and (labels is None or np.ndim(labels) == 0):
                num_samples = noise.shape[0]
        labels_np, n = self._labels(labels, num_samples)
        if noise is not None and noise.shape[0] != n:
            raise ValueError(f"noise has {noise.shape[0]} samples but there are {n} labels / num_samples.")
        g, sweep = self._guidance(guidance, solver)
        if isinstance(key, int | np.integer):
            key = jax.random.PRNGKey(int(key))
        if jnp.shape(key) not in ((), (2,)):
            raise ValueError(
                f"key must be one PRNG key or an int seed; got an array of shape {jnp.shape(key)}. "
                "For several batches, call sample once per key."
            )
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
        policy = [setting.get(k, 1.0) for k in ("temperature", "final_step_size_scale")]
        policy_dev = [jax.device_put(jnp.float32(v), rep) for v in policy]

        def launch(start: int) -> jax.Array:
            index = np.arange(start, start + chunk, dtype=np.int32)
            lab = None
            if labels_np is not None:
                lab = np.zeros((chunk,), np.int32)
                lab[: min(chunk, n - start)] = labels_np[start : start + chunk]
                lab = jax.device_put(lab, self._batch_sharding)
            given = None
            if noise is not None:
                given = np.zeros((chunk, *self.data_shape), np.float32)
                given[: min(chunk, n - start)] = noise[start : start + chunk]
                given = jax.device_put(given, self._batch_sharding)
            return fn(
                self.params,
                k_noise,
                jax.random.fold_in(k_solver, start),
                jax.device_put(index, self._batch_sharding),
                lab,
                g_dev,
                orth_dev,
                shift_dev,
                given,
                *policy_dev,
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
        x = np.concatenate(outs, axis=1 if sweep else 0)
        return self.decode(x) if decode else x
