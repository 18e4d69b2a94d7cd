"""Logical-axis → mesh-axis shardings and mesh resolution (``gmflow_jax.sharding``)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gmflow_jax.sharding import logical_to_mesh_spec, resolve_mesh_shape


def test_logical_rules_to_mesh_specs():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    rules = {"embed": "fsdp", "mlp": None}
    assert logical_to_mesh_spec(P("embed", "mlp"), (32, 64), rules, mesh) == P("fsdp")
    assert logical_to_mesh_spec(P("mlp", "embed"), (64, 32), rules, mesh) == P(None, "fsdp")
    assert logical_to_mesh_spec(P("embed", "embed"), (32, 32), rules, mesh) == P("fsdp")  # an axis is used once
    with pytest.raises(ValueError, match="logical axis 'vocab'"):
        logical_to_mesh_spec(P("vocab"), (11,), rules, mesh)


def test_mesh_resolution():
    assert resolve_mesh_shape((-1, 1), 8) == (8, 1)
    assert resolve_mesh_shape((2, -1), 8) == (2, 4)
    with pytest.raises(ValueError, match=r"config\.mesh=\(3, 1\) needs 3 devices but this run has 8"):
        resolve_mesh_shape((3, 1), 8)
    with pytest.raises(ValueError, match=r"config\.mesh=\(3, -1\)"):
        resolve_mesh_shape((3, -1), 8)
