"""SFT: the registered `sft` loss is the masked NLL of the response tokens, and `run_sft` (the RL learner's own
train step on a one-process megatron learner) lowers it and exports an HF folder that computes what megatron does."""

import math
from pathlib import Path

import pytest
import torch

from p2o_hpc.algo.core_algos import get_policy_loss, sft_loss
from p2o_hpc.config import AlgorithmConfig

# ------------------------------------------------------------------------------------------------- the loss


@pytest.fixture
def plain_logprobs(monkeypatch):
    """megatron's vocab-parallel log-probs need a process group; at TP1 they are the plain log-softmax."""
    from p2o_hpc.algo import policy_loss

    monkeypatch.setattr(policy_loss, "next_token_logprobs", lambda logits, ids, vocab, chunk_tokens=0: torch.log_softmax(
        logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0])


def sft_batch():
    """Two rows: prompt [5, 6] + response [7, 8] + pad; prompt [5] + response [9, 3, 2]. No advantages, no old
    log-probs: an SFT batch has none."""
    return {"input_ids": torch.tensor([[5, 6, 7, 8, 0], [5, 9, 3, 2, 0]]),
            "response_mask": torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 0]], dtype=torch.float32)}


def sft_loss_fn(loss_agg="token-mean"):
    from p2o_hpc.algo.policy_loss import make_policy_loss_fn

    return make_policy_loss_fn(10, AlgorithmConfig(policy_loss="sft", loss_agg=loss_agg))


def test_sft_is_a_registered_policy_loss():
    assert get_policy_loss("sft") is sft_loss


def test_sft_loss_is_the_masked_nll_of_the_response_tokens(plain_logprobs):
    logits = torch.randn(2, 5, 10, generator=torch.Generator().manual_seed(0))
    batch = sft_batch()
    log_p = torch.log_softmax(logits, dim=-1)
    # Position t predicts input_ids[t + 1]; the response targets are (row 0) 7 at t=1, 8 at t=2 and
    # (row 1) 9 at t=0, 3 at t=1, 2 at t=2.
    row0 = [log_p[0, 1, 7], log_p[0, 2, 8]]
    row1 = [log_p[1, 0, 9], log_p[1, 1, 3], log_p[1, 2, 2]]

    summed, count, _ = sft_loss_fn("token-mean")(batch, logits)
    assert count.item() == 5
    assert summed.item() == pytest.approx(-sum(row0 + row1).item(), rel=1e-6)

    summed, count, _ = sft_loss_fn("seq-mean-token-mean")(batch, logits)
    assert count.item() == 2
    assert summed.item() == pytest.approx((-sum(row0) / 2 - sum(row1) / 3).item(), rel=1e-6)


def test_prompt_and_padding_tokens_are_never_targets(plain_logprobs):
    """They enter only as context (through the model's logits): with the logits fixed, changing a prompt or
    padding token changes nothing, and no gradient reaches the logits that predict them."""
    logits = torch.randn(2, 5, 10, generator=torch.Generator().manual_seed(1), requires_grad=True)
    batch = sft_batch()
    summed, _, _ = sft_loss_fn()(batch, logits)
    summed.backward()
    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    changed["input_ids"][0, 1] = 4  # a prompt token (the target of position 0 in row 0)
    changed["input_ids"][:, 4] = 1  # padding
    assert sft_loss_fn()(changed, logits.detach())[0].item() == summed.item()
    predicts_a_response_token = batch["response_mask"][:, 1:].bool()
    assert (logits.grad[:, :-1][~predicts_a_response_token] == 0).all()
    assert (logits.grad[:, -1] == 0).all()
    assert (logits.grad[:, :-1][predicts_a_response_token].abs().sum(-1) > 0).all()


def test_rl_loss_refuses_an_sft_batch(plain_logprobs):
    from p2o_hpc.algo.policy_loss import make_policy_loss_fn

    with pytest.raises(ValueError, match="ppo_clip needs old_logprobs and advantages"):
        make_policy_loss_fn(10, AlgorithmConfig())(sft_batch(), torch.zeros(2, 5, 10))


# ------------------------------------------------------------------------------------------------ the data


def test_rows_are_tokenized_apart_and_end_with_eos(tiny_model_dir):
    from transformers import AutoTokenizer

    from p2o_hpc.trainer.sft import tokenize_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    row, already_closed = tokenize_rows(tokenizer, [(prompt, "5"), (prompt, "5<|im_end|>")], max_tokens=100)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert row.ids[: row.prompt_len] == prompt_ids
    assert row.ids[row.prompt_len:] == tokenizer("5", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert already_closed == row  # an eos the caller wrote is not doubled
    with pytest.raises(ValueError, match=r"SFT row 0: \d+ tokens .* > max_tokens=5"):
        tokenize_rows(tokenizer, [(prompt, "5")], max_tokens=5)


def test_steps_read_seeded_epochs_in_equal_batches():
    from p2o_hpc.trainer.sft import step_row_indices

    steps = step_row_indices(5, 3, 4, seed=0)
    assert [len(step) for step in steps] == [3, 3, 3, 3]
    stream = [i for step in steps for i in step]
    assert sorted(stream[:5]) == sorted(stream[5:10]) == list(range(5))  # each epoch is a permutation
    assert steps == step_row_indices(5, 3, 4, seed=0) != step_row_indices(5, 3, 4, seed=1)


def test_settings_errors_are_named():
    from p2o_hpc.trainer.sft import SFTSettings

    assert SFTSettings(epochs=2, global_batch_rows=4).total_steps(10) == 5
    assert SFTSettings(steps=7, epochs=2).total_steps(10) == 7
    with pytest.raises(ValueError, match="warmup_steps=7 must be shorter than the 7 optimizer steps"):
        SFTSettings(steps=7, warmup_steps=7).check(10, 1)
    with pytest.raises(ValueError, match="global_batch_rows=1 must be ≥ the data-parallel size 2"):
        SFTSettings(global_batch_rows=1).check(10, 2)


def test_publish_replaces_an_existing_folder_whole(tmp_path):
    from p2o_hpc.trainer.sft import _publish

    out, staging = tmp_path / "out", tmp_path / ".out.sft-x"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (staging / "model").mkdir(parents=True)
    (staging / "model" / "new.txt").write_text("new")
    _publish(staging / "model", out, staging)
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------------------------- run_sft end to end

PAIRS = [
    ("What is 2 + 3?", "2 + 3 = 5, so the answer is \\boxed{5}."),
    ("What is 7 times 6?", "7 times 6 is 42. The answer is \\boxed{42}."),
    ("Simplify 10/4.", "10/4 = 5/2, so \\boxed{\\frac{5}{2}}."),
    ("What is the square root of 81?", "Since 9^2 = 81, the answer is \\boxed{9}."),
    ("Solve x + 4 = 9.", "Subtract 4: x = 5. \\boxed{5}"),
    ("What is 100 - 37?", "100 - 37 = 63, hence \\boxed{63}."),
    ("How many sides does a hexagon have?", "A hexagon has six sides: \\boxed{6}."),
    ("What is 3 cubed?", "3^3 = 27, so \\boxed{27}."),
]
STEPS = 30


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory):
    """One SFT stage on the tiny model (hidden 128, 4 layers): 30 steps over 8 fixed rows, prompts rendered
    through the chat template as the RL prompts are."""
    from transformers import AutoTokenizer

    from p2o_hpc.data.prompts import render_prompt
    from p2o_hpc.trainer.sft import SFTSettings, run_sft

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [(render_prompt(tokenizer, problem, chat_template_kwargs={"enable_thinking": False}), answer)
            for problem, answer in PAIRS]
    parent = tmp_path_factory.mktemp("sft")
    settings = SFTSettings(steps=STEPS, global_batch_rows=8, micro_batch_tokens=1024, lr=1e-3, warmup_steps=3,
                           progress=False)
    out = run_sft(tiny_model_dir, rows, parent / "out", settings)
    return out, rows, tokenizer


def _response_logprob(model, ids: list[int], prompt_len: int) -> float:
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    targets = torch.tensor(ids[1:])
    return log_p[torch.arange(len(targets)), targets][prompt_len - 1:].sum().item()


@pytest.mark.multiproc
def test_run_sft_lowers_the_loss_and_exports_a_transformers_folder(sft_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from p2o_hpc.trainer.sft import LOG_NAME, read_sft_log, tokenize_rows

    out, rows, tokenizer = sft_run
    log = read_sft_log(out)
    losses = [step["loss"] for step in log["steps"]]
    assert len(losses) == STEPS and all(step["update_ok"] for step in log["steps"])
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    assert log["tokens_per_s"] > 0

    # A complete HF folder, renamed into place: nothing staged is left beside it.
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors.index.json", LOG_NAME} <= {path.name for path in out.iterdir()}
    assert [path.name for path in out.parent.iterdir()] == ["out"]

    trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    row = tokenize_rows(tokenizer, rows[:1], max_tokens=1024)[0]
    before, after = (_response_logprob(model, row.ids, row.prompt_len) for model in (original, trained))
    assert after > before + 5, (before, after)


@pytest.mark.multiproc
def test_the_export_computes_what_the_trained_megatron_model_computes(sft_run):
    """run_sft compared megatron's logits with the exported folder's before publishing it; independently, the
    megatron loss it recorded on the probe rows equals the masked NLL transformers gives for the export."""
    from transformers import AutoModelForCausalLM

    from p2o_hpc.trainer.sft import read_sft_log

    out, _, _ = sft_run
    log = read_sft_log(out)
    assert log["export_check"]["max_abs_logit_diff"] <= 1e-4
    assert log["export_check"]["max_abs_logprob_diff"] <= 1e-4
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    probe = log["probe"]
    nll = -sum(_response_logprob(model, ids, prompt_len) for ids, prompt_len in zip(probe["ids"], probe["prompt_lens"]))
    tokens = sum(len(ids) - prompt_len for ids, prompt_len in zip(probe["ids"], probe["prompt_lens"]))
    assert probe["rows"] == 2 and math.isfinite(probe["loss"])
    assert nll / tokens == pytest.approx(probe["loss"], abs=1e-4)
