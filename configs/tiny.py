"""Tiny config for tests and smoke runs: a few steps in seconds on a CPU.

Arguments: heads (P), steps, text_dir (train on a directory of .txt files
instead of the embedded corpus).
"""

from fastk_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, heads=2, steps=6, text_dir="")
  c = config_lib.base_config()

  c.total_steps = arg.steps
  c.batch_size = 8  # Divisible by the 8 CPU devices the sharding tests use.
  c.log_every = 2
  c.eval_every = 4
  c.eval_steps = 1
  c.checkpoint_every = 3
  c.async_checkpointing = False

  c.model.num_layers = 1
  c.model.num_heads = 2
  c.model.embed_dim = 32
  c.model.max_len = 32
  c.model.num_lm_heads = arg.heads

  if arg.text_dir:
    c.data.source = "text_dir"
    c.data.text_dir = arg.text_dir
  c.data.tokenizer = "bpe"
  c.data.bpe_vocab_size = 300
  c.data.seq_len = 16

  c.loss.chunk_size = 16
  c.optimizer.warmup_steps = 2
  c.eval.context_length = 16
  c.eval.stride = 8
  c.eval.batch_size = 4
  c.eval.max_tokens = 400
  c.decode.top_k = 5
  c.decode.max_new_tokens = 8
  c.lock()
  return c
