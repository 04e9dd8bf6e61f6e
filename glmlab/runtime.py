"""Where and how tensors run: device choice, autocast precision, CPU threads."""

from __future__ import annotations

import contextlib
import warnings

import torch

from glmlab.errors import ConfigError


def select_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA if present, else CPU; an explicit device that is not there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # PyTorch lists two dozen backends: say which ones glmlab runs on
        raise ConfigError(f"unknown device {name!r}", "use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"glmlab does not run on {device.type!r} devices", "use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available here",
                          "use train.device=auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' was asked for but is not available here", "use train.device=auto or cpu")
    return device


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has AMX tiles enabled, the one case where bf16 matmuls beat fp32 on a CPU.

    AVX512-BF16 alone is not enough: measured on a 2-core Sapphire Rapids VM whose kernel does not
    expose AMX, a 1024x1024 bf16 matmul ran at 169 GFLOP/s against 327 GFLOP/s in fp32.
    """
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a PyTorch without the check
        return False


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` on ``device``; None means plain fp32."""
    if name == "fp32":
        return None
    if device.type == "cuda":
        if name == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if name == "bf16" else torch.float16
    if name == "fp16":
        raise ConfigError(f"fp16 autocast needs a CUDA device, not {device.type}",
                          "use train.precision=bf16 or fp32 on this device")
    if name == "auto":
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None
    if device.type == "cpu" and not cpu_has_fast_bf16():
        warnings.warn("this CPU exposes no AMX tiles; bf16 autocast is likely slower than fp32 here", stacklevel=2)
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """An autocast context for ``dtype`` on ``device``, or a no-op for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
