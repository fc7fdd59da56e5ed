"""Text classification tasks in the VTAB-1k layout, tokenized once into tensors the training loop can batch.

``<root>/<task>/{train800,val200,train800val200,test}.jsonl``, one JSON object per line with a ``text`` string and
an integer ``label`` (0..K-1); or the same names with ``.csv``, a header row naming the ``text`` and ``label``
columns. As for images, the supernet trains on train800, the search scores val200 and the retrain trains on
train800val200 and reports test (the split sizes are not checked).

A tokenized split is one ``int64`` tensor ``(N, 2, max_length)``: ``[:, 0]`` the token ids, ``[:, 1]`` the
attention mask, padded or truncated to ``max_length``. It batches, moves to a device and indexes like an image
tensor, so the training loop, the evaluation and the search run unchanged; :func:`unpack_tokens` turns a batch
back into the keyword arguments of a Hugging Face model.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import torch

from glora.core.errors import UserError

SPLITS = ("train800", "val200", "train800val200", "test")
FORMATS = (".jsonl", ".csv")


def split_file(root: str | os.PathLike, task: str, split: str) -> Path:
    """The file of ``split`` (``.jsonl`` first, then ``.csv``); UserError naming what was looked for."""
    if split not in SPLITS:
        raise UserError(f"split: {split!r} is not one of {', '.join(SPLITS)}")
    root = Path(root)
    if not task or not isinstance(task, str) or "/" in task or task in (".", ".."):
        raise UserError(f"data.task: {task!r} is not a task folder name")
    tdir = root / task
    if not tdir.is_dir():
        raise UserError(f"data.task: {tdir} is not a folder; a text task folder holds "
                        + ", ".join(f"{s}.jsonl" for s in SPLITS) + " (or .csv)")
    for ext in FORMATS:
        if (tdir / f"{split}{ext}").is_file():
            return tdir / f"{split}{ext}"
    raise UserError(f"data: {tdir / (split + '.jsonl')} not found (nor {split}.csv); a text task folder holds "
                    + ", ".join(f"{s}.jsonl" for s in SPLITS) + " (or .csv) with text and label fields")


def has_split(root: str | os.PathLike, task: str, split: str) -> bool:
    return any((Path(root) / task / f"{split}{ext}").is_file() for ext in FORMATS)


def _label(value, where: str) -> int:
    if isinstance(value, bool):
        value = None
    try:
        label = int(value)
        if isinstance(value, float) and value != label:
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(f"data: {where}: label {value!r} is not an integer") from None
    if label < 0:
        raise UserError(f"data: {where}: negative label {label}; expected labels 0..K-1")
    return label


def read_text_split(root: str | os.PathLike, task: str, split: str) -> tuple[list[str], list[int]]:
    """``(texts, labels)`` of one split, every line checked (a UserError names the file and line)."""
    path = split_file(root, task, split)
    texts, labels = [], []
    with open(path, encoding="utf-8", newline="") as f:
        if path.suffix == ".jsonl":
            rows = []
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"data: {path}:{lineno}: not a JSON object ({e.msg})") from None
                rows.append((f"{path}:{lineno}", row))
        else:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
                raise UserError(f"data: {path}: the header must name the columns text and label, "
                                f"got {reader.fieldnames}")
            rows = [(f"{path}:{i}", row) for i, row in enumerate(reader, 2)]
    for where, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or "label" not in row:
            raise UserError(f"data: {where}: expected a text string and an integer label, "
                            'e.g. {"text": "a fine film", "label": 1}')
        texts.append(row["text"])
        labels.append(_label(row["label"], where))
    if not texts:
        raise UserError(f"data: {path} holds no example; expected one text and label per line")
    return texts, labels


def text_num_classes(root: str | os.PathLike, task: str) -> int:
    """Max label of train800val200 (or train800 + val200) + 1; test labels must be below it."""
    if has_split(root, task, "train800val200"):
        labels = read_text_split(root, task, "train800val200")[1]
    else:
        labels = [y for s in ("train800", "val200") for y in read_text_split(root, task, s)[1]]
    k = max(labels) + 1
    if has_split(root, task, "test"):
        for y in read_text_split(root, task, "test")[1]:
            if y >= k:
                raise UserError(f"data: {split_file(root, task, 'test')}: label {y} is out of range; the "
                                f"training splits have {k} classes (0..{k - 1})")
    return k


def pack_tokens(tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    """Tokenize ``texts`` to ``(N, 2, max_length)`` int64: token ids and attention mask, padded/truncated."""
    if not isinstance(max_length, int) or max_length < 1:
        raise UserError(f"data.max_length: {max_length!r} is not a positive integer (tokens per example)")
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return torch.stack([enc["input_ids"].long(), enc["attention_mask"].long()], dim=1)


def unpack_tokens(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``(N, 2, L)`` packed tokens -> ``{"input_ids": (N, L), "attention_mask": (N, L)}``."""
    return {"input_ids": x[:, 0], "attention_mask": x[:, 1]}


def is_packed_tokens(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.ndim == 3 and x.shape[1] == 2 and not x.is_floating_point()


def load_text_split(root: str | os.PathLike, task: str, split: str, tokenizer,
                    max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A split tokenized once: packed tokens ``(N, 2, max_length)`` and labels ``(N,)``, both int64."""
    texts, labels = read_text_split(root, task, split)
    return pack_tokens(tokenizer, texts, max_length), torch.tensor(labels, dtype=torch.long)
