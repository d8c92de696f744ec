"""A smaller demo for the P sweep: 21 runs on a 2-core CPU in about 1.5 hours.

The model, data and steps are the same for every run; only P, the seed and
the winner-take-all setting change: strict WTA for P in {1, 2, 4, 8} and
relaxed WTA (loss.wta_epsilon=0.3) for P in {2, 4, 8}, each with seeds 0, 1
and 2. One sweep command runs both settings. Run the sweep and then the
report:

  python launch/sweep.py --config=configs/sweep_small.py \
      --workdir_root=workdirs/sweep --run
  python -m fastk_jax.report --sweep_root=workdirs/sweep \
      --output=docs/results.md --sweep_config=configs/sweep_small.py

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


# Relaxed winner-take-all (loss.wta_epsilon): the winning head's loss weight
# is 1 - epsilon and the other heads share epsilon, so every head keeps
# training on every token. P = 1 has no other heads, so its strict runs are
# the baseline for both settings.
RELAXED_WTA_EPSILON = 0.3


def sweep():
  """P in {1, 2, 4, 8} under strict WTA, and P in {2, 4, 8} under relaxed WTA.

  Every setting runs with seeds 0, 1 and 2; everything else is fixed. The
  strict entries leave loss.wta_epsilon at its default of 0, so their
  workdir names ("heads=4,seed=0") carry no epsilon. The relaxed entries'
  names end in it ("heads=4,seed=0,wta_epsilon=0.3").

  Seed-major order: an interrupted sweep has every setting for the first
  seeds.
  """
  entries = []
  for s in (0, 1, 2):
    entries += [{"model.num_lm_heads": p, "seed": s} for p in (1, 2, 4, 8)]
    entries += [{"model.num_lm_heads": p, "seed": s,
                 "loss.wta_epsilon": RELAXED_WTA_EPSILON} for p in (2, 4, 8)]
  return entries
