"""Device mesh, logical-axis rules, and the shardings of train state and batches.

The mesh has three axes (`config.mesh`, -1 = all remaining devices):
  data    pure data parallelism: parameters replicated, the batch split;
  fsdp    data parallelism with parameters and optimizer state split (ZeRO-3 style);
  tensor  model parallelism: heads, MLP width and vocabulary split.
Parameters carry logical axis names (model.py); `LOGICAL_RULES` maps them onto mesh axes.
A dimension that a mesh axis does not divide stays replicated along it; a parameter whose
"embed" dimension fsdp does not divide is split over fsdp along its largest dimension that
fsdp divides, where it has one.

Batches: `host_batch_to_global` turns each process's loader rows into the global arrays the
train and eval steps take. Kernels the compiler cannot partition (Pallas) run per shard
through `run_per_shard`.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or None = replicated)
LOGICAL_RULES = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv": None,
    "mlp": "tensor",
    "norm": None,
}


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes from `config.mesh`, resolving one -1 to the rest."""
    sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
    rest = [i for i, s in enumerate(sizes) if s == -1]
    if len(rest) > 1:
        raise ValueError(f"config.mesh={dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh={dict(zip(MESH_AXES, sizes))}: sizes must be >= 1 or -1")
    known = math.prod(s for s in sizes if s != -1)
    if rest:
        if num_devices % known:
            raise ValueError(f"config.mesh={dict(zip(MESH_AXES, sizes))}: {num_devices} devices "
                             f"are not a multiple of {known}")
        sizes[rest[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config.mesh={dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                         f"devices, but there are {num_devices}")
    return tuple(sizes)


def device_grid(mesh_config, devices) -> np.ndarray:
    """`devices` arranged as the (data, fsdp, tensor) grid of `config.mesh`.

    On a multi-slice TPU job (devices carry different `slice_index`es) `config.mesh`
    describes one slice, and slices are stacked along `data`: FSDP and tensor parallelism
    stay on a slice's fast interconnect, only data-parallel gradient reduction crosses the
    slower links between slices (FSDP over the slice, data parallel across slices).
    """
    slices: dict[int, list] = {}
    for device in devices:
        slices.setdefault(getattr(device, "slice_index", 0) or 0, []).append(device)
    per_slice = [slices[k] for k in sorted(slices)]
    if len({len(s) for s in per_slice}) != 1:
        raise ValueError(f"slices hold different numbers of devices: {[len(s) for s in per_slice]}")
    shape = mesh_shape(mesh_config, len(per_slice[0]))
    return np.concatenate([np.asarray(s, dtype=object).reshape(shape) for s in per_slice], axis=0)


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

    Axes are Auto: XLA propagates shardings from the inputs we place explicitly. Several TPU
    slices multiply the `data` axis (see `device_grid`).
    """
    devices = jax.devices() if devices is None else list(devices)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    single_slice = len({getattr(d, "slice_index", 0) or 0 for d in devices}) == 1
    if single_slice and devices == jax.devices():
        # jax.make_mesh orders devices for the physical topology (ICI rings on TPU).
        mesh = jax.make_mesh(mesh_shape(mesh_config, len(devices)), MESH_AXES, axis_types=auto)
    else:
        mesh = jax.sharding.Mesh(device_grid(mesh_config, devices), MESH_AXES, axis_types=auto)
    check_tensor_groups(mesh.devices, mesh_config)
    return mesh


def check_tensor_groups(grid: np.ndarray, mesh_config) -> None:
    """Raises ValueError unless each process holds whole tensor groups of the `[data, fsdp,
    tensor]` device grid: a group shares one shard of the batch, and each process feeds its
    own rows (host_batch_to_global), so a group split over processes would get two."""
    for group in np.asarray(grid).reshape(-1, grid.shape[-1]):
        owners = sorted({getattr(d, "process_index", 0) for d in group})
        if len(owners) > 1:
            raise ValueError(
                f"config.mesh={dict(mesh_config)}: its tensor axis ({grid.shape[-1]} devices) "
                f"spans processes {owners}; each process feeds its own rows, so a tensor group "
                f"must lie in one process: at most {len(group) // len(owners)} devices, as "
                "many as one process has (put the rest on fsdp or data)")


def logical_to_spec(names, shape, mesh: jax.sharding.Mesh) -> P:
    """PartitionSpec for a tensor of `shape` whose dimensions have logical `names`."""
    if names is None:
        return P()
    axes = []
    for name, size in zip(names, shape):
        axis = LOGICAL_RULES.get(name) if name is not None else None
        if name is not None and name not in LOGICAL_RULES:
            raise ValueError(f"logical axis name {name!r} has no sharding rule; "
                             f"known: {sorted(LOGICAL_RULES)}")
        if axis is not None and size % mesh.shape[axis]:
            axis = None  # e.g. 4 heads over tensor=8: replicate rather than pad
        axes.append(axis)
    fsdp = mesh.shape.get("fsdp", 1)
    if fsdp > 1 and "fsdp" not in axes and "embed" in names:
        # The model width does not divide over fsdp (256 over 6 devices): the largest other
        # dimension that does takes it, or every device would hold the whole tensor and its
        # optimizer moments (1b on 6 devices: all 1.03B parameters on each).
        free = [i for i, size in enumerate(shape)
                if (axes[i] is None or mesh.shape[axes[i]] == 1) and size % fsdp == 0]
        if free:
            axes[max(free, key=lambda i: shape[i])] = "fsdp"
    return P(*axes)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_shardings(params: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    """NamedShardings shaped like `params` (an nnx.State of Params, concrete or abstract)."""

    def one(variable):
        names = variable.get_metadata().get("out_sharding")
        return variable.replace(NamedSharding(mesh, logical_to_spec(names, variable.shape, mesh)))

    return jax.tree.map(one, params, is_leaf=_is_variable)


def warn_unsplit(params: nnx.State, shardings: nnx.State):
    """Logs a warning naming the parameters that fsdp was meant to split ("embed" axes) and
    that every device holds whole under `shardings` (param_shardings of `params`): no
    dimension of theirs divides over fsdp."""
    whole, total, fsdp = [], 0, 1
    for (path, variable), (_, sharding) in zip(nnx.to_flat_state(params),
                                               nnx.to_flat_state(shardings)):
        size = math.prod(variable.shape)
        total += size
        fsdp = sharding.get_value().mesh.shape.get("fsdp", 1)
        names = variable.get_metadata().get("out_sharding") or ()
        if fsdp > 1 and "embed" in names and "fsdp" not in sharding.get_value().spec:
            whole.append(("/".join(map(str, path)), size))
    if whole:
        logging.warning(
            "config.mesh: fsdp=%d divides no dimension of %d parameters (%.0f%% of the model, "
            "e.g. %s): every device holds them and their optimizer moments whole. An fsdp size "
            "that divides config.model.hidden_size splits them all; the other devices can go "
            "to config.mesh.data", fsdp, len(whole), 100 * sum(size for _, size in whole) / total,
            ", ".join(name for name, _ in sorted(whole, key=lambda w: -w[1])[:3]))


def optimizer_shardings(tx, abstract_params, params_sharding, mesh: jax.sharding.Mesh):
    """Shardings of `tx`'s state: moments like their params, counters replicated.

    (`jax.jit(tx.init)` alone would replicate the moments.)
    """
    import optax

    abstract_state = jax.eval_shape(tx.init, abstract_params)
    return optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_state, params_sharding,
                                 transform_non_params=lambda _: replicated(mesh),
                                 is_leaf=_is_variable)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh, *, leading_axes: int = 0) -> NamedSharding:
    """Rows split over data x fsdp; `leading_axes` unsplit dims before the rows (micro batches)."""
    return NamedSharding(mesh, P(*([None] * leading_axes), BATCH_AXES))


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def host_batch_to_global(host_batch: dict, mesh: jax.sharding.Mesh, *,
                         num_micro: int | None = None) -> dict:
    """This process's rows (numpy `[rows, ...]`) -> global jax arrays, rows split over
    data x fsdp; each process passes its own equal slice of the global batch, as the loader
    produces them.

    num_micro=None: global `[process_count * rows, ...]` (eval). num_micro=k: global
    `[k, process_count * rows / k, ...]` for gradient accumulation; micro batch i holds rows
    [i*rows/k, (i+1)*rows/k) of every process, process 0's first.
    """
    sharding = batch_sharding(mesh, leading_axes=0 if num_micro is None else 1)
    out = {}
    for key, rows in host_batch.items():
        rows = np.asarray(rows)
        if num_micro is None:
            local = rows
            global_shape = (rows.shape[0] * jax.process_count(), *rows.shape[1:])
        else:
            if rows.shape[0] % num_micro:
                raise ValueError(f"batch[{key!r}]: {rows.shape[0]} rows do not split into "
                                 f"{num_micro} micro batches (config.train.grad_accum_steps)")
            local = rows.reshape(num_micro, rows.shape[0] // num_micro, *rows.shape[1:])
            global_shape = (num_micro, local.shape[1] * jax.process_count(), *rows.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


def log_mesh(mesh: jax.sharding.Mesh):
    logging.info("mesh %s over %d devices (%d processes, this is %d): %s",
                 dict(mesh.shape), mesh.devices.size, jax.process_count(), jax.process_index(),
                 jax.devices()[0].device_kind)


def run_per_shard(local_attention, q, k, v, segment_ids):
    """Runs `local_attention(q, k, v, segment_ids)` per shard of the active mesh.

    A Pallas kernel is a custom call the compiler cannot partition: left to GSPMD, every
    device would gather the whole batch. Under `jax.set_mesh` with more than one device this
    splits the batch over the mesh's `data`/`fsdp` axes and heads over `tensor` with
    `jax.shard_map`; without a mesh it calls `local_attention` directly. As for parameters
    (LOGICAL_RULES), an axis that does not divide its dimension leaves it whole: 6 heads on
    tensor=4 run all 6 on every tensor shard rather than fail.
    q, k, v: `[batch, seq, heads, head_dim]`; segment_ids `[batch, seq]` or None.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or all(mesh.shape[a] == 1 for a in mesh.axis_names):
        return local_attention(q, k, v, segment_ids)
    batch_axes, batch_shards = [], 1
    for axis in (a for a in BATCH_AXES if a in mesh.axis_names):
        if q.shape[0] % (batch_shards * mesh.shape[axis]) == 0:
            batch_axes.append(axis)
            batch_shards *= mesh.shape[axis]
    batch_axes = tuple(batch_axes) or None
    heads = q.shape[2]
    head_axis = ("tensor" if "tensor" in mesh.axis_names and heads % mesh.shape["tensor"] == 0
                 else None)
    qkv_spec, seg_spec = P(batch_axes, None, head_axis, None), P(batch_axes, None)
    if segment_ids is None:
        return jax.shard_map(lambda q, k, v: local_attention(q, k, v, None), mesh=mesh,
                             in_specs=(qkv_spec,) * 3, out_specs=qkv_spec,
                             check_vma=False)(q, k, v)
    # check_vma=False: pallas_call declares no varying mesh axes for its outputs.
    return jax.shard_map(local_attention, mesh=mesh, in_specs=(qkv_spec,) * 3 + (seg_spec,),
                         out_specs=qkv_spec, check_vma=False)(q, k, v, segment_ids)
