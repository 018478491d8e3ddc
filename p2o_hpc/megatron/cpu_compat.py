"""Run megatron-core on a CPU-only machine (gloo backend) without forking it.

megatron-core assumes CUDA everywhere. This module is switched on by :func:`enable` only when
``torch.cuda.is_available()`` is False; on a GPU machine :func:`enable` returns False and changes nothing.
Each patch and why:

1. ``CpuDeviceMode`` (a ``torch.overrides.TorchFunctionMode``, pushed once for the process): rewrites every
   ``device=`` argument that names CUDA (``"cuda"``, ``"cuda:N"``, ``torch.device("cuda")`` or a bare int,
   which megatron gets from ``torch.cuda.current_device()``) to ``"cpu"``, makes ``Tensor.cuda()`` a no-op and
   ``Tensor.to(<cuda device>)`` stay on CPU. One generic mechanism instead of patching the ~100 call sites.
   It also answers ``Tensor.type()`` with the CUDA type name (``torch.cuda.FloatTensor``): megatron's optimizer
   and grad clipping compare against those strings and raise for anything else.
2. ``torch.cuda.current_device`` returns 0 (then rewritten to CPU by 1); ``torch.cuda.synchronize``,
   ``empty_cache``, ``set_device`` become no-ops: on a CPU build they raise "Torch not compiled with CUDA".
3. The CUDA RNG tracker (``tensor_parallel.random.CudaRNGStatesTracker``) is replaced by
   :class:`CpuRNGStatesTracker`, which keeps a real CPU generator state per name, so ``fork("model-parallel-rng")``
   still gives each TP rank its own dropout stream and data-parallel state stays shared, as megatron intends.
   The module-level ``_get_cuda_rng_state``/``_set_cuda_rng_state`` (used by activation recomputation) and
   ``torch.cuda.manual_seed``/``get_rng_state``/``set_rng_state`` are pointed at the CPU generator: on CPU the
   "device generator" *is* the CPU generator.
4. With ``P2O_DEVICE_CHECK=1``, :mod:`p2o_hpc.megatron.device_check` goes on top: it fails where a GPU run would
   find a host tensor next to a device tensor, which the rewriting in 1 otherwise hides.
5. Backward under the device mode (:func:`run_backward_under_device_mode`, switched on by the model provider for
   sequence parallelism and recomputation, whose backward makes CUDA tensors: torch runs the autograd engine
   outside the mode otherwise).
6. Not patched: the torch-AdamW fallback optimizer's distributed-optimizer checkpointing (a shared 0-dim
   ``step``). :func:`p2o_hpc.megatron.training.build_learner` refuses that combination and uses megatron's plain
   (non-distributed) optimizer, which checkpoints and resumes exactly on the fallback.

Every replaced megatron symbol is asserted to exist at import, so a megatron-core upgrade that renames one fails
loudly here instead of silently running CUDA code paths.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch.overrides import TorchFunctionMode

from megatron.core.tensor_parallel import random as mcore_random

from p2o_hpc.megatron import device_check
from p2o_hpc.megatron.device_check import is_cuda_device


log = logging.getLogger(__name__)

_REPLACED_MEGATRON_SYMBOLS = ("CudaRNGStatesTracker", "_get_cuda_rng_state", "_set_cuda_rng_state", "initialize_rng_tracker")
for _symbol in _REPLACED_MEGATRON_SYMBOLS:
    assert hasattr(mcore_random, _symbol), (
        f"megatron.core.tensor_parallel.random.{_symbol} no longer exists: the CPU compat layer "
        f"(p2o_hpc/megatron/cpu_compat.py) must be updated for this megatron-core version"
    )

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}

_enabled = False


def _cpu_if_cuda(device):
    return torch.device("cpu") if is_cuda_device(device) else device


class CpuDeviceMode(TorchFunctionMode):
    """Redirects CUDA device placement to the CPU for everything torch dispatches."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            tensor = args[0]
            return _CUDA_TYPE_NAMES.get(tensor.dtype) or func(*args)
        if func is torch.Tensor.to:
            # .to(device), .to(device, dtype), .to(tensor) or .to(dtype): only the first positional may be a device.
            if len(args) > 1 and is_cuda_device(args[1]):
                args = (args[0], torch.device("cpu"), *args[2:])
        if "device" in kwargs and kwargs["device"] is not None:
            kwargs = {**kwargs, "device": _cpu_if_cuda(kwargs["device"])}
        return func(*args, **kwargs)


class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """Megatron's named RNG tracker with CPU generator states in place of CUDA ones."""

    def __init__(self, use_cudagraphable_rng=False, is_inference_rng_tracker=False):
        super().__init__(use_cudagraphable_rng=False, is_inference_rng_tracker=is_inference_rng_tracker)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        original = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(original)

    @contextlib.contextmanager
    def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer_state = torch.get_rng_state()
        outer_name = self._current_state_name
        if outer_name != "default-rng":
            self.states_[outer_name] = outer_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            if self._current_state_name != name:
                raise Exception(f"current rng state {self._current_state_name} is not {name}")
            self.states_[name] = torch.get_rng_state()
            if outer_name != "default-rng":
                outer_state = self.states_[outer_name]
            torch.set_rng_state(outer_state)
            self._current_state_name = outer_name


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _seed_cpu_generator(seed):
    torch.default_generator.manual_seed(int(seed))


def _noop(*args, **kwargs):
    return None


def enable() -> bool:
    """Switch the compat layer on when CUDA is unavailable; returns whether it is active. Idempotent."""
    global _enabled
    if _enabled:
        return True
    if torch.cuda.is_available():
        return False

    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = _noop
    torch.cuda.empty_cache = _noop
    torch.cuda.set_device = _noop
    torch.cuda.device_count = lambda: 0
    torch.cuda.manual_seed = _seed_cpu_generator  # not torch.manual_seed: that calls cuda.manual_seed_all
    torch.cuda.get_rng_state = functools.partial(_cpu_get_rng_state)
    torch.cuda.set_rng_state = functools.partial(_cpu_set_rng_state)
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state

    mcore_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state
    mcore_random.initialize_rng_tracker(force_reset=True)

    CpuDeviceMode().__enter__()  # stays pushed for the life of the process
    if device_check.requested():  # P2O_DEVICE_CHECK=1: spawned ranks inherit it; pushed above CpuDeviceMode
        device_check.enable()
    _enabled = True
    log.info("megatron-core CPU compat layer enabled (gloo backend, CUDA calls mapped to CPU)")
    return True


def run_backward_under_device_mode() -> None:
    """On CPU, torch hands `torch.autograd.backward`/`grad` to the device mode (:class:`CpuDeviceMode`), which is
    popped while it handles them, so the backward pass runs without it.
    Plain training names no CUDA device in backward; sequence parallelism (megatron's linear layers allocate
    gather buffers there) and recomputation (forward code re-run there) do. So the autograd engine runs under the
    mode (a fresh one per backward, nested ones included). Idempotent; a no-op on GPU."""
    import torch.autograd

    run_backward = torch.autograd._engine_run_backward
    if not is_enabled() or getattr(run_backward, "under_device_mode", False):
        return

    def run_under_device_mode(*args, **kwargs):
        with CpuDeviceMode():
            return run_backward(*args, **kwargs)

    run_under_device_mode.under_device_mode = True
    torch.autograd._engine_run_backward = run_under_device_mode


def is_enabled() -> bool:
    return _enabled


def distributed_backend() -> str:
    """The torch.distributed backend that matches the device: nccl with CUDA, gloo on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"
