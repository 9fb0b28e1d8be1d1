"""Logical axis names, the one table that maps them to mesh axes, and the mesh builder.

Parameters carry their logical axes as Variable metadata (`nnx.Param(value, logical_axes=('embed', 'mlp'))`);
activations are pinned with `constrain(x, ('batch', 'length', 'embed'))`. Nothing else in the code names a mesh axis.

Mesh axes are ('data', 'expert', 'model'):
  data   - pure data parallelism;
  expert - experts are split over it; outside the MoE block it acts as more data parallelism (batch over both);
  model  - tensor parallelism over attention heads, MLP width and vocabulary.
The MoE dispatch einsum turns `[groups, tokens, d_model]` sharded over ('data', 'expert') into
`[experts, groups, capacity, d_model]` sharded over 'expert' (experts) and 'data' (groups): XLA emits the all-to-all.

FSDP (config.mesh.fsdp, ZeRO-3): PARAMETERS are laid out by the table with FSDP_PARAM_RULES' rows in place of
LOGICAL_RULES' (`rules(fsdp=True)`): the dimensions that are otherwise replicated ('embed', 'norm') are split over
the data-parallel devices ('data', 'expert'), so every parameter, its gradient and its optimizer state is held 1/N
per device. Activations keep LOGICAL_RULES (batch-sharded), so GSPMD gathers each weight where a layer uses it and
reduce-scatters its gradient. Distributed Muon: optim/muon.py stacks the matrices it orthogonalises and pins the
stack axis to the logical axis 'ns_stack' (every device), each device running Newton-Schulz on its own matrices.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from moe_jax.config.schema import MESH_AXES, ConfigError

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "expert")),
    ("length", None),
    ("embed", None),
    ("heads", "model"),
    ("head_dim", None),
    ("mlp", "model"),
    ("vocab", "model"),
    ("norm", None),
    ("router", None),          # router output dim (experts), kept replicated: it is tiny
    ("expert", "expert"),      # expert weights and dispatched tokens
    ("group", ("data", "expert")),  # routing groups before dispatch
    ("group_tokens", None),
    ("expert_group", "data"),  # routing groups after dispatch (experts now hold the 'expert' axis)
    ("capacity", None),
    ("cache_length", None),
    ("ns_stack", ("data", "expert", "model")),  # distributed Muon: a stack of whole matrices, split over every device
)
_RULES = dict(LOGICAL_RULES)

# config.mesh.fsdp: these rows replace LOGICAL_RULES' for parameters (param_specs(..., fsdp=True)), never for
# activations. A mesh axis is used once per array, so an expert weight ('expert', 'embed', 'mlp') keeps 'expert' on
# its experts and splits 'embed' over 'data' only.
FSDP_PARAM_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("embed", ("data", "expert")),
    ("norm", ("data", "expert")),
)


def rules(fsdp: bool = False) -> dict:
    """The rules table as a dict: LOGICAL_RULES, with FSDP_PARAM_RULES' rows for parameters under FSDP."""
    return {**_RULES, **dict(FSDP_PARAM_RULES)} if fsdp else _RULES

# Mesh axes that may span the slow links between TPU slices or GPU nodes (DCN, ~10x less bandwidth than ICI/NVLink),
# i.e. config.mesh.dcn_shape may be > 1 only on these. 'data' only: its one gradient all-reduce per step tolerates
# DCN. Across DCN, 'expert' would put the MoE all-to-all of every layer, and 'model' the tensor-parallel
# all-reduces of every layer, on the slow links. Logical axes that then cross DCN: those mapped onto 'data' above
# (batch, group, expert_group), i.e. the batch.
DCN_MESH_AXES: tuple[str, ...] = ("data",)


def logical_to_spec(axes: Sequence[str | None], mesh_axis_names: Sequence[str] | None = None,
                    shape: Sequence[int] | None = None, mesh_shape: dict | None = None, fsdp: bool = False) -> P:
    """PartitionSpec for logical `axes`. A mesh axis is used at most once (first dimension wins); mesh axes not in
    `mesh_axis_names` are dropped; with `shape` and `mesh_shape`, mesh axes that don't divide the dimension are dropped
    (so odd sizes, e.g. a vocab of 8191, stay correct, just less sharded). `fsdp`: a parameter's spec under
    config.mesh.fsdp (`rules`)."""
    table = rules(fsdp)
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in sharding.LOGICAL_RULES")
        target = table[name]
        targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        kept = []
        size = 1
        for t in targets:
            if t in used or (mesh_axis_names is not None and t not in mesh_axis_names):
                continue
            if shape is not None and mesh_shape is not None:
                if shape[i] % (size * mesh_shape[t]) != 0:
                    continue
                size *= mesh_shape[t]
            kept.append(t)
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Pin activation `x` to the sharding of its logical `axes` under the current mesh; a no-op without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(axes, mesh.axis_names, x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)


def logical_size(name: str) -> int:
    """How many ways logical axis `name` is split under the current mesh (1 without a mesh): the product of the
    sizes of the mesh axes its rule names."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    target = _RULES[name]
    targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    return math.prod(dict(mesh.shape).get(t, 1) for t in targets)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def logical_axes_tree(state: nnx.State):
    """Pure-dict tree of each parameter's logical axes (tuples), from the Variables' metadata."""
    def axes(v):
        a = v.get_metadata().get("logical_axes")
        if a is None:
            raise ValueError(f"parameter of shape {v.shape} has no logical_axes metadata")
        return tuple(a)
    return nnx.to_pure_dict(jax.tree.map(axes, state, is_leaf=_is_var))


def param_specs(state: nnx.State, mesh: Mesh, fsdp: bool = False):
    """Pure-dict tree of PartitionSpecs for the parameters in `state` (abstract or concrete) on `mesh`; `fsdp`:
    config.mesh.fsdp (FSDP_PARAM_RULES)."""
    shapes = nnx.to_pure_dict(jax.tree.map(lambda v: tuple(v.shape), state, is_leaf=_is_var))
    axes = logical_axes_tree(state)
    mesh_shape = dict(mesh.shape)
    return jax.tree.map(lambda a, s: logical_to_spec(a, mesh.axis_names, s, mesh_shape, fsdp), axes, shapes,
                        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, (str, type(None))) for i in x))


def param_shardings(state: nnx.State, mesh: Mesh, fsdp: bool = False):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(state, mesh, fsdp),
                        is_leaf=lambda x: isinstance(x, P))


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fill the single -1 in `shape` so the product equals `num_devices`; raise ConfigError if impossible."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ConfigError(f"config.mesh.shape: needs {len(MESH_AXES)} sizes for axes {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ConfigError(f"config.mesh.shape: at most one -1 is allowed, got {shape}")
    fixed = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % fixed != 0:
            raise ConfigError(f"config.mesh.shape: {shape} cannot fill {num_devices} devices: the fixed sizes "
                              f"multiply to {fixed}, which does not divide {num_devices}")
        shape = tuple(num_devices // fixed if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ConfigError(f"config.mesh.shape: {shape} has {math.prod(shape)} devices but {num_devices} are "
                          f"available; use sizes whose product is {num_devices}, or put -1 on one axis")
    return shape


def check_dcn_shape(dcn_shape: Sequence[int], allowed: Sequence[str] = DCN_MESH_AXES) -> tuple[int, ...]:
    """`dcn_shape` as ints; ConfigError naming config.mesh.dcn_shape when malformed or when it puts a mesh axis
    outside `allowed` (DCN_MESH_AXES) across the slow links."""
    dcn = tuple(int(s) for s in dcn_shape)
    if len(dcn) != len(MESH_AXES) or any(s < 1 for s in dcn):
        raise ConfigError(f"config.mesh.dcn_shape: needs one size >= 1 per axis {MESH_AXES} (no -1), got {dcn}")
    crossing = [a for a, s in zip(MESH_AXES, dcn) if s > 1 and a not in allowed]
    if crossing:
        raise ConfigError(f"config.mesh.dcn_shape: {dcn} puts mesh axis {crossing} across the slow links between "
                          f"slices/hosts (DCN); only {tuple(allowed)} may cross them (sharding.DCN_MESH_AXES: "
                          f"experts and tensor parallelism communicate every layer). Fix: keep "
                          f"{'/'.join(crossing)} at 1 in dcn_shape and split them within a slice with "
                          f"config.mesh.shape")
    return dcn


class _SlicedDevice:
    """A device seen with a given slice_index (simulated multi-slice layouts); every other attribute is the device's."""

    def __init__(self, device, slice_index: int):
        self.device = device
        self.slice_index = slice_index

    def __getattr__(self, name):
        return getattr(self.device, name)


def hybrid_device_array(ici_shape, dcn_shape, devices, slice_of=None) -> np.ndarray:
    """Devices arranged as ici_shape * dcn_shape (per axis) with mesh_utils.create_hybrid_device_mesh: each granule
    (a slice, or a process when devices carry no slice_index) fills one ici_shape block, and the blocks are laid out
    by dcn_shape, so along an axis the DCN index is the outer one. `slice_of`: device -> slice index, to simulate
    slices (tests); default: the devices' slice_index (TPU multislice), else their process_index."""
    from jax.experimental import mesh_utils
    granules = math.prod(dcn_shape)
    if slice_of is not None:
        devices = [_SlicedDevice(d, slice_of(d)) for d in devices]
    by_slice = all(getattr(d, "slice_index", None) is not None for d in devices) and \
        len({d.slice_index for d in devices}) == granules
    by_process = len({d.process_index for d in devices}) == granules
    if not (by_slice or by_process):
        raise ConfigError(f"config.mesh.dcn_shape: {tuple(dcn_shape)} needs {granules} slices or processes, but the "
                          f"{len(devices)} devices come from {len({d.process_index for d in devices})} process(es) "
                          f"and carry no matching slice_index. Fix: set dcn_shape's product to the number of slices "
                          f"(TPU) or hosts with one process each (GPU)")
    arr = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices, process_is_granule=not by_slice)
    if slice_of is not None:
        arr = np.vectorize(lambda d: d.device, otypes=[object])(arr)
    return arr


def build_mesh(mesh_or_shape, devices=None, dcn_shape=None, slice_of=None) -> Mesh:
    """Mesh over ('data', 'expert', 'model') from a config.typed.MeshConfig (run.mesh) or a shape, on `devices`
    (default: all).

    TPU/GPU devices are arranged over their physical topology (jax.make_mesh), CPU devices in the given order.
    With the MeshConfig's dcn_shape (or `dcn_shape`) other than all ones, `shape` is the ICI shape within one slice
    (its -1 fills a slice) and the mesh is shape * dcn_shape, built by hybrid_device_array (`slice_of`: see there)."""
    if hasattr(mesh_or_shape, "dcn_shape"):
        shape = mesh_or_shape.shape
        dcn_shape = mesh_or_shape.dcn_shape if dcn_shape is None else dcn_shape
    else:
        shape = mesh_or_shape
    dcn = check_dcn_shape((1,) * len(MESH_AXES) if dcn_shape is None else dcn_shape)
    devices = list(jax.devices()) if devices is None else list(devices)
    types = (AxisType.Auto,) * len(MESH_AXES)
    if math.prod(dcn) > 1:
        if len(devices) % math.prod(dcn):
            raise ConfigError(f"config.mesh.dcn_shape: {dcn} ({math.prod(dcn)} slices) does not divide the "
                              f"{len(devices)} devices")
        ici = resolve_mesh_shape(shape, len(devices) // math.prod(dcn))
        return Mesh(hybrid_device_array(ici, dcn, devices, slice_of), MESH_AXES, axis_types=types)
    shape = resolve_mesh_shape(shape, len(devices))
    if devices == list(jax.devices()) or devices[0].platform != "cpu":
        # TPU/GPU: devices laid out over the physical topology (mesh_utils.create_device_mesh), as a real run needs;
        # a shape the topology cannot hold raises here. CPU devices have no topology: plain order.
        return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=types)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, ...] input array: batch over ('data', 'expert'), the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh.axis_names))
