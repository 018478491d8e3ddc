"""The CPU testbed: its preset renders prompts exactly as the warm start trained on them, the shipped base policy has
the latent skill it claims, and a sweep's points come out side by side (table, CSV, Fig. 3/4)."""

from __future__ import annotations

import json

import pytest

from p2o_hpc.config import RunConfig, to_run_config, validate
from p2o_hpc.model_dir import TESTBED_MODEL_DIR
from p2o_hpc.run_dir import RunDir
from p2o_hpc.trainer.comparison import summarize, table_rows, write_comparison
from p2o_hpc.trainer.testbed_model import CHAT_TEMPLATE_KWARGS, REPORT_NAME, TESTBED_TEMPLATE, latent_skill_report
from tests.test_config_schema import compose


@pytest.mark.parametrize("algorithm", ["grpo", "grpo_2x", "p2o", "p2o_no_cd", "p2o_same_template"])
def test_the_testbed_preset_prompts_as_the_warm_start_trained(algorithm):
    cfg = to_run_config(compose("experiment=testbed", f"algorithm={algorithm}"))
    validate(cfg)
    assert cfg.algorithm.name == algorithm  # the preset leaves what the algorithm group sets alone
    assert cfg.algorithm.n_samples == (12 if algorithm == "grpo_2x" else 6)
    assert cfg.data.template == TESTBED_TEMPLATE and dict(cfg.data.chat_template_kwargs) == CHAT_TEMPLATE_KWARGS
    assert cfg.model.path == "testbed" and cfg.reflection.kind == "edit"
    assert set(cfg.validation.sets) == {"hard", "easy"} and cfg.validation.before_training


def test_the_shipped_base_policy_has_a_latent_prompt_elicitable_skill():
    """Re-measured on fresh problems (a smaller sample than tools/build_testbed_model.py's report): hard problems are
    rarely solved without an instruction and mostly solved with one of the right kind; easy ones directly."""
    report = latent_skill_report(TESTBED_MODEL_DIR, count=12, difficulties=(1, 3), seed=777)
    assert report["hard_accuracy_without_instruction"] <= 0.25
    assert report["hard_accuracy_with_right_instruction"] >= report["hard_accuracy_without_instruction"] + 0.4
    assert report["hard_accuracy_with_other_instruction"] <= 0.25  # the kind matters, not any instruction
    assert report["easy_accuracy_without_instruction"] >= 0.8
    shipped = json.loads((TESTBED_MODEL_DIR / REPORT_NAME).read_text())
    assert shipped["spec"]["seed"] == 0 and shipped["cd_decisive_token_masked_frac"] < 1.0


def _fake_run(root, name: str, algorithm: str, seed: int, hard_acc: list[float], hard_sizes: list[int]) -> RunDir:
    run_dir = RunDir(root / name)
    cfg = RunConfig()
    cfg.algorithm.name, cfg.trainer.seed = algorithm, seed
    run_dir.path.mkdir(parents=True)
    run_dir.write_config(cfg, overrides=[])
    rows = [{"step": 0, "val/hard/acc": hard_acc[0], "val/easy/acc": 0.9}]
    for step, acc in enumerate(hard_acc[1:], start=1):
        rows.append({"step": step, "epoch": step - 1, "reward/mean": acc, "val/hard/acc": acc,
                     "val/hard/acc_with_templates": min(1.0, acc + 0.3), "val/easy/acc": 0.9})
        rows.append({"epoch": step - 1, "step": step, "hard/size": hard_sizes[step - 1], "gepa/accepted": 2,
                     "gepa/budget_used": 40})
    run_dir.metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run_dir


def test_points_of_a_sweep_side_by_side_with_seeds_averaged(tmp_path):
    runs = [_fake_run(tmp_path, f"algorithm=p2o,trainer.seed={seed}", "p2o", seed, [0.0, 0.3, 0.5 + seed / 10],
                      [20, 10 - seed]) for seed in (1, 2)]
    runs.append(_fake_run(tmp_path, "algorithm=grpo,trainer.seed=1", "grpo", 1, [0.0, 0.0, 0.05], [20, 20]))
    points = [summarize(run.path) for run in runs]
    assert points[0].group == "algorithm=p2o" and points[0].seed == 1 and points[0].hard_sizes == [20, 9]
    assert points[0].rollouts_gepa == 80 and points[0].gepa_accepted == 4
    assert points[0].rollouts_policy == 2 * RunConfig().algorithm.prompts_per_step * RunConfig().algorithm.n_samples
    rows = {row["point"]: row for row in table_rows(points)}
    assert rows["algorithm=p2o"]["seeds"] == "2" and rows["algorithm=p2o"]["hard/acc"] == "0.650 ± 0.071"
    assert rows["algorithm=p2o"]["hard set per epoch"] == "20 ± 0 → 8.500 ± 0.707"
    assert rows["algorithm=grpo"]["hard/acc"] == "0.050"
    out = write_comparison(points, tmp_path / "comparison")
    assert "| algorithm=grpo |" in (out / "comparison.md").read_text()
    assert len((out / "comparison.csv").read_text().splitlines()) == 4
    for figure in ("fig3_validation.png", "fig4_hard_set_and_templates.png"):
        assert (out / figure).read_bytes().startswith(b"\x89PNG")


def test_a_p2o_testbed_epoch_finds_a_template_and_the_next_epoch_distils_it(tmp_path):
    """End to end on the shipped base policy: epoch 0's hard prompts go to GEPA (edit operator, inline), which accepts
    a template that solves dev items the plain prompt does not; epoch 1 rolls them out under it and trains on the
    original prompt (context distillation on, its ratio-mask metrics non-trivial); validation runs at steps 0-2."""
    from test_grpo_loop import launch, metrics

    run_dir = tmp_path / "run"
    launch(run_dir, "experiment=testbed", "algorithm=p2o", "data.train=synthetic:multiply+sum:2-3:32:0",
           "algorithm.prompts_per_step=32", "algorithm.epochs=2", "validation.every_n_steps=1",
           "validation.sets.hard.limit=16", "validation.sets.easy.limit=8", "gepa.max_metric_calls=160",
           timeout=900)
    rows = metrics(run_dir)
    steps = [row for row in rows if "reward/mean" in row]
    assert [row["step"] for row in steps] == [1, 2]
    assert sorted(row["step"] for row in rows if "val/hard/acc" in row) == [0, 1, 2]
    document = json.loads((RunDir(run_dir).templates(0)).read_text())
    plain, *evolved = document["pool"]
    assert plain["template"] == "" and evolved, "GEPA accepted no template"
    assert any(score > base for candidate in evolved for score, base in zip(candidate["dev_scores"],
                                                                               plain["dev_scores"]))
    assert steps[1]["p2o/templated_frac"] > 0 and steps[1]["p2o/reward_templated"] > steps[1]["p2o/reward_plain"]
    assert 0.0 <= steps[1]["p2o/cd_masked_frac"] < 1.0 and steps[1]["p2o/cd_ratio_max"] > steps[1]["p2o/cd_ratio_min"]
    assert "val/hard/acc_with_templates" in rows[-1]


@pytest.mark.long
def test_the_base_policy_build_runs_end_to_end_on_a_reduced_model(tmp_path):
    """tools/build_testbed_model.py's path at a fraction of its size (2 layers, 1,500 rows, 24 steps): the testbed
    tokenizer, prompts rendered as the RL path renders them, the megatron SFT stage, the export and the report. The
    latent skill itself needs the full warm start (~20 min), so it is checked on the shipped model above."""
    import dataclasses

    from p2o_hpc.data.warm_start_corpus import CorpusSpec
    from p2o_hpc.trainer.sft import read_sft_log
    from p2o_hpc.trainer.testbed_model import TestbedModelSpec, build_testbed_model

    spec = TestbedModelSpec(architecture={"num_hidden_layers": 2, "max_position_embeddings": 512},
                            corpus=CorpusSpec(rows=1500, seed=3))
    spec = dataclasses.replace(spec, sft=dataclasses.replace(spec.sft, steps=24, warmup_steps=4, progress=False))
    out = build_testbed_model(tmp_path / "model", spec, cache_root=tmp_path / "cache", report_count=4)
    log = read_sft_log(out)
    assert log["steps"][-1]["loss"] < log["steps"][0]["loss"] - 1.0
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["problems_per_cell"] == 4 and report["spec"]["corpus"]["rows"] == 1500
    assert 0.0 <= report["hard_accuracy_with_right_instruction"] <= 1.0
