"""Datasets, recipes, prompts and the prompt loader against the real shared data copies."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter

import pytest

from p2o_hpc.data import (
    DATASETS,
    answer_type,
    authors_split,
    balance_by_answer_type,
    recipe_split,
    PAPER_TEMPLATE,
    DatasetError,
    Problem,
    PromptLoader,
    TemplateError,
    encode_prompt,
    last_boxed,
    load_named,
    load_problems,
    render_prompt,
    render_user_turn,
)
from p2o_hpc.paths import shared_data_dir

# Row counts from shared/data/MANIFEST.md. deepscaler_partial is 975 + 7474 rows on disk, but 4 MATH rows
# (indices 886, 1009, 5328, 5330 of math.json) have a null or "" answer and are skipped for training.
EXPECTED_ROWS = {
    "math500": 500,
    "aime24": 30,
    "aime25": 30,
    "amc23": 40,
    "minerva_math": 272,
    "olympiadbench": 675,
    "deepscaler_partial": 975 + 7474 - 4,
    "deepmath_partial": 4994,
}


@pytest.fixture(scope="module")
def named():
    return {name: load_named(name) for name in DATASETS}


# ---------------------------------------------------------------------------------------------- loading


def test_every_named_dataset_loads_with_manifest_counts(named):
    assert set(named) == set(EXPECTED_ROWS)
    for name, problems in named.items():
        assert len(problems) == EXPECTED_ROWS[name], name
        assert len({p.id for p in problems}) == len(problems), f"{name}: ids not unique"
        for p in problems:
            assert isinstance(p, Problem) and p.source == name
            assert p.problem.strip() and p.answer.strip(), (name, p.id)


def test_field_resolution_per_format(named):
    aime24 = named["aime24"]
    assert aime24[0].id == "60" and aime24[0].answer == "204"
    assert "025" in [p.answer for p in aime24]  # zero-padded AIME answers stay text
    assert named["aime25"][0].id == "aime25/test:0" and named["aime25"][0].answer == "70"
    assert [p.answer for p in named["amc23"][:3]] == ["27", "36", "45"]  # stored as 27.0 floats
    assert named["math500"][0].id == "test/precalculus/807.json" and named["math500"][0].meta["level"] == 2
    assert named["minerva_math"][0].answer == "1.6"  # last \boxed{} of the solution
    olympiad = {p.id: p for p in named["olympiadbench"]}
    assert olympiad["1606"].answer == "2"
    assert "$" not in "".join(p.answer for p in named["olympiadbench"])
    deepscaler = named["deepscaler_partial"]
    assert deepscaler[0].id == "aime:0" and deepscaler[975].id == "math:0"
    assert named["deepmath_partial"][0].meta["difficulty"] == "4.5"
    assert "messages" not in named["deepmath_partial"][0].meta


def test_strict_load_of_deepscaler_math_names_the_null_answer():
    path = shared_data_dir() / "train/deepscaler_partial/math.json"
    with pytest.raises(DatasetError, match=r"math\.json index 886: field 'answer' is empty or null"):
        load_problems(path)


def test_skipped_rows_are_logged(caplog):
    path = shared_data_dir() / "train/deepscaler_partial/math.json"
    with caplog.at_level(logging.WARNING, logger="p2o_hpc.data.datasets"):
        problems = load_problems(path, skip_unanswered=True)
    assert len(problems) == 7474 - 4
    assert "skipped 4 row(s)" in caplog.text and "index 5330" in caplog.text


def test_limit_and_unknown_name():
    assert [p.id for p in load_problems(shared_data_dir() / DATASETS["math500"], limit=3)] == [
        p.id for p in load_named("math500")[:3]
    ]
    assert len(load_named("deepscaler_partial", limit=980)) == 980
    with pytest.raises(DatasetError, match="unknown dataset 'nope'.*math500"):
        load_named("nope")
    with pytest.raises(DatasetError, match="limit"):
        load_problems(shared_data_dir() / DATASETS["math500"], limit=0)


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_bad_json_line_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", ['{"problem": "1+1", "answer": "2"}', "", '{"problem": "x", "answer":'])
    with pytest.raises(DatasetError, match=r"bad\.jsonl line 3: invalid JSON"):
        load_problems(path)


def test_missing_answer_names_file_index_and_field(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"problem": "1+1", "answer": "2"}, {"problem": "2+2"}]), encoding="utf-8")
    with pytest.raises(DatasetError, match=r"rows\.json index 1: missing answer field"):
        load_problems(path)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("[1, 2]", r"line 2: expected a JSON object, got list"),
        ('{"answer": "3"}', r"line 2: missing problem field"),
        ('{"problem": "  ", "answer": "3"}', r"line 2: field 'problem' must be a non-empty string"),
        ('{"problem": "q", "answer": null}', r"line 2: field 'answer' is empty or null"),
        ('{"problem": "q", "solution": "no box"}', r"line 2: no answer field and no \\boxed\{\} in field 'solution'"),
    ],
)
def test_malformed_rows(tmp_path, row, message):
    path = _write_jsonl(tmp_path / "rows.jsonl", ['{"problem": "1+1", "answer": "2"}', row])
    with pytest.raises(DatasetError, match=r"rows\.jsonl " + message):
        load_problems(path)


def test_empty_and_unsupported_sources_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"empty\.jsonl has no usable rows"):
        load_problems(empty)
    (tmp_path / "empty.json").write_text("[]", encoding="utf-8")
    with pytest.raises(DatasetError, match="no usable rows"):
        load_problems(tmp_path / "empty.json")
    (tmp_path / "obj.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DatasetError, match="expected a JSON array"):
        load_problems(tmp_path / "obj.json")
    with pytest.raises(DatasetError, match="unsupported file type"):
        load_problems(tmp_path / "rows.csv")
    with pytest.raises(DatasetError, match="no such file"):
        load_problems(tmp_path / "missing.jsonl")


def test_invalid_utf8_names_file_and_line(tmp_path):
    """A bare UnicodeDecodeError named neither the file nor the row."""
    bad = '{"problem": "caf\xe9", "answer": "1"}'.encode("latin-1")
    jsonl = tmp_path / "latin.jsonl"
    jsonl.write_bytes(b'{"problem": "1+1", "answer": "2"}\n\n' + bad + b"\n")
    for read in (load_problems, lambda path: recipe_split(path, None)):
        with pytest.raises(DatasetError, match=r"latin\.jsonl line 3: invalid UTF-8 \(.*byte 0xe9\)"):
            read(jsonl)
    array = tmp_path / "latin.json"
    array.write_bytes(b'[{"problem": "1+1", "answer": "2"},\n ' + bad + b"]")
    with pytest.raises(DatasetError, match=r"latin\.json line 2: invalid UTF-8"):
        load_problems(array)


def test_duplicate_ids_name_the_id_and_both_rows(tmp_path):
    """Ids key the loader, the hard set and the evolved templates: a second row with an id is an error, not a
    silent overwrite, whether the id is a row's own field or the default <stem>:<index>."""
    rows = [{"id": 7, "problem": "a", "answer": "1"}, {"problem": "b", "answer": "2"},
            {"unique_id": "7", "problem": "c", "answer": "3"}]
    path = _write_jsonl(tmp_path / "dup.jsonl", [json.dumps(r) for r in rows])
    for read in (load_problems, lambda p: recipe_split(p, None), lambda p: recipe_split(p, "deepscaler", holdout=1)):
        with pytest.raises(DatasetError, match=r"duplicate problem id '7': \S*dup\.jsonl line 1 and \S*dup\.jsonl "
                                               r"line 3"):
            read(path)
    # A row's own id equal to another row's default id ("<stem>:<index>").
    path = _write_jsonl(tmp_path / "mix.jsonl", ['{"problem": "a", "answer": "1"}',
                                                 '{"id": "mix:0", "problem": "b", "answer": "2"}'])
    with pytest.raises(DatasetError, match=r"duplicate problem id 'mix:0': \S*mix\.jsonl line 1 and \S*mix\.jsonl "
                                           r"line 2"):
        recipe_split(path, None)
    path = _write_jsonl(tmp_path / "ok.jsonl", ['{"problem": "a", "answer": "1"}', '{"problem": "b", "answer": "2"}'])
    assert [p.id for p in load_problems(path)] == ["ok:0", "ok:1"]  # default ids stay unique within a file


def test_duplicate_default_ids_across_the_files_of_a_named_dataset(tmp_path, monkeypatch):
    """Two files with one stem in a DATASETS entry would give both first rows the id "<stem>:0"."""
    import p2o_hpc.data.datasets as datasets_module

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        _write_jsonl(tmp_path / folder / "part.jsonl", ['{"problem": "q", "answer": "1"}'])
    monkeypatch.setenv("P2O_SHARED_DATA", str(tmp_path))
    monkeypatch.setitem(datasets_module.DATASETS, "two_parts", ("a/part.jsonl", "b/part.jsonl"))
    for read in (load_named, lambda name: recipe_split(name, None)):
        with pytest.raises(DatasetError, match=r"duplicate problem id 'part:0': \S*a/part\.jsonl line 1 and "
                                               r"\S*b/part\.jsonl line 1"):
            read("two_parts")


def test_a_misspelt_dataset_name_suggests_the_registered_one(tmp_path):
    """`data.train=math5000` said "unsupported file type ''": a bare word is a dataset name, so say which ones exist."""
    for read in (load_named, load_problems, lambda name: recipe_split(name, None),
                 lambda name: recipe_split(name, "deepscaler")):
        with pytest.raises(DatasetError, match=r"unknown dataset 'math5000' \(did you mean 'math500'.*\?\); known: "
                                               r"aime24, .*deepscaler_partial.*, or a \.json/\.jsonl file, or hf:"):
            read("math5000")
    with pytest.raises(DatasetError, match=r"unknown dataset 'qqqq'; known: aime24"):
        recipe_split("qqqq", None)
    with pytest.raises(DatasetError, match="unsupported file type '.csv'"):  # a path stays a path
        recipe_split(str(tmp_path / "rows.csv"), None)


def test_training_problems_reads_the_recipe_then_the_limit(tmp_path):
    from p2o_hpc.config import DataConfig
    from p2o_hpc.data import training_problems

    path = _numbered_rows(tmp_path / "rows.jsonl", 20)
    cfg = DataConfig(train=str(path), recipe="deepscaler", holdout=5, take=10, limit=3)
    expected = recipe_split(path, "deepscaler", seed=cfg.recipe_seed, holdout=5, take=10).train[:3]
    assert training_problems(cfg) == expected and len(expected) == 3
    assert len(training_problems(DataConfig(train=str(path), recipe=None))) == 20


def test_hf_source_without_datasets_package_says_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails even where it is installed
    with pytest.raises(DatasetError, match="pip install datasets"):
        load_problems("hf:HuggingFaceH4/MATH-500", split="test")


def test_hf_source_through_load_dataset(monkeypatch):
    import sys
    import types

    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return [{"question": "q0", "final_answer": "1", "difficulty": 7.5}, {"question": "q1", "final_answer": ""}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    problems = load_named("deepmath")  # a training set: the row without an answer is skipped
    assert calls == [("zwhe99/DeepMath-103K", "train")]
    assert [(p.id, p.problem, p.answer, p.source) for p in problems] == [("DeepMath-103K:0", "q0", "1", "deepmath")]
    with pytest.raises(DatasetError, match=r"hf:x/y \(split 'test'\) row 1: field 'final_answer' is empty"):
        load_problems("hf:x/y", split="test")


def test_answer_normalisation_and_ids(tmp_path):
    rows = [
        {"question": "a", "final_answer": ["$x^2$"]},
        {"prompt": "b", "ground_truth": "023", "idx": 7},
        {"problem": "c", "answer": " \\$ 5 "},
        {"problem": "d", "solution": "so \\boxed{\\frac{1}{2}} and finally \\boxed{\\{1, 2\\}}"},
    ]
    path = _write_jsonl(tmp_path / "mixed.jsonl", [json.dumps(r) for r in rows])
    got = [(p.id, p.problem, p.answer) for p in load_problems(path)]
    assert got == [
        ("mixed:0", "a", "x^2"),
        ("7", "b", "023"),
        ("mixed:2", "c", "\\$ 5"),
        ("mixed:3", "d", "\\{1, 2\\}"),
    ]


def test_last_boxed_balances_braces():
    assert last_boxed("\\boxed{\\frac{a}{b}} then \\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}") == (
        "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"
    )
    assert last_boxed("\\boxed {x}") == "x"
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("nothing") is None


# ---------------------------------------------------------------------------------------------- recipes


def _ids_of(split):
    return [p.id for p in split.train], [p.id for p in split.holdout]


def _numbered_rows(path, n, **extra):
    """n answered rows with ids r0..r{n-1} (and the same extra fields each) as a .jsonl file."""
    return _write_jsonl(path, [json.dumps({"id": f"r{i}", "problem": f"q{i}", "answer": str(i), **extra})
                               for i in range(n)])


def test_recipe_split_deepscaler_determinism_seed_and_disjoint():
    first = recipe_split("deepscaler_partial", "deepscaler")
    train, holdout = _ids_of(first)
    assert (len(train), len(holdout)) == (4999, 499)  # 5000 and 500 selected, one unanswered row dropped from each
    assert not set(train) & set(holdout)
    assert _ids_of(recipe_split("deepscaler_partial", "deepscaler")) == (train, holdout)
    other_train, other_holdout = _ids_of(recipe_split("deepscaler_partial", "deepscaler", seed=43))
    assert other_train != train and other_holdout != holdout


def test_recipe_split_holdout_and_take_sizes(tmp_path):
    path = _numbered_rows(tmp_path / "rows.jsonl", 20)
    # the rows authors_split(20, holdout=5, take=4, shuffle_first=True) picks (pinned below), in its order
    assert _ids_of(recipe_split(path, "deepscaler", holdout=5, take=4)) == (
        ["r10", "r5", "r14", "r7"], ["r4", "r0", "r2", "r19", "r11"])
    train, holdout = _ids_of(recipe_split(path, "deepscaler", holdout=5, take=100))  # take > train: all of train
    assert (len(train), len(holdout)) == (15, 5) and sorted(train + holdout) == sorted(f"r{i}" for i in range(20))
    train, holdout = _ids_of(recipe_split(path, "deepscaler", holdout=0, take=8))
    assert (len(train), holdout) == (8, [])
    path = _numbered_rows(tmp_path / "hard.jsonl", 12, difficulty=8)
    train, holdout = _ids_of(recipe_split(path, "deepmath", holdout=3, take=5, balance=False))
    assert (len(train), len(holdout)) == (5, 3) and not set(train) & set(holdout)
    assert _ids_of(recipe_split(path, "deepmath", holdout=3, take=5, balance=False, seed=7)) != (train, holdout)


def test_recipe_split_empty_train_is_an_error(tmp_path):
    path = _numbered_rows(tmp_path / "ten.jsonl", 10, difficulty=9)
    with pytest.raises(DatasetError, match="recipe left no training rows: 10 rows, 10 held out"):
        recipe_split(path, "deepscaler", holdout=10)
    with pytest.raises(DatasetError, match="no training rows"):
        recipe_split(path, "deepmath", holdout=500, balance=False)  # min(n, 500): every row held out


def test_recipe_split_deepmath_filters_difficulty_and_balances():
    train, holdout = recipe_split("deepmath_partial", "deepmath")
    # MANIFEST: 1570 rows with difficulty >= 7 in the partial copy; the authors' balancing keeps 1021 of them
    # -> 500 held out, 521 train (paper: 5000).
    assert (len(train), len(holdout)) == (521, 500)
    assert all(float(p.meta["difficulty"]) >= 7.0 for p in train + holdout)
    assert not {p.id for p in train} & {p.id for p in holdout}
    assert _ids_of(recipe_split("deepmath_partial", "deepmath")) == ([p.id for p in train], [p.id for p in holdout])
    unbalanced = recipe_split("deepmath_partial", "deepmath", balance=False)
    assert (len(unbalanced.train), len(unbalanced.holdout)) == (1070, 500)
    assert all(float(p.meta["difficulty"]) >= 7.0 for p in unbalanced.train + unbalanced.holdout)


def test_recipe_split_deepmath_filter_and_balancing_on_a_small_file(tmp_path):
    rows = [{"id": "easy", "problem": "q", "answer": "5", "difficulty": 6.5},
            {"id": "no-difficulty", "problem": "q", "answer": "5"},  # counts as 0, as x.get("difficulty", 0)
            {"id": "text-difficulty", "problem": "q", "answer": "12", "difficulty": "8"},
            {"id": "numeric", "problem": "q", "answer": "3", "difficulty": 8}]
    rows += [{"id": f"yes{i}", "problem": "q", "answer": "Yes", "difficulty": 8} for i in range(8)]
    path = _write_jsonl(tmp_path / "dm.jsonl", [json.dumps(r) for r in rows])
    hard = [r for r in rows if float(r.get("difficulty", 0)) >= 7]
    unbalanced = recipe_split(path, "deepmath", holdout=0, balance=False)
    assert [p.id for p in unbalanced.train] == [r["id"] for r in hard] and unbalanced.holdout == []
    balanced = recipe_split(path, "deepmath", holdout=0)
    order = balance_by_answer_type([float(r["difficulty"]) for r in hard], [r["answer"] for r in hard], seed=42)
    assert [p.id for p in balanced.train] == [hard[i]["id"] for i in order]
    # difficulty 8: 10 answered rows, the 2 numeric ones within their quota int(10 * 0.95) = 9, yes/no quota 0
    assert sorted(p.id for p in balanced.train) == ["numeric", "text-difficulty"]
    lower = recipe_split(path, "deepmath", holdout=0, balance=False, min_difficulty=6)
    assert [p.id for p in lower.train] == ["easy"] + [r["id"] for r in hard]


def _digest(ids) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


# The authors' selections on the shared/data copies, computed once with their own code (datasets 3.6.0 calls and
# balance_dataset_by_answer_type from scripts/data_process/DeepMath-103K.py) and pinned here: sha256 prefix of
# the selected problem ids, in order, after unanswered rows are dropped.
AUTHORS_DEEPSCALER_PARTIAL = {"train": (4999, "4e8d1d425daa55a4"), "holdout": (499, "2ba1c0070353e86f")}
AUTHORS_DEEPMATH_PARTIAL = {"train": (521, "31c51128afead519"), "holdout": (500, "34b5a8ee9f0bbd57"),
                            "balanced": (1021, "8942adfefc12b2c3")}


def _deepscaler_rows():
    root = shared_data_dir() / "train" / "deepscaler_partial"
    rows = []
    for stem in ("aime", "math"):
        for index, row in enumerate(json.loads((root / f"{stem}.json").read_text())):
            answer = row.get("answer")
            rows.append({"problem": row["problem"], "answer": None if answer is None else str(answer),
                         "id": f"{stem}:{index}"})
    return rows


def _deepmath_hub_rows():
    """The DeepMath sample under DeepMath-103K's hub field names (question, final_answer, difficulty: float)."""
    path = shared_data_dir() / "train" / "deepmath_partial" / "math_deepmath_deal.jsonl"
    return [{"id": r["id"], "question": r["prompt"], "final_answer": r["ground_truth"],
             "difficulty": float(r["difficulty"]), "r1_solution_1": "long trace"}
            for r in map(json.loads, path.read_text().splitlines())]


def test_authors_split_pinned_small_case_and_caps():
    # Dataset.from_dict({"row": range(20)}).shuffle(seed=42).train_test_split(test_size=5, seed=42), then
    # ["train"].train_test_split(test_size=4, seed=42)["test"], read off datasets 3.6.0.
    expected = ([10, 5, 14, 7], [4, 0, 2, 19, 11])
    assert authors_split(20, holdout=5, take=4, shuffle_first=True) == expected
    train, held = authors_split(30, holdout=500, take=5000, shuffle_first=False)  # min(n, 500): all held out
    assert (train, held) == ([], list(range(30)))
    train, held = authors_split(700, holdout=500, take=5000, shuffle_first=False)  # take > train: train as is
    assert len(train) == 200 and sorted(train + held) == list(range(700))
    assert authors_split(50, holdout=0, take=50, shuffle_first=False) == (list(range(50)), [])


@pytest.mark.parametrize(("n", "holdout", "take", "shuffle_first"),
                         [(8449, 500, 5000, True), (1021, 500, 5000, False), (700, 500, 100, True), (3, 1, 1, False)])
def test_authors_split_equals_the_datasets_calls(n, holdout, take, shuffle_first):
    import datasets

    table = datasets.Dataset.from_dict({"row": list(range(n))})
    if shuffle_first:
        table = table.shuffle(seed=42)
    parts = table.train_test_split(test_size=holdout, seed=42)
    train = parts["train"]
    if take < len(train):
        train = train.train_test_split(test_size=take, seed=42)["test"]
    expected = (list(train["row"]), list(parts["test"]["row"]))
    assert authors_split(n, holdout=holdout, take=take, shuffle_first=shuffle_first) == expected


def test_recipe_split_deepscaler_selects_the_authors_rows(caplog):
    """Selection over all 8449 rows (the 4 unanswered included, as the authors' scripts see them); the one
    unanswered row that lands in each split is dropped afterwards."""
    with caplog.at_level(logging.WARNING):
        train, holdout = recipe_split("deepscaler_partial", "deepscaler")
    assert "math.json index 5330" in caplog.text and "math.json index 1009" in caplog.text
    assert (len(train), _digest(p.id for p in train)) == AUTHORS_DEEPSCALER_PARTIAL["train"]
    assert (len(holdout), _digest(p.id for p in holdout)) == AUTHORS_DEEPSCALER_PARTIAL["holdout"]
    assert all(p.source == "deepscaler_partial" and p.answer for p in train + holdout)


def test_hf_deepscaler_path_equals_the_authors_datasets_calls(monkeypatch):
    """The hf: path (load_dataset stood in by a Dataset of the local rows) against scripts/data_process/
    deepscaler.py's own calls on the same Dataset."""
    import datasets

    hub = datasets.Dataset.from_list(_deepscaler_rows())
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: hub)
    shuffled = hub.shuffle(seed=42)
    split = shuffled.train_test_split(test_size=500, seed=42)
    train_5000 = split["train"].train_test_split(test_size=5000, seed=42)["test"]
    answered = lambda table: [i for i, a in zip(table["id"], table["answer"]) if a]  # noqa: E731
    got = recipe_split("deepscaler", "deepscaler")
    assert [p.id for p in got.train] == answered(train_5000)
    assert [p.id for p in got.holdout] == answered(split["test"])
    assert (len(got.train), _digest(answered(train_5000))) == AUTHORS_DEEPSCALER_PARTIAL["train"]
    assert all(p.source == "deepscaler" for p in got.train)


def test_hf_deepmath_path_equals_the_authors_datasets_calls(monkeypatch):
    """scripts/data_process/DeepMath-103K.py: filter(difficulty >= 7) -> balance -> train_test_split(500) ->
    train_test_split(min(n, 5000)) on a hub-shaped Dataset; the R1 traces are dropped before rows are read."""
    import datasets

    hub = datasets.Dataset.from_list(_deepmath_hub_rows())
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: hub)
    hard = hub.filter(lambda x: x.get("difficulty", 0) >= 7)
    order = balance_by_answer_type(hard["difficulty"], hard["final_answer"], seed=42)
    balanced = hard.select(order)
    assert (len(balanced), _digest(balanced["id"])) == AUTHORS_DEEPMATH_PARTIAL["balanced"]
    split = balanced.train_test_split(test_size=min(len(balanced), 500), seed=42)
    train = split["train"]
    if min(len(train), 5000) < len(train):
        train = train.train_test_split(test_size=5000, seed=42)["test"]
    got = recipe_split("deepmath", "deepmath")
    assert [p.id for p in got.train] == list(train["id"])
    assert [p.id for p in got.holdout] == list(split["test"]["id"])
    assert all("r1_solution_1" not in p.meta and p.meta["difficulty"] >= 7 for p in got.train)


def test_deepmath_balancing_on_the_real_sample(named):
    """The authors' answer-type balancing on the 1570 difficulty >= 7 rows: yes/no answers go from 575 to 52
    (int(1045 · 0.05) after the per-difficulty pass kept 76 of them in 1045 rows); the other types keep at most
    their sqrt-smoothed quota."""
    hard = [p for p in named["deepmath_partial"] if float(p.meta["difficulty"]) >= 7]
    before = Counter(answer_type(p.answer) for p in hard)
    assert before == {"yes_no": 575, "other": 489, "numeric": 422, "multiple_choice": 43, "interval_set": 29,
                      "text_answer": 9, "numeric_with_unit": 3}
    order = balance_by_answer_type([float(p.meta["difficulty"]) for p in hard], [p.answer for p in hard], seed=42)
    assert len(set(order)) == len(order)
    after = Counter(answer_type(hard[i].answer) for i in order)
    assert after == {"other": 467, "numeric": 418, "yes_no": 52, "multiple_choice": 43, "interval_set": 29,
                     "text_answer": 9, "numeric_with_unit": 3}
    assert (len(order), _digest(hard[i].id for i in order)) == AUTHORS_DEEPMATH_PARTIAL["balanced"]
    train, holdout = recipe_split("deepmath_partial", "deepmath")  # the local-file path selects the same rows
    assert (len(train), _digest(p.id for p in train)) == AUTHORS_DEEPMATH_PARTIAL["train"]
    assert (len(holdout), _digest(p.id for p in holdout)) == AUTHORS_DEEPMATH_PARTIAL["holdout"]


@pytest.mark.parametrize(("answer", "kind"), [
    (None, "empty"), ("", "empty"), (" Yes ", "yes_no"), ("FALSE", "yes_no"), ("B", "multiple_choice"),
    ("(c)", "multiple_choice"), ("-12", "numeric"), ("3.50", "numeric"), ("7/8", "numeric"), ("12.5%", "percentage"),
    ("3 cm", "numeric_with_unit"), ("2√3", "mathematical_symbol"), ("[0, \\infty)", "interval_set"),
    ("(1,2)", "interval_set"), ("two words", "other"), ("a b c d e f", "text_answer"),
    ("\\frac{1}{2}", "other"), ("25\\%", "other"), ("   ", "other"),
])
def test_answer_types_follow_the_authors_rules(answer, kind):
    assert answer_type(answer) == kind


def test_balancing_edge_cases():
    assert balance_by_answer_type([], []) == []
    assert balance_by_answer_type([7.0, 7.0], ["yes", "no"]) == []  # no other type: the yes/no quota is 0
    assert balance_by_answer_type([7.0], [""]) == []
    with pytest.raises(ValueError):
        balance_by_answer_type([7.0], [])


def test_recipe_split_errors_and_no_recipe(tmp_path):
    with pytest.raises(DatasetError, match="unknown recipe 'nope'"):
        recipe_split("deepmath_partial", "nope")
    ok = json.dumps({"problem": "p", "answer": "1", "difficulty": "8"})
    path = _write_jsonl(tmp_path / "t.jsonl", [ok, json.dumps({"problem": "p", "answer": "1", "difficulty": "hard"})])
    with pytest.raises(DatasetError, match=r"t\.jsonl line 2: field 'difficulty' is not numeric: 'hard'"):
        recipe_split(path, "deepmath")
    path = tmp_path / "n.json"
    path.write_text(json.dumps([json.loads(ok), {"problem": "p", "answer": "1", "difficulty": None}]), encoding="utf-8")
    with pytest.raises(DatasetError, match=r"n\.json index 1: field 'difficulty' must be a number, got None"):
        recipe_split(path, "deepmath")
    path = _write_jsonl(tmp_path / "u.jsonl", [json.dumps({"problem": "p", "answer": "1", "difficulty": 3}),
                                               json.dumps({"problem": "p", "answer": "2"})])
    with pytest.raises(DatasetError, match=r"u\.jsonl: no rows with difficulty >= 7(\.0)? among 2"):
        recipe_split(path, "deepmath")
    everything = recipe_split("aime24", None)
    assert (len(everything.train), everything.holdout) == (30, [])


# ---------------------------------------------------------------------------------------------- prompts


def test_user_turn_keeps_braces_and_validates_template():
    text = render_user_turn("What is {problem} + $\\{1\\}$?")
    assert text == (
        "Let's think step by step and output the final answer within \\boxed{}.\n"
        "Question: What is {problem} + $\\{1\\}$?"
    )
    for bad in ("Solve: {question}", "no placeholder at all", None):
        with pytest.raises(TemplateError, match="placeholder|must be a string"):
            render_user_turn("1+1", bad)


def test_render_and_encode_with_tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    problem = load_named("aime24")[0].problem
    rendered = render_prompt(tokenizer, problem)
    assert rendered.startswith("<|im_start|>user\n")
    assert "Let's think step by step and output the final answer within \\boxed{}.\nQuestion: " in rendered
    assert problem in rendered
    assert rendered.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = encode_prompt(tokenizer, problem)
    assert ids == tokenizer(rendered)["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == rendered
    # Qwen3's template (the tiny model carries it): enable_thinking=False closes an empty think block.
    non_thinking = render_prompt(tokenizer, problem, chat_template_kwargs={"enable_thinking": False})
    assert non_thinking == rendered + "<think>\n\n</think>\n\n"
    assert tokenizer.decode(encode_prompt(tokenizer, problem, chat_template_kwargs={"enable_thinking": False})) \
        == non_thinking
    # A variable the template does not use is ignored rather than an error.
    assert render_prompt(tokenizer, problem, chat_template_kwargs={"no_such_variable": 1}) == rendered
    with_system = render_prompt(tokenizer, problem, system="sys")
    assert with_system.startswith("<|im_start|>system\nsys<|im_end|>\n") and with_system.endswith(rendered)
    with pytest.raises(TemplateError, match="placeholder"):
        render_prompt(tokenizer, problem, "Q: {question}")


# ---------------------------------------------------------------------------------------------- loader


def _ids(batch):
    return [p.id for p in batch]


def _toy(n):
    return [Problem(id=f"p{i}", problem=f"q{i}", answer=str(i), source="toy", meta={}) for i in range(n)]


def test_loader_epochs_are_seeded_permutations():
    problems = _toy(10)
    loader = PromptLoader(problems, 3, seed=5)
    assert loader.steps_per_epoch == 3
    batches = [loader.next_batch() for _ in range(3)]
    assert loader.epoch_finished and (loader.epoch, loader.position) == (1, 0)
    served = sum(map(_ids, batches), [])
    assert len(set(served)) == 9 and served == [f"p{i}" for i in loader.permutation(0)[:9]]
    again = PromptLoader(problems, 3, seed=5)
    assert [_ids(again.next_batch()) for _ in range(6)] == [_ids(b) for b in batches] + [
        _ids(loader.next_batch()) for _ in range(3)
    ]
    assert _ids(PromptLoader(problems, 3, seed=6).next_batch()) != _ids(batches[0])
    tail = PromptLoader(problems, 3, seed=5, drop_last=False)
    sizes = [len(tail.next_batch()) for _ in range(4)]
    assert sizes == [3, 3, 3, 1] and tail.epoch_finished and tail.steps_per_epoch == 4


def test_loader_resume_mid_epoch_across_epoch_boundary():
    problems = load_named("amc23")
    reference = PromptLoader(problems, 6, seed=42)  # 6 steps per epoch, 4 problems dropped each epoch
    for _ in range(4):
        reference.next_batch()
    state = json.loads(json.dumps(reference.state_dict()))  # survives a JSON checkpoint
    expected = [(_ids(reference.next_batch()), reference.epoch_finished, reference.epoch) for _ in range(10)]

    resumed = PromptLoader(problems, 6, seed=42)
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.position) == (0, 4)
    got = [(_ids(resumed.next_batch()), resumed.epoch_finished, resumed.epoch) for _ in range(10)]
    assert got == expected
    assert [e for _, finished, e in got if finished] == [1, 2]


def test_loader_errors():
    with pytest.raises(ValueError, match="larger than the dataset"):
        PromptLoader(_toy(3), 4, seed=0)
    with pytest.raises(ValueError, match="at least one problem"):
        PromptLoader([], 1, seed=0)
    state = PromptLoader(_toy(10), 2, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed"):
        PromptLoader(_toy(10), 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="fingerprint"):
        PromptLoader(list(reversed(_toy(10))), 2, seed=0).load_state_dict(state)


def test_loader_defer_moves_problems_behind_the_rest_and_resumes():
    problems = [Problem(f"p{i}", f"q{i}", "1", "toy") for i in range(12)]
    loader = PromptLoader(problems, 3, seed=7)
    first = loader.next_batch()
    untouched = PromptLoader(problems, 3, seed=7).permutation(0)
    hard = {p.id for p in problems[:6]} - {p.id for p in first}
    assert loader.defer(hard) == len(hard)
    rest = [loader.next_batch() for _ in range(3)]
    served = [p.id for batch in rest for p in batch]
    assert sorted(served + [p.id for p in first]) == sorted(p.id for p in problems)  # nothing lost or repeated
    flags = [pid in hard for pid in served]
    assert flags == sorted(flags)  # every deferred problem after every other one
    kept = [problems[i].id for i in untouched[3:] if problems[i].id not in hard]
    assert [pid for pid in served if pid not in hard] == kept  # the others keep their order
    # resuming mid-epoch reproduces the deferred order; the next epoch is a plain permutation again
    again = PromptLoader(problems, 3, seed=7)
    again.load_state_dict(json.loads(json.dumps(_state_after(problems, hard, batches=2))))
    assert [p.id for p in again.next_batch()] == [p.id for p in rest[1]]
    assert loader.epoch == 1 and loader.permutation(1) == PromptLoader(problems, 3, seed=7).permutation(1)


def _state_after(problems, hard, batches):
    loader = PromptLoader(problems, 3, seed=7)
    loader.next_batch()
    loader.defer(hard)
    for _ in range(batches - 1):
        loader.next_batch()
    return loader.state_dict()
