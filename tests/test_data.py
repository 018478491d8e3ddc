"""Datasets, recipes, prompts and the prompt loader against the real shared data copies."""

from __future__ import annotations

import json
import logging

import pytest

from p2o_hpc.data import (
    DATASETS,
    PAPER_TEMPLATE,
    DatasetError,
    Problem,
    PromptLoader,
    TemplateError,
    deepmath_recipe,
    deepscaler_recipe,
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


def test_deepscaler_recipe_sizes_determinism_disjoint(named):
    problems = named["deepscaler_partial"]
    train, holdout = deepscaler_recipe(problems)
    assert (len(train), len(holdout)) == (5000, 500)
    assert not {p.id for p in train} & {p.id for p in holdout}
    again = deepscaler_recipe(problems)
    assert [p.id for p in again.train] == [p.id for p in train]
    assert [p.id for p in again.holdout] == [p.id for p in holdout]
    other = deepscaler_recipe(problems, seed=43)
    assert [p.id for p in other.train] != [p.id for p in train]
    with pytest.raises(DatasetError, match="no training rows"):
        deepscaler_recipe(problems[:10], holdout=10)


def test_deepmath_recipe_filters_difficulty(named):
    problems = named["deepmath_partial"]
    train, holdout = deepmath_recipe(problems)
    # MANIFEST: 1570 rows with difficulty >= 7 in the partial copy -> 500 held out, 1070 train (paper: 5000).
    assert (len(train), len(holdout)) == (1070, 500)
    assert all(float(p.meta["difficulty"]) >= 7.0 for p in train + holdout)
    assert not {p.id for p in train} & {p.id for p in holdout}
    assert [p.id for p in deepmath_recipe(problems).train] == [p.id for p in train]


def test_deepmath_recipe_names_non_numeric_difficulty():
    rows = [Problem(id="ok", problem="p", answer="1", source="t", meta={"difficulty": "8"}),
            Problem(id="bad-row", problem="p", answer="1", source="t", meta={"difficulty": "hard"})]
    with pytest.raises(DatasetError, match="'bad-row'.*non-numeric difficulty: 'hard'"):
        deepmath_recipe(rows)
    with pytest.raises(DatasetError, match="'x'.*no numeric difficulty"):
        deepmath_recipe([Problem(id="x", problem="p", answer="1", source="t", meta={})])


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
    # An unused template variable (Qwen3's enable_thinking) must not crash a template that ignores it.
    assert render_prompt(tokenizer, problem, chat_template_kwargs={"enable_thinking": False}) == rendered
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
