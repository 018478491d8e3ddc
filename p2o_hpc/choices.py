"""The config's closed choices, one enum per key, so a typo (`algorithm.policy_loss=foo`) fails when Hydra composes
the config, naming the key and the allowed values, instead of inside a job after the SLURM queue wait.

A base module (stdlib only): the schema (p2o_hpc.config) types its fields with these, and the registries that
implement a choice (p2o_hpc.algo.core_algos, p2o_hpc.reward.registry) register under them; tests/test_config_schema.py
checks that each registry's names are exactly its enum's values, so the two cannot drift (verl's core_algos).

Members are StrEnums: ``PolicyLoss.ppo_clip == "ppo_clip"``, same hash, ``str()`` and f-strings give the value, so
string comparisons and str-keyed dicts keep working. OmegaConf reads and writes a member by its NAME, so every
name equals its value (``auto()``; choices with a hyphen are built by the functional API).
"""

from __future__ import annotations

from enum import StrEnum, auto


class ParamsDtype(StrEnum):  # model.params_dtype
    fp32 = auto()
    bf16 = auto()
    fp16 = auto()


class Recipe(StrEnum):  # data.recipe (null: every row); p2o_hpc.data.datasets.recipe_split
    deepscaler = auto()
    deepmath = auto()


class RewardName(StrEnum):
    """The registered graders (p2o_hpc.reward.registry.REWARDS). data.reward also takes "package.module:function",
    so its field stays a string and validate() checks it against these names."""

    math_verify = auto()
    deepscaler = auto()
    deepmath = auto()
    early_substring = auto()


class Advantage(StrEnum):  # algorithm.advantage; core_algos.ADVANTAGE_ESTIMATORS
    grpo = auto()
    grpo_no_std = auto()


class PolicyLoss(StrEnum):  # algorithm.policy_loss; core_algos.POLICY_LOSSES
    ppo_clip = auto()
    sft = auto()  # supervised: masked NLL of the response tokens (p2o_hpc.trainer.sft)


class KLPenalty(StrEnum):  # algorithm.kl_penalty; core_algos.KL_PENALTIES
    low_var_kl = auto()
    k1 = auto()


# algorithm.loss_agg; core_algos.LOSS_AGGREGATIONS
LossAgg = StrEnum("LossAgg", ["token-mean", "seq-mean-token-mean"], module=__name__)

# algorithm.lr_decay_style: megatron's OptimizerParamScheduler styles that need no extra settings (not WSD).
LRDecayStyle = StrEnum("LRDecayStyle", ["constant", "linear", "cosine", "inverse-square-root"], module=__name__)


class CDMask(StrEnum):  # algorithm.p2o.cd_mask; p2o_hpc.algo.context_distillation.cd_token_weights
    hard = auto()
    soft = auto()
    none = auto()


class Recompute(StrEnum):  # parallel.recompute; megatron's TransformerConfig.recompute_granularity
    none = auto()
    selective = auto()  # core attention only (megatron's default recompute_modules)
    full = auto()  # whole layers, parallel.recompute_num_layers per checkpoint (recompute_method=uniform)


class RolloutBackend(StrEnum):  # rollout.backend
    vllm = auto()


class GEPAMode(StrEnum):  # gepa.mode
    service = auto()
    inline = auto()
    off = auto()


class GEPASchedule(StrEnum):  # gepa.schedule
    blocking = auto()
    overlap = auto()


class ParentSelection(StrEnum):  # gepa.parent_selection; p2o_hpc.gepa.selection.select_parents
    pareto_mean = auto()
    instance_best_count = auto()


class GEPAAuto(StrEnum):  # gepa.auto; p2o_hpc.gepa.budget.AUTO_CANDIDATES
    light = auto()
    medium = auto()
    heavy = auto()
    heavy_4 = auto()


class ReflectionKind(StrEnum):  # reflection.kind
    self = auto()
    teacher = auto()
    none = auto()
    edit = auto()  # offline GrIPS-style edits, no LLM (p2o_hpc.gepa.edit_mutation); not the paper's operator


class ClusterKind(StrEnum):  # cluster.kind
    local = auto()
    slurm = auto()


class WandbMode(StrEnum):  # logging.wandb.mode
    offline = auto()
    online = auto()
    disabled = auto()
