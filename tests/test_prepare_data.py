"""tools/prepare_data.py: the recipes written as JSONL + manifest, and the contamination check against the benchmarks.

Small training files are built in tmp_path from real benchmark problems (planted copies) and made-up unrelated ones;
the benchmarks are the real local copies (read only).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from p2o_hpc.data import load_named, load_problems, recipe_split
from p2o_hpc.data.contamination import BenchmarkIndex, Rule, check, exact_key, words
from p2o_hpc.paths import REPO_ROOT
from p2o_hpc.records import Problem

_spec = importlib.util.spec_from_file_location("prepare_data", REPO_ROOT / "tools" / "prepare_data.py")
prepare_data = importlib.util.module_from_spec(_spec)
sys.modules["prepare_data"] = prepare_data  # its dataclasses look their module up there
_spec.loader.exec_module(prepare_data)

BENCHMARKS = ["aime24", "math500"]  # two real benchmarks keep the tool runs short


@pytest.fixture(scope="module")
def bench():
    return {name: load_named(name) for name in BENCHMARKS}


def _long(problems, min_words=40):
    return next(p for p in problems if len(words(p.problem)) >= min_words)


def _unrelated(i: int) -> dict:
    return {"problem": f"Farmer number {i} has {i + 3} goats and buys {2 * i + 1} more at the weekly market. "
                       f"How many goats does farmer {i} own after visiting the market on day {i}?",
            "answer": str(3 * i + 4), "difficulty": 1.0 + i % 3, "type": "Toy"}


@pytest.fixture
def planted(tmp_path, bench):
    """A small DeepScaleR-style file: 10 unrelated rows, an exact copy and a near copy of real benchmark problems,
    and one row with a null answer."""
    copied, near_source = _long(bench["math500"]), _long(bench["aime24"])
    exact = "  ".join(copied.problem.upper().split())  # case and whitespace changed, the words kept
    near_words = near_source.problem.split()
    near_words[len(near_words) // 2] = "zebra"  # differs in the middle and at the end, keeps long runs of 13 words
    near = " ".join(near_words) + " Give the answer modulo 7."
    rows = [_unrelated(i) for i in range(10)]
    rows.insert(3, {"id": "planted-exact", "problem": exact, "answer": "1", "difficulty": 2.0})
    rows.insert(7, {"id": "planted-near", "problem": near, "answer": "2", "difficulty": 3.0})
    rows.append({"problem": "A row whose answer is missing, as DeepScaleR's MATH part has.", "answer": None})
    path = tmp_path / "train_small.json"
    path.write_text(json.dumps(rows))
    return path, copied, near_source


def _run(*argv: str) -> int:
    return prepare_data.main(list(argv))


def _args(source: Path, out: Path, *extra: str) -> list[str]:
    return ["--out", str(out), "--recipes", "deepscaler", "--source", f"deepscaler={source}", "--holdout", "0",
            "--take", "1000", "--benchmarks", *BENCHMARKS, *extra]


def test_normalisation_ignores_case_spacing_latex_spacing_and_punctuation():
    assert exact_key(r"Find $\dfrac{1}{2} \, x^{2}$ ,  now!") == exact_key(r"find \frac{1}{2}x^2, NOW")
    assert exact_key("Compute 15a^2 - 3.") == exact_key("compute $15 a^{2}-3$")
    assert exact_key("Compute 15a^2 - 3.") != exact_key("Compute 15a^2 - 4.")
    assert words(r"\left( \leftarrow x \right)") == ["leftarrow", "x"]


def test_planted_rows_are_found_by_the_right_check_and_unrelated_rows_are_not(planted, tmp_path, bench):
    path, copied, near_source = planted
    out = tmp_path / "out"
    assert _run(*_args(path, out)) == 0
    report = json.loads((out / "CONTAMINATION.json").read_text())
    pairs = {pair["benchmark"]: pair for pair in report["pairs"]}
    math500, aime24 = pairs["math500"], pairs["aime24"]
    assert math500["exact"] == 1 and math500["contaminated_train_ids"] == ["planted-exact"]
    assert math500["examples"][0]["benchmark_id"] == copied.id
    assert aime24["exact"] == 0 and aime24["ngram"] == 1 and aime24["contaminated_train_ids"] == ["planted-near"]
    assert aime24["examples"][0]["benchmark_id"] == near_source.id and aime24["examples"][0]["overlap"] < 1
    # no unrelated row matches anything, not even by one shared n-gram
    assert math500["any_ngram"] <= 1 and aime24["any_ngram"] == 1
    assert "planted-exact" in (out / "CONTAMINATION.md").read_text()


def test_one_shared_ngram_counts_only_without_the_overlap_threshold(bench):
    source = _long(bench["aime24"], min_words=60)
    window = " ".join(words(source.problem)[5:18])  # exactly one 13-gram of the benchmark problem
    train = {"t": [Problem("one-gram", f"Unrelated opening about goats. {window}. Unrelated ending.", "0", "test")]}
    index = BenchmarkIndex({"aime24": bench["aime24"]})
    default, = check(train, index)
    assert default.any_ngram == 1 and default.hits == []
    plain, = check(train, index, rule=Rule(min_overlap=0.0))
    assert [hit.train_id for hit in plain.hits] == ["one-gram"] and not plain.hits[0].exact


def test_drop_contaminated_removes_exactly_the_planted_rows(planted, tmp_path):
    path, _, _ = planted
    out = tmp_path / "out"
    assert _run(*_args(path, out, "--drop-contaminated", "--fail-on-contamination")) == 0  # dropped: nothing left
    kept = {p.id for p in load_problems(out / "deepscaler" / "train.jsonl")}
    selected = {p.id for p in recipe_split(str(path), "deepscaler", holdout=0, take=1000).train}
    assert selected - kept == {"planted-exact", "planted-near"} and kept <= selected
    manifest = json.loads((out / "MANIFEST.json").read_text())
    (entry,) = manifest["sets"]
    assert entry["counts"]["dropped_contaminated"] == 2 and entry["counts"]["train"] == len(kept)
    assert entry["contaminated_train_ids"] == {"planted-exact": ["math500"], "planted-near": ["aime24"]}


def test_fail_on_contamination_exits_1_when_hits_stay(planted, tmp_path):
    path, _, _ = planted
    assert _run(*_args(path, tmp_path / "out", "--fail-on-contamination")) == 1


def test_written_files_read_back_as_the_recipe_and_manifest_hashes_match(planted, tmp_path):
    path, _, _ = planted
    out = tmp_path / "out"
    assert _run(*_args(path, out, "--holdout", "3")) == 0
    split = recipe_split(str(path), "deepscaler", holdout=3, take=1000)
    assert load_problems(out / "deepscaler" / "train.jsonl", label=str(path)) == split.train
    assert load_problems(out / "deepscaler" / "holdout.jsonl", label=str(path)) == split.holdout
    manifest = json.loads((out / "MANIFEST.json").read_text())
    (entry,) = manifest["sets"]
    for part in ("train", "holdout"):
        info = entry["outputs"][part]
        assert hashlib.sha256((out / info["path"]).read_bytes()).hexdigest() == info["sha256"]
        assert info["rows"] == len(getattr(split, part))
    (source_file,) = entry["source"]["files"]
    assert source_file["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and source_file["rows"] == 13
    counts = entry["counts"]
    assert counts["source_rows"] == 13 and counts["dropped_unanswered"] == 1
    assert counts["selected_train"] + counts["selected_holdout"] == 13
    assert (out / "MANIFEST.md").read_text().count("| deepscaler |") == 1


def test_real_deepmath_recipe_reads_back_and_reports_its_size(tmp_path):
    out = tmp_path / "out"
    assert _run("--out", str(out), "--recipes", "deepmath", "--examples", "1") == 0
    split = recipe_split("deepmath_partial", "deepmath")
    assert load_problems(out / "deepmath_partial" / "train.jsonl", label="deepmath_partial") == split.train
    manifest = json.loads((out / "MANIFEST.json").read_text())
    (entry,) = manifest["sets"]
    assert (entry["counts"]["train"], entry["counts"]["holdout"]) == (len(split.train), len(split.holdout))
    assert any("fewer than take=5000" in note for note in manifest["notes"])
    assert set(entry["contamination"]) == {"aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench"}


@pytest.mark.parametrize("content, needle", [
    ("[{\"problem\": \"What is 1+1?\", \"answer\": \"2\"}, {\"answer\": \"3\"}]", "index 1: missing problem field"),
    ("[{\"problem\": \"What is 1+1?\", \"answer\": \"2\"}", "invalid JSON at line 1"),
])
def test_bad_input_is_a_clear_error_naming_the_file_and_row(tmp_path, capsys, content, needle):
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert _run(*_args(path, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert str(path) in " ".join(err.split()) and needle in " ".join(err.split()) and "Traceback" not in err
    assert not (tmp_path / "out" / "MANIFEST.json").exists()


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    assert _run("--out", str(tmp_path), "--source", "deepscaler") == 2
    assert "expected RECIPE=SOURCE" in capsys.readouterr().err
    assert _run(*_args(tmp_path / "missing.json", tmp_path / "out")) == 2
    assert "no such file" in capsys.readouterr().err
    assert _run(*_args(tmp_path / "missing.json", tmp_path / "out", "--min-overlap", "2")) == 2
