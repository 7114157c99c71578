"""Emulated CUDA for tests without a GPU: tensors that say `cuda:N` and compute on the CPU.

Why not `FakeTensorMode` (research/platform.md §7)? A fake tensor has no values, so every host read fails,
and the code under test reads the host on every path that matters: the Qwen vision towers call
`image_grid_thw.tolist()` (transformers' vision position ids), Qwen3-VL calls `repeat_interleave` with
tensor counts, lite-srpo reads `bool(attention_mask.all())` (`activation_memory.attention_padding`) and HF
`generate` reads `.item()` to stop. With an image in the prompt neither the rollout nor a scoring pass runs
there. Here an emulated tensor is a storage-less wrapper (`device=cuda:N`, its own dtype and shape) around
a CPU tensor that holds its values; a TorchFunctionMode runs every torch call on the CPU tensors and wraps
the results back as `cuda:N`. The mode sits above torch's argument parser, so `device="cuda"` never reaches
CUDA's lazy init, and above autograd and the device guards that need a driver.

What it checks as CUDA would:
- placement: an op that mixes a cuda tensor with a CPU tensor of one or more dims (or two cuda devices)
  raises torch's "Expected all tensors to be on the same device" (0-dim CPU tensors pass, as on CUDA);
  copies (`to`, `copy_`, indexing with CPU indices, `x[i] = cpu`) cross devices as on CUDA; a CPU
  `generator` for a cuda tensor is refused, as CUDA refuses it;
- dtypes: the CPU kernels keep them (a bf16 model stays bf16);
- host reads: `.numpy()` of a cuda tensor raises; `.cpu()`, `.item()`, `.tolist()` give values (a sync on a GPU).
What it does not do: CUDA kernels or their numerics (values are the CPU kernels'); the CUDA RNG (random
ops on cuda draw from the CPU generator); autograd (refused with grad on: computing on the inner CPU
tensors would silently drop every gradient); streams, events, pinned memory, the caching allocator, and
the `torch.cuda.*` queries (they still say "no GPU": tests stand in for them by name); tensor subclasses
built with `Tensor._make_subclass`, i.e. bitsandbytes' `Params4bit` (4-bit weights cannot be emulated).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

_T = torch.Tensor


class CudaTensor(torch.Tensor):
    """A tensor on `cuda:index` whose values live in the CPU tensor `cpu_data` (same shape, dtype, strides)."""

    cpu_data: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor, index: int) -> "CudaTensor":
        if isinstance(data, CudaTensor):
            raise TypeError("fake_cuda: a CudaTensor cannot wrap another one")
        t = torch.Tensor._make_wrapper_subclass(cls, data.size(), strides=data.stride(),
                                                storage_offset=data.storage_offset(), dtype=data.dtype,
                                                layout=data.layout, device=torch.device("cuda", index),
                                                requires_grad=data.requires_grad)
        t.cpu_data = data
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206 - torch's signature
        raise RuntimeError(f"fake_cuda: {func} reached torch's dispatcher with an emulated cuda tensor (used "
                           "outside `fake_cuda()`, or by a path the emulation does not cover)")

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"CudaTensor(device='{self.device}', {self.cpu_data!r})"


def is_emulated_cuda(t: Any) -> bool:
    return isinstance(t, CudaTensor)


# Metadata answered by the wrapper itself (device, autograd flags), never by its CPU values.
_ON_WRAPPER = {_T.device.__get__, _T.is_cuda.__get__, _T.is_cpu.__get__, _T.get_device,
               torch._has_compatible_shallow_copy_type, _T.requires_grad_, _T.requires_grad.__get__,
               _T.requires_grad.__set__, _T.grad.__get__, _T.grad.__set__, _T.is_leaf.__get__, _T.grad_fn.__get__,
               _T._make_wrapper_subclass, _T.__repr__, _T.__hash__}
# Host reads: a device-to-host sync on a GPU, the CPU values here.
_HOST_READS = {_T.item, _T.tolist, _T.__bool__, _T.__int__, _T.__float__, _T.__index__, _T.__format__}
# Calls that may take tensors on different devices, as CUDA allows them to.
_CROSS_DEVICE = {_T.to, _T.cuda, _T.cpu, _T.copy_, _T.__getitem__, _T.__setitem__}
# Calls that never record autograd history, so they may run with grad on.
_NO_AUTOGRAD = {_T.data.__get__, _T.detach, _T.detach_, _T.is_floating_point, _T.is_complex, _T.dim, _T.size,
                _T.shape.__get__, _T.dtype.__get__, _T.numel, _T.element_size, _T.stride, _T.is_contiguous}


class FakeCuda(TorchFunctionMode):
    """The mode itself: inside it, `device="cuda"` makes emulated tensors and torch calls run on their values.

    `cuda` without an index means the current device: `torch.cuda.current_device()` when
    `torch.cuda.is_available()` says so (a test's stand-in for a node with GPUs), else 0."""

    def __enter__(self) -> "FakeCuda":
        # Module.to() of a CPU module: put new Parameters in place (the default `.data =` swap would keep a
        # CPU-typed Parameter object around an emulated tensor).
        self._overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.__future__.set_overwrite_module_params_on_conversion(self._overwrite)
        super().__exit__(*exc)

    @staticmethod
    def _index(device: Any) -> int | None:
        """The cuda index `device` names (None for a CPU device)."""
        if isinstance(device, int):
            return device
        d = torch.device(device)
        if d.type != "cuda":
            return None
        if d.index is not None:
            return d.index
        return torch.cuda.current_device() if torch.cuda.is_available() else 0

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        cuda = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, CudaTensor)]
        if func in _ON_WRAPPER or (not cuda and func not in (_T.to, _T.cuda) and kwargs.get("device") is None):
            return func(*args, **kwargs)
        if func in _HOST_READS and cuda:
            return func(args[0].cpu_data, *args[1:], **kwargs)
        if func is _T.numpy and cuda:
            raise TypeError(f"can't convert {args[0].device} device type tensor to numpy. Use Tensor.cpu() to "
                            "copy the tensor to host memory first.")
        if func == _T.data.__set__ and cuda:
            return self._set_data(*args)
        out_index = cuda[0].device.index if cuda else None
        if func is _T.to:
            out_index, args, kwargs = self._to_args(args, kwargs, out_index)
            if out_index is not None and isinstance(args[0], CudaTensor) and args[0].device.index == out_index \
                    and kwargs.get("dtype") in (None, args[0].dtype) and not kwargs.get("copy"):
                return args[0]  # already there: `.to` returns the tensor itself
        elif func is _T.cuda:
            device = args[1] if len(args) > 1 else kwargs.get("device")
            out_index = self._index("cuda" if device is None else device)
            if isinstance(args[0], CudaTensor) and args[0].device.index == out_index:
                return args[0]
            func, args, kwargs = _T.clone, args[:1], {}
        elif func is _T.cpu:
            out_index = None
        elif kwargs.get("device") is not None:
            out_index = self._index(kwargs["device"])
            if out_index is not None:  # only cuda is emulated: `meta` and `cpu` stay what they are
                kwargs["device"] = "cpu"
        if func not in _CROSS_DEVICE:
            _check_same_device(func, args, kwargs, cuda, out_index)
        if cuda and torch.is_grad_enabled() and func not in _NO_AUTOGRAD and any(t.requires_grad for t in cuda):
            raise RuntimeError(f"fake_cuda: {_name(func)} with grad on a cuda tensor that requires grad; the "
                               "emulation runs no-grad code only (run it under torch.no_grad())")
        return _run(func, args, kwargs, cuda, out_index)

    def _to_args(self, args: tuple, kwargs: dict, out_index: int | None) -> tuple[int | None, tuple, dict]:
        """`Tensor.to(...)` as (target cuda index or None, args, kwargs for the CPU call)."""
        copy = bool(kwargs.pop("copy", False))
        device, dtype, _non_blocking, fmt = torch._C._nn._parse_to(*args[1:], **kwargs)
        if device is not None:
            out_index = self._index(device)
        new = {"dtype": dtype, "memory_format": fmt, "device": device if out_index is None else None}
        new = {k: v for k, v in new.items() if v is not None}
        moves = out_index is not None and (not isinstance(args[0], CudaTensor) or args[0].device.index != out_index)
        if copy or moves:
            new["copy"] = True  # a copy to another device is a new tensor
        return out_index, args[:1], new

    @staticmethod
    def _set_data(dst: CudaTensor, src: Any) -> None:
        """`param.data = new` (e.g. `p.data = p.data.float()`): the wrapper's metadata and its values."""
        if not isinstance(src, CudaTensor) or src.device != dst.device:
            raise RuntimeError(f"fake_cuda: .data = a tensor on {getattr(src, 'device', None)} for a tensor on "
                               f"{dst.device}")
        _T.data.__set__(dst, src)
        dst.cpu_data = src.cpu_data


def _name(func: Callable) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or str(func)


def _check_same_device(func: Callable, args: tuple, kwargs: dict, cuda: list[CudaTensor],
                       out_index: int | None) -> None:
    """CUDA's rule: one device per op, except 0-dim CPU tensors (scalars); a CPU generator cannot draw cuda values."""
    flat = tree_flatten((args, kwargs))[0]
    devices = {f"cuda:{t.device.index}" for t in cuda}
    if any(isinstance(t, torch.Tensor) and not isinstance(t, CudaTensor) and t.dim() > 0 for t in flat):
        devices.add("cpu")
    if len(devices) > 1:
        a, b = sorted(devices)[:2]
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                           f"{a} and {b}! (in {_name(func)})")
    gen = kwargs.get("generator")
    if out_index is not None and isinstance(gen, torch.Generator) and gen.device.type != "cuda":
        raise RuntimeError(f"Expected a 'cuda' device type for generator but found '{gen.device.type}' "
                           f"(in {_name(func)})")


def _run(func: Callable, args: tuple, kwargs: dict, cuda: list[CudaTensor], out_index: int | None) -> Any:
    """Call `func` on the CPU values and wrap the tensors it returns on `cuda:out_index` (None: leave on CPU)."""
    by_id = {id(t.cpu_data): t for t in cuda}
    host_ids = {id(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and not isinstance(t, CudaTensor)}
    plain_args, plain_kwargs = tree_map(lambda t: t.cpu_data if isinstance(t, CudaTensor) else t, (args, kwargs))
    out = func(*plain_args, **plain_kwargs)
    if isinstance(out, torch.Size) or not any(isinstance(t, torch.Tensor) for t in tree_flatten(out)[0]):
        return out

    def wrap(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or isinstance(t, CudaTensor) or id(t) in host_ids:
            return t  # a CPU argument given back (`cpu_dst.copy_(cuda_src)`) stays the CPU tensor it is
        if id(t) in by_id:  # in place (`add_`, `copy_`, ...): the same object back; a device-to-host copy is new
            return by_id[id(t)] if out_index is not None else t.clone()
        return CudaTensor(t, out_index) if out_index is not None else t

    return tree_map(wrap, out)


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeCuda]:
    """`with fake_cuda(): ...` — inside, cuda tensors are emulated (see the module docstring)."""
    with FakeCuda() as mode:
        yield mode


def cuda_build() -> bool:
    """True for torch's CUDA build (what `pip install torch` gives), even with no GPU or driver here."""
    return torch.version.cuda is not None
