"""The training driver's roles without megatron or vLLM: the off-policy schedule, where the engines live, the
rollout side (on a one-process gloo group with a scripted engine) with the engine's half of the refit check, the
refit statistic, and the hooks a config selects."""

from __future__ import annotations

import math
import threading

import pytest

from p2o_hpc.algo.hooks import AlgorithmHooks
from p2o_hpc.config import RunConfig, validate
from p2o_hpc.records import Problem, Rollout, StepBatch
from p2o_hpc.trainer.learner_side import refit_metrics
from p2o_hpc.trainer.metrics import PhaseTimer
from p2o_hpc.trainer.rollout_side import OffPolicySchedule, RolloutSide, engines_per_node, hosts_engine


class ScriptedEngine:
    """Answers every prompt with K one-token responses; records the weights version and seed it generated with,
    and the order of its calls; its log-prob of token t of a sequence is -t (entry 0: nan, as vLLM's)."""

    def __init__(self):
        self.version, self.calls, self.slept, self.log = 0, [], 0, []
        self.release = threading.Event()
        self.release.set()

    def prompt_logprobs(self, sequences):
        self.log.append(("prompt_logprobs", len(sequences)))
        return [[math.nan] + [-float(t) for t in range(1, len(seq))] for seq in sequences]

    def checked_templates(self, templates):
        return templates, 0

    def generate(self, problems, first_prompt_index, sampling, templates, *, distill):
        self.release.wait(timeout=30)
        self.calls.append({"version": self.version, "seed": sampling.seed, "templates": templates})
        self.log.append(("generate", len(problems)))
        return [Rollout(first_prompt_index + i, [1, 1], [2, 2, 2], None, "stop", "x") for i in range(len(problems))
                for _ in range(sampling.n)]

    def score(self, rollouts, answers):
        for rollout in rollouts:
            rollout.reward = 1.0

    def sleep(self):
        self.slept += 1
        self.log.append(("sleep", 0))

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
    batch, engine_logprobs = side(engine, off_policy=False).generate(batch_of(4), step=1, timer=PhaseTimer())
    assert [r.prompt_index for r in batch.rollouts] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(r.reward == 1.0 for r in batch.rollouts)
    assert engine.slept == 1
    assert engine_logprobs == {} and [name for name, _ in engine.log] == ["generate", "sleep"]  # no check due


def test_the_engine_checks_its_first_rollouts_before_it_sleeps(one_process_group):
    """On-policy the engine's half of the refit check runs right after generating: after that nothing may wake it
    before the update."""
    engine, timer = ScriptedEngine(), PhaseTimer()
    batch, engine_logprobs = side(engine, off_policy=False).generate(batch_of(4), step=1, timer=timer,
                                                                       refit_sequences=3)
    assert [name for name, _ in engine.log] == ["generate", "prompt_logprobs", "sleep"]
    assert sorted(engine_logprobs) == [0, 1, 2]
    assert all(values == [-2.0, -3.0, -4.0] for values in engine_logprobs.values())  # the response tokens only
    assert len(batch.rollouts) == 8 and "refit_check" in timer.seconds


def test_a_host_checks_only_its_own_rollouts_among_the_first(one_process_group):
    """Rollouts are numbered over the whole batch: the second of two hosts holds prompts 2-3, rollouts 4-7."""
    engine = ScriptedEngine()
    cfg = RunConfig()
    cfg.algorithm.n_samples, cfg.algorithm.prompts_per_step = 2, 4
    second_host = RolloutSide(cfg, engine, [7, 0], AlgorithmHooks(), OffPolicySchedule(False, 3))  # this rank is 0
    share = second_host._host_share(batch_of(4), step=0, refit_sequences=6)
    assert [r.prompt_index for r in share["rollouts"]] == [2, 2, 3, 3]
    assert sorted(share["engine_logprobs"]) == [4, 5]
    assert second_host._host_share(batch_of(4), step=0, refit_sequences=4)["engine_logprobs"] == {}


def test_a_batch_generated_ahead_is_checked_after_the_sync(one_process_group):
    """Off-policy the batch was sampled with the previous weights: the engine's half is computed on request, once
    the step's sync has given it the learner's weights, and the engine never sleeps."""
    engine = ScriptedEngine()
    rollouts = side(engine, off_policy=True)
    batch = rollouts.finish_ahead(batch_of(4), rollouts.start_ahead(batch_of(4), step=1))
    assert [name for name, _ in engine.log] == ["generate"]
    engine.version = 1  # the step's weight sync
    assert rollouts.engine_logprobs(batch, 0) == {}
    checked = rollouts.engine_logprobs(batch, 5)
    assert sorted(checked) == [0, 1, 2, 3, 4] and engine.log[-1] == ("prompt_logprobs", 5)
    assert engine.slept == 0
    rollouts.close()


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


# ------------------------------------------------------------------------------------------- where engines live


def hosts(ranks_per_node: int, engines: int, nodes: int = 1) -> list[int]:
    """Global ranks hosting an engine, ranks numbered node by node (torchrun / SLURM)."""
    return [rank for rank in range(nodes * ranks_per_node) if hosts_engine(rank % ranks_per_node, ranks_per_node,
                                                                           engines)]


def test_an_eight_gpu_node_hosts_an_engine_on_every_gpu_by_default():
    cfg = RunConfig()
    assert engines_per_node(cfg.rollout, 8, cuda=True) == 8
    assert hosts(8, 8) == list(range(8))
    cfg.rollout.engines_per_node = 2
    assert engines_per_node(cfg.rollout, 8, cuda=True) == 2
    assert hosts(8, 2, nodes=2) == [0, 4, 8, 12]
    assert hosts(8, 1, nodes=2) == [0, 8]  # the old layout: local rank 0 only


def test_a_cpu_node_hosts_one_engine_unless_asked_for_more():
    cfg = RunConfig()
    assert engines_per_node(cfg.rollout, 2, cuda=False) == 1
    assert hosts(2, 1) == [0]
    cfg.rollout.engines_per_node = 2
    assert engines_per_node(cfg.rollout, 2, cuda=False) == 2


@pytest.mark.parametrize("engines, ok", [(None, True), (1, True), (4, True), (8, True), (3, False), (0, False),
                                         (16, False)])
def test_engines_per_node_must_divide_the_ranks_per_node(engines, ok):
    cfg = RunConfig()
    cfg.parallel.data, cfg.parallel.gpus_per_node = 8, 8
    cfg.algorithm.micro_batch_size = 1
    cfg.rollout.engines_per_node = engines
    if ok:
        validate(cfg)
    else:
        with pytest.raises(ValueError, match="rollout.engines_per_node"):
            validate(cfg)


# ----------------------------------------------------------------------------------------- the refit statistic


def test_the_refit_statistic_is_the_mean_token_probability_error():
    same = {0: [-1.0, -2.0], 1: [-0.5]}
    assert refit_metrics(same, same) == {"rollout/token_prob_error": 1.0, "rollout/logprob_gap_mean": 0.0,
                                         "rollout/logprob_gap_max": 0.0}
    shifted = refit_metrics({0: [-1.0, -1.0], 1: [-1.0]}, {0: [-1.1, -0.9], 1: [-1.1]})
    assert shifted["rollout/token_prob_error"] == pytest.approx(math.exp(0.1))
    assert shifted["rollout/logprob_gap_max"] == pytest.approx(0.1)
    assert refit_metrics({}, {})["rollout/token_prob_error"] == 1.0


def test_one_bf16_outlier_among_many_tokens_passes_and_stale_weights_do_not():
    """A max-abs gap of 0.05 trips on one noisy token in thousands; the mean probability error does not, but a
    systematic gap of the size stale weights cause still stops the run (1 + rollout.refit_tolerance = 1.05)."""
    tolerance = RunConfig().rollout.refit_tolerance
    learner = {i: [-1.0] * 1000 for i in range(4)}
    noisy = {i: [-1.0 + (0.01 if t % 2 else -0.01) for t in range(1000)] for i in range(4)}
    noisy[2][500] = -1.4  # one outlier
    metrics = refit_metrics(noisy, learner)
    assert metrics["rollout/logprob_gap_max"] > 0.05
    assert metrics["rollout/token_prob_error"] <= 1 + tolerance
    stale = {i: [-1.0 + (0.08 if t % 2 else -0.08) for t in range(1000)] for i in range(4)}
    assert refit_metrics(stale, learner)["rollout/token_prob_error"] > 1 + tolerance
    broken = refit_metrics({0: [math.nan, -1.0]}, {0: [-1.0, -1.0]})["rollout/token_prob_error"]
    assert not broken <= 1 + tolerance  # the check's comparison fails on NaN
    with pytest.raises(ValueError, match="rollout 0"):
        refit_metrics({0: [-1.0, -1.0]}, {0: [-1.0]})
