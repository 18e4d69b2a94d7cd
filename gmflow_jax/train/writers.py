"""clu metric writers without TensorFlow: console (absl log) + TensorBoard event files via tensorboardX.

clu 0.0.12's ``clu.metric_writers`` package imports its TF summary writer at import time (and so
do ``clu.periodic_actions`` and everything that imports it), so without TensorFlow a plain
``import clu.metric_writers`` fails. ``import_clu()`` installs a placeholder for the TF writer
module first (only when TensorFlow is missing), after which clu's own ``MetricWriter``,
``LoggingWriter``, ``MultiWriter`` and ``periodic_actions`` import and work normally;
``TensorBoardXWriter`` is the ``MetricWriter`` that writes event files through tensorboardX.

Event files in a ``gs://`` logdir go through ``epath`` (``ObjectStoreEventFile``): an object cannot be
appended to, so each flush (tensorboardX flushes every 2 minutes) uploads the whole file again, and
past ``EVENT_PART_BYTES`` the events go on in a new file. tensorboardX's own ``gs://`` writer is
replaced: it needs ``google-cloud-storage`` and uploads one ever-growing file. Each upload first asks
``may_flush()`` (the trainer's lock fence): a trainer that lost its workdir uploads nothing more.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from absl import logging

_TF_WRITER_MODULE = "clu.metric_writers.summary_writer"
EVENT_PART_BYTES = 8 << 20  # an object-store event file is uploaded whole at each flush: start a new one past this


def import_clu() -> tuple[types.ModuleType, types.ModuleType]:
    """``(clu.metric_writers, clu.periodic_actions)``, importable with or without TensorFlow."""
    if "clu.metric_writers" not in sys.modules and importlib.util.find_spec("tensorflow") is None:
        stub = types.ModuleType(_TF_WRITER_MODULE)
        stub.__doc__ = "Placeholder installed by gmflow_jax.train.writers: TensorFlow is not installed."
        stub.SummaryWriter = None  # replaced by TensorBoardXWriter below
        sys.modules[_TF_WRITER_MODULE] = stub
    from clu import metric_writers, periodic_actions

    if metric_writers.SummaryWriter is None:
        metric_writers.SummaryWriter = _tensorboardx_writer_class(metric_writers.MetricWriter)
        sys.modules[_TF_WRITER_MODULE].SummaryWriter = metric_writers.SummaryWriter
    return metric_writers, periodic_actions


def _import_tensorboardx() -> tuple[type, types.ModuleType]:
    """``(tensorboardX.SummaryWriter, tensorboardX.record_writer)``, imported without PyTorch.

    tensorboardX imports torch whenever it is installed, only to accept ``torch.Tensor`` values (the writer here
    passes NumPy): 4–5 s of every trainer's start-up on a host with torch (docs/benchmarks.md). torch is hidden
    from that one import unless something has loaded it already; a later ``import torch`` works as usual."""
    if "tensorboardX.writer" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # ``import torch`` raises ImportError, which tensorboardX handles
        try:
            import tensorboardX.writer  # noqa: F401
        finally:
            del sys.modules["torch"]
    from tensorboardX import SummaryWriter, record_writer

    return SummaryWriter, record_writer


def _tensorboardx_writer_class(base: type) -> type:
    """Builds ``TensorBoardXWriter(base)``; ``base`` is clu's ``MetricWriter``."""

    class TensorBoardXWriter(base):
        """clu ``MetricWriter`` writing TensorBoard event files with tensorboardX (no TensorFlow)."""

        def __init__(self, logdir: str, may_flush: Callable[[], bool] = lambda: True):
            SummaryWriter, record_writer = _import_tensorboardx()
            from gmflow_jax.storage import URL_SCHEMES

            for scheme in URL_SCHEMES:
                record_writer.register_writer_factory(scheme, _ObjectStoreEvents(may_flush))
            self._writer = SummaryWriter(logdir=logdir)

        def write_summaries(self, step: int, values: Mapping[str, Any], metadata: Any = None) -> None:
            for key, value in values.items():
                arr = np.asarray(value)
                if arr.size == 1:
                    self._writer.add_scalar(key, float(arr), global_step=step)

        def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
            for key, value in scalars.items():
                self._writer.add_scalar(key, float(np.asarray(value)), global_step=step)

        def write_images(self, step: int, images: Mapping[str, Any]) -> None:
            """Images (N, H, W, C) or (H, W, C), C in {1, 3}, float in [0, 1] or uint8."""
            for key, value in images.items():
                arr = np.asarray(value)
                if arr.ndim == 4:
                    self._writer.add_images(key, arr, global_step=step, dataformats="NHWC")
                else:
                    self._writer.add_image(key, arr, global_step=step, dataformats="HWC")

        def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
            logging.log_first_n(logging.WARNING, "TensorBoardXWriter does not write videos.", 1)

        def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
            for key, value in audios.items():
                self._writer.add_audio(key, np.asarray(value), global_step=step, sample_rate=sample_rate)

        def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
            for key, value in texts.items():
                self._writer.add_text(key, value, global_step=step)

        def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets: Any = None) -> None:
            for key, value in arrays.items():
                bins = (num_buckets or {}).get(key)
                self._writer.add_histogram(key, np.asarray(value), global_step=step, max_bins=bins)

        def write_hparams(self, hparams: Mapping[str, Any]) -> None:
            self._writer.add_text("hparams", "\n".join(f"    {k} = {v}" for k, v in sorted(hparams.items())))

        def flush(self) -> None:
            self._writer.flush()

        def close(self) -> None:
            self._writer.close()

    return TensorBoardXWriter


class ObjectStoreEventFile:
    """An event file on an object store: the records are kept and the whole file is uploaded at each flush;
    past ``EVENT_PART_BYTES`` the next records go to ``<name>.0001``, ... (TensorBoard reads every
    ``*tfevents*`` file of a folder). tensorboardX calls ``write`` and ``flush`` under one lock, so a
    flush sees whole records. A flush uploads only if ``may_flush()``."""

    def __init__(self, path: str, may_flush: Callable[[], bool] = lambda: True):
        from etils import epath

        self._path = epath.Path(path)
        self._may_flush = may_flush
        self._part = 0
        self._records = bytearray()
        self._unsaved = False

    def write(self, data: bytes) -> None:
        self._records += data
        self._unsaved = True

    def flush(self) -> None:
        if not self._unsaved or not self._may_flush():
            return
        name = self._path.name + (f".{self._part:04d}" if self._part else "")
        (self._path.parent / name).write_bytes(bytes(self._records))
        self._unsaved = False
        if len(self._records) >= EVENT_PART_BYTES:
            self._part += 1
            self._records = bytearray()

    def close(self) -> None:
        self.flush()


class _ObjectStoreEvents:
    """tensorboardX writer factory for an object-store scheme (no folders to create)."""

    def __init__(self, may_flush: Callable[[], bool]):
        self._may_flush = may_flush

    def open(self, path: str) -> ObjectStoreEventFile:
        return ObjectStoreEventFile(path, self._may_flush)

    def directory_check(self, path: str) -> None:
        pass


def create_writer(logdir: str, *, primary: bool = True, may_flush: Callable[[], bool] = lambda: True) -> Any:
    """clu ``MultiWriter`` of console logging + TensorBoard event files in ``logdir`` (primary only); on an object
    store each upload of the events first asks ``may_flush()``."""
    metric_writers, _ = import_clu()
    if not primary:
        return metric_writers.MultiWriter([])
    ours = metric_writers.SummaryWriter.__name__ == "TensorBoardXWriter"  # (with TensorFlow installed: clu's own)
    events = metric_writers.SummaryWriter(logdir, may_flush) if ours else metric_writers.SummaryWriter(logdir)
    return metric_writers.MultiWriter([_console_writer(metric_writers), events])


def _console_writer(metric_writers: types.ModuleType) -> Any:
    """clu's ``LoggingWriter``, with hyperparameters logged one per line (not as one long line)."""

    class ConsoleWriter(metric_writers.LoggingWriter):
        def write_hparams(self, hparams: Mapping[str, Any]) -> None:
            logging.info("hyperparameters:\n%s", "\n".join(f"  {k} = {v}" for k, v in sorted(hparams.items())))

    return ConsoleWriter()
