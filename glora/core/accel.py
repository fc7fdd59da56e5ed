"""Backend settings of a run on a GPU: precision, TF32, deterministic algorithms, torch.compile.

Nothing here changes what the CPU computes: ``precision: auto`` is fp32 on the CPU, TF32 switches only the CUDA
matmul and cuDNN flags, and ``compile`` is an option that defaults to off.
"""
from __future__ import annotations

import contextlib
import os

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device) -> str:
    """``auto``: bf16 autocast on CUDA, fp32 elsewhere; ``fp32`` / ``bf16`` as they are."""
    if precision == "auto":
        kind = device if isinstance(device, str) else torch.device(device).type
        return "bf16" if kind.split(":")[0] == "cuda" else "fp32"
    return precision


def config_device_type(device: str) -> str:
    """The device type a ``device`` config value resolves to, without touching CUDA beyond asking whether it is
    there (for fingerprints written before the device is set up)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":")[0]


def _set_tf32(on: bool) -> None:
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(m, "fp32_precision"):  # torch >= 2.9: the per-backend precision API
        m.fp32_precision = "tf32" if on else "ieee"
        c.fp32_precision = "tf32" if on else "ieee"
    else:
        m.allow_tf32 = on
        c.allow_tf32 = on


def _tf32_state():
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(m, "fp32_precision"):
        return ("new", m.fp32_precision, c.fp32_precision)
    return ("old", m.allow_tf32, c.allow_tf32)


def _restore_tf32(state) -> None:
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn
    if state[0] == "new":
        m.fp32_precision, c.fp32_precision = state[1], state[2]
    else:
        m.allow_tf32, c.allow_tf32 = state[1], state[2]


def tf32_enabled() -> bool:
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        return m.fp32_precision == "tf32"
    return bool(m.allow_tf32)


@contextlib.contextmanager
def fp32_exact():
    """TF32 off for CUDA matmuls and convolutions inside the block, the previous setting restored after: two
    computations compared to fp32 rounding (the recorded merged vs unmerged logits) are not rounded to 10 bits."""
    state = _tf32_state()
    _set_tf32(False)
    try:
        yield
    finally:
        _restore_tf32(state)


def set_deterministic() -> None:
    """Deterministic algorithms (``deterministic: true``). The cuBLAS workspace setting must be in the environment
    before cuBLAS starts, so this runs before anything touches CUDA (``run_search.py`` calls it first)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def configure(cfg, device: torch.device | None = None) -> None:
    """Apply ``deterministic`` and, on a CUDA ``device``, ``tf32``. Idempotent; nothing on the CPU unless
    ``deterministic`` is set."""
    if cfg.get("deterministic", False):
        set_deterministic()
    if device is not None and device.type == "cuda":
        _set_tf32(bool(cfg.get("tf32", True)))


def maybe_compile(module: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """``torch.compile(module)`` when ``enabled`` (a module whose graph is fixed: the retrain, the merged model);
    ``module`` itself otherwise. The compiled wrapper shares the parameters and forwards ``train()``/``eval()``."""
    if not enabled:
        return module
    return torch.compile(module)
