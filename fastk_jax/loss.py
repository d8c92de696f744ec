"""Winner-take-all (WTA) cross-entropy over P heads, computed in token chunks.

For target y_t the per-head negative log-likelihood is
nll[t, p] = -log softmax(h_t W_p + b_p)[y_t]. Strict WTA trains only the
winner p* = argmin_p nll[t, p] (ties go to the lowest index, as `jnp.argmin`
does): loss_t = nll[t, p*]. Relaxed WTA (epsilon > 0) weights the winner by
1 - epsilon and every other head by epsilon / (P - 1). The weights are
constants, so the trunk receives only the weighted heads' gradients.

The full logits `[tokens, P, V]` are never stored. The forward pass walks over
chunks of `chunk_size` tokens and keeps only the log-sum-exp and the gold logit
of each (token, head). The backward pass (a custom VJP) recomputes each chunk's
logits and folds the softmax gradient straight into the gradients of the
hidden states, kernel and bias. Peak temporary memory is therefore about
3 * chunk_size * P * V floats, not several copies of the full logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fastk_jax import heads as heads_lib


def winner_weights(nll, epsilon: float):
  """Return the WTA weights `[N, P]` from per-head losses `[N, P]`."""
  num_heads = nll.shape[-1]
  winner = jnp.argmin(nll, axis=-1)  # Lowest index on ties.
  one_hot = jax.nn.one_hot(winner, num_heads, dtype=jnp.float32)
  if num_heads == 1 or epsilon == 0.0:
    return one_hot
  return (1.0 - epsilon) * one_hot + epsilon / (num_heads - 1) * (1.0 - one_hot)


def _chunk_logits(hidden, kernel, bias, dtype):
  logits = heads_lib.dense_logits(hidden, kernel, None, dtype)  # [C, P, V]
  return logits + bias.astype(jnp.float32)


def _chunk_forward(hidden, kernel, bias, targets, dtype):
  """Return (nll `[C, P]`, log-sum-exp `[C, P]`) for one chunk."""
  logits = _chunk_logits(hidden, kernel, bias, dtype)  # [C, P, V]
  lse = jax.nn.logsumexp(logits, axis=-1)  # [C, P]
  gold = jnp.take_along_axis(logits, targets[:, None, None], axis=-1)[..., 0]
  return lse - gold, lse


def _split_chunks(x, num_chunks):
  return x.reshape(num_chunks, x.shape[0] // num_chunks, *x.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _wta_nll(hidden, kernel, bias, targets, mask, epsilon, chunk_size, dtype):
  out, _ = _wta_nll_fwd(hidden, kernel, bias, targets, mask, epsilon,
                        chunk_size, dtype)
  return out


def _wta_nll_fwd(hidden, kernel, bias, targets, mask, epsilon, chunk_size,
                 dtype):
  num_chunks = hidden.shape[0] // chunk_size

  def body(_, chunk):
    h, t = chunk
    nll, lse = _chunk_forward(h, kernel, bias, t, dtype)
    return None, (nll, lse)

  _, (nll, lse) = jax.lax.scan(
      body, None,
      (_split_chunks(hidden, num_chunks), _split_chunks(targets, num_chunks)))
  nll = nll.reshape(-1, nll.shape[-1])  # [N, P]
  lse = lse.reshape(-1, lse.shape[-1])  # [N, P]
  weights = winner_weights(nll, epsilon) * mask[:, None]  # [N, P]
  token_loss = jnp.sum(weights * nll, axis=-1)  # [N]
  residuals = (hidden, kernel, bias, targets, weights, lse)
  return (token_loss, nll), residuals


def _wta_nll_bwd(epsilon, chunk_size, dtype, residuals, cotangents):
  del epsilon  # The weights saved in the forward pass already include it.
  hidden, kernel, bias, targets, weights, lse = residuals
  # The nll output is reported for metrics only, so its cotangent is ignored.
  g_loss, _ = cotangents
  num_heads, vocab, dim = kernel.shape
  num_chunks = hidden.shape[0] // chunk_size
  coef = weights * g_loss[:, None]  # [N, P]

  def body(carry, chunk):
    d_kernel, d_bias = carry
    h, t, c, l = chunk
    logits = _chunk_logits(h, kernel, bias, dtype)  # [C, P, V]
    probs = jnp.exp(logits - l[..., None])
    gold = jnp.arange(vocab)[None, None, :] == t[:, None, None]
    d_logits = c[..., None] * (probs - gold)  # [C, P, V]
    d_flat = d_logits.reshape(-1, num_heads * vocab).astype(dtype)
    d_h = jnp.dot(d_flat, kernel.reshape(num_heads * vocab, dim).astype(dtype),
                  preferred_element_type=jnp.float32)  # [C, d]
    d_kernel = d_kernel + jnp.dot(
        d_flat.T, h.astype(dtype),
        preferred_element_type=jnp.float32).reshape(num_heads, vocab, dim)
    d_bias = d_bias + jnp.sum(d_logits, axis=0)
    return (d_kernel, d_bias), d_h

  init = (jnp.zeros(kernel.shape, jnp.float32), jnp.zeros(bias.shape, jnp.float32))
  (d_kernel, d_bias), d_hidden = jax.lax.scan(
      body, init,
      (_split_chunks(hidden, num_chunks), _split_chunks(targets, num_chunks),
       _split_chunks(coef, num_chunks), _split_chunks(lse, num_chunks)))
  d_hidden = d_hidden.reshape(hidden.shape).astype(hidden.dtype)
  return (d_hidden, d_kernel.astype(kernel.dtype), d_bias.astype(bias.dtype),
          None, None)


_wta_nll.defvjp(_wta_nll_fwd, _wta_nll_bwd)


def flatten_inputs(hidden, kernel, bias, targets, mask):
  """Return (hidden `[N, d]`, bias `[P, V]`, targets `[N]`, mask `[N]`).

  A missing mask counts every token, and a missing bias is zeros.
  """
  hidden = hidden.reshape(-1, hidden.shape[-1])
  targets = targets.reshape(-1).astype(jnp.int32)
  if mask is None:
    mask = jnp.ones(targets.shape, jnp.float32)
  mask = mask.reshape(-1).astype(jnp.float32)
  if bias is None:
    bias = jnp.zeros(kernel.shape[:2], jnp.float32)
  return hidden, bias, targets, mask


def wta_loss(hidden, kernel, bias, targets, mask=None, *, epsilon=0.0,
             chunk_size=512, dtype=jnp.float32):
  """Compute the chunked winner-take-all loss.

  Args:
    hidden: `[..., d]` final hidden states (e.g. `[B, T, d]`).
    kernel: `[P, V, d]` head weights.
    bias: `[P, V]` head biases, or None.
    targets: `[...]` int target ids, same leading shape as `hidden`.
    mask: `[...]` weights (1 for real tokens, 0 for padding), or None.
    epsilon: relaxed-WTA weight shared by the non-winning heads.
    chunk_size: tokens per logits chunk. Inputs are padded to a multiple.
    dtype: compute dtype of the head matmuls; softmax runs in float32.

  Returns:
    (loss, aux): `loss` is the weighted mean over masked tokens, which is
    differentiable. `aux` contains "nll" `[N, P]` per-head losses, "winner" `[N]`
    and "mask" `[N]` for metrics, all treated as constants.
  """
  hidden, bias, targets, mask = flatten_inputs(hidden, kernel, bias, targets,
                                               mask)
  num_tokens = hidden.shape[0]
  chunk_size = min(chunk_size, num_tokens)
  padding = (-num_tokens) % chunk_size
  if padding:
    hidden = jnp.pad(hidden, ((0, padding), (0, 0)))
    targets = jnp.pad(targets, (0, padding))
    mask = jnp.pad(mask, (0, padding))

  token_loss, nll = _wta_nll(hidden, kernel, bias, targets, mask,
                             float(epsilon), int(chunk_size), dtype)
  token_loss = token_loss[:num_tokens]
  nll = jax.lax.stop_gradient(nll[:num_tokens])
  mask = mask[:num_tokens]
  loss = jnp.sum(token_loss) / jnp.maximum(jnp.sum(mask), 1.0)
  aux = {"nll": nll, "winner": jnp.argmin(nll, axis=-1), "mask": mask}
  return loss, aux


def wta_loss_reference(hidden, kernel, bias, targets, mask=None, *,
                       epsilon=0.0):
  """Compute the same loss with full logits and plain autodiff.

  For tests and the memory benchmark: it builds `[N, P, V]` logits.
  """
  logits = heads_lib.dense_logits(hidden, kernel, bias)  # [..., P, V]
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(
      log_probs, targets[..., None, None].astype(jnp.int32), axis=-1)[..., 0]
  weights = jax.lax.stop_gradient(winner_weights(nll, epsilon))
  if mask is None:
    mask = jnp.ones(targets.shape, jnp.float32)
  token_loss = jnp.sum(weights * nll, axis=-1) * mask
  return jnp.sum(token_loss) / jnp.maximum(jnp.sum(mask), 1.0)
