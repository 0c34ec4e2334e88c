"""PyTorch ``pytorch_model.bin`` checkpoints read as numpy, without torch and without running pickle code.

Older hub models (OPT, mT5, OpenLLaMA, ...) ship only ``.bin`` files: a pickle of the state dict whose
tensors point into raw storages. ``torch.load`` would need torch and, unrestricted, runs whatever the
pickle names. Here a restricted unpickler admits only the few globals a state dict uses (the tensor
rebuilders, ``OrderedDict``, storage classes, dtypes) and refuses anything else before it is called;
tensors come back as (memory-mapped where possible) numpy views with the right dtype, shape and strides.
Both layouts ``torch.save`` writes are read: the zip archive (torch >= 1.6) and the legacy stream.
"""

from __future__ import annotations

import _compat_pickle
import collections
import pickle
import struct
import zipfile
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}  # fmt: skip
# torch.<dtype> globals: torch >= 2.1 pickles uint16/32/64 and float8 tensors as an UntypedStorage + dtype.
_TORCH_DTYPES = {
    "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float64": np.float64,
    "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
    "bool": np.bool_, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
}  # fmt: skip
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a legacy torch.save stream


class UnsafePickleError(ValueError):
    """The pickle names a global a weights file has no use for (code it would run); nothing was called."""


class _Bad(Exception):
    """Internal: a malformed checkpoint; read_torch_bin turns it into a one-line ValueError."""


# What find_class hands out is OrderedDict (an immutable C type) or one of these slotted tuples, none with a
# __setstate__: so REDUCE can only call the rebuilders below and BUILD can only fill an OrderedDict's
# __dict__ (torch stores the state dict's `_metadata` that way).
class _Dtype(NamedTuple):
    dtype: np.dtype | None  # None: an UntypedStorage (bytes; the tensor names its dtype)


class _Storage(NamedTuple):
    key: str
    dtype: np.dtype | None
    nbytes: int
    view: tuple[str, int] | None  # legacy storage views: (root key, byte offset)


class _Tensor(NamedTuple):
    storage: _Storage
    dtype: np.dtype
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _ints(x: Any, n: int | None = None) -> tuple[int, ...]:
    if not isinstance(x, tuple) or not all(type(i) is int and i >= 0 for i in x) or n not in (None, len(x)):
        raise _Bad(f"bad tensor size/stride {x!r:.80}")
    return x


def _empty(x: Any) -> bool:
    return x is None or (isinstance(x, dict) and not x)


def _tensor(storage, offset, size, stride, requires_grad=False, hooks=None, dtype=None, metadata=None):
    if not isinstance(storage, _Storage) or type(offset) is not int or offset < 0:
        raise _Bad("tensor without a valid storage")
    if not (_empty(hooks) and _empty(metadata)):
        raise _Bad(f"tensor with backward hooks or metadata {hooks!r:.40} {metadata!r:.40}")
    dtype = dtype.dtype if isinstance(dtype, _Dtype) else storage.dtype
    if dtype is None:
        raise _Bad("untyped storage without a dtype")
    return _Tensor(storage, np.dtype(dtype), offset, _ints(size), _ints(stride, len(size)))


class _Call(NamedTuple):
    fn: Any

    def __call__(self, *args):
        return self.fn(*args)


def _v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if not isinstance(dtype, _Dtype):
        raise _Bad(f"bad dtype {dtype!r:.40}")
    return _tensor(storage, offset, size, stride, requires_grad, hooks, dtype, metadata)


def _parameter(data, requires_grad=False, hooks=None, state=None):
    if not isinstance(data, _Tensor) or not _empty(hooks):
        raise _Bad("bad parameter")
    return data  # state: plain python attributes of the Parameter, irrelevant to its values


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _Call(_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Call(_tensor),
    ("torch._utils", "_rebuild_tensor_v3"): _Call(_v3),
    ("torch._utils", "_rebuild_parameter"): _Call(_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Call(_parameter),
    ("torch", "UntypedStorage"): _Dtype(None),
    ("torch.storage", "UntypedStorage"): _Dtype(None),
    **{("torch", k): _Dtype(np.dtype(v)) for k, v in {**_STORAGE_DTYPES, **_TORCH_DTYPES}.items()},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path
        self.dtypes: dict[str, np.dtype | None] = {}  # each storage key's element type (legacy reads need it)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _GLOBALS:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)  # protocol 2 writes __builtin__
            why = "(a weights file holds only tensors)"
            raise UnsafePickleError(f"{self.path}: refused to load: it would call {module}.{name} {why}")
        return _GLOBALS[module, name]

    def persistent_load(self, pid: Any) -> _Storage:
        # zip: ('storage', type, key, location, numel); legacy adds view metadata (view key, offset, size)
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise _Bad(f"bad persistent id {pid!r:.80}")
        kind, key, numel, view = pid[1], pid[2], pid[4], pid[5] if len(pid) == 6 else None
        if not (isinstance(kind, _Dtype) and isinstance(key, str) and type(numel) is int and numel >= 0):
            raise _Bad(f"bad persistent id {pid!r:.80}")
        size = kind.dtype.itemsize if kind.dtype is not None else 1
        self.dtypes.setdefault(key, kind.dtype)
        if view is None:
            return _Storage(key, kind.dtype, numel * size, None)
        if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)):
            raise _Bad(f"bad storage view {view!r:.80}")
        offset, view_numel = _ints(view[1:])
        return _Storage(view[0], kind.dtype, view_numel * size, (key, offset * size))


def _array(t: _Tensor, raw: np.ndarray, big_endian: bool) -> np.ndarray:
    """The tensor as a numpy view of its storage's bytes ``raw`` (offset and strides count elements)."""
    size = t.dtype.itemsize
    if any(n == 0 for n in t.shape):
        return np.zeros(t.shape, t.dtype)
    end = (t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride, strict=True)) + 1) * size
    if end > t.storage.nbytes or t.storage.nbytes > raw.size:
        raise _Bad(f"tensor reaches past its storage {t.storage.key!r}")
    dtype = np.dtype(f">u{size}") if big_endian and size > 1 else t.dtype
    out = np.ndarray(t.shape, dtype, raw, t.offset * size, tuple(s * size for s in t.stride))
    return out.astype(f"=u{size}").view(t.dtype) if dtype != t.dtype else out


def _zip_storages(path: str, mm: np.ndarray) -> tuple[Any, dict[str, np.ndarray], bool]:
    with zipfile.ZipFile(path) as zf:
        pkls = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if not pkls:
            raise _Bad("no <archive>/data.pkl")
        prefix = pkls[0][: -len("data.pkl")]
        infos = {i.filename: i for i in zf.infolist()}
        order = infos.get(prefix + "byteorder")
        big = order is not None and zf.read(order).strip() == b"big"
        state = _Unpickler(zf.open(pkls[0]), path).load()
        raw = {}
        for name, info in infos.items():
            if not name.startswith(prefix + "data/"):
                continue
            if info.compress_type != zipfile.ZIP_STORED:  # torch never compresses; read it if someone did
                raw[name[len(prefix) + 5 :]] = np.frombuffer(zf.read(info), np.uint8)
                continue
            head = mm[info.header_offset : info.header_offset + 30].tobytes()
            if len(head) < 30 or head[:4] != b"PK\x03\x04":
                raise _Bad(f"bad zip entry {name}")
            start = info.header_offset + 30 + sum(struct.unpack("<HH", head[26:30]))
            if start + info.file_size > mm.size:
                raise _Bad(f"zip entry {name} is truncated")
            raw[name[len(prefix) + 5 :]] = mm[start : start + info.file_size]
    return state, raw, big


def _legacy_storages(path: str, mm: np.ndarray) -> tuple[Any, dict[str, np.ndarray], bool]:
    with open(path, "rb") as f:
        magic, _, sys_info = (_Unpickler(f, path).load() for _ in range(3))
        if magic != _LEGACY_MAGIC or not isinstance(sys_info, dict):
            raise _Bad("neither a zip archive nor a legacy torch.save stream")
        unpickler = _Unpickler(f, path)
        state, keys, pos = unpickler.load(), _Unpickler(f, path).load(), f.tell()
    big, raw = not sys_info.get("little_endian", True), {}
    # Then each storage, in the order of `keys`: its element count (int64) and its bytes.
    for key in keys if isinstance(keys, list) else ():
        if key not in unpickler.dtypes or pos + 8 > mm.size:
            raise _Bad(f"storage {key!r} is unknown or truncated")
        (numel,) = struct.unpack(">q" if big else "<q", mm[pos : pos + 8].tobytes())
        dtype = unpickler.dtypes[key]
        end = pos + 8 + numel * (dtype.itemsize if dtype is not None else 1)
        if numel < 0 or end > mm.size:
            raise _Bad(f"storage {key!r} is truncated")
        raw[key], pos = mm[pos + 8 : end], end
    return state, raw, big


def read_torch_bin(path: str) -> dict[str, np.ndarray]:
    """The state dict of a ``torch.save`` file as name -> numpy array (read-only, memory-mapped views).

    Raises ``UnsafePickleError`` when the pickle names anything but tensors, ``ValueError`` when the file
    is corrupt, truncated or not a flat state dict.
    """
    try:
        mm = np.memmap(path, np.uint8, "r")
        if zipfile.is_zipfile(path):
            state, raw, big = _zip_storages(path, mm)
        elif mm[:2].tobytes() == b"PK":
            raise _Bad("a truncated or damaged zip archive (no central directory)")
        else:
            state, raw, big = _legacy_storages(path, mm)
        if not isinstance(state, dict):
            raise _Bad(f"it holds a {type(state).__name__}, not a state dict")
        out = {}
        for name, t in state.items():
            if not isinstance(name, str) or not isinstance(t, _Tensor):
                raise _Bad(
                    f"entry {name!r:.60} is a {type(t).__name__}, not a tensor (a flat state dict is read)"
                )
            key, skip = t.storage.view or (t.storage.key, 0)
            if key not in raw:
                raise _Bad(f"tensor {name!r} points to missing storage {key!r}")
            out[name] = _array(t, raw[key][skip:], big)
        return out
    except UnsafePickleError:
        raise
    except (_Bad, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError, AttributeError,
            IndexError, KeyError, struct.error, OverflowError) as e:  # fmt: skip
        msg = str(e) if isinstance(e, _Bad) else f"{type(e).__name__}: {e}"
        raise ValueError(f"corrupt PyTorch checkpoint {path}: {' '.join(msg.split())}") from None
