"""GPT-2 medium trunk (350M) with P LM heads and the GPT-2 BPE, for accelerators.

Arguments as in gpt2_small.py: heads, k, steps, batch, preset.
"""

from fastk_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, heads=4, k=50, steps=200_000, batch=256,
                             preset="fsdp")
  c = config_lib.gpt2_config(arg, num_layers=24, num_heads=16, embed_dim=1024)
  c.optimizer.learning_rate = 3e-4
  c.lock()
  return c
