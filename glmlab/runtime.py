"""Where and how tensors run: device choice, autocast precision, CPU threads, the host allocator."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import time
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


FAST_BF16 = 1.5  # bf16 matmuls at least this many times fp32's speed make bf16 autocast the CPU's auto precision


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True where bf16 matmuls run clearly faster than fp32 on this CPU: AMX tiles, or a measured speed-up of at
    least ``FAST_BF16`` (once per process, ~50 ms). Flags alone do not tell: on a 2-core Sapphire Rapids VM whose
    kernel exposes AVX512-BF16 but no AMX, a 1024x1024 bf16 matmul ran at 169 GFLOP/s against 327 in fp32; on a
    2-core AMD EPYC VM with AVX512-BF16, at 459 against 73 (one thread)."""
    try:
        if torch.cpu._is_amx_tile_supported():
            return True
    except AttributeError:  # a PyTorch without the check
        pass
    return bf16_matmul_speedup() >= FAST_BF16


@functools.cache
def bf16_matmul_speedup(n: int = 256, repeats: int = 8) -> float:
    """How many times faster an n x n bf16 matmul runs than an fp32 one here (best of three timings of each, on
    the threads of the first call: measured once per process)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        for _ in range(2):  # the first calls pick and compile a kernel
            x @ y
        timings = []
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(repeats):
                x @ y
            timings.append(time.perf_counter() - start)
        best[dtype] = min(timings)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-9)


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
        warnings.warn(f"bf16 matmuls measured {bf16_matmul_speedup():.1f}x fp32's speed on this CPU (no AMX tiles); "
                      "bf16 autocast is likely slower than fp32 here", stacklevel=2)
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """An autocast context for ``dtype`` on ``device``, or a no-op for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_name(dtype: torch.dtype | None) -> str:
    return {dtype: name for name, dtype in PRECISIONS.items()}[dtype]


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
KEEP_FREED_BYTES = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse rather than hand it back to the OS at each free.

    PyTorch's CPU tensors come from malloc. With glibc's defaults, a fresh training process returns the top of its
    heap to the OS whenever more than 128 KiB of it is free, and takes it back, one page fault per 4 KiB, at the
    next allocation: measured on nanoGPT's recipe, ~1,600 page faults per step in a new process against ~1 once the
    heap had grown in a long-lived one. Raising the trim threshold to 1 GiB (and serving allocations up to 32 MiB,
    glibc's most, from the heap) keeps those pages. It holds for the whole process, not only its training; a no-op
    where the C library is not glibc. Once per process."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    kept = bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and kept
