"""The run's configuration as Hydra structured configs: typed, validated at compose time, one group per concern.

The dataclasses are the one place defaults live: the paper's setup (Qwen3-4B, K=6, T=0.6, lr 1e-6, 128 prompts
per step, mini-batch 64, no KL, 5 epochs). `conf/` holds the YAML groups and presets (`experiment=smoke` is the CPU
one), and a group file states only what differs from these defaults (tests/test_config_schema.py). Closed choices
are enums (p2o_hpc.choices), so a misspelt value fails at compose time; `validate` adds the checks that span keys.

A base module: it imports no other p2o_hpc package, so the settings objects elsewhere can nest its sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from p2o_hpc.choices import (
    Advantage,
    CDMask,
    ClusterKind,
    GEPAAuto,
    GEPAMode,
    GEPASchedule,
    KLPenalty,
    LossAgg,
    LRDecayStyle,
    ParamsDtype,
    ParentSelection,
    PolicyLoss,
    Recipe,
    Recompute,
    ReflectionKind,
    RewardName,
    RolloutBackend,
    WandbMode,
)

TEACHER_CONTEXT_TOKENS = 32768  # the authors' reflection_max_model_length, also for their API teacher


@dataclass
class ModelConfig:
    # HF folder or hub name; "tiny" builds the project's tiny Qwen3 (CPU runs and tests).
    path: str = "Qwen/Qwen3-4B"
    params_dtype: ParamsDtype = ParamsDtype.bf16


@dataclass
class DataConfig:
    # A name from p2o_hpc.data.datasets.DATASETS, a .json/.jsonl path, or "hf:<dataset name>".
    train: str = "deepscaler_partial"
    recipe: Optional[Recipe] = Recipe.deepscaler  # null: use all rows
    recipe_seed: int = 42
    holdout: int = 500
    take: int = 5000
    limit: Optional[int] = None  # first N problems after the recipe (smoke runs)
    template: str = "Let's think step by step and output the final answer within \\boxed{}.\nQuestion: {problem}"
    max_prompt_tokens: int = 4096  # the authors' data.max_prompt_length; longer prompts are an error naming the problem
    # Passed to the tokenizer's chat template wherever a prompt is rendered (rollouts, the CD pass on x and x̃,
    # GEPA scores and pass@k, evaluation). The authors render Qwen3 non-thinking (their data config); templates
    # that do not use a variable ignore it.
    chat_template_kwargs: dict[str, Any] = field(default_factory=lambda: {"enable_thinking": False})
    # How this dataset's answers are graded (p2o_hpc.reward registry, as the authors pick the grader by
    # data_source): a RewardName (math_verify: strict last box; deepmath: exactly one box) or package.module:fn
    reward: str = RewardName.math_verify.value


@dataclass
class HardMiningConfig:
    failed_responses: int = 3  # failed responses kept per hard prompt, for GEPA's reflection
    max_response_chars: int = 4000


@dataclass
class P2OConfig:
    """P²O on the learner side: rollouts of last epoch's hard prompts under their evolved templates."""

    enabled: bool = False
    # True: train on the original prompt x (context distillation); False: on x̃ (the "w/o CD" ablation).
    context_distillation: bool = True
    cd_mask: CDMask = CDMask.hard  # tokens whose π(y|x)/π(y|x̃) leaves [1 − low, 1 + high]: dropped, scaled, kept
    cd_clip_low: float = 0.99  # the authors' scripts: [0.01, 10]
    cd_clip_high: float = 9.0
    same_template_in_group: bool = False  # the paper's ablation: one template for all K rollouts of a prompt
    keep_one_plain_rollout: bool = False  # one of the K rollouts on the original prompt
    # Longer evolved templates are rejected (never sent to the model, scored 0 by GEPA). The authors' limit is the
    # prompt budget itself (data.max_prompt_length = 4096 for template + question); GEPA's meta-prompt invites long
    # templates, so the same budget here.
    template_max_tokens: int = 4096


@dataclass
class AlgorithmConfig:
    name: str = "grpo"
    n_samples: int = 6  # K rollouts per prompt
    prompts_per_step: int = 128
    mini_batch_prompts: int = 64  # one optimizer step per mini-batch
    micro_batch_size: int = 4  # sequences per forward/backward on one DP rank (when micro_batch_tokens is 0)
    # Token-budget micro-batches (verl's use_dynamic_bsz / ppo_max_token_len_per_gpu): a DP rank's sequences, dealt
    # to balance tokens over DP, sorted by length and cut into micro-batches of at most this many padded tokens
    # (rows × longest, which bounds the memory also when parallel.pack_sequences); the loss is unchanged. Must hold
    # the longest sequence, data.max_prompt_tokens + rollout.max_response_tokens. 0: micro_batch_size sequences.
    micro_batch_tokens: int = 0
    epochs: int = 5
    max_steps: Optional[int] = None  # stop early (smoke runs, tests)
    # A prompt is hard when its success rate over the K rollouts is ≤ tau, i.e. at most floor(tau·K) successes:
    # 0 → all K failed (the paper's text); 0.17 with K=6 → at most one success, the authors' add_near_hard=True,
    # which the paper preset uses (for another K take 1/K ≤ tau < 2/K).
    tau: float = 0.0
    advantage: Advantage = Advantage.grpo
    adv_eps: float = 1e-6
    policy_loss: PolicyLoss = PolicyLoss.ppo_clip
    clip_low: float = 0.2
    clip_high: float = 0.2
    # Dual-clip PPO (Ye et al. 2020, the authors' verl clip_ratio_c): for A < 0 the loss is capped at −A·c, so a
    # token whose ratio has exploded cannot dominate the update. null → plain PPO clip.
    dual_clip_c: Optional[float] = 3.0
    loss_agg: LossAgg = LossAgg["token-mean"]
    kl_coef: float = 0.0  # the paper trains without KL
    kl_penalty: KLPenalty = KLPenalty.low_var_kl
    one_step_off_policy: bool = False  # generate batch t+1 with weights from step t, overlapped with training
    lr: float = 1e-6
    weight_decay: float = 0.01  # the authors' verl optim default
    clip_grad: float = 1.0
    warmup_steps: int = 0  # optimizer steps of linear warm-up; 0 → from warmup_ratio
    # The authors' lr_warmup_steps_ratio: int(ratio × the run's trainer steps) steps of warm-up (× the mini-batches
    # of a step here, as megatron's scheduler counts optimizer steps).
    warmup_ratio: float = 0.05
    lr_decay_style: LRDecayStyle = LRDecayStyle.constant
    hard: HardMiningConfig = field(default_factory=HardMiningConfig)
    p2o: P2OConfig = field(default_factory=P2OConfig)


@dataclass
class GEPAResources:
    """The GEPA service job's own allocation on SLURM (null → the cluster's setting)."""

    gpus: int = 1  # (when cluster.gpus) the policy's vLLM engine and, for reflection=self, the reference server
    cpus: int = 8
    mem_gb: Optional[int] = 64
    time_min: Optional[int] = None  # null → cluster.time_min
    partition: Optional[str] = None


@dataclass
class GEPAConfig:
    """Template evolution per epoch (Algorithms 2–4); defaults are the paper's, else the authors' code."""

    mode: GEPAMode = GEPAMode.service  # service: its own process/job; inline: inside the learner (single box); off
    # blocking: the learner waits for epoch t's templates before epoch t+1 (the paper); overlap (service mode):
    # epoch t+1 starts with the prompts that need no template, last epoch's hard prompts wait for the templates.
    schedule: GEPASchedule = GEPASchedule.blocking
    min_hard: int = 100  # fewer hard prompts: no GEPA round, next epoch plain GRPO (authors' hard_set_min_count)
    # Dev = min(dev_size, n // 2) of the n hard prompts, train = the rest, disjoint (the authors' split: half/half
    # below n = 1.5 · dev_size, 300 dev items from n = 600 on).
    dev_size: int = 300
    minibatch_size: int = 3  # reflection minibatch B
    # Beam W: parents per iteration, each mutated once; a front of ≤ W candidates is taken whole, else W distinct.
    num_parents: int = 16
    parent_selection: ParentSelection = ParentSelection.pareto_mean  # paper, Alg. 4; instance_best_count: authors'
    auto: GEPAAuto = GEPAAuto.heavy_4  # DSPy auto budget: 72 candidates
    max_metric_calls: Optional[int] = None  # an explicit budget in policy rollouts instead of `auto`
    max_response_tokens: Optional[int] = None  # evaluation rollouts; null → rollout.max_response_tokens
    # (The reflection feedback is fitted by tokens into reflection.context_tokens − reflection.max_tokens.)
    # Every GEPA score (seed, minibatch before/after, dev) is one rollout per item at this temperature; 0 = greedy,
    # as the authors (val_kwargs.do_sample=False). pass@k keeps rollout.temperature (it measures sampling).
    eval_temperature: float = 0.0
    seed: int = 0
    eval_pass_at_k: bool = True  # pass@1/pass@K on dev with vs without the best template (outside the budget)
    wait_timeout_s: float = 24 * 3600.0  # blocking schedule: longest the learner waits for templates
    # The learner gives an epoch's round up (and goes on with plain prompts) when no live GEPA service has held the
    # service lease for this long while it waits: a killed service (its heartbeat stops; a dead pid on this host at
    # once) that no supervisor restarted in time, or one never started. The service resumes with the next epoch.
    service_lost_s: float = 900.0
    poll_s: float = 5.0
    resources: GEPAResources = field(default_factory=GEPAResources)
    max_restarts: int = 3  # a service job that dies while its learner lives is resubmitted this often


@dataclass
class ReflectionConfig:
    """The reflection LLM that GEPA asks for improved prompt templates."""

    # self: the reference model (original weights) behind a local `vllm serve` that GEPA starts and stops;
    # teacher: any OpenAI-compatible endpoint; none: no reflection (plain GRPO); edit: no LLM at all, GrIPS-style
    # phrase edits as an offline stand-in (p2o_hpc.gepa.edit_mutation; not the paper's reflective mutation).
    kind: ReflectionKind = ReflectionKind.self
    base_url: Optional[str] = None  # teacher only; `self` takes the local server's URL
    model: Optional[str] = None  # teacher: the endpoint's model name; self: the served name (None → "reference")
    # NAME of the environment variable holding the key; the key itself never enters configs, logs or files.
    api_key_env: Optional[str] = "OPENAI_API_KEY"
    max_concurrency: int = 8  # simultaneous requests per client
    timeout_s: float = 300.0  # per HTTP attempt
    max_retries: int = 5  # extra attempts after the first, on 408/429/5xx and connection errors
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0  # also caps a server's Retry-After
    # The authors' reflection sampling: reflection_temperature null → rollout temperature 0.6, 2048 new tokens.
    temperature: float = 0.6
    max_tokens: int = 2048
    # Sent as the request body's `chat_template_kwargs` (vLLM renders the chat template with them); {} sends none.
    # self: ${data.chat_template_kwargs}, the policy's non-thinking mode; teacher: {} (a strict API may refuse the
    # field).
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # The reflection model's context in tokens: the reflection prompt is fitted into context_tokens − max_tokens
    # (the minibatch's responses cut by the authors' rule, counted with the policy's tokenizer).
    # null → serve_max_model_len for self (the server's real limit), 32768 for a teacher (the authors' value).
    context_tokens: Optional[int] = None
    price_per_million_input: float = 0.0  # USD, for the cost tally only
    price_per_million_output: float = 0.0
    # kind=self only:
    serve_port: Optional[int] = None  # None → pick a free port on 127.0.0.1
    serve_start_timeout_s: float = 600.0
    serve_max_model_len: int = 32768  # the authors' reference server (my_scripts/start_vllm_server.sh)
    serve_extra_args: list[str] = field(default_factory=list)  # appended to the `vllm serve` command line
    # kind=edit only:
    edit_phrase_bank: Optional[str] = None  # a text file, one phrase a line (# comments); null → the built-in bank
    edit_num_edits: int = 1  # edits composed into one proposal (add / delete / swap / replace)


def reflection_context_tokens(cfg: ReflectionConfig) -> int:
    """The context the reflection prompt and its answer share (see ReflectionConfig.context_tokens)."""
    if cfg.context_tokens is not None:
        return int(cfg.context_tokens)
    return int(cfg.serve_max_model_len) if cfg.kind == ReflectionKind.self else TEACHER_CONTEXT_TOKENS


def reflection_prompt_budget(cfg: ReflectionConfig) -> int:
    """Tokens the reflection prompt may take: the context minus the answer's max_tokens (the authors' budget)."""
    return reflection_context_tokens(cfg) - int(cfg.max_tokens)


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    data: int = 1  # world size = tensor × pipeline × data = nodes × gpus_per_node
    nodes: int = 1
    gpus_per_node: Optional[int] = None  # learner ranks per node (on CPU: processes); null → world size / nodes
    # torch.distributed rendezvous: a peer that has not joined by then fails the job (collectives have their own,
    # longer trainer.collective_timeout_s).
    init_timeout_s: float = 300.0
    # The learner's memory plan (tools/plan_memory.py estimates it per GPU; docs in README "GPU memory"):
    # megatron's distributed optimizer: fp32 master weights and Adam state sharded over parallel.data (needs TE/Apex).
    use_distributed_optimizer: bool = False
    # megatron's sequence parallelism: norms and residuals sharded over the TP ranks along the sequence (tensor > 1).
    sequence_parallel: bool = False
    # Activation recomputation: none | selective (core attention) | full (whole layers, recomputed in backward).
    recompute: Recompute = Recompute.none
    recompute_num_layers: int = 1  # recompute=full: layers per checkpointed chunk (megatron's uniform method)
    grad_reduce_in_fp32: bool = True  # fp32 main_grad buffers and DP reductions; false: in params_dtype (half)
    # Log-probs (fp32 upcast + vocab-parallel cross entropy) over chunks of this many tokens, each recomputed in
    # backward, so only the bf16 logits stay for backward; 0: the whole micro-batch at once.
    logprob_chunk_tokens: int = 0
    # THD sequence packing: each micro-batch's sequences run through the model back to back as one row with
    # megatron's PackedSeqParams, attention kept within each sequence (Transformer-Engine's THD attention on GPU,
    # the local spec's SDPAttention elsewhere), so no layer computes padding; false: right-padded rows.
    pack_sequences: bool = True
    gpu_memory_gb: float = 80.0  # per GPU: the budget plan_memory and preflight compare the estimate with

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node or self.world_size // max(1, self.nodes)


@dataclass
class RolloutConfig:
    backend: RolloutBackend = RolloutBackend.vllm
    temperature: float = 0.6
    top_p: float = 1.0
    max_response_tokens: int = 12288  # the paper's 12k
    dtype: str = "auto"  # vLLM dtype; "auto" follows model.params_dtype
    gpu_memory_utilization: float = 0.5
    enable_sleep_mode: bool = True  # GPU only: release vLLM memory while the learner trains
    weight_sync_bucket_mb: int = 512
    # vLLM engines per node, each on its host rank's own GPU (hosts: local ranks with
    # local_rank % (parallel.gpus_per_node / engines_per_node) == 0; the step's prompts are split over them).
    # null → one per GPU when the ranks see CUDA (the device the learner and vLLM actually run on, whatever
    # cluster.gpus says), 1 on CPU: a vLLM-CPU engine is a process with its own threads, one per rank would
    # oversubscribe the cores.
    engines_per_node: Optional[int] = None
    refit_check_every: int = 10  # steps; 0 disables
    refit_check_sequences: int = 4
    # The refit check's bound on the token multiplicative probability error (NeMo-RL's token_mult_prob_error):
    # mean over the checked response tokens of exp(|logp_engine − logp_learner|); the run stops above
    # 1 + refit_tolerance (0.05: a 5 % mean probability error; a max-abs gap would trip on bf16 noise).
    refit_tolerance: float = 0.05
    sync_weights: bool = True  # debugging only: false leaves the generator on stale weights (the refit check fails)
    seed: int = 0


@dataclass
class RewardConfig:
    workers: int = 2
    timeout_s: float = 10.0


@dataclass
class ValidationSetConfig:
    """One held-out set (an entry of validation.sets, as `validation_sets` reads it)."""

    # A name from p2o_hpc.data.datasets.DATASETS / HF_DATASETS, a .json/.jsonl path, "hf:<dataset name>" (read by
    # the training data's own loader), or "holdout": the problems data.recipe holds out of data.train (the authors'
    # test_500).
    data: str
    limit: Optional[int] = None  # the first N problems; null → all
    split: str = "test"  # "hf:<name>" sets only (a registered name carries its own split)


@dataclass
class ValidationConfig:
    """Held-out accuracy during training (verl's trainer.test_freq / val_before_train): val/<set>/* on the metrics
    line of the steps it runs after (step 0 for before_training); p2o_hpc.trainer.validation. Off by default.

    sets: name → the data spec (`+validation.sets.aime=aime24`) or {data, limit, split}
    (`+validation.sets.math500.limit=100`: data defaults to the name). Typed loosely so both forms compose from
    the command line (OmegaConf cannot add a dataclass-typed dict entry by a dotted key); `validation_sets` reads
    it and validate() names a bad entry.
    """

    sets: dict[str, Any] = field(default_factory=dict)
    every_n_steps: int = 0  # after every N-th step; 0 = never
    before_training: bool = False  # once before step 1, logged at step 0
    at_end: bool = False  # after the run's last step
    # Greedy by default, as the authors (val_kwargs: T = 0, n = 1). n_samples = K > 1 samples K responses per
    # problem at `temperature` (> 0 then) and adds pass@K; `acc` is then the mean reward over all K samples.
    temperature: float = 0.0
    n_samples: int = 1
    top_p: float = 1.0
    max_tokens: Optional[int] = None  # null → rollout.max_response_tokens (the engine's context is sized for it)
    seed: int = 0
    # P²O runs: also score every set under the current round's best-on-dev template (Fig. 4's with vs without
    # templates; keys *_with_templates). GRPO runs have no templates and log no such keys.
    with_templates: bool = False


def validation_sets(val: ValidationConfig) -> dict[str, ValidationSetConfig]:
    """validation.sets as typed entries, in their order; a bad entry is a ValueError naming validation.sets.<name>."""
    sets = {}
    for name, entry in val.sets.items():
        key = f"validation.sets.{name}"
        if not name or "/" in str(name):
            raise ValueError(f"{key}: a set's name is part of its metrics keys (val/<name>/acc): non-empty, no '/'")
        if isinstance(entry, str):
            entry = {"data": entry}
        elif entry is None:
            entry = {}
        if not isinstance(entry, dict):
            raise ValueError(f"{key}={entry!r}: expected a data spec (name, .json/.jsonl path, hf:<name>, holdout) "
                             "or {data, limit, split}")
        unknown = sorted(set(entry) - {"data", "limit", "split"})
        if unknown:
            raise ValueError(f"{key}: unknown key(s) {unknown}; a set has data, limit, split")
        data, limit, split = entry.get("data") or name, entry.get("limit"), entry.get("split", "test")
        if not isinstance(data, str) or not isinstance(split, str):
            raise ValueError(f"{key}: data and split must be strings")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"{key}.limit={limit!r} must be an integer ≥ 1 (or null: every problem)")
        sets[str(name)] = ValidationSetConfig(data, limit, split)
    return sets


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.offline
    project: str = "p2o_hpc"
    entity: Optional[str] = None
    name: Optional[str] = None  # null → the run dir's name (a sweep point's overrides)
    group: Optional[str] = None  # null → the sweep's name, so a sweep's points sit together


@dataclass
class LoggingConfig:
    """Where step metrics go besides <run_dir>/metrics.jsonl (always written)."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True  # rich progress bar on rank 0 (off in batch logs if it clutters them)


@dataclass
class ClusterConfig:
    """Where the jobs run. local: processes on this machine; slurm: submitit jobs (site presets in conf/cluster/)."""

    kind: ClusterKind = ClusterKind.local
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    gpus: bool = False  # request GPUs: parallel.gpus_per_node per learner node, gepa.resources.gpus for the service
    cpus_per_task: int = 8
    # Host RAM per node; null → the partition's default, or for a GPU learner what the memory plan says the
    # colocated setup needs (sleeping engines keep their weights in host RAM: tools/plan_memory.py prints it).
    mem_gb: Optional[int] = None
    time_min: int = 240  # walltime per allocation; the run continues over requeues
    signal_delay_s: int = 120  # SLURM sends USR2 this long before the walltime ends: checkpoint and requeue
    max_num_timeout: int = 20  # requeues after timeouts; preemptions do not count
    # Seconds after the USR2 after which a step still running is abandoned (requeue from the last checkpoint)
    # so the requeue happens before SLURM kills the job; null → signal_delay_s − 30.
    abandon_after_s: Optional[float] = None
    setup: list[str] = field(default_factory=list)  # shell lines before the job: module load, venv, container
    # The interface NCCL and gloo bind their sockets to (NCCL_/GLOO_SOCKET_IFNAME), e.g. "ib0"; null → the one each
    # node reaches the rendezvous host through. An exported NCCL_SOCKET_IFNAME/GLOO_SOCKET_IFNAME wins.
    network_interface: Optional[str] = None
    srun_args: list[str] = field(default_factory=list)  # e.g. ["--container-image=…"] on pyxis sites
    additional_parameters: dict[str, Any] = field(default_factory=dict)  # other sbatch options, e.g. {mail_type: END}
    poll_s: float = 10.0  # how often the launcher polls job states
    submitit_folder: str = "slurm"  # job scripts and logs, relative to the run dir (%j = job id)


@dataclass
class TrainerConfig:
    seed: int = 1234
    save_every: int = 50  # steps; checkpoints also at every epoch end
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the run dir's latest complete checkpoint
    # End this job after that many steps, with a checkpoint, as if its allocation ran out; relaunching continues
    # the same run (schedule and data order unchanged). For time-limited SLURM jobs and for resume tests.
    stop_after_steps: Optional[int] = None
    # Megatron's collectives (NCCL on GPU: its watchdog kills the job past this); every rank is in step there.
    collective_timeout_s: float = 3600.0
    # One operation of the control group (gloo): the rollouts' gather waits for the slowest engine host's
    # generation, an inline GEPA round (gepa.mode=inline) for rank 0's whole round. Waits for the GEPA service are
    # polled (one broadcast per gepa.poll_s) and never reach it. null → 24 h.
    control_timeout_s: Optional[float] = None
    # Steps (1-based, as metrics.jsonl counts them) to record with torch.profiler on every learner rank, e.g.
    # trainer.profile_steps=[3,10]: a chrome trace <run dir>/profile/step_<N>.rank<R>.json, each phase of the step
    # a range phase/<name> (weight_sync, generate, reward, refit_check, rollout_wait, gepa_wait, logprob,
    # cd_logprob, update: their seconds are time/<name>). Open it in https://ui.perfetto.dev or chrome://tracing.
    # On a GPU the phases are NVTX ranges too, for `nsys profile`. [] → nothing is profiled.
    profile_steps: list[int] = field(default_factory=list)

    def checks(self):
        """(ok, message) pairs for validate()."""
        steps = list(self.profile_steps)
        bad = [step for step in steps if isinstance(step, bool) or not isinstance(step, int) or step < 1]
        yield not bad, f"trainer.profile_steps={steps}: steps are integers ≥ 1, as metrics.jsonl counts (not {bad})"


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    gepa: GEPAConfig = field(default_factory=GEPAConfig)
    reflection: ReflectionConfig = field(default_factory=ReflectionConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run_dir: Optional[str] = None  # default: Hydra's output dir
    resume: Optional[str] = None  # a run dir: continue that run with its saved config (only cluster.* may change)


def register_configs() -> None:
    """conf/config.yaml starts its defaults list with `run_schema`: every YAML key is type-checked against it."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def to_run_config(cfg: DictConfig | dict) -> RunConfig:
    """A typed RunConfig (validated against the schema) from Hydra's DictConfig or a plain dict."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), cfg))


def validate(cfg: RunConfig) -> None:
    """Errors that would otherwise surface minutes later inside a worker, named by their config key.

    Only what a field's type cannot say: ranges, and checks that span keys. Closed choices are enums (rejected at
    compose time); data.reward is open ("package.module:function"), so its registered names are checked here.
    """
    for ok, message in _checks(cfg):
        if not ok:
            raise ValueError(message)


def _checks(cfg: RunConfig):
    """(ok, message) pairs in order, lazily: a later check may divide by a size an earlier one proved ≥ 1."""
    algo, parallel, gepa, reflection = cfg.algorithm, cfg.parallel, cfg.gepa, cfg.reflection
    dp = parallel.data
    for key, value in (("algorithm.prompts_per_step", algo.prompts_per_step),
                       ("algorithm.mini_batch_prompts", algo.mini_batch_prompts),
                       ("algorithm.micro_batch_size", algo.micro_batch_size),
                       ("trainer.save_every", cfg.trainer.save_every),
                       ("algorithm.p2o.template_max_tokens", algo.p2o.template_max_tokens),
                       ("parallel.tensor", parallel.tensor), ("parallel.pipeline", parallel.pipeline),
                       ("parallel.data", dp), ("parallel.nodes", parallel.nodes),
                       ("gepa.dev_size", gepa.dev_size), ("gepa.minibatch_size", gepa.minibatch_size),
                       ("gepa.num_parents", gepa.num_parents)):
        yield value >= 1, f"{key}={value} must be ≥ 1"
    yield algo.n_samples >= 2, f"algorithm.n_samples={algo.n_samples} must be ≥ 2 (a group of one has no advantage)"
    yield (algo.prompts_per_step % algo.mini_batch_prompts == 0,
           f"algorithm.prompts_per_step={algo.prompts_per_step} must be a multiple of "
           f"algorithm.mini_batch_prompts={algo.mini_batch_prompts}")
    yield algo.micro_batch_tokens >= 0, f"algorithm.micro_batch_tokens={algo.micro_batch_tokens} must be ≥ 0"
    if algo.micro_batch_tokens:
        longest = cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens
        yield (algo.micro_batch_tokens >= longest,
               f"algorithm.micro_batch_tokens={algo.micro_batch_tokens} must hold the longest sequence: "
               f"data.max_prompt_tokens + rollout.max_response_tokens = {longest}")
        yield (algo.mini_batch_prompts * algo.n_samples >= dp,
               f"a mini-batch of {algo.mini_batch_prompts}×{algo.n_samples} sequences must give each of the "
               f"parallel.data={dp} ranks one")
    else:
        yield ((algo.mini_batch_prompts * algo.n_samples) % (dp * algo.micro_batch_size) == 0,
               f"a mini-batch of {algo.mini_batch_prompts}×{algo.n_samples} sequences must split into "
               f"parallel.data={dp} × algorithm.micro_batch_size={algo.micro_batch_size} evenly")
    yield (parallel.nodes * parallel.ranks_per_node == parallel.world_size,
           f"parallel.nodes={parallel.nodes} × parallel.gpus_per_node={parallel.ranks_per_node} must equal "
           f"the world size tensor×pipeline×data = {parallel.world_size}")
    yield (cfg.cluster.kind == ClusterKind.slurm or parallel.nodes == 1,
           f"parallel.nodes={parallel.nodes} needs cluster=slurm (a local run has one node)")
    yield 0.0 <= algo.tau < 1.0, f"algorithm.tau={algo.tau} must be in [0, 1) (success rate ≤ tau is hard)"
    yield (algo.dual_clip_c is None or algo.dual_clip_c > 1.0,
           f"algorithm.dual_clip_c={algo.dual_clip_c} must be > 1 (or null for plain PPO clip)")
    yield 0.0 <= algo.warmup_ratio < 1.0, f"algorithm.warmup_ratio={algo.warmup_ratio} must be in [0, 1)"
    yield (cfg.data.reward in set(RewardName) or ":" in cfg.data.reward,
           f"data.reward={cfg.data.reward!r}: expected a registered reward ({', '.join(RewardName)}) "
           "or 'package.module:function'")
    yield gepa.eval_temperature >= 0.0, f"gepa.eval_temperature={gepa.eval_temperature} must be ≥ 0 (0 = greedy)"
    yield (not (gepa.schedule == GEPASchedule.overlap and gepa.mode != GEPAMode.service),
           "gepa.schedule=overlap needs gepa.mode=service (inline GEPA runs in the learner's own time)")
    yield reflection.edit_num_edits >= 1, f"reflection.edit_num_edits={reflection.edit_num_edits} must be ≥ 1"
    yield (reflection.kind in (ReflectionKind.none, ReflectionKind.edit)
           or reflection_context_tokens(reflection) > reflection.max_tokens,
           f"reflection.max_tokens={reflection.max_tokens} leaves no room for the reflection prompt in the "
           f"reflection context of {reflection_context_tokens(reflection)} tokens (reflection.context_tokens, "
           "null → serve_max_model_len for self)")
    yield (not (algo.p2o.enabled and gepa.mode != GEPAMode.off and reflection.kind == ReflectionKind.none),
           "algorithm.p2o needs a reflection model: reflection=self or reflection=teacher (or gepa.mode=off; "
           "reflection=edit: offline phrase edits, no LLM)")
    yield from _validation_checks(cfg.validation, cfg.rollout)
    yield from cfg.trainer.checks()
    engines = cfg.rollout.engines_per_node
    yield (engines is None or (engines >= 1 and parallel.ranks_per_node % engines == 0),
           f"rollout.engines_per_node={engines} must be ≥ 1 and divide the ranks per node "
           f"(parallel.gpus_per_node={parallel.ranks_per_node})")
    yield from _memory_plan_checks(cfg)


def _memory_plan_checks(cfg: RunConfig):
    """parallel.*'s memory keys: what megatron would refuse only after every rank's init."""
    parallel = cfg.parallel
    yield (not parallel.sequence_parallel or parallel.tensor > 1,
           f"parallel.sequence_parallel=true needs parallel.tensor > 1 (it shards over the TP ranks; "
           f"parallel.tensor={parallel.tensor})")
    yield (parallel.recompute_num_layers >= 1,
           f"parallel.recompute_num_layers={parallel.recompute_num_layers} must be ≥ 1")
    yield (parallel.logprob_chunk_tokens >= 0,
           f"parallel.logprob_chunk_tokens={parallel.logprob_chunk_tokens} must be ≥ 0 (0 = the whole micro-batch)")
    yield parallel.gpu_memory_gb > 0, f"parallel.gpu_memory_gb={parallel.gpu_memory_gb} must be > 0"
    yield (not (parallel.use_distributed_optimizer and cfg.cluster.kind == ClusterKind.slurm and not cfg.cluster.gpus),
           "parallel.use_distributed_optimizer=true needs GPUs with Transformer-Engine or Apex (FusedAdam); "
           "cluster.gpus=false runs the learner on CPU, where megatron's torch-AdamW fallback cannot checkpoint "
           "distributed optimizer state: set parallel.use_distributed_optimizer=false")


def _validation_checks(val: ValidationConfig, rollout: RolloutConfig):
    """validation.*: the schedule, the decoding, each set's shape. Whether a set's data exists is checked by the
    launcher's preflight, which reads every set with the training data's loader (this base module cannot)."""
    yield val.every_n_steps >= 0, f"validation.every_n_steps={val.every_n_steps} must be ≥ 0 (0 = never)"
    yield val.n_samples >= 1, f"validation.n_samples={val.n_samples} must be ≥ 1"
    yield val.temperature >= 0.0, f"validation.temperature={val.temperature} must be ≥ 0 (0 = greedy)"
    yield (val.n_samples == 1 or val.temperature > 0.0,
           f"validation.n_samples={val.n_samples} needs validation.temperature > 0 (greedy samples are all the same)")
    yield (val.max_tokens is None or 1 <= val.max_tokens <= rollout.max_response_tokens,
           f"validation.max_tokens={val.max_tokens} must be in [1, rollout.max_response_tokens="
           f"{rollout.max_response_tokens}] (the generator's context is sized for the rollouts)")
    scheduled = val.every_n_steps > 0 or val.before_training or val.at_end
    yield (val.sets or not scheduled,
           "validation.every_n_steps/before_training/at_end schedule a validation but validation.sets is empty "
           "(e.g. +validation.sets.math500.limit=100)")
    try:
        validation_sets(val)
    except ValueError as error:
        yield False, str(error)
