"""A smaller demo for the P sweep: 12 runs on a 2-core CPU in about an hour.

The model, data and steps are the same for every run; only P and the seed
change. Run the sweep and then the report:

  python launch/sweep.py --config=configs/sweep_small.py \
      --workdir_root=workdirs/sweep --run
  python -m fastk_jax.report --sweep_root=workdirs/sweep --output=docs/results.md

Arguments (after the colon, comma-separated): heads (P), steps, seed, k.
"""

from fastk_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, heads=4, steps=500, seed=0, k=50)
  c = config_lib.base_config()

  c.seed = arg.seed
  c.total_steps = arg.steps
  c.batch_size = 16
  c.log_every = 25
  c.eval_every = 250
  c.eval_steps = 8
  c.checkpoint_every = 250

  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.embed_dim = 128
  c.model.max_len = 64
  c.model.num_lm_heads = arg.heads

  c.data.source = "embedded"
  c.data.tokenizer = "bpe"
  c.data.bpe_vocab_size = 2048
  c.data.seq_len = 64

  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 50

  c.eval.context_length = 64
  c.eval.stride = 32
  c.eval.batch_size = 16
  c.eval.max_tokens = 60_000

  c.decode.top_k = arg.k
  c.decode.pilot_head = 0
  c.lock()
  return c


def sweep():
  """P in {1, 2, 4, 8} with 3 seeds, everything else fixed.

  Seed-major order: an interrupted sweep has every P for the first seeds.
  """
  return [{"model.num_lm_heads": p, "seed": s}
          for s in (0, 1, 2) for p in (1, 2, 4, 8)]
