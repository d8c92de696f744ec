"""Input pipeline: TFDS array_record documents -> token windows -> Grain batches.

1. `load_split_source` opens one split of the configured dataset (the embedded
   corpus, a text directory or a prepared TFDS dataset) as a random-access
   source of documents, preparing the first two on first use.
2. `tokenized_split` tokenizes the split once with batch encoding and caches
   the token stream on disk. The stream is every document followed by EOS,
   in source order.
3. `make_train_iterator` cuts the stream into windows of `seq_len + 1` tokens,
   shuffles the windows with Grain, and batches them. A window can cross a
   document boundary, at an EOS, as in GPT-2 style packing.

Windows of a pre-tokenized stream, rather than packed whole documents, keep
the iterator state a single index, so saving and restoring are exact and
instant. They also let the rows of one batch come from all over the split,
where a document packer fills consecutive rows from the same document.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import time

from absl import flags
from absl import logging
import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from fastk_jax import corpus
from fastk_jax import text_datasets
from fastk_jax import tokenizer as tokenizer_lib

# Batches each reader thread may prepare ahead of the training step.
_PREFETCH_BATCHES = 8
_READ_THREADS = 2


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
  """Hold an exclusive lock on `path` while preparing shared cache files.

  Processes on one host (one per GPU, say) may prepare the same dataset or
  token cache at the same time. The lock makes the later ones wait and then
  reuse the result. NOTE: on a network file system the lock works only where
  the file system supports fcntl locks.
  """
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def cache_dir(config) -> pathlib.Path:
  """Return the directory for prepared datasets and token caches."""
  return corpus.default_cache_dir(config.data)


class DocumentSource:
  """Random-access documents of one split, returned as `str`.

  It follows Grain's `RandomAccessDataSource` protocol (`__len__` and
  `__getitem__`), so `grain.MapDataset.source` accepts it.

  Attributes:
    name: Dataset name and split, for logs and errors.
    fingerprint: Hex digest of the prepared split; it keys token caches.
  """

  def __init__(self, data_source, text_key: str, name: str, fingerprint: str):
    self._data_source = data_source
    self._text_key = text_key
    self.name = name
    self.fingerprint = fingerprint

  def __len__(self) -> int:
    return len(self._data_source)

  def __getitem__(self, index: int) -> str:
    value = self._data_source[index][self._text_key]
    if isinstance(value, bytes):
      return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype.kind in "SO":
      return value.item().decode("utf-8")
    return str(value)

  def __repr__(self) -> str:
    return f"DocumentSource({self.name}, {len(self)} documents)"


def _prepared_builder(config) -> tuple[tfds.core.DatasetBuilder, str]:
  """Return the prepared TFDS builder of the configured dataset and text key."""
  data = config.data
  if data.source == "embedded":
    with _file_lock(cache_dir(config) / "locks" / "embedded.lock"):
      return text_datasets.prepare_embedded_corpus(cache_dir(config)), "text"
  if data.source == "text_dir":
    # Checking the directory is cheap and gives the clearest errors, so it
    # happens before waiting for the lock.
    text_datasets.list_text_files(data.text_dir)
    with _file_lock(cache_dir(config) / "locks" / "text_dir.lock"):
      return text_datasets.prepare_text_dir(data.text_dir, cache_dir(config)), "text"
  if data.source == "tfds":
    return _tfds_builder(config), data.tfds_text_key
  raise ValueError(
      f"Unknown config.data.source={data.source!r}; choose embedded, text_dir "
      "or tfds.")


def _tfds_builder(config) -> tfds.core.DatasetBuilder:
  """Open an already prepared TFDS dataset; this never downloads."""
  name = config.data.tfds_name
  data_dir = config.data.tfds_data_dir or None
  # The `tfds build` command imports TensorFlow (tensorflow-datasets 4.9.10),
  # so the hint uses the Python API, which does not.
  build_hint = (
      f"Prepare it in Python with `tfds.builder({name!r}, data_dir="
      f"{data_dir!r}).download_and_prepare(file_format='array_record')`, or "
      "set config.data.tfds_data_dir to the directory that has it.")
  if not name:
    raise ValueError(
        "config.data.tfds_name is empty. Set it to a prepared TFDS dataset "
        "when config.data.source='tfds'.")

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as err:  # TFDS raises several types for unknown names.
    # TFDS's message for an unknown name lists every registered dataset, so
    # only its first line is kept here; the full text is in the cause.
    reason = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
    raise ValueError(
        f"Failed to open TFDS dataset {name!r} in "
        f"{data_dir or 'the default TFDS data directory'}: {reason} "
        + build_hint) from err

  if not builder.is_prepared():
    raise ValueError(
        f"TFDS dataset {name!r} is not prepared in {builder.data_dir}. "
        + build_hint)
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(
        f"TFDS dataset {name!r} in {builder.data_dir} is stored as "
        f"{builder.info.file_format.value}, which needs TensorFlow to read. "
        + build_hint)

  features = builder.info.features
  if config.data.tfds_text_key not in features:
    raise ValueError(
        f"TFDS dataset {name!r} has no feature "
        f"config.data.tfds_text_key={config.data.tfds_text_key!r}; its "
        f"features are {', '.join(features.keys())}.")
  return builder


def load_split_source(config, split: str) -> DocumentSource:
  """Open one split of the configured dataset as random-access documents.

  The embedded corpus and text directories are prepared as array_record
  datasets under the cache directory on first use. A `tfds` dataset must
  already be prepared in the array_record format.

  Args:
    config: The full config; reads `config.data`.
    split: "train", "validation" or "test" (or any split a TFDS dataset has).

  Returns:
    A `DocumentSource` whose items are document texts.

  Raises:
    ValueError: the dataset cannot be prepared or opened, or lacks `split`.
  """
  builder, text_key = _prepared_builder(config)
  splits = builder.info.splits
  if split not in splits:
    raise ValueError(
        f"Dataset {builder.info.full_name} in {builder.data_dir} has no split "
        f"{split!r}; its splits are {', '.join(splits.keys())}.")
  split_info = splits[split]
  key = json.dumps([builder.info.full_name, str(builder.data_dir), split,
                    split_info.num_examples, split_info.num_bytes, text_key])
  return DocumentSource(
      builder.as_data_source(split), text_key=text_key,
      name=f"{builder.info.full_name}:{split}",
      fingerprint=hashlib.sha256(key.encode("utf-8")).hexdigest())


@dataclasses.dataclass(frozen=True)
class TokenFile:
  """A split's token stream, cached as raw integers on disk.

  Attributes:
    path: The raw array file.
    dtype: Storage dtype (uint16 for vocabularies up to 65536, else int32).
    num_tokens: Length of the stream.
    num_documents: Documents in the stream (each followed by one EOS).
  """
  path: pathlib.Path
  dtype: str
  num_tokens: int
  num_documents: int

  def load(self) -> np.ndarray:
    """Return the stream as a read-only memory map."""
    if self.num_tokens == 0:
      return np.zeros((0,), self.dtype)
    return np.memmap(self.path, dtype=self.dtype, mode="r",
                     shape=(self.num_tokens,))


def _token_cache_dir(config, source: DocumentSource,
                     tok: tokenizer_lib.Tokenizer) -> pathlib.Path:
  return (cache_dir(config) / "tokens"
          / f"{source.fingerprint[:16]}-{tok.kind}-{tok.fingerprint[:16]}")


def _write_token_file(source: DocumentSource, tok: tokenizer_lib.Tokenizer,
                      bin_path: pathlib.Path, meta_path: pathlib.Path) -> None:
  """Tokenize `source` in batches and write the stream and its metadata."""
  dtype = np.uint16 if tok.vocab_size <= 2**16 else np.int32
  batch = tokenizer_lib.ENCODE_BATCH_DOCUMENTS
  start = time.perf_counter()
  num_tokens = 0
  tmp_path = bin_path.with_suffix(f".tmp{os.getpid()}")
  with open(tmp_path, "wb") as f:
    for first in range(0, len(source), batch):
      texts = [source[i] for i in range(first, min(first + batch, len(source)))]
      for ids in tok.encode_batch(texts):
        ids.append(tok.eos_id)
        f.write(np.asarray(ids, dtype=dtype).tobytes())
        num_tokens += len(ids)
      if first // batch % 100 == 99:
        logging.info("Tokenized %d of %d documents of %s.", first + len(texts),
                     len(source), source.name)
  os.replace(tmp_path, bin_path)
  meta = {"dtype": np.dtype(dtype).name, "num_tokens": num_tokens,
          "num_documents": len(source), "source": source.name,
          "tokenizer": repr(tok)}
  meta_path.write_text(json.dumps(meta, indent=2) + "\n")
  logging.info("Tokenized %s: %d documents, %d tokens in %.1f s.", source.name,
               len(source), num_tokens, time.perf_counter() - start)


def tokenized_split(config, tok: tokenizer_lib.Tokenizer,
                    split: str) -> TokenFile:
  """Return the split's token stream, tokenizing and caching it on first use.

  The cache lives under `cache_dir/tokens/` in a folder keyed by the prepared
  split's fingerprint and the tokenizer's, so a changed dataset or tokenizer
  never reuses stale tokens.
  """
  source = load_split_source(config, split)
  directory = _token_cache_dir(config, source, tok)
  bin_path = directory / f"{split}.bin"
  meta_path = directory / f"{split}.json"
  with _file_lock(directory / f"{split}.lock"):
    if not (meta_path.exists() and bin_path.exists()):
      _write_token_file(source, tok, bin_path, meta_path)
  meta = json.loads(meta_path.read_text())
  return TokenFile(path=bin_path, dtype=meta["dtype"],
                   num_tokens=meta["num_tokens"],
                   num_documents=meta["num_documents"])


def load_eval_tokens(config, tok: tokenizer_lib.Tokenizer,
                     split: str) -> np.ndarray:
  """Return the split's documents as one int32 stream, each followed by EOS.

  Documents keep the prepared dataset's order, which is fixed for a given
  dataset. `config.eval.max_tokens > 0` truncates the stream to that length.
  """
  tokens = tokenized_split(config, tok, split).load()
  if config.eval.max_tokens > 0:
    tokens = tokens[:config.eval.max_tokens]
  return np.asarray(tokens, dtype=np.int32)


def token_counts(config, tok: tokenizer_lib.Tokenizer) -> np.ndarray:
  """Return how often each token id occurs in the training split.

  Counts the training stream, so EOS is counted once per document. The
  result is cached beside the tokens as `train_counts.npy`.

  Returns:
    int64 array of shape [tok.vocab_size].
  """
  token_file = tokenized_split(config, tok, "train")
  counts_path = token_file.path.parent / "train_counts.npy"
  if counts_path.exists():
    counts = np.load(counts_path)
    if counts.shape == (tok.vocab_size,):
      return counts
  counts = np.bincount(token_file.load(), minlength=tok.vocab_size)
  counts = counts.astype(np.int64)
  tmp_path = counts_path.with_suffix(f".tmp{os.getpid()}.npy")
  np.save(tmp_path, counts)
  os.replace(tmp_path, counts_path)
  return counts


class _WindowReader:
  """Grain map_with_index transform: window id -> {"inputs", "targets"}.

  Window w of epoch e covers tokens [w * seq_len + o_e, (w + 1) * seq_len +
  o_e], seq_len + 1 tokens in all, where the offset o_e in [0, seq_len) is
  drawn from (seed, e). Shifting the grid every epoch shows the model new
  contexts for the same tokens. In one epoch all processes use the same offset,
  so their disjoint window ids read disjoint tokens.
  """

  def __init__(self, token_file: TokenFile, seq_len: int, seed: int,
               windows_per_epoch: int):
    self._token_file = token_file
    self._seq_len = seq_len
    self._seed = seed
    self._windows_per_epoch = windows_per_epoch
    self._tokens = None

  def __getstate__(self):
    # Grain worker processes reopen the memory map instead of pickling it.
    state = self.__dict__.copy()
    state["_tokens"] = None
    return state

  def __call__(self, index: int, window: int) -> dict[str, np.ndarray]:
    if self._tokens is None:
      self._tokens = self._token_file.load()
    epoch = index // self._windows_per_epoch
    offset = int(np.random.default_rng([self._seed % 2**32, epoch]).integers(
        self._seq_len))
    start = window * self._seq_len + offset
    tokens = np.asarray(self._tokens[start:start + self._seq_len + 1],
                        dtype=np.int32)
    return {"inputs": tokens[:-1], "targets": tokens[1:]}


def make_train_iterator(
    config,
    tok: tokenizer_lib.Tokenizer,
    *,
    split: str = "train",
    seed: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
  """Build this process's infinite, checkpointable iterator of batches.

  Windows of `seq_len + 1` tokens are shuffled anew every epoch. Process i of
  n reads windows i, i + n, i + 2n, ..., so processes read disjoint tokens.

  Save and restore the iterator with the training state, e.g. with Orbax
  `ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator))` and
  `grain.checkpoint.CheckpointRestore(iterator)`, or with `get_state()` and
  `set_state()`; the restored iterator yields the same next batch.

  Args:
    config: The full config; reads `batch_size`, `seed` and `config.data`.
    tok: The tokenizer (see `tokenizer.get_or_create_tokenizer`).
    split: Split to read.
    seed: Shuffle seed; defaults to `config.seed`.
    process_index: This process's index; defaults to `jax.process_index()`.
    process_count: Number of processes; defaults to `jax.process_count()`.

  Returns:
    A `grain.DatasetIterator` of {"inputs": int32[local_batch, seq_len],
    "targets": int32[local_batch, seq_len]}, where targets are inputs shifted
    left by one token and local_batch = config.batch_size // process_count.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  seed = config.seed if seed is None else seed
  seq_len = config.data.seq_len
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index={process_index} is not in [0, {process_count}).")
  if config.batch_size % process_count:
    raise ValueError(
        f"config.batch_size={config.batch_size} is not divisible by the "
        f"{process_count} processes; use a multiple of {process_count}.")
  local_batch = config.batch_size // process_count
  if local_batch < 1 or seq_len < 1:
    raise ValueError(
        f"config.batch_size={config.batch_size} and config.data.seq_len="
        f"{seq_len} must be positive.")

  token_file = tokenized_split(config, tok, split)
  # One window is kept in reserve so that the epoch offset never reads past
  # the end of the stream.
  num_windows = (token_file.num_tokens - 1 - seq_len) // seq_len
  if num_windows < process_count:
    raise ValueError(
        f"The {split} split has {token_file.num_tokens} tokens, too few for "
        f"one window of config.data.seq_len={seq_len} per process "
        f"({process_count} processes need {(process_count + 1) * seq_len + 1}). "
        "Lower seq_len or add text.")

  windows = grain.MapDataset.range(num_windows)[process_index::process_count]
  dataset = (
      windows.shuffle(seed=seed % 2**32)
      .repeat()
      .map_with_index(_WindowReader(token_file, seq_len, seed, len(windows)))
      .batch(local_batch, drop_remainder=True)
  )
  logging.info(
      "Train iterator: process %d of %d reads %d windows of %d tokens from %s "
      "(%d tokens), %d rows per batch.", process_index, process_count,
      len(windows), seq_len + 1, token_file.path, token_file.num_tokens,
      local_batch)
  iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES))
  if config.data.worker_count > 0:
    # Grain's worker processes read absl flags (grain 0.2.18). Outside
    # `app.run`, in tests or notebooks, use the flag defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    iter_dataset = iter_dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=config.data.worker_count))
  return iter(iter_dataset)
