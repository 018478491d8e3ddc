"""Qwen3 non-thinking mode on every path that renders a prompt for the policy engine.

The tiny model carries Qwen3's own chat template, so what reaches vLLM here is what Qwen3-4B would get. A spy on
the engine records every prompt it is sent: training rollouts (plain and templated), the CD pair (x and x̃ that
the learner scores), GEPA's scores and its pass@k. The `self` reflection server's requests are checked in
test_reflection.py.
"""

from __future__ import annotations

import pytest

from p2o_hpc.data import Problem, load_named
from p2o_hpc.qwen3_chat_template import NON_THINKING_GENERATION_PROMPT

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def worker():
    from hydra import compose, initialize_config_dir

    from p2o_hpc.config import register_configs, to_run_config
    from p2o_hpc.model_dir import resolve_model_dir
    from p2o_hpc.paths import REPO_ROOT
    from p2o_hpc.rollout.rollout_worker import RolloutWorker

    register_configs()
    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = to_run_config(compose("config", overrides=["experiment=smoke", "algorithm=p2o"]))
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False}  # the paper's default, kept by the preset
    worker = RolloutWorker.from_config(cfg, resolve_model_dir(cfg.model.path), max_response_tokens=4)
    sent: list[list[int]] = []
    generate = worker.generator.generate

    def spy(prompt_ids, sampling):
        sent.extend(prompt_ids)
        return generate(prompt_ids, sampling)

    worker.generator.generate = spy
    worker.sent = sent
    yield worker
    worker.close()


def _decoded_ends(worker, ids: list[int]) -> str:
    return worker.tokenizer.decode(ids[-8:])


def test_every_engine_prompt_is_non_thinking(worker):
    from p2o_hpc.gepa.runner import PolicyEvaluator
    from p2o_hpc.gepa.evolve import HardItem
    from p2o_hpc.rollout.generator import SamplingSettings

    problems = load_named("math500")[:2]
    sampling = SamplingSettings(n=2, temperature=0.6, top_p=1.0, max_tokens=4, seed=1, logprobs=True)
    plain = worker.generate(problems, 0, sampling)
    templated = worker.generate(problems, 0, sampling, templates=[["Work carefully.", ""]] * 2)
    items = [HardItem(p.id, p.problem, p.answer) for p in problems]
    PolicyEvaluator(worker, temperature=0.0, max_tokens=4, seed=0)("Check small cases.", items)  # GEPA scores
    PolicyEvaluator(worker, temperature=0.6, max_tokens=4, seed=0).scores_k("", items, 2)  # pass@k

    assert len(worker.sent) == 2 + 4 + 2 + 2  # grouped plain, one per templated rollout, GEPA scores, pass@k
    for ids in worker.sent:
        assert worker.tokenizer.decode(ids).endswith(NON_THINKING_GENERATION_PROMPT), _decoded_ends(worker, ids)
    # The CD pair: the learner trains on x (prompt_ids) and scores x̃ (generation_prompt_ids); both non-thinking.
    pairs = [(r.prompt_ids, r.generation_prompt_ids) for r in templated if r.template]
    assert len(pairs) == 2
    for x, x_tilde in pairs + [(r.prompt_ids, r.prompt_ids) for r in plain]:
        assert worker.tokenizer.decode(x).endswith(NON_THINKING_GENERATION_PROMPT)
        assert worker.tokenizer.decode(x_tilde).endswith(NON_THINKING_GENERATION_PROMPT)
    assert "Work carefully.\n\n" in worker.tokenizer.decode(pairs[0][1])


def test_thinking_mode_is_one_override_away(worker):
    """chat_template_kwargs={} gives Qwen3's default (thinking) generation prompt: the key really reaches Jinja."""
    problem = Problem("p", "What is 1+1?", "2", "test")
    saved = worker.chat_template_kwargs
    try:
        worker.chat_template_kwargs = {}
        thinking = worker.tokenizer.decode(worker.encode([problem])[0])
    finally:
        worker.chat_template_kwargs = saved
    assert thinking.endswith("<|im_start|>assistant\n") and "<think>" not in thinking
    assert worker.tokenizer.decode(worker.encode([problem])[0]).endswith(NON_THINKING_GENERATION_PROMPT)
