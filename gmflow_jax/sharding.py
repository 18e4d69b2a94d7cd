"""Device mesh from the config and logical-axis → mesh-axis shardings of parameter trees.

The mesh has the axes ``('data', 'fsdp')``; ``config.mesh = (data, fsdp)`` gives their sizes, one of
which may be ``-1`` (fill with the remaining devices). Parameters carry logical axis names (see
``gmflow_jax.models.gmdit.LOGICAL_AXES``); ``config.sharding`` maps each name to a mesh axis
(``''``: replicated). A dimension that does not divide evenly by its mesh axis, or a mesh axis
already used by an earlier dimension of the same array, is replicated instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES: tuple[str, str] = ("data", "fsdp")

log = logging.getLogger(__name__)


def resolve_mesh_shape(mesh_shape: Sequence[int], device_count: int, field: str = "config.mesh") -> tuple[int, ...]:
    """``(data, fsdp)`` sizes with a ``-1`` filled in; ``ValueError`` naming ``field`` on a mismatch."""
    shape = tuple(mesh_shape)
    if len(shape) != len(MESH_AXES) or not all(isinstance(s, int | np.integer) for s in shape):
        raise ValueError(f"{field} must be a tuple of {len(MESH_AXES)} ints {MESH_AXES}; got {mesh_shape!r}.")
    if any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
        raise ValueError(f"{field} sizes must be positive, with at most one -1 (fill); got {shape}.")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if device_count % known:
            raise ValueError(
                f"{field}={shape}: the fixed sizes (product {known}) do not divide the {device_count} devices; "
                f"expected a product dividing {device_count}."
            )
        shape = tuple(device_count // known if s == -1 else int(s) for s in shape)
    elif known != device_count:
        raise ValueError(
            f"{field}={shape} needs {known} devices but this run has {device_count}; expected sizes whose product "
            f"is {device_count}, e.g. ({device_count}, 1) or (-1, 1)."
        )
    return shape


def make_mesh(mesh_shape: Sequence[int], field: str = "config.mesh", devices: Sequence[Any] | None = None) -> Mesh:
    """The ``('data', 'fsdp')`` mesh over ``devices`` (default: all devices of all processes; an
    ahead-of-time compile passes the devices of a ``jax.experimental.topologies`` description)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = resolve_mesh_shape(mesh_shape, len(devices), field)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)


def check_rules(rules: Mapping[str, str], field: str = "config.sharding") -> dict[str, str | None]:
    """Logical name → mesh axis (``None`` for replicated); ``ValueError`` for an unknown mesh axis."""
    out: dict[str, str | None] = {}
    for name, axis in rules.items():
        if axis in ("", None):
            out[name] = None
        elif axis in MESH_AXES:
            out[name] = axis
        else:
            raise ValueError(f"{field}.{name} must be '' (replicated) or one of {MESH_AXES}; got {axis!r}.")
    return out


def logical_to_mesh_spec(
    logical: P, shape: Sequence[int], rules: Mapping[str, str | None], mesh: Mesh, *, where: str = ""
) -> P:
    """Maps a spec of logical names (one per dim, or shorter) to mesh axes for an array of ``shape``."""
    used: set[str] = set()
    out: list[str | None] = []
    for dim, name in enumerate(tuple(logical)):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ValueError(
                f"parameter {where or '?'} has logical axis {name!r}, which config.sharding does not map; "
                f"expected one of {sorted(rules)}."
            )
        axis = rules[name]
        if axis is None or axis in used or shape[dim] % mesh.shape[axis]:
            if axis is not None and axis not in used:
                log.debug("replicating dim %d (%d) of %s: not divisible by %s", dim, shape[dim], where, axis)
            out.append(None)
            continue
        used.add(axis)
        out.append(axis)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def tree_shardings(logical_specs: Any, abstract: Any, rules: Mapping[str, str | None], mesh: Mesh) -> Any:
    """NamedShardings for a tree of abstract arrays, given the same-structured tree of logical specs."""

    def one(path, spec, leaf):
        return NamedSharding(
            mesh, logical_to_mesh_spec(spec, leaf.shape, rules, mesh, where=jax.tree_util.keystr(path))
        )

    return jax.tree_util.tree_map_with_path(one, logical_specs, abstract, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, P())


def batch_spec_sharding(mesh: Mesh) -> NamedSharding:
    """Dim 0 split over every mesh axis (the batch layout of ``gmflow_jax.data.make_iterator``)."""
    return NamedSharding(mesh, P(MESH_AXES))
