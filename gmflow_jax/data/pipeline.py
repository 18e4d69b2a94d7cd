"""One grain pipeline for every dataset: shuffle, repeat, per-process shard, batch, global ``jax.Array``.

``make_iterator`` builds a ``grain.DataLoader`` over a random-access source of
``{'image': (...), 'label': ()}`` records (a TFDS data source from ``load_source``, or any sequence
of such dicts) with a seeded ``grain.samplers.IndexSampler`` (global shuffle, infinite repeat,
this process's shard) and ``grain.transforms.Batch(drop_remainder=True)`` of the per-process batch
``global_batch_size // process_count``. The returned ``BatchIterator`` yields

* with a ``mesh``: ``{'image': (B, ...), 'label': (B,)}`` global ``jax.Array``s, ``B`` the global
  batch, split over ``batch_axes`` (default: every mesh axis, e.g. ``P(('data', 'fsdp'))``);
* without: the host-local numpy batch ``{'image': (B / P, ...) float32, 'label': (B / P,) int32}``.

Resuming: ``get_state() -> bytes`` / ``set_state(bytes)`` restore the exact stream. In an orbax
checkpoint use grain's handler (``grain.checkpoint.CheckpointHandler``; one JSON file per JAX
process, named by ``jax.process_index()``)::

    import grain
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(it)))
    mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(it)))

where ``it`` is a freshly made iterator with the same source, seed, process layout and
``worker_count`` (grain validates these; restore sets the state in place and restarts prefetch).
The stream depends on ``worker_count`` (grain deals records round-robin to its workers) but not on
``prefetch``. With a finite ``num_epochs`` grain gives every process ``len // process_count``
records per epoch; with infinite repeat every record of this process's shard is seen each epoch.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Batch = dict[str, Any]


class _Keys:
    """What grain samples and batches: record ``i`` of ``source`` is the key ``i``; ``_ReadBatch`` reads it.

    ``repr`` is grain's description of ``source`` itself, which grain checks a restored state against.
    """

    def __init__(self, source: Sequence[Any]) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int) -> int:
        return key

    def __repr__(self) -> str:
        if isinstance(self.source, list | tuple | np.ndarray):
            return str(type(self.source))
        return repr(self.source)


class _ReadBatch:
    """grain batch function: ``B`` record keys -> ``{'image': (B, ...) float32, 'label': (B,) int32}``.

    Reads the records with one ``source.__getitems__`` call (else ``source[k]`` each), split into
    ``threads`` contiguous parts read in parallel (the array_record reader releases the GIL) when
    ``threads > 1``. Per record the same values as ``np.asarray(image, float32)`` / ``np.asarray(label,
    int32)`` stacked.
    """

    def __init__(self, source: Sequence[Any], threads: int) -> None:
        self.source = source
        self.threads = threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict[str, Any]:  # sent to grain's worker processes without the pool
        return {**self.__dict__, "_pool": None}

    def _read(self, keys: list[int]) -> Sequence[dict[str, Any]]:
        if hasattr(self.source, "__getitems__"):
            return self.source.__getitems__(keys)
        return [self.source[k] for k in keys]

    def __call__(self, keys: Sequence[int]) -> dict[str, np.ndarray]:
        keys = [int(k) for k in keys]
        parts = min(self.threads, len(keys))
        if parts > 1:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="gmflow-read")
            bounds = np.linspace(0, len(keys), parts + 1).astype(int)
            chunks = [keys[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
            records = [r for part in self._pool.map(self._read, chunks) for r in part]
        else:
            records = self._read(keys)
        return {
            "image": np.stack([np.asarray(r["image"], dtype=np.float32) for r in records]),
            "label": np.asarray([r["label"] for r in records], dtype=np.int32),
        }


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str] | None = None) -> NamedSharding:
    """Sharding that splits dim 0 over ``batch_axes`` (default: all mesh axes) and replicates the rest."""
    axes = tuple(mesh.axis_names) if batch_axes is None else tuple(batch_axes)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
        raise ValueError(f"batch_axes {unknown} are not axes of the mesh {tuple(mesh.axis_names)}")
    return NamedSharding(mesh, P(axes))


def make_loader(
    source: Sequence[Any],
    *,
    local_batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 1,
    read_threads: int = 16,
) -> grain.DataLoader:
    """The host-side grain ``DataLoader`` of this process: yields ``{'image', 'label'}`` numpy batches.

    grain samples, shards, batches and deals to its workers the record keys; each batch of keys is
    then read at once (``_ReadBatch``, ``read_threads`` threads), not record by record in grain's
    per-record thread pool: the same batches at a fraction of grain's per-record cost.
    """
    shard = grain.sharding.ShardOptions(shard_index=process_index, shard_count=process_count, drop_remainder=False)
    sampler = grain.samplers.IndexSampler(
        num_records=len(source), shard_options=shard, shuffle=shuffle, num_epochs=num_epochs, seed=seed
    )
    read = _ReadBatch(source, read_threads)
    return grain.DataLoader(
        data_source=_Keys(source),
        sampler=sampler,
        operations=[grain.transforms.Batch(batch_size=local_batch_size, drop_remainder=True, batch_fn=read)],
        worker_count=worker_count,
        worker_buffer_size=worker_buffer_size,
        shard_options=shard,
        read_options=grain.ReadOptions(num_threads=0),
    )


class BatchIterator:
    """Iterator of batches with exact, checkpointable position (``get_state``/``set_state``).

    With ``prefetch > 0`` a daemon thread keeps up to ``prefetch`` batches ready (already assembled
    into ``jax.Array``s when there is a mesh); the state always refers to the last batch returned.
    """

    def __init__(
        self,
        loader: grain.DataLoader,
        assemble: Callable[[Batch], Batch] | None = None,
        prefetch: int = 0,
    ) -> None:
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self._loader = loader
        self._assemble = assemble or (lambda b: b)
        self._prefetch = prefetch
        self._it = iter(loader)
        self._state = self._it.get_state()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        if self._prefetch == 0:
            batch = next(self._it)
            self._state = self._it.get_state()
            return self._assemble(batch)
        self.start_prefetch()
        kind, value, state = self._queue.get()
        if kind == "error":  # the producer has exited; rewind to the last returned batch
            self._thread = None
            self._queue = None
            self._it.set_state(self._state)
            raise value
        self._state = state
        return value

    def get_state(self) -> bytes:
        """Position after the last returned batch (grain's JSON state, as bytes)."""
        return self._state

    def set_state(self, state: bytes) -> None:
        """Continue right after the batch at which ``state`` was taken (same loader arguments)."""
        self._stop_producer()
        self._it.set_state(state)
        self._state = self._it.get_state()

    def start_prefetch(self) -> None:
        """Start the prefetch thread (no-op if running or ``prefetch == 0``); grain's orbax handler calls it."""
        if self._prefetch == 0 or self._thread is not None:
            return
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self._prefetch)
        # The thread gets no reference to ``self``, so a dropped iterator is collected and stops it.
        args = (self._it, self._assemble, self._stop, self._queue)
        self._thread = threading.Thread(target=_produce, args=args, daemon=True, name="gmflow-data-prefetch")
        self._thread.start()

    def close(self) -> None:
        """Stop the prefetch thread; buffered batches are dropped, the state stays at the last returned one."""
        self._stop_producer()

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    def _stop_producer(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._queue = None
        # The producer ran ahead of the consumer: rewind grain to the last returned batch.
        self._it.set_state(self._state)


def _put(out: queue.Queue, item: tuple, stop: threading.Event) -> bool:
    """Put ``item`` unless ``stop`` is set first; returns whether it was put."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _produce(it: Any, assemble: Callable[[Batch], Batch], stop: threading.Event, out: queue.Queue) -> None:
    """Prefetch thread: ``('batch', batch, state after it)`` items, then one ``('error', exception, None)``."""
    try:
        while not stop.is_set():
            batch = assemble(next(it))
            if not _put(out, ("batch", batch, it.get_state()), stop):
                return
    except BaseException as e:  # StopIteration included: re-raised by the consumer
        _put(out, ("error", e, None), stop)


def _check_divisible(global_batch_size: int, process_count: int, device_count: int) -> None:
    """``ValueError`` naming the value unless ``global_batch_size`` splits evenly over processes and devices."""
    if not isinstance(global_batch_size, int | np.integer) or global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be a positive int, got {global_batch_size!r}")
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the process count {process_count}")
    if global_batch_size % device_count:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the device count {device_count}")


def make_iterator(
    source: str | Sequence[Any],
    *,
    global_batch_size: int,
    seed: int,
    data_dir: str | os.PathLike | None = None,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 1,
    read_threads: int = 16,
    prefetch: int = 2,
) -> BatchIterator:
    """Batches of ``source`` (a dataset name built into ``data_dir``, or a random-access source).

    Args:
      global_batch_size: batch over all processes; divisible by the process count and, with a
        mesh, by the number of devices it is split over (``mesh.size`` for the default axes).
      seed: shuffle seed in [0, 2**32); the stream is a function of it and the process layout.
      mesh: assemble global ``jax.Array``s sharded over ``batch_axes`` (default all mesh axes);
        ``None`` yields this process's numpy batches.
      process_index, process_count: this process's shard; default ``jax.process_index()`` /
        ``jax.process_count()``. Set explicitly to simulate hosts (only without a mesh).
      num_epochs: ``None`` repeats forever; otherwise stops after that many epochs of records.
      worker_count: grain multiprocessing workers (0: in-process).
      read_threads: threads that read parts of a batch in parallel (0 or 1: one; in-memory sources: 0).
      prefetch: batches kept ready by a background thread (0: none).
    """
    if isinstance(source, str):
        if data_dir is None:
            raise ValueError(f"dataset {source!r} given by name needs a data_dir")
        from gmflow_jax.data.sources import load_source

        source = load_source(source, data_dir)
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if mesh is not None and (process_index, process_count) != (jax.process_index(), jax.process_count()):
        raise ValueError(
            f"with a mesh, process_index/process_count ({process_index}, {process_count}) must be JAX's "
            f"({jax.process_index()}, {jax.process_count()})"
        )
    split = 1
    if mesh is not None:
        sharding = batch_sharding(mesh, batch_axes)
        axes = tuple(mesh.axis_names) if batch_axes is None else tuple(batch_axes)
        split = int(np.prod([mesh.shape[a] for a in axes]))
    _check_divisible(global_batch_size, process_count, split)
    if not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if len(source) == 0:
        raise ValueError("the data source is empty")

    if worker_count > 0 and not flags.FLAGS.is_parsed():
        # grain's worker processes read absl flags; outside absl.app (tests, Colab) they are unparsed.
        flags.FLAGS.mark_as_parsed()
    loader = make_loader(
        source,
        local_batch_size=global_batch_size // process_count,
        seed=int(seed),
        process_index=process_index,
        process_count=process_count,
        shuffle=shuffle,
        num_epochs=num_epochs,
        worker_count=worker_count,
        worker_buffer_size=worker_buffer_size,
        read_threads=read_threads,
    )
    assemble = None
    if mesh is not None:

        def assemble(batch: Batch) -> Batch:
            return {
                k: jax.make_array_from_process_local_data(sharding, v, (global_batch_size, *v.shape[1:]))
                for k, v in batch.items()
            }

    return BatchIterator(loader, assemble, prefetch=prefetch)
