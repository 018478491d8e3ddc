"""In-training validation (validation.*, p2o_hpc.trainer.validation): the schedule, the numbers, the template rule,
the config errors, a resume that does not log twice, the plot, and one short real run that logs val/ at the
configured steps."""

from __future__ import annotations

import json

import pytest

from p2o_hpc.algo.hooks import AlgorithmHooks
from p2o_hpc.config import RunConfig, ValidationConfig, ValidationSetConfig, to_run_config, validate, validation_sets
from p2o_hpc.data import DatasetError
from p2o_hpc.records import Problem, Rollout
from p2o_hpc.run_dir import RunDir
from p2o_hpc.trainer.rollout_side import OffPolicySchedule, RolloutSide
from p2o_hpc.trainer.validation import (
    Validator,
    is_due,
    load_validation_sets,
    set_metrics,
    validated_steps,
    with_templates_metrics,
)

# ------------------------------------------------------------------------------------------- pure numbers


def test_acc_is_the_mean_reward_and_pass_at_k_counts_problems_with_a_solved_sample():
    rows = [([1.0, 0.0, 0.0, 0.0], [10, 20, 30, 40]), ([0.0] * 4, [5] * 4), ([1.0] * 4, [1] * 4), None]
    metrics = set_metrics("m", rows)
    assert metrics == {"val/m/problems": 3, "val/m/acc": pytest.approx((0.25 + 0 + 1) / 3),
                       "val/m/pass@4": pytest.approx(2 / 3), "val/m/response_length": pytest.approx((25 + 5 + 1) / 3)}
    greedy = set_metrics("m", [([1.0], [3]), ([0.0], [5])])
    assert greedy == {"val/m/problems": 2, "val/m/acc": 0.5, "val/m/response_length": 4.0}  # K = 1: no pass@K
    assert set_metrics("m", [None, None]) == {"val/m/problems": 0}  # nothing scored: no fake accuracy


def test_with_templates_keys_come_from_the_templated_pass_or_the_plain_one_for_epsilon():
    plain = [([0.0, 0.0], [4, 4]), ([1.0, 0.0], [4, 4])]
    templated = [([1.0, 1.0], [9, 9]), ([1.0, 0.0], [9, 9])]
    assert with_templates_metrics("m", plain, templated) == {"val/m/acc_with_templates": 0.75,
                                                             "val/m/pass@2_with_templates": 1.0}
    assert with_templates_metrics("m", plain, None) == {"val/m/acc_with_templates": 0.25,
                                                        "val/m/pass@2_with_templates": 0.5}


def test_the_schedule():
    val = ValidationConfig(every_n_steps=2, before_training=True, at_end=True)
    assert [step for step in range(8) if is_due(val, step, total_steps=7)] == [0, 2, 4, 6, 7]
    assert [step for step in range(8) if is_due(ValidationConfig(every_n_steps=3), step, 7)] == [3, 6]
    assert not any(is_due(ValidationConfig(), step, 7) for step in range(8))  # the default: off


def test_a_resume_sees_which_steps_were_validated(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert validated_steps(path) == set()
    path.write_text('{"step": 0, "val/m/acc": 0.0}\n{"step": 1, "reward/mean": 0.1}\n'
                    '{"step": 2, "reward/mean": 0.1, "val/m/acc": 0.5}\n{"step": 3, "val/m/a')
    assert validated_steps(path) == {0, 2}


# ------------------------------------------------------------------------------------------- the template rule


def test_the_template_for_held_out_problems_is_the_best_on_dev_and_ties_go_to_the_earlier(tmp_path):
    run_dir = RunDir(tmp_path)
    pool = [{"template": "", "dev_mean": 0.25}, {"template": "A.", "dev_mean": 0.5}, {"template": "B.", "dev_mean": 0.5}]
    run_dir.publish_templates(0, {"assignments": {"p": ["A."]}, "pool": pool})
    assert run_dir.best_template(0) == "A."
    run_dir.publish_templates(1, {"assignments": {"p": ["A."]}, "pool": [{"template": "", "dev_mean": 0.5}, pool[1]]})
    assert run_dir.best_template(1) == ""  # nothing beat the plain prompt: ε
    run_dir.publish_templates(2, {"assignments": {"p": ["A."]}})  # a file without a pool
    assert run_dir.best_template(2) is None
    run_dir.templates(3).parent.mkdir(parents=True)
    run_dir.templates(3).write_text("{not json")
    assert run_dir.best_template(3) is None and run_dir.best_template(4) is None


def test_the_exchange_takes_the_rounds_best_template_and_the_p2o_hooks_hand_it_to_validation(tmp_path,
                                                                                             one_process_group):
    from p2o_hpc.trainer.hooks import algorithm_hooks

    cfg = RunConfig()
    cfg.algorithm.p2o.enabled = True
    hooks = algorithm_hooks(cfg, tmp_path, rank=0, console=None)
    assert hooks.validation_template() is None and AlgorithmHooks().validation_template() is None

    class Loader:
        problem_ids = frozenset({"p1"})

    RunDir(tmp_path).publish_templates(0, {"assignments": {"p1": ["A."]}, "pool": [
        {"template": "", "dev_mean": 0.0}, {"template": "A.", "dev_mean": 1.0}]})
    hooks.exchange._take(0, Loader())
    assert hooks.validation_template() == "A."
    state = json.loads(json.dumps(hooks.state_dict()))  # a resumed run scores with the same template
    hooks.exchange.best_template = None
    hooks.load_state_dict(state)
    assert hooks.validation_template() == "A."


# ------------------------------------------------------------------------------------- scoring through the engine


class ScriptedEngine:
    """Solves a problem when its answer is "1" (or, under the template "Hint.", always); refuses the template "Bad."
    and prompts whose text is "long" (as RolloutWorker.encode refuses one over data.max_prompt_tokens)."""

    def __init__(self):
        self.calls = []

    def checked_templates(self, templates):
        rejected = sum(template == "Bad." for group in templates for template in group)
        return [["" if t == "Bad." else t for t in group] for group in templates], rejected

    def encode(self, problems, templates=None):
        if any(problem.problem == "long" for problem in problems):
            raise ValueError("renders to 9999 prompt tokens > data.max_prompt_tokens")
        return [[1] for _ in problems]

    def generate(self, problems, first_prompt_index, sampling, templates=None, distill=True):
        self.calls.append({"ids": [p.id for p in problems], "sampling": sampling, "templates": templates})
        return [Rollout(first_prompt_index + i, [1], [2] * (i + 1), None, "stop", "x",
                        template=templates[i][k] if templates else "")
                for i in range(len(problems)) for k in range(sampling.n)]

    def score(self, rollouts, answers):
        for rollout, answer in zip(rollouts, answers):
            rollout.reward = 1.0 if answer == "1" or rollout.template == "Hint." else 0.0

    def sleep(self):
        pass


def validator(sets: dict[str, list[Problem]], **settings) -> Validator:
    cfg = RunConfig()
    cfg.validation = ValidationConfig(**settings)
    checked = Validator(cfg, total_steps=4)
    checked.sets = sets
    return checked


def problems(*answers: str) -> list[Problem]:
    return [Problem(f"p{i}", "long" if answer == "long" else "q", answer, "test") for i, answer in enumerate(answers)]


def test_scoring_plain_and_under_the_template_with_a_skipped_long_prompt(one_process_group):
    engine = ScriptedEngine()
    rollouts = RolloutSide(RunConfig(), engine, [0], AlgorithmHooks(), OffPolicySchedule(False, 4))
    checks = validator({"m": problems("1", "0", "long", "0")}, every_n_steps=2, with_templates=True)
    metrics = checks.run(2, rollouts, "Hint.")
    assert metrics["val/m/problems"] == 3 and metrics["val/m/acc"] == pytest.approx(1 / 3)
    assert metrics["val/m/acc_with_templates"] == 1.0
    assert metrics["val/m/response_length"] == pytest.approx(2.0)  # lengths 1, 2, 3 of the three scored
    assert "val/m/pass@1" not in metrics and metrics["time/validation"] >= 0.0
    plain_call, templated_call = engine.calls
    assert plain_call["ids"] == ["p0", "p1", "p3"] and plain_call["templates"] is None
    assert templated_call["templates"] == [["Hint."]] * 3
    assert plain_call["sampling"].temperature == 0.0 and plain_call["sampling"].n == 1  # greedy by default
    assert plain_call["sampling"].max_tokens == RunConfig().rollout.max_response_tokens
    assert checks.logged == {2} and not checks.due(2)  # a step is validated once

    no_template = checks.run(4, rollouts, None)  # a GRPO run, or no round yet
    refused = checks.run(4, rollouts, "Bad.")  # the engine's checks refuse it: no keys rather than plain numbers
    epsilon = checks.run(4, rollouts, "")  # the best on dev was the plain prompt
    assert not any(key.endswith("_with_templates") for key in {**no_template, **refused})
    assert epsilon["val/m/acc_with_templates"] == epsilon["val/m/acc"]
    off = validator({"m": problems("1")}, every_n_steps=2).run(2, rollouts, "Hint.")  # with_templates: false
    assert not any(key.endswith("_with_templates") for key in off)


def test_k_samples_give_pass_at_k_and_seeds_by_the_problems_place(one_process_group):
    engine = ScriptedEngine()
    rollouts = RolloutSide(RunConfig(), engine, [0], AlgorithmHooks(), OffPolicySchedule(False, 4))
    metrics = validator({"m": problems("1", "0")}, every_n_steps=1, n_samples=3, temperature=0.6, seed=7,
                        max_tokens=16).run(1, rollouts, None)
    assert metrics["val/m/pass@3"] == 0.5 and metrics["val/m/acc"] == 0.5
    sampling = engine.calls[0]["sampling"]
    assert (sampling.n, sampling.temperature, sampling.seed, sampling.max_tokens) == (3, 0.6, 7, 16)


# ------------------------------------------------------------------------------------------------ config


def test_sets_compose_from_the_command_line_in_both_forms():
    from test_config_schema import compose

    cfg = to_run_config(compose("+validation.sets.math500.limit=100", "+validation.sets.aime=aime24",
                                "validation.every_n_steps=30", "validation.before_training=true"))
    validate(cfg)
    assert validation_sets(cfg.validation) == {"math500": ValidationSetConfig("math500", 100),
                                               "aime": ValidationSetConfig("aime24")}
    assert RunConfig().validation.sets == {} and RunConfig().validation.every_n_steps == 0  # off by default


@pytest.mark.parametrize("validation, message", [
    ({"every_n_steps": 2}, r"validation.every_n_steps/before_training/at_end schedule a validation but "
                           r"validation.sets is empty"),
    ({"sets": {"m": "math500"}, "n_samples": 4}, r"validation.n_samples=4 needs validation.temperature > 0"),
    ({"sets": {"m": "math500"}, "max_tokens": 99999}, r"validation.max_tokens=99999 must be in \[1, "
                                                      r"rollout.max_response_tokens=12288\]"),
    ({"sets": {"m": {"data": "math500", "limt": 3}}}, r"validation.sets.m: unknown key\(s\) \['limt'\]"),
    ({"sets": {"m": {"limit": 0}}}, r"validation.sets.m.limit=0 must be an integer ≥ 1"),
    ({"sets": {"a/b": "math500"}}, r"validation.sets.a/b: a set's name is part of its metrics keys"),
    ({"sets": {"m": "math500"}, "every_n_steps": -1}, r"validation.every_n_steps=-1 must be ≥ 0"),
])  # fmt: skip
def test_bad_validation_settings_are_named(validation, message):
    with pytest.raises(ValueError, match=message):
        validate(to_run_config({"validation": validation}))


def test_an_unknown_set_fails_at_launch_naming_its_key():
    from p2o_hpc.cluster.runs import preflight

    cfg = to_run_config({"data": {"train": "math500", "recipe": None},
                         "validation": {"sets": {"m": "math500", "bench": "math5000"}, "every_n_steps": 2}})
    validate(cfg)
    with pytest.raises(DatasetError, match=r"validation\.sets\.bench\.data=math5000: unknown dataset 'math5000' "
                                           r"\(did you mean 'math500'"):
        preflight(cfg)


def test_sets_are_read_by_the_training_loader_and_cut_to_their_limit(tmp_path):
    rows = tmp_path / "held.jsonl"
    rows.write_text("".join(json.dumps({"id": f"h{i}", "problem": f"{i}+1", "answer": str(i + 1)}) + "\n"
                            for i in range(5)))
    cfg = to_run_config({"validation": {"sets": {"math500": {"limit": 3}, "mine": str(rows)}}})
    sets = load_validation_sets(cfg)
    assert [len(sets["math500"]), len(sets["mine"])] == [3, 5]
    assert sets["math500"][0].source == "math500" and sets["mine"][4].answer == "5"


# ------------------------------------------------------------------------------------------------ the plot


def test_the_report_draws_held_out_curves_and_counts_training_steps_only(tmp_path):
    from test_report import fake_rows

    from p2o_hpc.trainer.report import summary_table, validation_sets as plotted_sets, write_report

    rows = [{"step": 0, "val/math500/acc": 0.1, "val/math500/problems": 4}] + fake_rows(4)
    rows[2].update({"val/math500/acc": 0.2, "val/math500/acc_with_templates": 0.3})
    rows[4].update({"val/math500/acc": 0.25, "val/math500/acc_with_templates": 0.4})
    run_dir = RunDir(tmp_path)
    run_dir.metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert write_report(run_dir).read_bytes().startswith(b"\x89PNG")
    assert plotted_sets(rows) == ["math500"]
    table = summary_table(rows)
    assert table.title == "step 4 (of 4 logged)"
    assert "val/math500/acc_with_templates" in table.columns[0]._cells


# ------------------------------------------------------------------------------------------ a short real run


@pytest.mark.long
@pytest.mark.vllm
@pytest.mark.multiproc
def test_a_p2o_run_logs_validation_at_the_configured_steps(tmp_path):
    """The CPU smoke run, P²O on hand-written rounds (as test_p2o_loop), 3 steps of one epoch each, validating
    before training, every 2 steps and at the end: val/ keys at steps 0, 2 and 3 only, once each; with templates
    from step 2 on (the first round is taken at epoch 0's end, after step 1), under that round's best template."""
    from test_grpo_loop import launch, metrics
    from test_p2o_loop import DRAWS

    from p2o_hpc.data import load_named

    run_dir = tmp_path / "run"
    ids = [problem.id for problem in load_named("math500")[:4]]  # the smoke experiment's prompts
    pool = [{"template": "", "dev_mean": 0.0}, {"template": "Work carefully.", "dev_mean": 0.5}]
    for epoch in (0, 1):
        RunDir(run_dir).publish_templates(epoch, {"assignments": {i: DRAWS for i in ids}, "pool": pool})
    launch(run_dir, "experiment=smoke", "algorithm=p2o", "parallel=tp2", "gepa.mode=off", "algorithm.epochs=3",
           "algorithm.max_steps=3", "trainer.save_every=3", "+validation.sets.math500.limit=2",
           "validation.every_n_steps=2", "validation.before_training=true", "validation.at_end=true",
           "validation.with_templates=true", "validation.max_tokens=16", "logging.wandb.mode=disabled")
    rows = metrics(run_dir)
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    validated = {row["step"]: row for row in rows if "val/math500/acc" in row}
    assert sorted(validated) == [0, 2, 3]
    for step, row in validated.items():
        assert row["val/math500/problems"] == 2
        assert 0.0 <= row["val/math500/acc"] <= 1.0 and 0 < row["val/math500/response_length"] <= 16
        assert ("val/math500/acc_with_templates" in row) == (step > 0)
        assert row["time/validation"] > 0
    assert 0.0 <= validated[2]["val/math500/acc_with_templates"] <= 1.0
    assert "reward/mean" in validated[2] and "reward/mean" not in validated[0]  # on the step's own line
    assert (run_dir / "plots" / "training.png").read_bytes().startswith(b"\x89PNG")
