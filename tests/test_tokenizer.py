"""Tests for fastk_jax.tokenizer with the real tiktoken and HF tokenizers."""

import json
import pathlib
import re

import pytest

from fastk_jax import config_lib
from fastk_jax import tokenizer as tokenizer_lib

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "To be, or not to be, that is the question. " * 20,
    "In the beginning God created the heaven and the earth. " * 20,
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 \u65e5\u672c\u8a9e text. " * 5,
]


def _data_config(**overrides):
  config = config_lib.base_config()
  for key, value in overrides.items():
    config.data[key] = value
  return config.data


@pytest.fixture(scope="module")
def gpt2():
  return tokenizer_lib.build_tokenizer(_data_config(tokenizer="gpt2"), ())


@pytest.fixture(scope="module")
def bpe():
  return tokenizer_lib.build_tokenizer(
      _data_config(tokenizer="bpe", bpe_vocab_size=400), TINY_CORPUS)


def test_gpt2_hello_world_ids(gpt2):
  assert gpt2.encode("Hello world") == [15496, 995]
  assert gpt2.vocab_size == 50257
  assert gpt2.eos_id == 50256
  assert gpt2.kind == "gpt2"


def test_gpt2_round_trip(gpt2):
  for text in TINY_CORPUS + ["", " leading space", "tabs\tand\nnewlines\n"]:
    assert gpt2.decode(gpt2.encode(text)) == text


def test_gpt2_literal_eos_is_plain_text(gpt2):
  ids = gpt2.encode("a<|endoftext|>b")
  assert gpt2.eos_id not in ids
  assert gpt2.decode(ids) == "a<|endoftext|>b"


def test_gpt2_encode_batch_matches(gpt2):
  assert gpt2.encode_batch(TINY_CORPUS) == [gpt2.encode(t) for t in TINY_CORPUS]


def test_gpt2_save_load_round_trip(gpt2, tmp_path):
  tokenizer_lib.save_tokenizer(gpt2, tmp_path / "tok")
  loaded = tokenizer_lib.load_tokenizer(tmp_path / "tok")
  assert loaded.kind == "gpt2"
  assert loaded.encode("Hello world") == [15496, 995]
  assert loaded.fingerprint == gpt2.fingerprint


def test_bpe_trains_with_eos(bpe):
  assert bpe.kind == "bpe"
  assert 257 <= bpe.vocab_size <= 400
  assert 0 <= bpe.eos_id < bpe.vocab_size
  for text in TINY_CORPUS:
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


def test_bpe_encodes_unseen_bytes(bpe):
  # Byte-level BPE has all 256 byte symbols, so unseen characters still encode.
  text = "\u0416\u0436 \U0001f600 zebra"
  assert bpe.decode(bpe.encode(text)) == text


def test_bpe_literal_eos_is_plain_text(bpe):
  ids = bpe.encode("x<|endoftext|>y")
  assert bpe.eos_id not in ids
  assert bpe.decode(ids) == "x<|endoftext|>y"


def test_bpe_save_load_round_trip(bpe, tmp_path):
  directory = tmp_path / "tokenizer"
  tokenizer_lib.save_tokenizer(bpe, directory)
  assert (directory / "tokenizer.json").exists()
  loaded = tokenizer_lib.load_tokenizer(directory)
  assert loaded.vocab_size == bpe.vocab_size
  assert loaded.eos_id == bpe.eos_id
  assert loaded.fingerprint == bpe.fingerprint
  assert loaded.encode_batch(TINY_CORPUS) == bpe.encode_batch(TINY_CORPUS)
  assert loaded.encode("a<|endoftext|>b") == bpe.encode("a<|endoftext|>b")


def test_save_replaces_existing_directory(gpt2, bpe, tmp_path):
  directory = tmp_path / "tokenizer"
  tokenizer_lib.save_tokenizer(gpt2, directory)
  tokenizer_lib.save_tokenizer(bpe, directory)
  assert tokenizer_lib.load_tokenizer(directory).kind == "bpe"
  assert not (directory / "encoder.json").exists()
  assert [p.name for p in tmp_path.iterdir()] == ["tokenizer"]


def test_load_missing_directory_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nothing"))):
    tokenizer_lib.load_tokenizer(tmp_path / "nothing")


def test_load_invalid_config_json_raises(bpe, tmp_path):
  tokenizer_lib.save_tokenizer(bpe, tmp_path)
  (tmp_path / "tokenizer_config.json").write_text("{not json")
  with pytest.raises(ValueError, match="tokenizer_config.json is invalid"):
    tokenizer_lib.load_tokenizer(tmp_path)


def test_load_corrupt_json_raises(bpe, tmp_path):
  tokenizer_lib.save_tokenizer(bpe, tmp_path)
  (tmp_path / "tokenizer.json").write_text('{"truncated": ')
  with pytest.raises(ValueError, match="Failed to read .*tokenizer.json"):
    tokenizer_lib.load_tokenizer(tmp_path)


def test_load_vocab_mismatch_raises(bpe, tmp_path):
  tokenizer_lib.save_tokenizer(bpe, tmp_path)
  config_path = tmp_path / "tokenizer_config.json"
  config = json.loads(config_path.read_text())
  config["vocab_size"] += 1
  config_path.write_text(json.dumps(config))
  with pytest.raises(ValueError, match="records vocab_size"):
    tokenizer_lib.load_tokenizer(tmp_path)


def test_load_modified_gpt2_file_raises(gpt2, tmp_path):
  tokenizer_lib.save_tokenizer(gpt2, tmp_path)
  with open(tmp_path / "vocab.bpe", "a") as f:
    f.write("x y\n")
  with pytest.raises(ValueError, match="vocab.bpe has SHA-256"):
    tokenizer_lib.load_tokenizer(tmp_path)


def test_build_unknown_kind_raises():
  with pytest.raises(ValueError, match="Unknown config.data.tokenizer='sentencepiece'"):
    tokenizer_lib.build_tokenizer(_data_config(tokenizer="sentencepiece"), ())


def test_build_bpe_too_small_vocab_raises():
  with pytest.raises(ValueError, match="bpe_vocab_size=100 is too small"):
    tokenizer_lib.build_tokenizer(
        _data_config(tokenizer="bpe", bpe_vocab_size=100), TINY_CORPUS)


def _text_dir_config(tmp_path: pathlib.Path, **data_overrides):
  text_dir = tmp_path / "texts"
  text_dir.mkdir(exist_ok=True)
  for i, text in enumerate(TINY_CORPUS):
    (text_dir / f"doc{i}.txt").write_text(text)
  config = config_lib.base_config()
  config.data.source = "text_dir"
  config.data.text_dir = str(text_dir)
  config.data.cache_dir = str(tmp_path / "cache")
  for key, value in data_overrides.items():
    config.data[key] = value
  return config


def test_get_or_create_then_load(tmp_path):
  config = _text_dir_config(tmp_path, tokenizer="bpe", bpe_vocab_size=300)
  workdir = tmp_path / "workdir"
  created = tokenizer_lib.get_or_create_tokenizer(config, workdir)
  assert (workdir / "tokenizer" / "tokenizer_config.json").exists()
  assert created.vocab_size <= 300
  loaded = tokenizer_lib.get_or_create_tokenizer(config, workdir)
  assert loaded.fingerprint == created.fingerprint


def test_get_or_create_rejects_other_kind(tmp_path):
  config = _text_dir_config(tmp_path, tokenizer="gpt2")
  workdir = tmp_path / "workdir"
  tokenizer_lib.get_or_create_tokenizer(config, workdir)
  config.data.tokenizer = "bpe"
  with pytest.raises(ValueError, match="has a 'gpt2' tokenizer"):
    tokenizer_lib.get_or_create_tokenizer(config, workdir)
