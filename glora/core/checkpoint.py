"""Training checkpoints as data, never code.

One safetensors file holds every tensor of the state (trainable parameters, optimizer moments and steps); its
metadata holds the rest (epoch, fingerprint, optimizer settings) as JSON in which every dict, tuple and tensor is
tagged, so the state reads back exactly as it was saved. Reading a checkpoint parses a JSON header and raw tensor
bytes: nothing in a shared run folder can run code. A pickle checkpoint of an older version is never loaded.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .io import atomic_write_bytes, safetensors_bytes

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"
FORMAT = "glora-checkpoint-1"


def _encode(obj: Any, tensors: dict, path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = path
        while key in tensors:
            key += "_"
        tensors[key] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"__tuple__": items}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in obj):
            raise TypeError(f"checkpoint {path}: only str and int keys can be stored")
        return {"__dict__": [[k, _encode(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    raise TypeError(f"checkpoint {path}: a {type(obj).__name__} cannot be stored (tensors and plain values only)")


def _decode(obj: Any, tensors: dict) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__dict__"}:
            return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
        raise ValueError(f"unknown entry {sorted(obj)[:3]}")
    return obj


def checkpoint_bytes(state: dict) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    doc = _encode(state, tensors, "state")
    return safetensors_bytes(tensors, metadata={"format": FORMAT, "state": json.dumps(doc, sort_keys=True)})


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` (nested dicts, lists, tuples of tensors and plain values) atomically to ``path``."""
    atomic_write_bytes(path, checkpoint_bytes(state))


def _damaged(path: Path, why: str) -> UserError:
    return UserError(f"{path} is damaged ({why}); delete {path.parent} to train this stage again, "
                     "or use another output_dir")


def safetensors_header(path: Path, fix: str = "") -> dict:
    """The header of any safetensors file, checked against the file's size (JSON, tensor offsets within the
    file), read without its tensors; a missing, short or damaged file is a one-line UserError ending in ``fix``
    (by default: delete the stage folder)."""
    def damaged(why: str) -> UserError:
        return UserError(f"{path} is damaged ({why}); {fix}") if fix else _damaged(path, why)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise damaged(f"{size} bytes, too short for a safetensors header")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise damaged("cut short inside its header")
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e}){'; ' + fix if fix else ''}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise damaged("its header is not JSON") from None
    if not isinstance(header, dict):
        raise damaged("its header is not a mapping")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise damaged("its header has no valid tensor offsets") from None
    if 8 + n + end != size:
        raise damaged(f"{size} bytes where its header promises {8 + n + end}: cut short or extended")
    return header


def _header(path: Path) -> dict:
    """The checked header of a checkpoint file (size, JSON, offsets within the file, format), read without its
    tensors."""
    header = safetensors_header(path)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "state" not in meta:
        raise _damaged(path, "not a checkpoint of this tool")
    return header


def _refuse_legacy(folder: Path) -> None:
    legacy = folder / LEGACY_CHECKPOINT
    if legacy.exists():
        raise UserError(f"{legacy} is a pickle checkpoint of an older version and is never loaded (a pickle can run "
                        f"code): delete {folder} to train this stage again, or use another output_dir")


def _checkpoint_header(folder: str | os.PathLike) -> tuple[Path, dict] | None:
    """``(path, metadata)`` of ``<folder>/checkpoint.safetensors``, None when there is none; an old pickle
    checkpoint is refused."""
    folder = Path(folder)
    _refuse_legacy(folder)
    path = folder / CHECKPOINT
    if not path.is_file():
        return None
    return path, _header(path)["__metadata__"]


def checkpoint_info(folder: str | os.PathLike) -> dict | None:
    """The non-tensor part of ``<folder>/checkpoint.safetensors`` (epoch, fingerprint), checking that the whole
    file is there; None when there is no checkpoint."""
    found = _checkpoint_header(folder)
    if found is None:
        return None
    path, meta = found
    try:
        doc = json.loads(meta["state"])
        info = _decode(doc, _Lazy())
    except (ValueError, KeyError, TypeError) as e:
        raise _damaged(path, f"its state does not read back: {e}") from None
    _check_shape(path, info, tensors=False)
    return info


class _Lazy(dict):
    """Tensor lookups without loading any tensor (for the header-only reader)."""

    def __missing__(self, key):
        return None


def _check_shape(path: Path, state: Any, tensors: bool = True) -> None:
    if not isinstance(state, dict):
        raise _damaged(path, "its state is not a mapping")
    for key, kind in (("epoch", int), ("fingerprint", dict), ("optimizer", dict), ("params", dict)):
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise _damaged(path, f"its state has no {key}")
    if tensors and not all(isinstance(v, torch.Tensor) for v in state["params"].values()):
        raise _damaged(path, "its params are not all tensors")


def load_checkpoint(folder: str | os.PathLike) -> dict | None:
    """The state saved by :func:`save_checkpoint` in ``<folder>/checkpoint.safetensors`` (None when there is
    none); a damaged file is a UserError naming it."""
    from safetensors.torch import load
    found = _checkpoint_header(folder)
    if found is None:
        return None
    path, meta = found
    try:
        tensors = load(path.read_bytes())
        state = _decode(json.loads(meta["state"]), tensors)
    except Exception as e:  # the parser's own error types, a missing tensor, bad JSON
        raise _damaged(path, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    _check_shape(path, state)
    return state
