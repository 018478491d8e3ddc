"""The tiny model must load everywhere the real Qwen3 does, and be reproducible byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from p2o_hpc import tiny_model
from p2o_hpc.paths import shared_data_dir
from p2o_hpc.rollout.vllm_env import vllm_cpu_env
from p2o_hpc.tiny_model import ENDOFTEXT, IM_END, IM_START, build_tiny_model

MATH_TEXT = (
    "If $f(x) = \\frac{1}{2}x^2 - 3x + \\sqrt{7}$, find $f(10)$.\n\n"
    "We have $f(10) = 50 - 30 + \\sqrt{7}$, so the answer is $\\boxed{20+\\sqrt{7}}$."
)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """A cache_dir()-shaped folder holding one default build, shared by the read-only tests."""
    return tmp_path_factory.mktemp("cache") / "tiny_models"


@pytest.fixture(scope="module")
def tiny_path(tiny_root) -> Path:
    return build_tiny_model(cache_root=tiny_root)


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    return AutoTokenizer.from_pretrained(tiny_path)


def test_folder_loads_in_transformers_with_consistent_ids(tiny_path, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    config = model.config
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert config.head_dim == 64
    assert config.vocab_size % 128 == 0 and config.vocab_size >= len(tokenizer)
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.dtype == torch.float32 and config.dtype == torch.float32

    im_end, endoftext = tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == ENDOFTEXT
    assert (config.eos_token_id, config.pad_token_id, config.bos_token_id) == (im_end, endoftext, endoftext)
    generation = GenerationConfig.from_pretrained(tiny_path)
    assert (generation.eos_token_id, generation.pad_token_id) == (im_end, endoftext)
    assert IM_START in tokenizer.all_special_tokens

    ids = tokenizer(MATH_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size) and torch.isfinite(logits).all()


def test_chat_template_is_qwen3s_own(tokenizer):
    from p2o_hpc.qwen3_chat_template import (
        NON_THINKING_GENERATION_PROMPT,
        QWEN3_CHAT_TEMPLATE,
        THINKING_GENERATION_PROMPT,
    )

    assert tokenizer.chat_template == QWEN3_CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1+1?"}]
    turns = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n"
    thinking = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert thinking == turns + THINKING_GENERATION_PROMPT == turns + "<|im_start|>assistant\n"
    plain = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert plain == turns + NON_THINKING_GENERATION_PROMPT == turns + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = tokenizer(plain, add_special_tokens=False).input_ids
    assert ids.count(tokenizer.convert_tokens_to_ids(IM_START)) == 3  # special tokens are single ids
    for think in ("<think>", "</think>"):  # single added tokens, as in Qwen3's vocabulary
        assert ids.count(tokenizer.convert_tokens_to_ids(think)) == 1
    # A past assistant turn's reasoning is dropped from history, as Qwen3 renders multi-turn chats.
    history = messages + [{"role": "assistant", "content": "<think>\n1+1</think>\n\n2"}, {"role": "user", "content": "x"}]
    assert "<|im_start|>assistant\n2<|im_end|>" in tokenizer.apply_chat_template(history, tokenize=False)


def test_math_text_round_trips_exactly(tokenizer):
    first_math500 = json.loads((shared_data_dir() / "benchmarks/math500/test.jsonl").open().readline())
    for text in (MATH_TEXT, first_math500["problem"] + "\n" + first_math500["solution"]):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        assert len(ids) < 0.7 * len(text), "BPE should have learnt merges for math text"


def test_same_seed_is_byte_identical_and_other_seed_differs(tiny_path, tmp_path):
    again = build_tiny_model(cache_root=tmp_path / "again")
    assert again != tiny_path and again.name == tiny_path.name
    for file in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (again / file).read_bytes() == (tiny_path / file).read_bytes(), file

    other = build_tiny_model(seed=1, cache_root=tmp_path / "again")
    assert other.name != tiny_path.name
    assert (other / "tokenizer.json").read_bytes() == (tiny_path / "tokenizer.json").read_bytes()
    weights, other_weights = load_file(tiny_path / "model.safetensors"), load_file(other / "model.safetensors")
    assert weights.keys() == other_weights.keys()
    assert not torch.equal(weights["model.embed_tokens.weight"], other_weights["model.embed_tokens.weight"])


def test_norm_weights_are_perturbed_from_one(tiny_path):
    weights = load_file(tiny_path / "model.safetensors")
    norms = {name: w for name, w in weights.items() if name.endswith("norm.weight")}
    num_layers = json.loads((tiny_path / "config.json").read_text())["num_hidden_layers"]
    assert len(norms) == 4 * num_layers + 1  # input, post-attention, q, k per layer + final
    for name, weight in norms.items():
        assert not torch.allclose(weight, torch.ones_like(weight)), name
        assert 0.5 < weight.mean().item() < 1.5, name


def test_second_call_reuses_cache_without_building(tiny_root, tiny_path, monkeypatch):
    mtime = (tiny_path / "model.safetensors").stat().st_mtime_ns

    def must_not_build(*args, **kwargs):
        raise AssertionError("cache hit expected")

    monkeypatch.setattr(tiny_model, "_build_into", must_not_build)
    assert build_tiny_model(cache_root=tiny_root) == tiny_path
    assert (tiny_path / "model.safetensors").stat().st_mtime_ns == mtime


def test_cli_prints_cached_path(tiny_root, tiny_path, monkeypatch, capsys):
    monkeypatch.setenv("P2O_CACHE_DIR", str(tiny_root.parent))
    monkeypatch.setattr(tiny_model, "_build_into", lambda *a, **k: pytest.fail("cache hit expected"))
    tiny_model.main(["--print-path"])
    assert capsys.readouterr().out.strip() == str(tiny_path)


def test_crashed_build_leaves_no_folder(tmp_path, monkeypatch):
    def crash(folder, settings, seed, tokenizer_corpus):
        (folder / "config.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(tiny_model, "_build_into", crash)
    with pytest.raises(RuntimeError, match="mid-build"):
        build_tiny_model(cache_root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def default_folder_name(seed: int = 0) -> str:
    return f"qwen3-tiny-{tiny_model.recipe_hash(tiny_model.model_settings('qwen3-tiny'), seed)}"


def test_concurrent_builder_that_finishes_first_wins(tmp_path, monkeypatch):
    def slower_than_another_process(folder, settings, seed, tokenizer_corpus):
        (folder / "mine").write_text("")
        theirs = tmp_path / default_folder_name(seed)
        theirs.mkdir()
        (theirs / "theirs").write_text("")

    monkeypatch.setattr(tiny_model, "_build_into", slower_than_another_process)
    path = build_tiny_model(cache_root=tmp_path)
    assert [p.name for p in path.iterdir()] == ["theirs"]
    assert list(tmp_path.iterdir()) == [path]  # our staging folder is gone


def test_overrides_change_config_and_cache_key(tmp_path):
    path = build_tiny_model(overrides={"tie_word_embeddings": False, "num_hidden_layers": 2}, cache_root=tmp_path)
    assert path.name != default_folder_name() and path.name.startswith("qwen3-tiny-")
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["tie_word_embeddings"] is False
    assert "lm_head.weight" in load_file(path / "model.safetensors")
    with pytest.raises(ValueError, match="unknown tiny model"):
        build_tiny_model("llama-tiny", cache_root=tmp_path)


VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys, time

    if __name__ == "__main__":
        started = time.time()
        from vllm import LLM, SamplingParams

        llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
        loaded = time.time()
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)
        out = llm.generate([sys.argv[2]], params)[0]
        sample = out.outputs[0]
        print("RESULT " + json.dumps({
            "prompt_token_ids": list(out.prompt_token_ids),
            "token_ids": list(sample.token_ids),
            "logprobs": [step[tok].logprob for step, tok in zip(sample.logprobs, sample.token_ids)],
            "load_s": loaded - started,
            "generate_s": time.time() - loaded,
        }), flush=True)
    """
)


@pytest.mark.vllm
def test_vllm_cpu_generates_what_transformers_predicts(tiny_path, tokenizer, tmp_path):
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": MATH_TEXT}], tokenize=False, add_generation_prompt=True
    )
    script = tmp_path / "generate.py"
    script.write_text(VLLM_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_path), prompt],
        env={**os.environ, **vllm_cpu_env()},
        capture_output=True,
        text=True,
        timeout=600,
    )
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, f"vLLM failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    result = json.loads(results[-1].removeprefix("RESULT "))
    print(f"vLLM load {result['load_s']:.1f} s, generate {result['generate_s']:.2f} s")

    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    assert result["prompt_token_ids"] == prompt_ids  # vLLM tokenizes the folder like transformers
    generated = result["token_ids"]
    assert len(generated) == 8 and all(isinstance(t, int) for t in generated)

    # Teacher-force vLLM's tokens through transformers: same logprobs, and each token is (up to ties) the argmax.
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + generated])).logits[0, len(prompt_ids) - 1 : -1]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    chosen = logprobs[torch.arange(len(generated)), torch.tensor(generated)]
    assert torch.allclose(chosen, torch.tensor(result["logprobs"], dtype=torch.float64), atol=1e-3)
    assert (logprobs.max(dim=-1).values - chosen).max() < 1e-4
