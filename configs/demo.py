"""Demo: a small 4-head GPT on the embedded public-domain corpus, for CPUs.

Trains in about 7 minutes on an idle 2-core CPU (docs/benchmarks.md, "Demo run"):

  python -m fastk_jax.main --config=configs/demo.py --workdir=workdirs/demo
  python -m fastk_jax.train --config=configs/demo.py:heads=1,steps=300 \
      --workdir=workdirs/demo_p1

Arguments (after the colon, comma-separated): heads (P), steps, seed, k (the
Fast-K shortlist size) and eps (relaxed winner-take-all weight; 0 is strict).
"""

from fastk_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, heads=4, steps=600, seed=0, k=50, eps=0.3)
  c = config_lib.base_config()

  c.seed = arg.seed
  c.total_steps = arg.steps
  c.batch_size = 16
  c.log_every = 25
  c.eval_every = 200
  c.eval_steps = 8
  c.checkpoint_every = 200

  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.embed_dim = 256
  c.model.max_len = 128
  c.model.num_lm_heads = arg.heads

  c.data.source = "embedded"
  c.data.tokenizer = "bpe"
  c.data.bpe_vocab_size = 4096
  c.data.seq_len = 128

  # Relaxed winner-take-all: each non-winning head keeps weight eps / (P - 1).
  # Under strict WTA (eps=0) the heads split the vocabulary between them, and
  # a single pilot's shortlist then misses most targets, so Fast-K decoding
  # degrades badly (docs/results.md compares both).
  c.loss.wta_epsilon = arg.eps

  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 50

  c.eval.context_length = 128
  c.eval.stride = 64
  c.eval.max_tokens = 60_000

  c.decode.top_k = arg.k
  c.decode.pilot_head = 0
  c.lock()
  return c


def sweep():
  """P in {1, 2, 4, 8} with 3 seeds, everything else fixed."""
  return [{"model.num_lm_heads": p, "seed": s}
          for p in (1, 2, 4, 8) for s in (0, 1, 2)]
