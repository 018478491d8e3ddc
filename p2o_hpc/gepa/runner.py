"""One GEPA round: epoch t's hard set in, ``epochs/<t>/templates.json`` + ``DONE`` out.

Shared by the GEPA service job and the learner's inline mode. The policy being evaluated is whatever engine the
`RolloutWorker` runs (the service loads the epoch's exported policy; inline uses the learner's own engine), and
the reflection model is the reference server (`self`) or an endpoint (`teacher`); `edit` has no model (offline
phrase edits in the same mutation slot).
"""

from __future__ import annotations

import zlib
from collections import Counter
from pathlib import Path

from p2o_hpc.config import GEPAConfig, ReflectionConfig, ReflectionKind, reflection_prompt_budget
from p2o_hpc.data import Problem
from p2o_hpc.gepa.evolve import Evaluation, GEPAEngine, GEPASettings, HardItem, Mutation
from p2o_hpc.run_dir import RunDir


def read_hard_set(run_dir: RunDir, epoch: int) -> list[HardItem]:
    items = []
    for number, row in enumerate(run_dir.read_hard_set(epoch), start=1):
        try:
            items.append(HardItem(str(row["prompt_id"]), row["prompt"], str(row["ground_truth"])))
        except (KeyError, TypeError) as error:
            raise ValueError(f"{run_dir.hard_set(epoch)}:{number}: not a hard-set row "
                             f"({type(error).__name__}: {error})") from error
    return items


class PolicyEvaluator:
    """evaluate(template, items): one rollout per item under the template at `eval_temperature` (0: greedy, the
    authors' val_kwargs.do_sample=False), graded by the run's reward; `scores_k` samples at `temperature`.

    The seed depends on the template only, so re-evaluating a template on an item (a restarted service) samples
    the same response. A template the checks reject scores 0 everywhere without reaching the model. `reward`
    (the run's data.reward) tells the reflection feedback whether a response broke the answer format.
    """

    def __init__(self, worker, *, temperature: float, max_tokens: int, seed: int, eval_temperature: float = 0.0,
                 reward: str | None = None):
        self.worker, self.temperature, self.max_tokens, self.seed = worker, temperature, max_tokens, seed
        self.eval_temperature, self.reward = eval_temperature, reward

    @classmethod
    def from_config(cls, cfg, worker) -> "PolicyEvaluator":
        """The run's evaluator (RunConfig `cfg`): GEPA scores at gepa.eval_temperature, pass@k at
        rollout.temperature, responses up to gepa.max_response_tokens (null → rollout.max_response_tokens)."""
        return cls(worker, temperature=cfg.rollout.temperature, eval_temperature=cfg.gepa.eval_temperature,
                   seed=cfg.gepa.seed, max_tokens=cfg.gepa.max_response_tokens or cfg.rollout.max_response_tokens,
                   reward=cfg.data.reward)

    @property
    def tokenizer(self):
        return self.worker.tokenizer

    def __call__(self, template: str, items: list[HardItem]) -> list[Evaluation]:
        rollouts = self._rollouts(template, items, 1, self.eval_temperature, seed_offset=0)
        if rollouts is None:
            return [Evaluation(0.0, "") for _ in items]
        return [Evaluation(rollout.reward, rollout.text, self._format_ok(rollout.text)) for rollout in rollouts]

    def scores_k(self, template: str, items: list[HardItem], k: int) -> list[list[float]]:
        """k rollouts per item under the template at rollout.temperature (pass@1 / pass@k; outside the budget)."""
        rollouts = self._rollouts(template, items, k, self.temperature, seed_offset=7919)
        if rollouts is None:
            return [[0.0] * k for _ in items]
        return [[rollout.reward for rollout in rollouts[i * k : (i + 1) * k]] for i in range(len(items))]

    def _format_ok(self, response: str) -> bool:
        if self.reward is None:
            return True
        from p2o_hpc.reward.registry import format_ok

        return format_ok(self.reward, response)

    def _rollouts(self, template: str, items: list[HardItem], k: int, temperature: float, *, seed_offset: int):
        """k graded rollouts per item, prompt-major; None when the template is rejected (it never runs)."""
        from p2o_hpc.rollout.generator import SamplingSettings

        problems = [Problem(item.id, item.question, item.ground_truth, "hard_set") for item in items]
        templates, rejected = self.worker.checked_templates([[template] * k for _ in items])
        if rejected:
            return None
        sampling = SamplingSettings(n=k, temperature=temperature, top_p=1.0, max_tokens=self.max_tokens,
                                    seed=self.seed + seed_offset + zlib.crc32(template.encode()), logprobs=False)
        rollouts = self.worker.generate(problems, 0, sampling, templates if template else None)
        self.worker.score(rollouts, [problems[rollout.prompt_index].answer for rollout in rollouts])
        return rollouts


def pass_at_k_metrics(evaluate: PolicyEvaluator, items: list[HardItem], document: dict, k: int) -> dict:
    """pass@1 and pass@k on the hard dev set, on the plain prompt and under the best template (Fig. 4)."""
    dev = set(document["dev_ids"])
    dev_items = [item for item in items if item.id in dev]
    if not dev_items or not document["pool"]:
        return {}
    best = max(document["pool"], key=lambda candidate: candidate["dev_mean"])
    metrics = {}
    for name, template in (("plain", ""), ("best_template", best["template"])):
        scores = evaluate.scores_k(template, dev_items, k)
        metrics[f"gepa/dev_pass@1_{name}"] = sum(map(sum, scores)) / (k * len(scores))
        metrics[f"gepa/dev_pass@{k}_{name}"] = sum(max(row) >= 1.0 for row in scores) / len(scores)
    return metrics


def gepa_settings(gepa_cfg: GEPAConfig, k: int, reflection_cfg: ReflectionConfig) -> GEPASettings:
    """The engine's settings: gepa.* as configured, K templates per hard sample (k: the learner's
    algorithm.n_samples), the feedback fitted into the reflection model's context (reflection_prompt_budget)."""
    return GEPASettings(gepa_cfg, templates_per_sample=k,
                        feedback_token_budget=reflection_prompt_budget(reflection_cfg))


def configured_round(cfg, run_dir: RunDir, epoch: int, worker, reflection: "Reflection") -> dict:
    """One round as the run's config (RunConfig `cfg`) says, on `worker`'s engine: the GEPA service's and the
    learner's inline round."""
    evaluate = PolicyEvaluator.from_config(cfg, worker)
    mutation = reflection.mutation(getattr(evaluate, "tokenizer", None), cfg.algorithm.p2o.template_max_tokens)
    return run_round(run_dir, epoch, gepa_settings(cfg.gepa, cfg.algorithm.n_samples, cfg.reflection), evaluate,
                     reflection.propose if mutation is None else None, extra_metrics=reflection.metrics,
                     pass_at_k=cfg.gepa.eval_pass_at_k, mutation=mutation)


def round_metrics(document: dict) -> dict:
    """Fig. 4-style numbers: proposals, acceptance, budget, and how much of dev the cover set solves."""
    counters, pool = document["counters"], document["pool"]
    dev = len(document["dev_ids"])
    covered = {j for i in document["cover"] for j, score in enumerate(pool[i]["dev_scores"]) if score >= 1.0}
    best = max(pool, key=lambda candidate: candidate["dev_mean"]) if pool else None
    return {
        "gepa/skipped": float(document["skipped"]),
        "gepa/proposed": counters.get("proposed", 0),
        "gepa/accepted": counters.get("accepted", 0),
        "gepa/acceptance_rate": counters.get("accepted", 0) / max(1, counters.get("proposed", 0)),
        "gepa/budget_used": document["budget"]["used"],
        "gepa/budget_total": document["budget"]["total"],
        "gepa/pool_size": len(pool),
        "gepa/cover_size": len(document["cover"]),
        "gepa/dev_coverage": len(covered) / dev if dev else 0.0,
        "gepa/dev_score_plain": pool[0]["dev_mean"] if pool else 0.0,  # the seed ε's single-rollout dev score
        "gepa/dev_score_best_template": best["dev_mean"] if best else 0.0,
        "gepa/assigned_prompts": len(document["assignments"]),
    }


def run_round(run_dir: RunDir, epoch: int, settings: GEPASettings, evaluate, propose,
              extra_metrics=dict, pass_at_k: bool = True, mutation: Mutation | None = None) -> dict:
    """Evolve templates for epoch `epoch`'s hard set (resuming its saved state), publish them, return metrics.

    propose: the reflection LLM (GEPA's reflective mutation); mutation: another operator instead (propose None).
    extra_metrics(): more numbers to publish with the round (the reflection client's requests, tokens, cost; the
    edit operator's edit counts).
    pass_at_k: also measure pass@1/pass@K on dev with and without the best template (2·K·|dev| extra rollouts).
    The reflection feedback's tokens are counted with the evaluator's (the policy's) tokenizer, when it has one.
    """
    if run_dir.done(epoch):
        return run_dir.take_round(epoch).metrics
    items = read_hard_set(run_dir, epoch)
    engine = GEPAEngine(items, evaluate, propose, settings, tokenizer=getattr(evaluate, "tokenizer", None),
                        mutation=mutation)
    document = engine.run(run_dir.gepa_state(epoch)).to_json()
    document["epoch"] = epoch
    document["metrics"] = round_metrics(document)
    if pass_at_k and not document["skipped"] and hasattr(evaluate, "scores_k"):
        document["metrics"].update(pass_at_k_metrics(evaluate, items, document, settings.templates_per_sample))
    document["metrics"].update(extra_metrics())
    run_dir.publish_templates(epoch, document)
    return document["metrics"]


class Reflection:
    """The mutation side of a GEPA process: for `self` the reference server and a client, for `teacher` a client;
    for `edit` neither (no model, no HTTP): the offline edit operator, bound to the policy's tokenizer per round."""

    def __init__(self, reflection_cfg, reference_model_dir: str | None, log_dir: str | Path):
        self.cfg = reflection_cfg
        self.server = self.client = None
        self.edit_tally: Counter = Counter()  # the edit operator's counts, over this process's rounds
        if reflection_cfg.kind == ReflectionKind.edit:
            from p2o_hpc.gepa.edit_mutation import load_phrase_bank

            self.phrases = load_phrase_bank(reflection_cfg.edit_phrase_bank)  # a bad file fails before any round
            return
        from p2o_hpc.reflection import ReflectionClient
        from p2o_hpc.reflection.server import ReferenceServer

        if reflection_cfg.kind == ReflectionKind.self:
            self.server = ReferenceServer.from_config(reflection_cfg, reference_model_dir, log_dir=log_dir).start()
            self.client = ReflectionClient.from_config(reflection_cfg, base_url=self.server.base_url,
                                                       model=self.server.served_model_name)
        else:
            self.client = ReflectionClient.from_config(reflection_cfg)

    @classmethod
    def for_run(cls, cfg, log_dir: str | Path) -> "Reflection":
        """The run's (RunConfig `cfg`): the reference model folder is resolved only for `self`, which serves it."""
        from p2o_hpc.model_dir import resolve_model_dir

        model_dir = resolve_model_dir(cfg.model.path) if cfg.reflection.kind == ReflectionKind.self else None
        return cls(cfg.reflection, model_dir, log_dir)

    def mutation(self, tokenizer, template_max_tokens: int) -> Mutation | None:
        """The operator for a round: None for the LLM kinds (the engine's reflective mutation with `propose`), the
        edit operator for `edit`, checking proposals with the policy's tokenizer against the template budget."""
        if self.client is not None:
            return None
        from p2o_hpc.gepa.edit_mutation import EditMutation

        return EditMutation(self.phrases, num_edits=self.cfg.edit_num_edits, tokenizer=tokenizer,
                            max_tokens=template_max_tokens, tally=self.edit_tally)

    def propose(self, prompt: str) -> str:
        return self.client.complete(prompt)

    def metrics(self) -> dict:
        """Published with each round: the client's reflection/* tally, or edit/* counts (no requests)."""
        if self.client is not None:
            return self.client.metrics()
        from p2o_hpc.gepa.edit_mutation import edit_metrics

        return edit_metrics(self.edit_tally)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.server is not None:
            self.server.stop()
