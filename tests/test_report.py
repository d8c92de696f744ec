"""fastk_jax.report on synthetic evaluation JSONs."""

import json
import os
import subprocess
import sys

import pytest

from fastk_jax import report

from conftest import ROOT


def _results(heads, *, perplexity, fastk, top1, step=100, context=64,
             stride=32, per_head=None, recall=0.6, win_counts=None):
  """An evaluation JSON with the layout evaluate.evaluate_state writes.

  Fast-K uses K = 50 and the utilization pilot, so with the default win
  counts (a tie) the pilot is head 0. The mixture's top-50 accuracy is
  top1 + 0.5.
  """
  oracle = perplexity / (1.5 if heads > 1 else 1.0)
  top_n = {"1": top1, "5": top1 + 0.2, "10": top1 + 0.3, "50": top1 + 0.5}
  buckets = []
  for i, name in enumerate(("<10", "10-100", "100-1k", ">=1k")):
    buckets.append({
        "name": name, "min_count": [0, 10, 100, 1000][i],
        "max_count": [10, 100, 1000, None][i], "tokens": [5, 50, 300, 645][i],
        "perplexity": perplexity * (10 - 2 * i), "oracle_perplexity": oracle,
        "fastk_perplexity": fastk * (10 - 2 * i), "unigram_perplexity": 900.0,
        "per_head_perplexity": [perplexity] * heads, "shortlist_recall": 0.1 * i,
        "top1_accuracy": top1, "fastk_top1_accuracy": top1,
        "top_n_accuracy": {"mixture": top_n, "fastk": top_n, "best_head": top_n},
    })
  return {
      "step": step, "split": "test", "tokens": 1000, "context_length": context,
      "stride": stride, "num_lm_heads": heads, "vocab_size": 2048,
      "perplexity": perplexity, "oracle_perplexity": oracle,
      "fastk_perplexity": fastk, "unigram_perplexity": 500.0,
      "per_head_perplexity": (
          per_head or [perplexity * (1 + h) for h in range(heads)]),
      "best_head": 0, "top1_accuracy": top1, "fastk_top1_accuracy": top1,
      "shortlist_recall": recall, "top_n_accuracy": {
          "mixture": top_n, "fastk": top_n, "best_head": top_n},
      "buckets": buckets,
      "decode": {"decoder": "fastk", "top_k": 50, "pilot": "utilization",
                 "pilot_head": 0, "combine": "max"},
      "win_counts": win_counts or [10] * heads,
  }


def _write_run(root, name, seed, results, epsilon=0.0):
  workdir = os.path.join(root, name)
  os.makedirs(os.path.join(workdir, "eval"))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"seed": seed, "loss": {"wta_epsilon": epsilon},
               "model": {"num_lm_heads": results["num_lm_heads"]}}, f)
  with open(os.path.join(workdir, "eval", f"step_{results['step']}.json"), "w") as f:
    json.dump(results, f)
  return workdir


# Strict P = 4: every head is worse than the unigram model (perplexity 500),
# and head 1, the pilot (most wins), covers 0.3 of the targets.
STRICT_HEADS = [600.0, 900.0, 5000.0, 9000.0]
# Relaxed P = 4: every head is below the unigram perplexity.
RELAXED_HEADS = [40.0, 45.0, 50.0, 55.0]
WIN_COUNTS = [10, 40, 30, 20]


@pytest.fixture
def sweep_root(tmp_path):
  """P = 1, strict P = 4 and relaxed P = 4 (epsilon 0.3), three seeds each.

  Against P = 1, strict P = 4 has perplexity 35, 36, 37 against 40, 41, 42
  (better by 5, standard error 0.82), Fast-K perplexity 41, 42, 43 against
  40, 41, 42 (within noise) and top-1 accuracy 0.25, 0.26, 0.27 against
  0.30, 0.31, 0.32 (worse).

  Against strict P = 4, relaxed P = 4 has perplexity 35.5, 36.5, 37.5 (within
  noise), Fast-K perplexity 36, 37, 38 (better by 5), shortlist recall 0.62
  against 0.3 and top-1 accuracy 0.33, 0.34, 0.35 (better).
  """
  root = str(tmp_path / "sweep")
  for seed in range(3):
    _write_run(root, f"heads=1,seed={seed}", seed, _results(
        1, perplexity=40.0 + seed, fastk=40.0 + seed, top1=0.30 + 0.01 * seed))
    _write_run(root, f"heads=4,seed={seed}", seed, _results(
        4, perplexity=35.0 + seed, fastk=41.0 + seed, top1=0.25 + 0.01 * seed,
        per_head=[p + seed for p in STRICT_HEADS], recall=0.3,
        win_counts=WIN_COUNTS))
    _write_run(root, f"heads=4,seed={seed},wta_epsilon=0.3", seed, _results(
        4, perplexity=35.5 + seed, fastk=36.0 + seed, top1=0.33 + 0.01 * seed,
        per_head=[p + seed for p in RELAXED_HEADS], recall=0.62,
        win_counts=WIN_COUNTS), epsilon=0.3)
  os.makedirs(os.path.join(root, "not_a_run"))  # No eval JSON: ignored.
  return root


def test_mean_std():
  stats = report.mean_std([1.0, 2.0, 3.0, None])
  assert stats == {"mean": 2.0, "std": 1.0, "n": 3}
  assert report.mean_std([5.0]) == {"mean": 5.0, "std": None, "n": 1}
  assert report.mean_std([None]) == {"mean": None, "std": None, "n": 0}
  assert report.format_mean_std({"mean": 2.0, "std": 1.0, "n": 3}) == "2.00 ± 1.00"
  assert report.format_mean_std({"mean": 5.0, "std": None, "n": 1}) == "5.00"


def test_compare_uses_standard_error():
  base = {"mean": 10.0, "std": 1.0, "n": 3}
  # Standard error sqrt(2 / 3) = 0.816, so differences beyond 1.63 count.
  assert report.compare(base, {"mean": 8.0, "std": 1.0, "n": 3}, True) == "better"
  assert report.compare(base, {"mean": 9.0, "std": 1.0, "n": 3}, True) == "unclear"
  assert report.compare(base, {"mean": 12.0, "std": 1.0, "n": 3}, True) == "worse"
  assert report.compare(base, {"mean": 12.0, "std": 1.0, "n": 3}, False) == "better"
  assert report.compare(base, {"mean": None, "std": None, "n": 0}, True) is None


def test_load_runs_groups_and_newest_step(sweep_root):
  # An older evaluation of one run must be ignored.
  older = _results(4, perplexity=99.0, fastk=99.0, top1=0.0, step=50)
  with open(os.path.join(sweep_root, "heads=4,seed=0", "eval", "step_50.json"),
            "w") as f:
    json.dump(older, f)
  runs = report.load_runs(sweep_root)
  assert [(r["num_lm_heads"], r["wta_epsilon"], r["seed"]) for r in runs] == [
      (1, 0.0, 0), (1, 0.0, 1), (1, 0.0, 2), (4, 0.0, 0), (4, 0.0, 1),
      (4, 0.0, 2), (4, 0.3, 0), (4, 0.3, 1), (4, 0.3, 2)]
  assert runs[3]["results"]["step"] == 100
  groups = report.group_runs(runs)
  assert list(groups) == [(1, 0.0), (4, 0.0), (4, 0.3)]
  stats = report.aggregate(groups[(4, 0.0)], lambda r: r["perplexity"])
  assert stats == {"mean": 36.0, "std": 1.0, "n": 3}
  stats = report.aggregate(groups[(4, 0.3)], lambda r: r["perplexity"])
  assert stats == {"mean": 36.5, "std": 1.0, "n": 3}


def test_load_runs_without_epsilon(tmp_path):
  root = str(tmp_path / "sweep")
  workdir = _write_run(root, "a", 0, _results(2, perplexity=30.0, fastk=30.0,
                                              top1=0.3))
  os.remove(os.path.join(workdir, "config.json"))
  _write_run(root, "b", 1, _results(2, perplexity=31.0, fastk=31.0, top1=0.3),
             epsilon=0.1)
  runs = report.load_runs(root)
  # An unknown epsilon sorts after the known ones and forms its own group.
  assert [(r["name"], r["seed"], r["wta_epsilon"]) for r in runs] == [
      ("b", 1, 0.1), ("a", None, None)]
  assert list(report.group_runs(runs)) == [(2, 0.1), (2, None)]
  assert report.format_epsilon(None) == "n/a"
  assert report.setting_label((2, 0.1)) == "P = 2, ε = 0.1"


def test_pilot_head_by_strategy():
  results = _results(4, perplexity=30.0, fastk=30.0, top1=0.3,
                     per_head=[1.0, 2.0, 3.0, 4.0], win_counts=[5, 9, 9, 1])
  assert report.pilot_head(results) == 1  # Most wins, lowest index on ties.
  results["decode"].update(pilot="fixed", pilot_head=3)
  assert report.pilot_head(results) == 3
  results["decode"]["pilot"] = "round_robin"
  assert report.pilot_head(results) is None


def test_load_runs_without_evaluations_fails(tmp_path):
  with pytest.raises(FileNotFoundError, match="No evaluated runs"):
    report.load_runs(str(tmp_path))


def test_markdown_tables_and_findings(sweep_root):
  runs = report.load_runs(sweep_root)
  markdown = report.render_markdown(runs, sweep_root=sweep_root)
  # Protocol and the mean ± std cells.
  assert "context length 64, stride 32" in markdown
  assert "context 64, stride 32" in markdown
  assert "| 4 | 0 | 3 | 36.00 ± 1.00 | 24.00 ± 0.67 | 42.00 ± 1.00 |" in markdown
  assert "| 4 | 0.3 | 3 | 36.50 ± 1.00 | 24.33 ± 0.67 | 37.00 ± 1.00 |" in markdown
  assert "| 1 | 0 | 3 | 41.00 ± 1.00 | 41.00 ± 1.00 | 41.00 ± 1.00 |" in markdown
  assert "| 4 | 0 | mixture | 0.260 ± 0.010 | 0.460 ± 0.010 |" in markdown
  assert "| 4 | 0.3 | Fast-K | 0.340 ± 0.010 |" in markdown
  # Rare-token rows: bucket <10 has perplexity 10x the overall one.
  assert "| <10 | 4 | 0 | 5 | 360.00 ± 10.00 |" in markdown
  assert "| heads=4,seed=0,wta_epsilon=0.3 | 4 | 0.3 | 0 | 35.50 |" in markdown

  gains = markdown.split("## What multi-head training buys over P = 1")[1]
  gains, rest = gains.split("## What it does not buy")
  assert ("Better perplexity (uniform mixture): 36.00 ± 1.00 at P = 4, ε = 0 "
          "against 41.00 ± 1.00 at P = 1 (difference -5.00).") in gains
  assert ("Better Fast-K perplexity: 37.00 ± 1.00 at P = 4, ε = 0.3 against "
          "41.00 ± 1.00 at P = 1 (difference -4.00).") in gains
  assert "Fast-K perplexity: 42.00" not in gains
  rest = rest.split("## Strict against relaxed winner-take-all")[0]
  assert ("No clear change in Fast-K perplexity (within 2 standard errors "
          "over seeds): 42.00 ± 1.00 at P = 4, ε = 0") in rest
  assert ("Worse top-1 accuracy of the mixture: 0.260 ± 0.010 at P = 4, "
          "ε = 0") in rest
  assert "At P = 4, ε = 0 the oracle perplexity is 24.00 ± 0.67" in rest
  assert "At P = 4, ε = 0.3 the oracle perplexity is 24.33 ± 0.67" in rest
  assert "not the perplexity of any predictor" in rest

  strict_relaxed = markdown.split(
      "## Strict against relaxed winner-take-all")[1].split("##")[0]
  assert ("At P = 4, no clear difference in perplexity (uniform mixture) "
          "between relaxed and strict WTA (within 2 standard errors over "
          "seeds): 36.50 ± 1.00 at ε = 0.3 against 36.00 ± 1.00 at ε = 0 "
          "(difference +0.50, ratio 1.01).") in strict_relaxed
  assert ("At P = 4, relaxed WTA improves Fast-K perplexity: 37.00 ± 1.00 at "
          "ε = 0.3 against 42.00 ± 1.00 at ε = 0 (difference -5.00, ratio "
          "0.881).") in strict_relaxed
  assert ("At P = 4, relaxed WTA improves shortlist recall of the Fast-K "
          "pilot: 0.620 ± 0.000 at ε = 0.3 against 0.300 ± 0.000 at ε = 0 "
          "(difference +0.320).") in strict_relaxed
  assert ("At P = 4, relaxed WTA improves top-1 accuracy of Fast-K: "
          "0.340 ± 0.010 at ε = 0.3") in strict_relaxed

  checks = markdown.split("## Checks")[1].split("##")[0]
  assert "below its add-one unigram perplexity" in checks
  assert "satisfies oracle <= perplexity <= P x oracle" in checks
  assert "No decode benchmark found" in markdown


def test_specialization_explains_fastk(sweep_root):
  markdown = report.render_markdown(report.load_runs(sweep_root),
                                    sweep_root=sweep_root)
  section = markdown.split("## Why Fast-K depends on the WTA setting")[1]
  section = section.split("## Checks")[0]
  assert ("| 4 | 0 | 36.00 ± 1.00 | 601.00 ± 1.00 | 9001.00 ± 1.00 | "
          "901.00 ± 1.00 | 0.400 ± 0.000 | 0.760 ± 0.010 | 0.300 ± 0.000 | "
          "42.00 ± 1.00 |") in section
  strict, relaxed = [line for line in section.splitlines()
                     if line.startswith("- At P = 4")]
  assert strict.startswith(
      "- At P = 4, ε = 0, no single head is a usable distribution over the "
      "full vocabulary. Even the best head has perplexity 601.00 ± 1.00 "
      "(the worst 9001.00 ± 1.00), above the add-one unigram perplexity "
      "500.00 ± 0.00")
  assert "Under strict WTA a head's loss covers only the tokens it wins" in strict
  assert ("won 0.400 ± 0.000 of the training tokens and has perplexity "
          "901.00 ± 1.00 on its own") in strict
  assert ("Its top-50 contains 0.300 ± 0.000 of the targets, against "
          "0.760 ± 0.010 for the mixture's top-50.") in strict
  assert "at least 0.460 of the targets" in strict
  assert ("Fast-K gives a target outside the shortlist the pilot's own "
          "probability, and its perplexity is 42.00 ± 1.00") in strict

  assert relaxed.startswith(
      "- At P = 4, ε = 0.3, every head is a usable distribution over the "
      "full vocabulary. Head perplexities run from 41.00 ± 1.00 (best head) "
      "to 56.00 ± 1.00 (worst head)")
  assert ("500.00 ± 0.00. The worst head is within a factor 1.53 of the "
          "mixture's 36.50 ± 1.00") in relaxed
  assert "loss weight ε / (P - 1) = 0.1 on each token it does not win" in relaxed
  assert "Its top-50 contains 0.620 ± 0.000 of the targets" in relaxed
  assert "Under strict WTA" not in relaxed


def test_specialization_mixed_runs(tmp_path):
  root = str(tmp_path / "sweep")
  _write_run(root, "usable", 0, _results(
      2, perplexity=30.0, fastk=30.0, top1=0.3, per_head=[40.0, 50.0]))
  _write_run(root, "split", 1, _results(
      2, perplexity=30.0, fastk=30.0, top1=0.3, per_head=[600.0, 700.0]))
  lines = report.specialization_lines(
      report.group_runs(report.load_runs(root)))
  assert len(lines) == 1
  assert lines[0].startswith(
      "At P = 2, ε = 0, every head is below the add-one unigram perplexity "
      "500.00 ± 0.00 in 1 of 2 runs, and no head is in 1:")


def test_strict_relaxed_needs_both_settings(tmp_path):
  root = str(tmp_path / "sweep")
  _write_run(root, "strict", 0, _results(2, perplexity=30.0, fastk=30.0,
                                         top1=0.3))
  markdown = report.render_markdown(report.load_runs(root), sweep_root=root)
  assert ("- No P has both strict (ε = 0) and relaxed (ε > 0) runs."
          in markdown)


def test_mixed_protocol_and_missing_baseline(tmp_path):
  root = str(tmp_path / "sweep")
  _write_run(root, "a", 0, _results(2, perplexity=30.0, fastk=30.0, top1=0.3))
  _write_run(root, "b", 1, _results(2, perplexity=31.0, fastk=31.0, top1=0.3,
                                    context=128, stride=64))
  markdown = report.render_markdown(report.load_runs(root), sweep_root=root)
  assert "**Warning:** the runs differ in context length (64, 128)" in markdown
  assert "There are no P = 1 runs" in markdown


def test_bounds_and_unigram_violations_are_flagged(tmp_path):
  root = str(tmp_path / "sweep")
  bad = _results(2, perplexity=600.0, fastk=600.0, top1=0.1)
  bad["oracle_perplexity"] = 100.0  # 600 > 2 * 100 breaks the upper bound.
  _write_run(root, "bad", 0, bad)
  markdown = report.render_markdown(report.load_runs(root), sweep_root=root)
  assert "**Not better than the unigram baseline:** bad." in markdown
  assert "**Bound oracle <= perplexity <= P x oracle violated:** bad." in markdown


def test_benchmark_sources(tmp_path):
  bench_json = tmp_path / "bench.json"
  bench_json.write_text(json.dumps(
      [{"decoder": "fastk", "P": 4, "ms/step": 5.3},
       {"decoder": "dense", "P": 4, "ms/step": 18.4}]))
  lines = report.benchmark_lines(None, str(bench_json))
  assert "| decoder | P | ms/step |" in lines
  assert "| fastk | 4 | 5.3 |" in lines

  bench_md = tmp_path / "benchmarks.md"
  bench_md.write_text(
      "# Benchmarks\n\n## Loss memory\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
      "## Decoding speed\n\n| decoder | ms |\n|---|---|\n| Fast-K | 5.1 |\n")
  lines = report.benchmark_lines(str(bench_md), None)
  assert "| Fast-K | 5.1 |" in lines
  assert "| 1 | 2 |" not in lines  # Tables of other sections stay out.
  assert "No decode benchmark found" in report.benchmark_lines(
      str(tmp_path / "absent.md"), None)[0]


def test_command_line_writes_output(sweep_root, tmp_path):
  output = tmp_path / "docs" / "results.md"
  env = dict(os.environ, PYTHONPATH=ROOT)
  absent_md = tmp_path / "absent.md"
  subprocess.run(
      [sys.executable, "-m", "fastk_jax.report", f"--sweep_root={sweep_root}",
       f"--output={output}", f"--benchmarks_md={absent_md}",
       "--sweep_config=configs/sweep_small.py"],
      check=True, capture_output=True, text=True, cwd=ROOT, env=env)
  text = output.read_text()
  assert text.startswith("# Results")
  assert "36.00 ± 1.00" in text
  reproduce = text.split("## Reproduce")[1]
  assert (f"python launch/sweep.py --config=configs/sweep_small.py "
          f"--workdir_root={sweep_root} --run") in reproduce
  assert (f"python -m fastk_jax.report --sweep_root={sweep_root} "
          f"--output={output} --sweep_config=configs/sweep_small.py "
          f"--benchmarks_md={absent_md}") in reproduce


def test_reproduce_without_sweep_config(sweep_root):
  markdown = report.render_markdown(report.load_runs(sweep_root),
                                    sweep_root=sweep_root,
                                    benchmarks_md="docs/benchmarks.md")
  reproduce = markdown.split("## Reproduce")[1]
  assert "launch/sweep.py" not in reproduce
  assert (f"python -m fastk_jax.report --sweep_root={sweep_root} "
          "--output=docs/results.md\n") in reproduce
  assert "pass --sweep_config" in reproduce
