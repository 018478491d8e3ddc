"""Evaluation with the paper's protocol: gold answers as the Qwen2.5-Math suite derives them, avg@16 vs greedy by
benchmark size, complete resumable records, the Table-1 report, one-line errors.

Two models are scored once, in the module fixture, on two problems of every benchmark with 8 new tokens: the tiny
model as "base" and, as "grpo", a run dir whose learner trained it for a step (its checkpoint converted to HF by the
eval itself): two vLLM-CPU engine starts for the file.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from p2o_hpc.evaluation.benchmarks import (
    BENCHMARKS,
    BenchmarkError,
    gold_answer,
    load_benchmark,
    protocol_for,
    suite_boxed_answer,
)
from p2o_hpc.evaluation.config import EvalConfig, validate_eval
from p2o_hpc.evaluation.runner import EvalError, plan, prompt_settings, read_records, resolve_models
from p2o_hpc.paths import REPO_ROOT, shared_data_dir

LIMIT = 2
RECORD_FIELDS = {"id", "index", "benchmark", "benchmark_size", "model", "prompt", "gold", "protocol", "responses",
                 "extracted", "correct", "finish_reasons", "response_tokens", "score"}


def rows_of(name: str) -> list[dict]:
    path = shared_data_dir() / BENCHMARKS[name].local
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def row_where(name: str, **match) -> dict:
    return next(row for row in rows_of(name) if all(row.get(k) == v for k, v in match.items()))


# ------------------------------------------------------------------------------------- gold answers (pure)

GOLD_TABLE = [
    # (benchmark, row selector, expected gold)
    ("aime24", {"id": 60}, "204"),
    ("aime24", {"answer": "023"}, "023"),  # zero-padded text, compared by value by math-verify
    ("aime25", {"problem": rows_of("aime25")[0]["problem"]}, "70"),
    ("amc23", {"id": 0}, "27.0"),  # a JSON float, as str() gives it
    ("math500", {"unique_id": "test/precalculus/807.json"}, "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("minerva_math", {"idx": 0}, "1.6"),
    ("minerva_math", {"idx": 12},  # nested braces inside the box
     "\\frac{2 \\pi c^{2} R^{2}}{\\lambda^{5}\\left[e^{h c /(\\lambda k T)}-1\\right] d^{2}}"),
    ("minerva_math", {"idx": 86}, "I(0) e^{-\\frac{t}{R C}}"),  # a newline inside the box is dropped
    ("olympiadbench", {"id": 1606}, "2"),
    ("olympiadbench", {"id": 1610}, "\\frac{1}{2 n+2}"),
    ("olympiadbench", {"id": 1664}, "69,84"),  # multi-answer: final_answer[0] = "$69$,$84$", not a ", "-join
    ("olympiadbench", {"id": 1618}, "(1,8,19), (2,7,13), (4,5,7)"),
]


@pytest.mark.parametrize("name,selector,expected", GOLD_TABLE, ids=lambda v: str(v)[:24])
def test_gold_answers_are_the_suites(name, selector, expected):
    assert gold_answer(name, row_where(name, **selector)) == expected


def test_every_row_of_every_benchmark_has_a_gold_answer_and_math500s_is_its_answer_field():
    for name in BENCHMARKS:
        benchmark = load_benchmark(name)
        assert benchmark.size == len(rows_of(name)) == len(benchmark.problems)
        assert all(problem.gold for problem in benchmark.problems)
    assert [p.gold for p in load_benchmark("math500").problems] == [row["answer"] for row in rows_of("math500")]


def test_suite_box_extraction():
    assert suite_boxed_answer("so $x = \\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert suite_boxed_answer("\\boxed{1} then \\boxed{\\{2\\}}") == "\\{2\\}"  # the last box; braces counted
    assert suite_boxed_answer("\\boxed 5$ and more") == "5"


def test_protocol_is_decided_by_the_full_benchmark_size_not_the_slice():
    settings = dict(sample_below=100, n_samples=16, temperature=0.6, top_p=1.0)
    sliced = load_benchmark("aime24", limit=LIMIT)
    assert (sliced.size, len(sliced.problems)) == (30, LIMIT)
    assert protocol_for(sliced.size, **settings).name == "avg@16"
    assert protocol_for(load_benchmark("math500", limit=LIMIT).size, **settings).name == "greedy"
    assert protocol_for(99, **settings).n_samples == 16 and protocol_for(100, **settings).n_samples == 1


# ------------------------------------------------------------------------------------- errors (pure)


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(BenchmarkError, match="unknown benchmark 'aime2024'"):
        load_benchmark("aime2024")
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    (weights_only / "model.safetensors").write_bytes(b"")
    with pytest.raises(EvalError, match=f"{weights_only}.*no config.json"):
        resolve_models(EvalConfig(models=[str(weights_only)]))
    with pytest.raises(EvalError, match="no such folder"):
        resolve_models(EvalConfig(models=[str(tmp_path / "missing")]))
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_2").mkdir(parents=True)  # no COMPLETE marker: a killed save
    (run_dir / "config.yaml").write_text("{}\n")
    with pytest.raises(EvalError, match=f"run dir {run_dir} has no complete checkpoint"):
        resolve_models(EvalConfig(models=[str(run_dir)]))
    with pytest.raises(EvalError, match="step_2 is not complete"):
        resolve_models(EvalConfig(models=[str(run_dir / "checkpoints" / "step_2")]))
    with pytest.raises(EvalError, match="label"):
        resolve_models(EvalConfig(models=["a=tiny", "a=tiny"]))
    with pytest.raises(ValueError, match="models is empty"):
        resolve_models(EvalConfig())
    with pytest.raises(ValueError, match="n_samples=16 needs temperature > 0"):
        validate_eval(EvalConfig(temperature=0.0))


def test_labels_and_prompts(tiny_model_dir):
    tiny, labelled = resolve_models(EvalConfig(models=["tiny", f"grpo={tiny_model_dir}"]))
    assert (tiny.label, labelled.label, labelled.path) == ("tiny", "grpo", str(tiny_model_dir))
    training = prompt_settings(tiny, "training")  # a bare HF folder: the paper's prompt, Qwen3 non-thinking
    assert training.template.startswith("Let's think step by step") and training.system is None
    assert training.chat_template_kwargs == {"enable_thinking": False}
    suite = prompt_settings(tiny, "qwen_math")
    assert suite.template == "{problem}" and "within \\boxed{}" in suite.system


def test_the_cli_refuses_bad_input_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "p2o_hpc.eval", "models=tiny", "benchmarks=[aime24,gsm8k]",
                             f"output_dir={tmp_path}"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode != 0
    assert "unknown benchmark 'gsm8k'" in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------- end to end (2 engines)


@pytest.fixture(scope="module")
def evaluated(tiny_model_dir, tmp_path_factory):
    """base (the tiny model) and grpo (a run dir: its latest checkpoint) on LIMIT problems of every benchmark."""
    from p2o_hpc.config import RunConfig
    from p2o_hpc.evaluation.table1 import run_eval
    from p2o_hpc.megatron.distributed import launch_local
    from p2o_hpc.run_dir import RunDir
    from tests import mp_workers

    run = RunDir(tmp_path_factory.mktemp("run"))
    run_cfg = RunConfig()
    run_cfg.model.path = str(tiny_model_dir)
    run.write_config(run_cfg, overrides=[])
    launch_local(mp_workers.learner_worker, 1, str(tiny_model_dir), 1, 1, [("train", 1), ("save",)], str(run.path))
    out = tmp_path_factory.mktemp("eval")
    cfg = EvalConfig(models=[f"base={tiny_model_dir}", f"grpo={run.path}"], limit=LIMIT, max_tokens=8,
                     output_dir=str(out), progress=False, reward_workers=1, dtype="float32")
    paths = run_eval(cfg)
    return cfg, out, paths


@pytest.mark.vllm
def test_records_are_complete_with_avg16_below_100_problems_and_greedy_above(evaluated):
    cfg, out, _ = evaluated
    for label in ("base", "grpo"):
        for name in BENCHMARKS:
            records = read_records(out / label / f"{name}.jsonl")
            assert [r["index"] for r in records] == list(range(LIMIT))
            for record in records:
                assert set(record) == RECORD_FIELDS
                n = 16 if record["benchmark_size"] < 100 else 1
                assert record["protocol"]["name"] == ("avg@16" if n == 16 else "greedy")
                assert len(record["responses"]) == len(record["extracted"]) == len(record["correct"]) == n
                assert record["score"] == sum(record["correct"]) / n
                assert record["prompt"].startswith("<|im_start|>user\nLet's think step by step")
                assert all(tokens <= cfg.max_tokens for tokens in record["response_tokens"])


@pytest.mark.vllm
def test_report_has_every_column_and_one_row_per_model(evaluated):
    _, out, paths = evaluated
    converted = json.loads((out / "grpo" / "model.json").read_text())
    assert converted["kind"] == "checkpoint" and converted["step"] == 1
    assert (Path(converted["run_dir"]) / "hf" / "step_1" / "COMPLETE").is_file()  # converted before the engine
    with open(paths["csv"]) as handle:
        rows = list(csv.DictReader(handle))
    assert [row["model"] for row in rows] == ["base", "grpo"]
    columns = [spec.column for spec in BENCHMARKS.values()] + ["AVG"]
    assert all(row[column] != "" for row in rows for column in columns)
    markdown = paths["markdown"].read_text()
    assert markdown.splitlines()[0] == "| Model | " + " | ".join(columns) + " |"
    assert "| base |" in markdown and "| grpo |" in markdown and f"({LIMIT}/30)" in markdown


@pytest.mark.vllm
def test_vllm_on_the_converted_checkpoint_generates_what_transformers_does(evaluated):
    """The grpo rows come from vLLM serving the eval's own export of the run's checkpoint: its greedy (MATH500)
    responses equal transformers' greedy decoding of the same prompts on that export (test_convert_to_hf checks that
    transformers on an export computes the learner's logits)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, out, _ = evaluated
    info = json.loads((out / "grpo" / "model.json").read_text())
    export = Path(info["run_dir"]) / "hf" / f"step_{info['step']}"
    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    for record in read_records(out / "grpo" / "math500.jsonl"):
        ids = tokenizer(record["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            greedy = model.generate(ids, max_new_tokens=cfg.max_tokens, do_sample=False)[0, ids.shape[1]:]
        assert record["responses"] == [tokenizer.decode(greedy, skip_special_tokens=True)]


@pytest.mark.vllm
def test_a_second_call_generates_nothing_and_a_torn_line_is_dropped(evaluated, monkeypatch):
    from p2o_hpc.evaluation.table1 import run_eval
    from p2o_hpc.rollout import generator_process

    cfg, out, _ = evaluated
    before = {path: path.read_bytes() for path in out.glob("*/*.jsonl")}

    def no_engine(*args, **kwargs):
        raise AssertionError("a finished eval must not start an engine")

    monkeypatch.setattr(generator_process, "GeneratorProcess", no_engine)
    run_eval(cfg)
    assert {path: path.read_bytes() for path in out.glob("*/*.jsonl")} == before

    # A kill while appending leaves a torn last line: dropped (and cut from the file); only that problem is pending.
    path = out / "base" / "aime24.jsonl"
    complete = path.read_bytes()
    first_line = complete.split(b"\n")[0] + b"\n"
    torn = first_line + complete[len(first_line): len(first_line) + 100]
    path.write_bytes(torn)
    from p2o_hpc.evaluation.report import write_report

    write_report(out)  # a reader beside a running eval: skips the torn line, leaves the file to its writer
    assert path.read_bytes() == torn
    models = resolve_models(cfg)
    pending = plan(models[0], cfg, [load_benchmark("aime24", limit=LIMIT)], prompt_settings(models[0], cfg.prompt))
    assert [p.index for p in pending[0].problems] == [1]
    assert path.read_bytes() == first_line
    path.write_bytes(complete)


@pytest.mark.vllm
def test_a_sweep_over_scored_models_ends_in_one_table(evaluated, tiny_model_dir):
    """`-m models=a,b` through Hydra's basic launcher: both points resume (nothing to generate), one table."""
    cfg, out, _ = evaluated
    grpo = json.loads((out / "grpo" / "model.json").read_text())["path"]
    result = subprocess.run(
        [sys.executable, "-m", "p2o_hpc.eval", "-m", f"models='base={tiny_model_dir}','grpo={grpo}'",
         f"limit={LIMIT}", "max_tokens=8", f"output_dir={out}", "progress=false", "dtype=float32"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("every problem already scored") == 2
    last_table = result.stdout.rsplit("| Model |", 1)[-1]
    assert "| base |" in last_table and "| grpo |" in last_table


@pytest.mark.long
@pytest.mark.slurm
@pytest.mark.vllm
def test_cluster_slurm_runs_the_eval_as_one_submitit_job_and_waits(slurm_cluster, tmp_path):
    """The same command with cluster=slurm: one job through the learner's executor, the table printed at the end."""
    result = subprocess.run(
        [sys.executable, "-m", "p2o_hpc.eval", "models=tiny", "benchmarks=[aime24,math500]", "limit=1", "max_tokens=8",
         "n_samples=2", f"output_dir={tmp_path}", "cluster=slurm", "cluster.gpus=false", "cluster.time_min=10"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "submitted eval job" in result.stdout and "| tiny |" in result.stdout
    assert (tmp_path / "slurm").is_dir()
    assert [len(r["responses"]) for r in read_records(tmp_path / "tiny" / "aime24.jsonl")] == [2]
