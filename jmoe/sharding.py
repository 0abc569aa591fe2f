"""Meshes, logical-axis rules and param placement.

Shape letters: B batch, E experts. Every param declares its logical axes where it
is created (``jmoe.layers.logical_init``); ``DEFAULT_RULES`` map them onto mesh
axes: routed-expert weights ``[E, ...]`` (logical ``expert``) on the ``expert``
axis, batch on ``data``, everything else replicated. A config carrying a mesh
(``config.mesh``, set by ``jmoe.load(path, mesh=mesh)`` or ``shard_model``) whose
``expert`` axis is > 1 runs every MoE layer expert-parallel (``jmoe.expert_parallel``).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
EXPERT_AXIS = "expert"
# logical axis -> mesh axis; a logical axis without a rule is replicated
DEFAULT_RULES = (("batch", DATA_AXIS), ("expert", EXPERT_AXIS))


def make_mesh(data: int = 1, expert: int | None = None, *, devices=None):
    """A ``(data, expert)`` mesh over the available devices (all hosts' under ``jax.distributed``).

    Args:
        data: int >= 1, default 1: the ``data`` axis size (the batch is split over
            it); must divide the number of devices.
        expert: int >= 1, or None (default: ``len(devices) // data``): the ``expert``
            axis size (routed experts, and each data shard's tokens, are split over
            it); ``data * expert`` must equal the number of devices. A model placed
            on the mesh needs ``num_experts`` divisible by it (checked by ``jmoe.load``
            and ``jmoe.shard_model``).
        devices: keyword-only, a sequence of ``jax.Device`` or None (default:
            ``jax.devices()``, every process's devices), arranged by
            ``jax.make_mesh``.

    Returns:
        A ``jax.sharding.Mesh`` of shape ``(data, expert)`` with axis names
        ``("data", "expert")``, both ``AxisType.Auto`` so unsharded inputs still
        enter jit.

    Raises:
        ValueError: ``data`` not a positive int dividing the number of devices;
            ``expert`` not a positive int, or ``data * expert`` not the number of
            devices.

    Example:
        mesh = jmoe.make_mesh(data=2, expert=4)
        model = jmoe.load("ckpt/olmoe", mesh=mesh)
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if not (isinstance(data, int) and data >= 1 and n % data == 0):
        raise ValueError(f"make_mesh data={data!r}: expected a positive divisor of the "
                         f"{n} available devices")
    expert = n // data if expert is None else expert
    if not (isinstance(expert, int) and expert >= 1 and data * expert == n):
        raise ValueError(f"make_mesh data={data} x expert={expert!r} = "
                         f"{data * expert if isinstance(expert, int) else '?'} devices: "
                         f"expected data * expert == {n} available devices")
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((data, expert), (DATA_AXIS, EXPERT_AXIS), axis_types=auto,
                         devices=devices)


def axis_size(mesh, name: str) -> int:
    return int(dict(mesh.shape).get(name, 1)) if mesh is not None else 1


def expert_parallel_active(mesh) -> bool:
    """True when ``mesh`` has an ``expert`` axis of size > 1."""
    return axis_size(mesh, EXPERT_AXIS) > 1


def check_experts_divisible(num_experts: int, mesh) -> None:
    s = axis_size(mesh, EXPERT_AXIS)
    if num_experts % s:
        divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ValueError(
            f"num_experts={num_experts} is not divisible by the mesh's expert axis size {s}: "
            f"each shard must hold the same number of experts; pick expert= one of {divisors}")


# -- logical-axis rules and param placement ---------------------------------------------------

def logical_to_spec(logical_axes, mesh, rules=DEFAULT_RULES) -> P:
    """``PartitionSpec`` for logical axis names (None = replicated) under ``rules``."""
    table = dict(rules)
    names = set(mesh.axis_names)
    return P(*[table.get(a) if a is not None and table.get(a) in names else None
               for a in logical_axes])


def param_specs(logical_axes, mesh, rules=DEFAULT_RULES):
    """The ``PartitionSpec`` of every params leaf, from the tree of logical axes
    (``jmoe.model.param_logical_axes(config)``)."""
    return jax.tree.map(lambda axes: logical_to_spec(tuple(axes), mesh, rules), logical_axes,
                        is_leaf=lambda x: isinstance(x, P))


def param_shardings(logical_axes, mesh, rules=DEFAULT_RULES, *, num_experts: int | None = None):
    """The ``NamedSharding`` of every params leaf.

    Raises a ValueError naming the sizes when ``num_experts`` does not split evenly.
    """
    if num_experts is not None:
        check_experts_divisible(num_experts, mesh)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                        param_specs(logical_axes, mesh, rules), is_leaf=lambda x: isinstance(x, P))


def shard_params(params, logical_axes, mesh, rules=DEFAULT_RULES, *, num_experts=None):
    """``device_put`` params onto ``mesh`` by their logical axes (experts on ``expert``)."""
    return jax.device_put(params, param_shardings(logical_axes, mesh, rules,
                                                  num_experts=num_experts))


def batch_spec(mesh, b: int, rules=DEFAULT_RULES) -> P:
    """The ``batch`` rule's spec for a batch of ``b`` (replicated when b does not split)."""
    spec = logical_to_spec(("batch",), mesh, rules)
    axis = spec[0] if len(spec) else None
    return spec if axis is not None and b % axis_size(mesh, axis) == 0 else P()


def shard_batch(x_B, mesh, rules=DEFAULT_RULES):
    """``device_put`` a batch-leading array (tokens, masks, budgets) by the ``batch`` rule."""
    return jax.device_put(x_B, NamedSharding(mesh, batch_spec(mesh, np.shape(x_B)[0], rules)))
