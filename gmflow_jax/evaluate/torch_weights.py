"""Read a PyTorch state-dict file (``.pth``, written by ``torch.save(state_dict, path)``) into numpy arrays.

    weights = load_state_dict("pt_inception-2015-12-05-6726825d.pth")  # {name: np.ndarray}

Why: evaluation needs third-party PyTorch weights (pytorch-fid's Inception) while ``torch`` stays out of the runtime
dependencies, and a ``.pth`` file is a pickle, which ``pickle.load`` would let run any code it names. With torch
importable, :func:`load_state_dict` uses ``torch.load(..., weights_only=True)``; without it, :func:`read_torch_file`,
a restricted reader in pure Python + numpy whose unpickler knows only ``collections.OrderedDict``,
``torch._utils._rebuild_tensor_v2`` and the typed storage classes (``torch.FloatStorage`` ...), all mapped to
harmless stand-ins; any other global is refused.

Both layouts ``torch.save`` writes (``torch/serialization.py``):

* zip (torch >= 1.6): one top folder holding ``data.pkl`` (the object; tensors as persistent ids
  ``('storage', storage_type, key, location, numel)``), ``data/<key>`` (raw little-endian storage bytes),
  ``byteorder`` (optional; ``big`` is refused), ``version``, ...
* legacy (``_use_new_zipfile_serialization=False``; e.g. pytorch-fid's 2019 weights): consecutive pickles of the
  magic number, the protocol version (1001), a sys_info dict, the object (persistent ids
  ``('storage', storage_type, root_key, location, numel, view_metadata)``), the list of storage keys; then per key,
  in that order, an int64 little-endian element count and the raw bytes.

bfloat16 comes back as float32 (numpy has no bfloat16); every array is a contiguous copy of its own.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from typing import IO, Any

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# The typed storage classes torch pickles (``TypedStorage._pickle_storage_type``) → the raw element dtype on disk.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),  # converted to float32 once read
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("u1"),  # converted to bool once read
}

_NOT_A_STATE_DICT = "the file is not a plain state dict (only tensors in (ordered) dicts can be read without torch)"


class _StandIn:
    """Base of the unpickler's stand-ins: refuses pickle's BUILD, so a file cannot set attributes on them."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f"refusing to set state on {type(self).__name__}: {_NOT_A_STATE_DICT}")


class _StorageType(_StandIn):
    """Stand-in for ``torch.<Name>Storage``: only carries the dtype; not callable, not a class."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = STORAGE_DTYPES[name]

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _Storage(_StandIn):
    """One storage: ``numel`` elements of ``storage_type``; ``data`` (1-D array) is filled after unpickling.

    A legacy view storage has ``root`` (the storage holding the bytes) and ``offset`` (elements into it) instead.
    """

    __slots__ = ("key", "storage_type", "numel", "root", "offset", "data")

    def __init__(
        self, key: str, storage_type: _StorageType, numel: int, root: _Storage | None = None, offset: int = 0
    ) -> None:
        self.key, self.storage_type, self.numel, self.root, self.offset = key, storage_type, numel, root, offset
        self.data: np.ndarray | None = None

    def array(self) -> np.ndarray:
        """1-D (numel,) array of the storage's elements (bfloat16 → float32, bool as bool)."""
        if self.root is not None:
            return self.root.array()[self.offset : self.offset + self.numel]
        if self.data is None:
            raise ValueError(f"no data was read for storage {self.key!r}")
        return self.data

    def set_bytes(self, raw: bytes | memoryview) -> None:
        """Fills ``data`` from exactly ``numel`` × element-size little-endian bytes."""
        arr = np.frombuffer(raw, dtype=self.storage_type.dtype, count=self.numel)
        if self.storage_type.name == "BFloat16Storage":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        elif self.storage_type.name == "BoolStorage":
            arr = arr != 0
        self.data = arr


class _TensorRef(_StandIn):
    """What ``_rebuild_tensor_v2`` returns while unpickling; :meth:`materialize` once the storages hold data."""

    __slots__ = ("storage", "offset", "size", "stride", "neg")

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...], neg: bool):
        self.storage, self.offset, self.size, self.stride, self.neg = storage, offset, size, stride, neg

    def materialize(self) -> np.ndarray:
        """A contiguous copy with shape ``size``, read from the storage with element strides ``stride``."""
        base = self.storage.array()
        if 0 in self.size:
            return np.empty(self.size, base.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        if last >= base.shape[0]:
            raise ValueError(
                f"tensor on storage {self.storage.key!r} (offset {self.offset}, size {self.size}, stride "
                f"{self.stride}) reaches element {last}, past the storage's {base.shape[0]} elements"
            )
        base = np.ascontiguousarray(base)
        item = base.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset :], shape=self.size, strides=tuple(s * item for s in self.stride), writeable=False
        )
        out = view.copy()
        return np.negative(out) if self.neg else out


def _is_int_tuple(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in x)


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``; checks its arguments and defers reading the data."""
    del requires_grad, backward_hooks  # a state dict's tensors carry neither
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"_rebuild_tensor_v2 got {type(storage).__name__} instead of a storage")
    if not (_is_int_tuple(size) and _is_int_tuple(stride) and len(size) == len(stride)):
        raise pickle.UnpicklingError(f"_rebuild_tensor_v2: bad size {size!r} / stride {stride!r}")
    if not (isinstance(storage_offset, int) and storage_offset >= 0):
        raise pickle.UnpicklingError(f"_rebuild_tensor_v2: bad storage offset {storage_offset!r}")
    metadata = metadata or {}
    if not isinstance(metadata, dict) or set(metadata) - {"neg", "conj"}:
        raise pickle.UnpicklingError(f"_rebuild_tensor_v2: unsupported tensor metadata {metadata!r}")
    # The conjugate bit is a no-op on the real dtypes read here; the negative bit is applied.
    return _TensorRef(storage, storage_offset, size, stride, bool(metadata.get("neg", False)))


class _Rebuild(_StandIn):
    """Stand-in for ``torch._utils._rebuild_tensor_v2`` (a fresh one per lookup, so nothing shared can change)."""

    __slots__ = ()

    def __call__(self, *args: Any) -> _TensorRef:
        return _rebuild_tensor_v2(*args)


# (module, name) → a factory of the stand-in; a fresh object per lookup.
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("collections", "OrderedDict"): lambda: collections.OrderedDict,  # an immutable built-in type
    ("torch._utils", "_rebuild_tensor_v2"): _Rebuild,
    **{("torch", name): (lambda name=name: _StorageType(name)) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`_ALLOWED_GLOBALS` and turns storage persistent ids into ``_Storage``."""

    def __init__(self, file: IO[bytes], persistent_load: Callable[[Any], Any] | None = None) -> None:
        super().__init__(file)
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: {_NOT_A_STATE_DICT}")
        return factory()

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent_load is None:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return self._persistent_load(pid)


def _decode(x: Any) -> Any:
    return x.decode("ascii") if isinstance(x, bytes) else x


def _storage_pid(pid: Any, length: int) -> tuple[_StorageType, str, int, Any]:
    """Checks a ``('storage', storage_type, key, location, numel, ...)`` persistent id of ``length`` entries."""
    if not (isinstance(pid, tuple) and len(pid) == length and _decode(pid[0]) == "storage"):
        raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}: {_NOT_A_STATE_DICT}")
    storage_type, key, numel = pid[1], _decode(pid[2]), pid[4]
    if not isinstance(storage_type, _StorageType):
        raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r} in persistent id {pid!r}")
    if not (isinstance(key, str) and isinstance(numel, int) and numel >= 0):
        raise pickle.UnpicklingError(f"bad storage key or size in persistent id {pid!r}")
    return storage_type, key, numel, pid[5:]


def _unpickle(file: IO[bytes], name: str, persistent_load: Callable[[Any], Any] | None = None) -> Any:
    """One restricted ``pickle.load``; malformed data → ValueError (refused globals stay UnpicklingError)."""
    try:
        return _RestrictedUnpickler(file, persistent_load).load()
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(f"{name}: {e}") from None
    except ValueError:
        raise
    except Exception as e:  # EOFError, TypeError from a bad REDUCE, ...: a damaged file, not a forbidden one
        raise ValueError(f"{name}: malformed pickle data ({type(e).__name__}: {e})") from e


def _read_zip(raw: bytes, name: str) -> Any:
    """The zip layout: ``<top>/data.pkl`` + ``<top>/data/<key>``."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{name}: not a PyTorch .pth file (damaged zip archive: {e})") from e
    pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise ValueError(f"{name}: not a PyTorch .pth file (zip without exactly one <folder>/data.pkl: {pickles})")
    prefix = pickles[0][: -len("data.pkl")]
    if prefix + "byteorder" in names:
        order = archive.read(prefix + "byteorder")
        if order != b"little":
            raise ValueError(f"{name}: byte order {order!r} is not supported (only little-endian files)")

    storages: dict[str, _Storage] = {}

    def persistent_load(pid: Any) -> _Storage:
        storage_type, key, numel, _ = _storage_pid(pid, 5)
        if key not in storages:
            storages[key] = _Storage(key, storage_type, numel)
        return storages[key]

    obj = _unpickle(io.BytesIO(archive.read(pickles[0])), name, persistent_load)
    for key, storage in storages.items():
        record = f"{prefix}data/{key}"
        try:
            data = archive.read(record)
        except KeyError:
            raise ValueError(f"{name}: storage {key!r} has no record {record!r}") from None
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"{name}: storage {key!r} is damaged ({e})") from e
        want = storage.numel * storage.storage_type.dtype.itemsize
        if len(data) < want:
            raise ValueError(f"{name}: storage {key!r} is truncated: {len(data)} bytes, expected {want}")
        storage.set_bytes(memoryview(data)[:want])
    return obj


def _read_legacy(raw: bytes, name: str) -> Any:
    """The legacy layout: magic, version, sys_info, object, storage keys pickles, then the storages' bytes."""
    f = io.BytesIO(raw)
    try:
        magic = _unpickle(f, name)
    except (pickle.UnpicklingError, ValueError):
        magic = None
    if type(magic) is not int or magic != LEGACY_MAGIC_NUMBER:
        raise ValueError(f"{name}: not a PyTorch .pth file (neither a zip archive nor the legacy magic number)")
    version = _unpickle(f, name)
    if version != LEGACY_PROTOCOL_VERSION:
        raise ValueError(f"{name}: unsupported legacy protocol version {version!r}")
    sys_info = _unpickle(f, name)
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise ValueError(f"{name}: written on a big-endian machine, which is not supported")

    storages: dict[str, _Storage] = {}  # root storages: those with bytes in the file
    views: dict[str, _Storage] = {}

    def persistent_load(pid: Any) -> _Storage:
        storage_type, key, numel, (view_metadata,) = _storage_pid(pid, 6)
        if key not in storages:
            storages[key] = _Storage(key, storage_type, numel)
        if view_metadata is None:
            return storages[key]
        if not (isinstance(view_metadata, tuple) and len(view_metadata) == 3):
            raise pickle.UnpicklingError(f"bad view metadata in persistent id {pid!r}")
        view_key, offset, view_numel = _decode(view_metadata[0]), view_metadata[1], view_metadata[2]
        if not (isinstance(offset, int) and isinstance(view_numel, int) and 0 <= offset and 0 <= view_numel):
            raise pickle.UnpicklingError(f"bad view metadata in persistent id {pid!r}")
        if view_key not in views:
            views[view_key] = _Storage(view_key, storage_type, view_numel, root=storages[key], offset=offset)
        return views[view_key]

    obj = _unpickle(f, name, persistent_load)
    keys = _unpickle(f, name)
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise ValueError(f"{name}: bad list of storage keys ({type(keys).__name__})")
    pos = f.tell()
    view = memoryview(raw)
    for key in keys:
        if key not in storages:
            raise ValueError(f"{name}: storage {key!r} is listed but no tensor refers to it")
        storage = storages[key]
        itemsize = storage.storage_type.dtype.itemsize
        if len(raw) - pos < 8:
            raise ValueError(f"{name}: storage {key!r} is truncated: {len(raw) - pos} bytes left, its size needs 8")
        (count,) = struct.unpack_from("<q", raw, pos)
        pos += 8
        if count != storage.numel:
            raise ValueError(f"{name}: storage {key!r} holds {count} elements, its tensors expect {storage.numel}")
        want = count * itemsize
        if len(raw) - pos < want:
            raise ValueError(f"{name}: storage {key!r} is truncated: {len(raw) - pos} bytes left, expected {want}")
        storage.set_bytes(view[pos : pos + want])
        pos += want
    missing = sorted(set(storages) - set(keys))
    if missing:
        raise ValueError(f"{name}: no data for storages {missing}")
    return obj


def _to_state_dict(
    obj: Any, name: str, is_tensor: Callable[[Any], bool], convert: Callable[[Any], np.ndarray]
) -> dict[str, np.ndarray]:
    """The ``{name: array}`` of a mapping's tensor values; anything but a mapping with tensors → ValueError."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{name}: expected a state dict (a mapping of names to tensors), found {type(obj).__name__}")
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if is_tensor(value):
            if not isinstance(key, str):
                raise ValueError(f"{name}: state dict key {key!r} is not a string")
            out[key] = convert(value)
    if obj and not out:
        found = sorted({type(v).__name__ for v in obj.values()})
        raise ValueError(f"{name}: expected a state dict, found a {type(obj).__name__} without tensors (of {found})")
    return out


def _name_and_bytes(path_or_fileobj: Any) -> tuple[str, bytes]:
    if isinstance(path_or_fileobj, (str, os.PathLike)):
        from etils import epath

        return str(path_or_fileobj), epath.Path(path_or_fileobj).read_bytes()
    if hasattr(path_or_fileobj, "read"):
        return str(getattr(path_or_fileobj, "name", repr(path_or_fileobj))), path_or_fileobj.read()
    raise TypeError(f"expected a path or a binary file object, got {type(path_or_fileobj).__name__}")


def _parse(raw: bytes, name: str) -> dict[str, np.ndarray]:
    obj = _read_zip(raw, name) if raw[:4] == b"PK\x03\x04" else _read_legacy(raw, name)
    return _to_state_dict(obj, name, lambda v: isinstance(v, _TensorRef), lambda v: v.materialize())


def read_torch_file(path_or_fileobj: str | os.PathLike | IO[bytes]) -> dict[str, np.ndarray]:
    """The state dict in a ``.pth`` file (zip or legacy layout), read without torch and without running its pickle.

    Returns ``{name: array}`` with each tensor's shape and dtype (bfloat16 → float32); non-tensor values are dropped.
    Raises ``pickle.UnpicklingError`` when the pickle names anything but tensors in (ordered) dicts, and ValueError
    for a file that is not a ``.pth`` file, is damaged or truncated, or does not hold a mapping of names to tensors.
    """
    name, raw = _name_and_bytes(path_or_fileobj)
    return _parse(raw, name)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{name: array}`` from a ``.pth`` state dict (local or ``gs://...``): ``torch.load(weights_only=True)`` when
    torch is importable, else :func:`read_torch_file`. Non-tensor values are dropped; bfloat16 → float32."""
    name, raw = _name_and_bytes(path)
    try:
        import torch
    except ImportError:
        return _parse(raw, name)

    def convert(t: Any) -> np.ndarray:
        t = t.detach().cpu().resolve_conj().resolve_neg()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy().copy()

    obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    return _to_state_dict(obj, name, lambda v: isinstance(v, torch.Tensor), convert)
