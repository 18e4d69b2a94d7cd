"""What every command line of the project shares (used only by the ``__main__`` modules).

``run(main, prog=...)`` is ``absl.app.run`` with: quiet library logs; one line
``<prog>: error: <message>`` on stderr (exit 2) for a bad flag, a typo in a ``--config.*``
override or a config file that does not load; one such line (exit 1) for the errors a user can fix
(``expected``: bad values, missing or damaged checkpoints, ...); the full traceback only with
``--verbose``. Unexpected exceptions (bugs) always show their traceback.

Importing it sets ``JAX_PLATFORMS`` on a machine without TPU device files, unless the user set it
(``skip_tpu_probe``): JAX would otherwise load libtpu (a test dependency) to look for a TPU, and libtpu
prints "could not determine TPU accelerator type" and an ``E0000 ... unexpected worker hostname`` error.
It also keeps XLA:CPU's reductions in XLA's own code (``keep_cpu_reductions_in_xla``).
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import logging as py_logging
import os
import pkgutil
import sys
import warnings
from collections.abc import Callable, Sequence

from absl import app, flags


def _cuda_plugin_installed() -> bool:
    """Whether JAX's CUDA plugin is installed (JAX finds plugins in ``jax_plugins`` or by entry point)."""
    spec = importlib.util.find_spec("jax_plugins")
    names = [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations or [])] if spec else []
    names += [e.name for e in importlib.metadata.entry_points(group="jax_plugins")]
    return any("cuda" in name for name in names)


def platforms_without_tpu(root: str = "/") -> str | None:
    """``JAX_PLATFORMS`` for this machine if it has no TPU, else None (JAX's own choice).

    A TPU is taken to be there if any of its device files is (v2-v4: ``/dev/accel*``; v5e, v5p, v6e:
    ``/dev/vfio/*``) or a Google PCI device other than the gVNIC NIC and NVMe disk (JAX counts TPUs there). Without
    one: ``'cpu'``, or ``'cuda,cpu'`` with NVIDIA devices and JAX's CUDA plugin; None with other GPUs (AMD,
    WSL) or NVIDIA devices without the plugin (JAX then says so).
    """

    def found(*patterns: str) -> bool:
        return any(glob.glob(os.path.join(root, p)) for p in patterns)

    def read(path: str) -> str:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return ""

    if found("dev/accel*", "dev/vfio/*"):
        return None
    for device in glob.glob(os.path.join(root, "sys/bus/pci/devices/*")):
        if read(f"{device}/vendor") == "0x1ae0" and read(f"{device}/device") not in ("0x0042", "0x001f"):
            return None
    if found("dev/kfd", "dev/dxg"):
        return None
    if found("dev/nvidia[0-9]*", "dev/nvidiactl"):
        return "cuda,cpu" if _cuda_plugin_installed() else None
    return "cpu"


def skip_tpu_probe() -> None:
    """Sets ``JAX_PLATFORMS`` to ``platforms_without_tpu()`` unless the user set it (even to ''), so that JAX
    does not load libtpu to probe for a TPU that is not there; before JAX's backends start (idempotent)."""
    if "JAX_PLATFORMS" in os.environ or (platforms := platforms_without_tpu()) is None:
        return
    os.environ["JAX_PLATFORMS"] = platforms
    if "jax" in sys.modules:  # imported before us (JAX read the variable then): tell its config
        sys.modules["jax"].config.update("jax_platforms", platforms)


skip_tpu_probe()

# jaxlib 0.10's XLA:CPU hands reductions (softmax, LayerNorm statistics, the pi-Flow policy's sums over its
# K Gaussians) to YNNPACK library fusions, whose fixed cost per call dominates on the small arrays of a
# sampler's or a policy rollout's loop: without them the digits pi-Flow step is 1.7x faster, a policy
# rollout 4.5x (docs/performance.md §8). YNNPACK keeps the matmuls.
CPU_REDUCTIONS_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-reduce"


def keep_cpu_reductions_in_xla() -> None:
    """Adds ``CPU_REDUCTIONS_FLAG`` to ``XLA_FLAGS`` unless they name ``xla_cpu_experimental_ynn_fusion_type``
    (``+reduce`` gives the library default back) or jaxlib is not 0.10 (where the flag is measured); only
    XLA:CPU reads it, when JAX's CPU backend starts (idempotent)."""
    flags_now = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags_now or not _jaxlib_version().startswith("0.10."):
        return
    os.environ["XLA_FLAGS"] = f"{flags_now} {CPU_REDUCTIONS_FLAG}".strip()


def _jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ""


keep_cpu_reductions_in_xla()

_QUIET_PATHS = ("/orbax/", "/grain/", "/tensorflow_datasets/", "/jax/_src/xla_bridge")
_QUIET_LOGGERS = ("jax._src.xla_bridge",)  # "Unable to initialize backend 'tpu'" on every CPU/GPU run


class _LibraryInfoFilter(py_logging.Filter):
    """Drops INFO/DEBUG absl records emitted from chatty libraries (orbax, grain, TFDS, backend probing)
    and shortens their warnings and errors to one line (no traceback) unless ``tracebacks``."""

    def __init__(self, tracebacks: bool):
        super().__init__()
        self.tracebacks = tracebacks

    def filter(self, record: py_logging.LogRecord) -> bool:
        path = record.pathname.replace("\\", "/")
        if not any(p in path for p in _QUIET_PATHS):
            return True
        if record.levelno < py_logging.WARNING:
            return False
        if not self.tracebacks:
            record.msg, record.args = one_line(RuntimeError(record.getMessage())), None
            record.exc_info, record.exc_text = None, None
        return True


def quiet_library_logs(tracebacks: bool = False) -> None:
    """Keeps the console to the project's own lines and the libraries' one-line warnings (idempotent)."""
    absl_logger = py_logging.getLogger("absl")
    for f in [f for f in absl_logger.filters if isinstance(f, _LibraryInfoFilter)]:
        absl_logger.removeFilter(f)
    absl_logger.addFilter(_LibraryInfoFilter(tracebacks))
    # After a failed asynchronous save, asyncio reports each abandoned write ("Task exception was never
    # retrieved", with a traceback); the failure itself is reported once.
    py_logging.getLogger("asyncio").setLevel(py_logging.WARNING if tracebacks else py_logging.CRITICAL)
    for name in _QUIET_LOGGERS:
        py_logging.getLogger(name).setLevel(py_logging.WARNING)


def _is_closed_loop_echo(value: BaseException | None) -> bool:
    return isinstance(value, RuntimeError) and "Event loop is closed" in str(value)


def _drop_closed_loop_echoes() -> None:
    """Drops the "Event loop is closed" errors that storage callbacks print (as unraisable or uncaught
    exceptions) after an asynchronous checkpoint operation has failed: the failure itself is reported
    once, in one line."""
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def on_exception(kind: type[BaseException], value: BaseException, tb: object) -> None:
        if not _is_closed_loop_echo(value):
            excepthook(kind, value, tb)

    def on_unraisable(unraisable: object) -> None:
        if not _is_closed_loop_echo(getattr(unraisable, "exc_value", None)):
            unraisablehook(unraisable)

    sys.excepthook, sys.unraisablehook = on_exception, on_unraisable


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line: its lines joined, or only the first if that is long."""
    while e.args and isinstance(e.args[0], BaseException):  # e.g. ConfigDict's AttributeError(KeyError(...))
        e = e.args[0]
    message = e.args[0] if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) else str(e)
    lines = [line.strip() for line in message.splitlines() if line.strip()] or [type(e).__name__]
    joined = " ".join(lines)
    return joined if len(joined) <= 300 else lines[0]


def define_multihost_flags() -> None:
    """``--multihost`` / ``--coordinator_address --num_processes --process_id`` / ``--distributed_timeout``."""
    flags.DEFINE_bool(
        "multihost", False, "Call jax.distributed.initialize() from the environment (TPU pods, SLURM...)."
    )
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for jax.distributed.initialize.")
    flags.DEFINE_integer("num_processes", None, "Number of processes for jax.distributed.initialize.")
    flags.DEFINE_integer("process_id", None, "This process's id for jax.distributed.initialize.")
    flags.DEFINE_integer("distributed_timeout", 300, "Seconds to wait for all processes in jax.distributed.initialize.")


def initialize_multihost() -> None:
    """``jax.distributed.initialize`` as the multihost flags ask (nothing without them); a failure is an error."""
    from gmflow_jax.multihost import initialize_distributed

    f = flags.FLAGS
    initialize_distributed(
        multihost=f.multihost,
        coordinator_address=f.coordinator_address,
        num_processes=f.num_processes,
        process_id=f.process_id,
        timeout=f.distributed_timeout,
    )


def run(
    main: Callable[[list[str]], int | None],
    *,
    prog: str,
    expected: tuple[type[BaseException], ...] = (ValueError, OSError),
    argv: Sequence[str] | None = None,
) -> None:
    """``absl.app.run(main)`` with one-line errors (see the module docstring)."""
    flags.DEFINE_bool("verbose", False, "Show full tracebacks for errors (by default: one line).")
    quiet_library_logs()

    def fail(e: BaseException, code: int) -> None:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
        # background threads of the libraries may still echo the failure at shutdown (logs, abandoned coroutines)
        py_logging.getLogger("absl").setLevel(py_logging.CRITICAL)
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        sys.exit(code)

    def parse(args: list[str]) -> list[str]:
        try:
            return flags.FLAGS(args)
        except Exception as e:  # absl's own errors, config file and override errors
            if "--verbose" in args:
                raise
            if isinstance(e, AttributeError | KeyError):  # a --config.<field> that the config does not have
                e = ValueError(f"unknown config field {one_line(e)}")
            fail(e, 2)
            raise  # unreachable

    def guarded(args: list[str]) -> int | None:
        quiet_library_logs(tracebacks=flags.FLAGS.verbose)
        if not flags.FLAGS.verbose:
            _drop_closed_loop_echoes()
        try:
            return main(args)
        except expected as e:
            if flags.FLAGS.verbose:
                raise
            fail(e, 1)
            raise  # unreachable

    app.run(guarded, argv=list(argv) if argv is not None else None, flags_parser=parse)
