"""Training end to end on a tiny config: checkpoints, resume, NaN, evaluation."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from fastk_jax import checkpointing
from fastk_jax import evaluate
from fastk_jax import train

from conftest import load_config


def _tiny(text_dir, **overrides):
  return load_config("tiny", f"text_dir={text_dir}", **overrides)


def _params(workdir, step=None):
  state = checkpointing.load_inference_state(workdir, step)
  return nnx.state(state.model, nnx.Param), state


def test_train_checkpoint_evaluate(kjv_text_dir, tmp_path):
  workdir = str(tmp_path / "run")
  metrics = train.train_and_evaluate(_tiny(kjv_text_dir), workdir)
  assert metrics["step"] == 6
  assert np.isfinite(metrics["loss"])

  # Workdir contents: config, tokenizer, metrics, TensorBoard, checkpoints.
  for name in ("config.json", "metrics.jsonl", "tokenizer", "tensorboard"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train_records = [r for r in records if "loss" in r]
  assert [r["step"] for r in train_records] == [2, 4, 6]
  for key in ("oracle_nll", "win_rate", "learning_rate", "grad_norm",
              "tokens_per_sec"):
    assert key in train_records[-1]
  assert abs(sum(train_records[-1]["win_rate"]) - 1.0) < 1e-5

  results = evaluate.evaluate_workdir(workdir)
  with open(os.path.join(workdir, "eval", "step_6.json")) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(results))
  for key in ("step", "tokens", "context_length", "stride", "perplexity",
              "oracle_perplexity", "per_head_perplexity", "top1_accuracy"):
    assert key in saved, key
  num_heads = saved["num_lm_heads"]
  assert saved["oracle_perplexity"] <= saved["perplexity"] + 1e-6
  assert saved["perplexity"] <= num_heads * saved["oracle_perplexity"]
  assert saved["tokens"] == 400 - 1  # eval.max_tokens=400 tokens, 399 targets
  state = checkpointing.load_inference_state(workdir)
  assert state.win_counts.sum() == 6 * 8 * 16  # steps * batch * seq_len


def test_resume_matches_uninterrupted_run(kjv_text_dir, tmp_path):
  config = _tiny(kjv_text_dir, total_steps=6, checkpoint_every=100)
  straight = str(tmp_path / "straight")
  resumed = str(tmp_path / "resumed")
  train.train_and_evaluate(config, straight)

  first = train.train_and_evaluate(config, resumed, stop_at_step=4)
  assert first["step"] == 4
  assert checkpointing.make_manager(resumed, config).latest_step() == 4
  second = train.train_and_evaluate(config, resumed)
  assert second["step"] == 6

  # Same step, same data position: parameters agree with the straight run.
  params_a, state_a = _params(straight)
  params_b, state_b = _params(resumed)
  assert state_a.step == state_b.step == 6
  np.testing.assert_array_equal(state_a.win_counts, state_b.win_counts)
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_nan_stops_with_step_and_keeps_checkpoint(kjv_text_dir, tmp_path):
  workdir = str(tmp_path / "nan")
  config = _tiny(kjv_text_dir, total_steps=40, log_every=1, checkpoint_every=1)
  with config.unlocked():
    config.optimizer.learning_rate = 1e12
    config.optimizer.grad_clip_norm = 1e30
    config.optimizer.warmup_steps = 0
  with pytest.raises(train.TrainingDivergedError, match=r"at step (\d+)") as err:
    train.train_and_evaluate(config, workdir)
  bad_step = int(err.value.args[0].split("at step ")[1].split(";")[0])
  latest = checkpointing.make_manager(workdir, config).latest_step()
  assert latest == bad_step - 1
  params, _ = _params(workdir)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_evaluate_without_checkpoint_fails_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    checkpointing.load_inference_state(str(tmp_path))


def test_strided_windows_score_each_target_once():
  tokens = np.arange(23)
  inputs, targets, mask = evaluate.strided_windows(tokens, 8, 3)
  scored = targets[mask > 0]
  np.testing.assert_array_equal(np.sort(scored), np.arange(1, 23))
  # After the first window each scored token has at least 8 - 3 of context.
  for window in range(1, len(inputs)):
    first_scored = int(np.argmax(mask[window] > 0))
    assert first_scored >= 8 - 3 - 1
  np.testing.assert_array_equal(targets[0][:7], inputs[0][1:8])


def test_batch_not_divisible_by_devices(kjv_text_dir, tmp_path):
  config = _tiny(kjv_text_dir, batch_size=jax.device_count() * 8 + 1)
  if jax.device_count() == 1:
    config = _tiny(kjv_text_dir, **{"mesh.shape": (2, 1, 1)})
  with pytest.raises(ValueError, match="config.(batch_size|mesh.shape)"):
    train.train_and_evaluate(config, str(tmp_path / "bad"))


def test_unfinished_save_is_ignored_on_resume(kjv_text_dir, tmp_path):
  # A kill during a save leaves Orbax's temporary directory behind. The
  # restart must resume from the newest finished step and drop the leftover.
  workdir = str(tmp_path / "killed")
  config = _tiny(kjv_text_dir, total_steps=6)
  train.train_and_evaluate(config, workdir, stop_at_step=3)
  leftover = os.path.join(workdir, "checkpoints", "5.orbax-checkpoint-tmp-1234")
  os.makedirs(os.path.join(leftover, "params"))
  with open(os.path.join(leftover, "params", "partial"), "w") as f:
    f.write("truncated")
  assert checkpointing.make_manager(workdir, config, read_only=True).latest_step() == 3

  metrics = train.train_and_evaluate(config, workdir)
  assert metrics["step"] == 6
  assert not os.path.exists(leftover)


def test_resume_with_other_model_rejected(kjv_text_dir, tmp_path):
  workdir = str(tmp_path / "mismatch")
  train.train_and_evaluate(_tiny(kjv_text_dir, total_steps=3), workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    stored = f.read()

  other = _tiny(kjv_text_dir, total_steps=3, **{"model.num_lm_heads": 3})
  with pytest.raises(ValueError, match=r"config.model.num_lm_heads=2.*sets 3"):
    train.train_and_evaluate(other, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read() == stored  # the good run's config is untouched
  assert checkpointing.load_inference_state(workdir).step == 3


def test_missing_step_lists_available(kjv_text_dir, tmp_path):
  workdir = str(tmp_path / "steps")
  train.train_and_evaluate(_tiny(kjv_text_dir), workdir)
  with pytest.raises(FileNotFoundError, match=r"step 7 .*available steps: \[3, 6\]"):
    checkpointing.load_inference_state(workdir, step=7)
