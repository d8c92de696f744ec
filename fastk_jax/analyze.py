"""Head specialization: which head wins which tokens, with real contexts.

Usage:
  python -m fastk_jax.analyze --workdir=workdirs/demo [--words=light,bear,will]

For every scored target of the evaluation split (the same strided windows as
`fastk_jax.evaluate`), the winning head is the one with the lowest NLL, ties
going to the lowest index as in training. From the winners it computes

* head utilisation: each head's share of wins and the entropy of that
  distribution, in bits (log2 P when the heads share the wins equally);
* the mutual information between the winning head and the target token, and
  between the winning head and the previous token, in bits;
* for a word list, each word's distribution over winning heads, with example
  contexts decoded from the split's text.

Without --words the list is built from the data: among the most frequent
word tokens of the split (--candidates of them) it keeps the --num_words whose
winning-head distribution has the highest entropy, i.e. the frequent words
whose wins are most spread over heads.

Outputs in `WORKDIR/analysis/`: `report.md`, the plots `win_rates.png` (win
rates over training, from `metrics.jsonl`) and `word_heads.png` (per-word
head shares), `analysis.json` with the numbers and `winners.npz` with the
winner of every scored target.

Mutual information uses the plug-in estimate (empirical frequencies), which
is biased upwards when many token types are rare. The report prints the
first-order size of that bias, (k_a - 1)(k_b - 1) / (2 N ln 2) bits for k_a
and k_b observed values and N tokens. For independent variables this is the
expected estimate in the large-sample limit.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx
from matplotlib.figure import Figure

from fastk_jax import checkpointing
from fastk_jax import data as data_lib
from fastk_jax import evaluate
from fastk_jax import logs
from fastk_jax import loss as loss_lib

FLAGS = flags.FLAGS


# ---------------------------------------------------------------------------
# Information measures (plug-in estimates, bits).


def entropy_bits(counts) -> float:
  """Return the entropy in bits of the distribution given by `counts`."""
  counts = np.asarray(counts, np.float64)
  counts = counts[counts > 0]
  if counts.size == 0:
    return 0.0
  probs = counts / counts.sum()
  return float(-np.sum(probs * np.log2(probs))) + 0.0  # + 0.0 turns -0.0 into 0.0.


def mutual_information_bits(a, b) -> float:
  """Return the plug-in mutual information I(A; B) in bits.

  Args:
    a: `[N]` integer labels.
    b: `[N]` integer labels, paired with `a`.
  """
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape:
    raise ValueError(f"Invalid labels: a has shape {a.shape} and b has shape "
                     f"{b.shape}; pass paired arrays of equal shape.")
  if a.size == 0:
    return 0.0
  _, a_index = np.unique(a, return_inverse=True)
  _, b_index = np.unique(b, return_inverse=True)
  _, joint_counts = np.unique(np.stack([a_index, b_index]), axis=1,
                              return_counts=True)
  # I(A; B) = H(A) + H(B) - H(A, B).
  mutual = (entropy_bits(np.bincount(a_index)) + entropy_bits(np.bincount(b_index))
            - entropy_bits(joint_counts))
  return max(mutual, 0.0)  # Rounding can leave -1e-16.


def plugin_bias_bits(a, b) -> float:
  """Return the first-order upward bias of the plug-in MI estimate, in bits.

  (k_a - 1)(k_b - 1) / (2 N ln 2), with k the number of observed values.
  """
  n = len(a)
  if n == 0:
    return 0.0
  k_a, k_b = len(np.unique(a)), len(np.unique(b))
  return (k_a - 1) * (k_b - 1) / (2 * n * math.log(2))


# ---------------------------------------------------------------------------
# Winners on the evaluation split.


def make_nll_fn(graphdef, chunk_size: int, dtype):
  """Return a jitted (params, inputs, targets) -> per-head NLL `[B, T, P]`.

  The loss's chunked forward pass computes the NLL without building the
  `[B, T, P, V]` logits.
  """

  @jax.jit
  def head_nll(params, inputs, targets):
    model = nnx.merge(graphdef, params)
    hidden, _ = model(inputs)  # [B, T, d]
    kernel, bias = model.lm_heads.weights()
    _, aux = loss_lib.wta_loss(hidden, kernel, bias, targets,
                               chunk_size=chunk_size, dtype=dtype)
    return aux["nll"].reshape(*targets.shape, -1)  # [B, T, P]

  return head_nll


def compute_winners(state: checkpointing.InferenceState, tokens: np.ndarray
                    ) -> dict[str, np.ndarray]:
  """Score every target of `tokens` with strided windows and find the winners.

  Returns:
    Arrays over the M scored targets: "position" (index of the target in
    `tokens`), "target", "previous" (the token before it), "winner" and
    "nll" `[M, P]`.
  """
  config = state.config
  context_length, stride = config.eval.context_length, config.eval.stride
  inputs, targets, mask = evaluate.strided_windows(tokens, context_length, stride)
  # The same windows over token indices give each target's stream position.
  _, positions, _ = evaluate.strided_windows(
      np.arange(len(tokens), dtype=np.int64), context_length, stride)

  batch_size = config.eval.batch_size
  padding = (-len(inputs)) % batch_size
  pad = lambda x: np.concatenate([x, np.zeros((padding,) + x.shape[1:], x.dtype)])
  padded_inputs, padded_targets = pad(inputs), pad(targets)

  graphdef, params = nnx.split(state.model)
  chunk_size = math.gcd(batch_size * context_length, config.loss.chunk_size)
  head_nll = make_nll_fn(graphdef, chunk_size, state.model.cfg.compute_dtype)
  nll = []
  for start in range(0, len(padded_inputs), batch_size):
    nll.append(np.asarray(head_nll(params, padded_inputs[start:start + batch_size],
                                   padded_targets[start:start + batch_size])))
  nll = np.concatenate(nll)[:len(inputs)]  # [W, T, P]

  scored = mask > 0
  return {
      "position": positions[scored],
      "target": targets[scored].astype(np.int64),
      "previous": inputs[scored].astype(np.int64),
      "winner": np.argmin(nll[scored], axis=-1),  # Lowest index on ties.
      "nll": nll[scored],
  }


# ---------------------------------------------------------------------------
# Words.


def word_token_id(tokenizer, word: str) -> int | None:
  """Return the single token id of `word`, or None if it takes several.

  BPE vocabularies store a word inside a sentence with its leading space, so
  " word" is tried before "word".
  """
  for text in (" " + word, word):
    ids = tokenizer.encode(text)
    if len(ids) == 1:
      return ids[0]
  return None


def ambiguous_words(tokenizer, targets, winners, num_heads: int, *,
                    num_words: int, candidates: int) -> list[int]:
  """Pick the frequent word tokens whose winning heads are most spread.

  Among the `candidates` most frequent targets that are whole words (a space
  followed by letters, how byte-level BPE stores a word inside a sentence),
  return the `num_words` with the highest winner entropy (then the most
  frequent).
  """
  ids, counts = np.unique(targets, return_counts=True)
  ranked = []
  for token_id in ids[np.argsort(-counts, kind="stable")]:
    text = tokenizer.decode([int(token_id)])
    if text.startswith(" ") and text[1:].isalpha():
      ranked.append(int(token_id))
    if len(ranked) == candidates:
      break
  scored = []
  for token_id in ranked:
    wins = np.bincount(winners[targets == token_id], minlength=num_heads)
    scored.append((-entropy_bits(wins), -int(wins.sum()), token_id))
  return [token_id for _, _, token_id in sorted(scored)[:num_words]]


def _snippet_text(tokenizer, ids) -> str:
  text = tokenizer.decode([int(i) for i in ids])
  return text.replace("`", "'").replace("\n", " ↵ ")


def context_snippet(tokenizer, tokens: np.ndarray, position: int,
                    before: int, after: int = 4) -> str:
  """Decode the text around `tokens[position]`, marking that token «so»."""
  left = _snippet_text(tokenizer, tokens[max(position - before, 0):position])
  word = _snippet_text(tokenizer, tokens[position:position + 1])
  right = _snippet_text(tokenizer, tokens[position + 1:position + 1 + after])
  return f"{left}«{word}»{right}"


def word_report(tokenizer, tokens: np.ndarray, winners: dict[str, np.ndarray],
                token_id: int, num_heads: int, *, examples: int,
                context_tokens: int) -> dict[str, Any]:
  """Head distribution and example contexts of one word token."""
  rows = winners["target"] == token_id
  head_of = winners["winner"][rows]
  positions = winners["position"][rows]
  wins = np.bincount(head_of, minlength=num_heads)
  contexts = {}
  for head in np.argsort(-wins, kind="stable"):
    if wins[head] == 0 or len(contexts) == 3:
      break
    head_positions = positions[head_of == head]
    # Evenly spaced occurrences show more of the text than the first few.
    picks = np.unique(np.linspace(0, len(head_positions) - 1,
                                  min(examples, len(head_positions))).astype(int))
    contexts[int(head)] = [
        context_snippet(tokenizer, tokens, int(head_positions[i]), context_tokens)
        for i in picks]
  return {
      "token_id": int(token_id),
      "text": tokenizer.decode([int(token_id)]),
      "count": int(wins.sum()),
      "wins": wins.tolist(),
      "entropy_bits": entropy_bits(wins),
      "contexts": contexts,
  }


# ---------------------------------------------------------------------------
# Plots.


def read_win_rates(workdir: str) -> tuple[list[int], np.ndarray]:
  """Return (steps, win rates `[S, P]`) from the training records of metrics.jsonl."""
  path = os.path.join(workdir, "metrics.jsonl")
  steps, rates = [], []
  if not os.path.exists(path):
    return steps, np.zeros((0, 0))
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      if "win_rate" in record:
        steps.append(int(record["step"]))
        rates.append(record["win_rate"])
  return steps, np.asarray(rates, np.float64)


def plot_win_rates(steps, rates, path: str) -> None:
  """Plot each head's training win rate against the step."""
  figure = Figure(figsize=(7, 4))
  axes = figure.subplots()
  for head in range(rates.shape[1]):
    axes.plot(steps, rates[:, head], label=f"head {head}")
  axes.axhline(1.0 / rates.shape[1], color="gray", linestyle=":",
               label="equal share")
  axes.set_xlabel("training step")
  axes.set_ylabel("share of training tokens won")
  axes.set_ylim(0.0, 1.0)
  axes.set_title("Winner-take-all: win rate of each head during training")
  axes.legend(fontsize="small", ncol=2)
  figure.tight_layout()
  figure.savefig(path, dpi=100)


def plot_word_heads(words: Sequence[dict[str, Any]], num_heads: int,
                    path: str) -> None:
  """Plot a heatmap of each word's share of wins per head."""
  shares = np.array([np.asarray(w["wins"]) / max(w["count"], 1) for w in words])
  labels = [f"{w['text'].strip()} ({w['count']})" for w in words]
  figure = Figure(figsize=(1.2 + 0.6 * num_heads, 1.0 + 0.4 * len(words)))
  axes = figure.subplots()
  image = axes.imshow(shares, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
  axes.set_xticks(range(num_heads), [str(h) for h in range(num_heads)])
  axes.set_yticks(range(len(words)), labels)
  axes.set_xlabel("winning head")
  for row in range(shares.shape[0]):
    for col in range(num_heads):
      axes.text(col, row, f"{shares[row, col]:.2f}", ha="center", va="center",
                color="white" if shares[row, col] < 0.6 else "black",
                fontsize="small")
  figure.colorbar(image, ax=axes, label="share of the word's occurrences")
  axes.set_title("Winning head per word (evaluation split)")
  figure.tight_layout()
  figure.savefig(path, dpi=100)


# ---------------------------------------------------------------------------
# The analysis and its report.


def analyze_workdir(workdir: str, *, words: Sequence[str] = (),
                    split: str | None = None, max_tokens: int | None = None,
                    num_words: int = 8, candidates: int = 100,
                    examples: int = 2, context_tokens: int = 12,
                    step: int | None = None) -> dict[str, Any]:
  """Run the analysis of a workdir and write `WORKDIR/analysis/`.

  Args:
    workdir: a training workdir with a checkpoint.
    words: words to report; empty picks them from the data (module docstring).
    split: split to analyse; defaults to `config.eval.split`.
    max_tokens: tokens of the split to use; None uses `config.eval.max_tokens`
      and 0 the whole split.
    num_words: words picked when `words` is empty.
    candidates: most frequent word tokens considered when picking words.
    examples: example contexts per (word, head), for the 3 heads that win
      the word most often.
    context_tokens: tokens of context before the word in an example.
    step: checkpoint step; defaults to the newest.

  Returns:
    The numbers written to `analysis.json`.
  """
  state = checkpointing.load_inference_state(workdir, step)
  config, tokenizer = state.config, state.tokenizer
  split = split or config.eval.split
  if max_tokens is None:
    tokens = data_lib.load_eval_tokens(config, tokenizer, split)
  else:
    tokens = np.asarray(data_lib.tokenized_split(config, tokenizer, split).load(),
                        np.int32)
    if max_tokens > 0:
      tokens = tokens[:max_tokens]
  num_heads = int(state.model.cfg.num_lm_heads)
  logging.info("Analysing step %d on %s: %d tokens, P=%d.", state.step, split,
               len(tokens), num_heads)
  winners = compute_winners(state, tokens)
  wins = np.bincount(winners["winner"], minlength=num_heads)

  # Words: the requested ones that are single tokens, else picked from data.
  unknown = []
  if words:
    word_ids = []
    for word in words:
      token_id = word_token_id(tokenizer, word)
      if token_id is None or not np.any(winners["target"] == token_id):
        unknown.append(word)
      elif token_id not in word_ids:
        word_ids.append(token_id)
    if unknown:
      logging.warning("Skipping words that are not one token or never a "
                      "target in %s: %s", split, ", ".join(unknown))
  else:
    word_ids = ambiguous_words(tokenizer, winners["target"], winners["winner"],
                               num_heads, num_words=num_words,
                               candidates=candidates)
  word_reports = [
      word_report(tokenizer, tokens, winners, token_id, num_heads,
                  examples=examples, context_tokens=context_tokens)
      for token_id in word_ids]

  results = {
      "workdir": os.path.abspath(workdir),
      "step": state.step,
      "split": split,
      "tokens": int(len(winners["target"])),
      "context_length": config.eval.context_length,
      "stride": config.eval.stride,
      "num_lm_heads": num_heads,
      "test_wins": wins.tolist(),
      "training_wins": state.win_counts.tolist(),
      "utilization_entropy_bits": entropy_bits(wins),
      "max_entropy_bits": math.log2(num_heads),
      "mi_head_target_bits": mutual_information_bits(
          winners["winner"], winners["target"]),
      "mi_head_target_bias_bits": plugin_bias_bits(
          winners["winner"], winners["target"]),
      "mi_head_previous_bits": mutual_information_bits(
          winners["winner"], winners["previous"]),
      "mi_head_previous_bias_bits": plugin_bias_bits(
          winners["winner"], winners["previous"]),
      "target_entropy_bits": entropy_bits(np.unique(
          winners["target"], return_counts=True)[1]),
      "words_picked_from_data": not words,
      "unknown_words": unknown,
      "words": word_reports,
  }
  write_outputs(workdir, results, winners)
  return results


def write_outputs(workdir: str, results: dict[str, Any],
                  winners: dict[str, np.ndarray]) -> str:
  """Write the plots, analysis.json, winners.npz and report.md; return its path."""
  directory = os.path.join(workdir, "analysis")
  os.makedirs(directory, exist_ok=True)
  np.savez_compressed(os.path.join(directory, "winners.npz"), **winners)
  with open(os.path.join(directory, "analysis.json"), "w") as f:
    json.dump(results, f, indent=2)

  plots = {}
  steps, rates = read_win_rates(workdir)
  if len(steps):
    plot_win_rates(steps, rates, os.path.join(directory, "win_rates.png"))
    plots["win_rates"] = "win_rates.png"
  if results["words"]:
    plot_word_heads(results["words"], results["num_lm_heads"],
                    os.path.join(directory, "word_heads.png"))
    plots["word_heads"] = "word_heads.png"

  path = os.path.join(directory, "report.md")
  with open(path, "w") as f:
    f.write(render_report(results, plots))
  logging.info("Wrote the specialization report to %s.", path)
  return path


def _bits(value: float) -> str:
  return f"{value:.3f} bits"


def render_report(results: dict[str, Any], plots: dict[str, str]) -> str:
  """Build report.md from the analysis numbers."""
  num_heads = results["num_lm_heads"]
  tokens = results["tokens"]
  lines = [
      f"# Head specialization: {os.path.basename(results['workdir'])}",
      "",
      f"Checkpoint step {results['step']}, split `{results['split']}`, "
      f"{tokens} scored targets (strided windows: context "
      f"{results['context_length']}, stride {results['stride']}), "
      f"P = {num_heads}. A head wins a target when its NLL is the lowest "
      "(ties go to the lower index, as in training).",
      "",
      "## Head utilisation",
      "",
      "| head | wins (this split) | share | training wins | training share |",
      "|---|---|---|---|---|",
  ]
  training = np.asarray(results["training_wins"], np.float64)
  for head, count in enumerate(results["test_wins"]):
    training_share = training[head] / training.sum() if training.sum() else 0.0
    lines.append(f"| {head} | {count} | {count / max(tokens, 1):.3f} | "
                 f"{int(training[head])} | {training_share:.3f} |")
  lines += [
      "",
      f"Entropy of the winning head: {_bits(results['utilization_entropy_bits'])}"
      f" of at most {_bits(results['max_entropy_bits'])} (log2 P, equal shares).",
      "",
      "## Mutual information",
      "",
      "Plug-in estimates from empirical frequencies. They are biased upwards "
      "when many token types are rare; the bias column is the first-order "
      "size of that bias, (k_a - 1)(k_b - 1) / (2 N ln 2) bits.",
      "",
      "| pair | plug-in estimate | approx. bias |",
      "|---|---|---|",
      f"| winning head ; target token | {_bits(results['mi_head_target_bits'])} "
      f"| {_bits(results['mi_head_target_bias_bits'])} |",
      f"| winning head ; previous token | "
      f"{_bits(results['mi_head_previous_bits'])} | "
      f"{_bits(results['mi_head_previous_bias_bits'])} |",
      "",
      f"For scale: the winning head carries at most "
      f"{_bits(results['utilization_entropy_bits'])} and the target token "
      f"{_bits(results['target_entropy_bits'])} (plug-in entropies).",
  ]
  head_entropy = results["utilization_entropy_bits"]
  if head_entropy > 0:
    lines += [
        f"The target token accounts for "
        f"{results['mi_head_target_bits'] / head_entropy:.0%} of the winning "
        f"head's entropy and the previous token for "
        f"{results['mi_head_previous_bits'] / head_entropy:.0%}. Near 100% "
        "for the target means the heads split the vocabulary, each winning "
        "its own set of tokens whatever the context.",
    ]
  lines.append("")
  if "win_rates" in plots:
    lines += ["## Win rates during training", "",
              f"![Win rate of each head during training]({plots['win_rates']})",
              ""]
  else:
    lines += ["No training records with win rates (metrics.jsonl) were "
              "found, so there is no win-rate plot.", ""]

  lines += ["## Words", ""]
  if results["words_picked_from_data"]:
    lines += ["Words picked from the data: frequent word tokens of this split "
              "whose winning-head distribution has the highest entropy.", ""]
  if results["unknown_words"]:
    lines += ["Skipped (not a single token, or never a target here): "
              + ", ".join(results["unknown_words"]) + ".", ""]
  if "word_heads" in plots:
    lines += [f"![Winning head per word]({plots['word_heads']})", ""]
  for word in results["words"]:
    shares = ", ".join(f"head {h}: {c / max(word['count'], 1):.2f}"
                       for h, c in enumerate(word["wins"]) if c)
    lines += [f"### `{word['text'].strip()}` (token {word['token_id']}, "
              f"{word['count']} occurrences, entropy "
              f"{_bits(word['entropy_bits'])})", "", shares, ""]
    for head, snippets in word["contexts"].items():
      for snippet in snippets:
        lines.append(f"- head {head}: `{snippet}`")
    lines.append("")
  return "\n".join(lines)


def define_flags() -> None:
  """Define the command-line flags (only when run as a program)."""
  flags.DEFINE_string("workdir", None, "Training workdir to analyse.")
  flags.DEFINE_list(
      "words", [],
      "Comma-separated words to report; default: frequent words of the split "
      "whose winning head varies most.")
  flags.DEFINE_string("split", None, "Split to analyse (default: config.eval.split).")
  flags.DEFINE_integer(
      "max_tokens", None,
      "Tokens of the split to analyse; default config.eval.max_tokens, 0 for all.")
  flags.DEFINE_integer("num_words", 8, "Words picked when --words is empty.")
  flags.DEFINE_integer("candidates", 100,
                       "Most frequent word tokens considered when picking words.")
  flags.DEFINE_integer("examples", 2, "Example contexts per word and head.")
  flags.DEFINE_integer("context_tokens", 12,
                       "Tokens of text before the word in each example.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.quiet_library_logs()
  analyze_workdir(
      FLAGS.workdir, words=FLAGS.words, split=FLAGS.split,
      max_tokens=FLAGS.max_tokens, num_words=FLAGS.num_words,
      candidates=FLAGS.candidates, examples=FLAGS.examples,
      context_tokens=FLAGS.context_tokens, step=FLAGS.step)
  print(os.path.join(FLAGS.workdir, "analysis", "report.md"))


if __name__ == "__main__":
  define_flags()
  app.run(logs.exit_on_input_error(main))
