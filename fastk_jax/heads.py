"""The P parallel LM heads, stored as one vocabulary-major parameter.

Layout: `kernel[P, V, d]`. Each head is a contiguous `[V, d]` block, and each
token's weight vector is a contiguous row of `d` values, so:

* the dense projection of all heads is one matmul against the free reshape
  `[P * V, d]`;
* a pilot head's full logits read one contiguous `[V, d]` block;
* Fast-K's gather of K token rows reads P·K contiguous rows.

Measured on a 2-core CPU at d=768, V=50257, P=4, batch 1 (jax 0.10.2): one head
5.1 ms; dense `[P, V, d]` via the reshape 20.5 ms, but 390 ms when written as the
einsum "bd,pvd->bpv" (XLA then copies a transposed weight on every call).
`python -m fastk_jax.benchmark decode` measures the decode paths; benchmark
any new layout before use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _matmul_transposed(x, w, dtype):
  """Return x @ w.T for x `[..., d]` and w `[N, d]`, accumulating in float32."""
  x = x.astype(dtype)
  w = w.astype(dtype)
  return jax.lax.dot_general(
      x, w, (((x.ndim - 1,), (1,)), ((), ())),
      preferred_element_type=jnp.float32)


class LMHeads(nnx.Module):
  """P language-model heads `[P, V, d]` with an optional bias `[P, V]`.

  Heads start distinct: head 0 gets the base initialisation (normal, std
  0.02, as GPT-2's token embedding) and head p > 0 gets the same values plus
  seeded Gaussian noise of std `init_noise`. Identical heads would tie on every
  token, the tie would always go to head 0, and winner-take-all training would
  never update the others.
  """

  def __init__(self, num_heads: int, vocab_size: int, embed_dim: int, *,
               use_bias: bool = False, init_noise: float = 0.02,
               rngs: nnx.Rngs):
    base = 0.02 * jax.random.normal(rngs.params(), (1, vocab_size, embed_dim))
    noise = init_noise * jax.random.normal(
        rngs.params(), (num_heads, vocab_size, embed_dim))
    noise = noise.at[0].set(0.0)
    self.kernel = nnx.Param(
        base + noise, logical_axes=("lm_heads", "vocab", "embed"))
    if use_bias:
      self.bias = nnx.Param(
          jnp.zeros((num_heads, vocab_size)), logical_axes=("lm_heads", "vocab"))
    else:
      self.bias = None
    self.num_heads = num_heads
    self.vocab_size = vocab_size

  def weights(self):
    """Return (kernel `[P, V, d]`, bias `[P, V]` or None) as arrays."""
    bias = None if self.bias is None else self.bias[...]
    return self.kernel[...], bias

  def __call__(self, hidden, dtype=jnp.float32):
    """Return every head's full logits `[..., P, V]` in float32."""
    kernel, bias = self.weights()
    return dense_logits(hidden, kernel, bias, dtype)


def dense_logits(hidden, kernel, bias=None, dtype=jnp.float32):
  """Compute all heads' logits: hidden `[..., d]` -> `[..., P, V]` (float32)."""
  num_heads, vocab, dim = kernel.shape
  flat = _matmul_transposed(hidden, kernel.reshape(num_heads * vocab, dim), dtype)
  logits = flat.reshape(*hidden.shape[:-1], num_heads, vocab)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  return logits


def head_logits(hidden, kernel, bias, head, dtype=jnp.float32):
  """Compute one head's full logits: hidden `[..., d]` -> `[..., V]` (float32).

  `head` may be a traced scalar. NOTE: XLA:CPU (jax 0.10.2) copies the
  `[V, d]` slice before the matmul in most programs: inside the decode loop at
  d=768, V=50257 one call took 42 ms instead of 5.0 ms. Decode loops use
  `decoding.split_heads`, which keeps P separate head arrays instead.
  """
  weight = jax.lax.dynamic_index_in_dim(kernel, head, axis=0, keepdims=False)
  logits = _matmul_transposed(hidden, weight, dtype)
  if bias is not None:
    logits = logits + jax.lax.dynamic_index_in_dim(
        bias, head, axis=0, keepdims=False).astype(jnp.float32)
  return logits


def gather_logits(hidden, kernel, bias, token_ids, dtype=jnp.float32):
  """Score every head on each row's own tokens only.

  The K rows of every head are gathered straight into `[N, P·K, d]` order and
  contracted with a batched matmul over the rows. On a 2-core CPU (jax 0.10.2,
  d=768, V=50257, P=4, K=50, inside a decode loop) this took 0.07 ms at N=1 and
  0.44 ms at N=8, against 0.27 ms and 1.9 ms for a `[P, N, K, d]` gather
  followed by an einsum.

  Args:
    hidden: `[N, d]` hidden states.
    kernel: `[P, V, d]` head weights.
    bias: `[P, V]` or None.
    token_ids: `[N, K]` vocabulary ids per row.
    dtype: compute dtype of the matmul.

  Returns:
    `[N, P, K]` float32 logits, equal to the full logits at `token_ids`.
  """
  num_heads, vocab_size, dim = kernel.shape
  num_rows, top_k = token_ids.shape
  # Row p·V + v of the flattened kernel is head p's weight for token v.
  flat_ids = (jnp.arange(num_heads)[None, :, None] * vocab_size
              + token_ids[:, None, :]).reshape(num_rows, num_heads * top_k)
  rows = jnp.take(kernel.reshape(num_heads * vocab_size, dim), flat_ids,
                  axis=0)  # [N, P*K, d]
  logits = jax.lax.dot_general(
      hidden.astype(dtype), rows.astype(dtype), (((1,), (2,)), ((0,), (0,))),
      preferred_element_type=jnp.float32)  # [N, P*K]
  if bias is not None:
    logits = logits + jnp.take(bias.reshape(-1), flat_ids).astype(jnp.float32)
  return logits.reshape(num_rows, num_heads, top_k)
