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
COMBINE_RULES = ("max", "mean")
DATA_SOURCES = ("embedded", "text_dir", "tfds")
TOKENIZERS = ("gpt2", "bpe")
DTYPES = ("float32", "bfloat16")
GPT2_VOCAB_SIZE = 50257


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
  # How the heads' shortlist distributions combine into one: max or mean.
  c.decode.combine = "max"
  c.decode.seed = 0  # Sampling seed for generation (temperature > 0).

  c.mesh = ml_collections.ConfigDict()
  c.mesh.axes = ("data", "fsdp", "tensor")
  c.mesh.shape = (-1, 1, 1)  # -1 takes the remaining devices.
  c.mesh.preset = "dp"  # dp, fsdp, tp or tp_heads; see sharding.PRESETS.
  c.mesh.rules = ()  # Explicit (logical, mesh axis) pairs override the preset.
  return c


def gpt2_config(arg, *, num_layers, num_heads, embed_dim):
  """Return the shared settings of the GPT-2 family configs (unlocked).

  `arg` needs the fields steps, batch, heads, k and preset.
  """
  c = base_config()
  c.seed = 0
  c.total_steps = arg.steps
  c.batch_size = arg.batch
  c.log_every = 100
  c.eval_every = 2000
  c.eval_steps = 50
  c.checkpoint_every = 2000

  c.model.num_layers = num_layers
  c.model.num_heads = num_heads
  c.model.embed_dim = embed_dim
  c.model.max_len = 1024
  c.model.dropout = 0.0
  c.model.num_lm_heads = arg.heads
  c.model.dtype = "bfloat16"

  c.data.tokenizer = "gpt2"
  c.data.seq_len = 1024
  c.data.worker_count = 4
  c.loss.chunk_size = 2048

  c.optimizer.learning_rate = 6e-4
  c.optimizer.warmup_steps = 2000

  c.eval.context_length = 1024
  c.eval.stride = 512
  c.eval.batch_size = 8
  c.decode.top_k = arg.k
  c.mesh.preset = arg.preset
  # FSDP needs devices on the fsdp axis; a pure data-parallel preset ignores it.
  c.mesh.shape = (1, -1, 1) if arg.preset.startswith("fsdp") else (-1, 1, 1)
  return c


def _check(condition: bool, field: str, value, fix: str) -> None:
  if not condition:
    raise ValueError(f"Invalid config.{field}={value!r}: {fix}")


def validate_config(config, vocab_size: int | None = None) -> None:
  """Raise one clear ValueError for the first invalid field.

  Runs before any data preparation or compilation. Checks that need the
  vocabulary size run only when `vocab_size` is given.
  """
  m, d = config.model, config.decode
  _check(config.total_steps >= 1, "total_steps", config.total_steps,
         "train for at least 1 step.")
  _check(config.batch_size >= 1, "batch_size", config.batch_size,
         "use a positive global batch size.")
  for field in ("log_every", "eval_every", "checkpoint_every"):
    _check(config[field] >= 1, field, config[field], "use a positive interval.")
  _check(m.num_lm_heads >= 1, "model.num_lm_heads", m.num_lm_heads,
         "P must be at least 1 (1 is a standard single-head GPT).")
  _check(m.num_layers >= 1, "model.num_layers", m.num_layers,
         "use at least 1 layer.")
  _check(m.embed_dim % m.num_heads == 0, "model.embed_dim", m.embed_dim,
         f"must be divisible by model.num_heads={m.num_heads}.")
  _check(m.dtype in DTYPES, "model.dtype", m.dtype,
         f"choose one of {', '.join(DTYPES)}.")
  _check(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout,
         "use a rate in [0, 1).")
  _check(config.data.seq_len >= 1, "data.seq_len", config.data.seq_len,
         "use a positive sequence length.")
  _check(config.data.seq_len <= m.max_len, "data.seq_len", config.data.seq_len,
         f"sequences longer than the position table (model.max_len={m.max_len}) "
         "cannot be embedded; lower data.seq_len or raise model.max_len.")
  _check(config.eval.context_length <= m.max_len, "eval.context_length",
         config.eval.context_length,
         f"must be at most model.max_len={m.max_len}.")
  _check(0 < config.eval.stride <= config.eval.context_length, "eval.stride",
         config.eval.stride,
         f"use a stride in [1, eval.context_length={config.eval.context_length}].")
  _check(0.0 <= config.loss.wta_epsilon < 1.0, "loss.wta_epsilon",
         config.loss.wta_epsilon, "use a value in [0, 1); 0 is strict WTA.")
  _check(config.loss.chunk_size >= 1, "loss.chunk_size", config.loss.chunk_size,
         "use a positive number of tokens per chunk.")
  _check(config.data.source in DATA_SOURCES, "data.source", config.data.source,
         f"choose one of {', '.join(DATA_SOURCES)}.")
  _check(config.data.tokenizer in TOKENIZERS, "data.tokenizer",
         config.data.tokenizer, f"choose one of {', '.join(TOKENIZERS)}.")
  if config.data.source == "text_dir":
    _check(bool(config.data.text_dir), "data.text_dir", config.data.text_dir,
           "set it to a directory of .txt files when data.source='text_dir'.")
  if config.data.source == "tfds":
    _check(bool(config.data.tfds_name), "data.tfds_name", config.data.tfds_name,
           "set it to a prepared TFDS dataset (e.g. lm1b) when data.source='tfds'.")
  _check(d.decoder in DECODERS, "decode.decoder", d.decoder,
         f"choose one of {', '.join(DECODERS)}.")
  _check(d.pilot in PILOT_STRATEGIES, "decode.pilot", d.pilot,
         f"choose one of {', '.join(PILOT_STRATEGIES)}.")
  _check(0 <= d.pilot_head < m.num_lm_heads, "decode.pilot_head", d.pilot_head,
         f"must name a head in [0, model.num_lm_heads={m.num_lm_heads}).")
  _check(d.top_k >= 1, "decode.top_k", d.top_k,
         "K is the shortlist size and must be at least 1.")
  if vocab_size is None:
    # The tokenizer is not built yet, but its size is known from the config:
    # check K now instead of after training a BPE tokenizer.
    expected = (GPT2_VOCAB_SIZE if config.data.tokenizer == "gpt2"
                else config.data.bpe_vocab_size)
    _check(d.top_k <= expected, "decode.top_k", d.top_k,
           f"K cannot exceed the vocabulary size {expected} "
           f"(data.tokenizer={config.data.tokenizer!r}).")
  if vocab_size is not None:
    _check(d.top_k <= vocab_size, "decode.top_k", d.top_k,
           f"K cannot exceed the vocabulary size {vocab_size}.")
    if m.vocab_size:
      _check(m.vocab_size == vocab_size, "model.vocab_size", m.vocab_size,
             f"the tokenizer has {vocab_size} tokens; set 0 to use the "
             "tokenizer's size.")
