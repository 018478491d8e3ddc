"""The learner's GPU memory per GPU, by arithmetic from the model's shape and the run config (no torch, no GPU).

Why: a colocated RL step puts the megatron learner (weights, gradients, optimizer state, one micro-batch's
activations and logits) and a vLLM engine on the same GPU. A layout that does not fit fails only after the queue
wait and the model load, as a CUDA OOM on one rank. `tools/plan_memory.py` prints this estimate as a table and
`preflight` warns before submitting. `tools/bench_memory_plan.py` checks the static parts and the activations
against a built learner (local spec on CPU: exact per-layer accounting of what autograd saves).

What is counted (bytes per GPU, for the GPU of each pipeline stage):
- static: parameters (params_dtype), megatron DDP's grad buffer (fp32 with parallel.grad_reduce_in_fp32), the
  optimizer (Adam m, v in fp32, plus fp32 master weights for bf16/fp16 params; ÷ DP with the distributed optimizer).
- activations of one micro-batch of the worst case: micro_batch_size sequences of the longest length (max prompt
  + max response), or with a token budget (algorithm.micro_batch_tokens) a micro-batch of that many padded tokens
  (rows × longest); per transformer layer as megatron-core's modules save them for backward (TE spec: fused
  norm+linear, flash attention; local spec: torch norms, torch's fused SDPA as sdpa_attention.SDPAttention — both
  keep q, k, v, the output and the log-sum-exp, no [b, heads, s, s] scores), with TP, sequence parallelism and
  recomputation; with THD packing (parallel.pack_sequences) the layers see the micro-batch's tokens as one row,
  attention per sequence; 1F1B keeps up to PP micro-batches in flight on the first stage.
- logits [tokens, vocab/TP] in params_dtype and the log-prob working set (fp32 copy + softmax, or a chunk of it);
  packed, the layers' logits and their scatter to the right-padded layout the loss reads, for a moment both.
- the vLLM engine: gpu_memory_utilization × GPU memory when awake (generation; also during the update with
  one-step off-policy or without sleep mode), a residual when asleep (level 1: weights go to host RAM).
Constants that are assumptions, not arithmetic, are named below with what they stand for.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from p2o_hpc.choices import Recompute
from p2o_hpc.config import RunConfig

GiB = 1024**3
FP32 = 4
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# Assumptions (per GPU unless stated), kept apart from the arithmetic:
LEARNER_RUNTIME_GB = 3.0  # learner process: CUDA context (~0.5), NCCL communicators, allocator fragmentation
ENGINE_ASLEEP_GB = 2.0  # a sleeping vLLM engine: its CUDA context and CUDA-graph pool stay on the GPU
ENGINE_HOST_GB = 6.0  # host RAM of one vLLM engine process besides its offloaded weights (Python, CUDA, tokenizer)
LEARNER_RANK_HOST_GB = 6.0  # host RAM of one learner rank (torch, megatron, NCCL, data, checkpoint staging)
REWARD_WORKER_HOST_GB = 0.5  # one math-verify grading process
HOST_HEADROOM = 1.2  # page cache for the safetensors reads, the OS


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from an HF config.json (the fields of model_provider.HFArchitecture)."""

    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    qk_norm: bool
    qkv_bias: bool

    def padded_vocab_size(self, tp: int, divisible_by: int = 128) -> int:
        """As HFArchitecture.padded_vocab_size: megatron splits the vocabulary evenly over TP ranks."""
        multiple = divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    @property
    def parameters(self) -> int:
        """The HF model's parameter count (unpadded vocabulary)."""
        layer = _layer_parameters(self, 1)
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embeddings + self.hidden_size


# Shapes of hub models the estimate may need offline (a login node without the hub): their config.json values.
KNOWN_SHAPES = {
    "Qwen/Qwen3-4B": ModelShape(vocab_size=151936, hidden_size=2560, ffn_hidden_size=9728, num_layers=36,
                                num_attention_heads=32, num_kv_heads=8, head_dim=128, tie_word_embeddings=True,
                                qk_norm=True, qkv_bias=False),
}


def model_shape(arch) -> ModelShape:
    """From an HFArchitecture (or anything with its field names)."""
    return ModelShape(**{field.name: getattr(arch, field.name) for field in dataclasses.fields(ModelShape)})


def read_model_shape(model_dir: str | Path) -> ModelShape:
    """From a model folder's config.json alone (the launcher's preflight imports neither transformers nor megatron);
    the same reading as model_provider.read_hf_architecture."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    heads = config["num_attention_heads"]
    return ModelShape(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qk_norm=config.get("model_type") == "qwen3",
        qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
    )


def _layer_parameters(shape: ModelShape, tp: int) -> int:
    """One transformer layer's parameters on one TP rank (norm weights are replicated)."""
    h, d = shape.hidden_size, shape.head_dim
    qkv_rows = (shape.num_attention_heads + 2 * shape.num_kv_heads) * d
    matrices = h * qkv_rows + shape.num_attention_heads * d * h + 3 * h * shape.ffn_hidden_size
    return (matrices + (qkv_rows if shape.qkv_bias else 0)) // tp + 2 * h + (2 * d if shape.qk_norm else 0)


def stage_parameters(shape: ModelShape, tp: int, pp: int, stage: int) -> int:
    """Parameters on one GPU of a pipeline stage: its layers, the embedding on the first stage, the final norm
    and output layer on the last (with tied embeddings and PP > 1 the last stage holds its own copy)."""
    count = shape.num_layers // pp * _layer_parameters(shape, tp)
    embedding = shape.padded_vocab_size(tp) * shape.hidden_size // tp
    if stage == 0:
        count += embedding
    if stage == pp - 1:
        count += shape.hidden_size + (embedding if not shape.tie_word_embeddings or pp > 1 else 0)
    return count


@dataclasses.dataclass(frozen=True)
class Layout:
    """The settings the arithmetic reads, from a RunConfig (parallel.*, algorithm.*, data.*, rollout.*)."""

    tp: int
    pp: int
    dp: int
    sequence_parallel: bool
    recompute: Recompute
    recompute_num_layers: int
    distributed_optimizer: bool
    grad_reduce_in_fp32: bool
    logprob_chunk_tokens: int
    param_bytes: int
    micro_batch_size: int  # sequences per micro-batch (when micro_batch_tokens is 0)
    seq_len: int  # the worst case: longest prompt (+ template without CD) + longest response
    micro_batches: int  # per mini-batch on one DP rank (with a token budget: a bound for 1F1B, see `of`)
    micro_batch_tokens: int = 0  # algorithm.micro_batch_tokens: padded tokens (rows × longest) per micro-batch
    pack_sequences: bool = False  # parallel.pack_sequences: THD packing, the layers see the real tokens only

    @property
    def padded_shape(self) -> tuple[int, int]:
        """(rows, longest) of the worst-case micro-batch, right-padded as the loss sees it. With a token budget:
        rows × longest ≤ budget (rollout_batch.pack_by_length; a sequence longer than the budget gets a micro-batch
        of its own), rows of equal length filling it; ceil(budget / seq_len) rows of budget // rows tokens each
        (budget = seq_len: one longest sequence; a larger budget: more, shorter rows, up to the budget)."""
        if self.micro_batch_tokens <= 0:
            return self.micro_batch_size, self.seq_len
        budget = max(self.micro_batch_tokens, self.seq_len)
        rows = math.ceil(budget / self.seq_len)
        return rows, budget // rows

    def layer_tokens(self, batch: int, seq: int) -> int:
        """Tokens the layers see for a right-padded [batch, seq] micro-batch: all of them, or packed the real ones
        (the worst case: no padding), rounded up to a multiple of TP with sequence parallelism (forward.py)."""
        tokens = batch * seq
        if self.pack_sequences and self.sequence_parallel:
            tokens += -tokens % self.tp
        return tokens

    @classmethod
    def of(cls, cfg: RunConfig) -> "Layout":
        parallel, algo = cfg.parallel, cfg.algorithm
        seq = cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens
        if algo.p2o.enabled and not algo.p2o.context_distillation:  # trains on the templated prompt x̃
            seq += algo.p2o.template_max_tokens
        sequences = algo.mini_batch_prompts * algo.n_samples  # per mini-batch, all DP ranks
        if algo.micro_batch_tokens > 0:
            # The count of budget micro-batches depends on the lengths (next-fit by length can leave them part-full,
            # up to one per sequence), but what 1F1B holds does not grow with it: k micro-batches in flight hold at
            # most min(k × budget, the rank's tokens) tokens. So this counts budget-sized micro-batches: ceil(the
            # rank's tokens in the worst case / budget), every sequence the longest; balance_by_tokens (longest
            # first to the lightest rank) leaves a rank at most one sequence above the mean, (n − 1) / DP + 1
            # sequences' worth. It is at most that many sequences (budget ≥ the longest); fixed counts are exact.
            rank_tokens = ((sequences - 1) / parallel.data + 1) * seq
            micro_batches = math.ceil(rank_tokens / max(algo.micro_batch_tokens, seq))
        else:
            micro_batches = sequences // (parallel.data * algo.micro_batch_size)
        return cls(
            tp=parallel.tensor, pp=parallel.pipeline, dp=parallel.data,
            sequence_parallel=parallel.sequence_parallel, recompute=Recompute(parallel.recompute),
            recompute_num_layers=parallel.recompute_num_layers,
            distributed_optimizer=parallel.use_distributed_optimizer,
            grad_reduce_in_fp32=parallel.grad_reduce_in_fp32, logprob_chunk_tokens=parallel.logprob_chunk_tokens,
            param_bytes=DTYPE_BYTES[str(cfg.model.params_dtype)], micro_batch_size=algo.micro_batch_size,
            seq_len=seq, micro_batches=max(1, micro_batches), micro_batch_tokens=algo.micro_batch_tokens,
            pack_sequences=parallel.pack_sequences,
        )


def static_bytes(shape: ModelShape, layout: Layout, stage: int) -> dict[str, int]:
    """Parameters, megatron DDP's grad buffer, optimizer state on one GPU of `stage`."""
    params = stage_parameters(shape, layout.tp, layout.pp, stage)
    low_precision = layout.param_bytes < FP32
    grad_bytes = FP32 if layout.grad_reduce_in_fp32 else layout.param_bytes
    shard = layout.dp if layout.distributed_optimizer else 1
    # Adam's m and v in fp32; bf16/fp16 params also get fp32 master copies; with low-precision main grads the
    # optimizer step makes fp32 copies of them (megatron's main_param.grad = main_grad.float()).
    optimizer = (2 * FP32 + (FP32 if low_precision else 0)) * params // shard
    step_grads = FP32 * params // shard if low_precision and not layout.grad_reduce_in_fp32 else 0
    return {"parameters": params * layout.param_bytes, "gradients": params * grad_bytes + step_grads,
            "optimizer": optimizer}


def layer_activation_bytes(shape: ModelShape, layout: Layout, spec: str, batch: int, seq: int, *,
                           packed: bool = False) -> dict[str, int]:
    """What one transformer layer saves for backward for one micro-batch [batch, seq], by part, without
    recomputation (the parts selective recomputation drops are under "core_attention"). `packed`: THD, the
    caller passes batch 1 and seq = the packed tokens (RoPE's cos and sin are then per token, as here).

    Both specs: q, k after RoPE (new tensors) and v (a view of linear_qkv's output, so that output stays) are what
    flash attention keeps, with its output (= linear_proj's input) and the log-sum-exp [b, heads, s] in fp32;
    GQA without repeating k and v. spec "te": TE layers (fused norm+linear saving its input, normed output and
    rsigma; TE norms for q/k), flash attention from TE. spec "local": megatron's own modules (torch RMSNorm saving
    its fp32 input, normed output and rstd) and torch's fused SDPA (sdpa_attention.SDPAttention); packed, it runs
    per sequence and concatenates, so the pieces' outputs stay beside linear_proj's input. Both: RoPE's cos and sin
    in params_dtype for q and k, megatron's SwiGLU (fc1 output, silu, the linear half, their product)."""
    act, tp = layout.param_bytes, layout.tp
    tokens = batch * seq
    norm_tokens = tokens // tp if layout.sequence_parallel else tokens  # sequence-sharded parts
    h, d, f = shape.hidden_size, shape.head_dim, shape.ffn_hidden_size // tp
    heads, groups = shape.num_attention_heads // tp, shape.num_kv_heads // tp
    qkv = act * tokens * (heads + 2 * groups) * d  # linear_qkv's output: v's storage
    rope = 4 * seq * d * act  # cos and sin for q and k
    rotated = act * tokens * (heads + groups) * d  # q, k after RoPE (flash attention's inputs)
    core = FP32 * batch * heads * seq  # softmax log-sum-exp
    projection = act * tokens * heads * d  # attention output = linear_proj's input
    mlp = act * tokens * 5 * f  # fc1 output (2f), silu, linear half, product (fc2's input)
    if spec == "te":
        norms = 2 * (2 * act * norm_tokens * h + FP32 * norm_tokens)  # input, normed output, rsigma; twice
        qk_norm = FP32 * tokens * (heads + groups) if shape.qk_norm else 0  # rsigma (inputs: views of qkv)
        return {"norms": norms, "qkv": qkv + qk_norm + rope + rotated, "core_attention": core,
                "projection": projection, "mlp": mlp}
    # local spec: torch RMSNorm upcasts to fp32 and saves input, normed and rstd; the linear after it saves the
    # weighted output in params_dtype.
    norms = 2 * (FP32 * (2 * norm_tokens * h + norm_tokens) + act * norm_tokens * h)
    qk_norm = 0
    if shape.qk_norm:  # normed q and k, rstd; inputs: fp32 copies, or views of qkv (q is one only for 1 group)
        qk_norm = FP32 * (tokens * (heads + groups) * d + tokens * (heads + groups))
        qk_norm += 0 if act == FP32 and groups == 1 else FP32 * tokens * heads * d
        qk_norm += 0 if act == FP32 else FP32 * tokens * groups * d
    if packed:
        core += act * tokens * heads * d  # the per-sequence outputs (linear_proj's input is their concatenation)
    return {"norms": norms, "qkv": qkv + qk_norm + rope + rotated, "core_attention": core,
            "projection": projection, "mlp": mlp}


def activation_bytes(shape: ModelShape, layout: Layout, spec: str, stage: int, batch: int | None = None,
                     seq: int | None = None) -> dict[str, int]:
    """One micro-batch on one GPU of `stage`: what stays saved between its forward and backward ("layers",
    "embedding", "final_norm", "logprobs"), and the transient peaks on top ("backward" — the layer or recomputed
    chunk being back-propagated, with its gradients — and "logits_peak", the logits and log-prob working set)."""
    padded_batch, padded_seq = layout.padded_shape
    batch = padded_batch if batch is None else batch
    seq = padded_seq if seq is None else seq
    act, tp, h = layout.param_bytes, layout.tp, shape.hidden_size
    # The layers: the right-padded [batch, seq], or packed (THD) one row of the real tokens (the worst case: every
    # row full), attention per sequence; the logits and the loss: [batch, seq] either way.
    packed = layout.pack_sequences
    layer_batch, layer_seq = (1, layout.layer_tokens(batch, seq)) if packed else (batch, seq)
    tokens = layer_batch * layer_seq
    norm_tokens = tokens // tp if layout.sequence_parallel else tokens
    layers = shape.num_layers // layout.pp
    per_layer = layer_activation_bytes(shape, layout, spec, layer_batch, layer_seq, packed=packed)
    one_layer = sum(per_layer.values())
    if layout.recompute == Recompute.selective:
        # The checkpoint's inputs (q, k after RoPE, v) are what flash attention saved already (under "qkv"), its
        # output is linear_proj's input (under "projection"): only "core_attention" goes, in both specs.
        one_layer -= per_layer["core_attention"]
    parts = {}
    if layout.recompute == Recompute.full:
        chunks = math.ceil(layers / layout.recompute_num_layers)
        # chunk inputs; the RoPE table [longest, d] fp32 (packed: max_seqlen) is a checkpoint input too
        parts["layers"] = chunks * act * norm_tokens * h + FP32 * seq * shape.head_dim
        parts["backward"] = (layout.recompute_num_layers + 1) * sum(per_layer.values())
    else:
        parts["layers"] = layers * one_layer
        parts["backward"] = sum(per_layer.values())
    last = stage == layout.pp - 1
    # The token ids (and, with TP, the vocab-parallel embedding's out-of-shard mask).
    parts["embedding"] = (8 + (1 if tp > 1 else 0)) * tokens if stage == 0 else 0
    if not last:
        return {**parts, "final_norm": 0, "logprobs": 0, "logits_peak": 0}
    if spec == "te":  # TE norm (input, rsigma); the output layer saves its (sequence-sharded) input
        parts["final_norm"] = act * norm_tokens * h + FP32 * norm_tokens + act * norm_tokens * h
    else:
        parts["final_norm"] = FP32 * (2 * norm_tokens * h + norm_tokens) + act * norm_tokens * h
    vocab = shape.padded_vocab_size(tp) // tp
    logits = act * batch * seq * vocab  # what the loss reads: right-padded [batch, seq, vocab/TP]
    predicted = batch * (seq - 1)  # next-token positions
    chunk_rows = min(seq - 1, max(1, layout.logprob_chunk_tokens // batch)) if layout.logprob_chunk_tokens else seq
    if chunk_rows >= seq - 1:  # the whole fp32 softmax stays for backward (+ cross entropy's target mask and ids)
        parts["logprobs"] = FP32 * predicted * vocab + predicted * (1 + 8)
        parts["logits_peak"] = logits + FP32 * predicted * vocab
    else:  # only the logits stay (and the token ids); backward: logits, their gradient, one chunk's fp32 and grad
        # (the targets are a view of the micro-batch's ids; the embedding's on the first stage unless packed)
        parts["logprobs"] = logits + (0 if stage == 0 and not packed else 8 * batch * seq)
        parts["logits_peak"] = 2 * logits + (FP32 + act) * batch * chunk_rows * vocab
    if packed:
        # PackedBatch.unpack: the layers' logits [tokens, vocab/TP], a zero [batch, seq, vocab/TP] and the
        # index_put result filled from both, for a moment all three; autograd keeps the scatter's row and column
        # indices only (int64), so the layers' logits are freed after it (backward: the padded and packed
        # gradients, less than this).
        parts["logprobs"] += 2 * 8 * batch * seq
        parts["logits_peak"] = max(parts["logits_peak"], act * tokens * vocab + 2 * logits)
    elif batch > 1:  # GPTModel's [s, b] → [b, s] copy of the logits, beside the original for a moment
        parts["logits_peak"] = max(parts["logits_peak"], 2 * logits)
    return parts


def in_flight_micro_batches(layout: Layout, stage: int) -> int:
    """1F1B: stage i holds the activations of up to PP − i micro-batches before its first backward."""
    return min(layout.pp - stage, layout.micro_batches)


@dataclasses.dataclass
class GPUPlan:
    """One GPU: a pipeline stage's learner rank, with or without a vLLM engine beside it."""

    stage: int
    engine: bool
    lines: dict[str, int]  # bytes held through the update: static state, activations, runtime
    transients: dict[str, int]  # bytes on top at one moment: the logits' peak, or a layer's backward (the larger)
    engine_awake: int  # vLLM's share while generating
    engine_asleep: int  # what a sleeping engine leaves on the GPU
    engine_awake_in_update: bool  # one-step off-policy or no sleep mode: awake during the update too
    weight_sync: int  # a weight-sync bucket while the engine is awake

    @property
    def static(self) -> int:
        return sum(self.lines[key] for key in ("parameters", "gradients", "optimizer"))

    @property
    def engine_in_update(self) -> int:
        if not self.engine:
            return 0
        return self.engine_awake if self.engine_awake_in_update else self.engine_asleep

    @property
    def learner_peak(self) -> int:
        """The update's peak: what the learner holds, its largest transient, the engine beside it."""
        return sum(self.lines.values()) + max(self.transients.values()) + self.engine_in_update

    @property
    def generation(self) -> int:
        """Generation: the learner's static state and runtime (activations freed) beside the awake engine."""
        return self.static + self.lines["runtime"] + (self.engine_awake + self.weight_sync if self.engine else 0)

    @property
    def peak(self) -> int:
        return max(self.learner_peak, self.generation)


@dataclasses.dataclass
class MemoryPlan:
    gpus: list[GPUPlan]
    gpu_memory: int
    layout: Layout
    spec: str
    tokens_per_micro_batch: int

    @property
    def worst(self) -> GPUPlan:
        return max(self.gpus, key=lambda gpu: gpu.peak)

    @property
    def fits(self) -> bool:
        return self.worst.peak <= self.gpu_memory


def engine_stages(cfg: RunConfig) -> set[int]:
    """Pipeline stages whose GPUs host a vLLM engine: every (ranks_per_node / engines_per_node)-th local rank of
    every node (rollout.engines_per_node; null: one per GPU), megatron's rank order tp-dp-pp."""
    parallel = cfg.parallel
    ranks = parallel.ranks_per_node
    engines = getattr(cfg.rollout, "engines_per_node", None) or ranks
    step = max(1, ranks // engines)
    stage_size = parallel.tensor * parallel.data
    return {(node * ranks + local) // stage_size for node in range(parallel.nodes) for local in range(0, ranks, step)}


def estimate(shape: ModelShape, cfg: RunConfig, *, spec: str = "te") -> MemoryPlan:
    """The plan for `cfg` (spec: "te" on GPUs with Transformer-Engine, "local" without)."""
    layout = Layout.of(cfg)
    gpu_memory = int(cfg.parallel.gpu_memory_gb * GiB)
    engine_awake = int(cfg.rollout.gpu_memory_utilization * gpu_memory)
    awake_in_update = cfg.algorithm.one_step_off_policy or not cfg.rollout.enable_sleep_mode
    with_engine = engine_stages(cfg)
    gpus = []
    stages = sorted({0, layout.pp - 1})
    for stage in stages:
        parts = activation_bytes(shape, layout, spec, stage)
        held = in_flight_micro_batches(layout, stage) * (parts["layers"] + parts["embedding"] + parts["final_norm"])
        lines = {**static_bytes(shape, layout, stage), "activations": held, "runtime": int(LEARNER_RUNTIME_GB * GiB)}
        transients = {"logits": parts["logits_peak"], "backward": parts["backward"]}
        gpus.append(GPUPlan(stage=stage, engine=stage in with_engine, lines=lines, transients=transients,
                            engine_awake=engine_awake, engine_asleep=int(ENGINE_ASLEEP_GB * GiB),
                            engine_awake_in_update=awake_in_update,
                            weight_sync=cfg.rollout.weight_sync_bucket_mb * 1024**2))
    rows, longest = layout.padded_shape
    return MemoryPlan(gpus=gpus, gpu_memory=gpu_memory, layout=layout, spec=spec,
                      tokens_per_micro_batch=rows * longest)


def host_memory_gb_per_node(shape: ModelShape, cfg: RunConfig) -> float:
    """Host RAM one learner node needs: each sleeping engine's weights offloaded to host (level 1) plus its
    process, the learner ranks, the reward workers of each engine host, and headroom; for the SLURM request."""
    parallel = cfg.parallel
    engines = getattr(cfg.rollout, "engines_per_node", None) or parallel.ranks_per_node
    weights_gb = shape.parameters * DTYPE_BYTES[str(cfg.model.params_dtype)] / GiB
    per_engine = weights_gb + ENGINE_HOST_GB + cfg.reward.workers * REWARD_WORKER_HOST_GB
    return math.ceil(HOST_HEADROOM * (engines * per_engine + parallel.ranks_per_node * LEARNER_RANK_HOST_GB))


def suggestions(plan: MemoryPlan) -> list[str]:
    """The keys that would shrink the worst GPU's largest parts, in the order they help most."""
    layout, gpu = plan.layout, plan.worst
    hints = []
    if gpu.lines["optimizer"] > 0.1 * plan.gpu_memory and not layout.distributed_optimizer and layout.dp > 1:
        hints.append("parallel.use_distributed_optimizer=true (optimizer state ÷ parallel.data; needs TE/Apex)")
    if gpu.lines["activations"] + gpu.transients["backward"] > 0.2 * plan.gpu_memory:
        if layout.recompute != Recompute.full:
            hints.append("parallel.recompute=full (keep one hidden state per layer, recompute in backward)")
        if layout.tp > 1 and not layout.sequence_parallel:
            hints.append("parallel.sequence_parallel=true")
        if layout.micro_batch_tokens > 0:
            if layout.micro_batch_tokens > layout.seq_len:  # the smallest budget holds one longest sequence
                hints.append(f"algorithm.micro_batch_tokens smaller (≥ {layout.seq_len}, the longest sequence)")
        elif layout.micro_batch_size > 1:
            hints.append("algorithm.micro_batch_size=1")
    if gpu.transients["logits"] > 0.1 * plan.gpu_memory and not layout.logprob_chunk_tokens:
        hints.append("parallel.logprob_chunk_tokens=4096 (log-probs in chunks; only the bf16 logits stay)")
    if gpu.static + gpu.lines["activations"] > 0.4 * plan.gpu_memory:
        hints.append("parallel.tensor / parallel.pipeline larger (everything per GPU ÷ TP; layers ÷ PP)")
    if gpu.engine and gpu.generation > plan.gpu_memory:
        hints.append("rollout.gpu_memory_utilization lower (the engine's share while generating)")
    return hints


def plan_table(plan: MemoryPlan, title: str = ""):
    """The plan as a rich Table: one column per distinct GPU (pipeline stage, engine or not), GiB."""
    from rich.table import Table

    table = Table(title=title or None, show_lines=False)
    table.add_column("per GPU (GiB)")
    for gpu in plan.gpus:
        name = f"stage {gpu.stage}" + (" + engine" if gpu.engine else "")
        table.add_column(name, justify="right")
    layout = plan.layout

    def row(label, values, style=None):
        table.add_row(label, *[f"{value / GiB:.1f}" for value in values], style=style)

    flight = [in_flight_micro_batches(layout, gpu.stage) for gpu in plan.gpus]
    grad_kind = "fp32" if layout.grad_reduce_in_fp32 else "params_dtype"
    opt_kind = f"÷ DP={layout.dp}, distributed" if layout.distributed_optimizer else "not sharded"
    row("parameters", [gpu.lines["parameters"] for gpu in plan.gpus])
    row(f"gradients (main_grad, {grad_kind})", [gpu.lines["gradients"] for gpu in plan.gpus])
    row(f"optimizer (Adam m, v + fp32 master; {opt_kind})", [gpu.lines["optimizer"] for gpu in plan.gpus])
    recompute = {Recompute.none: "no recompute", Recompute.selective: "selective recompute",
                 Recompute.full: f"full recompute, {layout.recompute_num_layers} layer(s)/chunk"}[layout.recompute]
    row(f"activations held ({'/'.join(map(str, flight))} micro-batch(es) in flight, {recompute}"
        f"{', SP' if layout.sequence_parallel else ''}{', packed' if layout.pack_sequences else ''})",
        [gpu.lines["activations"] for gpu in plan.gpus])
    chunk = f"chunks of {layout.logprob_chunk_tokens} tokens" if layout.logprob_chunk_tokens else "unchunked"
    row(f"  + logits & log-prob peak ({chunk}) or", [gpu.transients["logits"] for gpu in plan.gpus])
    row("  + backward of one layer/recomputed chunk (larger counts)",
        [gpu.transients["backward"] for gpu in plan.gpus])
    row("CUDA context, NCCL, fragmentation (assumed)", [gpu.lines["runtime"] for gpu in plan.gpus])
    asleep = "awake: off-policy/no sleep" if plan.gpus[0].engine_awake_in_update else "asleep, level 1"
    row(f"vLLM engine during the update ({asleep})", [gpu.engine_in_update for gpu in plan.gpus])
    row("= learner peak", [gpu.learner_peak for gpu in plan.gpus], style="bold")
    row("vLLM engine awake (gpu_memory_utilization) + sync bucket",
        [gpu.engine_awake + gpu.weight_sync if gpu.engine else 0 for gpu in plan.gpus])
    row("= generation (learner static + context + engine)", [gpu.generation for gpu in plan.gpus], style="bold")
    verdicts = ["fits" if gpu.peak <= plan.gpu_memory else "DOES NOT FIT" for gpu in plan.gpus]
    table.add_row(f"GPU memory {plan.gpu_memory / GiB:.0f} GiB (parallel.gpu_memory_gb)", *verdicts,
                  style="green" if plan.fits else "bold red")
    return table


def describe(plan: MemoryPlan) -> str:
    """One line: layout and the worst case the activations are sized for."""
    layout = plan.layout
    rows, longest = layout.padded_shape
    if layout.micro_batch_tokens > 0:
        worst = (f"micro_batch_tokens={layout.micro_batch_tokens} (rows × longest; the longest sequence, max prompt + "
                 f"max response, is {layout.seq_len}): {rows} × {longest}")
    else:
        worst = f"micro_batch_size={layout.micro_batch_size} × {layout.seq_len} tokens (max prompt + max response)"
    packing = ("packed (THD: the layers see the real tokens, the loss the right-padded logits)"
               if layout.pack_sequences else "right-padded")
    return (f"TP={layout.tp} PP={layout.pp} DP={layout.dp}, {plan.spec} spec, params {layout.param_bytes * 8}-bit; "
            f"activations for the worst case {worst} = {plan.tokens_per_micro_batch} tokens, {packing}")


def check_layout(shape: ModelShape, cfg: RunConfig) -> None:
    """What megatron would refuse on every rank after init, named by its key."""
    layers_per_stage = shape.num_layers // cfg.parallel.pipeline
    if cfg.parallel.recompute == Recompute.full and cfg.parallel.recompute_num_layers > layers_per_stage:
        raise ValueError(f"parallel.recompute_num_layers={cfg.parallel.recompute_num_layers} must be at most the "
                         f"{layers_per_stage} layers of one pipeline stage (num_hidden_layers={shape.num_layers} / "
                         f"parallel.pipeline={cfg.parallel.pipeline})")


def memory_warning(shape: ModelShape, cfg: RunConfig) -> str | None:
    """preflight's warning when the estimate (TE spec) exceeds parallel.gpu_memory_gb, naming the keys to change;
    None when it fits."""
    plan = estimate(shape, cfg, spec="te")
    if plan.fits:
        return None
    gpu = plan.worst
    when = "generation" if gpu.generation >= gpu.learner_peak else "the update"
    where = f"pipeline stage {gpu.stage}" + (" (with its vLLM engine)" if gpu.engine else "")
    return (f"the learner's memory plan needs ~{gpu.peak / GiB:.0f} GiB per GPU during {when} on {where}, "
            f"more than parallel.gpu_memory_gb={cfg.parallel.gpu_memory_gb:g} ({describe(plan)}). "
            f"Change: {'; '.join(suggestions(plan))}. Table: python tools/plan_memory.py <the same overrides>")
