"""fastk_jax.analyze: information measures by hand, and a real tiny run."""

import json
import math
import os

import numpy as np
import pytest

from fastk_jax import analyze
from fastk_jax import data as data_lib
from fastk_jax import train

from conftest import load_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_entropy_bits():
  assert analyze.entropy_bits([5, 5]) == pytest.approx(1.0)
  assert analyze.entropy_bits([1, 1, 1, 1]) == pytest.approx(2.0)
  assert analyze.entropy_bits([7, 0]) == 0.0
  assert analyze.entropy_bits([]) == 0.0
  assert analyze.entropy_bits([1, 3]) == pytest.approx(
      -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)))


@pytest.mark.parametrize("a, b, expected", [
    ([0, 0, 1, 1], [0, 0, 1, 1], 1.0),  # B is a copy of a fair bit.
    ([0, 1, 0, 1], [0, 0, 1, 1], 0.0),  # Independent.
    ([0, 0, 0, 0], [0, 1, 2, 3], 0.0),  # A constant carries nothing.
    ([0, 1, 2, 3], [9, 8, 7, 6], 2.0),  # A bijection of 4 equal values.
    # H(B) = 0.811 and H(B | A) = 0.5, so I = 0.311 bits.
    ([0, 0, 1, 1], [0, 1, 1, 1],
     0.25 + 0.25 * math.log2(2 / 3) + 0.5 * math.log2(4 / 3)),
])
def test_mutual_information_bits(a, b, expected):
  assert analyze.mutual_information_bits(a, b) == pytest.approx(expected, abs=1e-12)
  assert analyze.mutual_information_bits(b, a) == pytest.approx(expected, abs=1e-12)


def test_mutual_information_shape_mismatch():
  with pytest.raises(ValueError, match="equal shape"):
    analyze.mutual_information_bits([0, 1], [0, 1, 2])


def test_plugin_bias_bits():
  # Two values each, 4 samples: 1 * 1 / (2 * 4 * ln 2).
  assert analyze.plugin_bias_bits([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(
      1 / (8 * math.log(2)))
  assert analyze.plugin_bias_bits([0, 0], [1, 2]) == 0.0


class _WordTokenizer:
  """Token i decodes to WORDS[i]; encode accepts only whole entries."""
  WORDS = [" the", " cat", "s", " sat", "\n", " on"]

  def decode(self, ids):
    return "".join(self.WORDS[i] for i in ids)

  def encode(self, text):
    return [self.WORDS.index(text)] if text in self.WORDS else [0, 0]


def test_word_token_id_prefers_leading_space():
  tok = _WordTokenizer()
  assert analyze.word_token_id(tok, "cat") == 1
  assert analyze.word_token_id(tok, "s") == 2  # No " s": the bare form.
  assert analyze.word_token_id(tok, "dog") is None


def test_context_snippet_marks_word():
  tok = _WordTokenizer()
  tokens = np.array([0, 1, 2, 3, 4, 5, 0])
  snippet = analyze.context_snippet(tok, tokens, 3, before=2, after=2)
  assert snippet == " cats« sat» ↵  on"


def test_ambiguous_words_pick_spread_words():
  tok = _WordTokenizer()
  # " the" (0) always head 0; " cat" (1) split between heads; "s" (2) is
  # spread too but is not a whole word.
  targets = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3])
  winners = np.array([0, 0, 0, 0, 0, 1, 0, 1, 0, 1, 1])
  picked = analyze.ambiguous_words(tok, targets, winners, 2, num_words=2,
                                   candidates=10)
  assert picked == [1, 0]


@pytest.fixture(scope="module")
def trained_workdir(kjv_text_dir, tmp_path_factory):
  config = load_config("tiny", f"text_dir={kjv_text_dir},heads=3,steps=8")
  workdir = str(tmp_path_factory.mktemp("analyze_run"))
  train.train_and_evaluate(config, workdir)
  return workdir


def test_analysis_report_on_trained_workdir(trained_workdir):
  results = analyze.analyze_workdir(trained_workdir, num_words=4, examples=2)
  directory = os.path.join(trained_workdir, "analysis")
  for name in ("report.md", "analysis.json", "winners.npz", "win_rates.png",
               "word_heads.png"):
    assert os.path.exists(os.path.join(directory, name)), name
  for name in ("win_rates.png", "word_heads.png"):
    with open(os.path.join(directory, name), "rb") as f:
      assert f.read(8) == PNG_MAGIC, name

  assert results["num_lm_heads"] == 3
  assert results["tokens"] == 400 - 1  # tiny: eval.max_tokens = 400
  assert sum(results["test_wins"]) == results["tokens"]
  assert 0.0 <= results["utilization_entropy_bits"] <= math.log2(3) + 1e-9
  # I(W; X) <= H(W) for both measures.
  for key in ("mi_head_target_bits", "mi_head_previous_bits"):
    assert 0.0 <= results[key] <= results["utilization_entropy_bits"] + 1e-9
  assert len(results["words"]) == 4
  assert results["words_picked_from_data"]

  # Example contexts are real text of the evaluated split.
  with open(os.path.join(trained_workdir, "analysis", "analysis.json")) as f:
    saved = json.load(f)
  assert saved["words"][0]["contexts"]
  from fastk_jax import checkpointing
  state = checkpointing.load_inference_state(trained_workdir)
  text = state.tokenizer.decode(
      data_lib.load_eval_tokens(state.config, state.tokenizer, "test").tolist())
  for word in results["words"]:
    assert sum(word["wins"]) == word["count"]
    for snippets in word["contexts"].values():
      for snippet in snippets:
        plain = snippet.replace("«", "").replace("»", "").replace(" ↵ ", "\n")
        assert plain in text, snippet

  report = open(os.path.join(directory, "report.md")).read()
  assert "![Win rate of each head during training](win_rates.png)" in report
  assert "![Winning head per word](word_heads.png)" in report
  assert "Plug-in estimates" in report
  assert "«" in report

  winners = np.load(os.path.join(directory, "winners.npz"))
  assert winners["winner"].shape == (results["tokens"],)
  assert winners["nll"].shape == (results["tokens"], 3)
  np.testing.assert_array_equal(winners["winner"],
                                np.argmin(winners["nll"], axis=-1))


def test_analysis_with_word_list(trained_workdir):
  results = analyze.analyze_workdir(
      trained_workdir, words=["the", "and", "zzzqqq"], examples=1)
  assert [w["text"].strip() for w in results["words"]] == ["the", "and"]
  assert results["unknown_words"] == ["zzzqqq"]
  assert not results["words_picked_from_data"]
  report = open(os.path.join(trained_workdir, "analysis", "report.md")).read()
  assert "zzzqqq" in report
