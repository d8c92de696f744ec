"""GPT-2 small trunk (124M) with P LM heads and the GPT-2 BPE, for accelerators.

  python -m fastk_jax.train --config=configs/gpt2_small.py --workdir=gs://...
  python -m fastk_jax.train --config=configs/gpt2_small.py:heads=8,preset=fsdp

Arguments: heads (P, default 4), k (Fast-K shortlist, default 50), steps,
batch (global batch size), preset (mesh preset: dp, fsdp, tp, tp_heads).
"""

from fastk_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, heads=4, k=50, steps=100_000, batch=256,
                             preset="fsdp")
  c = config_lib.gpt2_config(arg, num_layers=12, num_heads=12, embed_dim=768)
  c.lock()
  return c
