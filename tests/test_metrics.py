"""Metric definitions on hand-computed cases, and the bounds on a real model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastk_jax import checkpointing
from fastk_jax import decoding
from fastk_jax import evaluate
from fastk_jax import heads as heads_lib
from fastk_jax import metrics
from fastk_jax import train

from conftest import load_config


def _log(values):
  return jnp.log(jnp.asarray(values, jnp.float32))


# Two heads over a vocabulary of 3 for two tokens:
#   token 0: head 0 = (0.5, 0.25, 0.25), head 1 = (0.1, 0.8, 0.1), target 1
#   token 1: head 0 = (0.2, 0.2, 0.6),   head 1 = (0.2, 0.2, 0.6), target 0
HEAD_PROBS = [[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]],
              [[0.2, 0.2, 0.6], [0.2, 0.2, 0.6]]]
TARGETS = jnp.array([1, 0])


def test_mixture_oracle_and_head_nll():
  stats = metrics.token_statistics(
      _log(HEAD_PROBS), TARGETS, fastk_probs=jnp.full((2, 3), 1 / 3),
      fastk_log_probs=_log([0.5, 0.25]), shortlist=jnp.array([[1], [2]]),
      unigram_log_probs=_log([0.5, 0.25, 0.25]), top_n=(1, 2))
  np.testing.assert_allclose(stats["head_nll"],
                             -np.log([[0.25, 0.8], [0.2, 0.2]]), rtol=1e-6)
  np.testing.assert_allclose(stats["oracle_nll"], -np.log([0.8, 0.2]),
                             rtol=1e-6)
  # Mixture: (0.25 + 0.8) / 2 = 0.525 and (0.2 + 0.2) / 2 = 0.2.
  np.testing.assert_allclose(stats["mixture_nll"], -np.log([0.525, 0.2]),
                             rtol=1e-6)
  np.testing.assert_allclose(stats["fastk_nll"], -np.log([0.5, 0.25]),
                             rtol=1e-6)
  np.testing.assert_allclose(stats["unigram_nll"], -np.log([0.25, 0.5]),
                             rtol=1e-6)
  np.testing.assert_array_equal(stats["shortlist_hits"], [1.0, 0.0])
  np.testing.assert_array_equal(stats["tokens"], [1.0, 1.0])


def test_top_n_per_decoder():
  stats = metrics.token_statistics(
      _log(HEAD_PROBS), TARGETS,
      fastk_probs=jnp.array([[0.1, 0.2, 0.7], [0.3, 0.3, 0.4]]),
      fastk_log_probs=jnp.zeros(2), shortlist=jnp.array([[1], [2]]),
      unigram_log_probs=jnp.zeros(3), top_n=(1, 2))
  # Mixture of token 0 is (0.3, 0.525, 0.175): the target 1 ranks first.
  # Mixture of token 1 is (0.2, 0.2, 0.6): target 0 ties with token 1 and
  # wins the tie by its lower id, so it ranks second.
  np.testing.assert_array_equal(stats["mixture_top_n"], [[1, 1], [0, 1]])
  # Head 0 of token 0 ranks target 1 (0.25) after token 0 and ahead of the
  # tied token 2: rank 1. Head 1 ranks it first.
  np.testing.assert_array_equal(stats["head_top_n"],
                                [[[0, 1], [1, 1]], [[0, 1], [0, 1]]])
  # Fast-K: token 0's target is second; token 1's target 0 ties with token 1
  # for second place and wins the tie.
  np.testing.assert_array_equal(stats["fastk_top_n"], [[0, 1], [0, 1]])


def test_target_rank_breaks_ties_by_lowest_id():
  scores = jnp.array([[0.2, 0.5, 0.5, 0.1]] * 4)
  ranks = metrics.target_rank(scores, jnp.array([0, 1, 2, 3]))
  np.testing.assert_array_equal(ranks, [2, 0, 1, 3])
  # Top-1 agrees with argmax, which also takes the lowest id among ties.
  assert int(jnp.argmax(scores[0])) == 1


def test_single_head_metrics_coincide():
  log_probs = _log([[[0.7, 0.2, 0.1]], [[0.3, 0.3, 0.4]]])  # [2, P=1, 3]
  stats = metrics.token_statistics(
      log_probs, TARGETS, fastk_probs=jnp.exp(log_probs[:, 0]),
      fastk_log_probs=jnp.zeros(2), shortlist=jnp.array([[0], [2]]),
      unigram_log_probs=jnp.zeros(3))
  np.testing.assert_allclose(stats["mixture_nll"], stats["oracle_nll"],
                             rtol=1e-6)
  np.testing.assert_allclose(stats["mixture_nll"], stats["head_nll"][:, 0],
                             rtol=1e-6)


def test_shortlist_hits():
  shortlist = jnp.array([[4, 2, 7], [1, 0, 3], [5, 5, 6]])
  hits = metrics.shortlist_hits(shortlist, jnp.array([7, 2, 5]))
  np.testing.assert_array_equal(hits, [1.0, 0.0, 1.0])


def test_fastk_log_probs_outside_shortlist_use_pilot():
  # Token 1 is outside the shortlist and its float32 probability underflows
  # to 0, but the pilot's log-probability is exact.
  probs = jnp.array([[0.75, 0.25, 0.0], [0.5, 0.5, 0.0]])
  shortlist = jnp.array([[0, 1], [0, 1]])
  pilot_log_probs = jnp.array([-1.0, -200.0])
  log_probs = metrics.fastk_target_log_probs(
      probs, shortlist, pilot_log_probs, jnp.array([1, 2]))
  np.testing.assert_allclose(log_probs, [math.log(0.25), -200.0], rtol=1e-6)


def test_fastk_log_probs_match_decoding_distribution():
  num_heads, vocab, dim, rows, top_k = 3, 40, 8, 6, 5
  kernel = 0.5 * jax.random.normal(jax.random.key(0), (num_heads, vocab, dim))
  hidden = jax.random.normal(jax.random.key(1), (rows, dim))
  targets = jax.random.randint(jax.random.key(2), (rows,), 0, vocab)
  pilots = jnp.array([0, 1, 2, 0, 1, 2])
  fastk_step = jax.jit(lambda h, p: decoding.fastk_step(
      h, decoding.split_heads(kernel), p, top_k=top_k, combine="max"))
  step = fastk_step(hidden, pilots)
  np.testing.assert_allclose(jnp.sum(step.probs, axis=-1), 1.0, rtol=1e-5)
  head_log_probs = jax.nn.log_softmax(
      heads_lib.dense_logits(hidden, kernel), axis=-1)  # [N, P, V]
  pilot_target = head_log_probs[jnp.arange(rows), pilots, targets]
  log_probs = metrics.fastk_target_log_probs(step.probs, step.shortlist,
                                             pilot_target, targets)
  np.testing.assert_allclose(
      log_probs, jnp.log(step.probs[jnp.arange(rows), targets]), rtol=1e-5)


def test_unigram_add_one():
  log_probs = metrics.unigram_log_probs([3, 0, 1])  # 4 tokens, V = 3
  np.testing.assert_allclose(np.exp(log_probs), [4 / 7, 1 / 7, 2 / 7],
                             rtol=1e-6)


def test_token_buckets_edges():
  counts = [0, 9, 10, 99, 100, 999, 1000, 5000]
  np.testing.assert_array_equal(metrics.token_buckets(counts),
                                [0, 0, 1, 1, 2, 2, 3, 3])


def test_bucket_sums_skip_masked_tokens():
  per_token = {"tokens": jnp.ones(4), "x": jnp.array([1.0, 2.0, 3.0, 4.0]),
               "pair": jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0],
                                  [2.0, 2.0]])}
  sums = metrics.bucket_sums(per_token, jnp.array([0, 1, 1, 3]),
                             jnp.array([1.0, 1.0, 0.0, 1.0]))
  np.testing.assert_array_equal(sums["tokens"], [1, 1, 0, 1])
  np.testing.assert_array_equal(sums["x"], [1, 2, 0, 4])
  np.testing.assert_array_equal(sums["pair"], [[1, 0], [0, 1], [0, 0], [2, 2]])


def test_perplexity_edge_cases():
  assert metrics.perplexity(2 * math.log(4.0), 2) == pytest.approx(4.0)
  assert metrics.perplexity(1.0, 0) is None
  assert metrics.perplexity(1e6, 1) == math.inf


def _bucketed_sums():
  """Sums of 4 tokens with P = 2 and top_n = (1, 5), by hand.

  Bucket 0 has one token, bucket 1 none, bucket 2 one, bucket 3 two.
  """
  return {
      "tokens": np.array([1.0, 0.0, 1.0, 2.0]),
      "mixture_nll": np.array([2.0, 0.0, 1.0, 1.0]),
      "oracle_nll": np.array([1.0, 0.0, 0.5, 0.5]),
      "head_nll": np.array([[3.0, 1.0], [0, 0], [0.5, 2.0], [1.0, 1.5]]),
      "fastk_nll": np.array([2.5, 0.0, 1.0, 2.0]),
      "unigram_nll": np.array([5.0, 0.0, 3.0, 4.0]),
      "shortlist_hits": np.array([0.0, 0.0, 1.0, 2.0]),
      "mixture_top_n": np.array([[0, 1], [0, 0], [1, 1], [1, 2]], float),
      "head_top_n": np.array([[[0, 0], [0, 1]], [[0, 0], [0, 0]],
                              [[1, 1], [0, 1]], [[1, 2], [0, 1]]], float),
      "fastk_top_n": np.array([[0, 0], [0, 0], [1, 1], [0, 2]], float),
  }


def test_summarize_overall_and_buckets():
  results = metrics.summarize(_bucketed_sums(), top_n=(1, 5))
  assert results["tokens"] == 4
  assert results["perplexity"] == pytest.approx(math.exp(4.0 / 4))
  assert results["oracle_perplexity"] == pytest.approx(math.exp(2.0 / 4))
  assert results["fastk_perplexity"] == pytest.approx(math.exp(5.5 / 4))
  assert results["unigram_perplexity"] == pytest.approx(math.exp(12.0 / 4))
  np.testing.assert_allclose(results["per_head_perplexity"],
                             np.exp([4.5 / 4, 4.5 / 4]))
  # Equal totals: the tie goes to the lowest index.
  assert results["best_head"] == 0
  assert results["shortlist_recall"] == pytest.approx(3 / 4)
  assert results["top_n_accuracy"]["mixture"] == {"1": 0.5, "5": 1.0}
  assert results["top_n_accuracy"]["fastk"] == {"1": 0.25, "5": 0.75}
  assert results["top_n_accuracy"]["best_head"] == {"1": 0.5, "5": 0.75}
  assert results["top1_accuracy"] == 0.5
  assert results["fastk_top1_accuracy"] == 0.25

  buckets = results["buckets"]
  assert [b["name"] for b in buckets] == list(metrics.BUCKET_NAMES)
  assert [b["tokens"] for b in buckets] == [1, 0, 1, 2]
  assert [(b["min_count"], b["max_count"]) for b in buckets] == [
      (0, 10), (10, 100), (100, 1000), (1000, None)]
  assert buckets[0]["perplexity"] == pytest.approx(math.exp(2.0))
  assert buckets[3]["oracle_perplexity"] == pytest.approx(math.exp(0.25))
  assert buckets[3]["shortlist_recall"] == 1.0
  # An empty bucket has no metrics rather than zeros.
  assert buckets[1]["perplexity"] is None
  assert buckets[1]["top_n_accuracy"]["mixture"]["1"] is None
  # Buckets report the overall best head (0), not their own best.
  assert buckets[0]["top_n_accuracy"]["best_head"] == {"1": 0.0, "5": 0.0}


def test_summarize_best_head_lowest_nll():
  sums = _bucketed_sums()
  sums["head_nll"] = sums["head_nll"] + np.array([0.1, 0.0])
  assert metrics.summarize(sums, top_n=(1, 5))["best_head"] == 1


def test_eval_chunk_size():
  common = dict(num_heads=2, vocab_size=100, top_k=10, embed_dim=4)
  # 2 * max(100, 40) = 200 elements per token; 2000 allow 10 tokens, and 8
  # is the largest divisor of 64 up to 10.
  assert evaluate.eval_chunk_size(64, max_tokens=512, max_elements=2000,
                                  **common) == 8
  assert evaluate.eval_chunk_size(64, max_tokens=4, max_elements=10**9,
                                  **common) == 4
  assert evaluate.eval_chunk_size(64, max_tokens=512, max_elements=1,
                                  **common) == 1
  assert evaluate.eval_chunk_size(48, max_tokens=512, max_elements=10**9,
                                  **common) == 48


@pytest.fixture(scope="module")
def tiny_state(kjv_text_dir, tmp_path_factory):
  """A 3-head tiny model trained for 6 steps on the KJV books."""
  config = load_config("tiny", f"text_dir={kjv_text_dir},heads=3")
  workdir = str(tmp_path_factory.mktemp("metrics_run"))
  train.train_and_evaluate(config, workdir)
  return checkpointing.load_inference_state(workdir)


@pytest.fixture(scope="module")
def tiny_results(tiny_state):
  return evaluate.evaluate_state(tiny_state)


def _reference_nll(state):
  """Per-token mixture and oracle NLL from full logits of every window."""
  config = state.config
  tokens = evaluate.data_lib.load_eval_tokens(config, state.tokenizer, "test")
  inputs, targets, mask = evaluate.strided_windows(
      tokens, config.eval.context_length, config.eval.stride)
  hidden, _ = state.model(jnp.asarray(inputs))
  log_probs = np.asarray(jax.nn.log_softmax(state.model.logits(hidden), -1))
  nll = -np.take_along_axis(log_probs, targets[..., None, None], -1)[..., 0]
  num_heads = nll.shape[-1]
  mixture = -(np.logaddexp.reduce(-nll, axis=-1) - np.log(num_heads))
  scored = mask > 0
  return mixture[scored], nll.min(-1)[scored]


def test_tiny_model_bounds_and_reference(tiny_state, tiny_results):
  results = tiny_results
  num_heads = results["num_lm_heads"]
  assert num_heads == 3
  assert results["oracle_perplexity"] <= results["perplexity"] * (1 + 1e-6)
  assert results["perplexity"] <= num_heads * results["oracle_perplexity"]
  for bucket in results["buckets"]:
    if bucket["tokens"]:
      assert bucket["oracle_perplexity"] <= bucket["perplexity"] * (1 + 1e-6)
      assert bucket["perplexity"] <= num_heads * bucket["oracle_perplexity"]
  assert sum(b["tokens"] for b in results["buckets"]) == results["tokens"]
  assert results["tokens"] == 400 - 1  # eval.max_tokens = 400

  # The chunked, bucketed evaluation equals a direct full-logits computation.
  mixture, oracle = _reference_nll(tiny_state)
  assert results["perplexity"] == pytest.approx(math.exp(mixture.mean()),
                                                rel=1e-4)
  assert results["oracle_perplexity"] == pytest.approx(
      math.exp(oracle.mean()), rel=1e-4)

  # Fast-K and the other decoders.
  assert math.isfinite(results["fastk_perplexity"])
  assert results["decode"] == {"decoder": "fastk", "top_k": 5,
                               "pilot": "utilization", "pilot_head": 0,
                               "combine": "max"}
  assert 0.0 <= results["shortlist_recall"] <= 1.0
  for decoder in metrics.DECODERS:
    accuracy = [results["top_n_accuracy"][decoder][str(n)]
                for n in metrics.TOP_N]
    assert accuracy == sorted(accuracy), decoder
  assert results["top1_accuracy"] == results["top_n_accuracy"]["mixture"]["1"]
  assert results["per_head_perplexity"][results["best_head"]] == min(
      results["per_head_perplexity"])
  assert results["unigram_perplexity"] > 1.0

  table = evaluate.format_table(results)
  assert "[context 16, stride 8]" in table
  assert "oracle_perplexity" in table


def test_tiny_model_small_chunks_agree(tiny_state, tiny_results):
  # This bound allows 8 tokens of 3 * max(V, K * d) elements per chunk, so
  # each batch of 64 tokens becomes 8 chunks. The sums must not change.
  vocab_size = tiny_state.model.cfg.vocab_size
  chunked = evaluate.evaluate_state(
      tiny_state, max_chunk_elements=8 * 3 * max(vocab_size, 5 * 32))
  for key in ("perplexity", "oracle_perplexity", "fastk_perplexity",
              "shortlist_recall", "top1_accuracy"):
    assert chunked[key] == pytest.approx(tiny_results[key], rel=1e-5), key
