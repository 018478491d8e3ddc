"""Deterministic tiny Qwen3 models for tests and CPU examples.

Every test and CPU example needs a real Hugging Face model folder (weights, config, tokenizer, chat
template) that loads in transformers, Megatron conversion and vLLM alike, and nothing can be
downloaded here. So we train a small byte-level BPE on the shared math data, build a random Qwen3
with the same layout as Qwen3-4B (tied embeddings, q/k norms, head_dim != hidden/heads) and cache
the folder under a hash of everything that determines its bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2o_hpc.paths import cache_dir, shared_data_dir
from p2o_hpc.qwen3_chat_template import QWEN3_CHAT_TEMPLATE

# Bump when the build recipe changes in a way that changes the folder's bytes.
FACTORY_VERSION = 2  # 2: Qwen3's own chat template and <think>/</think> added tokens

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# Qwen2/Qwen3's pre-tokenizer split: single digits, letters with one leading non-letter, etc.
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen3 tokenizes these as single added (not special) tokens; its chat template writes them.
THINK_TOKENS = ("<think>", "</think>")

# Megatron splits the embedding across tensor-parallel ranks, so the padded vocab must divide evenly.
VOCAB_MULTIPLE = 128

# (file relative to shared_data_dir(), format, text fields), read in this order.
TOKENIZER_CORPUS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("train/deepscaler_partial/math.json", "json", ("problem",)),
    ("benchmarks/math500/test.jsonl", "jsonl", ("problem", "solution")),
)
TOKENIZER_VOCAB_TARGET = 3000  # deliberately not a multiple of 128, so the model vocab is padded like Qwen's

# Qwen3-4B's shape, shrunk. head_dim stays 64 because vLLM's CPU attention rejects smaller heads;
# 4 heads x 64 != hidden 128 keeps the non-square o_proj of the real model.
TINY_PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-tiny": {
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "use_sliding_window": False,
    },
}

NORM_PERTURBATION = 0.1  # norm weights = 1 + 0.1*randn, so a wrong norm mapping changes the logits


def build_tiny_model(
    name: str = "qwen3-tiny",
    *,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    cache_root: Path | None = None,
    tokenizer_corpus: TokenizerCorpus | None = None,
) -> Path:
    """Path of the cached model folder, built first if missing (atomically, safe across processes).

    cache_root replaces cache_dir()/"tiny_models" (tests pass tmp_path so they never share a build).
    tokenizer_corpus replaces the shared math data as the tokenizer's training text (the CPU testbed's own task).
    """
    settings = model_settings(name, overrides)
    tokenizer_corpus = tokenizer_corpus or MATH_TOKENIZER
    root = Path(cache_root) if cache_root is not None else cache_dir() / "tiny_models"
    target = root / f"{name}-{recipe_hash(settings, seed, tokenizer_corpus)}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=root))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        _build_into(staging, settings, seed, tokenizer_corpus)
        if not target.is_dir():
            try:
                os.replace(staging, target)
            except OSError:
                # Another process renamed its finished build into place first; theirs is as good as ours.
                if not target.is_dir():
                    raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def model_settings(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Preset architecture with caller overrides applied; unknown names fail loudly."""
    if name not in TINY_PRESETS:
        raise ValueError(f"unknown tiny model {name!r}; known: {sorted(TINY_PRESETS)}")
    return {**TINY_PRESETS[name], **(overrides or {})}


def recipe_hash(settings: dict[str, Any], seed: int, tokenizer_corpus: TokenizerCorpus | None = None) -> str:
    """Short hash of everything that decides the folder's bytes, so a changed recipe never reuses a stale cache."""
    tokenizer_corpus = tokenizer_corpus or MATH_TOKENIZER
    recipe = {
        "settings": settings,
        "seed": seed,
        "factory_version": FACTORY_VERSION,
        "tokenizer": {"corpus": tokenizer_corpus.recipe, "vocab_target": tokenizer_corpus.vocab_target},
    }
    blob = json.dumps(recipe, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def padded_vocab_size(tokenizer_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-tokenizer_size // multiple) * multiple


def corpus_texts(data_dir: Path | None = None) -> Iterator[str]:
    """Tokenizer training text in a fixed order (order matters for a byte-identical tokenizer.json)."""
    data_dir = data_dir or shared_data_dir()
    for rel_path, fmt, fields in TOKENIZER_CORPUS:
        path = data_dir / rel_path
        if fmt == "json":
            rows = json.loads(path.read_text(encoding="utf-8"))
        else:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for row in rows:
            for field in fields:
                text = row.get(field)
                if isinstance(text, str) and text:
                    yield text


@dataclass(frozen=True)
class TokenizerCorpus:
    """What a tokenizer is trained on: `texts()` in a fixed order; `recipe` names it in the cache key (change it
    whenever the texts change)."""

    texts: Callable[[], Iterator[str]]
    recipe: Any
    vocab_target: int


MATH_TOKENIZER = TokenizerCorpus(lambda: corpus_texts(), TOKENIZER_CORPUS, TOKENIZER_VOCAB_TARGET)


def train_tokenizer(texts: Iterator[str], vocab_target: int = TOKENIZER_VOCAB_TARGET):
    """Byte-level BPE with Qwen2/Qwen3's normalizer and pre-tokenizer, so it behaves like the real tokenizer.

    transformers' Qwen2Tokenizer rebuilds exactly this pipeline (NFC + regex split + byte level) when it
    loads the folder, so raw `tokenizers`, transformers and vLLM all tokenize alike; NFC text round-trips exactly.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_target,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _build_into(folder: Path, settings: dict[str, Any], seed: int, tokenizer_corpus: TokenizerCorpus) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM

    # Qwen2Tokenizer, the class real Qwen3 checkpoints name, rather than the generic backend, so every
    # loader (transformers, vLLM) takes the same code path as for Qwen3-4B.
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=train_tokenizer(tokenizer_corpus.texts(), tokenizer_corpus.vocab_target),
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[IM_START],
        model_max_length=settings["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_tokens(list(THINK_TOKENS))
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    special_ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}

    arch = dict(settings)
    rope_theta = arch.pop("rope_theta")
    config = Qwen3Config(
        **arch,
        vocab_size=padded_vocab_size(len(tokenizer)),
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        bos_token_id=special_ids[ENDOFTEXT],
        eos_token_id=special_ids[IM_END],
        pad_token_id=special_ids[ENDOFTEXT],
        dtype="float32",
    )

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.float32)
    norm_rng = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight"):
                noise = torch.randn(param.shape, generator=norm_rng, dtype=param.dtype)
                param.copy_(1.0 + NORM_PERTURBATION * noise)

    model.generation_config = GenerationConfig(
        bos_token_id=special_ids[ENDOFTEXT],
        eos_token_id=special_ids[IM_END],
        pad_token_id=special_ids[ENDOFTEXT],
    )
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    for file in folder.iterdir():
        file.chmod(0o644)  # safetensors writes 0600; a shared cache must stay readable


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="qwen3-tiny", choices=sorted(TINY_PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-path", action="store_true", help="print only the path (for shell scripts)")
    args = parser.parse_args(argv)
    path = build_tiny_model(args.name, seed=args.seed)
    print(path if args.print_path else f"tiny model {args.name} (seed {args.seed}): {path}")


if __name__ == "__main__":
    main()
