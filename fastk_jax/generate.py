"""Generate text from a trained workdir with Fast-K or dense decoding.

Usage:
  python -m fastk_jax.generate --workdir=workdirs/demo \
      --prompt="To be, or not to be" --prompt="And God said" \
      [--decoder=fastk] [--top_k=50] [--pilot=utilization] \
      [--temperature=0.8] [--top_p=0.95] [--max_new_tokens=64] [--seed=0]

Options left unset take their value from the checkpoint's `config.decode`.
Prints each prompt's continuation and a one-line summary (tokens/s, decoder,
K, pilot).
"""

from __future__ import annotations

import sys
from typing import Sequence

import ml_collections
from absl import app, flags, logging

from fastk_jax import decoding
from fastk_jax import logs

FLAGS = flags.FLAGS

# Flags whose value, when set, replaces the field of config.decode.
_DECODE_FLAGS = ("decoder", "top_k", "pilot", "pilot_head", "combine",
                 "temperature", "top_p", "max_new_tokens", "seed")


def define_flags() -> None:
  """Define the command-line flags (only when run as a program).

  Defining them at import time would clash with `fastk_jax.main`, which
  imports this module and has its own --workdir and --prompt.
  """
  flags.DEFINE_string("workdir", None, "Training workdir to load.")
  flags.DEFINE_multi_string(
      "prompt", None, "Prompt text; repeat the flag for a batch of prompts.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.DEFINE_enum("decoder", None, ["fastk", "dense"],
                    "Decoder (default: config.decode.decoder).")
  flags.DEFINE_integer("top_k", None, "K, the pilot's shortlist size.")
  flags.DEFINE_enum(
      "pilot", None, ["fixed", "round_robin", "utilization", "lowest_entropy"],
      "Pilot strategy.")
  flags.DEFINE_integer("pilot_head", None, "Head for --pilot=fixed.")
  flags.DEFINE_enum("combine", None, ["max", "mean"],
                    "How the heads' shortlist distributions combine.")
  flags.DEFINE_float("temperature", None,
                     "Sampling temperature; 0 decodes greedily.")
  flags.DEFINE_float("top_p", None,
                     "Nucleus mass in (0, 1]. 1 disables top-p filtering.")
  flags.DEFINE_integer("max_new_tokens", None,
                       "Maximum tokens generated per prompt.")
  flags.DEFINE_integer("seed", None, "Sampling seed.")
  flags.DEFINE_list(
      "mesh_shape", None,
      "Generate on a device mesh of this (data, fsdp, tensor) shape, e.g. "
      "1,1,8; -1 takes the remaining devices. Default: one device.")
  flags.DEFINE_string(
      "mesh_preset", "tp",
      "Sharding preset for --mesh_shape (sharding.PRESETS); tp splits the "
      "vocabulary over the tensor axis.")
  flags.mark_flags_as_required(["workdir"])


def encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_tokens: int
                   ) -> list[list[int]]:
  """Tokenize prompts for `decoding.generate`.

  An empty prompt becomes the end-of-text token alone, the usual start of an
  unconditional GPT-2 sample. A prompt longer than `max_prompt_tokens` keeps
  its last `max_prompt_tokens` tokens.
  """
  encoded = []
  for i, text in enumerate(prompts):
    ids = tokenizer.encode(text) or [tokenizer.eos_id]
    if len(ids) > max_prompt_tokens:
      logging.warning("Prompt %d has %d tokens; keeping the last %d so that "
                      "the continuation fits model.max_len.", i, len(ids),
                      max_prompt_tokens)
      ids = ids[-max_prompt_tokens:]
    encoded.append(ids)
  return encoded


def generate_batch(state, prompts: Sequence[str], decode_config, *,
                   mesh=None, rules=None
                   ) -> tuple[list[str], decoding.GenerationOutput]:
  """Generate continuations and return (texts, raw `GenerationOutput`).

  Args:
    state: a `checkpointing.InferenceState` (model, tokenizer, win_counts).
    prompts: prompt strings.
    decode_config: `config.decode` or `decoding.DecodeSettings`.
    mesh: optional device mesh to generate on (see `decoding.generate`).
    rules: logical axis rules for `mesh`.
  """
  settings = decode_config
  if not isinstance(settings, decoding.DecodeSettings):
    settings = decoding.DecodeSettings.from_config(decode_config)
  tokenizer = state.tokenizer
  max_prompt_tokens = max(1, state.model.cfg.max_len - settings.max_new_tokens)
  token_prompts = encode_prompts(tokenizer, prompts, max_prompt_tokens)
  output = decoding.generate(
      state.model, token_prompts, settings, win_counts=state.win_counts,
      eos_id=tokenizer.eos_id, mesh=mesh, rules=rules)

  texts = []
  for row in range(len(prompts)):
    ids = output.tokens[row, :output.num_tokens[row]].tolist()
    if ids and ids[-1] == tokenizer.eos_id:
      ids = ids[:-1]
    texts.append(tokenizer.decode(ids))
  return texts, output


def generate_text(state, prompts: Sequence[str], decode_config) -> list[str]:
  """Return the generated continuation of each prompt (EOS not included)."""
  texts, _ = generate_batch(state, prompts, decode_config)
  return texts


def decode_config_with_overrides(decode_config, overrides
                                 ) -> ml_collections.ConfigDict:
  """Return a copy of `decode_config` with the non-None `overrides` set."""
  result = ml_collections.ConfigDict(decode_config.to_dict())
  for name, value in overrides.items():
    if value is not None:
      result[name] = value
  return result


def format_summary(output: decoding.GenerationOutput,
                   settings: decoding.DecodeSettings, num_heads: int) -> str:
  """Return the one-line speed and settings summary."""
  num_tokens = int(output.num_tokens.sum())
  rate = num_tokens / max(output.decode_seconds, 1e-9)
  sampling = ("greedy" if settings.greedy else
              f"temperature={settings.temperature} top_p={settings.top_p}")
  return (f"{num_tokens} tokens in {output.decode_seconds:.2f} s "
          f"({rate:.1f} tokens/s, compile {output.compile_seconds:.1f} s); "
          f"decoder={settings.decoder} K={settings.top_k} "
          f"pilot={settings.pilot} combine={settings.combine} P={num_heads} "
          f"{sampling}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.prompt:
    raise app.UsageError("Give at least one --prompt.")
  logs.quiet_library_logs()

  # Imported here so that importing this module (for generate_text) does not
  # pull in Orbax.
  from fastk_jax import checkpointing  # pylint: disable=g-import-not-at-top

  state = checkpointing.load_inference_state(FLAGS.workdir, FLAGS.step)
  overrides = {name: FLAGS[name].value for name in _DECODE_FLAGS}
  decode_config = decode_config_with_overrides(state.config.decode, overrides)
  settings = decoding.DecodeSettings.from_config(decode_config)
  mesh = rules = None
  if FLAGS.mesh_shape:
    from fastk_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
    mesh_config = ml_collections.ConfigDict(state.config.mesh.to_dict())
    mesh_config.shape = tuple(int(size) for size in FLAGS.mesh_shape)
    mesh_config.preset = FLAGS.mesh_preset
    mesh_config.rules = ()
    mesh = sharding_lib.make_mesh(mesh_config)
    rules = sharding_lib.rules_from_config(mesh_config)
  try:
    texts, output = generate_batch(state, FLAGS.prompt, settings, mesh=mesh,
                                   rules=rules)
  except ValueError as err:
    # Invalid decoding options: print the message alone, without a traceback.
    sys.exit(f"Error: {err}")

  for i, (prompt, text) in enumerate(zip(FLAGS.prompt, texts)):
    print(f"[{i}] {prompt}")
    print(f"--> {text}")
    print()
  print(format_summary(output, settings, state.model.cfg.num_lm_heads))


if __name__ == "__main__":
  define_flags()
  app.run(main)
