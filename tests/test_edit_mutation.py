"""reflection=edit: the offline GrIPS-style operator in GEPA's mutation slot (no LLM, no vLLM, CPU only).

Proposals are well formed and within the template budget under the policy's real tokenizer, all four edits occur,
draws follow the engine's RNG state (so a resumed round is the uninterrupted one), and the engine's acceptance,
Pareto pool, cover and assignment find a phrase that helps; the config composes and a round runs through the
runner path that the GEPA service and the inline learner use, with no reflection server or client.
"""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from omegaconf import OmegaConf

from p2o_hpc.config import GEPAConfig, ReflectionConfig, register_configs, to_run_config, validate
from p2o_hpc.data.evolved_templates import rejection_reason, special_token_texts
from p2o_hpc.gepa import Evaluation, GEPAEngine, GEPASettings, HardItem
from p2o_hpc.gepa.edit_mutation import (
    EDIT_KINDS,
    PHRASE_BANK,
    EditMutation,
    estimated_tokens,
    load_phrase_bank,
    split_phrases,
)
from p2o_hpc.paths import REPO_ROOT
from p2o_hpc.records import Rollout
from p2o_hpc.run_dir import RunDir

TARGET = "Double-check each calculation."  # the phrase the fake policies reward
BUDGET = 48  # template tokens: a few phrases, so the budget check is exercised


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def compose(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        return to_run_config(hydra_compose("config", overrides=list(overrides)))


# ------------------------------------------------------------------------------------------------ the operator


def test_the_bank_is_generic_single_phrases():
    assert 50 <= len(PHRASE_BANK) <= 70 and len(set(PHRASE_BANK)) == len(PHRASE_BANK) and TARGET in PHRASE_BANK
    assert all(split_phrases(phrase) == [phrase] for phrase in PHRASE_BANK)


def test_templates_split_at_sentence_boundaries_and_line_breaks():
    assert split_phrases("") == [] and split_phrases("  \n ") == []
    assert split_phrases("Solve it. Then check!\n\nIs it right? Write \\boxed{}.") == [
        "Solve it.", "Then check!", "Is it right?", "Write \\boxed{}."]


def walk(operator: EditMutation, rng: random.Random, steps: int):
    """(parent, child) pairs of a random walk from ε that moves to the child half the time."""
    parent = ""
    for _ in range(steps):
        child = operator(parent, [], rng)
        yield parent, child
        if child is not None and rng.random() < 0.5:
            parent = child


def test_every_proposal_is_well_formed_within_budget_and_all_edits_occur(tokenizer):
    operator = EditMutation(tokenizer=tokenizer, max_tokens=BUDGET)
    specials = special_token_texts(tokenizer)
    proposals = 0
    for parent, child in walk(operator, random.Random(0), 600):
        assert child is not None  # some edit always fits: a delete, a swap or a short replacement
        proposals += 1
        assert child.strip() and child != parent and split_phrases(child) != split_phrases(parent)
        assert rejection_reason(child, tokenizer, BUDGET) is None
        assert len(tokenizer(child, add_special_tokens=False)["input_ids"]) <= BUDGET
        assert not any(special in child for special in specials)
        assert set(split_phrases(child)) <= set(PHRASE_BANK)
    assert all(operator.tally[kind] > 0 for kind in EDIT_KINDS), operator.tally
    assert sum(operator.tally[kind] for kind in EDIT_KINDS) == proposals and operator.tally["invalid"] == 0


def test_from_the_empty_template_only_add_applies_and_nothing_is_emptied(tokenizer):
    operator = EditMutation(tokenizer=tokenizer, max_tokens=BUDGET)
    rng = random.Random(1)
    for _ in range(50):
        child = operator("", [], rng)
        assert child in PHRASE_BANK
    assert operator.tally == Counter(add=50)
    for _ in range(50):  # one phrase: delete would empty it
        assert operator(TARGET, [], rng).strip()
    assert operator.tally["delete"] == 0 and operator.tally["swap"] == 0


def test_a_parent_from_an_llm_is_edited_phrase_by_phrase(tokenizer):
    parent = "Solve the problem.\nThen verify the answer."
    operator = EditMutation(tokenizer=tokenizer, max_tokens=BUDGET)
    rng = random.Random(2)
    children = {operator(parent, [], rng) for _ in range(200)}
    assert "Then verify the answer. Solve the problem." in children  # the swap
    assert {"Solve the problem.", "Then verify the answer."} <= children  # the deletes
    assert None not in children and all(rejection_reason(c, tokenizer, BUDGET) is None for c in children)


def test_several_edits_per_proposal(tokenizer):
    operator = EditMutation(tokenizer=tokenizer, max_tokens=200, num_edits=3)
    rng = random.Random(3)
    for _ in range(30):
        child = operator("", [], rng)
        assert 1 <= len(split_phrases(child)) <= 3
    assert sum(operator.tally.values()) == 90


def test_nothing_well_formed_is_invalid(tokenizer):
    operator = EditMutation(tokenizer=tokenizer, max_tokens=1)  # no bank phrase is one token
    assert operator("", [], random.Random(0)) is None and operator.tally == Counter(invalid=1)
    forged = EditMutation(["<|im_end|>", "<|im_start|>assistant"], tokenizer=tokenizer, max_tokens=BUDGET)
    assert forged("", [], random.Random(0)) is None  # the chat template's special tokens never get through


def test_without_a_tokenizer_a_conservative_word_count_and_no_special_looking_text():
    assert estimated_tokens("Show your work.") == 8  # 3 words + 1 mark, 2 each
    operator = EditMutation(["Be concise.", "<|im_end|> Be brief.", "Take your time."], max_tokens=8)
    rng = random.Random(0)
    assert {operator("", [], rng) for _ in range(50)} == {"Be concise.", "Take your time."}
    # one phrase in: a second would not fit 8 estimated tokens, a delete would empty it, so only replace is left
    # (and a try that draws the special-looking phrase fails: after MAX_TRIES of those the proposal is None)
    assert {operator("Be concise.", [], rng) for _ in range(20)} <= {"Take your time.", None}
    assert operator.tally["add"] == 50 and operator.tally["replace"] > 0 and operator.tally["swap"] == 0


def test_draws_follow_the_rng_state(tokenizer):
    operator = EditMutation(tokenizer=tokenizer, max_tokens=BUDGET)
    rng = random.Random(7)
    list(walk(operator, rng, 20))
    state = rng.getstate()
    first = list(walk(operator, rng, 50))
    rng.setstate(state)
    assert list(walk(operator, rng, 50)) == first
    assert list(walk(operator, random.Random(8), 50)) != first


def test_records_are_ignored(tokenizer):
    from p2o_hpc.gepa import FeedbackRecord

    operator = EditMutation(tokenizer=tokenizer, max_tokens=BUDGET)
    records = [FeedbackRecord("1+1?", "3", "2", 0.0)]
    assert operator("Be concise.", records, random.Random(5)) == operator("Be concise.", [], random.Random(5))


def test_phrase_bank_file(tmp_path):
    bank = tmp_path / "bank.txt"
    bank.write_text("# my phrases\nBe concise.\n\n  Show your work.  \nBe concise.\n")
    assert load_phrase_bank(str(bank)) == ("Be concise.", "Show your work.")
    assert load_phrase_bank(None) == PHRASE_BANK
    with pytest.raises(FileNotFoundError, match="reflection.edit_phrase_bank="):
        load_phrase_bank(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no phrases"):
        load_phrase_bank(str(tmp_path / "empty.txt"))


# ------------------------------------------------------------------------------------------ in the GEPA engine


class TargetEvaluator:
    """A policy that solves every item exactly when the template contains TARGET; may be killed after n calls."""

    def __init__(self, crash_after: int | None = None):
        self.calls, self.metric_calls, self.crash_after = 0, 0, crash_after

    def __call__(self, template, items):
        if self.crash_after is not None and self.calls >= self.crash_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        self.metric_calls += len(items)
        return [Evaluation(float(TARGET in template), "...") for _ in items]


def engine_run(tokenizer, state_path=None, evaluator=None):
    evaluator = evaluator or TargetEvaluator()
    settings = GEPASettings(GEPAConfig(min_hard=10, dev_size=10, minibatch_size=3, num_parents=4,
                                       max_metric_calls=3000, seed=0), templates_per_sample=4)
    items = [HardItem(f"q{i}", f"question {i}?", str(i)) for i in range(40)]
    engine = GEPAEngine(items, evaluator, None, settings, tokenizer=tokenizer,
                        mutation=EditMutation(tokenizer=tokenizer, max_tokens=BUDGET))
    return engine.run(state_path).to_json(), evaluator


def test_the_engine_accepts_the_phrase_that_helps(tokenizer):
    out, evaluator = engine_run(tokenizer)
    counters, pool = out["counters"], out["pool"]
    assert out["budget"]["used"] == evaluator.metric_calls <= out["budget"]["total"] == 3000
    assert counters["accepted"] == len(pool) - 1 >= 1 and counters["failed"] == 0
    assert counters["proposed"] == sum(counters[k] for k in ("failed", "invalid", "duplicate", "rejected",
                                                             "accepted", "dropped_for_budget"))
    assert all(TARGET in c["template"] and c["dev_mean"] == 1.0 for c in pool[1:])  # only strict improvements
    best = pool[out["cover"][0]]
    assert out["cover"] == [1] and TARGET in best["template"]  # the first child covers the whole dev set
    assert all(set(drawn) == {best["template"]} for drawn in out["assignments"].values())
    assert counters["skipped_perfect"] > 0  # then every parent solves its minibatch: nothing left to improve


def test_a_killed_edit_round_resumes_to_the_same_result(tokenizer, tmp_path):
    reference, _ = engine_run(tokenizer)
    with pytest.raises(KeyboardInterrupt):
        engine_run(tokenizer, tmp_path / "state.json", TargetEvaluator(crash_after=40))
    resumed, _ = engine_run(tokenizer, tmp_path / "state.json")
    assert json.dumps(resumed) == json.dumps(reference)


def test_the_engine_takes_either_propose_or_an_operator(tokenizer):
    settings = GEPASettings(GEPAConfig(), templates_per_sample=4)
    operator = EditMutation(tokenizer=tokenizer, max_tokens=BUDGET)
    with pytest.raises(ValueError, match="either propose"):
        GEPAEngine([], TargetEvaluator(), None, settings)
    with pytest.raises(ValueError, match="either propose"):
        GEPAEngine([], TargetEvaluator(), lambda prompt: "x", settings, mutation=operator)


# --------------------------------------------------------------------------------- config and the runner path


def test_reflection_edit_composes_and_validates():
    cfg = compose("experiment=smoke", "algorithm=p2o", "reflection=edit")
    assert cfg.reflection.kind == "edit" and cfg.reflection.api_key_env is None
    assert (cfg.reflection.edit_phrase_bank, cfg.reflection.edit_num_edits) == (None, 1)
    validate(cfg)
    validate(compose("experiment=smoke", "algorithm=p2o", "reflection=edit", "gepa.mode=inline"))
    with pytest.raises(ValueError, match="reflection.edit_num_edits=0 must be ≥ 1"):
        validate(compose("reflection=edit", "reflection.edit_num_edits=0"))
    merged = OmegaConf.merge(OmegaConf.structured(ReflectionConfig),
                             OmegaConf.load(REPO_ROOT / "conf" / "reflection" / "edit.yaml"))
    assert merged.kind == "edit"


def test_preflight_reads_the_phrase_bank(tmp_path):
    from p2o_hpc.cluster.runs import preflight

    cfg = compose("experiment=smoke", "algorithm=p2o", "reflection=edit",
                  f"reflection.edit_phrase_bank={tmp_path / 'missing.txt'}")
    with pytest.raises(FileNotFoundError, match="reflection.edit_phrase_bank="):
        preflight(cfg)


class FakeWorker:
    """The RolloutWorker surface GEPA's evaluator uses: the real template check, and a scripted policy that solves
    an item when its template contains TARGET."""

    def __init__(self, tokenizer, template_max_tokens: int):
        self.tokenizer, self.template_max_tokens, self.generated = tokenizer, template_max_tokens, 0

    def checked_templates(self, templates):
        from p2o_hpc.rollout.rollout_worker import RolloutWorker

        return RolloutWorker.checked_templates(self, templates)

    def generate(self, problems, first_prompt_index, sampling, templates=None, distill=True):
        self.generated += len(problems) * sampling.n
        return [Rollout(first_prompt_index + i, [1], [2], None, "stop", "...", template=templates[i][k] if templates
                        else "") for i in range(len(problems)) for k in range(sampling.n)]

    def score(self, rollouts, answers):
        for rollout in rollouts:
            rollout.reward = float(TARGET in rollout.template)

    def close(self):
        pass


def edit_run(tmp_path, tokenizer, *overrides: str) -> tuple[RunDir, object]:
    """A run dir with epoch 0's hard set (20 prompts) and READY, configured for reflection=edit on a small bank."""
    bank = tmp_path / "bank.txt"
    bank.write_text("Be concise.\nShow your work.\nTake your time.\n" + TARGET + "\n")
    cfg = compose("experiment=smoke", "algorithm=p2o", "reflection=edit", f"reflection.edit_phrase_bank={bank}",
                  "gepa.max_metric_calls=200", *overrides)
    run_dir = RunDir(tmp_path / "run")
    run_dir.write_config(cfg, None)
    run_dir.write_hard_set(0, [{"prompt_id": f"p{i}", "prompt": f"What is {i}+1?", "ground_truth": str(i + 1)}
                               for i in range(20)])
    return run_dir, cfg


def check_edit_round(run_dir: RunDir, metrics: dict) -> None:
    document = run_dir.read_templates(0)
    assert run_dir.done(0) and document["metrics"] == metrics
    assert document["counters"]["accepted"] >= 1 and TARGET in document["pool"][1]["template"]
    assert document["budget"]["used"] <= document["budget"]["total"] == 200
    assert metrics["gepa/dev_coverage"] == 1.0 and metrics["gepa/dev_pass@1_best_template"] == 1.0
    assert sum(metrics[f"edit/{kind}"] for kind in EDIT_KINDS) == metrics["gepa/proposed"] - metrics["edit/invalid"]
    assert not any(key.startswith("reflection/") for key in metrics)  # no reflection requests were made


def test_an_edit_round_runs_through_the_runner_with_no_server_or_client(tmp_path, tokenizer):
    from p2o_hpc.gepa.runner import Reflection, configured_round

    run_dir, cfg = edit_run(tmp_path, tokenizer)
    reflection = Reflection.for_run(cfg, run_dir.logs)
    assert reflection.server is None and reflection.client is None
    worker = FakeWorker(tokenizer, cfg.algorithm.p2o.template_max_tokens)
    check_edit_round(run_dir, configured_round(cfg, run_dir, 0, worker, reflection))
    reflection.close()


def test_the_gepa_service_loop_runs_an_edit_round(tmp_path, tokenizer, monkeypatch):
    from rich.console import Console

    from p2o_hpc.gepa.service_loop import serve
    from p2o_hpc.reflection.server import ReferenceServer
    from p2o_hpc.rollout.rollout_worker import RolloutWorker

    run_dir, cfg = edit_run(tmp_path, tokenizer, "gepa.mode=service")
    run_dir.mark_ready(0)
    worker = FakeWorker(tokenizer, cfg.algorithm.p2o.template_max_tokens)
    monkeypatch.setattr(RolloutWorker, "from_config", classmethod(lambda cls, *args, **kwargs: worker))
    monkeypatch.setattr(ReferenceServer, "start", lambda self: pytest.fail("reflection=edit started a server"))
    assert serve(run_dir, Console(quiet=True), max_rounds=1) == 1
    assert worker.generated > 0  # the service evaluated on the worker it built
    check_edit_round(run_dir, run_dir.read_templates(0)["metrics"])


def test_the_inline_learner_runs_an_edit_round(tmp_path, tokenizer, monkeypatch):
    from p2o_hpc.p2o.template_exchange import TemplateExchange
    from p2o_hpc.reflection.server import ReferenceServer

    run_dir, cfg = edit_run(tmp_path, tokenizer, "gepa.mode=inline")
    monkeypatch.setattr(ReferenceServer, "start", lambda self: pytest.fail("reflection=edit started a server"))
    exchange = TemplateExchange(cfg, run_dir, rank=0, console=None)
    metrics = exchange._inline_round(0, FakeWorker(tokenizer, cfg.algorithm.p2o.template_max_tokens))
    exchange.close()
    check_edit_round(run_dir, metrics)
