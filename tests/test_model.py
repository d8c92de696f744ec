"""GPT trunk and stacked LM heads."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fastk_jax import config_lib
from fastk_jax import heads as heads_lib
from fastk_jax import model as model_lib


def _model(num_lm_heads=3, tie=True, bias=False, vocab=50):
  c = config_lib.base_config()
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.embed_dim = 16
  c.model.max_len = 12
  c.model.num_lm_heads = num_lm_heads
  c.model.tie_pilot_head = tie
  c.model.head_bias = bias
  return model_lib.create_model(c.model, vocab, seed=0)


def test_shapes_and_logits():
  model = _model()
  tokens = jnp.arange(14).reshape(2, 7) % 50
  hidden, cache = model(tokens)
  assert hidden.shape == (2, 7, 16)
  assert cache is None
  assert model.logits(hidden).shape == (2, 7, 3, 50)


def test_heads_start_distinct():
  kernel = np.asarray(_model(num_lm_heads=4).lm_heads.kernel[...])
  for i in range(4):
    for j in range(i + 1, 4):
      assert np.abs(kernel[i] - kernel[j]).max() > 1e-3


def test_tied_head_is_token_embedding():
  model = _model(tie=True)
  np.testing.assert_array_equal(model.token_embedding(), model.lm_heads.kernel[0])
  untied = _model(tie=False)
  assert untied.wte is not None


def test_single_head_is_standard_gpt2_head():
  # P = 1 with a tied head: logits = h @ wte^T, the GPT-2 LM head.
  model = _model(num_lm_heads=1)
  hidden, _ = model(jnp.array([[1, 2, 3]]))
  expected = hidden @ model.token_embedding().T
  np.testing.assert_allclose(model.logits(hidden)[:, :, 0], expected, rtol=1e-5,
                             atol=1e-6)


def test_causal():
  model = _model()
  a, _ = model(jnp.array([[1, 2, 3, 4]]))
  b, _ = model(jnp.array([[1, 2, 3, 9]]))
  np.testing.assert_allclose(a[:, :3], b[:, :3], rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(a[:, 3] - b[:, 3])).max() > 1e-4


def test_kv_cache_matches_full_forward():
  model = _model()
  tokens = jnp.array([[3, 1, 4, 1, 5, 9]])
  full, _ = model(tokens)
  cache = model.init_cache(1, 12)
  outputs = []
  for i in range(tokens.shape[1]):
    hidden, cache = model(tokens[:, i:i + 1], cache=cache, cache_index=jnp.int32(i))
    outputs.append(hidden)
  np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, rtol=1e-4,
                             atol=1e-5)


def test_dropout_changes_output_only_in_training():
  c = config_lib.base_config()
  c.model.num_layers, c.model.embed_dim, c.model.num_heads = 1, 16, 2
  c.model.dropout = 0.5
  model = model_lib.create_model(c.model, 30, seed=0)
  tokens = jnp.array([[1, 2, 3]])
  eval_a, _ = model(tokens)
  eval_b, _ = model(tokens)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a, _ = model(tokens, deterministic=False, rngs=nnx.Rngs(dropout=1))
  assert np.abs(np.asarray(train_a - eval_a)).max() > 1e-3


def test_head_functions_agree():
  model = _model(bias=True)
  kernel, bias = model.lm_heads.weights()
  bias = bias + jax.random.normal(jax.random.key(1), bias.shape)
  hidden = jax.random.normal(jax.random.key(0), (4, 16))
  dense = heads_lib.dense_logits(hidden, kernel, bias)  # [4, P, V]
  for head in range(3):
    np.testing.assert_allclose(
        heads_lib.head_logits(hidden, kernel, bias, jnp.int32(head)),
        dense[:, head], rtol=1e-5, atol=1e-6)
  ids = jnp.array([[0, 7, 49], [1, 2, 3], [5, 5, 5], [48, 0, 10]])
  gathered = heads_lib.gather_logits(hidden, kernel, bias, ids)  # [4, P, 3]
  expected = jnp.take_along_axis(dense, ids[:, None, :], axis=-1)
  np.testing.assert_allclose(gathered, expected, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_runs():
  c = config_lib.base_config()
  c.model.num_layers, c.model.embed_dim, c.model.num_heads = 1, 16, 2
  c.model.dtype = "bfloat16"
  model = model_lib.create_model(c.model, 30, seed=0)
  hidden, _ = model(jnp.array([[1, 2, 3]]))
  assert np.isfinite(np.asarray(hidden, np.float32)).all()
  assert model.lm_heads.kernel[...].dtype == jnp.float32  # params stay float32
