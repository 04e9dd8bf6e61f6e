"""The `gpt` family's decoding step compiled ahead of time (AOTInductor): ``--compile-decode``.

TorchScript runs :func:`~glmlab.models.gpt_decode.decode_layers` (and ``decode_rows`` for rows at different
positions) one PyTorch call at a time (~70 per token on a 4 x 128 model). Here the step is exported with
``torch.export`` and compiled by inductor's C++ backend into a shared library: the weights are frozen into it, so
the matrix products become GEMMs generated for those matrices (``max_autotune`` picks them by timing), and the
layer norms, GELU, residual adds and the one-query attention are fused into a few vectorised loops. On a 2-core
AVX-512 CPU the 4 x 128 step fell from ~155 to ~70 us at batch 1 and from ~450 to ~250 us at batch 8
(benchmarks/README.md, "Compiled decoding").

The cost is a compilation (a C++ compiler, 15-30 s for a small model) per model, batch size, dtype and thread
count. Each compiled step is cached on disk under ``$GLMLAB_CACHE_DIR`` (default ``~/.cache/glmlab``), keyed by
all of those, the weights' bytes, the CPU, PyTorch's version and this file, so a second generation with the same
run loads it in about a second. A library holds the weights, some twice (as read and as packed for its GEMMs):
6.6 MB for a 4 x 128 model, 655 MB for GPT-2 small (compiled in 41-50 s); nothing evicts old ones. A step is
specialised to one batch size (a dynamic one ran batch 1 at 115 instead of 70 us) and one cache length; the
rows' positions are inputs and the span of keys read is dynamic.

The attention of the one new query is written as a product, a sum and a softmax (which inductor fuses) rather
than SDPA (which it would call as the flash kernel, slower at this size): the logits differ from the scripted
step's by rounding (~1e-6).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from glmlab.atomic import atomic_path, write_error
from glmlab.errors import GlmlabError
from glmlab.models.gpt_decode import DecodeWeights, LayerWeights

_INDUCTOR_SETTINGS = {"max_autotune": True, "freezing": True, "max_autotune_gemm_backends": "CPP,ATEN",
                      # (its tables of timings would go to the user's terminal)
                      "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
_SOURCE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


MIN_CACHE_LEN = 4  # a cache this long or longer has positions the step covers (1 .. max_len - 2)


def cache_dir() -> Path:
    """Where compiled steps are kept: ``$GLMLAB_CACHE_DIR/decode-steps`` (default ``~/.cache/glmlab``)."""
    root = os.environ.get("GLMLAB_CACHE_DIR") or Path.home() / ".cache" / "glmlab"
    return Path(root) / "decode-steps"


class DecodeStep(nn.Module):
    """:func:`~glmlab.models.gpt_decode.decode_rows` for every slot of a cache, in order, as a module to export: the
    weights are its buffers; the inputs are the new tokens (B,), each row's position (B,), a tensor whose length is
    the number of positions to attend to (the largest position + 1; its contents are unused: a length is what
    ``torch.export`` can keep dynamic) and each layer's (B, 2, n_head, max_len, head_dim) cache, where the step
    stores each row's new key and value at its position. Each row attends to its own positions only, so rows at
    one position (a batch of prompts of one length) and rows at several (prompts of different lengths) run the
    same library, as fast (measured within noise of a one-position form: 218-234 against 224-257 us at batch 8)."""

    def __init__(self, w: DecodeWeights, n_head: int, eps: float) -> None:
        super().__init__()
        self.n_head, self.eps, self.exact_gelu = n_head, eps, w.exact_gelu
        self.tied = w.head is w.wte  # GPT-2's tied output layer: one copy of the matrix in the library
        for name in ("wte", "wpe", "ln_f_weight", "ln_f_bias") + (() if self.tied else ("head",)):
            self.register_buffer(name, getattr(w, name).detach())
        for i, layer in enumerate(w.layers):
            for name, tensor in layer._asdict().items():
                self.register_buffer(f"layer{i}_{name}", tensor.detach())

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, span: torch.Tensor,
                *kv_layers: torch.Tensor) -> torch.Tensor:
        B, C, end = tokens.size(0), self.wte.size(1), span.size(0)
        hs = C // self.n_head
        x = (self.wte[tokens] + self.wpe[positions]).to(self.ln_f_weight.dtype)  # (B, C)
        rows = torch.arange(B, device=tokens.device)
        visible = (torch.arange(end, device=tokens.device)[None, :] <= positions[:, None])[:, None, :, None]
        for i, kv in enumerate(kv_layers):
            w = {name: getattr(self, f"layer{i}_{name}") for name in LayerWeights._fields}
            h = F.layer_norm(x, [C], w["ln_1_weight"], w["ln_1_bias"], self.eps)
            qkv = torch.addmm(w["attn_bias"], h, w["attn_weight"]).view(B, 3, self.n_head, hs)
            kv[rows, :, :, positions] = qkv[:, 1:]  # each row's k and v, stored together at its position
            k, v = kv.narrow(3, 0, end).unbind(1)  # (B, nh, end, hs)
            scores = (qkv[:, 0, :, None, :] * hs ** -0.5 * k).sum(-1, keepdim=True)  # (B, nh, end, 1)
            y = (torch.softmax(scores.masked_fill(~visible, float("-inf")), 2) * v).sum(2)  # (B, nh, hs)
            x = torch.addmm(w["attn_proj_bias"], y.reshape(B, C), w["attn_proj_weight"]) + x
            h = F.layer_norm(x, [C], w["ln_2_weight"], w["ln_2_bias"], self.eps)
            h = F.gelu(torch.addmm(w["fc_bias"], h, w["fc_weight"]), approximate="none" if self.exact_gelu else "tanh")
            x = torch.addmm(w["mlp_proj_bias"], h, w["mlp_proj_weight"]) + x
        head = self.wte if self.tied else self.head
        return F.linear(F.layer_norm(x, [C], self.ln_f_weight, self.ln_f_bias, self.eps), head)


@functools.cache
def _machine() -> str:
    """What the library's machine code depends on: inductor compiles for this CPU (``-march=native``), so a
    library built where AVX-512 exists would crash a CPU without it (a home directory shared between hosts)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()} {flags.strip()}"


def _key(w: DecodeWeights, n_head: int, eps: float, batch: int, max_len: int) -> str:
    """The cache key of a compiled step: everything that changes the library."""
    digest = hashlib.sha256(repr((torch.__version__, _machine(), _SOURCE, n_head, eps, batch, max_len,
                                  w.exact_gelu, torch.get_num_threads(), w.head is w.wte)).encode())
    tensors = [w.wte, w.wpe, w.ln_f_weight, w.ln_f_bias] + ([] if w.head is w.wte else [w.head]) \
        + [t for layer in w.layers for t in layer]  # (a tied head's bytes are the embedding's: read once)
    for t in tensors:
        digest.update(repr((t.dtype, tuple(t.shape))).encode())
        digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:32]


def _compile(w: DecodeWeights, n_head: int, eps: float, batch: int, max_len: int, path: Path) -> None:
    step = DecodeStep(w, n_head, eps).eval()
    kv = [torch.zeros(batch, 2, n_head, max_len, w.wte.size(1) // n_head, dtype=w.ln_f_weight.dtype)
          for _ in w.layers]
    tokens = torch.zeros(batch, dtype=torch.long)
    # positions 1 .. max_len - 2: at end == max_len the cache view is the whole cache, a case export specialises
    end = torch.export.Dim("end", min=2, max=max_len - 1)
    example = torch.empty(min(10, max_len - 1))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(step, (tokens, tokens.clone(), example, *kv),
                                      dynamic_shapes=({}, {}, {0: end}, ({},) * len(kv)))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(path.parent)
    except OSError as exc:
        raise write_error(path.parent, exc, "set GLMLAB_CACHE_DIR to a writable directory, or drop "
                                            "--compile-decode") from exc
    print(f"compiling the decoding step for batch {batch} (once: kept in {path.parent})", file=sys.stderr,
          flush=True)
    from torch import _inductor  # (imported here: loading inductor takes a second or two)
    from torch._inductor.exc import CppCompileError, InvalidCxxCompiler

    try:  # (aoti_compile_and_package insists on a name ending in .pt2)
        with atomic_path(path, suffix=".pt2") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyTorch's deprecation notices about its own internals
            _inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=_INDUCTOR_SETTINGS)
    except (InvalidCxxCompiler, CppCompileError) as exc:
        raise GlmlabError(f"compiling the decoding step failed: {_first_line(exc)}",
                          "--compile-decode needs a working C++ compiler (g++ or clang) on PATH; install one, or "
                          "drop --compile-decode") from exc
    except OSError as exc:
        raise write_error(path.parent, exc, "free space in GLMLAB_CACHE_DIR (or point it at a writable directory), "
                                            "or drop --compile-decode") from exc
    except Exception as exc:  # noqa: BLE001 — any other failure inside inductor: the scripted step still works
        raise GlmlabError(f"compiling the decoding step failed: {_first_line(exc)}",
                          "drop --compile-decode (the scripted step gives the same tokens); please report this") \
            from exc


def _remove_stale_partials(folder: Path, age: float = 3600.0) -> None:
    """Delete what compilations killed midway left (hidden ``.*.pt2`` files older than ``age`` seconds: no
    compilation takes that long, so a younger one may be another process's, still being written)."""
    for partial in folder.glob(".*.pt2"):
        try:
            if time.time() - partial.stat().st_mtime > age:
                partial.unlink()
        except OSError:
            pass  # gone already, or not ours to delete


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return lines[0][:300]


def covers(starts: list[int], max_len: int) -> bool:
    """Whether a compiled step runs rows at these positions of a cache of ``max_len``: the span of keys it reads
    (the largest position + 1) is exported as 2 .. max_len - 1 (at max_len the cache view is the whole cache, a
    case export specialises; 1 is a size export specialises too)."""
    return max_len >= MIN_CACHE_LEN and 1 <= max(starts) <= max_len - 2


def compiled_batch_sizes(slots: int) -> list[int]:
    """The batch sizes compiled for a continuous batch of ``slots`` slots: the powers of two below it, and it
    (8 -> 1, 2, 4, 8; 12 -> 1, 2, 4, 8, 12), so a step with rows in the first k slots runs at most 2k - 1 rows."""
    sizes, n = [], 1
    while n < slots:
        sizes.append(n)
        n *= 2
    return sizes + [slots]


class CompiledDecodeStep:
    """A loaded compiled step for one batch size and cache length: ``step(tokens, starts, kv_layers)`` gives the
    logits (B, vocab) for row i's new token at position ``starts[i]`` and stores the keys and values there, where
    :func:`covers` the positions."""

    def __init__(self, runner: Callable[..., torch.Tensor], batch: int, max_len: int) -> None:
        self.runner, self.batch = runner, batch
        self._span = torch.empty(max_len)  # sliced to each step's span of keys

    def __call__(self, tokens: torch.Tensor, starts: list[int], kv_layers: list[torch.Tensor]) -> torch.Tensor:
        # (the library reads its inputs as laid out at export, unchecked: contiguous, which a column of a prompt
        # is not, and of the batch size and cache length it was built for, which the caller checks)
        positions = torch.tensor(starts, device=tokens.device)
        return self.runner(tokens.contiguous(), positions, self._span[:max(starts) + 1], *kv_layers)


def compiled_decode_step(w: DecodeWeights, n_head: int, eps: float, batch: int, max_len: int) -> CompiledDecodeStep:
    """The compiled step for these weights, batch size and cache length (>= :data:`MIN_CACHE_LEN`): loaded from
    the cache directory, or compiled there first (seconds to a minute). A library that does not load (damaged,
    or from another PyTorch build) is compiled again. Raises a :class:`GlmlabError` naming the fix when it cannot
    be built (no C++ compiler, an unwritable cache directory). CPU weights (``GPT.set_decode_compiled`` refuses
    another device)."""
    path = cache_dir() / f"gpt-{_key(w, n_head, eps, batch, max_len)}.pt2"
    if not path.exists():
        _compile(w, n_head, eps, batch, max_len, path)
    from torch import _inductor

    try:
        runner = _inductor.aoti_load_package(str(path))
    except Exception:  # noqa: BLE001 — whatever is wrong with the file, building it again replaces it
        path.unlink(missing_ok=True)
        _compile(w, n_head, eps, batch, max_len, path)
        runner = _inductor.aoti_load_package(str(path))
    return CompiledDecodeStep(runner, batch, max_len)
