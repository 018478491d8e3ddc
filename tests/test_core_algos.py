"""GRPO's advantage, clipped surrogate and aggregation against values computed by hand."""

import math

import pytest
import torch

from p2o_hpc.algo.core_algos import (
    get_advantage_estimator,
    get_aggregation,
    get_policy_loss,
    grpo_advantages,
    low_var_kl,
    ppo_clip_loss,
    seq_mean_token_mean,
    token_mean,
)


def test_grpo_advantages_by_hand():
    # group 7: rewards 1,0,0,1 → mean 0.5, unbiased std sqrt(1/3); group 3: 1,0,0 → mean 1/3, std sqrt(1/3)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    groups = torch.tensor([7, 7, 7, 7, 3, 3, 3])
    adv = grpo_advantages(rewards, groups, eps=0.0)
    s = math.sqrt(1 / 3)
    expected = [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, (2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s]
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)
    # eps enters the denominator
    assert grpo_advantages(rewards, groups, eps=0.1)[0].item() == pytest.approx(0.5 / (s + 0.1), rel=1e-6)


@pytest.mark.parametrize("value", [0.0, 1.0, 0.3, 1e-7])
def test_constant_groups_give_exactly_zero(value):
    rewards = torch.tensor([value] * 6 + [1.0, 0.0])
    groups = torch.tensor([0] * 6 + [1, 1])
    for name in ("grpo", "grpo_no_std"):
        adv = get_advantage_estimator(name)(rewards, groups)
        assert torch.all(adv[:6] == 0.0), name  # exactly zero, not float noise and not NaN
        assert torch.isfinite(adv).all()
        assert adv[6] > 0 > adv[7]


def test_single_sample_group_is_zero_not_nan():
    adv = grpo_advantages(torch.tensor([1.0]), torch.tensor([0]))
    assert adv.tolist() == [0.0]


def test_grpo_no_std_is_mean_centred():
    adv = get_advantage_estimator("grpo_no_std")(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0, 0, 0, 0]))
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_ppo_clip_both_sides():
    old = torch.zeros(6)
    # ratios: 1.5, 0.5, 1.1, 1.5, 0.5, 0.9
    new = torch.log(torch.tensor([1.5, 0.5, 1.1, 1.5, 0.5, 0.9]))
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    loss, clipped = ppo_clip_loss(new, old, adv, clip_low=0.2, clip_high=0.28)
    # A>0: min(r, clip(r)) → 1.28 (clipped high), 0.5 (ratio below 0.8 is NOT clipped for A>0), 1.1
    # A<0: -max... loss = max(-A r, -A clip(r)) = max(r, clip(r)): 1.5 (not clipped), 0.8 (clipped low), 0.9
    assert loss.tolist() == pytest.approx([-1.28, -0.5, -1.1, 1.5, 0.8, 0.9], rel=1e-6)
    assert clipped.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_ppo_gradient_vanishes_when_clipped_and_has_right_sign():
    new = torch.log(torch.tensor([1.5, 1.0])).requires_grad_()
    loss, _ = ppo_clip_loss(new, torch.zeros(2), torch.tensor([1.0, 1.0]), clip_low=0.2, clip_high=0.2)
    loss.sum().backward()
    assert new.grad[0].item() == 0.0  # clipped: no push beyond 1 + clip_high
    assert new.grad[1].item() < 0  # descent raises the log-prob of a positive-advantage token


def test_token_mean_and_sequence_mean_masking():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0], [100.0] * 4])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0] * 4])
    summed, count = token_mean(per_token, mask)
    assert (summed.item(), count.item()) == (10.0, 4.0)  # (1+2+3+4) over 4 tokens: masked 100s never count
    summed, count = seq_mean_token_mean(per_token, mask)
    assert (summed.item(), count.item()) == (6.0, 2.0)  # mean(1,2,3)=2 plus 4; an all-masked row is no sequence
    assert get_aggregation("token-mean") is token_mean


def test_low_var_kl_is_zero_at_equality_and_positive_otherwise():
    lp = torch.tensor([-1.0, -2.0])
    assert low_var_kl(lp, lp).tolist() == [0.0, 0.0]
    ref = torch.tensor([-1.5, -1.0])
    expected = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    assert low_var_kl(lp, ref).tolist() == pytest.approx(expected, rel=1e-6)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(KeyError, match="ppo_clip"):
        get_policy_loss("ppo")
    with pytest.raises(KeyError, match="grpo"):
        get_advantage_estimator("gae")


def test_dual_clip_by_hand():
    old = torch.zeros(5)
    # ratios 5, 3.5, 2.5, 0.5, 5; advantages -1, -2, -1, -1, +1
    new = torch.log(torch.tensor([5.0, 3.5, 2.5, 0.5, 5.0]))
    adv = torch.tensor([-1.0, -2.0, -1.0, -1.0, 1.0])
    loss, _ = ppo_clip_loss(new, old, adv, clip_low=0.2, clip_high=0.2, dual_clip_c=3.0)
    # A<0: PPO gives max(-A r, -A clip(r)) = -A·r (5, 7, 2.5, 0.8 for r=0.5 clipped to 0.8); dual clip caps it at
    # -A·c = 3, 6, 3, 3 → 3, 6, 2.5, 0.8. A>0 is untouched: min(r, 1.2)·A → loss -1.2.
    assert loss.tolist() == pytest.approx([3.0, 6.0, 2.5, 0.8, -1.2], rel=1e-6)
    plain, _ = ppo_clip_loss(new, old, adv, clip_low=0.2, clip_high=0.2)
    assert plain.tolist() == pytest.approx([5.0, 7.0, 2.5, 0.8, -1.2], rel=1e-6)
    # The capped token has no gradient (its loss is the constant -A·c), as in dual-clip PPO.
    new = new.clone().requires_grad_()
    loss, _ = ppo_clip_loss(new, old, adv, clip_low=0.2, clip_high=0.2, dual_clip_c=3.0)
    loss.sum().backward()
    assert new.grad[0].item() == 0.0 and new.grad[1].item() == 0.0 and new.grad[2].item() != 0.0


def test_log_ratio_is_clamped_like_verl():
    loss, _ = ppo_clip_loss(torch.tensor([0.0]), torch.tensor([-100.0]), torch.tensor([-1.0]),
                            clip_low=0.2, clip_high=0.2)
    assert loss.item() == pytest.approx(math.exp(20.0), rel=1e-5)  # not inf


def test_cd_masked_tokens_stay_in_the_token_mean_denominator(monkeypatch):
    """The authors' loss: pg_losses * template_ratio_mask, then token-mean over response_mask."""
    from p2o_hpc.algo import policy_loss
    from p2o_hpc.algo.policy_loss import make_policy_loss_fn
    from p2o_hpc.config import AlgorithmConfig

    # megatron's vocab-parallel log-probs need a process group; at TP1 they are the plain log-softmax.
    monkeypatch.setattr(policy_loss, "next_token_logprobs", lambda logits, ids, vocab, chunk_tokens=0: torch.log_softmax(
        logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0])

    vocab = 8
    input_ids = torch.tensor([[1, 2, 3, 4]])
    logits = torch.zeros(1, 4, vocab)  # uniform: log π = -log 8 for every target
    batch = {
        "input_ids": input_ids,
        "response_mask": torch.tensor([[0, 1, 1, 1]]),
        "old_logprobs": torch.full((1, 3), -math.log(vocab)),  # ratio 1 everywhere
        "advantages": torch.tensor([2.0]),
        "cd_weight": torch.tensor([[1.0, 0.0, 1.0]]),  # the 2nd response target is CD-masked
    }
    loss_fn = make_policy_loss_fn(vocab, AlgorithmConfig(dual_clip_c=3.0))
    summed, count, _ = loss_fn(batch, logits)
    # per-token loss -A·r = -2 on the 3 targets at positions 1..3; response targets are next-token positions 1, 2
    # (target_mask = response_mask[:, 1:] = [1, 1, 1]); the masked one contributes 0 but still counts.
    assert count.item() == 3.0
    assert summed.item() == pytest.approx(-4.0)


def test_warmup_is_the_authors_share_of_the_run():
    """verl: int(lr_warmup_steps_ratio × total trainer steps), here × the mini-batches of a step (one scheduler
    step per optimizer step). The paper: 5,000 prompts / 128 = 39 steps an epoch × 5 epochs = 195 → 9 trainer
    steps = 18 optimizer steps at 2 mini-batches a step."""
    from p2o_hpc.config import AlgorithmConfig
    from p2o_hpc.trainer.learner_side import warmup_optimizer_steps

    algo = AlgorithmConfig()
    assert (algo.warmup_ratio, algo.warmup_steps, algo.weight_decay) == (0.05, 0, 0.01)
    assert warmup_optimizer_steps(algo, 195, 2) == 18
    assert warmup_optimizer_steps(algo, 19, 2) == 0  # int(0.95): a short run has no warm-up, as in verl
    algo.warmup_steps = 7
    assert warmup_optimizer_steps(algo, 195, 2) == 7  # an explicit length wins
    algo.warmup_steps = 390  # megatron's scheduler asserts warm-up < decay steps: a named error instead
    with pytest.raises(ValueError, match=r"algorithm.warmup_steps=390 must be shorter than the run's 390"):
        warmup_optimizer_steps(algo, 195, 2)
