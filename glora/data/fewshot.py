"""The few-shot protocol of NOAH (FGVC few-shot: ``train_meta.list.num_shot_<K>.seed_<S>``, ``val_meta.list``,
``test_meta.list``; each line ``<image path> <integer label>``) turned into VTAB-1k-layout task folders, so that
one data path serves both protocols.

Each (shot K, seed S) becomes ``<root>/<name>_shot<K>_seed<S>/`` with ``train800.txt`` and ``train800val200.txt``
= the K-shot list (the model trains on the shots alone), ``val200.txt`` = ``val_meta.list`` (lr choice, search)
and ``test.txt`` = ``test_meta.list``. Image paths are written relative to the new folder; no image is copied.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from glora.core.errors import UserError
from glora.core.io import atomic_write_text

FEWSHOT_TASK = re.compile(r"^(?P<name>.+)_shot(?P<shot>\d+)_seed(?P<seed>\d+)$")


def _list_dir(src: Path) -> Path:
    for d in (src, src / "annotations"):
        if (d / "val_meta.list").is_file() and (d / "test_meta.list").is_file():
            return d
    raise UserError(f"fewshot: no val_meta.list and test_meta.list in {src} or {src / 'annotations'}")


def _read_list(path: Path, images: Path) -> list[tuple[Path, int]]:
    out = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"fewshot: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise UserError(f"fewshot: {path}:{lineno}: malformed line {line!r}; expected '<image path> <label>'")
        out.append((images / parts[0], int(parts[1])))
    if not out:
        raise UserError(f"fewshot: {path} is empty")
    return out


def convert_fewshot(src: str | os.PathLike, root: str | os.PathLike, name: str = "", shots=(1, 2, 4, 8, 16),
                    seeds=(0, 1, 2), images: str | os.PathLike | None = None) -> list[str]:
    """Write one VTAB-1k-layout task folder per (shot, seed); return their names (for ``suite --tasks``).
    ``images``: the folder the list paths are relative to (default: ``src``)."""
    src, root = Path(src), Path(root)
    if not src.is_dir():
        raise UserError(f"fewshot: {src} is not a folder")
    name = name or src.name
    if "/" in name or not name:
        raise UserError(f"fewshot: {name!r} is not a task name")
    lists = _list_dir(src)
    images = Path(images) if images else src
    val = _read_list(lists / "val_meta.list", images)
    test = _read_list(lists / "test_meta.list", images)
    tasks = []
    for k in shots:
        for s in seeds:
            f = lists / f"train_meta.list.num_shot_{int(k)}.seed_{int(s)}"
            if not f.is_file():
                raise UserError(f"fewshot: {f} not found (shots {list(shots)}, seeds {list(seeds)} asked)")
            train = _read_list(f, images)
            task = f"{name}_shot{int(k)}_seed{int(s)}"
            tdir = root / task
            tdir.mkdir(parents=True, exist_ok=True)

            def lines(samples):
                return "".join(f"{os.path.relpath(p.resolve(), tdir.resolve())} {lab}\n" for p, lab in samples)
            for split, samples in (("train800", train), ("train800val200", train), ("val200", val),
                                   ("test", test)):
                atomic_write_text(tdir / f"{split}.txt", lines(samples))
            tasks.append(task)
    return tasks
