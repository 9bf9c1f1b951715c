"""Device mesh and logical-axis sharding (DESIGN §6).

Parameters and activations carry logical axis names (see models/layers.py); the config's
rules map them onto the mesh axes ('data', 'fsdp', 'tensor'). State is created already
sharded: abstract shapes -> partition specs -> a jitted init with those out shardings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
from jax.extend.core import jaxpr_as_fun
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from refine_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills one -1 entry with the devices left over; errors if the product does not fit."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have one entry per axis {MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: use positive sizes and at most one -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh shape {shape} does not divide the {num_devices} devices")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if int(np.prod(shape)) > num_devices:
        raise ValueError(
            f"mesh shape {shape} needs {int(np.prod(shape))} devices but {num_devices} are present"
        )
    return shape


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ('data', 'fsdp', 'tensor') mesh. A single process may use fewer devices than it has
    (the first ones, e.g. a (1, 1, 1) debugging mesh); several processes must use them all."""
    devices = list(devices if devices is not None else jax.devices())
    resolved = resolve_mesh_shape(shape, len(devices))
    used = int(np.prod(resolved))
    if used < len(devices):
        if jax.process_count() > 1:
            raise ValueError(
                f"mesh shape {resolved} uses {used} of the {len(devices)} devices; a "
                "multi-process run must use every device"
            )
        devices = devices[:used]
    return jax.make_mesh(
        resolved, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def bare_values(boxed_tree: Any) -> Any:
    """The tree without its logical-axis boxes. Unlike nn.unbox it applies no sharding
    constraint, so it also strips boxes around abstract values (eval_shape's output)."""

    def boxed(x) -> bool:
        return isinstance(x, nn.meta.AxisMetadata)

    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if boxed(x) else x, boxed_tree, is_leaf=boxed
    )


def logical_shardings(abstract_tree, mesh: Mesh, rules) -> object:
    """NamedShardings for a tree of (possibly logically boxed) abstract values. A value whose
    dimension the mesh axes it is split over do not divide is a ConfigError naming both."""
    specs = nn.get_partition_spec(abstract_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, tuple(map(tuple, rules)))
    values = jax.tree_util.tree_leaves_with_path(bare_values(abstract_tree))
    for (path, value), named in zip(values, jax.tree.leaves(shardings), strict=True):
        for dim, (size, axes) in enumerate(zip(value.shape, named.spec, strict=False)):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            parts = int(np.prod([mesh.shape[a] for a in axes]))
            if size % parts:
                raise ConfigError(
                    f"{jax.tree_util.keystr(path)} has {size} entries in dimension {dim}, which "
                    f"mesh axes {axes} of {dict(mesh.shape)} cannot split in {parts}: choose a "
                    "config.mesh.shape whose sizes divide the model's dimensions"
                )
    return shardings


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
    """Batch arrays shard their leading axis like the logical 'batch' axis."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), tuple(map(tuple, rules)))
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def create_sharded(init_fn: Callable, mesh: Mesh, rules, *args):
    """Runs `init_fn(*args)` jitted so its outputs are born with their logical shardings.

    Returns (unboxed value tree, its shardings). `init_fn` is traced once (a model's init
    takes seconds to trace): its output shapes give the shardings, and the sharded jit replays
    the traced program."""
    with nn.logical_axis_rules(tuple(map(tuple, rules))):
        program, abstract = jax.make_jaxpr(init_fn, return_shape=True)(*args)
        shardings = logical_shardings(abstract, mesh, rules)
        treedef = jax.tree.structure(abstract)

        def replay(*a):
            outputs = jaxpr_as_fun(program)(*jax.tree.leaves(a))
            return bare_values(jax.tree.unflatten(treedef, outputs))

        value = jax.jit(replay, out_shardings=shardings)(*args)
    return value, shardings


class BatchBlock(NamedTuple):
    """The block of a global batch's rows a process reads (`process_batch_block`)."""

    index: int  # which of the `count` equal contiguous blocks
    count: int
    first_reader: bool  # the lowest process reading this block: it alone counts its rows


def process_batch_block(mesh: Mesh, rules, global_rows: int) -> BatchBlock:
    """The block of a global batch's rows this process's devices hold, of the equal contiguous
    blocks the batch splits into across processes. Processes whose devices hold the same rows
    (the batch axis replicated across them, e.g. 'tensor' spanning processes) share a block
    and must load the same rows. A mesh under which a process holds rows that are not one such
    block is a ValueError."""
    index_map = batch_sharding(mesh, rules, 1).devices_indices_map((global_rows,))
    rows_of: dict[int, set[int]] = {}
    for device, (rows,) in index_map.items():
        start, stop, _ = rows.indices(global_rows)
        rows_of.setdefault(device.process_index, set()).update(range(start, stop))
    return batch_block_of(rows_of, global_rows, jax.process_index(), dict(mesh.shape))


def batch_block_of(
    rows_of: dict[int, set[int]], global_rows: int, process: int, mesh_shape: dict
) -> BatchBlock:
    """`process`'s BatchBlock, given the rows each process's devices hold."""
    spans = {p: (min(r), max(r) + 1) for p, r in rows_of.items()}
    blocks = sorted(set(spans.values()))
    size = global_rows // len(blocks)
    contiguous = all(len(rows_of[p]) == stop - start for p, (start, stop) in spans.items())
    equal_blocks = blocks == [(i * size, (i + 1) * size) for i in range(len(blocks))]
    if not (contiguous and equal_blocks):
        raise ValueError(
            f"mesh {mesh_shape} gives processes batch rows that are not equal contiguous "
            f"blocks ({dict(sorted(spans.items()))} of {global_rows}): order config.mesh.shape "
            "so that each process's devices hold one block of the batch"
        )
    readers = [p for p, span in spans.items() if span == spans[process]]
    return BatchBlock(blocks.index(spans[process]), len(blocks), process == min(readers))


def global_batch(batch: dict, mesh: Mesh, rules, global_rows: int) -> dict:
    """This process's block of a batch (`process_batch_block`), as NumPy arrays -> global
    jax.Arrays of `global_rows` rows sharded along the batch axis."""
    return {
        k: jax.make_array_from_process_local_data(
            batch_sharding(mesh, rules, v.ndim), v, (global_rows, *v.shape[1:])
        )
        for k, v in batch.items()
    }


def global_batch_from_full(batch: dict, mesh: Mesh, rules) -> dict:
    """A batch every process holds whole (evaluation) -> global arrays; each device takes its
    rows, whatever the layout of the mesh across processes."""
    return {
        k: jax.make_array_from_callback(
            v.shape, batch_sharding(mesh, rules, v.ndim), lambda index, v=v: v[index]
        )
        for k, v in batch.items()
    }


def sum_over_processes(counts: np.ndarray) -> np.ndarray:
    """Host-side counts summed over all processes (every process gets the total)."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return counts
    return np.asarray(multihost_utils.process_allgather(counts)).sum(axis=0)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-process) global array as NumPy, on every process."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
