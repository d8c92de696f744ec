"""Evaluate a trained workdir on a held-out split with strided windows.

Usage:
  python -m fastk_jax.evaluate --workdir=workdirs/demo [--split=test]

Protocol: the split's documents are tokenized and joined with EOS into one
stream. Windows of `eval.context_length` tokens start every `eval.stride`
tokens. Each target token is scored once, in the first window that contains
it after the previous window's scored span. Every token except those near the
start is therefore scored with at least `context_length - stride` tokens of
context. This is
the common fixed-length protocol for GPT-2 perplexity.

Metrics (definitions in `fastk_jax/metrics.py`), each over all scored
targets and per training-frequency bucket of the target:
  perplexity          exp(mean -log(1/P sum_h p_h(y))), the uniform mixture
                      of the heads: a proper likelihood, the headline figure.
  oracle_perplexity   exp(mean min_h -log p_h(y)). It picks the head using the
                      gold label, so it is not the likelihood of any predictor.
  fastk_perplexity    the perplexity of the full-vocabulary distribution that
                      Fast-K decoding samples from, with config.decode's K,
                      pilot and combine rule.
  per_head_perplexity each head alone; best_head is the lowest.
  unigram_perplexity  add-one smoothed unigram of the training split, the
                      baseline a trained model must beat.
  shortlist_recall    share of targets inside the pilot's Top-K.
  top_n_accuracy      n in {1, 5, 10, 50} for the mixture, Fast-K and the best
                      head; top1_accuracy is the mixture's.

Results go to `WORKDIR/eval/step_<N>.json`; every perplexity there and in the
printed table is measured with the context_length and stride stored beside it.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from fastk_jax import checkpointing
from fastk_jax import data as data_lib
from fastk_jax import decoding
from fastk_jax import heads as heads_lib
from fastk_jax import logs
from fastk_jax import metrics

FLAGS = flags.FLAGS

# Default bound on the elements of one metric chunk's largest temporaries
# (`eval_chunk_size`): 2**25 float32 values are 128 MiB per array.
_MAX_CHUNK_ELEMENTS = 2**25


def strided_windows(tokens: np.ndarray, context_length: int, stride: int):
  """Cut a token stream into scored windows.

  Args:
    tokens: `[N]` token ids.
    context_length: tokens per window.
    stride: distance between window starts.

  Returns:
    (inputs, targets, mask), each `[num_windows, context_length]`. `mask` is 1
    where a target is scored; every target `tokens[1:]` is scored exactly once.
  """
  num_targets = len(tokens) - 1
  if num_targets < 1:
    raise ValueError("The evaluation split has fewer than 2 tokens.")
  inputs, targets, masks = [], [], []
  scored_until = 0  # Targets [0, scored_until) are already scored.
  for begin in range(0, num_targets, stride):
    end = min(begin + context_length, num_targets)
    window_in = np.zeros(context_length, np.int32)
    window_tg = np.zeros(context_length, np.int32)
    window_mask = np.zeros(context_length, np.float32)
    length = end - begin
    window_in[:length] = tokens[begin:end]
    window_tg[:length] = tokens[begin + 1:end + 1]
    window_mask[scored_until - begin:length] = 1.0
    inputs.append(window_in)
    targets.append(window_tg)
    masks.append(window_mask)
    scored_until = end
    if end == num_targets:
      break
  return np.stack(inputs), np.stack(targets), np.stack(masks)


def eval_chunk_size(tokens_per_batch: int, *, num_heads: int, vocab_size: int,
                    top_k: int, embed_dim: int, max_tokens: int,
                    max_elements: int) -> int:
  """Return the tokens per metric chunk: a divisor of `tokens_per_batch`.

  A chunk of N tokens builds the logits and ranks `[N, P, V]` and Fast-K's
  gathered head rows `[P, N, K, d]`. The result is the largest divisor N of
  `tokens_per_batch` with N <= `max_tokens` and N * P * max(V, K * d) <=
  `max_elements`, or 1 if even one token exceeds the limit.
  """
  per_token = num_heads * max(vocab_size, top_k * embed_dim)
  limit = max(1, min(max_tokens, max_elements // per_token))
  for size in range(min(limit, tokens_per_batch), 0, -1):
    if tokens_per_batch % size == 0:
      return size
  return 1


def chunk_statistics(hidden, weights: decoding.HeadWeights, targets, mask,
                     buckets, pilots, unigram_log_probs, *, top_k: int,
                     combine: str, dtype=jnp.float32):
  """Return the bucketed metric sums of N tokens (`metrics.bucket_sums`).

  Args:
    hidden: `[N, d]` hidden states.
    weights: the LM heads (`decoding.split_heads`).
    targets: `[N]` target ids.
    mask: `[N]` 1 for scored targets, 0 otherwise.
    buckets: `[N]` frequency bucket of each target.
    pilots: `[N]` Fast-K pilot head of each position.
    unigram_log_probs: `[V]` smoothed training-split unigram.
    top_k: K, Fast-K's shortlist size.
    combine: Fast-K's combine rule, "max" or "mean".
    dtype: compute dtype of the matmuls.
  """
  logits = heads_lib.dense_logits(
      hidden, weights.kernel, weights.bias, dtype)  # [N, P, V]
  head_log_probs = jax.nn.log_softmax(logits, axis=-1)
  fastk = decoding.fastk_step(hidden, weights, pilots, top_k=top_k,
                              combine=combine, dtype=dtype)
  pilot_log_probs = jnp.take_along_axis(
      head_log_probs, pilots[:, None, None], axis=1)[:, 0]  # [N, V]
  fastk_log_probs = metrics.fastk_target_log_probs(
      fastk.probs, fastk.shortlist,
      metrics.gather_targets(pilot_log_probs, targets), targets)
  per_token = metrics.token_statistics(
      head_log_probs, targets, fastk_probs=fastk.probs,
      fastk_log_probs=fastk_log_probs, shortlist=fastk.shortlist,
      unigram_log_probs=unigram_log_probs)
  return metrics.bucket_sums(per_token, buckets, mask)


def make_eval_fn(graphdef, settings: decoding.DecodeSettings, win_counts,
                 chunk_size: int, dtype):
  """Return a jitted (params, inputs, targets, mask, buckets, unigram) -> sums.

  The Fast-K pilot of each position comes from
  `decoding.teacher_forced_pilots`, with position t of a window playing
  decode step t.
  """

  @jax.jit
  def eval_batch(params, inputs, targets, mask, buckets, unigram_log_probs):
    model = nnx.merge(graphdef, params)
    hidden, _ = model(inputs)  # [B, T, d]
    kernel, bias = model.lm_heads.weights()
    pilots = decoding.teacher_forced_pilots(
        hidden, kernel, bias, pilot=settings.pilot, top_k=settings.top_k,
        pilot_head=settings.pilot_head, win_counts=win_counts,
        dtype=dtype)  # [B, T]
    weights = decoding.split_heads(kernel, bias)

    def body(_, chunk):
      chunk_hidden, chunk_targets, chunk_mask, chunk_buckets, chunk_pilots = chunk
      return None, chunk_statistics(
          chunk_hidden, weights, chunk_targets, chunk_mask, chunk_buckets,
          chunk_pilots, unigram_log_probs, top_k=settings.top_k,
          combine=settings.combine, dtype=dtype)

    # Chunks of `chunk_size` tokens, scanned so that only one chunk's
    # `[N, P, V]` temporaries exist at a time.
    chunks = tuple(x.reshape(-1, chunk_size, *x.shape[2:])
                   for x in (hidden, targets, mask, buckets, pilots))
    _, stats = jax.lax.scan(body, None, chunks)
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), stats)

  return eval_batch


def evaluate_state(state: checkpointing.InferenceState, split: str | None = None,
                   *, max_chunk_elements: int = _MAX_CHUNK_ELEMENTS
                   ) -> dict[str, Any]:
  """Evaluate a restored model on a split and return the metrics dict.

  Args:
    state: from `checkpointing.load_inference_state`.
    split: the split to score; defaults to `config.eval.split`.
    max_chunk_elements: bound on the elements of a chunk's largest
      temporaries (see `eval_chunk_size`).

  Raises:
    ValueError: for invalid `config.decode` settings, which Fast-K uses.
  """
  config = state.config
  split = split or config.eval.split
  context_length, stride = config.eval.context_length, config.eval.stride
  cfg = state.model.cfg
  settings = decoding.validate_decode_config(config, cfg.vocab_size,
                                             cfg.num_lm_heads)

  # Training-split frequencies: the unigram baseline and the rare-token
  # buckets of every target.
  counts = data_lib.token_counts(config, state.tokenizer)  # [V]
  unigram_log_probs = metrics.unigram_log_probs(counts)
  bucket_of_token = metrics.token_buckets(counts)

  tokens = data_lib.load_eval_tokens(config, state.tokenizer, split)
  inputs, targets, mask = strided_windows(tokens, context_length, stride)
  logging.info("Evaluating step %d on %s: %d tokens, %d windows of %d, stride %d.",
               state.step, split, len(tokens) - 1, len(inputs), context_length,
               stride)

  # Pad the window count to whole batches; padded windows have mask 0.
  batch_size = config.eval.batch_size
  padding = (-len(inputs)) % batch_size
  pad = lambda x: np.concatenate([x, np.zeros((padding,) + x.shape[1:], x.dtype)])
  inputs, targets, mask = pad(inputs), pad(targets), pad(mask)
  buckets = bucket_of_token[targets]

  graphdef, params = nnx.split(state.model)
  chunk_size = eval_chunk_size(
      batch_size * context_length, num_heads=cfg.num_lm_heads,
      vocab_size=cfg.vocab_size, top_k=settings.top_k,
      embed_dim=cfg.embed_dim, max_tokens=config.loss.chunk_size,
      max_elements=max_chunk_elements)
  eval_batch = make_eval_fn(graphdef, settings, np.asarray(state.win_counts),
                            chunk_size, cfg.compute_dtype)
  sums = None
  for start in range(0, len(inputs), batch_size):
    batch = [x[start:start + batch_size]
             for x in (inputs, targets, mask, buckets)]
    stats = jax.device_get(eval_batch(params, *batch, unigram_log_probs))
    sums = stats if sums is None else jax.tree.map(np.add, sums, stats)

  summary = metrics.summarize(sums)
  return {
      "step": state.step,
      "split": split,
      "tokens": summary["tokens"],
      "context_length": context_length,
      "stride": stride,
      "num_lm_heads": int(cfg.num_lm_heads),
      "vocab_size": int(cfg.vocab_size),
      "perplexity": summary["perplexity"],
      "oracle_perplexity": summary["oracle_perplexity"],
      "fastk_perplexity": summary["fastk_perplexity"],
      "unigram_perplexity": summary["unigram_perplexity"],
      "per_head_perplexity": summary["per_head_perplexity"],
      "best_head": summary["best_head"],
      "top1_accuracy": summary["top1_accuracy"],
      "fastk_top1_accuracy": summary["fastk_top1_accuracy"],
      "shortlist_recall": summary["shortlist_recall"],
      "top_n_accuracy": summary["top_n_accuracy"],
      "buckets": summary["buckets"],
      # fastk_perplexity always scores the Fast-K decoder with these
      # settings, even when config.decode.decoder is "dense".
      "decode": {"decoder": "fastk", "top_k": settings.top_k,
                 "pilot": settings.pilot, "pilot_head": settings.pilot_head,
                 "combine": settings.combine},
      "win_counts": state.win_counts.tolist(),
  }


def write_results(workdir: str, results: dict[str, Any]) -> str:
  """Write `WORKDIR/eval/step_<N>.json` and return its path."""
  directory = os.path.join(workdir, "eval")
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"step_{results['step']}.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=2)
  os.replace(tmp, path)
  return path


def _number(value, digits: int = 2) -> str:
  return "n/a" if value is None else f"{value:.{digits}f}"


def format_table(results: dict[str, Any]) -> str:
  """Render the results as plain-text tables.

  Every perplexity row names the evaluation protocol (context length and
  stride), because perplexities measured with other windows differ.
  """
  protocol = (f"[context {results['context_length']}, "
              f"stride {results['stride']}]")
  decode = results["decode"]
  rows = [
      ("perplexity (uniform mixture of heads)", _number(results["perplexity"])),
      ("oracle_perplexity (label-selected head, not a predictor)",
       _number(results["oracle_perplexity"])),
      (f"fastk_perplexity (K={decode['top_k']}, pilot={decode['pilot']}, "
       f"combine={decode['combine']})", _number(results["fastk_perplexity"])),
      ("unigram_perplexity (add-one, training split)",
       _number(results["unigram_perplexity"])),
  ]
  for i, value in enumerate(results["per_head_perplexity"]):
    best = " (best head)" if i == results["best_head"] else ""
    rows.append((f"head {i} perplexity{best}", _number(value)))
  width = max(len(name) for name, _ in rows)
  lines = [f"step {results['step']}, split {results['split']}, "
           f"{results['tokens']} scored tokens"]
  lines += [f"  {name:<{width}}  {value:>9}  {protocol}" for name, value in rows]
  lines.append(f"  {'shortlist_recall':<{width}}  "
               f"{_number(results['shortlist_recall'], 4):>9}")

  # Top-n accuracy per decoder.
  top_n = list(results["top_n_accuracy"]["mixture"])
  lines.append("")
  lines.append("  top-n accuracy  " + "".join(f"{'top-' + n:>9}" for n in top_n))
  for decoder, label in (("mixture", "mixture"), ("fastk", "Fast-K"),
                         ("best_head", f"head {results['best_head']}")):
    accuracy = results["top_n_accuracy"][decoder]
    lines.append(f"  {label:<14}  " + "".join(
        f"{_number(accuracy[n], 4):>9}" for n in top_n))

  # Rare tokens: the same metrics per training-frequency bucket.
  lines.append("")
  lines.append(f"  by training count of the target, perplexities {protocol}")
  lines.append(f"  {'bucket':<8}{'tokens':>8}{'mixture':>10}{'Fast-K':>10}"
               f"{'oracle':>10}{'unigram':>10}{'recall':>8}{'top-1':>8}")
  for bucket in results["buckets"]:
    lines.append(
        f"  {bucket['name']:<8}{bucket['tokens']:>8}"
        f"{_number(bucket['perplexity']):>10}"
        f"{_number(bucket['fastk_perplexity']):>10}"
        f"{_number(bucket['oracle_perplexity']):>10}"
        f"{_number(bucket['unigram_perplexity']):>10}"
        f"{_number(bucket['shortlist_recall'], 3):>8}"
        f"{_number(bucket['top1_accuracy'], 3):>8}")
  return "\n".join(lines)


def evaluate_workdir(workdir: str, split: str | None = None,
                     step: int | None = None) -> dict[str, Any]:
  """Restore a workdir, evaluate it, write the JSON and log the table."""
  state = checkpointing.load_inference_state(workdir, step)
  results = evaluate_state(state, split)
  path = write_results(workdir, results)
  print(format_table(results))
  logging.info("Wrote evaluation results to %s.", path)
  return results


def define_flags() -> None:
  """Define the command-line flags (only when run as a program)."""
  flags.DEFINE_string("workdir", None, "Training workdir to evaluate.")
  flags.DEFINE_string("split", None,
                      "Split to evaluate (default: config.eval.split).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.quiet_library_logs()
  evaluate_workdir(FLAGS.workdir, FLAGS.split, FLAGS.step)


if __name__ == "__main__":
  define_flags()
  app.run(logs.exit_on_input_error(main))
