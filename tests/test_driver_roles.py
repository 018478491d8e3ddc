"""The training driver's roles without megatron or vLLM: the off-policy schedule and the rollout side (on a
one-process gloo group with a scripted engine), and the hooks a config selects."""

from __future__ import annotations

import threading

from p2o_hpc.algo.hooks import AlgorithmHooks
from p2o_hpc.config import RunConfig
from p2o_hpc.records import Problem, Rollout, StepBatch
from p2o_hpc.trainer.metrics import PhaseTimer
from p2o_hpc.trainer.rollout_side import OffPolicySchedule, RolloutSide


class ScriptedEngine:
    """Answers every prompt with K one-token responses; records the weights version and seed it generated with."""

    def __init__(self):
        self.version, self.calls, self.slept = 0, [], 0
        self.release = threading.Event()
        self.release.set()

    def checked_templates(self, templates):
        return templates, 0

    def generate(self, problems, first_prompt_index, sampling, templates, *, distill):
        self.release.wait(timeout=30)
        self.calls.append({"version": self.version, "seed": sampling.seed, "templates": templates})
        return [Rollout(first_prompt_index + i, [1], [2], None, "stop", "x") for i in range(len(problems))
                for _ in range(sampling.n)]

    def score(self, rollouts, answers):
        for rollout in rollouts:
            rollout.reward = 1.0

    def sleep(self):
        self.slept += 1

    def close(self):
        pass


def batch_of(n: int, epoch: int = 0) -> StepBatch:
    return StepBatch([Problem(f"p{i}", "q", "1", "test") for i in range(n)], epoch=epoch, epoch_finished=False)


def side(engine, *, off_policy: bool, total_steps: int = 3, hooks: AlgorithmHooks | None = None) -> RolloutSide:
    cfg = RunConfig()
    cfg.algorithm.n_samples, cfg.algorithm.prompts_per_step, cfg.algorithm.one_step_off_policy = 2, 4, off_policy
    return RolloutSide(cfg, engine, [0], hooks or AlgorithmHooks(), OffPolicySchedule(off_policy, total_steps))


def test_the_schedule_generates_ahead_on_every_step_but_the_last_and_only_off_policy():
    assert [OffPolicySchedule(True, 4).generate_ahead(step) for step in range(4)] == [True, True, True, False]
    assert not any(OffPolicySchedule(False, 4).generate_ahead(step) for step in range(4))


def test_on_policy_generation_gathers_every_rollout_and_puts_the_engine_to_sleep(one_process_group):
    engine = ScriptedEngine()
    batch = side(engine, off_policy=False).generate(batch_of(4), step=1, timer=PhaseTimer())
    assert [r.prompt_index for r in batch.rollouts] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(r.reward == 1.0 for r in batch.rollouts)
    assert engine.slept == 1


def test_generating_ahead_runs_beside_the_update_with_the_weights_of_its_start_and_the_seeds_of_its_step(
        one_process_group):
    engine = ScriptedEngine()
    rollouts = side(engine, off_policy=True)
    on_policy_seed = rollouts.sampling(step=2, first_prompt=0).seed
    engine.release.clear()  # the engine is still busy when start_ahead returns
    started = rollouts.start_ahead(batch_of(4), step=2)
    assert not started.done()
    engine.release.set()
    batch = rollouts.finish_ahead(batch_of(4), started)
    engine.version = 1  # the next weight sync happens after the update: too late for the batch generated ahead
    assert engine.calls == [{"version": 0, "seed": on_policy_seed, "templates": None}]
    assert len(batch.rollouts) == 8
    rollouts.release_engine()
    assert engine.slept == 0  # off-policy: the engine keeps working through the update
    rollouts.close()


def test_hooks_pass_their_templates_to_the_engine(one_process_group):
    class Hinted(AlgorithmHooks):
        def templates_for(self, problems, k):
            return [["hint"] * k for _ in problems]

    engine = ScriptedEngine()
    side(engine, off_policy=False, hooks=Hinted()).generate(batch_of(2), step=0, timer=PhaseTimer())
    assert engine.calls[0]["templates"] == [["hint", "hint"], ["hint", "hint"]]


def test_a_grpo_config_gets_the_no_op_hooks_and_p2o_its_own(tmp_path):
    from p2o_hpc.trainer.hooks import algorithm_hooks

    cfg = RunConfig()
    assert type(algorithm_hooks(cfg, tmp_path, rank=0, console=None)) is AlgorithmHooks
    cfg.algorithm.p2o.enabled = True
    hooks = algorithm_hooks(cfg, tmp_path, rank=0, console=None)
    hooks.exchange.assignments = {"p1": ["a", "b"]}
    assert hooks.templates_for(batch_of(3).problems, 2) == [["", ""], ["a", "b"], ["", ""]]
    assert hooks.templates_for(batch_of(1).problems, 2) is None  # nobody in this batch has templates
