"""Datasets, prompt templates and the resumable prompt loader (no heavy imports: tokenizers are passed in)."""

from p2o_hpc.data.datasets import (
    DATASETS,
    HF_DATASETS,
    DatasetError,
    Problem,
    RecipeSplit,
    deepmath_recipe,
    deepscaler_recipe,
    difficulty_of,
    last_boxed,
    load_named,
    load_problems,
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
    "RecipeSplit",
    "TemplateError",
    "deepmath_recipe",
    "deepscaler_recipe",
    "difficulty_of",
    "encode_prompt",
    "last_boxed",
    "load_named",
    "load_problems",
    "render_prompt",
    "render_user_turn",
    "validate_template",
]
