"""Config parsing and validation: errors name the field, value and fix."""

import importlib.util
import os

import pytest

from fastk_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name", ["demo", "tiny", "gpt2_small", "gpt2_medium"])
def test_configs_load_and_validate(name):
  config = load_config(name)
  config_lib.validate_config(config, vocab_size=50257)
  with pytest.raises(AttributeError):
    config.not_a_field = 1  # locked


def test_typed_string_args():
  config = load_config("demo", "heads=8,steps=12,k=7")
  assert config.model.num_lm_heads == 8
  assert config.total_steps == 12
  assert config.decode.top_k == 7


def test_parse_arg_errors():
  with pytest.raises(ValueError, match="Unknown config argument 'head'"):
    config_lib.parse_arg("head=2", heads=4)
  with pytest.raises(ValueError, match="not a valid int"):
    config_lib.parse_arg("heads=two", heads=4)
  assert config_lib.parse_arg("runlocal", runlocal=False).runlocal is True


@pytest.mark.parametrize("field,value,message", [
    ("model.num_lm_heads", 0, "model.num_lm_heads=0"),
    ("decode.top_k", 0, "decode.top_k=0"),
    ("decode.pilot", "best", "decode.pilot='best'"),
    ("decode.pilot_head", 5, "decode.pilot_head=5"),
    ("data.seq_len", 4096, "position table"),
    ("loss.wta_epsilon", 1.0, "loss.wta_epsilon=1.0"),
    ("data.source", "web", "data.source='web'"),
])
def test_invalid_values_raise(field, value, message):
  config = load_config("demo")
  with config.unlocked():
    section, name = field.split(".")
    config[section][name] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(config, vocab_size=4096)


def test_top_k_larger_than_vocabulary():
  config = load_config("demo", "k=5000")
  # Before the tokenizer exists, the BPE size in the config bounds K.
  with pytest.raises(ValueError, match="cannot exceed the vocabulary size 4096"):
    config_lib.validate_config(config)
  with pytest.raises(ValueError, match="cannot exceed the vocabulary size 4096"):
    config_lib.validate_config(config, vocab_size=4096)
  gpt2 = load_config("gpt2_small", "k=60000")
  with pytest.raises(ValueError, match="vocabulary size 50257"):
    config_lib.validate_config(gpt2)
