"""One source of truth for the config: the schema (p2o_hpc.config) holds every default, YAML group files state only
what differs, closed choices are enums whose values are exactly the registries' names, and a misspelt choice fails
when the config is composed (or, for data.reward, in validate()), before anything is submitted."""

from __future__ import annotations

import dataclasses
import json
import pickle
import typing
from dataclasses import asdict
from enum import StrEnum

import pytest
from omegaconf import OmegaConf

from p2o_hpc import choices
from p2o_hpc.config import RunConfig, register_configs, to_run_config, validate
from p2o_hpc.paths import REPO_ROOT

CONF = REPO_ROOT / "conf"
CHOICES = [value for value in vars(choices).values()
           if isinstance(value, type) and issubclass(value, StrEnum) and value is not StrEnum]


def compose(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


# ------------------------------------------------------------------------------------ YAML states only changes


def schema_leaves(schema=RunConfig, prefix: str = "") -> dict[str, object]:
    """Every leaf key of the schema (dataclass fields that are not themselves dataclasses) → its default."""
    leaves, hints = {}, typing.get_type_hints(schema)
    defaults = schema()
    for field in dataclasses.fields(schema):
        path = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(hints[field.name]):
            leaves.update(schema_leaves(hints[field.name], path + "."))
        else:
            leaves[path] = getattr(defaults, field.name)
    return leaves


DEFAULTS = schema_leaves()


def flatten(node, prefix: str = "") -> dict[str, object]:
    """Dotted schema key → value, descending only while the key is not a schema leaf (dict-valued leaves whole)."""
    flat = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if path in DEFAULTS or not isinstance(value, dict):
            flat[path] = value
        else:
            flat.update(flatten(value, path + "."))
    return flat


def group_files() -> list[tuple[str, str]]:
    return [(path.parent.name, path.stem) for path in sorted(CONF.glob("*/*.yaml")) if path.parent.name != "hydra"]


def read(group: str, name: str) -> tuple[dict, list]:
    """(values at their schema keys, the file's defaults list) of conf/<group>/<name>.yaml."""
    path = CONF / group / f"{name}.yaml"
    content = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    defaults = content.pop("defaults", [])
    is_global = path.read_text().startswith("# @package _global_")
    return flatten(content if is_global else {group: content}), defaults


def inherited(group: str, name: str) -> dict:
    """What the file's own defaults list (parents in the same group, e.g. p2o → grpo) sets before it."""
    below: dict = {}
    for parent in read(group, name)[1]:
        if isinstance(parent, str) and parent != "_self_":
            below.update(inherited(group, parent))
            below.update(read(group, parent)[0])
    return below


def set_by_groups(key: str) -> set:
    """Every value a non-experiment group file gives `key` (an experiment may restate a default to undo one)."""
    return {json.dumps(read(group, name)[0][key], default=str) for group, name in group_files()
            if group != "experiment" and key in read(group, name)[0]}


@pytest.mark.parametrize("group, name", group_files())
def test_group_files_state_only_what_differs(group, name):
    """A key whose value is what the file would get anyway (its parents', else the schema's default) is noise and
    a second place to edit. Allowed: the option naming itself (`kind: self` in reflection/self.yaml); in an
    experiment, a schema default that some group file changes (`cluster.gpus: false` undoes cluster=slurm's)."""
    values, _ = read(group, name)
    parents = inherited(group, name)
    assert set(values) <= set(DEFAULTS), f"not schema keys: {set(values) - set(DEFAULTS)}"
    redundant = []
    for key, value in values.items():
        below = parents.get(key, DEFAULTS[key])
        if value != below or value == name:
            continue
        if group == "experiment" and set_by_groups(key) - {json.dumps(value, default=str)}:
            continue
        redundant.append(f"{key}={value!r}")
    assert not redundant, f"conf/{group}/{name}.yaml restates what it would get anyway: {redundant}"


# ---------------------------------------------------------------------------------- enums and their registries


@pytest.mark.parametrize("choice", CHOICES, ids=lambda choice: choice.__name__)
def test_choice_names_are_their_values(choice):
    """OmegaConf reads and writes a member by its name: a name that differs from the value would not round-trip."""
    assert [member.name for member in choice] == [member.value for member in choice]


def registries():
    from p2o_hpc.algo import core_algos
    from p2o_hpc.data.datasets import RECIPES
    from p2o_hpc.gepa.budget import AUTO_CANDIDATES
    from p2o_hpc.reward.registry import REWARDS

    return [
        (core_algos.ADVANTAGE_ESTIMATORS, choices.Advantage),
        (core_algos.POLICY_LOSSES, choices.PolicyLoss),
        (core_algos.KL_PENALTIES, choices.KLPenalty),
        (core_algos.LOSS_AGGREGATIONS, choices.LossAgg),
        (REWARDS, choices.RewardName),
        (AUTO_CANDIDATES, choices.GEPAAuto),
        (RECIPES, choices.Recipe),
    ]


def test_every_registry_holds_exactly_its_enums_values():
    for registry, choice in registries():
        assert sorted(registry) == sorted(member.value for member in choice), choice.__name__


def test_cd_mask_modes_are_the_enums():
    from p2o_hpc.algo.context_distillation import CD_MASK_MODES

    assert sorted(CD_MASK_MODES) == sorted(member.value for member in choices.CDMask)


def test_every_parent_selection_runs():
    import random

    from p2o_hpc.gepa.selection import select_parents

    for mode in choices.ParentSelection:
        assert select_parents([[1.0, 0.0], [0.0, 1.0]], 2, random.Random(0), mode) == [0, 1]


def test_a_registration_outside_the_enum_is_refused():
    from p2o_hpc.algo.core_algos import register_policy_loss

    with pytest.raises(ValueError, match="'my_loss' is not a valid PolicyLoss"):
        register_policy_loss("my_loss")


# ------------------------------------------------------------------------------------ typos fail before a job


@pytest.mark.parametrize("key, allowed", [
    ("algorithm.policy_loss", "ppo_clip, sft"),
    ("algorithm.advantage", "grpo, grpo_no_std"),
    ("algorithm.kl_penalty", "low_var_kl, k1"),
    ("algorithm.loss_agg", "token-mean, seq-mean-token-mean"),
    ("gepa.mode", "service, inline, off"),
    ("reflection.kind", "self, teacher, none, edit"),
    ("model.params_dtype", "fp32, bf16, fp16"),
    ("data.recipe", "deepscaler, deepmath"),
])  # fmt: skip
def test_a_misspelt_choice_fails_at_compose_time_naming_the_key(key, allowed):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=f"override {key}=foo") as error:
        compose(f"{key}=foo")
    cause = str(error.value.__cause__)
    assert f"expected one of [{allowed}]" in cause and f"full_key: {key}" in cause


def test_a_misspelt_reward_fails_in_validate_naming_the_key():
    """data.reward is open ("package.module:function"), so the schema types it as a string; validate() checks a
    bare name against the registered ones, which the launcher runs before anything is submitted."""
    with pytest.raises(ValueError, match=r"data.reward='foo': expected a registered reward \(math_verify, "):
        validate(to_run_config(compose("data.reward=foo")))
    validate(to_run_config(compose("data.reward=my_package.graders:exact")))
    validate(to_run_config(compose("data.reward=early_substring")))


@pytest.mark.parametrize("key", ["trainer.save_every", "algorithm.mini_batch_prompts", "algorithm.micro_batch_size",
                                 "algorithm.prompts_per_step", "gepa.dev_size"])
def test_sizes_below_one_are_named(key):
    with pytest.raises(ValueError, match=rf"{key}=0 must be ≥ 1"):
        validate(to_run_config(compose(f"{key}=0")))


def test_a_token_budget_must_hold_the_longest_sequence():
    with pytest.raises(ValueError, match=r"algorithm.micro_batch_tokens=100 must hold the longest sequence: "
                                         r"data.max_prompt_tokens \+ rollout.max_response_tokens = 16384"):
        validate(to_run_config(compose("algorithm.micro_batch_tokens=100")))
    # with a budget, micro_batch_size need not divide the mini-batch
    validate(to_run_config(compose("algorithm.micro_batch_tokens=16384", "algorithm.micro_batch_size=5")))


# ------------------------------------------------------------------------------ enums survive every round trip


def test_a_composed_config_round_trips_as_it_travels():
    """config.yaml in the run dir (OmegaConf.to_yaml → to_run_config), asdict to the worker processes (pickled)
    and to wandb (JSON): the same config back, choices as their plain strings on the way."""
    cfg = to_run_config(compose("experiment=paper_p2o", "algorithm.loss_agg=seq-mean-token-mean"))
    assert isinstance(cfg.gepa.mode, choices.GEPAMode) and cfg.gepa.mode == "service"
    assert f"{cfg.algorithm.loss_agg}" == str(cfg.algorithm.loss_agg) == "seq-mean-token-mean"
    assert {"seq-mean-token-mean": 1}[cfg.algorithm.loss_agg] == 1

    written = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    assert "loss_agg: seq-mean-token-mean" in written and "mode: service" in written
    assert to_run_config(OmegaConf.create(written)) == cfg
    as_json = json.loads(json.dumps(asdict(cfg)))
    assert as_json["reflection"]["kind"] == "self" and type(as_json["reflection"]["kind"]) is str
    assert to_run_config(as_json) == cfg
    assert to_run_config(pickle.loads(pickle.dumps(asdict(cfg)))) == cfg
