"""Speed and memory benchmarks, one subcommand each.

Usage:
  python -m fastk_jax.benchmark loss
  python -m fastk_jax.benchmark decode [--shapes=gpt2_small,demo]
      [--batch_sizes=1,8] [--num_lm_heads=2,4,8] [--top_ks=10,50,200]
      [--parts=head,step,pilot] [--repeats=10] [--warmup=2]

decode: single-head (P=1) against dense P-head and Fast-K P-head greedy
decoding, with random weights, for
  head   the LM head alone: hidden `[B, d]` -> (token, head);
  step   a whole decode step: one token through the trunk with a KV cache, then
         the head;
  pilot  ways to compute per-row pilot logits (the lowest_entropy pilot).
Head and step run `--steps_per_call` steps in a `lax.fori_loop` per call, as
generation does, and report time per step. Each figure is the median over
`--repeats` timed calls after `--warmup` calls (the first compiles). The
variants of one table block are timed in interleaved rounds, so a load spike
from another process hits all of them. The full grid took 258 s on a 2-core
CPU (docs/benchmarks.md).

loss: compiled temporary memory of the winner-take-all loss and its gradient,
chunked against naive (see `fastk_jax/loss_benchmark.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from flax import nnx

from fastk_jax import config_lib
from fastk_jax import decoding
from fastk_jax import heads as heads_lib
from fastk_jax import loss_benchmark
from fastk_jax import model as model_lib

_SHAPES = flags.DEFINE_list(
    "shapes", ["gpt2_small", "demo"], "Model shapes: gpt2_small, demo.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes.")
_NUM_LM_HEADS = flags.DEFINE_list(
    "num_lm_heads", ["2", "4", "8"], "Values of P.")
_TOP_KS = flags.DEFINE_list("top_ks", ["10", "50", "200"], "Values of K.")
_PARTS = flags.DEFINE_list(
    "parts", ["head", "step", "pilot"], "What to time: head, step, pilot.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls per measurement.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls before timing.")
_STEPS_PER_CALL = flags.DEFINE_integer(
    "steps_per_call", 8, "Decode steps per timed call (head and step parts).")
_CACHE_LEN = flags.DEFINE_integer(
    "cache_len", 128,
    "KV cache slots in the step part. The timed steps write its second half.")


@dataclasses.dataclass(frozen=True)
class Shape:
  """Model dimensions for a benchmark."""
  name: str
  embed_dim: int
  num_layers: int
  num_heads: int  # Attention heads.
  vocab_size: int


GPT2_SMALL = Shape("gpt2_small", 768, 12, 12, 50257)


def demo_shape() -> Shape:
  """Read the demo model's dimensions from configs/demo.py.

  Falls back to d=256, 4 layers, 4 attention heads, V=4096 when the file is not
  there (an installed package without the configs folder).
  """
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs",
                      "demo.py")
  if not os.path.exists(path):
    return Shape("demo", 256, 4, 4, 4096)
  spec = importlib.util.spec_from_file_location("configs_demo", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  vocab = config.model.vocab_size or config.data.bpe_vocab_size
  return Shape("demo", config.model.embed_dim, config.model.num_layers,
               config.model.num_heads, vocab)


def median_seconds(calls, *, repeats: int, warmup: int):
  """Return {key: median wall time} of the no-argument callables `calls`.

  The calls are interleaved: each round runs every callable once. Load from
  other processes then slows all variants alike, which keeps their ratios
  fair on a shared machine.
  """
  for _ in range(warmup):
    for fn in calls.values():
      jax.block_until_ready(fn())
  times = {key: [] for key in calls}
  for _ in range(repeats):
    for key, fn in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[key].append(time.perf_counter() - start)
  return {key: statistics.median(values) for key, values in times.items()}


# ---------------------------------------------------------------------------
# Decision functions: hidden `[B, d]` -> (token `[B]`, head `[B]`).


def single_head_decision(hidden, weight):
  """Decode greedily with one `[V, d]` head, like GPT-2's LM head."""
  logits = jax.lax.dot_general(hidden, weight, (((1,), (1,)), ((), ())))
  token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return token, jnp.zeros_like(token)


def multi_head_decision(hidden, weights, pilot, *, decoder, top_k):
  """Decode greedily with Fast-K or dense and return the token and its head."""
  out = decoding.decode_step(hidden, weights, pilot, decoder=decoder,
                             top_k=top_k)
  return out.greedy_token, out.greedy_head


def _decisions(weights_by_p, top_ks):
  """Yield (P, K, label, decision_fn, weights), with P = 1 the single head."""
  yield 1, None, "single", single_head_decision, weights_by_p[1].per_head[0]
  for num_heads, weights in weights_by_p.items():
    if num_heads == 1:
      continue
    dense = functools.partial(multi_head_decision, pilot=jnp.int32(0),
                              decoder="dense", top_k=1)
    yield num_heads, None, "dense", dense, weights
    for top_k in top_ks:
      fastk = functools.partial(multi_head_decision, pilot=jnp.int32(0),
                                decoder="fastk", top_k=top_k)
      yield num_heads, top_k, "fastk", fastk, weights


def random_head_weights(shape: Shape, head_counts, seed=0):
  """Return {P: HeadWeights} of random heads, always including P = 1."""
  largest = max(head_counts)
  kernel = 0.02 * jax.random.normal(
      jax.random.key(seed), (largest, shape.vocab_size, shape.embed_dim))
  weights = {}
  for num_heads in sorted({1, *head_counts}):
    weights[num_heads] = jax.block_until_ready(
        decoding.split_heads(kernel[:num_heads]))
  return weights


# ---------------------------------------------------------------------------
# Parts.


def _make_head_fn(decision, steps: int):
  """Build `run(table, weights, token) -> token` running `steps` decisions.

  Each step's hidden state is the table row of the previous token, so no step
  can be hoisted out of the loop. Looping inside one call, as generation does,
  also keeps XLA's per-call buffer allocation out of the per-step figure.
  """

  def run(table, weights, token):
    def one_step(_, token):
      hidden = jnp.take(table, token, axis=0)  # [B, d]
      token, _ = decision(hidden, weights)
      return token

    return jax.lax.fori_loop(0, steps, one_step, token)

  return jax.jit(run)


def time_head(shape: Shape, batch: int, weights_by_p, top_ks, repeats, warmup,
              steps_per_call):
  """Time the LM head alone and return {(P, K, label): seconds per step}."""
  table = weights_by_p[1].per_head[0]  # [V, d], as a tied token embedding.
  token = jnp.arange(batch, dtype=jnp.int32)
  calls = {}
  for num_heads, top_k, label, decision, weights in _decisions(
      weights_by_p, top_ks):
    run = _make_head_fn(decision, steps_per_call)
    calls[num_heads, top_k, label] = functools.partial(
        run, table, weights, token)
  seconds = median_seconds(calls, repeats=repeats, warmup=warmup)
  results = {key: value / steps_per_call for key, value in seconds.items()}
  for (num_heads, top_k, label), value in results.items():
    logging.info("head %s B=%d P=%d K=%s %s: %.2f ms", shape.name, batch,
                 num_heads, top_k, label, 1e3 * value)
  return results


def _make_step_fn(graphdef, decision, steps: int, start_slot: int):
  """Build `run(params, weights, cache, token) -> (token, cache)`.

  Runs `steps` decode steps: the trunk on one token per row with the KV cache,
  then `decision` on its hidden state. The cache is donated, so XLA updates it
  in place instead of copying it on every call.
  """

  def run(params, weights, cache, token):
    model = nnx.merge(graphdef, params)
    batch = token.shape[0]
    kv_mask = jnp.ones((batch, cache[0]["k"].shape[1]), bool)

    def one_step(i, carry):
      token, cache = carry
      slot = start_slot + i
      positions = jnp.full((batch, 1), slot, jnp.int32)
      hidden, cache = model(token[:, None], positions=positions,
                            kv_mask=kv_mask, cache=cache, cache_index=slot)
      token, _ = decision(hidden[:, 0], weights)
      return token, cache

    return jax.lax.fori_loop(0, steps, one_step, (token, cache))

  return jax.jit(run, donate_argnums=(2,))


def time_step(shape: Shape, batch: int, weights_by_p, top_ks, repeats, warmup,
              steps_per_call, cache_len):
  """Time whole decode steps and return {(P, K, label): seconds per step}."""
  config = config_lib.base_config()
  config.model.num_layers = shape.num_layers
  config.model.num_heads = shape.num_heads
  config.model.embed_dim = shape.embed_dim
  config.model.max_len = cache_len
  config.model.num_lm_heads = 1  # The heads come from weights_by_p.
  model = model_lib.create_model(config.model, shape.vocab_size, seed=0)
  graphdef, params = nnx.split(model)
  start_slot = cache_len // 2
  if start_slot + steps_per_call > cache_len:
    raise ValueError(
        f"--steps_per_call={steps_per_call} does not fit in the second half of "
        f"--cache_len={cache_len}. Raise --cache_len.")

  calls = {}
  for num_heads, top_k, label, decision, weights in _decisions(
      weights_by_p, top_ks):
    run = _make_step_fn(graphdef, decision, steps_per_call, start_slot)
    state = {"cache": model.init_cache(batch, cache_len),
             "token": jnp.zeros((batch,), jnp.int32)}

    def call(state=state, run=run, weights=weights):
      # Feed the donated cache back so that every call reuses one buffer.
      state["token"], state["cache"] = run(params, weights, state["cache"],
                                           state["token"])
      return state["token"]

    calls[num_heads, top_k, label] = call
  seconds = median_seconds(calls, repeats=repeats, warmup=warmup)
  results = {key: value / steps_per_call for key, value in seconds.items()}
  for (num_heads, top_k, label), value in results.items():
    logging.info("step %s B=%d P=%d K=%s %s: %.2f ms", shape.name, batch,
                 num_heads, top_k, label, 1e3 * value)
  return results


def time_pilot_options(shape: Shape, batch: int, num_heads: int, repeats,
                       warmup):
  """Time methods for per-row pilot logits `[B, V]`, in seconds by name."""
  weights = random_head_weights(shape, [num_heads])[num_heads]
  hidden = jax.random.normal(jax.random.key(1), (batch, shape.embed_dim))
  spread = jnp.arange(batch, dtype=jnp.int32) % num_heads  # All heads in use.
  distinct = min(batch, num_heads)
  same = jnp.zeros((batch,), jnp.int32)

  def gather_rows(hidden, weights, pilots):
    rows = weights.kernel[pilots]  # [B, V, d], a copy of B heads.
    return jnp.einsum("bd,bvd->bv", hidden, rows)

  def dense_select(hidden, weights, pilots):
    logits = heads_lib.dense_logits(hidden, weights.kernel)  # [B, P, V]
    return jnp.take_along_axis(logits, pilots[:, None, None], axis=1)[:, 0]

  def stacked_slice(hidden, weights, pilot):
    return heads_lib.head_logits(hidden, weights.kernel, None, pilot)

  options = [
      ("scalar pilot, lax.switch over separate heads", decoding.pilot_logits,
       jnp.int32(0)),
      ("scalar pilot, dynamic slice of [P, V, d] (heads.head_logits)",
       stacked_slice, jnp.int32(0)),
      ("per-row, lax.cond per head, 1 distinct pilot", decoding.pilot_logits,
       same),
      (f"per-row, lax.cond per head, {distinct} distinct pilot"
       + ("s" if distinct > 1 else ""), decoding.pilot_logits, spread),
      ("per-row, gather kernel[pilots] ([B, V, d] copy)", gather_rows, spread),
      ("per-row, all heads dense, then select", dense_select, spread),
  ]
  calls = {name: functools.partial(jax.jit(fn), hidden, weights, pilots)
           for name, fn, pilots in options}
  results = median_seconds(calls, repeats=repeats, warmup=warmup)
  for name, value in results.items():
    logging.info("pilot %s B=%d P=%d %s: %.2f ms", shape.name, batch,
                 num_heads, name, 1e3 * value)
  return results


# ---------------------------------------------------------------------------
# Report.


def format_ratio_table(rows) -> str:
  """Render head/step results as a Markdown table with the two ratios."""
  lines = [
      "| shape | part | B | P | K | single ms | dense ms | Fast-K ms "
      "| Fast-K/single | dense/Fast-K |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for shape, part, batch, results in rows:
    single = results[1, None, "single"]
    head_counts = sorted({p for p, _, label in results if label == "dense"})
    for num_heads in head_counts:
      dense = results[num_heads, None, "dense"]
      for (p, top_k, label), fastk in sorted(
          results.items(), key=lambda item: (item[0][0], item[0][1] or 0)):
        if p != num_heads or label != "fastk":
          continue
        lines.append(
            f"| {shape} | {part} | {batch} | {num_heads} | {top_k} "
            f"| {1e3 * single:.2f} | {1e3 * dense:.2f} | {1e3 * fastk:.2f} "
            f"| {fastk / single:.2f} | {dense / fastk:.2f} |")
  return "\n".join(lines)


def cpu_model_name() -> str:
  """Return the CPU model from /proc/cpuinfo, or the platform's processor."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def run_decode_benchmark() -> None:
  """Run the decode benchmark over the flag grid and print the tables."""
  shapes = {"gpt2_small": GPT2_SMALL, "demo": None}
  unknown = [s for s in _SHAPES.value if s not in shapes]
  if unknown:
    raise app.UsageError(
        f"Unknown --shapes {unknown}. Choose from {', '.join(shapes)}.")
  unknown = [p for p in _PARTS.value if p not in ("head", "step", "pilot")]
  if unknown:
    raise app.UsageError(
        f"Unknown --parts {unknown}. Choose from head, step, pilot.")
  batch_sizes = [int(b) for b in _BATCH_SIZES.value]
  head_counts = [int(p) for p in _NUM_LM_HEADS.value]
  top_ks = [int(k) for k in _TOP_KS.value]
  repeats, warmup = _REPEATS.value, _WARMUP.value

  print(f"Decode benchmark: jax {jax.__version__}, {jax.devices()[0].platform} "
        f"({cpu_model_name()}, {os.cpu_count()} cores), float32, random "
        f"weights, greedy, fixed pilot 0; median of {repeats} calls after "
        f"{warmup} warm-up calls.", flush=True)
  ratio_rows, pilot_rows = [], []
  started = time.perf_counter()
  for shape_name in _SHAPES.value:
    shape = GPT2_SMALL if shape_name == "gpt2_small" else demo_shape()
    print(f"{shape.name}: d={shape.embed_dim}, {shape.num_layers} layers, "
          f"{shape.num_heads} attention heads, V={shape.vocab_size}",
          flush=True)
    if "head" in _PARTS.value or "step" in _PARTS.value:
      weights_by_p = random_head_weights(shape, head_counts)
      for batch in batch_sizes:
        if "head" in _PARTS.value:
          ratio_rows.append((shape.name, "head", batch, time_head(
              shape, batch, weights_by_p, top_ks, repeats, warmup,
              _STEPS_PER_CALL.value)))
        if "step" in _PARTS.value:
          ratio_rows.append((shape.name, "step", batch, time_step(
              shape, batch, weights_by_p, top_ks, repeats, warmup,
              _STEPS_PER_CALL.value, _CACHE_LEN.value)))
      del weights_by_p
    if "pilot" in _PARTS.value:
      num_heads = 4 if 4 in head_counts else max(head_counts)
      batch = max(batch_sizes)
      pilot_rows.append((shape.name, batch, num_heads, time_pilot_options(
          shape, batch, num_heads, repeats, warmup)))

  if ratio_rows:
    print()
    print(format_ratio_table(ratio_rows))
  for shape_name, batch, num_heads, results in pilot_rows:
    print()
    print(f"Pilot logits, {shape_name}, B={batch}, P={num_heads}:")
    print("| method | ms |")
    print("|---|---|")
    for name, seconds in results.items():
      print(f"| {name} | {1e3 * seconds:.2f} |")
  print(f"\nTotal time {time.perf_counter() - started:.0f} s.")


# Subcommand name -> function that runs it (flags are already parsed).
_COMMANDS = {
    "decode": run_decode_benchmark,
    "loss": loss_benchmark.run_loss_benchmark,
}


def main(argv):
  if len(argv) != 2 or argv[1] not in _COMMANDS:
    raise app.UsageError(
        f"Give one subcommand: {', '.join(sorted(_COMMANDS))}. Got {argv[1:]}.")
  _COMMANDS[argv[1]]()


if __name__ == "__main__":
  app.run(main)
