"""The main job: train, checkpoint, evaluate and generate, in one command.

  python -m fastk_jax.main --config=configs/demo.py --workdir=workdirs/demo

Each stage is also its own command (`fastk_jax.train`, `fastk_jax.evaluate`,
`fastk_jax.generate`). Rerunning resumes training from the newest checkpoint;
a finished run goes straight to evaluation and generation.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from fastk_jax import checkpointing
from fastk_jax import distributed
from fastk_jax import logs
from fastk_jax import evaluate as evaluate_lib
from fastk_jax import generate as generate_lib
from fastk_jax import train as train_lib

FLAGS = flags.FLAGS


def run(config, workdir: str, prompts) -> dict:
  """Train, evaluate on the test split and generate; return a summary."""
  start = time.time()

  train_metrics = train_lib.train_and_evaluate(config, workdir)
  if train_metrics.get("stop_signal"):
    # Interrupted (Ctrl-C, SIGTERM): the checkpoint is saved, so stop here
    # instead of spending minutes on evaluation of an unfinished model.
    print(f"Training stopped at step {train_metrics['step']} by "
          f"{train_metrics['stop_signal']}. Rerun the same command to resume.")
    return {"workdir": os.path.abspath(workdir),
            "step": train_metrics["step"],
            "stop_signal": train_metrics["stop_signal"]}

  # Evaluate and generate from what was saved, exactly as a later user would.
  state = checkpointing.load_inference_state(workdir)
  results = evaluate_lib.evaluate_state(state)
  evaluate_lib.write_results(workdir, results)
  print(evaluate_lib.format_table(results))

  # Generation with Fast-K and with the dense reference (every head at full
  # vocabulary), so the two can be compared on the same prompts. The main job
  # shortens max_new_tokens to fit the position table instead of failing.
  longest_prompt = max(len(state.tokenizer.encode(p)) for p in prompts)
  room = max(state.model.cfg.max_len - max(longest_prompt, 1), 1)
  max_new_tokens = min(state.config.decode.max_new_tokens, room)
  if max_new_tokens < state.config.decode.max_new_tokens:
    logging.info("Generating %d tokens per prompt: the position table has %d "
                 "slots.", max_new_tokens, state.model.cfg.max_len)
  for decoder in ("fastk", "dense"):
    decode_config = generate_lib.decode_config_with_overrides(
        state.config.decode,
        {"decoder": decoder, "max_new_tokens": max_new_tokens})
    texts = generate_lib.generate_text(state, prompts, decode_config)
    label = (f"fastk (K={decode_config.top_k}, pilot={decode_config.pilot}, "
             f"combine={decode_config.combine})" if decoder == "fastk" else
             f"dense (all heads, combine={decode_config.combine})")
    for prompt, text in zip(prompts, texts):
      print(f"\n--- {label}\n{prompt}{text}")

  summary = {
      "workdir": os.path.abspath(workdir),
      "step": results["step"],
      "minutes": (time.time() - start) / 60,
      "train_minutes": train_metrics.get("train_minutes"),
      "perplexity": results["perplexity"],
      "oracle_perplexity": results["oracle_perplexity"],
      "unigram_perplexity": results.get("unigram_perplexity"),
      "fastk_perplexity": results.get("fastk_perplexity"),
  }
  logging.info("Main job finished: %s", json.dumps(summary))
  print("\nSummary:", json.dumps(summary, indent=2))
  return summary


def define_flags() -> None:
  """Define the command-line flags (only when run as a program)."""
  config_flags.DEFINE_config_file(
      "config", None, "Config file, e.g. configs/demo.py:heads=4.",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory of the run.")
  flags.DEFINE_multi_string(
      "prompt", ["KING HENRY:", "And God said"],
      "Prompt for the generation stage; repeat the flag for several.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.quiet_library_logs()
  distributed.initialize_from_flags()
  run(FLAGS.config, FLAGS.workdir, FLAGS.prompt)


if __name__ == "__main__":
  define_flags()
  app.run(logs.exit_on_input_error(main))
