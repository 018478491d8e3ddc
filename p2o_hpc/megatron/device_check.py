"""A strict "virtual device" for the CPU: a CPU run fails where a GPU run would find tensors on two devices.

The CPU compat layer (:mod:`p2o_hpc.megatron.cpu_compat`) maps every CUDA placement to the CPU, so a tensor that a
GPU run would leave on the host (a micro-batch never moved to the device, a receive buffer allocated without
``device=``) works here and fails at the first GPU run. This check tags each tensor with where a GPU run keeps it
and raises :class:`DeviceMismatchError` where the GPU would raise:

- **device**: made with a CUDA ``device=`` (``"cuda"``, ``"cuda:N"``, an int such as ``torch.cuda.current_device()``)
  or moved by ``.cuda()`` / ``.to(<cuda>)``; every parameter and buffer of a megatron ``GPTModel`` (a GPU run builds
  it on the device: Transformer-Engine layers, ``use_cpu_initialization=False``; the CPU build initialises on the
  host, so the check places the finished model and does not judge what runs inside its constructor).
- **host**: made by a factory (``torch.tensor``, ``zeros``, ``arange``, …) without a CUDA device, or moved by
  ``.cpu()`` / ``.to("cpu")``.
- **unknown**: made outside the check's sight (autograd in C++, TorchScript): compatible with anything.

An op's outputs are device if an input is, host if its tagged inputs are all host. A ``torch.device`` read from a
tensor (``x.device``, CPU on this machine) places like that tensor; any other CPU ``torch.device`` object is unknown.

Errors: an op mixing a host tensor of dim ≥ 1 with a device tensor (CUDA takes host 0-dim scalars only), except
:data:`_CROSS_DEVICE_OPS`; and a host tensor in a tensor collective of ``torch.distributed`` (``broadcast``,
``all_reduce``, ``send``, ``batch_isend_irecv``, …) over a group that is NCCL on a GPU. Groups made by
``new_group(backend="gloo")`` while the check is on (megatron's ``*_gloo`` groups, the control group) are gloo on a
GPU too and carry host tensors. Only the package attributes (``torch.distributed.X``) are wrapped, not
``distributed_c10d``'s globals, so the object collectives' internals are not checked.

Off by default (it costs Python work per op). :func:`enable` switches it on for the process, after
``cpu_compat.enable()`` (which calls it when ``P2O_DEVICE_CHECK=1``, so spawned ranks inherit it from the
environment) and before the process groups are made; :func:`checking` for a block. It never runs with CUDA: there
the device itself checks.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import os
import weakref

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode, resolve_name


ENV_VAR = "P2O_DEVICE_CHECK"
DEVICE, HOST = "device", "host"

_placements: dict[int, tuple[weakref.ref, str]] = {}  # id(tensor) -> (weak ref, DEVICE | HOST)
_device_objects: collections.OrderedDict = collections.OrderedDict()  # id(torch.device) -> (object, placement)
_DEVICE_OBJECTS_KEPT = 1024  # `x.device` results remembered (kept alive, so their ids stay unique)
_gloo_groups: list = []
_suspended = 0  # > 0 while a megatron model is being built: no errors, tags only
_enabled = False

FACTORIES = frozenset({
    torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.linspace,
    torch.logspace, torch.eye, torch.rand, torch.randn, torch.randint, torch.randperm, torch.empty_strided,
    torch.scalar_tensor, torch.from_numpy, torch.frombuffer, torch.tril_indices, torch.triu_indices,
})

# Ops that CUDA runs across devices, and why each is safe:
#   copy_              copies between any two devices.
#   __getitem__        a device tensor indexed by host index tensors (indexing moves them).
#   __setitem__        host index tensors likewise; a host value only through basic indexing (which is a copy_).
#                      Both are checked by _check_indexing.
#   data.__set__       `.data = ` rebinds a tensor to other storage (Module._apply, DDP buffers); it is retagged.
#   new_tensor         copies its data onto the tensor's own device.
_CROSS_DEVICE_OPS = frozenset({torch.Tensor.copy_, torch.Tensor.__getitem__, torch.Tensor.__setitem__,
                               torch.Tensor.data.__set__, torch.Tensor.new_tensor})
_MOVES = frozenset({torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu})
_READ_DEVICE, _SET_DATA = torch.Tensor.device.__get__, torch.Tensor.data.__set__  # equal, not identical, per access

COLLECTIVES = ("broadcast", "all_reduce", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv",
               "isend", "irecv")


class DeviceMismatchError(RuntimeError):
    """A GPU run would fail here: a host tensor meets a device tensor, or goes over an NCCL group."""


# ----------------------------------------------------------------------------------------------- placements


def placement(tensor: torch.Tensor) -> str | None:
    """DEVICE, HOST, or None (unknown)."""
    entry = _placements.get(id(tensor))
    return entry[1] if entry is not None and entry[0]() is tensor else None


def place(tensor: torch.Tensor, where: str | None) -> None:
    """Tag `tensor` (None forgets it)."""
    key = id(tensor)
    if where is None:
        _placements.pop(key, None)
        return
    entry = _placements.get(key)
    if entry is not None and entry[0]() is tensor:
        _placements[key] = (entry[0], where)
        return
    _placements[key] = (weakref.ref(tensor, functools.partial(_forget, key)), where)


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _placements.get(key)
    if entry is not None and entry[0] is ref:
        del _placements[key]


def is_cuda_device(device) -> bool:
    """Whether a `device=` / `.to()` argument names CUDA (a bare int is a CUDA index, as megatron passes it)."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


def _device_placement(device) -> str | None:
    """Where a `device=` / `.to()` argument puts a tensor on a GPU; None when that cannot be known."""
    if is_cuda_device(device):
        return DEVICE
    if isinstance(device, str):
        return HOST if device.split(":")[0] == "cpu" else None
    if isinstance(device, torch.device):
        entry = _device_objects.get(id(device))
        return entry[1] if entry is not None and entry[0] is device else None
    return None


def _remember_device_object(device: torch.device, where: str) -> None:
    _device_objects[id(device)] = (device, where)
    if len(_device_objects) > _DEVICE_OBJECTS_KEPT:
        _device_objects.popitem(last=False)


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    if isinstance(tree, dict):
        return [t for item in tree.values() for t in _tensors(item)]
    return []


def _shapes(tensors) -> str:
    return ", ".join(str(tuple(t.shape)) for t in tensors)


def _name(func) -> str:
    return resolve_name(func) or getattr(func, "__qualname__", repr(func))


# ------------------------------------------------------------------------------------------------- the mode


def _check_mixing(func, inputs: list[torch.Tensor]) -> str | None:
    """The outputs' placement; raises when host tensors of dim ≥ 1 meet device tensors."""
    on_device = [t for t in inputs if placement(t) == DEVICE]
    on_host = [t for t in inputs if placement(t) == HOST]
    if on_device and not _suspended:
        host_arrays = [t for t in on_host if t.dim() > 0]
        if host_arrays:
            raise DeviceMismatchError(
                f"{_name(func)}: host tensor(s) of shape {_shapes(host_arrays)} with device tensor(s) of shape "
                f"{_shapes(on_device)}. On a GPU this op fails (tensors on cpu and cuda); put the host tensor on "
                "torch.cuda.current_device() first")
    return DEVICE if on_device else HOST if on_host else None


def _check_indexing(func, args) -> None:
    """Host index tensors into a device tensor are fine; device indices into a host tensor, or a host value put
    at tensor indices (index_put_, unlike a basic-index copy_), are not."""
    target, index_tensors = args[0], _tensors(args[1])
    if _suspended:
        return
    if placement(target) == HOST and any(placement(t) == DEVICE for t in index_tensors):
        raise DeviceMismatchError(
            f"{_name(func)}: a host tensor of shape {tuple(target.shape)} indexed by device tensors. On a GPU this "
            "fails (indices on cuda, self on cpu); put the tensor on torch.cuda.current_device() first")
    value = args[2] if func is torch.Tensor.__setitem__ else None
    if (index_tensors and isinstance(value, torch.Tensor) and placement(target) == DEVICE
            and placement(value) == HOST and value.dim() > 0):
        raise DeviceMismatchError(
            f"{_name(func)}: a host value of shape {tuple(value.shape)} put into a device tensor of shape "
            f"{tuple(target.shape)} at tensor indices. On a GPU index_put_ fails (values on cpu, self on cuda); "
            "put the value on torch.cuda.current_device() first")


def _move(func, args, kwargs):
    """.cuda() / .cpu() / .to(...): a move to the other side returns a new tensor (as on a GPU), tagged anew."""
    source = args[0]
    if func is torch.Tensor.cuda:
        target = DEVICE
    elif func is torch.Tensor.cpu:
        target = HOST
    else:
        destination = kwargs.get("device")
        if len(args) > 1 and not isinstance(args[1], torch.dtype):
            destination = args[1]
        if destination is None:  # a dtype conversion stays where it is
            result = func(*args, **kwargs)
            if result is not source:
                place(result, placement(source))
            return result
        target = placement(destination) if isinstance(destination, torch.Tensor) else _device_placement(destination)
    result = func(*args, **kwargs)
    if placement(source) == target:
        return result
    if result is source:  # the compat layer keeps it where it is; a GPU would copy it
        result = result.clone() if target is not None else result.view_as(result)
    place(result, target)
    return result


class DeviceCheckMode(TorchFunctionMode):
    """Tags tensors with their GPU placement and raises where a GPU would (see the module doc).

    Must sit above cpu_compat's CpuDeviceMode on the mode stack (pushed after it), to see CUDA `device=` arguments
    before they are rewritten to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MOVES:
            return _move(func, args, kwargs)
        if func == _READ_DEVICE:
            device = func(*args)
            where = placement(args[0])
            if where is not None:
                _remember_device_object(device, where)
            return device
        if func == _SET_DATA:
            func(*args, **kwargs)
            place(args[0], placement(args[1]))
            return None
        inputs = _tensors(args) + _tensors(kwargs)
        if kwargs.get("device") is not None:
            target = _device_placement(kwargs["device"])
        elif func in FACTORIES and not inputs:
            target = HOST
        elif func in _CROSS_DEVICE_OPS:
            if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
                _check_indexing(func, args)
            target = placement(args[0])
        else:
            target = _check_mixing(func, inputs)
        result = func(*args, **kwargs)
        if target is not None and func not in (torch.Tensor.copy_, torch.Tensor.__setitem__):
            for output in _tensors(result):
                if placement(output) is None:
                    place(output, target)
        return result


# ------------------------------------------------------------------------------------------ collectives


def _check_transfer(name: str, group, tensors: list[torch.Tensor]) -> None:
    if _suspended or any(group is gloo for gloo in _gloo_groups):
        return
    on_host = [t for t in tensors if placement(t) == HOST]
    if on_host:
        raise DeviceMismatchError(
            f"torch.distributed.{name}: host tensor(s) of shape {_shapes(on_host)} over "
            f"{'the default group' if group is None else 'a megatron/NCCL group'}. On a GPU NCCL carries device "
            "tensors only; put them on torch.cuda.current_device(), or use a gloo group (the control group)")


def _checked_collective(name: str, original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def checked(*args, **kwargs):
        try:
            arguments = signature.bind(*args, **kwargs).arguments
        except TypeError:
            return original(*args, **kwargs)  # let torch report the bad call
        _check_transfer(name, arguments.get("group"), _tensors(list(arguments.values())))
        return original(*args, **kwargs)

    return checked


def _checked_batch_isend_irecv(original):
    @functools.wraps(original)
    def checked(p2p_op_list):
        for op in p2p_op_list:
            _check_transfer("batch_isend_irecv", op.group, [op.tensor])
        return original(p2p_op_list)

    return checked


def _recording_new_group(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def new_group(*args, **kwargs):
        group = original(*args, **kwargs)
        backend = signature.bind(*args, **kwargs).arguments.get("backend")
        if backend is not None and str(backend).lower() == "gloo":
            _gloo_groups.append(group)
        return group

    return new_group


def _p2p_op_class(p2p_op: type, unwrap: dict) -> type:
    """torch.distributed.P2POp taking the wrapped isend/irecv (megatron passes `torch.distributed.isend`): torch
    compares `op` with its own functions, so it gets those back; batch_isend_irecv checks the tensors."""

    class CheckedP2POp(p2p_op):
        def __new__(cls, op, *args, **kwargs):
            return super().__new__(cls, unwrap.get(op, op), *args, **kwargs)

        def __init__(self, op, *args, **kwargs):
            super().__init__(unwrap.get(op, op), *args, **kwargs)

    return CheckedP2POp


def _building_on_device(init):
    """GPTModel's constructor: a GPU run builds the model on the device (see the module doc)."""

    @functools.wraps(init)
    def build(self, *args, **kwargs):
        global _suspended
        _suspended += 1
        try:
            init(self, *args, **kwargs)
        finally:
            _suspended -= 1
        for tensor in [*self.parameters(), *self.buffers()]:
            place(tensor, DEVICE)

    return build


def _install() -> dict:
    """Wrap torch.distributed's tensor collectives, new_group, P2POp and GPTModel.__init__; returns the originals."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    originals = {name: getattr(dist, name) for name in (*COLLECTIVES, "batch_isend_irecv", "new_group", "P2POp")}
    originals["GPTModel.__init__"] = GPTModel.__init__
    wrapped = {name: _checked_collective(name, originals[name]) for name in COLLECTIVES}
    wrapped["batch_isend_irecv"] = _checked_batch_isend_irecv(originals["batch_isend_irecv"])
    wrapped["new_group"] = _recording_new_group(originals["new_group"])
    unwrap = {wrapped[name]: originals[name] for name in ("isend", "irecv")}
    wrapped["P2POp"] = _p2p_op_class(originals["P2POp"], unwrap)
    for name, wrapper in wrapped.items():
        setattr(dist, name, wrapper)
    GPTModel.__init__ = _building_on_device(originals["GPTModel.__init__"])
    return originals


def _uninstall(originals: dict) -> None:
    from megatron.core.models.gpt.gpt_model import GPTModel

    GPTModel.__init__ = originals.pop("GPTModel.__init__")
    for name, original in originals.items():
        setattr(dist, name, original)
    _gloo_groups.clear()


# ---------------------------------------------------------------------------------------------- switches


def requested() -> bool:
    return os.environ.get(ENV_VAR, "") not in ("", "0")


@contextlib.contextmanager
def checking():
    """The check for one block (tests); the CPU compat mode must be active around it."""
    if torch.cuda.is_available():
        yield
        return
    originals = _install()
    try:
        with DeviceCheckMode():
            yield
    finally:
        _uninstall(originals)


def enable() -> bool:
    """Switch the check on for the life of the process (after cpu_compat.enable()); False with CUDA. Idempotent."""
    global _enabled
    if _enabled:
        return True
    if torch.cuda.is_available():
        return False
    _install()
    DeviceCheckMode().__enter__()  # stays pushed, above cpu_compat's CpuDeviceMode
    _enabled = True
    return True


def is_enabled() -> bool:
    return _enabled
