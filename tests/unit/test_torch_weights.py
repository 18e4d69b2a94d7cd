"""gmflow_jax.evaluate.torch_weights against the real ``torch.save`` (torch is a test-only dependency)."""

import collections
import os
import pickle
import sys
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gmflow_jax.evaluate.torch_weights import load_state_dict, read_torch_file  # noqa: E402

FORMATS = {"zip": True, "legacy": False}


def _save(obj, path, fmt: str):
    torch.save(obj, path, _use_new_zipfile_serialization=FORMATS[fmt])
    return path


def _expected(t: "torch.Tensor") -> np.ndarray:
    t = t.detach().resolve_neg()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _assert_same(got: dict, want: dict):
    assert list(got) == [k for k, v in want.items() if isinstance(v, torch.Tensor)]
    for key, t in want.items():
        if not isinstance(t, torch.Tensor):
            continue
        e = _expected(t)
        assert got[key].dtype == e.dtype, key
        assert got[key].shape == e.shape, key
        np.testing.assert_array_equal(got[key], e, err_msg=key)
        assert got[key].flags.c_contiguous and got[key].flags.writeable, key


def _mixed_state_dict() -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    shared = torch.arange(10, dtype=torch.float32)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "i64": torch.tensor([-(2**62), -1, 0, 5, 2**62]),
        "i32": torch.tensor([-7, 3], dtype=torch.int32),
        "i16": torch.tensor([-300, 2], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 1, 200, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "conv": torch.randn(8, 3, 3, 3, generator=g),
        "transposed": base.t(),  # non-contiguous: stride (1, 6)
        "sliced": base[1:3, 2:5],  # storage offset 8, stride (6, 1)
        "shared_a": shared[:6].view(2, 3),  # two entries on one storage
        "shared_b": shared[4:],
        "expanded": torch.tensor([1.5, 2.5]).expand(3, 2),  # stride (0, 1)
        "neg_view": torch._neg_view(torch.tensor([1.0, -2.0])),  # carries the negative bit in its metadata
        "scalar": torch.tensor(7, dtype=torch.int64),
        "scalar_f": torch.tensor(0.25),
        "empty": torch.empty(0, 4),
        "an_int": 3,  # not a tensor: dropped
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_torch_save(tmp_path, fmt):
    sd = _mixed_state_dict()
    got = read_torch_file(_save(sd, tmp_path / "w.pth", fmt))
    _assert_same(got, sd)
    assert got["bf16"].dtype == np.float32
    assert got["bool"].dtype == np.bool_
    assert got["scalar"].shape == () and got["empty"].shape == (0, 4)
    got["shared_a"][0, 0] = -1.0  # independent copies
    assert got["shared_b"][0] == 4.0


@pytest.mark.parametrize("fmt", FORMATS)
def test_real_modules(tmp_path, fmt):
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(5)
    bn.train()(torch.randn(4, 5, 3, 3))  # non-trivial running stats, num_batches_tracked = 1 (a 0-d int64)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4))
    for sd in (bn.state_dict(), net.state_dict()):
        got = read_torch_file(_save(sd, tmp_path / "m.pth", fmt))
        _assert_same(got, sd)
    assert got["1.num_batches_tracked"].shape == () and got["1.num_batches_tracked"].dtype == np.int64
    assert got["0.weight"].shape == (4, 3, 3, 3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_file_object_and_path_string(tmp_path, fmt):
    sd = {"w": torch.randn(3, 2)}
    path = _save(sd, tmp_path / "w.pth", fmt)
    with open(path, "rb") as f:
        _assert_same(read_torch_file(f), sd)
    _assert_same(read_torch_file(str(path)), sd)


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_state_dict_with_and_without_torch(tmp_path, monkeypatch, fmt):
    sd = _mixed_state_dict()
    path = _save(sd, tmp_path / "w.pth", fmt)
    restricted = read_torch_file(path)
    with_torch = load_state_dict(path)
    _assert_same(with_torch, sd)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    without_torch = load_state_dict(str(path))
    for got in (with_torch, without_torch):
        assert list(got) == list(restricted)
        for k in restricted:
            assert got[k].dtype == restricted[k].dtype, k
            np.testing.assert_array_equal(got[k], restricted[k], err_msg=k)


@pytest.mark.parametrize("fmt", FORMATS)
def test_not_a_state_dict(tmp_path, fmt):
    with pytest.raises(ValueError, match=r"w\.pth.*list"):
        read_torch_file(_save([torch.ones(2)], tmp_path / "w.pth", fmt))
    with pytest.raises(ValueError, match="without tensors"):
        read_torch_file(_save({"model": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "w.pth", fmt))
    with pytest.raises(ValueError, match=r"w\.pth.*list"):
        load_state_dict(_save([torch.ones(2)], tmp_path / "w.pth", fmt))


class _FakeStorage:
    pass


class _FakeTensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


def test_legacy_storage_views(tmp_path):
    """Pre-1.x legacy files could name a view of a root storage (view_metadata); torch.load is the reference."""
    view = _FakeStorage()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is view:  # elements [2, 8) of the root storage 'root', which has 10 floats
                return ("storage", torch.FloatStorage, "root", "cpu", 10, ("view", 2, 6))
            return None

    path = tmp_path / "views.pth"
    with open(path, "wb") as f:
        for head in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(head, f, protocol=2)
        obj = collections.OrderedDict(a=_FakeTensor(view, 1, (2, 2), (1, 2)), b=_FakeTensor(view, 0, (6,), (1,)))
        Pickler(f, protocol=2).dump(obj)
        pickle.dump(["root"], f, protocol=2)
        f.write(np.int64(10).tobytes() + np.arange(10, dtype="<f4").tobytes())
    want = torch.load(path, weights_only=True)
    np.testing.assert_array_equal(want["b"].numpy(), np.arange(2, 8, dtype=np.float32))
    got = read_torch_file(path)
    _assert_same(got, want)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_zip(path, payload: bytes):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return path


def _evil_legacy(path, payload: bytes):
    head = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    path.write_bytes(head + payload + pickle.dumps([], protocol=2))
    return path


@pytest.mark.parametrize("layout", [_evil_zip, _evil_legacy])
def test_malicious_pickle_is_refused(tmp_path, layout):
    marker = tmp_path / "MARKER"
    payload = pickle.dumps({"w": _Evil(marker)}, protocol=2)
    assert b"system" in payload
    path = layout(tmp_path / "evil.pth", payload)
    with pytest.raises(pickle.UnpicklingError, match=r"evil\.pth.*system.*not a plain state dict"):
        read_torch_file(path)
    assert not marker.exists()


def test_builtins_eval_is_refused(tmp_path):
    payload = b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R."
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.eval"):
        read_torch_file(_evil_zip(tmp_path / "evil.pth", payload))


def test_stand_ins_refuse_build(tmp_path):
    # GLOBAL torch FloatStorage, then BUILD {'dtype': 0}: must not tamper with the reader's storage types.
    payload = b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeK\x00sb."
    with pytest.raises(pickle.UnpicklingError, match="set state"):
        read_torch_file(_evil_zip(tmp_path / "evil.pth", payload))


def test_garbage_and_truncated(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01 this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match=r"garbage\.pth.*not a PyTorch"):
        read_torch_file(garbage)
    path = _save({"w": torch.randn(100)}, tmp_path / "w.pth", "legacy")
    raw = path.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(raw[:-10])
    with pytest.raises(ValueError, match=r"truncated.*400"):
        read_torch_file(truncated)
    truncated.write_bytes(raw[: len(raw) - 400 - 4])  # inside the 8-byte element count
    with pytest.raises(ValueError, match="truncated"):
        read_torch_file(truncated)
    path = _save({"w": torch.randn(100)}, tmp_path / "w.pth", "zip")
    truncated.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(ValueError, match="not a PyTorch"):
        read_torch_file(truncated)
