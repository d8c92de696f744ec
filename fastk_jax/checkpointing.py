"""Orbax checkpoints: parameters, optimizer state, metadata and data position.

Each checkpoint step is one Orbax directory `WORKDIR/checkpoints/<step>/` with
the items

* `params`: the model's `nnx.Param` state;
* `opt_state`: the optax state;
* `meta`: JSON with the step, tokens seen and each head's win count;
* `data`: the Grain iterator state, so a resumed run reads the next batch.

Orbax writes each step to a temporary directory and renames it when complete,
so an interrupted save never replaces the newest finished checkpoint. Restores
always pass targets with the shardings of the current mesh, which lets a
checkpoint written on one mesh load onto another (Orbax raises "Topology
mismatch" without targets).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from fastk_jax import model as model_lib
from fastk_jax import tokenizer as tokenizer_lib

ITEMS = ("params", "opt_state", "meta", "data")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, config, *, read_only: bool = False
                 ) -> ocp.CheckpointManager:
  """Create the CheckpointManager of a workdir."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.get("max_to_keep", 3),
      enable_async_checkpointing=config.get("async_checkpointing", True),
      create=not read_only,
      read_only=read_only,
      # A save cut off by a crash or kill -9 leaves a *.orbax-checkpoint-tmp*
      # directory. Orbax never lists it as a step, and restart removes it.
      cleanup_tmp_directories=not read_only,
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=ITEMS)


def save(manager: ocp.CheckpointManager, step: int, *, params, opt_state,
         meta: dict[str, Any], data_iterator=None, force: bool = False) -> bool:
  """Start saving a checkpoint for `step` (asynchronous if enabled)."""
  items = {
      "params": ocp.args.StandardSave(params),
      "opt_state": ocp.args.StandardSave(opt_state),
      "meta": ocp.args.JsonSave(meta),
  }
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  saved = manager.save(step, args=ocp.args.Composite(**items), force=force)
  if saved:
    logging.info("Saving checkpoint for step %d to %s.", step, manager.directory)
  return saved


def abstract_with_shardings(tree, shardings):
  """Return ShapeDtypeStructs of `tree` carrying the target `shardings`."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


def restore(manager: ocp.CheckpointManager, step: int, *, params_target,
            opt_state_target=None, data_iterator=None) -> dict[str, Any]:
  """Restore a checkpoint onto the shardings given in the targets.

  Args:
    manager: the workdir's manager.
    step: the step to restore.
    params_target: abstract params (ShapeDtypeStructs with shardings).
    opt_state_target: abstract optimizer state, or None to skip it.
    data_iterator: a Grain iterator whose position is restored in place, or
      None to skip it.

  Returns:
    A dict with "params", "meta" and, when requested, "opt_state".
  """
  items = {
      "params": ocp.args.StandardRestore(params_target),
      "meta": ocp.args.JsonRestore(),
  }
  if opt_state_target is not None:
    items["opt_state"] = ocp.args.StandardRestore(opt_state_target)
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  logging.info("Restored checkpoint for step %d from %s.", step, manager.directory)
  return {name: restored[name] for name in items if name != "data"}


def save_config(workdir: str, config) -> None:
  """Write `config.json` to the workdir (process 0 only)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, path)


# Fields that a resumed run must share with the run that wrote the workdir:
# they fix the parameter shapes, the tokenizer or the data iterator's meaning.
RESUME_FIELDS = (
    "seed", "batch_size", "model.num_layers", "model.num_heads",
    "model.embed_dim", "model.mlp_ratio", "model.max_len", "model.num_lm_heads",
    "model.head_bias", "model.tie_pilot_head", "model.vocab_size",
    "data.source", "data.text_dir", "data.tfds_name", "data.tokenizer",
    "data.bpe_vocab_size", "data.seq_len",
)


def _field(config, dotted: str):
  value = config
  for part in dotted.split("."):
    value = value.get(part) if hasattr(value, "get") else None
  return value


def check_resume_compatible(workdir: str, config) -> None:
  """Raise ValueError if `workdir` contains a run with another model or data.

  Runs before anything is written to the workdir, so a mistaken config never
  overwrites the stored `config.json` of a good run.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  stored = load_config(workdir)
  for field in RESUME_FIELDS:
    old, new = _field(stored, field), _field(config, field)
    if old is not None and old != new:
      raise ValueError(
          f"Workdir {workdir} contains a run with config.{field}={old!r}, but "
          f"this config sets {new!r}. Resume with the original value or "
          "start the new run in another --workdir.")


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """Read `config.json` from a workdir written by training."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"No config.json in workdir {workdir!r}; pass the --workdir of a "
        "training run (python -m fastk_jax.train --config=... --workdir=...).")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  # JSON turns tuples into lists; the mesh code expects sequences either way.
  return config


@dataclasses.dataclass
class InferenceState:
  """Model, tokenizer and head statistics restored from a training workdir."""
  config: ml_collections.ConfigDict
  model: model_lib.GPT
  tokenizer: Any
  step: int
  win_counts: np.ndarray  # [P] int64, training wins per head.
  tokens_seen: int = 0


def load_inference_state(workdir: str, step: int | None = None,
                         shardings=None) -> InferenceState:
  """Restore the model, tokenizer and win counts from a workdir.

  The parameters are restored onto the first local device, or onto
  `shardings` (an `nnx.State` of NamedShardings) when given, whatever mesh
  wrote them.

  Raises:
    FileNotFoundError: if the workdir has no config, tokenizer or checkpoint.
  """
  config = load_config(workdir)
  tokenizer = tokenizer_lib.load_tokenizer(os.path.join(workdir, "tokenizer"))
  if not os.path.isdir(checkpoint_dir(workdir)):
    raise FileNotFoundError(
        f"No checkpoints in {checkpoint_dir(workdir)!r}; train first with "
        f"python -m fastk_jax.train --config=... --workdir={workdir}.")
  manager = make_manager(workdir, config, read_only=True)
  if step is not None and step not in manager.all_steps():
    raise FileNotFoundError(
        f"No checkpoint for step {step} in {checkpoint_dir(workdir)!r}; "
        f"available steps: {sorted(manager.all_steps()) or 'none'}.")
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(
        f"No finished checkpoint in {checkpoint_dir(workdir)!r}; train until "
        "the first checkpoint is written (config.checkpoint_every steps).")

  vocab_size = tokenizer.vocab_size
  abstract_model = nnx.eval_shape(
      lambda: model_lib.create_model(config.model, vocab_size, config.seed))
  graphdef, abstract_params = nnx.split(abstract_model)
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract_params)
  target = abstract_with_shardings(abstract_params, shardings)
  restored = restore(manager, step, params_target=target)
  manager.close()

  model = nnx.merge(graphdef, restored["params"])
  meta = restored["meta"]
  return InferenceState(
      config=config, model=model, tokenizer=tokenizer, step=int(meta["step"]),
      win_counts=np.asarray(meta["win_counts"], np.int64),
      tokens_seen=int(meta.get("tokens_seen", 0)))
