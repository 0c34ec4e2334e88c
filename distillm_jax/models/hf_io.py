"""Hugging Face checkpoints without torch: safetensors read as memory-mapped numpy (bfloat16 included),
mapped per family onto NNX parameters and placed straight into their shardings; and written back.

A family describes its checkpoint as a list of ``Rule``s: our parameter path, the HF tensor name, and
the two layout conversions (HF -> ours on load, ours -> HF on export). Conversions use only
``.T``/``.reshape``/``.transpose``, so they apply to numpy arrays, jax arrays and shapes alike.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from distillm_jax import sharding as shd
from distillm_jax import storage

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message is one line that names the culprit."""


def identity(x):
    return x


class Rule(NamedTuple):
    ours: str  # dotted NNX path, e.g. "layers.0.attn.q"
    hf: str  # HF tensor name, e.g. "model.layers.0.self_attn.q_proj.weight"
    to_ours: Callable = identity
    to_hf: Callable = identity
    part: tuple[int, int, int] | None = (
        None  # (index, count, axis): one of `count` equal slices of a fused tensor
    )


def transposed(hf: str, ours: str) -> Rule:
    """An HF Linear weight [out, in] stored as our kernel [in, out]."""
    return Rule(ours, hf, lambda w: w.T, lambda w: w.T)


def split_heads(hf: str, ours: str, heads: int, head_dim: int, *, linear: bool = True, part=None) -> Rule:
    """A projection into heads: HF [heads*head_dim, D] (Linear) or [D, heads*head_dim] (Conv1D) as our
    [D, heads, head_dim]; a 1-D bias [heads*head_dim] as [heads, head_dim]."""

    def to_ours(w):
        if w.ndim == 1:
            return w.reshape(heads, head_dim)
        w = w.T if linear else w
        return w.reshape(w.shape[0], heads, head_dim)

    def to_hf(w):
        if w.ndim == 2:
            return w.reshape(heads * head_dim)
        w = w.reshape(w.shape[0], heads * head_dim)
        return w.T if linear else w

    return Rule(ours, hf, to_ours, to_hf, part)


def merge_heads(hf: str, ours: str, heads: int, head_dim: int, *, linear: bool = True) -> Rule:
    """An output projection: HF [D, heads*head_dim] (Linear) or [heads*head_dim, D] (Conv1D) as our
    [heads, head_dim, D]."""

    def to_ours(w):
        w = w.T if linear else w
        return w.reshape(heads, head_dim, w.shape[-1])

    def to_hf(w):
        w = w.reshape(heads * head_dim, w.shape[-1])
        return w.T if linear else w

    return Rule(ours, hf, to_ours, to_hf)


def _hf_slice(raw: np.ndarray, part: tuple[int, int, int] | None) -> np.ndarray:
    if part is None:
        return raw
    index, count, axis = part
    return np.split(raw, count, axis=axis)[index]


# ---------------------------------------------------------------------------------------------------
# safetensors files.


def _read_header(path: str) -> tuple[dict, int]:
    try:
        (n,) = struct.unpack("<Q", storage.read_bytes(path, 0, 8))
        if n > storage.size(path) - 8:
            raise ValueError("header length beyond the end of the file")
        header = json.loads(storage.read_bytes(path, 8, 8 + n))
    except FileNotFoundError:
        raise CheckpointError(f"missing weight file {path}") from None
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt safetensors file {path}: {e}") from None
    return header, 8 + n


class Ranged:
    """A tensor of a safetensors file in a bucket, read (one ranged request) when ``np.asarray`` asks: a
    checkpoint is loaded tensor by tensor, never copied whole to the host's disk."""

    def __init__(self, path: str, offset: int, dtype: np.dtype, shape: tuple[int, ...]):
        self.path, self.offset, self.dtype, self.shape = path, offset, np.dtype(dtype), shape
        self.ndim = len(shape)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        n = self.dtype.itemsize * int(np.prod(self.shape))
        raw = storage.read_bytes(self.path, self.offset, self.offset + n)
        out = np.frombuffer(raw, self.dtype).reshape(self.shape)
        return out if dtype is None else out.astype(dtype)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of one file as a read-only memory map (in a bucket: a ``Ranged`` read): nothing is
    read until it is used."""
    header, start = _read_header(path)
    size = storage.size(path)
    lazy = storage.is_remote(path)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info.get("dtype"))
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if dtype is None or start + end > size or end - begin != dtype.itemsize * int(np.prod(shape)):
            raise CheckpointError(f"corrupt safetensors file {path}: bad entry for tensor {name!r}")
        if lazy:
            out[name] = Ranged(path, start + begin, dtype, shape)
        elif shape:
            out[name] = np.memmap(path, dtype, "r", offset=start + begin, shape=shape)
        else:
            out[name] = np.zeros((), dtype)
    return out


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: dict | None = None) -> None:
    """Write numpy tensors (bfloat16 via ml_dtypes included) in the safetensors layout."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, arr in tensors.items():
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())


def _read_bin(path: str) -> dict[str, np.ndarray]:
    from distillm_jax.models.torch_bin import read_torch_bin

    if not storage.exists(path):
        raise CheckpointError(f"missing weight file {path}")
    if storage.is_remote(path):  # a pickle is not read by ranges: a local copy, gone once mapped
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, os.path.basename(path))
            storage.download(path, local)
            return _read_bin(local)
    try:
        return read_torch_bin(path)
    except ValueError as e:  # a refused pickle or a corrupt file: its one line
        raise CheckpointError(str(e)) from None


def open_checkpoint(directory: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory: ``model.safetensors`` or its sharded index, else (older hub
    checkpoints) ``pytorch_model.bin`` or its sharded index, read without torch or pickle code."""
    for single, index, read in (
        (WEIGHTS, INDEX, read_safetensors),
        (TORCH_WEIGHTS, TORCH_INDEX, _read_bin),
    ):
        if storage.exists(storage.join(directory, index)):
            path = storage.join(directory, index)
            try:
                files = sorted(set(json.loads(storage.read_text(path))["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as e:
                raise CheckpointError(f"corrupt index file {path}: {e}") from None
            tensors: dict[str, np.ndarray] = {}
            for name in files:
                tensors.update(read(storage.join(directory, name)))
            return tensors
        if storage.exists(storage.join(directory, single)):
            return read(storage.join(directory, single))
    raise CheckpointError(f"no {WEIGHTS}, {INDEX}, {TORCH_WEIGHTS} or {TORCH_INDEX} in {directory}")


def with_prefix(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Older hub checkpoints name a model's tensors without the base-model prefix that transformers
    writes today (``transformer.`` for GPT-2, ``model.`` for OPT): add it when no name carries it."""
    if any(k.startswith(prefix) for k in tensors):
        return dict(tensors)
    return {k if k.startswith("lm_head.") else prefix + k: v for k, v in tensors.items()}


# ---------------------------------------------------------------------------------------------------
# NNX state <-> HF tensors.


def _dotted(path: Iterable) -> str:
    return ".".join(str(p) for p in path)


def load_state(
    abstract: nnx.State,
    rules: list[Rule],
    tensors: Mapping[str, np.ndarray],
    *,
    where: str,
    mesh: Mesh | None = None,
    ignore: Callable[[str], bool] = lambda name: False,
) -> nnx.State:
    """Fill an abstract NNX state from HF tensors. With a mesh each tensor is cut on the host and each
    device receives only its shard; without one it goes to the default device."""
    by_path = {r.ours: r for r in rules}
    flat = nnx.to_flat_state(abstract)
    shardings = nnx.to_flat_state(shd.state_shardings(abstract, mesh)) if mesh is not None else None
    missing = [r.hf for r in rules if r.hf not in tensors]
    if missing:
        raise CheckpointError(f"missing key(s) in {where}: {', '.join(missing[:5])}")
    used = {r.hf for r in rules}
    unexpected = [k for k in tensors if k not in used and not ignore(k)]
    if unexpected:
        raise CheckpointError(f"unexpected key(s) in {where}: {', '.join(sorted(unexpected)[:5])}")
    leaves = []
    for i, (path, var) in enumerate(flat):
        rule = by_path.get(_dotted(path))
        if rule is None:
            raise CheckpointError(
                f"no checkpoint rule for parameter {_dotted(path)} (a bug in the family's map)"
            )
        want = var.get_value()
        hf_shape = jax.eval_shape(rule.to_hf, jax.ShapeDtypeStruct(want.shape, want.dtype)).shape
        raw = tensors[rule.hf]
        if rule.part is not None:  # the whole fused tensor is `count` slices of this shape
            _, count, axis = rule.part
            hf_shape = tuple(n * count if a == axis else n for a, n in enumerate(hf_shape))
        if tuple(raw.shape) != tuple(hf_shape):
            got, need = tuple(raw.shape), tuple(hf_shape)
            raise CheckpointError(f"tensor {rule.hf} in {where} has shape {got}, the config needs {need}")
        host = np.asarray(rule.to_ours(_hf_slice(np.asarray(raw), rule.part))).astype(want.dtype)
        if shardings is None:
            value = jnp.asarray(host)
        else:
            sharding = shardings[i][1]
            value = jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx])
        leaves.append((path, var.replace(value)))
    return nnx.from_flat_state(leaves)


def export_tensors(state: nnx.State, rules: list[Rule]) -> dict[str, np.ndarray]:
    """HF tensors from an NNX state, one parameter at a time on the host."""
    values = {_dotted(path): var.get_value() for path, var in nnx.to_flat_state(state)}
    parts: dict[str, list[tuple[int, int, np.ndarray]]] = {}
    for r in rules:
        index, _, axis = r.part or (0, 1, 0)
        parts.setdefault(r.hf, []).append((index, axis, np.asarray(jax.device_get(r.to_hf(values[r.ours])))))
    return {
        name: ps[0][2]
        if len(ps) == 1
        else np.concatenate([p[2] for p in sorted(ps, key=lambda p: p[0])], ps[0][1])
        for name, ps in parts.items()
    }


def write_checkpoint(directory: str, tensors: Mapping[str, np.ndarray], max_shard_bytes: int) -> None:
    """``model.safetensors``, or numbered shards plus an index when larger than ``max_shard_bytes``."""
    os.makedirs(directory, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    if len(shards) == 1:
        write_safetensors(os.path.join(directory, WEIGHTS), shards[0])
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(directory, name), shard)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(a.nbytes for a in tensors.values())
    with open(os.path.join(directory, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
