"""Language-model metrics for P heads: pure array functions, no I/O.

Per target token y (NLL in nats):

  mixture   -log(1/P sum_h p_h(y)): the uniform mixture of the heads, a proper
            distribution. Its exp-mean is the headline `perplexity`.
  oracle    min_h -log p_h(y). It picks the head with the gold label, so it is
            not the likelihood of any predictor (sum_y max_h p_h(y) >= 1).
            Its exp-mean is `oracle_perplexity`, and
            oracle_perplexity <= perplexity <= P * oracle_perplexity.
  head h    -log p_h(y), each head alone (`per_head_perplexity`).
  Fast-K    -log p_fastk(y), where p_fastk is the full-vocabulary distribution
            that `decoding.fastk_step` samples from (`fastk_perplexity`).
  unigram   -log((c_y + 1) / (C + V)): add-one smoothed unigram of the training
            split, with c_y the count of y, C the total count and V the
            vocabulary size (`unigram_perplexity`).

Top-n accuracy counts a target as correct when fewer than n tokens rank above
it. Ranks break ties by token id, lowest first, as `jnp.argmax` and
`jax.lax.top_k` do, so top-1 accuracy equals "argmax == target".

Rare tokens: every metric is also summed per bucket of the target's
training-split count, with the buckets [0, 10), [10, 100), [100, 1000) and
[1000, inf).

Evaluation code computes per-token values with `token_statistics`, sums them
per bucket with `bucket_sums`, adds the sums over all chunks and turns them
into results with `summarize`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

TOP_N = (1, 5, 10, 50)
# Lower bounds of the frequency buckets after the first, in training-split
# occurrences. Bucket b contains the counts in [edges[b - 1], edges[b]).
BUCKET_EDGES = (10, 100, 1000)
BUCKET_NAMES = ("<10", "10-100", "100-1k", ">=1k")
DECODERS = ("mixture", "fastk", "best_head")


# ---------------------------------------------------------------------------
# Per-token quantities (JAX).


def mixture_log_probs(head_log_probs):
  """Return the uniform mixture's log-probabilities `[..., V]`.

  Args:
    head_log_probs: `[..., P, V]` log-softmax of every head.
  """
  num_heads = head_log_probs.shape[-2]
  return jax.nn.logsumexp(head_log_probs, axis=-2) - jnp.log(num_heads)


def gather_targets(values, targets):
  """Return `values[n, ..., targets[n]]`: `[N, ..., V]`, `[N]` -> `[N, ...]`."""
  index = targets.reshape(targets.shape + (1,) * (values.ndim - 1))
  return jnp.take_along_axis(values, index, axis=-1)[..., 0]


def target_rank(scores, targets):
  """Return the 0-based rank of each target among the V tokens.

  A token ranks above the target when its score is higher, or equal with a
  lower token id (the tie order of `jnp.argmax` and `jax.lax.top_k`).

  Args:
    scores: `[N, ..., V]` probabilities, log-probabilities or logits.
    targets: `[N]` token ids.

  Returns:
    `[N, ...]` int32 ranks; 0 means the target is the top-1 token.
  """
  target_score = gather_targets(scores, targets)[..., None]  # [N, ..., 1]
  token_ids = jnp.arange(scores.shape[-1])
  target_ids = targets.reshape(targets.shape + (1,) * (scores.ndim - 1))
  above = (scores > target_score) | ((scores == target_score)
                                     & (token_ids < target_ids))
  return jnp.sum(above, axis=-1, dtype=jnp.int32)


def top_n_correct(scores, targets, top_n: Sequence[int] = TOP_N):
  """Return `[N, ..., len(top_n)]` float32: 1 where the target is in the top n."""
  rank = target_rank(scores, targets)[..., None]
  return (rank < jnp.asarray(top_n)).astype(jnp.float32)


def shortlist_hits(shortlist, targets):
  """Return `[N]` float32: 1 where the target is in the shortlist `[N, K]`."""
  return jnp.any(shortlist == targets[:, None], axis=-1).astype(jnp.float32)


def fastk_target_log_probs(fastk_probs, shortlist, pilot_target_log_probs,
                           targets):
  """Return log p_fastk(target) `[N]` without float32 underflow.

  Outside the shortlist Fast-K gives a token the pilot's full-softmax
  probability, which can be below float32's smallest positive value for
  unlikely tokens. There the exact log-probability is the pilot's, so it is
  taken from `pilot_target_log_probs` instead of `log(fastk_probs)`.

  Args:
    fastk_probs: `[N, V]` Fast-K distribution.
    shortlist: `[N, K]` the pilot's Top-K token ids.
    pilot_target_log_probs: `[N]` log p_pilot(target) from the full softmax.
    targets: `[N]` token ids.
  """
  in_shortlist = shortlist_hits(shortlist, targets) > 0
  shortlist_log_probs = jnp.log(gather_targets(fastk_probs, targets))
  return jnp.where(in_shortlist, shortlist_log_probs, pilot_target_log_probs)


def token_statistics(head_log_probs, targets, *, fastk_probs,
                     fastk_log_probs, shortlist, unigram_log_probs,
                     top_n: Sequence[int] = TOP_N) -> dict[str, jax.Array]:
  """Compute every per-token metric of one chunk.

  Args:
    head_log_probs: `[N, P, V]` log-softmax of every head.
    targets: `[N]` token ids.
    fastk_probs: `[N, V]` Fast-K distribution (for its ranks).
    fastk_log_probs: `[N]` log p_fastk(target) (`fastk_target_log_probs`).
    shortlist: `[N, K]` the pilot's Top-K ids.
    unigram_log_probs: `[V]` from `unigram_log_probs`.
    top_n: the n of the top-n accuracies.

  Returns:
    A dict of per-token arrays with leading axis N: "tokens" (ones),
    "mixture_nll", "oracle_nll", "head_nll" `[N, P]`, "fastk_nll",
    "unigram_nll", "shortlist_hits", "mixture_top_n" `[N, n]`,
    "head_top_n" `[N, P, n]` and "fastk_top_n" `[N, n]`.
  """
  mixture = mixture_log_probs(head_log_probs)  # [N, V]
  head_nll = -gather_targets(head_log_probs, targets)  # [N, P]
  return {
      "tokens": jnp.ones(targets.shape, jnp.float32),
      "mixture_nll": -gather_targets(mixture, targets),
      "oracle_nll": jnp.min(head_nll, axis=-1),
      "head_nll": head_nll,
      "fastk_nll": -fastk_log_probs,
      "unigram_nll": -unigram_log_probs[targets],
      "shortlist_hits": shortlist_hits(shortlist, targets),
      "mixture_top_n": top_n_correct(mixture, targets, top_n),
      "head_top_n": top_n_correct(head_log_probs, targets, top_n),
      "fastk_top_n": top_n_correct(fastk_probs, targets, top_n),
  }


def bucket_sums(per_token: Mapping[str, jax.Array], buckets, mask,
                num_buckets: int = len(BUCKET_NAMES)) -> dict[str, jax.Array]:
  """Sum per-token values over the tokens of each frequency bucket.

  Args:
    per_token: arrays with leading axis N.
    buckets: `[N]` bucket index of each target.
    mask: `[N]` weights, 0 for padding.
    num_buckets: number of buckets.

  Returns:
    The same keys, each `[num_buckets, ...]`.
  """
  weights = jax.nn.one_hot(buckets, num_buckets) * mask[:, None]  # [N, B]
  return {name: jnp.tensordot(weights, value.astype(jnp.float32), axes=(0, 0))
          for name, value in per_token.items()}


# ---------------------------------------------------------------------------
# Training-split frequencies (NumPy).


def unigram_log_probs(counts) -> np.ndarray:
  """Return the add-one smoothed unigram log-probabilities `[V]` (float32).

  Args:
    counts: `[V]` training-split occurrences of each token id.
  """
  counts = np.asarray(counts, np.float64)
  log_probs = np.log(counts + 1.0) - np.log(counts.sum() + counts.size)
  return log_probs.astype(np.float32)


def token_buckets(counts, edges: Sequence[int] = BUCKET_EDGES) -> np.ndarray:
  """Return each token id's frequency bucket `[V]` (int32).

  A count c falls in bucket b when edges[b - 1] <= c < edges[b], so with the
  default edges 9 -> 0, 10 -> 1, 999 -> 2 and 1000 -> 3.
  """
  return np.searchsorted(np.asarray(edges), np.asarray(counts),
                         side="right").astype(np.int32)


# ---------------------------------------------------------------------------
# Summed statistics -> results.


def perplexity(nll_sum: float, tokens: float) -> float | None:
  """Return exp(nll_sum / tokens); None without tokens, inf on overflow."""
  if tokens <= 0:
    return None
  try:
    return math.exp(float(nll_sum) / float(tokens))
  except OverflowError:
    return math.inf


def _rate(count: float, tokens: float) -> float | None:
  return float(count) / float(tokens) if tokens > 0 else None


def _top_n_dict(correct, tokens: float, top_n: Sequence[int]):
  return {str(n): _rate(correct[i], tokens) for i, n in enumerate(top_n)}


def summarize_sums(sums: Mapping[str, Any], best_head: int,
                   top_n: Sequence[int] = TOP_N) -> dict[str, Any]:
  """Turn one set of summed statistics into metrics.

  Args:
    sums: the keys of `token_statistics`, summed over tokens (no bucket
      axis): scalars, "head_nll" `[P]`, "*_top_n" `[n]`, "head_top_n"
      `[P, n]`.
    best_head: the head reported as "best_head" in `top_n_accuracy`.
    top_n: the n of the "*_top_n" entries.

  Returns:
    A dict of plain floats (None where there are no tokens).
  """
  tokens = float(sums["tokens"])
  head_nll = np.asarray(sums["head_nll"], np.float64)
  head_top_n = np.asarray(sums["head_top_n"], np.float64)
  top_n_accuracy = {
      "mixture": _top_n_dict(np.asarray(sums["mixture_top_n"]), tokens, top_n),
      "fastk": _top_n_dict(np.asarray(sums["fastk_top_n"]), tokens, top_n),
      "best_head": _top_n_dict(head_top_n[best_head], tokens, top_n),
  }
  return {
      "tokens": int(round(tokens)),
      "perplexity": perplexity(sums["mixture_nll"], tokens),
      "oracle_perplexity": perplexity(sums["oracle_nll"], tokens),
      "per_head_perplexity": [perplexity(x, tokens) for x in head_nll],
      "fastk_perplexity": perplexity(sums["fastk_nll"], tokens),
      "unigram_perplexity": perplexity(sums["unigram_nll"], tokens),
      "shortlist_recall": _rate(sums["shortlist_hits"], tokens),
      "top1_accuracy": top_n_accuracy["mixture"].get("1"),
      "fastk_top1_accuracy": top_n_accuracy["fastk"].get("1"),
      "top_n_accuracy": top_n_accuracy,
  }


def summarize(bucketed_sums: Mapping[str, Any],
              top_n: Sequence[int] = TOP_N,
              bucket_names: Sequence[str] = BUCKET_NAMES,
              bucket_edges: Sequence[int] = BUCKET_EDGES) -> dict[str, Any]:
  """Turn per-bucket sums into overall and per-bucket metrics.

  The best single head is the head with the lowest per-head perplexity over
  all tokens. The buckets report that same head, so that no bucket picks its
  own best head with hindsight.

  Args:
    bucketed_sums: the keys of `token_statistics`, each `[B, ...]` (from
      `bucket_sums`, added over chunks).
    top_n: the n of the top-n entries.
    bucket_names: B names.
    bucket_edges: the B - 1 edges between the buckets.

  Returns:
    The overall metrics of `summarize_sums` plus "best_head" and "buckets", a
    list of B dicts with "name", "min_count", "max_count" (exclusive, None for
    the last) and the same metrics for the bucket's tokens.
  """
  sums = {name: np.asarray(value, np.float64)
          for name, value in bucketed_sums.items()}
  total = {name: value.sum(axis=0) for name, value in sums.items()}
  head_nll = total["head_nll"]
  best_head = int(np.argmin(head_nll))  # Lowest NLL = lowest perplexity.
  results = summarize_sums(total, best_head, top_n)
  results["best_head"] = best_head

  lower = (0,) + tuple(bucket_edges)
  upper = tuple(bucket_edges) + (None,)
  buckets = []
  for b, name in enumerate(bucket_names):
    bucket = summarize_sums({k: v[b] for k, v in sums.items()}, best_head, top_n)
    buckets.append({"name": name, "min_count": lower[b], "max_count": upper[b],
                    **bucket})
  results["buckets"] = buckets
  return results
