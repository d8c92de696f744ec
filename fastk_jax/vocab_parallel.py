"""Fast-K decoding and the winner-take-all loss with the vocabulary sharded.

When a mesh axis shards the LM heads' vocabulary dimension (the "tp" and
"fsdp_tp" presets), each device stores `kernel[:, shard, :]`, a
`[P, V / n, d]` slice. Every operation that reads the whole vocabulary has a
sharded form in which only per-token results cross devices:

* top-k: a local `lax.top_k` per shard, global ids = local id + shard index *
  V_local, an `all_gather` of the K candidates (values and ids) and a final
  top-k over the n * K candidates;
* log-sum-exp: a `pmax` of the local maxima, then a `psum` of the local sums
  of exponentials;
* reading K given tokens (a row gather or the gold logit): each shard fills in
  the tokens it owns, zeros elsewhere, and a `psum` adds the shards.

No collective moves a `[..., V]` tensor. Functions named `local_*` run inside
`jax.shard_map` on one shard and take the mesh axis name. The other public
functions wrap them in `jax.shard_map` and take global arrays.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from fastk_jax import heads as heads_lib
from fastk_jax import loss as loss_lib
from fastk_jax import sharding as sharding_lib

# A mesh axis name, or a tuple of names that together shard one dimension.
AxisName = str | tuple[str, ...]


def vocab_axis(mesh: Mesh, rules,
               kernel_shape: Sequence[int]) -> AxisName | None:
  """Return the mesh axis that shards the heads' vocabulary, or None.

  Applies the same rules as the parameter shardings to the `[P, V, d]` head
  kernel, so it returns None whenever the vocabulary stays whole. That
  happens without a rule for "vocab", with a mesh axis of size 1, with an
  axis already taken by the heads dimension, or when the axis size does not
  divide V.
  """
  spec = sharding_lib.logical_to_spec(
      ("lm_heads", "vocab", "embed"), tuple(kernel_shape), mesh, rules)
  return spec[1]


def batch_axes(mesh: Mesh, rules, vocab: AxisName | None) -> tuple[str, ...]:
  """Return the mesh axes that split the batch, minus the vocabulary's axes.

  A mesh axis cannot shard both the tokens and the vocabulary inside one
  `shard_map`, so a batch axis that also shards the vocabulary is dropped:
  the tokens are then replicated over it.
  """
  spec = sharding_lib.batch_sharding(mesh, rules).spec
  axes = _as_tuple(spec[0]) if spec else ()
  return tuple(a for a in axes if a not in _as_tuple(vocab))


def _as_tuple(axis: AxisName | None) -> tuple[str, ...]:
  if axis is None:
    return ()
  return (axis,) if isinstance(axis, str) else tuple(axis)


def _axis_spec(axes: Sequence[str]):
  """Return one PartitionSpec entry for a dimension split over `axes`."""
  axes = tuple(axes)
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def _num_shards(mesh: Mesh, axis: AxisName) -> int:
  return math.prod(mesh.shape[a] for a in _as_tuple(axis))


# Per-shard building blocks (inside shard_map).


def local_vocab_offset(vocab_local: int, axis_name: AxisName):
  """Return the global id of this shard's first token: shard index * V_local."""
  return lax.axis_index(axis_name) * vocab_local


def local_top_k(logits, k: int, axis_name: AxisName):
  """Return the global top-k of vocabulary-sharded logits.

  Args:
    logits: `[..., V_local]` this shard's logits.
    k: shortlist size, at most the full vocabulary size.
    axis_name: mesh axis that shards the vocabulary.

  Returns:
    (values `[..., k]`, global ids `[..., k]` int32), equal on every shard
    and equal to `lax.top_k` on the full logits, ties included: both order
    equal values by the lower id.
  """
  vocab_local = logits.shape[-1]
  # Each shard's own top min(k, V_local) contains every global winner it owns.
  k_local = min(k, vocab_local)
  values, ids = lax.top_k(logits, k_local)  # [..., k_local]
  ids = ids + local_vocab_offset(vocab_local, axis_name)
  # Candidates line up shard by shard, so among equal values the final top-k
  # (which prefers the lower position) also prefers the lower global id.
  # `to="invarying"` (jax 0.10 spelling) types the result as equal on every
  # shard, which it is.
  values = lax.all_gather(values, axis_name, axis=values.ndim - 1, tiled=True,
                          to="invarying")
  ids = lax.all_gather(ids, axis_name, axis=ids.ndim - 1, tiled=True,
                       to="invarying")
  values, position = lax.top_k(values, k)  # [..., k]
  ids = jnp.take_along_axis(ids, position, axis=-1)
  return values, ids.astype(jnp.int32)


def local_logsumexp(logits, axis_name: AxisName):
  """Return log(sum(exp(logits))) over the whole sharded vocabulary `[...]`.

  The shift by the global maximum (a `pmax`) keeps every exponential at most
  1, as `jax.nn.logsumexp` does unsharded.
  """
  local_max = jnp.max(logits, axis=-1)
  global_max = lax.pmax(lax.stop_gradient(local_max), axis_name)
  sum_exp = jnp.sum(jnp.exp(logits - global_max[..., None]), axis=-1)
  return global_max + jnp.log(lax.psum(sum_exp, axis_name))


def _owned_ids(token_ids, vocab_local: int, axis_name: AxisName):
  """Return (local ids clipped into range, mask of ids this shard owns)."""
  local_ids = token_ids - local_vocab_offset(vocab_local, axis_name)
  owned = (local_ids >= 0) & (local_ids < vocab_local)
  return jnp.where(owned, local_ids, 0), owned


def local_take(values, token_ids, axis_name: AxisName):
  """Read sharded `[..., V_local]` values at global ids `[..., K]`.

  Returns `[..., K]`, where each entry comes from the one shard that owns
  the id (the others add zeros in the `psum`).
  """
  safe_ids, owned = _owned_ids(token_ids, values.shape[-1], axis_name)
  picked = jnp.take_along_axis(values, safe_ids, axis=-1)
  return lax.psum(jnp.where(owned, picked, 0), axis_name)


def local_gather_logits(hidden, kernel, bias, token_ids, axis_name: AxisName,
                        dtype=jnp.float32):
  """Score every head on K given tokens with vocabulary-sharded heads.

  Args:
    hidden: `[B, d]` hidden states, the same on every vocabulary shard.
    kernel: `[P, V_local, d]` this shard's rows of the head weights.
    bias: `[P, V_local]` or None.
    token_ids: `[B, K]` global token ids, the same on every shard.
    axis_name: mesh axis that shards the vocabulary.
    dtype: compute dtype of the matmul.

  Returns:
    `[B, P, K]` float32 logits, equal to `decoding.gather_shortlist_logits`
    on the full heads. Each shard reads only rows it owns and the `psum`
    moves B*P*K floats.
  """
  # Imported at call time so that decoding.py can import this module.
  from fastk_jax import decoding

  safe_ids, owned = _owned_ids(token_ids, kernel.shape[1], axis_name)
  logits = decoding.gather_shortlist_logits(hidden, kernel, bias, safe_ids,
                                            dtype)
  logits = jnp.where(owned[:, None, :], logits, 0.0)  # [B, P, K]
  return lax.psum(logits, axis_name)


# Global wrappers.


def sharded_top_k(logits, k: int, *, mesh: Mesh, axis: AxisName,
                  batch: Sequence[str] = ()):
  """Return `lax.top_k(logits, k)` for `[B, V]` logits sharded on V.

  `batch` names the mesh axes that shard B, if any.
  """
  vocab = logits.shape[-1]
  if not 1 <= k <= vocab:
    raise ValueError(f"k={k} must be in [1, vocabulary size {vocab}].")
  row = _axis_spec(batch)
  fn = jax.shard_map(
      functools.partial(local_top_k, k=k, axis_name=axis), mesh=mesh,
      in_specs=PartitionSpec(row, axis),
      out_specs=(PartitionSpec(row, None), PartitionSpec(row, None)))
  return fn(logits)


def fastk_candidates(hidden, kernel, bias, pilot, k: int, *, mesh: Mesh,
                     axis: AxisName, batch: Sequence[str] = (),
                     dtype=jnp.float32) -> dict[str, jax.Array]:
  """Run Fast-K's head computation with the vocabulary sharded.

  The pilot head computes its full logits on each shard's slice of the
  vocabulary, then the shards agree on the top-k shortlist and the pilot's
  log-sum-exp, and every head scores the K shortlisted tokens.

  Args:
    hidden: `[B, d]` final hidden states.
    kernel: `[P, V, d]` head weights, sharded on V over `axis`.
    bias: `[P, V]` or None.
    pilot: int32 scalar, the pilot head (may be traced).
    k: shortlist size K, at most V.
    mesh: the mesh.
    axis: mesh axis that shards V (see `vocab_axis`).
    batch: mesh axes that shard B.
    dtype: compute dtype of the head matmuls.

  Returns:
    A dict of arrays, replicated over `axis`, with the keys
      "ids": `[B, K]` int32 shortlist, in descending pilot logit order.
      "pilot_logits": `[B, K]` the pilot's logits on the shortlist.
      "pilot_logsumexp": `[B]` the pilot's log-sum-exp over all V tokens.
      "logits": `[B, P, K]` every head's logits on the shortlist.
  """
  num_heads, vocab, _ = kernel.shape
  if not 1 <= k <= vocab:
    raise ValueError(
        f"Fast-K shortlist size K={k} must be in [1, vocabulary size {vocab}].")
  if vocab % _num_shards(mesh, axis):
    raise ValueError(
        f"The vocabulary size {vocab} is not divisible by the "
        f"{_num_shards(mesh, axis)} shards of mesh axis {axis!r}.")
  if bias is None:
    bias = jnp.zeros((num_heads, vocab), jnp.float32)
  row = _axis_spec(batch)

  def per_shard(hidden, kernel, bias, pilot):
    pilot_logits = heads_lib.head_logits(hidden, kernel, bias, pilot,
                                         dtype)  # [B, V_local]
    values, ids = local_top_k(pilot_logits, k, axis)  # [B, K]
    lse = local_logsumexp(pilot_logits, axis)  # [B]
    logits = local_gather_logits(hidden, kernel, bias, ids, axis,
                                 dtype)  # [B, P, K]
    return {"ids": ids, "pilot_logits": values, "pilot_logsumexp": lse,
            "logits": logits}

  fn = jax.shard_map(
      per_shard, mesh=mesh,
      in_specs=(PartitionSpec(row, None), PartitionSpec(None, axis, None),
                PartitionSpec(None, axis), PartitionSpec()),
      out_specs={"ids": PartitionSpec(row, None),
                 "pilot_logits": PartitionSpec(row, None),
                 "pilot_logsumexp": PartitionSpec(row),
                 "logits": PartitionSpec(row, None, None)})
  return fn(hidden, kernel, bias, jnp.asarray(pilot, jnp.int32))


def _scatter_owned(values, token_ids, updates, axis_name: AxisName):
  """Write `updates` `[N, K]` at global ids `[N, K]` into `[N, V_local]`.

  Ids that another shard owns are pointed past the end and dropped, so no two
  writes collide on a clipped index.
  """
  vocab_local = values.shape[-1]
  local_ids, owned = _owned_ids(token_ids, vocab_local, axis_name)
  local_ids = jnp.where(owned, local_ids, vocab_local)
  rows = jnp.arange(values.shape[0])[:, None]  # [N, 1]
  return values.at[rows, local_ids].set(updates.astype(values.dtype),
                                        mode="drop")


def _local_fastk_step(hidden, kernel, bias, pilot_heads, *, top_k, combine,
                      dtype, axis):
  """Per-shard `decoding.fastk_step`; probs and token_head stay sharded."""
  # Imported at call time so that decoding.py can import this module.
  from fastk_jax import decoding

  weights = decoding.split_heads(kernel, bias)
  logits = decoding.pilot_logits(hidden, weights, pilot_heads,
                                 dtype)  # [N, V_local]
  top_logits, shortlist = local_top_k(logits, top_k, axis)  # [N, K]
  shortlist_logits = local_gather_logits(hidden, kernel, bias, shortlist, axis,
                                         dtype)  # [N, P, K]
  head_log_probs = jax.nn.log_softmax(shortlist_logits, axis=-1)  # [N, P, K]
  head_probs = jnp.exp(head_log_probs)
  shortlist_q = decoding.combine_heads(head_probs, combine)  # [N, K]

  # m_S, the pilot's full-softmax mass on the shortlist, from the sharded
  # log-sum-exp; the top-k values are the pilot logits of the shortlist.
  pilot_log_z = local_logsumexp(logits, axis)[:, None]  # [N, 1]
  shortlist_mass = jnp.exp(
      jax.nn.logsumexp(top_logits, axis=-1, keepdims=True) - pilot_log_z)
  probs = jnp.exp(logits - pilot_log_z)  # [N, V_local]
  probs = _scatter_owned(probs, shortlist, shortlist_mass * shortlist_q, axis)

  best = jnp.argmax(shortlist_q, axis=-1)  # [N]
  greedy_token = jnp.take_along_axis(shortlist, best[:, None], axis=-1)[:, 0]
  shortlist_heads = jnp.argmax(head_probs, axis=1).astype(jnp.int32)  # [N, K]
  greedy_head = jnp.take_along_axis(shortlist_heads, best[:, None],
                                    axis=-1)[:, 0]

  num_rows = hidden.shape[0]
  pilots = jnp.broadcast_to(jnp.asarray(pilot_heads, jnp.int32), (num_rows,))
  token_head = jnp.broadcast_to(pilots[:, None], probs.shape)
  token_head = _scatter_owned(token_head, shortlist, shortlist_heads, axis)

  head_entropy = -jnp.sum(head_probs * head_log_probs, axis=-1)  # [N, P]
  return {"probs": probs, "shortlist": shortlist, "head_entropy": head_entropy,
          "greedy_token": greedy_token.astype(jnp.int32),
          "greedy_head": greedy_head, "token_head": token_head}


def sharded_fastk_step(hidden, kernel, bias, pilot_heads, *, top_k: int,
                       mesh: Mesh, axis: AxisName, batch: Sequence[str] = (),
                       combine: str = "max", dtype=jnp.float32):
  """Run `decoding.fastk_step` with the vocabulary sharded over `axis`.

  Computes the same distribution as `decoding.fastk_step`: the pilot's full
  softmax outside the shortlist S and the pilot's mass on S, m_S, spread over
  S by the combined heads. The pilot's log-sum-exp and the top-k are sharded
  (module docstring), so the collectives move `[N, K]`, `[N, P, K]` and `[N]`
  arrays only.

  Args:
    hidden: `[N, d]` hidden states.
    kernel: `[P, V, d]` head weights, sharded on V over `axis`.
    bias: `[P, V]` or None.
    pilot_heads: int scalar or `[N]` pilot per row.
    top_k: K, in [1, V].
    mesh: the mesh.
    axis: mesh axis that shards V (see `vocab_axis`).
    batch: mesh axes that shard N.
    combine: "max" or "mean", as in `decoding.combine_heads`.
    dtype: compute dtype of the matmuls.

  Returns:
    A `decoding.StepOutput`. Its `probs` and `token_head` `[N, V]` stay
    sharded over `axis` on the vocabulary dimension; the other fields are
    replicated over `axis`.
  """
  from fastk_jax import decoding

  num_heads, vocab, _ = kernel.shape
  if not 1 <= top_k <= vocab:
    raise ValueError(
        f"Invalid top_k={top_k}: K must be in [1, {vocab}], the vocabulary "
        "size (config.decode.top_k).")
  if vocab % _num_shards(mesh, axis):
    raise ValueError(
        f"The vocabulary size {vocab} is not divisible by the "
        f"{_num_shards(mesh, axis)} shards of mesh axis {axis!r}.")
  pilot_heads = jnp.asarray(pilot_heads, jnp.int32)
  row = _axis_spec(batch)
  pilot_spec = PartitionSpec() if pilot_heads.ndim == 0 else PartitionSpec(row)
  bias_spec = None if bias is None else PartitionSpec(None, axis)
  fn = jax.shard_map(
      functools.partial(_local_fastk_step, top_k=top_k, combine=combine,
                        dtype=dtype, axis=axis),
      mesh=mesh,
      in_specs=(PartitionSpec(row, None), PartitionSpec(None, axis, None),
                bias_spec, pilot_spec),
      out_specs={"probs": PartitionSpec(row, axis),
                 "shortlist": PartitionSpec(row, None),
                 "head_entropy": PartitionSpec(row, None),
                 "greedy_token": PartitionSpec(row),
                 "greedy_head": PartitionSpec(row),
                 "token_head": PartitionSpec(row, axis)},
      # `decoding.pilot_logits` starts per-row pilots from a zeros array that
      # is not typed as varying across shards, which the varying-axes check
      # rejects in its `lax.cond`. Outputs with replicated specs come from a
      # psum or an all_gather, so they are equal on every shard.
      check_vma=pilot_heads.ndim == 0)
  return decoding.StepOutput(**fn(hidden, kernel, bias, pilot_heads))


# Winner-take-all loss with the vocabulary sharded.


def _split_chunks(x, num_chunks):
  return x.reshape(num_chunks, x.shape[0] // num_chunks, *x.shape[1:])


def _pad_rows(x, rows):
  return jnp.pad(x, ((0, rows),) + ((0, 0),) * (x.ndim - 1))


def _local_chunk_logits(hidden, kernel, bias, dtype):
  logits = heads_lib.dense_logits(hidden, kernel, None,
                                  dtype)  # [C, P, V_local]
  return logits + bias.astype(jnp.float32)


def _local_forward(hidden, kernel, bias, targets, mask, *, epsilon, chunk_size,
                   dtype, axis):
  """Per-shard forward: (token loss, nll, weights, log-sum-exp) per token."""
  num_tokens = hidden.shape[0]
  chunk = min(chunk_size, num_tokens)
  padding = (-num_tokens) % chunk
  num_chunks = (num_tokens + padding) // chunk

  def body(_, inputs):
    h, t = inputs
    logits = _local_chunk_logits(h, kernel, bias, dtype)  # [C, P, V_local]
    lse = local_logsumexp(logits, axis)  # [C, P]
    gold = local_take(logits, jnp.broadcast_to(t[:, None, None],
                                               (*logits.shape[:2], 1)),
                      axis)[..., 0]  # [C, P]
    return None, (lse - gold, lse)

  _, (nll, lse) = lax.scan(
      body, None,
      (_split_chunks(_pad_rows(hidden, padding), num_chunks),
       _split_chunks(_pad_rows(targets, padding), num_chunks)))
  nll = nll.reshape(-1, nll.shape[-1])[:num_tokens]  # [N_local, P]
  lse = lse.reshape(-1, lse.shape[-1])[:num_tokens]  # [N_local, P]
  weights = loss_lib.winner_weights(nll, epsilon)  # [N_local, P]
  weights = weights * mask[:, None]
  token_loss = jnp.sum(weights * nll, axis=-1)  # [N_local]
  return token_loss, nll, weights, lse


def _local_backward(hidden, kernel, bias, targets, coef, lse, *, chunk_size,
                    dtype, axis, batch):
  """Per-shard backward: gradients of hidden, kernel slice and bias slice."""
  num_heads, vocab_local, dim = kernel.shape
  num_tokens = hidden.shape[0]
  chunk = min(chunk_size, num_tokens)
  padding = (-num_tokens) % chunk
  num_chunks = (num_tokens + padding) // chunk
  vocab_ids = jnp.arange(vocab_local) + local_vocab_offset(vocab_local, axis)

  def body(carry, inputs):
    d_kernel, d_bias = carry
    h, t, c, l = inputs
    logits = _local_chunk_logits(h, kernel, bias, dtype)  # [C, P, V_local]
    probs = jnp.exp(logits - l[..., None])
    gold = vocab_ids[None, None, :] == t[:, None, None]
    d_logits = c[..., None] * (probs - gold)  # [C, P, V_local]
    d_flat = d_logits.reshape(-1, num_heads * vocab_local).astype(dtype)
    # This shard's part of d_hidden; the psum below adds the other shards'.
    d_h = jnp.dot(d_flat,
                  kernel.reshape(num_heads * vocab_local, dim).astype(dtype),
                  preferred_element_type=jnp.float32)  # [C, d]
    d_kernel = d_kernel + jnp.dot(
        d_flat.T, h.astype(dtype),
        preferred_element_type=jnp.float32).reshape(kernel.shape)
    d_bias = d_bias + jnp.sum(d_logits, axis=0)
    return (d_kernel, d_bias), d_h

  # The gradient sums differ across every shard, so the scan carry must be
  # typed as varying over all the axes (shard_map's check_vma requires it).
  init = tuple(
      lax.pcast(jnp.zeros(x.shape, jnp.float32),
                _as_tuple(axis) + tuple(batch), to="varying")
      for x in (kernel, bias))
  # Padded rows have coef 0, so they add nothing to any gradient.
  (d_kernel, d_bias), d_hidden = lax.scan(
      body, init,
      (_split_chunks(_pad_rows(hidden, padding), num_chunks),
       _split_chunks(_pad_rows(targets, padding), num_chunks),
       _split_chunks(_pad_rows(coef, padding), num_chunks),
       _split_chunks(_pad_rows(lse, padding), num_chunks)))
  d_hidden = d_hidden.reshape(-1, dim)[:num_tokens]
  d_hidden = lax.psum(d_hidden, axis)
  if batch:
    # Every batch shard saw different tokens; their weight gradients add up.
    d_kernel = lax.psum(d_kernel, batch)
    d_bias = lax.psum(d_bias, batch)
  return (d_hidden.astype(hidden.dtype), d_kernel.astype(kernel.dtype),
          d_bias.astype(bias.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _sharded_wta_nll(hidden, kernel, bias, targets, mask, epsilon, chunk_size,
                     dtype, mesh, axis, batch):
  out, _ = _sharded_wta_nll_fwd(hidden, kernel, bias, targets, mask, epsilon,
                                chunk_size, dtype, mesh, axis, batch)
  return out


def _sharded_wta_nll_fwd(hidden, kernel, bias, targets, mask, epsilon,
                         chunk_size, dtype, mesh, axis, batch):
  row = _axis_spec(batch)
  fn = jax.shard_map(
      functools.partial(_local_forward, epsilon=epsilon, chunk_size=chunk_size,
                        dtype=dtype, axis=axis),
      mesh=mesh,
      in_specs=(PartitionSpec(row, None), PartitionSpec(None, axis, None),
                PartitionSpec(None, axis), PartitionSpec(row),
                PartitionSpec(row)),
      out_specs=(PartitionSpec(row), PartitionSpec(row, None),
                 PartitionSpec(row, None), PartitionSpec(row, None)))
  token_loss, nll, weights, lse = fn(hidden, kernel, bias, targets, mask)
  residuals = (hidden, kernel, bias, targets, weights, lse)
  return (token_loss, nll), residuals


def _sharded_wta_nll_bwd(epsilon, chunk_size, dtype, mesh, axis, batch,
                         residuals, cotangents):
  del epsilon  # The weights saved in the forward pass already include it.
  hidden, kernel, bias, targets, weights, lse = residuals
  # The nll output is reported for metrics only, so its cotangent is ignored.
  g_loss, _ = cotangents
  coef = weights * g_loss[:, None]  # [N, P]
  row = _axis_spec(batch)
  fn = jax.shard_map(
      functools.partial(_local_backward, chunk_size=chunk_size, dtype=dtype,
                        axis=axis, batch=batch),
      mesh=mesh,
      in_specs=(PartitionSpec(row, None), PartitionSpec(None, axis, None),
                PartitionSpec(None, axis), PartitionSpec(row),
                PartitionSpec(row, None), PartitionSpec(row, None)),
      out_specs=(PartitionSpec(row, None), PartitionSpec(None, axis, None),
                 PartitionSpec(None, axis)))
  d_hidden, d_kernel, d_bias = fn(hidden, kernel, bias, targets, coef, lse)
  return d_hidden, d_kernel, d_bias, None, None


_sharded_wta_nll.defvjp(_sharded_wta_nll_fwd, _sharded_wta_nll_bwd)


def sharded_wta_loss(hidden, kernel, bias, targets, mask=None, *, mesh: Mesh,
                     axis: AxisName, batch: Sequence[str] = (), epsilon=0.0,
                     chunk_size=512, dtype=jnp.float32):
  """Compute `loss.wta_loss` with the heads' vocabulary sharded over `axis`.

  Same arguments and results as `loss.wta_loss`, plus the mesh layout. Each
  device computes the logits of its vocabulary slice for its share of the
  tokens, chunk by chunk. A `pmax` and `psum`s of `[tokens, P]` arrays then
  combine the shards' log-sum-exp and gold logit. The
  backward pass (a custom VJP) recomputes the chunk logits and adds the
  shards' parts of the hidden-state gradient with one `psum`.

  Args:
    hidden: `[..., d]` final hidden states.
    kernel: `[P, V, d]` head weights, sharded on V over `axis` (other layouts
      are resharded to that at the `shard_map` boundary).
    bias: `[P, V]` head biases, or None.
    targets: `[...]` int target ids.
    mask: `[...]` token weights, or None.
    mesh: the mesh.
    axis: mesh axis that shards V (see `vocab_axis`).
    batch: mesh axes that shard the tokens (see `batch_axes`); the number of
      tokens must be divisible by their total size.
    epsilon: relaxed-WTA weight shared by the non-winning heads.
    chunk_size: tokens per logits chunk on each device.
    dtype: compute dtype of the head matmuls; softmax runs in float32.

  Returns:
    (loss, aux) exactly as `loss.wta_loss`.
  """
  vocab = kernel.shape[1]
  if vocab % _num_shards(mesh, axis):
    raise ValueError(
        f"The vocabulary size {vocab} is not divisible by the "
        f"{_num_shards(mesh, axis)} shards of mesh axis {axis!r}.")
  batch = tuple(batch)
  hidden, bias, targets, mask = loss_lib.flatten_inputs(
      hidden, kernel, bias, targets, mask)
  num_batch_shards = math.prod(mesh.shape[a] for a in batch)
  if hidden.shape[0] % num_batch_shards:
    raise ValueError(
        f"{hidden.shape[0]} tokens cannot be split evenly over the "
        f"{num_batch_shards} shards of mesh axes {batch}.")

  token_loss, nll = _sharded_wta_nll(hidden, kernel, bias, targets, mask,
                                     float(epsilon), int(chunk_size), dtype,
                                     mesh, axis, batch)
  nll = lax.stop_gradient(nll)
  loss = jnp.sum(token_loss) / jnp.maximum(jnp.sum(mask), 1.0)
  aux = {"nll": nll, "winner": jnp.argmin(nll, axis=-1), "mask": mask}
  return loss, aux


def wta_loss_on_mesh(hidden, kernel, bias, targets, mask=None, *,
                     mesh: Mesh | None = None, rules=None, **kwargs):
  """Compute the WTA loss, vocabulary-sharded when `rules` shard it on `mesh`.

  Calls `sharded_wta_loss` when `vocab_axis` finds a mesh axis for the heads'
  vocabulary and `loss.wta_loss` otherwise (no mesh, or V kept whole). Keyword
  arguments (epsilon, chunk_size, dtype) go to either function.
  """
  axis = None if mesh is None else vocab_axis(mesh, rules, kernel.shape)
  if axis is None:
    return loss_lib.wta_loss(hidden, kernel, bias, targets, mask, **kwargs)
  return sharded_wta_loss(hidden, kernel, bias, targets, mask, mesh=mesh,
                          axis=axis, batch=batch_axes(mesh, rules, axis),
                          **kwargs)
