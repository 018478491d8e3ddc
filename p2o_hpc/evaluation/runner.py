"""Evaluate models on the benchmarks: resolve what to load, generate with vLLM, grade, append one record per problem.

Each (model, benchmark) pair is one JSONL file, `<output_dir>/<label>/<benchmark>.jsonl`, one line per problem
(prompt, responses, extracted answers, per-sample correctness, score), appended with one write + fsync after the
problem's batch is graded. A killed eval loses at most the batch in flight (`batch_problems`); a torn last line is
cut off on the next call, and problems already in the file are never generated again, so re-running the same
command resumes it (and a finished one starts no engine at all). `<label>/model.json` says what the label is.

One engine per model (GeneratorProcess: vLLM in a child process), reused across the benchmarks; grading by the
project's RewardPool (processes with per-item timeouts) with a reward from p2o_hpc.reward.registry.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from p2o_hpc.config import DataConfig
from p2o_hpc.evaluation.benchmarks import Benchmark, BenchmarkProblem, Protocol, load_benchmark, protocol_for
from p2o_hpc.evaluation.config import EvalConfig, PromptStyle, model_specs
from p2o_hpc.io_utils import atomic_write_text
from p2o_hpc.model_dir import resolve_model_dir
from p2o_hpc.run_dir import RunDir

# The Qwen2.5-Math suite's prompt for Qwen models (its "qwen25-math-cot" prompt type): this system message, the
# problem as the user turn.
QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
MODEL_INFO = "model.json"


class EvalError(ValueError):
    """Bad input (a model path, key, file): one line naming it, never a traceback."""


# ------------------------------------------------------------------------------------------------ models


@dataclass
class EvalModel:
    """One model to evaluate. kind: "hf" (path is an HF folder) or "checkpoint" (path is checkpoints/step_N of
    run_dir, converted to an HF folder before the engine starts)."""

    label: str
    spec: str
    kind: str
    path: str
    run_dir: str | None = None
    step: int | None = None

    def hf_dir(self) -> str:
        if self.kind == "hf":
            return self.path
        from p2o_hpc.megatron.checkpoint_to_hf import convert_checkpoint

        return str(convert_checkpoint(self.path).out_dir)  # <run>/hf/step_N; kept when already complete


def resolve_models(cfg: EvalConfig) -> list[EvalModel]:
    """Every model of cfg.models (run dirs expanded to their checkpoints), labelled; checked, nothing converted."""
    models = [model for spec in model_specs(cfg) for model in _resolve_spec(spec, cfg.all_checkpoints)]
    labels = [model.label for model in models]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise EvalError(f"models: label(s) {twice} name more than one model; give them apart as label=path")
    return models


def _resolve_spec(spec: str, all_checkpoints: bool) -> list[EvalModel]:
    label, _, path = spec.partition("=") if _looks_labelled(spec) else ("", "", spec)
    label = label.strip()
    if label and not _safe_label(label):
        raise EvalError(f"models: label {label!r} must be a folder name (no '/', not '.' or '..')")
    folder = Path(path).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file():
        from p2o_hpc.megatron.checkpoint_to_hf import (  # imports megatron: only here
            COMPLETE_MARKER, checkpoint_step, run_checkpoints)
        if (folder / "config.yaml").is_file() and not (folder / COMPLETE_MARKER).exists():  # a run dir
            checkpoints = run_checkpoints(folder)
            if not checkpoints:
                raise EvalError(f"models: run dir {folder} has no complete checkpoint (checkpoints/step_N with a "
                                f"{COMPLETE_MARKER} marker) to evaluate")
            chosen = checkpoints if all_checkpoints else checkpoints[-1:]
            if label and len(chosen) > 1:
                return [_checkpoint_model(f"{label}@{c.name}", spec, c) for c in chosen]
            return [_checkpoint_model(label or None, spec, c) for c in chosen]
        if checkpoint_step(folder) is not None:
            if not (folder / COMPLETE_MARKER).exists():
                raise EvalError(f"models: checkpoint {folder} is not complete (no {COMPLETE_MARKER} marker: still being "
                                "written, or its job was killed)")
            return [_checkpoint_model(label or None, spec, folder)]
        raise EvalError(f"models: {folder} is neither a Hugging Face model folder (no config.json) nor a run dir "
                        f"(no config.yaml) nor a checkpoints/step_N folder")
    try:
        model_dir = resolve_model_dir(path)  # tiny, testbed, a folder, or a hub name (downloaded once)
    except FileNotFoundError as error:  # ModelNotAvailable included
        raise EvalError(f"models: {error}") from error
    if not (Path(model_dir) / "config.json").is_file():
        raise EvalError(f"models: model folder {model_dir} has no config.json")
    return [EvalModel(label=label or _default_label(path, model_dir), spec=spec, kind="hf", path=model_dir)]


def _looks_labelled(spec: str) -> bool:
    """"label=path": an "=" before the path. A path that itself holds "=" (sweep run dirs:
    multirun/…/algorithm=p2o) and exists is a path; else the first "=" splits."""
    if "=" not in spec or Path(spec).expanduser().exists():
        return False
    label = spec.partition("=")[0]
    return "/" not in label


def _safe_label(label: str) -> bool:
    return bool(label) and "/" not in label and label not in (".", "..")


def _default_label(path: str, model_dir: str) -> str:
    """The folder's name (Qwen/Qwen3-4B → Qwen3-4B; tiny → tiny)."""
    if path in ("tiny", "testbed"):
        return path
    return Path(path.rstrip("/")).name or Path(model_dir).name


def _checkpoint_model(label: str | None, spec: str, checkpoint: Path) -> EvalModel:
    from p2o_hpc.megatron.checkpointing import checkpoint_step

    checkpoint = checkpoint.resolve()
    run_dir = checkpoint.parent.parent
    step = checkpoint_step(checkpoint)
    return EvalModel(label=label or f"{run_dir.name}@{checkpoint.name}", spec=spec, kind="checkpoint",
                     path=str(checkpoint), run_dir=str(run_dir), step=step)


# ------------------------------------------------------------------------------------------------ prompts


@dataclass
class PromptSettings:
    style: str
    template: str
    system: str | None
    chat_template_kwargs: dict = field(default_factory=dict)


def prompt_settings(model: EvalModel, style: PromptStyle) -> PromptSettings:
    """The training prompt of the model's run (its config.yaml: data.template, data.chat_template_kwargs), the
    paper's defaults for a bare HF folder; or the suite's Qwen prompt with the same chat-template variables."""
    data = DataConfig()
    if model.run_dir and RunDir(model.run_dir).config.is_file():
        data = RunDir(model.run_dir).load_config().data
    kwargs = dict(data.chat_template_kwargs)
    if style == PromptStyle.qwen_math:
        return PromptSettings(str(style), "{problem}", QWEN_MATH_SYSTEM, kwargs)
    return PromptSettings(str(style), data.template, None, kwargs)


# ------------------------------------------------------------------------------------------------ records


def read_records(path: Path, *, repair: bool = True) -> list[dict]:
    """The complete records of a JSONL file. A last line that does not parse (the eval was killed while appending
    it) is dropped, and with `repair` (the eval about to append, the file's one writer) cut from the file; a
    reader beside a running eval (the report) leaves the file alone. A bad line before the last is an error
    naming the file and line."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    records, good_end, position = [], 0, 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        end = position + len(line) + 1
        if line.strip():
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "id" not in record:
                    raise ValueError("not a record")
            except ValueError as error:
                if any(rest.strip() for rest in lines[number:]):
                    raise EvalError(f"{path} line {number}: not a record ({error}); remove the line or the file "
                                    "to score it again") from error
                break  # torn last line
            records.append(record)
            good_end = min(end, len(data))
        position = end
    if repair and (good_end < len(data) or (data and not data.endswith(b"\n"))):
        with path.open("r+b") as handle:
            handle.truncate(good_end)
            if good_end and not data[:good_end].endswith(b"\n"):
                handle.seek(good_end)
                handle.write(b"\n")
            handle.flush()
            os.fsync(handle.fileno())
    return records


def append_record(path: Path, record: dict) -> None:
    """One line, one write on an O_APPEND file, fsynced: a reader (or a resumed eval) sees the line whole or torn
    at the end, never interleaved."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    with path.open("ab") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def record_protocol(protocol: Protocol, cfg: EvalConfig, prompt: PromptSettings) -> dict:
    """What decides a record's numbers: a file is only ever continued under the same protocol."""
    return {"name": protocol.name, "n_samples": protocol.n_samples, "temperature": protocol.temperature,
            "top_p": protocol.top_p, "max_tokens": cfg.max_tokens, "seed": cfg.seed, "prompt": prompt.style,
            "reward": cfg.reward}


# ------------------------------------------------------------------------------------------------ evaluation


@dataclass
class _Pending:
    benchmark: Benchmark
    protocol: Protocol
    path: Path
    problems: list[BenchmarkProblem]


def load_benchmarks(cfg: EvalConfig) -> list[Benchmark]:
    from p2o_hpc.evaluation.benchmarks import check_names

    check_names(list(cfg.benchmarks))
    return [load_benchmark(name, limit=cfg.limit, data_source=str(cfg.data_source)) for name in cfg.benchmarks]


def claim_label(out_dir: Path, model: EvalModel, prompt: PromptSettings) -> None:
    """<label>/model.json: written once; a label already used for another model is an error (its numbers would
    mix)."""
    info_path = out_dir / MODEL_INFO
    identity = {"spec": model.spec, "kind": model.kind, "path": model.path, "run_dir": model.run_dir,
                "step": model.step}
    if info_path.is_file():
        saved = json.loads(info_path.read_text())
        if saved.get("path") != model.path:
            raise EvalError(f"label {model.label!r} in {out_dir.parent} already holds {saved.get('path')}; "
                            f"give {model.path} another label (label=path)")
        return
    atomic_write_text(info_path, json.dumps({"label": model.label, **identity, "prompt": asdict(prompt),
                                             "created": time.time()}, indent=2, ensure_ascii=False))


def plan(model: EvalModel, cfg: EvalConfig, benchmarks: list[Benchmark], prompt: PromptSettings) -> list[_Pending]:
    """Per benchmark, the problems of this model not yet in its file (checked to be under the same protocol)."""
    out_dir = Path(cfg.output_dir) / model.label
    out_dir.mkdir(parents=True, exist_ok=True)
    claim_label(out_dir, model, prompt)
    pending = []
    for benchmark in benchmarks:
        protocol = protocol_for(benchmark.size, sample_below=cfg.sample_below, n_samples=cfg.n_samples,
                                temperature=cfg.temperature, top_p=cfg.top_p)
        path = out_dir / f"{benchmark.name}.jsonl"
        records = read_records(path)
        wanted = record_protocol(protocol, cfg, prompt)
        for record in records[:1]:
            if record.get("protocol") != wanted:
                raise EvalError(f"{path} was scored with {record.get('protocol')}, this call asks for {wanted}: "
                                "choose another output_dir (or remove the file) to score it again")
        done = {record["id"] for record in records}
        pending.append(_Pending(benchmark, protocol, path, [p for p in benchmark.problems if p.id not in done]))
    return pending


def _contiguous_batches(problems: list[BenchmarkProblem], size: int) -> Iterator[list[BenchmarkProblem]]:
    """Runs of consecutive benchmark indices, at most `size` long: problem i's seeds are seed + i·n + k whatever
    the batching (the generator offsets a call's seed by the prompt's position in the call)."""
    batch: list[BenchmarkProblem] = []
    for problem in problems:
        if batch and (len(batch) == size or problem.index != batch[-1].index + 1):
            yield batch
            batch = []
        batch.append(problem)
    if batch:
        yield batch


def _max_positions(model_dir: str) -> int | None:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    text_config = config.get("text_config", config)
    value = text_config.get("max_position_embeddings")
    return int(value) if value else None


def evaluate_model(model: EvalModel, cfg: EvalConfig, benchmarks: list[Benchmark], console=None) -> int:
    """Scores `model` on every benchmark problem not yet in its files; returns the problems scored now."""
    from transformers import AutoTokenizer

    from p2o_hpc.data.prompts import render_prompt
    from p2o_hpc.reward.math_verify_reward import MAX_BOXED_CHARS, RewardPool, extract_last_boxed
    from p2o_hpc.reward.registry import resolve_reward
    from p2o_hpc.rollout.generator import SamplingSettings
    from p2o_hpc.rollout.generator_process import GeneratorProcess

    prompt = prompt_settings(model, cfg.prompt)
    pending = plan(model, cfg, benchmarks, prompt)
    todo = sum(len(p.problems) for p in pending)
    if not todo:
        _say(console, f"{model.label}: every problem already scored in {Path(cfg.output_dir) / model.label}")
        return 0
    try:
        grader = resolve_reward(cfg.reward)
    except KeyError as error:
        raise EvalError(f"reward: {error.args[0]}") from error
    model_dir = model.hf_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts, ids = {}, {}
    for item in pending:
        for problem in item.problems:
            key = (item.benchmark.name, problem.id)
            texts[key] = render_prompt(tokenizer, problem.problem, prompt.template, system=prompt.system,
                                       chat_template_kwargs=prompt.chat_template_kwargs)
            ids[key] = list(tokenizer(texts[key], add_special_tokens=False)["input_ids"])
    longest = max(len(v) for v in ids.values())
    positions = _max_positions(model_dir)
    max_model_len = longest + cfg.max_tokens if positions is None else min(positions, longest + cfg.max_tokens)
    if longest >= max_model_len:
        key = max(ids, key=lambda k: len(ids[k]))
        raise EvalError(f"{key[0]} problem {key[1]!r} renders to {longest} prompt tokens, more than "
                        f"{model_dir} can take ({positions} positions)")
    _say(console, f"{model.label}: {todo} problem(s) to score from {model_dir} (engine context {max_model_len})")
    tp = cfg.tensor_parallel_size or 1
    scored = 0
    with GeneratorProcess(model_dir, dtype=cfg.dtype, max_model_len=max_model_len, seed=cfg.seed,
                          gpu_memory_utilization=cfg.gpu_memory_utilization, tensor_parallel_size=tp,
                          enable_sleep_mode=False) as engine, \
            RewardPool(cfg.reward_workers, timeout_s=cfg.reward_timeout_s, grader=grader) as pool, \
            _progress(console, cfg.progress) as progress:
        tasks = {item.benchmark.name: progress.add_task(
            f"{model.label} {item.benchmark.name} ({item.protocol.name})", total=len(item.benchmark.problems),
            completed=len(item.benchmark.problems) - len(item.problems)) for item in pending}
        for item in pending:
            protocol, name = item.protocol, item.benchmark.name
            meta = record_protocol(protocol, cfg, prompt)
            for batch in _contiguous_batches(item.problems, cfg.batch_problems):
                sampling = SamplingSettings(n=protocol.n_samples, temperature=protocol.temperature,
                                            top_p=protocol.top_p, max_tokens=cfg.max_tokens,
                                            seed=cfg.seed + batch[0].index * protocol.n_samples, logprobs=False)
                outputs = engine.generate([ids[(name, p.id)] for p in batch], sampling)
                responses = [[tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
                             for completions in outputs]
                flat = [text for group in responses for text in group]
                golds = [p.gold for p, group in zip(batch, responses) for _ in group]
                rewards = pool.score(flat, golds)
                for i, (problem, group, completions) in enumerate(zip(batch, responses, outputs)):
                    correct = rewards[i * protocol.n_samples:(i + 1) * protocol.n_samples]
                    append_record(item.path, {
                        "id": problem.id, "index": problem.index, "benchmark": name,
                        "benchmark_size": item.benchmark.size, "model": model.label,
                        "prompt": texts[(name, problem.id)], "gold": problem.gold, "protocol": meta,
                        "responses": group,
                        "extracted": [extract_last_boxed(text, max_chars=MAX_BOXED_CHARS) for text in group],
                        "correct": correct,
                        "finish_reasons": [c.finish_reason for c in completions],
                        "response_tokens": [len(c.token_ids) for c in completions],
                        "score": sum(correct) / len(correct),
                    })
                    scored += 1
                    progress.advance(tasks[name])
    return scored


def _say(console, message: str) -> None:
    if console is not None:
        console.print(message)
    else:
        print(message, flush=True)


def _progress(console, enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, disable=not enabled)
