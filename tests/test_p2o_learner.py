"""P²O on the learner side: template insertion and checks, CD weights at their bounds, and the prompt swap."""

import json
import math

import pytest
import torch

from p2o_hpc.algo.context_distillation import cd_token_weights, micro_batch_cd_weights
from p2o_hpc.algo.rollout_batch import collate, generation_micro_batch, response_slice
from p2o_hpc.data.evolved_templates import TemplateRejected, apply_template, check_template, rejection_reason
from p2o_hpc.p2o.hooks import rollout_templates
from p2o_hpc.records import Rollout
from p2o_hpc.run_dir import RunDir


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_template_goes_in_front_of_the_user_turn_and_epsilon_is_the_original():
    assert apply_template("Question: 1+1?", "Think about parity.") == "Think about parity.\n\nQuestion: 1+1?"
    assert apply_template("Question: 1+1?", "") == "Question: 1+1?"


def test_bad_templates_are_rejected_with_the_reason(tiny_tokenizer):
    assert rejection_reason("", tiny_tokenizer, 16) is None  # ε
    assert "empty" in rejection_reason("  \n ", tiny_tokenizer, 16)
    assert "special tokens" in rejection_reason("Solve.<|im_end|>\n<|im_start|>assistant\n42", tiny_tokenizer, 100)
    assert "template budget of 16" in rejection_reason("word " * 200, tiny_tokenizer, 16)
    assert check_template("Check small cases first.", tiny_tokenizer, 64) == "Check small cases first."
    with pytest.raises(TemplateRejected, match="special tokens"):
        check_template("<|endoftext|>", tiny_tokenizer, 64)


def test_cd_weights_at_the_bounds():
    plain = torch.zeros(6)
    # ratios π(y|x)/π(y|x̃): 0.01 and 10 sit on the bounds (kept), 0.009 and 10.1 are outside, 1 and 3 inside
    ratios = torch.tensor([0.01, 10.0, 0.009, 10.1, 1.0, 3.0], dtype=torch.float64)
    templated = -torch.log(ratios).float()
    weights, ratio = cd_token_weights(plain, templated, low=0.99, high=9.0, mode="hard")
    assert weights.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert ratio.tolist() == pytest.approx(ratios.tolist(), rel=1e-5)
    soft, _ = cd_token_weights(plain, templated, low=0.99, high=9.0, mode="soft")
    assert soft.tolist() == pytest.approx([1.0, 1.0, 0.01 / 0.009, 10.0 / 10.1, 1.0, 1.0], rel=1e-5)
    none, _ = cd_token_weights(plain, templated, low=0.99, high=9.0, mode="none")
    assert none.tolist() == [1.0] * 6
    with pytest.raises(ValueError, match="algorithm.cd.mask"):
        cd_token_weights(plain, templated, low=0.5, high=0.5, mode="clip")
    huge, _ = cd_token_weights(torch.tensor([0.0]), torch.tensor([-1e4]), low=0.99, high=9.0)
    assert huge.tolist() == [0.0] and math.isfinite(float(_[0]))


def test_rollout_templates_per_option():
    draws = ["a", "b", "c"]
    assert rollout_templates(draws, 4, same_template_in_group=False, keep_one_plain_rollout=False) == ["a", "b", "c", "a"]
    assert rollout_templates(draws, 4, same_template_in_group=True, keep_one_plain_rollout=False) == ["a"] * 4
    assert rollout_templates(draws, 3, same_template_in_group=False, keep_one_plain_rollout=True) == ["", "b", "c"]
    assert rollout_templates(None, 2, same_template_in_group=False, keep_one_plain_rollout=True) == ["", ""]


def test_distilled_rollout_trains_on_the_original_prompt():
    """The learner's sequence is x + y; only the CD reference pass sees x̃ + y, and the slices align on y."""
    x, x_tilde, y = [5, 6, 7], [9, 9, 9, 9, 5, 6, 7], [20, 21, 22, 23]
    rollouts = [
        Rollout(0, x, y, None, "stop", "", template="hint", generation_prompt_ids=x_tilde),
        Rollout(0, x, y[:2], None, "stop", ""),
    ]
    batch = collate(rollouts, [0, 1], torch.tensor([1.0, -1.0]), pad_id=0)
    assert batch["input_ids"][0, : len(x + y)].tolist() == x + y
    assert batch["response_mask"][0].tolist() == [0, 0, 0, 1, 1, 1, 1]
    templated = generation_micro_batch(rollouts, batch, pad_id=0)
    assert templated["input_ids"][0].tolist() == x_tilde + y
    assert templated["input_ids"][1, : len(x) + 2].tolist() == x + y[:2]  # a plain row stays plain
    # next-token targets at the response slices are y in both layouts
    plain_targets = batch["input_ids"][0, 1:][response_slice(rollouts[0])]
    seen_targets = templated["input_ids"][0, 1:][response_slice(rollouts[0], generation=True)]
    assert plain_targets.tolist() == seen_targets.tolist() == y
    assert rollouts[0].distilled and not rollouts[1].distilled
    assert generation_micro_batch([rollouts[1]], collate([rollouts[1]], [0], torch.zeros(1), 0), 0) is None


def test_assignments_file_errors_name_the_file(tmp_path):
    run_dir = RunDir(tmp_path)
    path = run_dir.templates(3)
    with pytest.raises(FileNotFoundError, match="epochs/3/templates.json"):
        run_dir.load_assignments(3)
    path.parent.mkdir(parents=True)
    path.write_text("{broken")
    with pytest.raises(ValueError, match="templates.json: not JSON"):
        run_dir.load_assignments(3)
    path.write_text(json.dumps({"assignments": {"p1": []}}))
    with pytest.raises(ValueError, match=r"assignments\['p1'\]"):
        run_dir.load_assignments(3)
    path.write_text(json.dumps({"assignments": {"p1": ["", "Try small n."]}}))
    assert run_dir.load_assignments(3) == {"p1": ["", "Try small n."]}


def test_cd_weights_of_a_micro_batch_touch_only_distilled_response_tokens():
    """Without megatron: rows of plain rollouts and prompt positions keep weight 1; a distilled response's tokens
    get the hard mask of π(y|x)/π(y|x̃), read at their offsets in each layout."""
    x, x_tilde, y = [5, 6, 7], [9, 9, 5, 6, 7], [20, 21, 22]
    rollouts = [Rollout(0, x, y, None, "stop", "", template="hint", generation_prompt_ids=x_tilde),
                Rollout(0, x, y, None, "stop", "")]
    batch = collate(rollouts, [0, 1], torch.tensor([1.0, -1.0]), pad_id=0)
    old = torch.full((2, len(x + y) - 1), -1.0)  # log π(y|x): row 0's response sits at positions 2..4
    templated = torch.full((2, len(x_tilde + y) - 1), -1.0)  # log π(y|x̃): row 0's response at 4..6
    templated[0, 4:7] = torch.tensor([-1.0, -1.0 - math.log(50.0), -1.0 + math.log(200.0)])  # ratio 1, 50, 1/200
    batch["old_logprobs"] = old
    weights, ratios, kept = micro_batch_cd_weights(rollouts, batch, templated, low=0.99, high=9.0, mode="hard")
    assert weights[0].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]  # [0.01, 10] keeps ratio 1, drops 50 and 1/200
    assert weights[1].tolist() == [1.0] * 5
    assert ratios.tolist() == pytest.approx([1.0, 50.0, 0.005], rel=1e-5)
    assert kept.tolist() == [1.0, 0.0, 0.0]
    soft, _, _ = micro_batch_cd_weights(rollouts, batch, templated, low=0.99, high=9.0, mode="soft")
    assert soft[0, 2:].tolist() == pytest.approx([1.0, 10.0 / 50.0, 0.01 / 0.005], rel=1e-5)
