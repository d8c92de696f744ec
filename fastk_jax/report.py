"""Gather a sweep's evaluation JSONs into a Markdown reproduction table.

Usage:
  python -m fastk_jax.report --sweep_root=workdirs/sweep --output=docs/results.md \
      [--sweep_config=configs/sweep_small.py] \
      [--benchmarks_md=docs/benchmarks.md] [--benchmark_json=bench.json]

Every direct subdirectory of --sweep_root that has `eval/step_<N>.json` is
one run; its newest evaluation is used. Runs are grouped by (P, epsilon): P
is the number of LM heads and epsilon the relaxed winner-take-all weight
`loss.wta_epsilon` from the run's `config.json` (0 is strict WTA). Each
metric is shown as mean ± sample standard deviation (ddof = 1) over the
group's runs, which differ only in their seed when the sweep comes from
`launch/sweep.py`.

The comparison sections are computed from the numbers. A group counts as
better or worse than another on a metric only when the difference of the
means exceeds twice its standard error over seeds,
sqrt(s_a^2 / n_a + s_b^2 / n_b). Smaller differences are reported as
differences within seed noise. Every P > 1 group is compared with the P = 1
runs, and relaxed groups with the strict group of the same P.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import statistics
from typing import Any, Callable, Sequence

from absl import app, flags, logging

from fastk_jax import metrics

FLAGS = flags.FLAGS

# A difference counts as real when it exceeds this many standard errors.
SIGNIFICANCE_SE = 2.0


# ---------------------------------------------------------------------------
# Loading.


def _eval_step(path: str) -> int:
  match = re.search(r"step_(\d+)\.json$", path)
  return int(match.group(1)) if match else -1


def _read_config(workdir: str) -> tuple[Any, float | None]:
  """Return (seed, loss.wta_epsilon) from the run's config.json.

  Either is None when config.json or the field is missing.
  """
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    return None, None
  with open(config_path) as f:
    config = json.load(f)
  epsilon = _get(config, "loss", "wta_epsilon")
  return config.get("seed"), None if epsilon is None else float(epsilon)


def load_runs(sweep_root: str) -> list[dict[str, Any]]:
  """Read the newest evaluation JSON of every run under `sweep_root`.

  Returns:
    One dict per run, sorted by (P, epsilon, seed, name): "name", "workdir",
    "seed" and "wta_epsilon" (from the run's config.json, None without it),
    "num_lm_heads" and "results" (the evaluation JSON).

  Raises:
    FileNotFoundError: `sweep_root` has no evaluated run.
  """
  runs = []
  for workdir in sorted(glob.glob(os.path.join(sweep_root, "*"))):
    paths = glob.glob(os.path.join(workdir, "eval", "step_*.json"))
    if not paths:
      continue
    path = max(paths, key=_eval_step)
    with open(path) as f:
      results = json.load(f)
    seed, epsilon = _read_config(workdir)
    runs.append({"name": os.path.basename(workdir), "workdir": workdir,
                 "seed": seed, "wta_epsilon": epsilon,
                 "num_lm_heads": int(results["num_lm_heads"]),
                 "results": results})
  if not runs:
    raise FileNotFoundError(
        f"No evaluated runs under {sweep_root!r}: expected "
        "<run>/eval/step_<N>.json files; run launch/sweep.py first.")
  runs.sort(key=lambda r: (r["num_lm_heads"], _epsilon_order(r["wta_epsilon"]),
                           r["seed"] is None, r["seed"] or 0, r["name"]))
  return runs


def _epsilon_order(epsilon: float | None) -> tuple[bool, float]:
  """Sort key that puts an unknown epsilon after the known ones."""
  return epsilon is None, epsilon or 0.0


# A group of runs: (P, loss.wta_epsilon), the epsilon None when unknown.
GroupKey = tuple[int, float | None]


def group_runs(runs: Sequence[dict[str, Any]]) -> dict[GroupKey, list[dict]]:
  """Return {(P, epsilon): runs}, sorted by P and then epsilon."""
  groups: dict[GroupKey, list[dict]] = {}
  for run in runs:
    key = (run["num_lm_heads"], run["wta_epsilon"])
    groups.setdefault(key, []).append(run)
  return dict(sorted(groups.items(),
                     key=lambda item: (item[0][0], _epsilon_order(item[0][1]))))


def baseline_runs(groups: dict[GroupKey, list[dict]]) -> list[dict]:
  """Return every P = 1 run, whatever its epsilon.

  With one head the WTA weights are 1 for every epsilon (`loss.winner_weights`),
  so all P = 1 runs train the same way and form one baseline.
  """
  return [run for (heads, _), runs in groups.items() if heads == 1
          for run in runs]


def format_epsilon(epsilon: float | None) -> str:
  """Format a WTA epsilon for a table cell: "0", "0.3" or "n/a"."""
  return "n/a" if epsilon is None else f"{epsilon:g}"


def setting_label(key: GroupKey) -> str:
  """Name a group in findings, e.g. "P = 4, ε = 0.3"."""
  heads, epsilon = key
  return f"P = {heads}, ε = {format_epsilon(epsilon)}"


# ---------------------------------------------------------------------------
# Statistics.


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
  """Return {"mean", "std", "n"} of the values that are not None.

  `std` is the sample standard deviation (ddof = 1), None for fewer than two
  values; `mean` is None without values.
  """
  values = [float(v) for v in values if v is not None]
  if not values:
    return {"mean": None, "std": None, "n": 0}
  std = statistics.stdev(values) if len(values) > 1 else None
  return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def _get(results: dict, *keys):
  """Return results[k0][k1]..., or None where a level is missing."""
  value = results
  for key in keys:
    if value is None:
      return None
    try:
      value = value[key]
    except (KeyError, IndexError, TypeError):
      return None
  return value


def _best_head_perplexity(results: dict) -> float | None:
  per_head = [p for p in results.get("per_head_perplexity", []) if p is not None]
  return min(per_head) if per_head else None


def _worst_head_perplexity(results: dict) -> float | None:
  per_head = [p for p in results.get("per_head_perplexity", []) if p is not None]
  return max(per_head) if per_head else None


def pilot_head(results: dict) -> int | None:
  """Return the Fast-K pilot of a run, or None when it changes per token.

  The utilization pilot is the head with the most training wins (lowest
  index on ties, as `decoding.utilization_pilot`); the fixed pilot is
  decode.pilot_head. round_robin and lowest_entropy have no single pilot.
  """
  strategy = _get(results, "decode", "pilot")
  if strategy == "fixed":
    return _get(results, "decode", "pilot_head")
  wins = results.get("win_counts")
  if strategy == "utilization" and wins:
    return max(range(len(wins)), key=lambda h: (wins[h], -h))
  return None


def _pilot_perplexity(results: dict) -> float | None:
  head = pilot_head(results)
  return _get(results, "per_head_perplexity", head) if head is not None else None


def _pilot_win_share(results: dict) -> float | None:
  """Return the pilot's share of the training wins (win_counts)."""
  head = pilot_head(results)
  wins = results.get("win_counts")
  if head is None or not wins or not sum(wins):
    return None
  return wins[head] / sum(wins)


def _mixture_top_k_recall(results: dict) -> float | None:
  """Return the share of targets in the mixture's top-K, K = Fast-K's K.

  None when K is not one of the evaluated top-n sizes.
  """
  top_k = _get(results, "decode", "top_k")
  return _get(results, "top_n_accuracy", "mixture", str(top_k))


def _bucket(results: dict, name: str) -> dict | None:
  for bucket in results.get("buckets", []):
    if bucket["name"] == name:
      return bucket
  return None


def aggregate(runs: Sequence[dict], getter: Callable[[dict], Any]) -> dict:
  """Apply `getter` to each run's results and return `mean_std` of them."""
  return mean_std([getter(run["results"]) for run in runs])


def compare(baseline: dict, other: dict, lower_is_better: bool) -> str | None:
  """Return "better", "worse" or "unclear" for `other` against `baseline`.

  Both are `mean_std` dicts. A single run has no spread, so its standard error
  counts as 0; with one run on both sides any difference counts.
  None when either side has no values.
  """
  if baseline["mean"] is None or other["mean"] is None:
    return None
  diff = other["mean"] - baseline["mean"]
  if math.isnan(diff) or diff == 0:
    return "unclear"
  if math.isfinite(diff):
    variance = sum((s["std"] or 0.0) ** 2 / s["n"] for s in (baseline, other))
    standard_error = math.sqrt(variance)
    if not math.isfinite(standard_error):
      return "unclear"
    if abs(diff) <= SIGNIFICANCE_SE * standard_error:
      return "unclear"
  improved = diff < 0 if lower_is_better else diff > 0
  return "better" if improved else "worse"


# ---------------------------------------------------------------------------
# Markdown.


def format_mean_std(stats: dict, digits: int = 2) -> str:
  """Format a `mean_std` dict as "12.34 ± 0.56".

  One run has no spread, so only its value is shown. No runs give "n/a"."""
  if stats["mean"] is None:
    return "n/a"
  if stats["std"] is None:
    return f"{stats['mean']:.{digits}f}"
  return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return lines


def _distinct(runs: Sequence[dict], getter: Callable[[dict], Any]) -> list:
  values = []
  for run in runs:
    value = getter(run["results"])
    if value not in values:
      values.append(value)
  return values


def protocol_lines(runs: Sequence[dict]) -> list[str]:
  """Describe the evaluation protocol; flag settings that differ between runs."""
  fields = [
      ("split", lambda r: r.get("split")),
      ("context length", lambda r: r.get("context_length")),
      ("stride", lambda r: r.get("stride")),
      ("scored tokens", lambda r: r.get("tokens")),
      ("checkpoint step", lambda r: r.get("step")),
      ("Fast-K K", lambda r: _get(r, "decode", "top_k")),
      ("Fast-K pilot", lambda r: _get(r, "decode", "pilot")),
      ("Fast-K combine", lambda r: _get(r, "decode", "combine")),
  ]
  parts, mixed = [], []
  for label, getter in fields:
    values = _distinct(runs, getter)
    if len(values) == 1:
      parts.append(f"{label} {values[0]}")
    else:
      mixed.append(f"{label} ({', '.join(str(v) for v in values)})")
  lines = ["Every perplexity below uses strided evaluation with the same "
           "protocol: " + ", ".join(parts) + "."]
  if mixed:
    lines.append("")
    lines.append("**Warning:** the runs differ in " + "; ".join(mixed) +
                 ", so their numbers are not directly comparable.")
  return lines


def _main_table(groups: dict[GroupKey, list[dict]]) -> list[str]:
  header = ["P", "ε", "runs", "perplexity", "oracle perplexity",
            "Fast-K perplexity", "best single head perplexity",
            "unigram perplexity", "shortlist recall"]
  rows = []
  for (heads, epsilon), runs in groups.items():
    rows.append([
        str(heads), format_epsilon(epsilon), str(len(runs)),
        format_mean_std(aggregate(runs, lambda r: r.get("perplexity"))),
        format_mean_std(aggregate(runs, lambda r: r.get("oracle_perplexity"))),
        format_mean_std(aggregate(runs, lambda r: r.get("fastk_perplexity"))),
        format_mean_std(aggregate(runs, _best_head_perplexity)),
        format_mean_std(aggregate(runs, lambda r: r.get("unigram_perplexity"))),
        format_mean_std(aggregate(runs, lambda r: r.get("shortlist_recall")), 3),
    ])
  return _table(header, rows)


def _top_n_table(groups: dict[GroupKey, list[dict]]) -> list[str]:
  top_n = [str(n) for n in metrics.TOP_N]
  labels = {"mixture": "mixture", "fastk": "Fast-K",
            "best_head": "best single head"}
  header = ["P", "ε", "decoder"] + [f"top-{n}" for n in top_n]
  rows = []
  for (heads, epsilon), runs in groups.items():
    for decoder, label in labels.items():
      row = [str(heads), format_epsilon(epsilon), label]
      for n in top_n:
        row.append(format_mean_std(aggregate(
            runs, lambda r, d=decoder, n=n: _get(r, "top_n_accuracy", d, n)), 3))
      rows.append(row)
  return _table(header, rows)


def _bucket_table(groups: dict[GroupKey, list[dict]]) -> list[str]:
  header = ["bucket (training count)", "P", "ε", "tokens", "perplexity",
            "Fast-K perplexity", "oracle perplexity", "unigram perplexity",
            "shortlist recall", "top-1 mixture", "top-1 Fast-K"]
  rows = []
  for name in metrics.BUCKET_NAMES:
    for (heads, epsilon), runs in groups.items():
      get = lambda key, name=name: (lambda r: _get(_bucket(r, name), key))
      rows.append([
          name, str(heads), format_epsilon(epsilon),
          # Seeds share the evaluation split, so the count does not vary.
          f"{aggregate(runs, get('tokens'))['mean'] or 0:.0f}",
          format_mean_std(aggregate(runs, get("perplexity"))),
          format_mean_std(aggregate(runs, get("fastk_perplexity"))),
          format_mean_std(aggregate(runs, get("oracle_perplexity"))),
          format_mean_std(aggregate(runs, get("unigram_perplexity"))),
          format_mean_std(aggregate(runs, get("shortlist_recall")), 3),
          format_mean_std(aggregate(
              runs, lambda r, name=name: _get(
                  _bucket(r, name), "top_n_accuracy", "mixture", "1")), 3),
          format_mean_std(aggregate(
              runs, lambda r, name=name: _get(
                  _bucket(r, name), "top_n_accuracy", "fastk", "1")), 3),
      ])
  return _table(header, rows)


# Metrics compared against P = 1: (label, getter, lower_is_better, digits).
COMPARED_METRICS = (
    ("perplexity (uniform mixture)", lambda r: r.get("perplexity"), True, 2),
    ("Fast-K perplexity", lambda r: r.get("fastk_perplexity"), True, 2),
    ("best single head perplexity", _best_head_perplexity, True, 2),
    ("top-1 accuracy of the mixture", lambda r: r.get("top1_accuracy"), False, 3),
    ("top-1 accuracy of Fast-K", lambda r: r.get("fastk_top1_accuracy"), False, 3),
    ("top-10 accuracy of the mixture",
     lambda r: _get(r, "top_n_accuracy", "mixture", "10"), False, 3),
    ("shortlist recall of the Fast-K pilot",
     lambda r: r.get("shortlist_recall"), False, 3),
) + tuple(
    (f"perplexity on targets seen {name} times in training",
     lambda r, name=name: _get(_bucket(r, name), "perplexity"), True, 2)
    for name in metrics.BUCKET_NAMES)


def _difference_text(other: dict, baseline: dict, digits: int,
                     other_label: str, baseline_label: str,
                     ratio: bool = False) -> str:
  """Format "A at X against B at Y (difference +d)", optionally with A / B."""
  difference = other["mean"] - baseline["mean"]
  extra = ""
  if ratio and baseline["mean"]:
    extra = f", ratio {other['mean'] / baseline['mean']:.3g}"
  return (f"{format_mean_std(other, digits)} at {other_label} against "
          f"{format_mean_std(baseline, digits)} at {baseline_label} "
          f"(difference {difference:+.{digits}f}{extra})")


def findings(groups: dict[GroupKey, list[dict]]) -> tuple[list[str], list[str]]:
  """Compare every P > 1 group with the P = 1 runs on `COMPARED_METRICS`.

  Returns:
    (gains, non_gains): Markdown bullet texts. A gain is a difference beyond
    `SIGNIFICANCE_SE` standard errors in the good direction; everything else
    (worse, or within noise) is a non-gain.
  """
  gains, non_gains = [], []
  baseline = baseline_runs(groups)
  if not baseline:
    non_gains.append("There are no P = 1 runs, so nothing is compared "
                     "against a single-head model.")
    return gains, non_gains
  for label, getter, lower_is_better, digits in COMPARED_METRICS:
    baseline_stats = aggregate(baseline, getter)
    for key, runs in groups.items():
      if key[0] == 1:
        continue
      other = aggregate(runs, getter)
      verdict = compare(baseline_stats, other, lower_is_better)
      if verdict is None:
        continue
      values = _difference_text(other, baseline_stats, digits,
                                setting_label(key), "P = 1")
      if verdict == "better":
        gains.append(f"Better {label}: {values}.")
      elif verdict == "worse":
        non_gains.append(f"Worse {label}: {values}.")
      else:
        non_gains.append(f"No clear change in {label} (within "
                         f"{SIGNIFICANCE_SE:g} standard errors over seeds): "
                         f"{values}.")

  # The oracle improves with P by construction, so state it beside the
  # proper mixture.
  for key, runs in groups.items():
    if key[0] == 1:
      continue
    oracle = aggregate(runs, lambda r: r.get("oracle_perplexity"))
    mixture = aggregate(runs, lambda r: r.get("perplexity"))
    if oracle["mean"] is not None and mixture["mean"] is not None:
      non_gains.append(
          f"At {setting_label(key)} the oracle perplexity is "
          f"{format_mean_std(oracle)} against {format_mean_std(mixture)} for "
          "the mixture. The oracle picks the head with the gold label, so it "
          "is not the perplexity of any predictor and is no gain by itself.")
  return gains, non_gains


# Metrics compared between strict and relaxed WTA at the same P:
# (label, getter, lower_is_better, digits).
STRICT_RELAXED_METRICS = (
    ("perplexity (uniform mixture)", lambda r: r.get("perplexity"), True, 2),
    ("Fast-K perplexity", lambda r: r.get("fastk_perplexity"), True, 2),
    ("shortlist recall of the Fast-K pilot",
     lambda r: r.get("shortlist_recall"), False, 3),
    ("top-1 accuracy of Fast-K", lambda r: r.get("fastk_top1_accuracy"),
     False, 3),
)


def strict_relaxed_pairs(
    groups: dict[GroupKey, list[dict]]) -> list[tuple[GroupKey, GroupKey]]:
  """Return (strict, relaxed) group keys that share P > 1, strict epsilon 0."""
  pairs = []
  for strict in groups:
    heads, epsilon = strict
    if heads == 1 or epsilon != 0.0:
      continue
    pairs += [(strict, key) for key in groups
              if key[0] == heads and key[1] is not None and key[1] > 0.0]
  return pairs


def strict_relaxed_findings(groups: dict[GroupKey, list[dict]]) -> list[str]:
  """Compare relaxed with strict WTA at each P on `STRICT_RELAXED_METRICS`."""
  lines = []
  for strict, relaxed in strict_relaxed_pairs(groups):
    heads, epsilon = relaxed
    for label, getter, lower_is_better, digits in STRICT_RELAXED_METRICS:
      strict_stats = aggregate(groups[strict], getter)
      relaxed_stats = aggregate(groups[relaxed], getter)
      verdict = compare(strict_stats, relaxed_stats, lower_is_better)
      if verdict is None:
        continue
      values = _difference_text(
          relaxed_stats, strict_stats, digits, f"ε = {epsilon:g}", "ε = 0",
          ratio=lower_is_better)
      if verdict == "unclear":
        lines.append(f"At P = {heads}, no clear difference in {label} "
                     f"between relaxed and strict WTA (within "
                     f"{SIGNIFICANCE_SE:g} standard errors over seeds): "
                     f"{values}.")
      else:
        effect = "improves" if verdict == "better" else "worsens"
        lines.append(f"At P = {heads}, relaxed WTA {effect} {label}: "
                     f"{values}.")
  return lines


def _pilot_description(runs: Sequence[dict]) -> str:
  """Name the pilot of a group's runs, e.g. "the head with the most training wins"."""
  strategies = _distinct(runs, lambda r: _get(r, "decode", "pilot"))
  if strategies == ["utilization"]:
    return "the head with the most training wins"
  if strategies == ["fixed"]:
    heads = _distinct(runs, lambda r: _get(r, "decode", "pilot_head"))
    if len(heads) == 1:
      return f"head {heads[0]}"
  return "the pilot"


def _recall_sentences(runs: Sequence[dict], top_k: Any) -> list[str]:
  """Explain Fast-K's numbers of one group from the pilot's shortlist."""
  recall = aggregate(runs, lambda r: r.get("shortlist_recall"))
  mixture_recall = aggregate(runs, _mixture_top_k_recall)
  pilot_perplexity = aggregate(runs, _pilot_perplexity)
  pilot_share = aggregate(runs, _pilot_win_share)
  fastk = aggregate(runs, lambda r: r.get("fastk_perplexity"))
  mixture = aggregate(runs, lambda r: r.get("perplexity"))

  sentences = []
  pilot = _pilot_description(runs)
  if pilot_perplexity["mean"] is not None and pilot_share["mean"] is not None:
    sentences.append(
        f"The pilot, {pilot}, won {format_mean_std(pilot_share, 3)} of the "
        f"training tokens and has perplexity "
        f"{format_mean_std(pilot_perplexity)} on its own.")
  if recall["mean"] is None:
    return sentences

  if mixture_recall["mean"] is not None:
    sentences.append(
        f"Its top-{top_k} contains {format_mean_std(recall, 3)} of the "
        f"targets, against {format_mean_std(mixture_recall, 3)} for the "
        f"mixture's top-{top_k}.")
    gap = mixture_recall["mean"] - recall["mean"]
    if gap > 0:
      # |M \ S| >= |M| - |S| for the mixture's top-K M and the shortlist S.
      sentences.append(
          f"So at least {gap:.3f} of the targets are in the mixture's "
          f"top-{top_k} but outside the pilot's shortlist: they are tokens "
          "that the other heads rank highly.")
  else:
    sentences.append(f"Its top-{top_k} contains {format_mean_std(recall, 3)} "
                     "of the targets.")

  if fastk["mean"] is not None and mixture["mean"] is not None:
    sentences.append(
        "Fast-K gives a target outside the shortlist the pilot's own "
        f"probability, and its perplexity is {format_mean_std(fastk)} "
        f"against {format_mean_std(mixture)} for the mixture.")
  return sentences


def specialization_lines(groups: dict[GroupKey, list[dict]]) -> list[str]:
  """Explain each P > 1 group's Fast-K numbers from its per-head perplexities.

  A head counts as a usable distribution over the full vocabulary when its
  perplexity is below the run's add-one unigram perplexity. A group whose
  best head fails that test in every run has heads that each cover only part
  of the vocabulary.
  """
  lines = []
  for key, runs in groups.items():
    heads, epsilon = key
    if heads == 1:
      continue
    best = aggregate(runs, _best_head_perplexity)
    worst = aggregate(runs, _worst_head_perplexity)
    unigram = aggregate(runs, lambda r: r.get("unigram_perplexity"))
    mixture = aggregate(runs, lambda r: r.get("perplexity"))
    if None in (best["mean"], worst["mean"], unigram["mean"], mixture["mean"]):
      continue
    none_usable = sum(
        1 for r in runs if _best_head_perplexity(r["results"])
        >= r["results"]["unigram_perplexity"])
    all_usable = sum(
        1 for r in runs if _worst_head_perplexity(r["results"])
        < r["results"]["unigram_perplexity"])

    if none_usable == len(runs):
      sentences = [
          f"At {setting_label(key)}, no single head is a usable distribution "
          f"over the full vocabulary. Even the best head has perplexity "
          f"{format_mean_std(best)} (the worst {format_mean_std(worst)}), "
          f"above the add-one unigram perplexity {format_mean_std(unigram)}, "
          f"while the uniform mixture of the heads reaches "
          f"{format_mean_std(mixture)}.",
          "So each head predicts only the part of the vocabulary that it "
          "wins, and the heads cover the vocabulary only together."]
    elif all_usable == len(runs):
      sentences = [
          f"At {setting_label(key)}, every head is a usable distribution over "
          f"the full vocabulary. Head perplexities run from "
          f"{format_mean_std(best)} (best head) to {format_mean_std(worst)} "
          f"(worst head), all below the add-one unigram perplexity "
          f"{format_mean_std(unigram)}. The worst head is within a "
          f"factor {worst['mean'] / mixture['mean']:.2f} of the mixture's "
          f"{format_mean_std(mixture)}."]
    else:
      sentences = [
          f"At {setting_label(key)}, every head is below the add-one unigram "
          f"perplexity {format_mean_std(unigram)} in {all_usable} of "
          f"{len(runs)} runs, and no head is in {none_usable}: "
          f"head perplexities run from {format_mean_std(best)} (best head) "
          f"to {format_mean_std(worst)} (worst head), against "
          f"{format_mean_std(mixture)} for the mixture."]

    if epsilon == 0.0:
      sentences.append("Under strict WTA a head's loss covers only the "
                       "tokens it wins, so nothing trains it to give the "
                       "other tokens probability.")
    elif epsilon is not None:
      sentences.append(
          f"With ε = {epsilon:g} every head also gets the loss weight "
          f"ε / (P - 1) = {epsilon / (heads - 1):.3g} on each token it "
          "does not win.")
    top_k = _distinct(runs, lambda r: _get(r, "decode", "top_k"))
    sentences += _recall_sentences(
        runs, top_k[0] if len(top_k) == 1 else "K")
    lines.append(" ".join(sentences))
  return lines


def _specialization_table(groups: dict[GroupKey, list[dict]]) -> list[str]:
  header = ["P", "ε", "perplexity", "best head perplexity",
            "worst head perplexity", "pilot perplexity",
            "pilot's share of training wins", "mixture top-K recall",
            "shortlist recall (pilot top-K)", "Fast-K perplexity"]
  getters = (
      (lambda r: r.get("perplexity"), 2),
      (_best_head_perplexity, 2),
      (_worst_head_perplexity, 2),
      (_pilot_perplexity, 2),
      (_pilot_win_share, 3),
      (_mixture_top_k_recall, 3),
      (lambda r: r.get("shortlist_recall"), 3),
      (lambda r: r.get("fastk_perplexity"), 2),
  )
  rows = []
  for (heads, epsilon), runs in groups.items():
    rows.append([str(heads), format_epsilon(epsilon)] + [
        format_mean_std(aggregate(runs, getter), digits)
        for getter, digits in getters])
  return _table(header, rows)


def sanity_lines(runs: Sequence[dict]) -> list[str]:
  """Check the unigram baseline and oracle <= mixture <= P * oracle per run."""
  lines = []
  above_unigram = [r["name"] for r in runs
                   if r["results"].get("unigram_perplexity") is not None
                   and r["results"]["perplexity"]
                   >= r["results"]["unigram_perplexity"]]
  if above_unigram:
    lines.append("- **Not better than the unigram baseline:** "
                 + ", ".join(above_unigram) + ".")
  else:
    lines.append("- Every run's perplexity is below its add-one unigram "
                 "perplexity (training-split frequencies).")
  violations = []
  for run in runs:
    results = run["results"]
    oracle, mixture = results["oracle_perplexity"], results["perplexity"]
    # A relative tolerance of 1e-6 absorbs float32 rounding.
    above_oracle = oracle <= mixture * (1 + 1e-6)
    below_bound = mixture <= run["num_lm_heads"] * oracle * (1 + 1e-6)
    if not (above_oracle and below_bound):
      violations.append(run["name"])
  if violations:
    lines.append("- **Bound oracle <= perplexity <= P x oracle violated:** "
                 + ", ".join(violations) + ".")
  else:
    lines.append("- Every run satisfies oracle <= perplexity <= P x oracle.")
  return lines


def benchmark_lines(benchmarks_md: str | None,
                    benchmark_json: str | None) -> list[str]:
  """Return the decode-speed section's lines.

  A JSON file is a list of row objects (or {"rows": [...]}), shown with the
  union of their keys as columns. From a Markdown file, every table inside a
  section whose heading mentions decoding or Fast-K is copied.
  """
  if benchmark_json:
    with open(benchmark_json) as f:
      data = json.load(f)
    rows = data["rows"] if isinstance(data, dict) else data
    columns = []
    for row in rows:
      columns += [k for k in row if k not in columns]
    return [f"From `{benchmark_json}`:", ""] + _table(
        columns, [[str(row.get(c, "")) for c in columns] for row in rows])
  if benchmarks_md and os.path.exists(benchmarks_md):
    with open(benchmarks_md) as f:
      text = f.read()
    lines, in_section, copied = [], False, 0
    for line in text.splitlines():
      heading = re.match(r"^(#+)\s+(.*)", line)
      if heading:
        in_section = bool(re.search(r"decod|fast-?k", heading.group(2), re.I))
        if in_section:
          lines += ["", f"**{heading.group(2).strip()}**", ""]
        continue
      if in_section and line.lstrip().startswith("|"):
        lines.append(line)
        copied += 1
    if copied:
      return [f"Decode-speed tables copied from `{benchmarks_md}`:"] + lines
    return [f"`{benchmarks_md}` has no decode-speed table (no table under a "
            "heading that mentions decoding or Fast-K)."]
  return ["No decode benchmark found: pass --benchmark_json, or write "
          "docs/benchmarks.md with `python -m fastk_jax.benchmark decode`."]


def reproduce_lines(sweep_root: str, sweep_config: str | None,
                    report_command: str) -> list[str]:
  """Return the commands that rebuild the runs and this page."""
  lines = ["From the repository root:", "", "```bash"]
  if sweep_config:
    lines.append(f"python launch/sweep.py --config={sweep_config} "
                 f"--workdir_root={sweep_root} --run")
  lines += [report_command, "```"]
  if sweep_config:
    lines += ["", "The sweep command runs every entry of the config's sweep() "
              "that has no evaluation JSON yet, strict and relaxed WTA alike, "
              "and skips the finished ones."]
  else:
    lines += ["", "The sweep config is not recorded: pass --sweep_config to "
              "write the command that trains the runs."]
  return lines


def _report_command(sweep_root: str, output: str, sweep_config: str | None,
                    benchmarks_md: str | None,
                    benchmark_json: str | None) -> str:
  """Return the `fastk_jax.report` command line that writes this page."""
  parts = ["python -m fastk_jax.report", f"--sweep_root={sweep_root}",
           f"--output={output}"]
  if sweep_config:
    parts.append(f"--sweep_config={sweep_config}")
  if benchmark_json:
    parts.append(f"--benchmark_json={benchmark_json}")
  elif benchmarks_md != "docs/benchmarks.md":
    parts.append(f"--benchmarks_md={benchmarks_md or ''}")
  return " ".join(parts)


def render_markdown(runs: Sequence[dict], *, sweep_root: str,
                    benchmarks_md: str | None = None,
                    benchmark_json: str | None = None,
                    sweep_config: str | None = None,
                    output: str = "docs/results.md") -> str:
  """Build the whole results page.

  `sweep_config` and `output` only go into the page's reproduction commands.
  """
  groups = group_runs(runs)
  first = runs[0]["results"]
  caption = (f"Perplexities: strided evaluation with context "
             f"{first['context_length']}, stride {first['stride']}.")
  seeds = sorted({str(r["seed"]) for r in runs})
  lines = [
      "# Results: multi-head (winner-take-all) training against P = 1",
      "",
      f"{len(runs)} runs from `{sweep_root}`, grouped by P, the number of LM "
      "heads, and ε, the relaxed winner-take-all (WTA) weight "
      f"`loss.wta_epsilon` (seeds {', '.join(seeds)}). Each cell is the mean "
      "± sample standard deviation over a group's runs. Generated by "
      "`python -m fastk_jax.report`; edit the sweep, not this file.",
      "",
  ]
  lines += protocol_lines(runs)
  lines += [
      "",
      "- **ε**: under strict WTA (ε = 0) only the head with the lowest loss "
      "on a token (the winner) is trained on it. Relaxed WTA weights the "
      "winner's loss by 1 - ε and every other head's by ε / (P - 1). With "
      "P = 1 the weight is 1 for every ε, so the P = 1 runs are the baseline "
      "of both settings.",
      "- **perplexity**: the uniform mixture of the P heads, a proper "
      "distribution (the headline number).",
      "- **oracle perplexity**: each token scored by the head that gives its "
      "gold label the highest probability. It uses the label, so it is not "
      "the perplexity of any predictor.",
      "- **Fast-K perplexity**: the distribution Fast-K decoding samples from "
      "(the pilot's Top-K rescored by every head, the pilot's softmax outside "
      "the shortlist).",
      "- **best single head**: the head with the lowest perplexity on the "
      "evaluated split, chosen per run.",
      "- **size**: every run has the same trunk, data and steps, but P heads "
      "hold P·V·d parameters, so runs with P > 1 have more parameters than "
      "P = 1. The comparisons below are not parameter-matched.",
      "",
      "## What multi-head training buys over P = 1",
      "",
      f"A group counts as better or worse than another when the difference "
      f"of the means exceeds {SIGNIFICANCE_SE:g} standard errors over seeds. "
      "The seeds share one evaluation text, so this spread leaves out the "
      "sampling error of that text, and small differences should be judged "
      "by their size too.",
      "",
  ]
  gains, non_gains = findings(groups)
  lines += [f"- {g}" for g in gains] or ["- Nothing measured here."]
  lines += ["", "## What it does not buy", ""]
  lines += [f"- {g}" for g in non_gains] or ["- Nothing measured here."]
  lines += ["", "## Strict against relaxed winner-take-all", ""]
  lines += ([f"- {line}" for line in strict_relaxed_findings(groups)]
            or ["- No P has both strict (ε = 0) and relaxed (ε > 0) runs."])
  lines += ["", "## Why Fast-K depends on the WTA setting", "",
            "Fast-K scores only the pilot head's Top-K with every head and "
            "gives every other token the pilot's own softmax probability. It "
            "therefore needs a pilot whose Top-K contains the targets that "
            "the other heads rank highly. A head counts below as a usable "
            "distribution over the full vocabulary when its perplexity is "
            "below the add-one unigram perplexity. The mixture's top-K "
            "recall is the share of targets in the mixture's K most likely "
            "tokens, with the K of Fast-K. " + caption, ""]
  lines += _specialization_table(groups)
  lines += [""]
  lines += ([f"- {line}" for line in specialization_lines(groups)]
            or ["- There are no P > 1 runs."])
  lines += ["", "## Checks", ""]
  lines += sanity_lines(runs)
  lines += ["", "## Perplexity", "", caption, ""]
  lines += _main_table(groups)
  lines += ["", "## Top-n accuracy", ""]
  lines += _top_n_table(groups)
  lines += ["", "## Rare tokens", "",
            "Targets bucketed by how often they occur in the training split; "
            f"token counts are per run. {caption}", ""]
  lines += _bucket_table(groups)
  lines += ["", "## Decode speed", ""]
  lines += benchmark_lines(benchmarks_md, benchmark_json)
  lines += ["", "## Runs", "", caption, ""]
  lines += _table(
      ["run", "P", "ε", "seed", "perplexity", "oracle", "Fast-K", "step"],
      [[r["name"], str(r["num_lm_heads"]), format_epsilon(r["wta_epsilon"]),
        str(r["seed"]),
        f"{r['results']['perplexity']:.2f}",
        f"{r['results']['oracle_perplexity']:.2f}",
        "n/a" if r["results"].get("fastk_perplexity") is None
        else f"{r['results']['fastk_perplexity']:.2f}",
        str(r["results"]["step"])] for r in runs])
  lines += ["", "## Reproduce", ""]
  lines += reproduce_lines(
      sweep_root, sweep_config,
      _report_command(sweep_root, output, sweep_config, benchmarks_md,
                      benchmark_json))
  return "\n".join(lines) + "\n"


def write_report(sweep_root: str, output: str, *,
                 benchmarks_md: str | None = "docs/benchmarks.md",
                 benchmark_json: str | None = None,
                 sweep_config: str | None = None) -> str:
  """Load the sweep, write the Markdown page to `output` and return it."""
  runs = load_runs(sweep_root)
  markdown = render_markdown(runs, sweep_root=sweep_root,
                             benchmarks_md=benchmarks_md,
                             benchmark_json=benchmark_json,
                             sweep_config=sweep_config, output=output)
  directory = os.path.dirname(os.path.abspath(output))
  os.makedirs(directory, exist_ok=True)
  with open(output, "w") as f:
    f.write(markdown)
  logging.info("Wrote %s from %d runs.", output, len(runs))
  return markdown


def define_flags() -> None:
  """Define the command-line flags (only when run as a program)."""
  flags.DEFINE_string("sweep_root", None,
                      "Directory whose subdirectories are evaluated runs.")
  flags.DEFINE_string("output", "docs/results.md", "Markdown file to write.")
  flags.DEFINE_string(
      "sweep_config", None,
      "Config file of the sweep that trained the runs, e.g. "
      "configs/sweep_small.py; only used to write the reproduction commands.")
  flags.DEFINE_string("benchmarks_md", "docs/benchmarks.md",
                      "Markdown file with decode-speed tables, if present.")
  flags.DEFINE_string("benchmark_json", None,
                      "JSON list of decode-speed rows; replaces --benchmarks_md.")
  flags.mark_flags_as_required(["sweep_root"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  markdown = write_report(FLAGS.sweep_root, FLAGS.output,
                          benchmarks_md=FLAGS.benchmarks_md,
                          benchmark_json=FLAGS.benchmark_json,
                          sweep_config=FLAGS.sweep_config)
  print(markdown)


if __name__ == "__main__":
  define_flags()
  app.run(main)
