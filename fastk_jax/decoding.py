"""Fast-K decoding: a pilot head's Top-K shortlist, rescored by every head.

Per step and sequence, with P heads over a vocabulary of V tokens:

1. The pilot head computes its full logits `[V]` and takes the Top-K
   shortlist S with `jax.lax.top_k`.
2. Every head scores only the K tokens of S by gathering K weight rows
   (`gather_shortlist_logits`), so a step costs O(V·d + P·K·d) instead of
   O(P·V·d).
3. Each head's softmax is renormalised over S:
   r_h(v) = p_h(v) / sum_{u in S} p_h(u). The "max" combine scores a token by
   max_h r_h(v), the "mean" combine by mean_h r_h(v), and q is that score
   normalised over S.
4. The next-token distribution over the whole vocabulary is
     p(v) = m_S · q(v)   for v in S, with m_S = sum_{u in S} p_pilot(u),
     p(v) = p_pilot(v)   for v outside S,
   so it sums to m_S + (1 - m_S) = 1.

Greedy decoding takes the argmax of p, which lies in S. The K entries of S
share mass m_S, so the largest is at least m_S / K. No token outside S has a
larger pilot probability than the smallest one inside, which is at most
m_S / K. Under "max" the greedy token is the best (head, token) pair over S.
Sampling draws from p with a temperature and an optional top-p nucleus.

The dense decoder applies the same rule with S = the whole vocabulary (every
head at full V, m_S = 1), so Fast-K with K = V makes the same choices.

Generation runs the whole decode loop in one compiled `lax.while_loop` over a
KV cache, for a batch of left-padded prompts of different lengths.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from fastk_jax import config_lib
from fastk_jax import heads as heads_lib

# Prompts are left-padded to a multiple of this many tokens, so prompts of
# similar length share one compiled generation loop.
_PROMPT_LENGTH_BUCKET = 16


# ---------------------------------------------------------------------------
# Settings and validation.


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """Decoding options: a hashable copy of `config.decode`, static under jit."""
  decoder: str = "fastk"
  top_k: int = 50
  pilot: str = "utilization"
  pilot_head: int = 0
  combine: str = "max"
  temperature: float = 0.0
  top_p: float = 1.0
  max_new_tokens: int = 64
  seed: int = 0

  @classmethod
  def from_config(cls, decode_config) -> DecodeSettings:
    """Copy the fields of `config.decode`. Absent fields keep their defaults.

    Configs saved before `combine` and `seed` existed lack those fields.
    """
    values = {}
    for field in dataclasses.fields(cls):
      if field.name not in decode_config:
        continue
      value = decode_config[field.name]
      try:
        values[field.name] = type(field.default)(value)
      except (TypeError, ValueError) as err:
        raise ValueError(
            f"Invalid config.decode.{field.name}={value!r}: expected a "
            f"{type(field.default).__name__}.") from err
    return cls(**values)

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def _check(condition: bool, field: str, value, fix: str) -> None:
  if not condition:
    raise ValueError(f"Invalid config.decode.{field}={value!r}: {fix}")


def validate_decode_settings(settings: DecodeSettings, vocab_size: int,
                             num_heads: int) -> None:
  """Raise one ValueError for the first invalid decoding option.

  The message names the `config.decode` field, its value and the fix. Call it
  before tracing: inside a compiled loop a bad head index would be clamped
  silently and a bad K would fail deep inside `lax.top_k`.
  """
  _check(settings.decoder in config_lib.DECODERS, "decoder", settings.decoder,
         f"choose one of {', '.join(config_lib.DECODERS)}.")
  _check(settings.pilot in config_lib.PILOT_STRATEGIES, "pilot", settings.pilot,
         f"choose one of {', '.join(config_lib.PILOT_STRATEGIES)}.")
  _check(0 <= settings.pilot_head < num_heads, "pilot_head",
         settings.pilot_head,
         f"must name a head in [0, {num_heads}) because the model has "
         f"model.num_lm_heads={num_heads}.")
  _check(settings.top_k >= 1, "top_k", settings.top_k,
         "K is the shortlist size and must be at least 1.")
  _check(settings.top_k <= vocab_size, "top_k", settings.top_k,
         f"K cannot exceed the vocabulary size {vocab_size}; lower it "
         f"(K = {vocab_size} makes Fast-K equal to the dense decoder).")
  _check(settings.combine in config_lib.COMBINE_RULES, "combine",
         settings.combine,
         f"choose one of {', '.join(config_lib.COMBINE_RULES)}.")
  _check(settings.temperature >= 0.0, "temperature", settings.temperature,
         "use 0 for greedy decoding or a positive temperature.")
  _check(0.0 < settings.top_p <= 1.0, "top_p", settings.top_p,
         "use a nucleus mass in (0, 1]; 1 disables top-p filtering.")
  _check(settings.max_new_tokens >= 1, "max_new_tokens",
         settings.max_new_tokens, "generate at least 1 token.")


def validate_decode_config(config, vocab_size: int,
                           num_heads: int | None = None) -> DecodeSettings:
  """Validate `config.decode` and return it as `DecodeSettings`.

  Args:
    config: the full config (`config.decode` and `config.model`).
    vocab_size: V, from the tokenizer.
    num_heads: P; defaults to `config.model.num_lm_heads`.

  Raises:
    ValueError: naming the first invalid field, its value and the fix.
  """
  if num_heads is None:
    num_heads = config.model.num_lm_heads
  settings = DecodeSettings.from_config(config.decode)
  validate_decode_settings(settings, vocab_size, num_heads)
  return settings


# ---------------------------------------------------------------------------
# Head weights and the pilot's logits.


class HeadWeights(NamedTuple):
  """LM head weights in the two layouts that decoding reads.

  `kernel` `[P, V, d]` feeds the K-row gather and the dense projection.
  `per_head` contains the same heads as P separate `[V, d]` arrays for the
  pilot's full logits: XLA:CPU (jax 0.10.2) copies `kernel[p]` into a new
  buffer before a matmul, because it does not fuse a slice into a dot. At
  d=768, V=50257 on a 2-core CPU that copy made one head's logits cost 42 ms
  instead of 5.0 ms. Build `per_head` once, outside the decode loop, with
  `split_heads`. That costs one extra copy of the heads in memory.
  """
  kernel: jax.Array
  bias: jax.Array | None
  per_head: tuple[jax.Array, ...]


def split_heads(kernel, bias=None) -> HeadWeights:
  """Return `HeadWeights` for a `[P, V, d]` kernel and `[P, V]` bias or None."""
  per_head = tuple(kernel[p] for p in range(kernel.shape[0]))
  return HeadWeights(kernel, bias, per_head)


def _single_head_logits(hidden, weights: HeadWeights, head: int, dtype):
  """Compute head `head`'s logits `[N, V]` (float32) from hidden `[N, d]`."""
  weight = weights.per_head[head]  # [V, d]
  logits = jax.lax.dot_general(
      hidden.astype(dtype), weight.astype(dtype), (((1,), (1,)), ((), ())),
      preferred_element_type=jnp.float32)
  if weights.bias is not None:
    logits = logits + weights.bias[head].astype(jnp.float32)
  return logits


def pilot_logits(hidden, weights: HeadWeights, pilot_heads,
                 dtype=jnp.float32):
  """Compute each row's pilot head logits.

  A scalar pilot selects one head with `lax.switch`, so the step reads one
  `[V, d]` head. Per-row pilots loop over the P heads and skip, with
  `lax.cond`, every head that no row uses: the cost is one head's matmul per
  distinct pilot, at most the dense cost. Gathering `kernel[pilot_heads]`
  instead would copy `[N, V, d]`; docs/benchmarks.md compares the options.

  Args:
    hidden: `[N, d]` hidden states.
    weights: from `split_heads`.
    pilot_heads: int scalar (one pilot for every row) or `[N]` ints. Indices
      outside [0, P) are clamped to it.
    dtype: compute dtype of the matmul.

  Returns:
    `[N, V]` float32 logits.
  """
  num_heads = len(weights.per_head)
  pilot_heads = jnp.clip(jnp.asarray(pilot_heads, jnp.int32), 0, num_heads - 1)
  if num_heads == 1:
    return _single_head_logits(hidden, weights, 0, dtype)

  if pilot_heads.ndim == 0:
    branches = [functools.partial(_single_head_logits, head=p, dtype=dtype)
                for p in range(num_heads)]
    return jax.lax.switch(pilot_heads, branches, hidden, weights)

  vocab_size = weights.per_head[0].shape[0]
  logits = jnp.zeros((hidden.shape[0], vocab_size), jnp.float32)  # [N, V]
  for head in range(num_heads):
    rows = pilot_heads == head  # [N]

    def use_head(logits, head=head, rows=rows):
      head_logits = _single_head_logits(hidden, weights, head, dtype)
      return jnp.where(rows[:, None], head_logits, logits)

    logits = jax.lax.cond(jnp.any(rows), use_head, lambda x: x, logits)
  return logits


def gather_shortlist_logits(hidden, kernel, bias, token_ids,
                            dtype=jnp.float32):
  """Score every head on each row's `[N, K]` tokens: `heads.gather_logits`."""
  return heads_lib.gather_logits(hidden, kernel, bias, token_ids, dtype)


# ---------------------------------------------------------------------------
# One decoding step.


class StepOutput(NamedTuple):
  """Outputs of one decoding step for N rows."""
  probs: jax.Array  # [N, V] the next-token distribution. Rows sum to 1.
  shortlist: jax.Array  # [N, K] the pilot's Top-K token ids, best first.
  # [N, P] entropy (nats) of each head's distribution renormalised over the
  # shortlist. The lowest_entropy pilot reads it.
  head_entropy: jax.Array
  greedy_token: jax.Array  # [N] argmax of `probs`.
  greedy_head: jax.Array  # [N] `token_head` at `greedy_token`, in O(P).
  # [N, V] the head credited with each token: the one giving it the highest
  # renormalised probability. Fast-K credits tokens outside the shortlist to
  # the pilot, the only head that scored them. Under jit, XLA drops this
  # O(V) array when only `greedy_head` is used.
  token_head: jax.Array


def combine_heads(head_probs, combine: str):
  """Combine per-head distributions `[N, P, C]` into one `[N, C]`.

  "max" scores a candidate by its best head, "mean" by the heads' average. The
  result is normalised over the C candidates.
  """
  if combine == "max":
    score = jnp.max(head_probs, axis=1)
  elif combine == "mean":
    score = jnp.mean(head_probs, axis=1)
  else:
    raise ValueError(
        f"Invalid combine rule {combine!r}: choose one of "
        f"{', '.join(config_lib.COMBINE_RULES)} (config.decode.combine).")
  return score / jnp.sum(score, axis=-1, keepdims=True)


def shortlist_entropy(shortlist_logits):
  """Return each head's entropy `[N, P]` from shortlist logits `[N, P, K]`."""
  log_probs = jax.nn.log_softmax(shortlist_logits, axis=-1)
  return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def fastk_step(hidden, weights: HeadWeights, pilot_heads, *, top_k: int,
               combine: str = "max", dtype=jnp.float32) -> StepOutput:
  """Run the Fast-K rule (module docstring) on hidden states `[N, d]`."""
  num_rows = hidden.shape[0]
  rows = jnp.arange(num_rows)[:, None]  # [N, 1]

  logits = pilot_logits(hidden, weights, pilot_heads, dtype)  # [N, V]
  top_logits, shortlist = jax.lax.top_k(logits, top_k)  # [N, K]
  shortlist_logits = gather_shortlist_logits(
      hidden, weights.kernel, weights.bias, shortlist, dtype)  # [N, P, K]
  head_log_probs = jax.nn.log_softmax(shortlist_logits, axis=-1)  # [N, P, K]
  head_probs = jnp.exp(head_log_probs)
  shortlist_q = combine_heads(head_probs, combine)  # [N, K]

  # m_S: the pilot's full-softmax mass on the shortlist.
  pilot_log_z = jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # [N, 1]
  shortlist_mass = jnp.exp(
      jax.nn.logsumexp(top_logits, axis=-1, keepdims=True) - pilot_log_z)
  probs = jnp.exp(logits - pilot_log_z)  # [N, V]
  probs = probs.at[rows, shortlist].set(shortlist_mass * shortlist_q)

  best = jnp.argmax(shortlist_q, axis=-1)  # [N]
  greedy_token = jnp.take_along_axis(shortlist, best[:, None], axis=-1)[:, 0]
  shortlist_heads = jnp.argmax(head_probs, axis=1).astype(jnp.int32)  # [N, K]
  greedy_head = jnp.take_along_axis(
      shortlist_heads, best[:, None], axis=-1)[:, 0]

  pilots = jnp.broadcast_to(jnp.asarray(pilot_heads, jnp.int32), (num_rows,))
  token_head = jnp.broadcast_to(pilots[:, None], probs.shape)
  token_head = token_head.at[rows, shortlist].set(shortlist_heads)

  head_entropy = -jnp.sum(head_probs * head_log_probs, axis=-1)  # [N, P]
  return StepOutput(probs, shortlist, head_entropy,
                    greedy_token.astype(jnp.int32), greedy_head, token_head)


def dense_step(hidden, weights: HeadWeights, pilot_heads, *, top_k: int,
               combine: str = "max", dtype=jnp.float32) -> StepOutput:
  """Run the combine rule over the whole vocabulary with every head.

  The pilot only defines the shortlist (for shortlist recall and the
  lowest_entropy pilot), so it does not change `probs`.
  """
  num_rows = hidden.shape[0]
  logits = heads_lib.dense_logits(
      hidden, weights.kernel, weights.bias, dtype)  # [N, P, V]
  head_probs = jax.nn.softmax(logits, axis=-1)  # [N, P, V]
  probs = combine_heads(head_probs, combine)  # [N, V]

  pilots = jnp.broadcast_to(jnp.asarray(pilot_heads, jnp.int32), (num_rows,))
  pilots = jnp.clip(pilots, 0, logits.shape[1] - 1)
  pilot_row = jnp.take_along_axis(
      logits, pilots[:, None, None], axis=1)[:, 0]  # [N, V]
  _, shortlist = jax.lax.top_k(pilot_row, top_k)  # [N, K]
  shortlist_logits = jnp.take_along_axis(
      logits, shortlist[:, None, :], axis=-1)  # [N, P, K]

  greedy_token = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  greedy_head = jnp.argmax(jnp.take_along_axis(
      head_probs, greedy_token[:, None, None], axis=-1)[..., 0], axis=-1)
  token_head = jnp.argmax(head_probs, axis=1).astype(jnp.int32)  # [N, V]
  return StepOutput(probs, shortlist, shortlist_entropy(shortlist_logits),
                    greedy_token, greedy_head.astype(jnp.int32), token_head)


def decode_step(hidden, weights: HeadWeights, pilot_heads, *, decoder: str,
                top_k: int, combine: str = "max",
                dtype=jnp.float32) -> StepOutput:
  """Run `fastk_step` or `dense_step` (`decoder` is "fastk" or "dense")."""
  if decoder == "fastk":
    step_fn = fastk_step
  elif decoder == "dense":
    step_fn = dense_step
  else:
    raise ValueError(
        f"Invalid decoder {decoder!r}: choose one of "
        f"{', '.join(config_lib.DECODERS)} (config.decode.decoder).")
  return step_fn(hidden, weights, pilot_heads, top_k=top_k, combine=combine,
                 dtype=dtype)


def next_token_distribution(hidden, kernel, bias=None, *, decoder: str,
                            top_k: int, pilot_heads, combine: str = "max",
                            dtype=jnp.float32):
  """Compute the distribution a decoder samples from, for teacher forcing.

  Fast-K's memory is dominated by the gathered rows, P·N·K·d floats, so keep
  N (the tokens per call) small enough for that.

  Args:
    hidden: `[N, d]` final hidden states.
    kernel: `[P, V, d]` head weights. Each head is copied once per call (see
      `HeadWeights`); loops should call `decode_step` with `split_heads`.
    bias: `[P, V]` or None.
    decoder: "fastk" or "dense".
    top_k: K, the shortlist size, in [1, V].
    pilot_heads: int scalar or `[N]` pilot per row (from
      `teacher_forced_pilots`).
    combine: "max" or "mean".
    dtype: compute dtype of the matmuls.

  Returns:
    (probs `[N, V]` float32 summing to 1 per row, shortlist `[N, K]` ids of the
    pilot's Top-K). For the dense decoder the shortlist is still the pilot's
    Top-K, so shortlist recall is defined for both.

  Raises:
    ValueError: for an unknown decoder or combine rule, or K outside [1, V].
  """
  vocab_size = kernel.shape[1]
  if not 1 <= top_k <= vocab_size:
    raise ValueError(
        f"Invalid top_k={top_k}: K must be in [1, {vocab_size}], the "
        "vocabulary size (config.decode.top_k).")
  weights = split_heads(kernel, bias)
  out = decode_step(hidden, weights, pilot_heads, decoder=decoder,
                    top_k=top_k, combine=combine, dtype=dtype)
  return out.probs, out.shortlist


# ---------------------------------------------------------------------------
# Sampling.


def top_p_filter(logits, top_p: float):
  """Set logits outside the top-p nucleus to -inf.

  The nucleus is the smallest set of highest-probability tokens whose mass
  reaches `top_p`, so the most likely token is always kept. Sorts all V
  tokens.
  """
  sorted_logits = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)  # [N, V]
  sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  keep = mass_before < top_p
  threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1,
                      keepdims=True)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample_tokens(key, probs, temperature: float, top_p: float = 1.0):
  """Sample one token per row from probs^(1/temperature), top-p filtered.

  Args:
    key: a JAX PRNG key.
    probs: `[N, V]` distribution.
    temperature: > 0.
    top_p: nucleus mass in (0, 1]; 1 keeps every token.

  Returns:
    `[N]` int32 token ids.
  """
  logits = jnp.log(probs) / temperature  # log(0) = -inf is never drawn.
  if top_p < 1.0:
    logits = top_p_filter(logits, top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------
# Pilot strategies.


def utilization_pilot(win_counts) -> int:
  """Return the head with the most training wins (lowest index on ties).

  Without win counts (None or empty) every head has zero wins, so head 0.
  """
  if win_counts is None or len(win_counts) == 0:
    return 0
  return int(np.argmax(np.asarray(win_counts)))


def round_robin_pilot(step, num_heads: int):
  """Return the pilot for decode step `step` (0, 1, ...): heads in turn."""
  return jnp.asarray(step, jnp.int32) % num_heads


def lowest_entropy_pilot(head_entropy):
  """Return each row's lowest-entropy head `[B]` from entropies `[B, P]`.

  Ties go to the lowest index.
  """
  return jnp.argmin(head_entropy, axis=-1).astype(jnp.int32)


def select_pilot(strategy: str, *, step, num_heads: int, pilot_head: int,
                 utilization_head: int, previous_entropy=None):
  """Return the pilot for one decode step.

  Args:
    strategy: a name in `config_lib.PILOT_STRATEGIES`.
    step: decode step, 0 for the first generated token (int or traced).
    num_heads: P.
    pilot_head: the fixed strategy's head.
    utilization_head: the head with the most training wins.
    previous_entropy: `[B, P]` shortlist entropies of the previous step; only
      lowest_entropy reads it.

  Returns:
    An int32 scalar (one pilot for every row) or, for lowest_entropy, `[B]`.
  """
  if strategy == "fixed":
    return jnp.int32(pilot_head)
  if strategy == "round_robin":
    return round_robin_pilot(step, num_heads)
  if strategy == "utilization":
    return jnp.int32(utilization_head)
  if strategy == "lowest_entropy":
    # Step 0 has no previous shortlist, so it falls back to utilization.
    return jnp.where(jnp.asarray(step) == 0, jnp.int32(utilization_head),
                     lowest_entropy_pilot(previous_entropy))
  raise ValueError(
      f"Invalid pilot strategy {strategy!r}: choose one of "
      f"{', '.join(config_lib.PILOT_STRATEGIES)} (config.decode.pilot).")


def teacher_forced_pilots(hidden, kernel, bias=None, *, pilot: str,
                          top_k: int, pilot_head: int = 0, win_counts=None,
                          dtype=jnp.float32):
  """Return the pilot head for every position of teacher-forced sequences.

  Position t plays the role of decode step t. round_robin uses t mod P. For
  lowest_entropy the pilot at t is the head with the lowest entropy over the
  shortlist at t - 1. That shortlist came from the pilot at t - 1, so the
  positions are scanned in order, and each position costs one pilot head's
  matmul per distinct pilot in the batch. Position 0 falls back to
  utilization.

  Args:
    hidden: `[B, T, d]` hidden states.
    kernel: `[P, V, d]` head weights.
    bias: `[P, V]` or None.
    pilot: a name in `config_lib.PILOT_STRATEGIES`.
    top_k: K.
    pilot_head: head for the fixed strategy.
    win_counts: `[P]` training wins (a concrete array, not traced).
    dtype: compute dtype of the matmuls.

  Returns:
    `[B, T]` int32 pilot heads.
  """
  batch, length, _ = hidden.shape
  num_heads = kernel.shape[0]
  start = utilization_pilot(win_counts)
  if pilot in ("fixed", "round_robin", "utilization"):
    pilots = select_pilot(pilot, step=jnp.arange(length), num_heads=num_heads,
                          pilot_head=pilot_head, utilization_head=start)
    return jnp.broadcast_to(pilots, (batch, length)).astype(jnp.int32)
  if pilot != "lowest_entropy":
    select_pilot(pilot, step=0, num_heads=num_heads, pilot_head=pilot_head,
                 utilization_head=start)  # Raises the ValueError.

  weights = split_heads(kernel, bias)

  def scan_position(pilots, hidden_t):  # pilots [B], hidden_t [B, d]
    logits = pilot_logits(hidden_t, weights, pilots, dtype)  # [B, V]
    _, shortlist = jax.lax.top_k(logits, top_k)  # [B, K]
    shortlist_logits = gather_shortlist_logits(
        hidden_t, kernel, bias, shortlist, dtype)  # [B, P, K]
    next_pilots = lowest_entropy_pilot(shortlist_entropy(shortlist_logits))
    return next_pilots, pilots

  first = jnp.full((batch,), start, jnp.int32)
  _, pilots = jax.lax.scan(scan_position, first, jnp.swapaxes(hidden, 0, 1))
  return jnp.swapaxes(pilots, 0, 1)  # [B, T]


# ---------------------------------------------------------------------------
# Compiled generation.


@dataclasses.dataclass
class GenerationOutput:
  """Generated tokens for a batch of prompts, as NumPy arrays."""
  tokens: np.ndarray  # [B, max_new_tokens], repeating EOS after a row's EOS.
  num_tokens: np.ndarray  # [B] tokens generated per row, the EOS included.
  heads: np.ndarray  # [B, max_new_tokens] credited head, -1 once stopped.
  pilots: np.ndarray  # [B, max_new_tokens] pilot head, -1 once stopped.
  compile_seconds: float  # Tracing and compiling (near 0 when cached).
  decode_seconds: float  # Running the compiled prefill and decode loop.


def left_pad(prompts: Sequence[Sequence[int]], multiple: int = 1,
             pad_id: int = 0):
  """Left-pad token lists into `[B, L]`, L a multiple of `multiple`.

  Returns:
    (tokens `[B, L]` int32, lengths `[B]` int32 unpadded prompt lengths).
  """
  lengths = np.array([len(p) for p in prompts], np.int32)
  padded_length = -(-int(lengths.max()) // multiple) * multiple
  tokens = np.full((len(prompts), padded_length), pad_id, np.int32)
  for row, prompt in enumerate(prompts):
    if len(prompt):
      tokens[row, padded_length - len(prompt):] = prompt
  return tokens, lengths


def _generate_loop(params, tokens, lengths, key, utilization_head, eos_id, *,
                   graphdef, settings: DecodeSettings, vocab_sharding=None):
  """Prefill the KV cache with the prompts, then decode in a while loop.

  `vocab_sharding` is None or (mesh, mesh axis) when the heads' vocabulary is
  split over that axis; Fast-K steps then run `vocab_parallel.sharded_fastk_step`.
  """
  model = nnx.merge(graphdef, params)
  dtype = model.cfg.compute_dtype
  num_heads = model.cfg.num_lm_heads
  batch, prompt_slots = tokens.shape
  max_new = settings.max_new_tokens

  # Row b's prompt fills slots [pad_b, prompt_slots). Pad slots are never
  # attention keys, and positions count from the first real token.
  cache_len = prompt_slots + max_new
  pad = prompt_slots - lengths  # [B]
  kv_mask = jnp.arange(cache_len)[None, :] >= pad[:, None]  # [B, S]
  positions = jnp.maximum(jnp.arange(prompt_slots)[None, :] - pad[:, None], 0)
  cache = model.init_cache(batch, cache_len)
  hidden, cache = model(tokens, positions=positions, kv_mask=kv_mask,
                        cache=cache, cache_index=jnp.int32(0))
  last_hidden = hidden[:, -1]  # [B, d]. The last slot is real in every row.

  kernel, bias = model.lm_heads.weights()
  weights = split_heads(kernel, bias)  # Copied once, not per step.
  fill_token = jnp.maximum(eos_id, 0)

  def keep_going(carry):
    step, done = carry["step"], carry["done"]
    return (step < max_new) & ~jnp.all(done)

  def decode_one(carry):
    step, done = carry["step"], carry["done"]
    pilots = select_pilot(
        settings.pilot, step=step, num_heads=num_heads,
        pilot_head=settings.pilot_head, utilization_head=utilization_head,
        previous_entropy=carry["entropy"])
    if vocab_sharding is not None and settings.decoder == "fastk":
      from fastk_jax import vocab_parallel  # Imports this module.
      mesh, axis = vocab_sharding
      out = vocab_parallel.sharded_fastk_step(
          carry["hidden"], kernel, bias, pilots, top_k=settings.top_k,
          mesh=mesh, axis=axis, combine=settings.combine, dtype=dtype)
    else:
      out = decode_step(carry["hidden"], weights, pilots,
                        decoder=settings.decoder, top_k=settings.top_k,
                        combine=settings.combine, dtype=dtype)
    if settings.greedy:
      token, head = out.greedy_token, out.greedy_head
    else:
      step_key = jax.random.fold_in(key, step)
      token = sample_tokens(step_key, out.probs, settings.temperature,
                            settings.top_p)
      head = jnp.take_along_axis(out.token_head, token[:, None], axis=-1)[:, 0]

    token = jnp.where(done, fill_token, token)  # [B]
    head = jnp.where(done, -1, head)
    pilots = jnp.where(done, -1, jnp.broadcast_to(pilots, (batch,)))
    new_done = done | (token == eos_id)

    hidden, cache = model(
        token[:, None], positions=(lengths + step)[:, None], kv_mask=kv_mask,
        cache=carry["cache"], cache_index=prompt_slots + step)
    return {
        "step": step + 1,
        "done": new_done,
        "hidden": hidden[:, 0],
        "cache": cache,
        "entropy": out.head_entropy,
        "num_tokens": carry["num_tokens"] + (~done).astype(jnp.int32),
        "tokens": carry["tokens"].at[:, step].set(token),
        "heads": carry["heads"].at[:, step].set(head),
        "pilots": carry["pilots"].at[:, step].set(pilots),
    }

  carry = {
      "step": jnp.int32(0),
      "done": jnp.zeros((batch,), bool),
      "hidden": last_hidden,
      "cache": cache,
      "entropy": jnp.zeros((batch, num_heads), jnp.float32),
      "num_tokens": jnp.zeros((batch,), jnp.int32),
      "tokens": jnp.full((batch, max_new), fill_token, jnp.int32),
      "heads": jnp.full((batch, max_new), -1, jnp.int32),
      "pilots": jnp.full((batch, max_new), -1, jnp.int32),
  }
  # NOTE: the last iteration also runs the trunk on its token, whose hidden
  # state is never used: one extra trunk step per call.
  carry = jax.lax.while_loop(keep_going, decode_one, carry)
  return carry["tokens"], carry["num_tokens"], carry["heads"], carry["pilots"]


_generate_jit = jax.jit(_generate_loop,
                        static_argnames=("graphdef", "settings",
                                         "vocab_sharding"))


def generate(model, prompts: Sequence[Sequence[int]], decode_config, *,
             win_counts=None, eos_id: int | None = None, mesh=None,
             rules=None) -> GenerationOutput:
  """Generate continuations of a batch of token prompts.

  Args:
    model: a `model.GPT`.
    prompts: B token lists, each non-empty; lengths may differ.
    decode_config: `config.decode` or `DecodeSettings`.
    win_counts: `[P]` training wins per head, for the utilization and
      lowest_entropy pilots; None counts as no wins (head 0).
    eos_id: a row stops after generating this token; None never stops early.
    mesh: optional device mesh. The parameters are placed on it with the
      shardings of `rules`, and when the rules split the vocabulary, Fast-K
      runs its vocabulary-sharded step, which moves only K candidates per
      row between devices. The prompts are replicated.
    rules: logical axis rules for `mesh` (`sharding.rules_from_config`).

  Returns:
    A `GenerationOutput`.

  Raises:
    ValueError: for invalid settings, an empty prompt, or prompts too long
      for `model.max_len` with `max_new_tokens` new tokens.
  """
  settings = decode_config
  if not isinstance(settings, DecodeSettings):
    settings = DecodeSettings.from_config(decode_config)
  cfg = model.cfg
  validate_decode_settings(settings, cfg.vocab_size, cfg.num_lm_heads)
  if not prompts:
    raise ValueError("No prompts given. Pass at least one token list.")
  for i, prompt in enumerate(prompts):
    if not len(prompt):
      raise ValueError(
          f"Prompt {i} is empty, but every prompt needs at least one token "
          "(GPT-2 starts unconditional samples from the end-of-text token).")
  longest = max(len(p) for p in prompts)
  if longest + settings.max_new_tokens > cfg.max_len:
    raise ValueError(
        f"A prompt of {longest} token(s) plus config.decode.max_new_tokens="
        f"{settings.max_new_tokens} exceeds the position table "
        f"(model.max_len={cfg.max_len}); shorten the prompt or lower "
        "max_new_tokens.")

  tokens, lengths = left_pad(prompts, _PROMPT_LENGTH_BUCKET)
  graphdef, params = nnx.split(model)
  vocab_sharding = None
  if mesh is not None:
    from fastk_jax import sharding as sharding_lib
    from fastk_jax import vocab_parallel
    params = jax.device_put(
        params, sharding_lib.state_shardings(params, mesh, rules))
    axis = vocab_parallel.vocab_axis(mesh, rules, model.lm_heads.kernel.shape)
    if axis is not None:
      vocab_sharding = (mesh, axis)
  args = (params, tokens, lengths, jax.random.key(settings.seed),
          np.int32(utilization_pilot(win_counts)),
          np.int32(-1 if eos_id is None else eos_id))

  start = time.perf_counter()
  compiled = _generate_jit.lower(
      *args, graphdef=graphdef, settings=settings,
      vocab_sharding=vocab_sharding).compile()
  compiled_at = time.perf_counter()
  outputs = jax.device_get(compiled(*args))
  finished_at = time.perf_counter()

  out_tokens, num_tokens, out_heads, out_pilots = (
      np.asarray(x) for x in outputs)
  logging.info("Generated %d tokens for %d prompts in %.2f s (compile %.2f s).",
               int(num_tokens.sum()), len(prompts), finished_at - compiled_at,
               compiled_at - start)
  return GenerationOutput(out_tokens, num_tokens, out_heads, out_pilots,
                          compiled_at - start, finished_at - compiled_at)
