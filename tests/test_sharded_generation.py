"""Generation on a mesh that splits the vocabulary matches one device."""

import jax
import numpy as np
import pytest

from fastk_jax import config_lib
from fastk_jax import decoding
from fastk_jax import model as model_lib
from fastk_jax import sharding as sharding_lib

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py)")


def _model_and_decode(decoder, pilot):
  config = config_lib.base_config()
  config.model.num_layers = 1
  config.model.num_heads = 2
  config.model.embed_dim = 16
  config.model.max_len = 32
  config.model.num_lm_heads = 3
  config.decode.decoder = decoder
  config.decode.pilot = pilot
  config.decode.top_k = 5
  config.decode.max_new_tokens = 6
  model = model_lib.create_model(config.model, vocab_size=64, seed=3)
  return model, config.decode


@pytest.mark.parametrize("decoder,pilot", [
    ("fastk", "utilization"), ("fastk", "lowest_entropy"), ("dense", "fixed")])
def test_vocab_sharded_generation_matches(decoder, pilot):
  model, decode_config = _model_and_decode(decoder, pilot)
  prompts = [[1, 2, 3], [7, 8, 9, 10, 11]]
  win_counts = np.array([3, 9, 1])
  single = decoding.generate(model, prompts, decode_config,
                             win_counts=win_counts)

  mesh_config = config_lib.base_config().mesh
  mesh_config.shape = (1, 1, 8)
  mesh_config.preset = "tp"
  mesh = sharding_lib.make_mesh(mesh_config)
  rules = sharding_lib.rules_from_config(mesh_config)
  from fastk_jax import vocab_parallel
  assert vocab_parallel.vocab_axis(mesh, rules, (3, 64, 16)) == "tensor"
  sharded = decoding.generate(model, prompts, decode_config,
                              win_counts=win_counts, mesh=mesh, rules=rules)

  np.testing.assert_array_equal(sharded.tokens, single.tokens)
  np.testing.assert_array_equal(sharded.heads, single.heads)
  np.testing.assert_array_equal(sharded.pilots, single.pilots)
