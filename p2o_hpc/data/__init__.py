"""Datasets, prompt templates and the resumable prompt loader (no heavy imports: tokenizers are passed in)."""

from p2o_hpc.data.datasets import (
    DATASETS,
    HF_DATASETS,
    RECIPES,
    DatasetError,
    Problem,
    RecipeSplit,
    answer_type,
    authors_split,
    balance_by_answer_type,
    last_boxed,
    load_named,
    load_problems,
    recipe_split,
    training_problems,
)
from p2o_hpc.data.loader import PromptLoader
from p2o_hpc.data.prompts import (
    PAPER_TEMPLATE,
    TemplateError,
    encode_prompt,
    render_prompt,
    render_user_turn,
    validate_template,
)

__all__ = [
    "DATASETS",
    "HF_DATASETS",
    "PAPER_TEMPLATE",
    "DatasetError",
    "Problem",
    "PromptLoader",
    "RECIPES",
    "RecipeSplit",
    "TemplateError",
    "answer_type",
    "authors_split",
    "balance_by_answer_type",
    "encode_prompt",
    "last_boxed",
    "load_named",
    "load_problems",
    "recipe_split",
    "render_prompt",
    "render_user_turn",
    "training_problems",
    "validate_template",
]
