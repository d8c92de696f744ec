"""Compile the train step for N fake CPU devices and report per-device memory.

  python -m fastk_jax.dry_run --config=configs/gpt2_small.py --num_devices=64
  python -m fastk_jax.dry_run --config=configs/gpt2_medium.py --num_devices=8 \
      --config.mesh.shape='(1,-1,1)'

The step is compiled ahead of time (`jax.jit(...).lower(...).compile()`)
from `jax.ShapeDtypeStruct` inputs that carry the mesh's shardings, so no
parameter, optimizer state or batch is ever allocated and no data or
tokenizer is read. The vocabulary size is `config.model.vocab_size`, or the
configured tokenizer's size (50257 for GPT-2's BPE, `data.bpe_vocab_size`
for a trained BPE).

Reported per device: parameter and optimizer-state bytes from each array's
shard shape, and the compiled step's argument, output and temporary bytes
from XLA's `memory_analysis()`. The compiler is XLA:CPU, so the temporaries
estimate an accelerator's; GPU and TPU compilers fuse and schedule
differently.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
from flax import nnx
import jax
from ml_collections import config_flags

from fastk_jax import checkpointing
from fastk_jax import logs
from fastk_jax import model as model_lib
from fastk_jax import sharding as sharding_lib
from fastk_jax import tokenizer as tokenizer_lib
from fastk_jax import train

_NUM_DEVICES = flags.DEFINE_integer(
    "num_devices", 8, "Number of fake CPU devices to compile for.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/gpt2_small.py:heads=4.",
    lock_config=True)

_MIB = 2**20


def configured_vocab_size(config) -> int:
  """Return the vocabulary size the config trains with, without a tokenizer."""
  if config.model.vocab_size:
    return config.model.vocab_size
  if config.data.tokenizer == "gpt2":
    return tokenizer_lib.GPT2_VOCAB_SIZE
  return config.data.bpe_vocab_size


def per_device_bytes(abstract_tree) -> int:
  """Return the bytes of one device's shards of `ShapeDtypeStruct` leaves.

  With uneven layouts the devices differ, so this returns the largest
  per-device sum, which is what must fit.
  """
  totals: dict[Any, int] = {}
  for leaf in jax.tree.leaves(abstract_tree):
    sharding = leaf.sharding
    index_map = sharding.devices_indices_map(leaf.shape)
    for device, index in index_map.items():
      shape = [len(range(*s.indices(dim))) for s, dim in zip(index, leaf.shape)]
      totals[device] = (totals.get(device, 0)
                        + math.prod(shape) * leaf.dtype.itemsize)
  return max(totals.values(), default=0)


def compile_train_step(config, vocab_size: int) -> dict[str, Any]:
  """Lower and compile the train step for the configured mesh on all devices.

  Returns:
    A dict of sizes and settings: parameter counts, per-device bytes and
    XLA's memory analysis of the compiled step.
  """
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.rules_from_config(config.mesh)
  sharding_lib.log_unused_rules(mesh, rules)
  divisor = sharding_lib.batch_divisor(mesh, rules)
  if config.batch_size % divisor:
    raise ValueError(
        f"Invalid config.batch_size={config.batch_size}: it must be divisible "
        f"by the {divisor} batch shards of mesh {dict(mesh.shape)}.")

  create = functools.partial(model_lib.create_model, config.model, vocab_size,
                             config.seed)
  graphdef, abstract_params = nnx.split(nnx.eval_shape(create))
  param_shardings = sharding_lib.state_shardings(abstract_params, mesh, rules)
  tx, _ = train.make_optimizer(config.optimizer, config.total_steps)
  opt_shardings = sharding_lib.optimizer_shardings(tx, abstract_params, mesh,
                                                   rules)
  abstract_opt_state = jax.eval_shape(tx.init, abstract_params)
  params = checkpointing.abstract_with_shardings(abstract_params,
                                                 param_shardings)
  opt_state = checkpointing.abstract_with_shardings(abstract_opt_state,
                                                    opt_shardings)

  batch_sharding = sharding_lib.batch_sharding(mesh, rules)
  replicated = sharding_lib.replicated(mesh)
  tokens = jax.ShapeDtypeStruct((config.batch_size, config.data.seq_len),
                                "int32", sharding=batch_sharding)
  batch = {"inputs": tokens, "targets": tokens}
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)

  step = jax.jit(
      train.make_train_step(graphdef, config, tx, mesh, rules),
      in_shardings=(param_shardings, opt_shardings, batch_sharding, replicated),
      out_shardings=(param_shardings, opt_shardings, replicated),
      donate_argnums=(0, 1))
  start = time.perf_counter()
  compiled = step.lower(params, opt_state, batch, key).compile()
  compile_seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()

  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  head_params = math.prod(abstract_params["lm_heads"]["kernel"].shape)
  return {
      "mesh": dict(mesh.shape),
      "rules": rules,
      "num_devices": mesh.size,
      "vocab_size": vocab_size,
      "num_params": num_params,
      "head_params": head_params,
      "params_bytes": per_device_bytes(params),
      "opt_state_bytes": per_device_bytes(opt_state),
      "argument_bytes": memory.argument_size_in_bytes,
      "output_bytes": memory.output_size_in_bytes,
      "alias_bytes": memory.alias_size_in_bytes,
      "temp_bytes": memory.temp_size_in_bytes,
      "compile_seconds": compile_seconds,
  }


def format_report(config, result: dict[str, Any]) -> str:
  """Return the dry run's result as a short plain-text table."""
  m = config.model
  lines = [
      f"Model: {m.num_layers} layers, d={m.embed_dim}, P={m.num_lm_heads} "
      f"heads, V={result['vocab_size']}: {result['num_params'] / 1e6:.1f}M "
      f"parameters ({result['head_params'] / 1e6:.1f}M in the LM heads).",
      f"Batch {config.batch_size} x {config.data.seq_len} tokens, "
      f"dtype {m.dtype}, preset {config.mesh.preset!r}, mesh "
      f"{result['mesh']} over {result['num_devices']} devices.",
      "Per device (MiB):",
      f"  parameters        {result['params_bytes'] / _MIB:10.1f}",
      f"  optimizer state   {result['opt_state_bytes'] / _MIB:10.1f}",
      f"  step arguments    {result['argument_bytes'] / _MIB:10.1f}",
      f"  step outputs      {result['output_bytes'] / _MIB:10.1f}"
      f"  (donated, aliased: {result['alias_bytes'] / _MIB:.1f})",
      f"  step temporaries  {result['temp_bytes'] / _MIB:10.1f}",
      f"Compiled in {result['compile_seconds']:.1f} s.",
  ]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required.")
  # Both settings must precede the first use of a JAX device, which no
  # import above makes. The CPU platform keeps the dry run off any real
  # accelerator.
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", _NUM_DEVICES.value)
  logs.quiet_library_logs()

  config = _CONFIG.value
  vocab_size = configured_vocab_size(config)
  logging.info("Compiling the train step for %d CPU devices.",
               _NUM_DEVICES.value)
  result = compile_train_step(config, vocab_size)
  print(format_report(config, result))


if __name__ == "__main__":
  app.run(main)
