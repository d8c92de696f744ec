"""Evaluate a trained workdir on a held-out split with strided windows.

Usage:
  python -m fastk_jax.evaluate --workdir=workdirs/demo [--split=test]

Protocol: the split's documents are tokenized and joined with EOS into one
stream. Windows of `eval.context_length` tokens start every `eval.stride`
tokens; each target token is scored once, in the first window that contains
it after the previous window's scored span, so every token except those near
the start sees at least `context_length - stride` tokens of context. This is
the common fixed-length protocol for GPT-2 perplexity.

Metrics (see docs/metrics.md):
  perplexity          exp(mean -log(1/P sum_h p_h(y))), the uniform mixture
                      of the heads: a proper likelihood, the headline figure.
  oracle_perplexity   exp(mean min_h -log p_h(y)). It picks the head using the
                      gold label, so it is not the likelihood of any predictor.
  per_head_perplexity each head alone.
  top1_accuracy       argmax of the mixture distribution equals the target.
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
from fastk_jax import logs
from fastk_jax import data as data_lib
from fastk_jax import heads as heads_lib

FLAGS = flags.FLAGS


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


def chunk_statistics(hidden, kernel, bias, targets, mask, dtype=jnp.float32):
  """Summed metrics for `[N, d]` hidden states (full logits of N tokens)."""
  logits = heads_lib.dense_logits(hidden, kernel, bias, dtype)  # [N, P, V]
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  num_heads = logits.shape[1]
  nll = -jnp.take_along_axis(log_probs, targets[:, None, None], axis=-1)[..., 0]
  mixture_log_probs = jax.nn.logsumexp(log_probs, axis=1) - jnp.log(num_heads)
  mixture_nll = -jnp.take_along_axis(
      mixture_log_probs, targets[:, None], axis=-1)[:, 0]  # [N]
  correct = jnp.argmax(mixture_log_probs, axis=-1) == targets
  return {
      "tokens": jnp.sum(mask),
      "mixture_nll_sum": jnp.sum(mixture_nll * mask),
      "oracle_nll_sum": jnp.sum(jnp.min(nll, axis=-1) * mask),
      "head_nll_sum": jnp.sum(nll * mask[:, None], axis=0),
      "top1_correct": jnp.sum(correct * mask),
  }


def make_eval_fn(graphdef, chunk_size: int, dtype):
  """Return a jitted (params, inputs, targets, mask) -> summed statistics."""

  @jax.jit
  def eval_batch(params, inputs, targets, mask):
    model = nnx.merge(graphdef, params)
    hidden, _ = model(inputs)  # [B, T, d]
    kernel, bias = model.lm_heads.weights()
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets, mask = targets.reshape(-1), mask.reshape(-1)
    num_chunks = max(hidden.shape[0] // chunk_size, 1)

    def body(_, chunk):
      chunk_hidden, chunk_targets, chunk_mask = chunk
      return None, chunk_statistics(chunk_hidden, kernel, bias, chunk_targets,
                                    chunk_mask, dtype)

    split = lambda x: x.reshape(num_chunks, -1, *x.shape[1:])
    _, stats = jax.lax.scan(body, None,
                            (split(hidden), split(targets), split(mask)))
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), stats)

  return eval_batch


def evaluate_state(state: checkpointing.InferenceState, split: str | None = None
                   ) -> dict[str, Any]:
  """Evaluate a restored model on a split and return the metrics dict."""
  config = state.config
  split = split or config.eval.split
  context_length, stride = config.eval.context_length, config.eval.stride
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

  graphdef, params = nnx.split(state.model)
  tokens_per_batch = batch_size * context_length
  chunk_size = math.gcd(tokens_per_batch, config.loss.chunk_size)
  eval_batch = make_eval_fn(graphdef, chunk_size, state.model.cfg.compute_dtype)
  sums = None
  for start in range(0, len(inputs), batch_size):
    batch = [x[start:start + batch_size] for x in (inputs, targets, mask)]
    stats = jax.device_get(eval_batch(params, *batch))
    sums = stats if sums is None else jax.tree.map(np.add, sums, stats)

  num_tokens = float(sums["tokens"])
  head_nll = np.asarray(sums["head_nll_sum"]) / num_tokens
  return {
      "step": state.step,
      "split": split,
      "tokens": int(num_tokens),
      "context_length": context_length,
      "stride": stride,
      "num_lm_heads": int(state.model.cfg.num_lm_heads),
      "perplexity": math.exp(float(sums["mixture_nll_sum"]) / num_tokens),
      "oracle_perplexity": math.exp(float(sums["oracle_nll_sum"]) / num_tokens),
      "per_head_perplexity": np.exp(head_nll).tolist(),
      "top1_accuracy": float(sums["top1_correct"]) / num_tokens,
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


def format_table(results: dict[str, Any]) -> str:
  """Render the headline metrics as a plain-text table."""
  rows = [
      ("perplexity (uniform mixture of heads)", f"{results['perplexity']:.2f}"),
      ("oracle_perplexity (label-selected head)",
       f"{results['oracle_perplexity']:.2f}"),
  ]
  for i, value in enumerate(results["per_head_perplexity"]):
    rows.append((f"head {i} perplexity", f"{value:.2f}"))
  rows.append(("top1_accuracy", f"{results['top1_accuracy']:.4f}"))
  for key in ("fastk_perplexity", "shortlist_recall", "fastk_top1_accuracy"):
    if key in results:
      rows.append((key, f"{results[key]:.4f}"))
  width = max(len(name) for name, _ in rows)
  header = (f"step {results['step']}, split {results['split']}, "
            f"{results['tokens']} tokens, context {results['context_length']}, "
            f"stride {results['stride']}")
  return "\n".join([header] + [f"  {name:<{width}}  {value}" for name, value in rows])


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
  app.run(main)
