"""The device mesh and the logical-axis rules that place every parameter and batch on it.

Every parameter carries logical axis names (``nnx.Param(..., axes=("embed", "mlp"))``); the rules map
each name to a mesh axis (docs/architecture.md §3). A name maps to ``None`` (replicated) when its rule
says so, when the mesh axis is already used by an earlier dimension of the same tensor, or when the
dimension does not divide evenly over the mesh axis (tiny test models, odd head counts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None). FSDP shards the embedding dimension of weights;
# tensor parallelism shards heads, MLP width and vocabulary.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "positions": None,
    "rel_buckets": None,
    "norm": None,
}


def mesh_sizes(data: int = 1, fsdp: int = -1, tensor: int = 1, *, devices: int) -> list[int]:
    """The (data, fsdp, tensor) sizes over ``devices``: -1 takes the devices the others leave; a 0, two
    -1s or a product other than ``devices`` is a ``ValueError`` that says so."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(
            f"mesh: each of data, fsdp, tensor must be >= 1 (at most one -1: the devices left), got "
            f"data={data} fsdp={fsdp} tensor={tensor}"
        )
    known = int(np.prod([s for s in sizes if s != -1]))
    sizes = [devices // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != devices:
        raise ValueError(
            f"mesh: data×fsdp×tensor = {'×'.join(map(str, sizes))} does not multiply to the {devices} "
            "devices present; set mesh.data / fsdp / tensor so it does (one of them -1 takes the rest)"
        )
    return sizes


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over all devices; -1 takes the devices the others leave."""
    sizes = mesh_sizes(data, fsdp, tensor, devices=jax.device_count())
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, str | tuple[str, ...] | None] = DEFAULT_RULES,
) -> PartitionSpec:
    """PartitionSpec for a tensor of ``shape`` whose dimensions have logical names ``axes``."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match a tensor of shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape, strict=True):
        if name is not None and name not in rules:
            raise ValueError(f"no sharding rule for logical axis {name!r}; rules cover {sorted(rules)}")
        target = None if name is None else rules[name]
        mesh_axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        size = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
        if not mesh_axes or dim % size:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def state_shardings(
    state: nnx.State, mesh: Mesh, rules: Mapping[str, str | tuple[str, ...] | None] = DEFAULT_RULES
) -> nnx.State:
    """A NamedSharding for every variable of an (abstract or concrete) NNX state, from its ``axes``."""

    def one(var: nnx.Variable) -> NamedSharding:
        axes = var.get_metadata().get("axes")
        shape = var.get_value().shape
        if axes is None:
            axes = (None,) * len(shape)
        return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batches: rows over the data axes, everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def data_shards(mesh: Mesh) -> tuple[list[int], int]:
    """The data-parallel shards of a batch (slices of its rows over the data axes) that this process's
    devices hold, as global indices, and how many there are in all."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    held = batch_sharding(mesh, 1).addressable_devices_indices_map((n,))
    return sorted({index[0].start or 0 for index in held.values()}), n
