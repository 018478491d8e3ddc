"""The CPU testbed's base policy: a small Qwen3 (head_dim 64, a tokenizer trained on the task) warm-started by the
project's own megatron learner (the registered `sft` loss, p2o_hpc.trainer.sft) on the warm-start corpus
(p2o_hpc.data.warm_start_corpus), so that its careful skill is latent: the worked format, and with it the right
answer on hard problems, comes when an instruction of the right kind asks for it, rarely otherwise.

    python tools/build_testbed_model.py            # rebuilds assets/testbed_model/ (what experiment=testbed uses)

`latent_skill_report` measures the property the testbed rests on: greedy accuracy on held-out problems without an
instruction, with one of the right kind and with one of the other kind, and the context-distillation ratio mask on
the decisive token (the first token of the worked solution): the share of hard problems where
π(y₁|x) / π(y₁|x̃) < 1 − cd_clip_low, i.e. where CD could not move the skill because the token is dropped.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from p2o_hpc.data.prompts import render_prompt
from p2o_hpc.data.synthetic import KINDS, SyntheticSpec, generate, worked_solution
from p2o_hpc.data.warm_start_corpus import ELICITS, HELD_OUT_PHRASINGS, PHRASINGS, CorpusSpec, corpus, tokenizer_texts
from p2o_hpc.io_utils import atomic_write_text
from p2o_hpc.tiny_model import TokenizerCorpus, build_tiny_model
from p2o_hpc.trainer.sft import SFTSettings, run_sft

# The testbed's user turn: the problem alone (an evolved template goes in front of it, T(x, z) = z + "\n\n" + x).
TESTBED_TEMPLATE = "{problem}"
CHAT_TEMPLATE_KWARGS = {"enable_thinking": False}  # Qwen3's non-thinking mode, as the paper's runs
REPORT_NAME = "latent_skill.json"
RECIPE_VERSION = 3  # bump when the corpus, tokenizer or task changes what the model learns


@dataclass(frozen=True)
class TestbedModelSpec:
    """Everything that decides the warm-started model."""

    seed: int = 0
    architecture: dict[str, Any] = field(default_factory=lambda: {"num_hidden_layers": 4,
                                                                 "max_position_embeddings": 1024})
    vocab_target: int = 500
    corpus: CorpusSpec = CorpusSpec()
    sft: SFTSettings = SFTSettings(epochs=1.0, global_batch_rows=64, micro_batch_tokens=2048, lr=2e-3,
                                   warmup_steps=30, weight_decay=0.0, check_export=True, progress=True)


def tokenizer_corpus(spec: TestbedModelSpec) -> TokenizerCorpus:
    return TokenizerCorpus(tokenizer_texts, {"testbed": RECIPE_VERSION}, spec.vocab_target)


def sft_rows(tokenizer, rows: list[dict]) -> list[tuple[str, str]]:
    """(prompt, response) pairs rendered through the same chat-template path as the RL prompts, the instruction in
    the place an evolved template takes."""
    return [(render_prompt(tokenizer, row["problem"], TESTBED_TEMPLATE, chat_template_kwargs=CHAT_TEMPLATE_KWARGS,
                           p2o_template=row["instruction"]), row["response"]) for row in rows]


def build_testbed_model(out_dir: str | Path, spec: TestbedModelSpec = TestbedModelSpec(),
                        cache_root: Path | None = None, report_count: int = 40) -> Path:
    """The randomly initialised model with the testbed tokenizer, warm-started by the megatron learner into
    `out_dir` (an HF folder, written atomically by the SFT stage), then its latent-skill report beside it."""
    from transformers import AutoTokenizer

    initial = build_tiny_model("qwen3-tiny", seed=spec.seed, overrides=spec.architecture, cache_root=cache_root,
                               tokenizer_corpus=tokenizer_corpus(spec))
    tokenizer = AutoTokenizer.from_pretrained(initial)
    rows = sft_rows(tokenizer, corpus(spec.corpus))
    run_sft(initial, rows, out_dir, spec.sft)
    report = latent_skill_report(out_dir, count=report_count)
    report["spec"] = json.loads(json.dumps(asdict(spec), default=str))
    atomic_write_text(Path(out_dir) / REPORT_NAME, json.dumps(report, indent=1))
    return Path(out_dir)


# -- the latent-skill property ------------------------------------------------------------------------------------

def _instruction(kind: str, which: str) -> str:
    """"right" / "other": a corpus phrasing of the kind that elicits `kind`'s format / of the other kind;
    "right_unseen": one the corpus never holds (does the model key on what the instruction says?)."""
    instruction_kind = next(k for k, target in ELICITS.items() if (target == kind) == (which != "other"))
    return HELD_OUT_PHRASINGS[instruction_kind] if which == "right_unseen" else PHRASINGS[instruction_kind][0]


def latent_skill_report(model_dir: str | Path, *, count: int = 40, difficulties: tuple[int, ...] = (1, 2, 3),
                        seed: int = 12345, cd_clip_low: float = 0.99, max_new_tokens: int = 96) -> dict:
    """Greedy accuracy per kind × difficulty × {no instruction, right kind (a corpus phrasing / an unseen one),
    other kind} on fresh problems, and the
    CD mask's share on the decisive token of the worked solutions of the hard ones."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from p2o_hpc.reward.registry import resolve_reward

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    grade = resolve_reward("math_verify")

    def prompt(problem, instruction: str) -> str:
        return render_prompt(tokenizer, problem.problem, TESTBED_TEMPLATE, chat_template_kwargs=CHAT_TEMPLATE_KWARGS,
                             p2o_template=instruction)

    @torch.no_grad()
    def greedy(prompts: list[str]) -> list[str]:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    @torch.no_grad()
    def first_token_logprob(prompts: list[str], token_ids: list[int]) -> list[float]:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        logits = model(**batch).logits[:, -1, :].float().log_softmax(-1)
        return [float(logits[i, t]) for i, t in enumerate(token_ids)]

    accuracy: dict[str, float] = {}
    worked_rate: dict[str, float] = {}
    masked, ratios = [], []
    for kind in KINDS:
        for difficulty in difficulties:
            problems = generate(SyntheticSpec(kind, difficulty, count, seed=seed))
            for which in ("none", "right", "right_unseen", "other"):
                instruction = "" if which == "none" else _instruction(kind, which)
                outputs = greedy([prompt(p, instruction) for p in problems])
                key = f"{kind}/d{difficulty}/{which}"
                accuracy[key] = statistics.mean(grade(o, p.answer) for o, p in zip(outputs, problems))
                worked_rate[key] = statistics.mean(not o.lstrip().startswith("\\boxed") for o in outputs)
            if difficulty > 1:  # the decisive token: the first token of the worked solution
                first = [tokenizer(worked_solution(p), add_special_tokens=False)["input_ids"][0] for p in problems]
                plain = first_token_logprob([prompt(p, "") for p in problems], first)
                templated = first_token_logprob([prompt(p, _instruction(kind, "right")) for p in problems], first)
                for lp_x, lp_xt in zip(plain, templated):
                    ratio = float(torch.tensor(lp_x - lp_xt).exp())
                    ratios.append(ratio)
                    masked.append(ratio < 1.0 - cd_clip_low)
    hard = [k for k in accuracy if not k.split("/")[1] == "d1"]
    return {
        "accuracy": accuracy,
        "worked_format_rate": worked_rate,
        "hard_accuracy_without_instruction": statistics.mean(accuracy[k] for k in hard if k.endswith("/none")),
        "hard_accuracy_with_right_instruction": statistics.mean(accuracy[k] for k in hard if k.endswith("/right")),
        "hard_accuracy_with_unseen_right_instruction": statistics.mean(accuracy[k] for k in hard
                                                                        if k.endswith("/right_unseen")),
        "hard_accuracy_with_other_instruction": statistics.mean(accuracy[k] for k in hard if k.endswith("/other")),
        "easy_accuracy_without_instruction": statistics.mean(accuracy[k] for k in accuracy
                                                             if "/d1/" in k and k.endswith("/none")),
        "cd_decisive_token_masked_frac": statistics.mean(masked) if masked else None,
        "cd_decisive_token_ratio_median": statistics.median(ratios) if ratios else None,
        "problems_per_cell": count,
    }
