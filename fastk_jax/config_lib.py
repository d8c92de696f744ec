"""Default configuration, typed config-string arguments and config validation.

Config files in `configs/` define `get_config(arg)` and start from `base_config()`.
The `arg` string works like big_vision's: `configs/demo.py:heads=4,steps=300`
passes "heads=4,steps=300", and `parse_arg` converts each value to the type of
its default.
"""

from __future__ import annotations

import ml_collections

PILOT_STRATEGIES = ("fixed", "round_robin", "utilization", "lowest_entropy")
DECODERS = ("fastk", "dense")
DATA_SOURCES = ("embedded", "text_dir", "tfds")
TOKENIZERS = ("gpt2", "bpe")
DTYPES = ("float32", "bfloat16")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parse "key=value,flag" into a ConfigDict typed by the defaults.

  A bare key sets a bool default to True. Keys missing from `arg` keep their
  default. An unknown key raises ValueError naming the known ones.
  """
  result = ml_collections.ConfigDict(defaults)
  if not arg:
    return result

  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, has_value, value = item.partition("=")
    if key not in defaults:
      raise ValueError(
          f"Unknown config argument {key!r} in {arg!r}; known arguments: "
          f"{', '.join(sorted(defaults))}.")
    default = defaults[key]
    if not has_value:
      if not isinstance(default, bool):
        raise ValueError(f"Config argument {key!r} needs a value, e.g. {key}={default}.")
      result[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"Config argument {key}={value!r} must be true or false.")
      result[key] = value.lower() in ("true", "1")
    elif default is None or isinstance(default, str):
      result[key] = value
    else:
      try:
        result[key] = type(default)(value)
      except ValueError as err:
        raise ValueError(
            f"Config argument {key}={value!r} is not a valid "
            f"{type(default).__name__}.") from err
  return result


def base_config() -> ml_collections.ConfigDict:
  """Return the default config with every field the code reads.

  Config files override fields and then call `config.lock()`, so a typo in a
  `--config.x=y` override fails instead of adding a new field.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 16  # Global batch, split over all devices and processes.
  c.log_every = 50
  c.eval_every = 500
  c.eval_steps = 20  # Validation batches per periodic evaluation.
  c.checkpoint_every = 500
  c.max_to_keep = 3
  c.async_checkpointing = True
  c.nan_check = True

  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 4
  c.model.num_heads = 4  # Attention heads.
  c.model.embed_dim = 256
  c.model.mlp_ratio = 4
  c.model.max_len = 256  # Size of the learned position table.
  c.model.dropout = 0.0
  c.model.num_lm_heads = 4  # P, the number of LM heads.
  c.model.head_bias = False
  c.model.tie_pilot_head = True  # Head 0 shares the token embedding, as in GPT-2.
  c.model.head_init_noise = 0.02  # Std of each head's seeded perturbation.
  c.model.dtype = "float32"  # Compute dtype: float32 or bfloat16.
  # The vocabulary size comes from the tokenizer. 0 means "use the tokenizer's".
  c.model.vocab_size = 0

  c.loss = ml_collections.ConfigDict()
  c.loss.wta_epsilon = 0.0  # 0 is strict winner-take-all.
  c.loss.chunk_size = 1024  # Tokens per logits chunk in the loss.

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 3e-4
  c.optimizer.warmup_steps = 100
  c.optimizer.end_learning_rate_factor = 0.1
  c.optimizer.weight_decay = 0.1
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.grad_clip_norm = 1.0

  c.data = ml_collections.ConfigDict()
  c.data.source = "embedded"  # embedded, text_dir or tfds.
  c.data.text_dir = ""
  c.data.tfds_name = ""
  c.data.tfds_text_key = "text"
  c.data.tfds_data_dir = ""  # Empty: the TFDS default directory.
  c.data.cache_dir = ""  # Empty: ~/.cache/fastk_jax.
  c.data.seq_len = 128
  c.data.tokenizer = "bpe"  # gpt2 or bpe.
  c.data.bpe_vocab_size = 4096
  c.data.worker_count = 0  # Grain worker processes; 0 reads in the main process.

  c.eval = ml_collections.ConfigDict()
  c.eval.split = "test"
  c.eval.context_length = 128
  c.eval.stride = 64
  c.eval.batch_size = 8
  c.eval.max_tokens = 0  # 0 evaluates the whole split.

  c.decode = ml_collections.ConfigDict()
  c.decode.decoder = "fastk"  # fastk or dense.
  c.decode.top_k = 50  # K, the pilot head's shortlist size.
  c.decode.pilot = "utilization"
  c.decode.pilot_head = 0  # Used by the fixed pilot.
  c.decode.temperature = 0.0  # 0 decodes greedily.
  c.decode.top_p = 1.0
  c.decode.max_new_tokens = 64

  c.mesh = ml_collections.ConfigDict()
  c.mesh.axes = ("data", "fsdp", "tensor")
  c.mesh.shape = (-1, 1, 1)  # -1 takes the remaining devices.
  return c
