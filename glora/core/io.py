"""Atomic file writes: a file is either the old version or the new one, never half written.

A new file gets the mode any other file the user creates gets (``0666`` less the umask), and it reaches the disk
(the file, then its folder) before and after the rename, so a power cut cannot leave a renamed but empty file.
"""
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import UserError


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder
        pass
    finally:
        os.close(fd)


TMP_SUFFIX = ".tmp"


_PARTIAL_RE = re.compile(r"^\..+\.[a-z0-9_]{8}" + re.escape(TMP_SUFFIX) + "$")  # mkstemp's 8 random characters


def is_partial_write(p: Path) -> bool:
    """A temporary file of :func:`atomic_write` (``.<name>.<8 random>.tmp``) left by a process killed mid-write."""
    return bool(_PARTIAL_RE.match(p.name)) and p.is_file() and not p.is_symlink()


def atomic_write(path: str | os.PathLike, write_fn: Callable[[str], None]) -> None:
    """Call ``write_fn(tmp_path)`` and rename the temporary file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600
        write_fn(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, _write)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_yaml(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False, default_flow_style=None))


def safetensors_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    """The safetensors file of ``tensors`` with a canonical header (keys sorted, metadata included), so the same
    tensors and metadata always give the same bytes."""
    from safetensors.torch import save
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


def load_safetensors(path: str | os.PathLike, what: str = "") -> dict:
    """The tensors of a safetensors file; a missing, empty, truncated or otherwise damaged file is a UserError
    that names it."""
    from safetensors.torch import load
    path = Path(path)
    try:
        return load(path.read_bytes())
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e}){'; ' + what if what else ''}") from None
    except Exception as e:  # the parser's own error types
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path} is damaged or not a safetensors file ({msg}){'; ' + what if what else ''}") \
            from None


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line (flushed and synced, so a killed run loses at most the line being written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    if new:
        _fsync_dir(path.parent)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a jsonl file of JSON objects. A damaged last line (a write cut short by a kill) is left out; a damaged
    line anywhere else is a UserError that names it, so no good record after it is ever dropped."""
    out = []
    path = Path(path)
    if not path.exists():
        return out
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict):
            if i == last:
                break
            raise UserError(f"{path}:{i + 1}: damaged line (not a JSON object): {line[:60]!r}; repair or delete "
                            "that line to go on")
        out.append(rec)
    return out
