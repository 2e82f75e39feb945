"""The one mesh of the package: a 1-D "data" axis over devices, batches split along it, parameters replicated."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def data_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D ("data",) mesh over `devices` (default: every device of every process).

    Auto axes: the compiler propagates the batch sharding through the model (JAX's default for `make_mesh` would be
    Explicit, which puts shardings in the types).
    """
    devices = list(devices) if devices is not None else jax.devices()
    return jax.make_mesh((len(devices),), ("data",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Rows split over the "data" axis."""
    return NamedSharding(mesh, P("data"))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """The same whole array on every device of the mesh."""
    return NamedSharding(mesh, P())
