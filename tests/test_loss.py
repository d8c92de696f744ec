"""Winner-take-all loss: chunked custom VJP against full-logit autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastk_jax import loss as loss_lib


def _inputs(num_heads, vocab=37, dim=12, shape=(3, 5), seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  hidden = jax.random.normal(keys[0], (*shape, dim))
  kernel = 0.5 * jax.random.normal(keys[1], (num_heads, vocab, dim))
  bias = 0.1 * jax.random.normal(keys[2], (num_heads, vocab))
  targets = jax.random.randint(keys[3], shape, 0, vocab)
  mask = (jax.random.uniform(keys[4], shape) > 0.25).astype(jnp.float32)
  return hidden, kernel, bias, targets, mask


@pytest.mark.parametrize("num_heads", [1, 3])
@pytest.mark.parametrize("epsilon", [0.0, 0.2])
@pytest.mark.parametrize("chunk_size", [4, 15, 64])
def test_chunked_matches_naive(num_heads, epsilon, chunk_size):
  hidden, kernel, bias, targets, mask = _inputs(num_heads)

  def chunked(h, w, b):
    return loss_lib.wta_loss(h, w, b, targets, mask, epsilon=epsilon,
                             chunk_size=chunk_size)[0]

  def naive(h, w, b):
    return loss_lib.wta_loss_reference(h, w, b, targets, mask, epsilon=epsilon)

  value, grads = jax.value_and_grad(chunked, argnums=(0, 1, 2))(hidden, kernel, bias)
  ref_value, ref_grads = jax.value_and_grad(naive, argnums=(0, 1, 2))(
      hidden, kernel, bias)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for grad, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-6)


def test_loss_is_min_over_heads():
  hidden, kernel, bias, targets, _ = _inputs(3)
  loss, aux = loss_lib.wta_loss(hidden, kernel, bias, targets, chunk_size=8)
  np.testing.assert_allclose(loss, jnp.mean(jnp.min(aux["nll"], axis=-1)),
                             rtol=1e-6)
  assert aux["nll"].shape == (15, 3)


def test_strict_wta_zero_grad_for_losers():
  hidden, kernel, bias, targets, _ = _inputs(3, shape=(1, 1))
  _, aux = loss_lib.wta_loss(hidden, kernel, bias, targets)
  winner = int(aux["winner"][0])
  grad_kernel, grad_bias = jax.grad(
      lambda w, b: loss_lib.wta_loss(hidden, w, b, targets)[0],
      argnums=(0, 1))(kernel, bias)
  for head in range(3):
    if head == winner:
      assert float(jnp.abs(grad_kernel[head]).max()) > 0
    else:
      assert float(jnp.abs(grad_kernel[head]).max()) == 0.0
      assert float(jnp.abs(grad_bias[head]).max()) == 0.0


def test_ties_go_to_lowest_index():
  hidden, kernel, bias, targets, _ = _inputs(1, shape=(2, 3))
  kernel = jnp.concatenate([kernel, kernel, kernel])  # three identical heads
  bias = jnp.concatenate([bias, bias, bias])
  _, aux = loss_lib.wta_loss(hidden, kernel, bias, targets)
  assert np.all(np.asarray(aux["winner"]) == 0)
  grad_kernel = jax.grad(
      lambda w: loss_lib.wta_loss(hidden, w, bias, targets)[0])(kernel)
  assert float(jnp.abs(grad_kernel[1:]).max()) == 0.0


def test_relaxed_wta_weights():
  nll = jnp.array([[2.0, 1.0, 3.0]])
  weights = loss_lib.winner_weights(nll, 0.3)
  np.testing.assert_allclose(weights, [[0.15, 0.7, 0.15]], rtol=1e-6)
  np.testing.assert_allclose(loss_lib.winner_weights(nll, 0.0), [[0, 1, 0]])


def test_masked_tokens_contribute_nothing():
  hidden, kernel, bias, targets, mask = _inputs(2)
  mask = mask.at[0].set(0.0)
  grad_hidden = jax.grad(
      lambda h: loss_lib.wta_loss(h, kernel, bias, targets, mask, chunk_size=4)[0]
  )(hidden)
  assert float(jnp.abs(grad_hidden[0]).max()) == 0.0


def test_chunked_uses_less_memory_than_naive():
  # Compiled temporaries at a moderate shape: chunking must not build
  # [tokens, P, V] logits. This checks memory, not speed.
  from fastk_jax import loss_benchmark
  rows = loss_benchmark.loss_memory_table(embed_dim=64, vocab=4096, batch=4,
                                          seq=512, heads=(4,), chunk_size=256)
  row = rows[0]
  assert row["chunked_bytes"] < row["logits_bytes"]
  assert row["naive_bytes"] > 2 * row["chunked_bytes"]
