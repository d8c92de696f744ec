"""Device mesh, logical axis rules and the shardings derived from them.

Every parameter carries `logical_axes` metadata (see `model.py`), such as
("lm_heads", "vocab", "embed"). The config's rules map each logical axis to a
mesh axis, e.g. ("vocab", "tensor"), and `param_shardings` turns that into a
`NamedSharding` per parameter. A logical axis maps to nothing when its mesh
axis has size 1, is already used by another dimension of the same array, or
does not divide the dimension, so one rule set works on any mesh.

The mesh uses Auto axis types (GSPMD propagation). `jax.make_mesh` defaults to
Explicit axes in jax 0.10, on which `lax.top_k` and `jnp.take` over a sharded
vocabulary raise `ShardingTypeError`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis rules. The model's logical axes are: batch,
# embed, mlp, qkv (attention projections), lm_heads, vocab.
PRESETS = {
    # Pure data parallelism: parameters replicated, batch split.
    "dp": (("batch", ("data", "fsdp")),),
    # FSDP: batch split, parameters split along their embedding dimension.
    "fsdp": (("batch", ("data", "fsdp")), ("embed", "fsdp")),
    # Tensor parallelism over the vocabulary and MLP/attention width, with the
    # LM heads split over the vocabulary.
    "tp": (("batch", ("data", "fsdp")), ("vocab", "tensor"), ("mlp", "tensor"),
           ("qkv", "tensor")),
    # Tensor parallelism over the LM heads: each device stores whole heads.
    "tp_heads": (("batch", ("data", "fsdp")), ("lm_heads", "tensor"),
                 ("mlp", "tensor"), ("qkv", "tensor")),
    # FSDP and vocabulary tensor parallelism together, for meshes with both
    # an fsdp and a tensor axis larger than 1.
    "fsdp_tp": (("batch", ("data", "fsdp")), ("embed", "fsdp"),
                ("vocab", "tensor"), ("mlp", "tensor"), ("qkv", "tensor")),
}


def resolve_mesh_shape(shape: Sequence[int], num_devices: int,
                       axes: Sequence[str]) -> tuple[int, ...]:
  """Replace a single -1 in `shape` by the remaining devices.

  Raises:
    ValueError: if the shape does not use exactly `num_devices` devices.
  """
  shape = [int(s) for s in shape]
  if len(shape) != len(axes):
    raise ValueError(
        f"config.mesh.shape={tuple(shape)} has {len(shape)} entries but "
        f"config.mesh.axes={tuple(axes)} has {len(axes)}; give one size per axis.")
  if shape.count(-1) > 1:
    raise ValueError(
        f"config.mesh.shape={tuple(shape)} has more than one -1; at most one "
        "axis can take the remaining devices.")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"config.mesh.shape={tuple(shape)} has an invalid size; "
                     "use positive sizes or one -1.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(
          f"config.mesh.shape={tuple(shape)} cannot fill {num_devices} devices: "
          f"{num_devices} is not divisible by {known}.")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(
        f"config.mesh.shape={tuple(shape)} needs {math.prod(shape)} devices but "
        f"{num_devices} are available; set the sizes to multiply to "
        f"{num_devices} or use -1 for one axis.")
  return tuple(shape)


def make_mesh(mesh_config, devices=None) -> Mesh:
  """Build a Mesh with Auto axes from `config.mesh` over `devices`.

  `devices` defaults to `jax.devices()`, every device of every process, so
  in a multi-process job each process builds the same global mesh.

  Raises:
    ValueError: if the axis names repeat or the shape does not use exactly
      the given devices.
  """
  devices = jax.devices() if devices is None else list(devices)
  axes = tuple(mesh_config.axes)
  if len(set(axes)) != len(axes):
    raise ValueError(f"config.mesh.axes={axes} repeats an axis name; give "
                     "each mesh axis a distinct name.")
  shape = resolve_mesh_shape(mesh_config.shape, len(devices), axes)
  mesh = jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes),
                       devices=devices)
  logging.info("Mesh %s over %d devices.", dict(zip(axes, shape)), len(devices))
  return mesh


def _mesh_axes_of(target) -> tuple[str, ...]:
  if target is None:
    return ()
  return (target,) if isinstance(target, str) else tuple(target)


def rules_from_config(mesh_config) -> tuple[tuple[str, Any], ...]:
  """Return the logical axis rules: `mesh.rules` if set, else the preset's.

  A preset may name mesh axes that the mesh lacks (the "data" axis of a
  mesh with axes ("fsdp", "tensor"), say); those targets are skipped. An
  explicit rule must name existing axes, because a typo there would
  otherwise silently leave an array unsharded.

  Raises:
    ValueError: if the preset is unknown or an explicit rule names a mesh
      axis that `config.mesh.axes` does not have.
  """
  rules = mesh_config.get("rules", None)
  if not rules:
    preset = mesh_config.get("preset", "dp")
    if preset not in PRESETS:
      raise ValueError(
          f"config.mesh.preset={preset!r} is unknown; choose one of "
          f"{', '.join(PRESETS)} or set config.mesh.rules.")
    return PRESETS[preset]

  rules = tuple((name, target) for name, target in rules)
  mesh_axes = tuple(mesh_config.axes)
  for logical, target in rules:
    unknown = [t for t in _mesh_axes_of(target) if t not in mesh_axes]
    if unknown:
      raise ValueError(
          f"config.mesh.rules maps logical axis {logical!r} to mesh axis "
          f"{unknown[0]!r}, but config.mesh.axes={mesh_axes}; add the axis "
          "to the mesh or change the rule.")
  return rules


def log_unused_rules(mesh: Mesh, rules) -> None:
  """Log the rules that shard nothing because their mesh axes have size 1.

  A preset such as "tp" on the default mesh shape (-1, 1, 1) silently runs as
  data parallelism otherwise.
  """
  for logical, target in rules:
    sizes = [mesh.shape[t] for t in _mesh_axes_of(target) if t in mesh.shape]
    if sizes and math.prod(sizes) == 1:
      logging.warning(
          "Logical axis %r maps to mesh axes %s of size 1, so it is not "
          "sharded; set config.mesh.shape to shard it.", logical, target)


def logical_to_spec(logical_axes, shape, mesh: Mesh, rules) -> PartitionSpec:
  """Map one array's logical axes to a PartitionSpec for `mesh`."""
  rule_map = dict(rules)
  used = set()
  spec = []
  for name, dim in zip(logical_axes, shape):
    target = rule_map.get(name) if name is not None else None
    if target is None:
      spec.append(None)
      continue
    targets = (target,) if isinstance(target, str) else tuple(target)
    # Keep only mesh axes that exist, are larger than 1 and are still free.
    targets = tuple(t for t in targets
                    if t in mesh.shape and mesh.shape[t] > 1 and t not in used)
    size = math.prod(mesh.shape[t] for t in targets)
    if not targets or dim % size:
      spec.append(None)
      continue
    used.update(targets)
    spec.append(targets[0] if len(targets) == 1 else targets)
  return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules) -> nnx.State:
  """Return a NamedSharding for every array in an NNX state.

  Variables without `logical_axes` metadata (RNG keys, counters) are
  replicated.
  """
  def sharding_for(variable):
    value = variable.get_value() if isinstance(variable, nnx.Variable) else variable
    axes = None
    if isinstance(variable, nnx.Variable) and variable.has_metadata("logical_axes"):
      axes = variable.get_metadata("logical_axes")
    if axes is None or not hasattr(value, "shape"):
      sharding = NamedSharding(mesh, PartitionSpec())
    else:
      sharding = NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh, rules))
    # Same tree structure as `state` (Variables wrapping shardings), so the
    # result zips with the state in `jax.tree.map`.
    if isinstance(variable, nnx.Variable):
      return variable.replace(sharding)
    return sharding

  return jax.tree.map(sharding_for, state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def optimizer_shardings(tx, abstract_params: nnx.State, mesh: Mesh,
                        rules) -> Any:
  """Return a NamedSharding for every array of `tx`'s state, from the rules.

  Optax keeps params-shaped moments (Adam's mu and nu) as copies of the
  params tree, so they keep each `nnx.Param` and its `logical_axes` metadata
  and get the same sharding as the parameter. Scalars such as step counts are
  replicated. Deriving this from the rules, rather than from what
  `jax.jit(tx.init)` happens to propagate, keeps the optimizer state's layout
  fixed when the checkpoint is restored onto another mesh.
  """
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  return state_shardings(abstract_state, mesh, rules)


def compute_rules(rules) -> tuple[tuple[str, Any], ...]:
  """Return `rules` with the batch's mesh axes removed from every other rule.

  These are the layouts the train step computes with. FSDP stores a
  parameter split over the mesh axes that also split the batch. Used that
  way inside the step, XLA's partitioner (jax 0.10.2) resolves the clash by
  splitting the activations differently. For gpt2_small at batch 256 on an
  8-device fsdp mesh, the temporaries that `fastk_jax.dry_run` reports grew
  from 71 GB to 456 GB per device. Gathering the parameters over the batch
  axes first keeps the activations split by batch.
  """
  rule_map = dict(rules)
  batch_axes = set(_mesh_axes_of(rule_map.get("batch", BATCH_AXES)))
  result = []
  for name, target in rules:
    if name != "batch":
      kept = tuple(t for t in _mesh_axes_of(target) if t not in batch_axes)
      target = kept[0] if len(kept) == 1 else (kept or None)
    result.append((name, target))
  return tuple(result)


def gather_for_compute(params: nnx.State, mesh: Mesh, rules) -> nnx.State:
  """Constrain `params` to the `compute_rules` layout inside a jitted step.

  A no-op for rules that never split a parameter over a batch axis (dp, tp,
  tp_heads). Under FSDP the partitioner all-gathers the parameters here and,
  in the backward pass, reduce-scatters their gradients back to the stored
  layout. TODO: gather layer by layer instead of all at once, so that the
  step keeps one layer's full parameters in memory, not the whole model's.
  """
  gathered = compute_rules(rules)
  if gathered == tuple(rules):
    return params
  return jax.lax.with_sharding_constraint(
      params, state_shardings(params, mesh, gathered))


def batch_sharding(mesh: Mesh, rules=None) -> NamedSharding:
  """Return the sharding of `[batch, seq]` arrays: batch over data and fsdp."""
  rule_map = dict(rules or PRESETS["dp"])
  target = rule_map.get("batch", BATCH_AXES)
  targets = (target,) if isinstance(target, str) else tuple(target)
  targets = tuple(t for t in targets if t in mesh.shape)
  return NamedSharding(mesh, PartitionSpec(targets or None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_divisor(mesh: Mesh, rules=None) -> int:
  """Return how many shards the batch dimension is split into."""
  spec = batch_sharding(mesh, rules).spec[0]
  if spec is None:
    return 1
  targets = (spec,) if isinstance(spec, str) else spec
  return int(np.prod([mesh.shape[t] for t in targets]))


def make_global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding):
  """Assemble per-process numpy batches into global jax Arrays."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
