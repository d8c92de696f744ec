"""Train a multi-head GPT with the winner-take-all loss.

Usage:
  python -m fastk_jax.train --config=configs/demo.py --workdir=workdirs/demo
  python -m fastk_jax.train --config=configs/demo.py:heads=8 \
      --config.total_steps=200 --workdir=workdirs/demo_p8

Running the same command again resumes from the newest checkpoint in the
workdir, at the same step and data position.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from fastk_jax import checkpointing
from fastk_jax import logs
from fastk_jax import config_lib
from fastk_jax import data as data_lib
from fastk_jax import distributed
from fastk_jax import metric_writers
from fastk_jax import model as model_lib
from fastk_jax import sharding as sharding_lib
from fastk_jax import tokenizer as tokenizer_lib
from fastk_jax import vocab_parallel

FLAGS = flags.FLAGS

class TrainingDivergedError(FloatingPointError):
  """The loss became NaN or Inf."""


def make_optimizer(opt_config, total_steps: int):
  """AdamW with linear warmup, cosine decay and global-norm clipping.

  Returns:
    (optax transformation, learning-rate schedule).
  """
  warmup = min(opt_config.warmup_steps, max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_config.learning_rate,
      warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
      end_value=opt_config.learning_rate * opt_config.end_learning_rate_factor)
  # Decay matrices only: biases, LayerNorm parameters get no weight decay.
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  tx = optax.chain(
      optax.clip_by_global_norm(opt_config.grad_clip_norm),
      optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2,
                  weight_decay=opt_config.weight_decay, mask=decay_mask),
  )
  return tx, schedule


def loss_metrics(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Summed statistics of one batch from the loss's per-head NLL.

  Returns sums, not means, so that several batches (and devices) add up.
  """
  nll, mask = aux["nll"], aux["mask"]  # [N, P], [N]
  num_heads = nll.shape[-1]
  oracle = jnp.min(nll, axis=-1)
  # Proper uniform mixture: -log(1/P * sum_p exp(-nll_p)).
  mixture = -jax.nn.logsumexp(-nll, axis=-1) + jnp.log(num_heads)
  wins = jax.nn.one_hot(aux["winner"], num_heads) * mask[:, None]
  return {
      "tokens": jnp.sum(mask),
      "oracle_nll_sum": jnp.sum(oracle * mask),
      "mixture_nll_sum": jnp.sum(mixture * mask),
      "head_nll_sum": jnp.sum(nll * mask[:, None], axis=0),  # [P]
      "wins": jnp.sum(wins, axis=0),  # [P]
  }


def make_train_step(graphdef, config, tx, mesh=None, rules=None):
  """Return the (unjitted) train step: (params, opt_state, batch, key) -> ...

  With a `mesh`, parameters split over the batch axes (FSDP) are gathered
  before the forward pass (`sharding.gather_for_compute`), and when the
  `rules` shard the heads' vocabulary the loss runs vocabulary-parallel
  (`vocab_parallel.sharded_wta_loss`).
  """
  cfg = config.model
  dtype = model_lib.ModelConfig.from_config(cfg, 1).compute_dtype
  deterministic = cfg.dropout == 0.0

  def loss_fn(params, batch, key):
    if mesh is not None:
      params = sharding_lib.gather_for_compute(params, mesh, rules)
    model = nnx.merge(graphdef, params)
    hidden, _ = model(batch["inputs"], deterministic=deterministic,
                      rngs=nnx.Rngs(dropout=key))  # [B, T, d]
    kernel, bias = model.lm_heads.weights()
    return vocab_parallel.wta_loss_on_mesh(
        hidden, kernel, bias, batch["targets"], batch.get("mask"),
        mesh=mesh, rules=rules, epsilon=config.loss.wta_epsilon,
        chunk_size=config.loss.chunk_size, dtype=dtype)

  def train_step(params, opt_state, batch, key):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = loss_metrics(aux)
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.tree.norm(grads)
    return params, opt_state, metrics

  return train_step


def make_eval_step(graphdef, config, mesh=None, rules=None):
  """Return the eval step: (params, batch) -> summed loss statistics."""
  dtype = model_lib.ModelConfig.from_config(config.model, 1).compute_dtype

  def eval_step(params, batch):
    if mesh is not None:
      params = sharding_lib.gather_for_compute(params, mesh, rules)
    model = nnx.merge(graphdef, params)
    hidden, _ = model(batch["inputs"])
    kernel, bias = model.lm_heads.weights()
    _, aux = vocab_parallel.wta_loss_on_mesh(
        hidden, kernel, bias, batch["targets"], batch.get("mask"),
        mesh=mesh, rules=rules, chunk_size=config.loss.chunk_size, dtype=dtype)
    return loss_metrics(aux)

  return eval_step


def summarize(sums: dict[str, np.ndarray], prefix: str = "") -> dict[str, Any]:
  """Turn summed statistics into mean NLLs, perplexities and win rates."""
  tokens = max(float(sums["tokens"]), 1.0)
  out = {
      f"{prefix}oracle_nll": float(sums["oracle_nll_sum"]) / tokens,
      f"{prefix}mixture_nll": float(sums["mixture_nll_sum"]) / tokens,
      f"{prefix}head_nll": (np.asarray(sums["head_nll_sum"]) / tokens).tolist(),
      f"{prefix}win_rate": (np.asarray(sums["wins"]) / tokens).tolist(),
  }
  out[f"{prefix}perplexity"] = math.exp(min(out[f"{prefix}mixture_nll"], 50.0))
  out[f"{prefix}oracle_perplexity"] = math.exp(min(out[f"{prefix}oracle_nll"], 50.0))
  return out


class StopRequest:
  """Turns SIGTERM and the first SIGINT into a request to save and stop.

  TPU VMs and SLURM send SIGTERM before preemption. A second SIGINT raises
  KeyboardInterrupt at once; Orbax's unfinished save is then discarded.

  With several processes all of them must stop after the same step, or the
  others wait forever in the next step's collectives. `jax.distributed` runs
  a preemption service that catches SIGTERM and agrees on a stop step in the
  background, so `requested` only reads a local flag. A Python SIGTERM
  handler would replace the service's, so only SIGINT gets one, and it
  forwards the signal to the service as a SIGTERM. Without the service
  (`jax_enable_preemption_service` off), the processes compare their flags
  with an all-gather every `sync_every` steps.
  """

  def __init__(self, sync_every: int = 10):
    self.signal_name = None
    self.sync_every = sync_every
    self._previous = {}
    self._use_preemption_service = False

  def __enter__(self):
    self._use_preemption_service = (
        jax.process_count() > 1 and jax.distributed.is_initialized()
        and jax.config.jax_enable_preemption_service)
    signals = (signal.SIGINT,) if self._use_preemption_service else (
        signal.SIGTERM, signal.SIGINT)
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name
    logging.warning("Received %s: saving a checkpoint and stopping.",
                    self.signal_name)
    if self._use_preemption_service:
      os.kill(os.getpid(), signal.SIGTERM)

  def requested(self, step: int) -> bool:
    """Return True on every process, after the same step, once one got a signal.

    Every process must call it after every step, with the number of steps
    done so far.
    """
    if jax.process_count() == 1:
      return self.signal_name is not None
    from jax.experimental import multihost_utils
    if self._use_preemption_service:
      stop = multihost_utils.reached_preemption_sync_point(step)
    elif step % self.sync_every == 0:
      flags_all = multihost_utils.process_allgather(
          np.int32(self.signal_name is not None))
      stop = bool(np.any(flags_all))
    else:
      stop = False
    if stop and self.signal_name is None:
      # The preemption service reports a SIGTERM to any process, this one
      # included, without naming it.
      self.signal_name = ("a preemption notice" if self._use_preemption_service
                          else "a signal to another process")
    return stop


def _first_bad_step(pending: list[tuple[int, jax.Array]]) -> int | None:
  for step, loss in pending:
    if not np.isfinite(float(loss)):
      return step
  return None


def train_and_evaluate(config, workdir: str, stop_at_step: int | None = None
                       ) -> dict[str, Any]:
  """Train (or resume) until `config.total_steps`; return the last metrics.

  `stop_at_step` ends this run early, after saving a checkpoint, as if the job
  had been interrupted there; the learning-rate schedule still follows
  `config.total_steps`.
  """
  workdir = os.path.abspath(workdir)
  config_lib.validate_config(config)
  logging.info("Training in %s on %d devices (%d processes).", workdir,
               jax.device_count(), jax.process_count())

  # Mesh first: the batch must split evenly over the data axes.
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.rules_from_config(config.mesh)
  sharding_lib.log_unused_rules(mesh, rules)
  divisor = sharding_lib.batch_divisor(mesh, rules)
  if config.batch_size % divisor or config.batch_size % jax.process_count():
    raise ValueError(
        f"Invalid config.batch_size={config.batch_size}: it must be divisible "
        f"by the {divisor} batch shards of mesh {dict(mesh.shape)} and by "
        f"{jax.process_count()} processes; change the batch size or the mesh.")

  # A rerun in the same workdir must match the stored run before anything
  # (tokenizer, config.json) is written there.
  checkpointing.check_resume_compatible(workdir, config)

  # Tokenizer: loaded from the workdir when resuming, else built and saved.
  tokenizer = tokenizer_lib.get_or_create_tokenizer(config, workdir)
  vocab_size = tokenizer.vocab_size
  config_lib.validate_config(config, vocab_size)
  checkpointing.save_config(workdir, config)

  # Model and optimizer, created directly with their target shardings.
  create = functools.partial(model_lib.create_model, config.model, vocab_size,
                             config.seed)
  graphdef, abstract_params = nnx.split(nnx.eval_shape(create))
  param_shardings = sharding_lib.state_shardings(abstract_params, mesh, rules)
  params = jax.jit(lambda: nnx.split(create())[1],
                   out_shardings=param_shardings)()
  tx, schedule = make_optimizer(config.optimizer, config.total_steps)
  opt_shardings = sharding_lib.optimizer_shardings(tx, abstract_params, mesh,
                                                   rules)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  logging.info("Model: %.2fM parameters, P=%d heads, vocabulary %d.",
               num_params / 1e6, config.model.num_lm_heads, vocab_size)

  # Data, then the newest checkpoint if there is one (it moves the iterator).
  train_iter = data_lib.make_train_iterator(config, tokenizer, split="train")
  manager = checkpointing.make_manager(workdir, config)
  start_step, tokens_seen = 0, 0
  win_counts = np.zeros(config.model.num_lm_heads, np.int64)
  latest = manager.latest_step()
  if latest is not None:
    restored = checkpointing.restore(
        manager, latest,
        params_target=checkpointing.abstract_with_shardings(params, param_shardings),
        opt_state_target=checkpointing.abstract_with_shardings(opt_state, opt_shardings),
        data_iterator=train_iter)
    params, opt_state = restored["params"], restored["opt_state"]
    start_step = int(restored["meta"]["step"])
    tokens_seen = int(restored["meta"].get("tokens_seen", 0))
    win_counts = np.asarray(restored["meta"]["win_counts"], np.int64)
    logging.info("Resuming at step %d.", start_step)

  # Compile the steps with explicit shardings; donation reuses the buffers.
  batch_sharding = sharding_lib.batch_sharding(mesh, rules)
  replicated = sharding_lib.replicated(mesh)
  train_step = jax.jit(
      make_train_step(graphdef, config, tx, mesh, rules),
      in_shardings=(param_shardings, opt_shardings, batch_sharding, replicated),
      out_shardings=(param_shardings, opt_shardings, replicated),
      donate_argnums=(0, 1))
  eval_step = jax.jit(make_eval_step(graphdef, config, mesh, rules),
                      in_shardings=(param_shardings, batch_sharding),
                      out_shardings=replicated)

  def validate(params) -> dict[str, Any]:
    val_iter = data_lib.make_train_iterator(config, tokenizer, split="validation",
                                            seed=config.seed)
    sums = None
    for _ in range(config.eval_steps):
      batch = sharding_lib.make_global_batch(next(val_iter), batch_sharding)
      batch_sums = jax.device_get(eval_step(params, batch))
      sums = batch_sums if sums is None else jax.tree.map(np.add, sums, batch_sums)
    return summarize(sums, prefix="val_")

  def save(step: int, force: bool = False):
    meta = {"step": step, "tokens_seen": tokens_seen,
            "win_counts": win_counts.tolist(),
            "num_lm_heads": config.model.num_lm_heads}
    checkpointing.save(manager, step, params=params, opt_state=opt_state,
                       meta=meta, data_iterator=train_iter, force=force)

  writer = metric_writers.MetricWriter(workdir)
  base_key = jax.random.key(config.seed)
  tokens_per_step = config.batch_size * config.data.seq_len
  pending = []  # (step, device loss) not yet checked for NaN.
  interval_metrics = []
  last_metrics: dict[str, Any] = {}
  interval_start, interval_first_step = time.time(), start_step
  run_start = time.time()

  logging.info("Starting training loop at step %d of %d.", start_step,
               config.total_steps)
  with StopRequest() as stop:
    step = start_step
    while step < config.total_steps:
      # One training step. The dropout key depends only on the step, so a
      # resumed run draws the same masks.
      batch = sharding_lib.make_global_batch(next(train_iter), batch_sharding)
      key = jax.random.fold_in(base_key, step)
      params, opt_state, metrics = train_step(params, opt_state, batch, key)
      step += 1
      tokens_seen += tokens_per_step
      pending.append((step, metrics["loss"]))
      interval_metrics.append(metrics)

      is_last = step == config.total_steps
      stopping = stop.requested(step) or step == stop_at_step
      log_now = step % config.log_every == 0 or is_last or stopping
      save_now = step % config.checkpoint_every == 0 or is_last or stopping

      # NaN check before anything is logged or saved, naming the exact step.
      if config.nan_check and (log_now or save_now):
        bad_step = _first_bad_step(pending)
        if bad_step is not None:
          manager.wait_until_finished()
          raise TrainingDivergedError(
              f"Loss is NaN or Inf at step {bad_step}; the newest good "
              f"checkpoint is step {manager.latest_step()} in {workdir}. Lower "
              "config.optimizer.learning_rate or use model.dtype=float32.")
        pending.clear()

      # Training metrics: sums over the interval, then rates and ETA.
      if log_now:
        fetched = jax.device_get(interval_metrics)
        sums = {k: np.sum([m[k] for m in fetched], axis=0)
                for k in ("tokens", "oracle_nll_sum", "mixture_nll_sum",
                          "head_nll_sum", "wins")}
        win_counts += np.rint(sums["wins"]).astype(np.int64)
        elapsed = time.time() - interval_start
        steps_done = step - interval_first_step
        steps_per_sec = steps_done / max(elapsed, 1e-9)
        eta_min = (config.total_steps - step) / max(steps_per_sec, 1e-9) / 60
        last_metrics = {
            "loss": float(np.mean([m["loss"] for m in fetched])),
            "grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
            "learning_rate": float(schedule(step - 1)),
            "tokens_per_sec": steps_done * tokens_per_step / max(elapsed, 1e-9),
            "steps_per_sec": steps_per_sec,
            **summarize(sums),
        }
        writer.write(step, last_metrics)
        logging.info(
            "[%d/%d] loss %.4f  oracle nll %.4f  mixture ppl %.2f  "
            "wins %s  lr %.2e  %.0f tok/s  ETA %.1f min",
            step, config.total_steps, last_metrics["loss"],
            last_metrics["oracle_nll"], last_metrics["perplexity"],
            np.round(last_metrics["win_rate"], 3).tolist(),
            last_metrics["learning_rate"], last_metrics["tokens_per_sec"],
            eta_min)
        interval_metrics.clear()
        interval_start, interval_first_step = time.time(), step

      # Periodic validation on the validation split.
      if step % config.eval_every == 0 or is_last:
        val_metrics = validate(params)
        writer.write(step, val_metrics)
        last_metrics.update(val_metrics)
        logging.info("[%d] validation perplexity %.2f, oracle perplexity %.2f",
                     step, val_metrics["val_perplexity"],
                     val_metrics["val_oracle_perplexity"])

      if save_now:
        save(step, force=stopping)
      if stopping:
        logging.warning("Stopped at step %d (%s).", step,
                        stop.signal_name or "--stop_at_step")
        break

  manager.wait_until_finished()
  manager.close()
  writer.close()
  last_metrics["step"] = step
  # The signal that stopped training early (e.g. "SIGINT"), or None.
  last_metrics["stop_signal"] = stop.signal_name
  last_metrics["train_minutes"] = (time.time() - run_start) / 60
  logging.info("Training stopped at step %d after %.1f minutes.", step,
               last_metrics["train_minutes"])
  return last_metrics


def define_flags() -> None:
  """Define the command-line flags (only when run as a program).

  Defining them at import time would clash with the flags of other entry
  points that import this module, such as `fastk_jax.main`.
  """
  config_flags.DEFINE_config_file(
      "config", None, "Training config file, e.g. configs/demo.py:heads=4.",
      lock_config=True)
  flags.DEFINE_string(
      "workdir", None, "Directory for checkpoints, logs, tokenizer and config.json.")
  flags.DEFINE_integer(
      "stop_at_step", None,
      "Save and stop at this step, keeping the schedule of config.total_steps.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  distributed.initialize_from_flags()
  logs.quiet_library_logs()
  train_and_evaluate(FLAGS.config, FLAGS.workdir, FLAGS.stop_at_step)


if __name__ == "__main__":
  define_flags()
  app.run(logs.exit_on_input_error(main))
