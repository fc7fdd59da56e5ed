"""VTAB-1k layout: ``<root>/<task>/{train800,val200,train800val200,test}.txt``, each line
``<image path relative to <root>/<task>> <integer label>``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from glora.core.errors import UserError

SPLITS = ("train800", "val200", "train800val200", "test")


def _task_dir(root: str | os.PathLike, task: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data.root: {root} is not a folder; expected a folder holding "
                        f"<task>/{{{','.join(SPLITS)}}}.txt")
    if not task or not isinstance(task, str) or "/" in task or task in (".", ".."):
        raise UserError(f"data.task: {task!r} is not a task folder name")
    tdir = root / task
    if not tdir.is_dir():
        raise UserError(f"data.task: {tdir} is not a folder; expected the task folder with "
                        + ", ".join(f"{s}.txt" for s in SPLITS))
    return tdir


def read_split(root: str | os.PathLike, task: str, split: str, check_files: bool = True) -> list[tuple[Path, int]]:
    """Parse ``<root>/<task>/<split>.txt`` into ``(absolute image path, label)`` pairs, validating every line."""
    if split not in SPLITS:
        raise UserError(f"split: {split!r} is not one of {', '.join(SPLITS)}")
    tdir = _task_dir(root, task)
    list_file = tdir / f"{split}.txt"
    if not list_file.is_file():
        raise UserError(f"data: list file {list_file} not found; a VTAB-1k task folder holds "
                        + ", ".join(f"{s}.txt" for s in SPLITS))
    samples: list[tuple[Path, int]] = []
    try:
        raw_lines = list_file.read_bytes().split(b"\n")
    except OSError as e:
        raise UserError(f"data: cannot read {list_file} ({e.strerror or e})") from None
    for lineno, raw in enumerate(raw_lines, 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise UserError(f"data: {list_file}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                            f"{e.start + 1}); save the list file as UTF-8") from None
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise UserError(f"data: {list_file}:{lineno}: malformed line {line!r}; "
                            "expected '<image path> <integer label>'")
        rel, lab = parts
        try:
            label = int(lab)
        except ValueError:
            raise UserError(f"data: {list_file}:{lineno}: label {lab!r} is not an integer") from None
        if label < 0:
            raise UserError(f"data: {list_file}:{lineno}: negative label {label}; expected labels 0..K-1")
        path = tdir / rel
        if check_files and not path.is_file():
            raise UserError(f"data: {list_file}:{lineno}: image {path} not found")
        samples.append((path, label))
    if not samples:
        raise UserError(f"data: list file {list_file} is empty; expected '<image path> <integer label>' lines")
    return samples


def num_classes(root: str | os.PathLike, task: str) -> int:
    """Number of classes = max label of train800val200 (or train800 + val200) + 1; test labels must be below it."""
    tdir = _task_dir(root, task)
    if (tdir / "train800val200.txt").is_file():
        labels = [lab for _, lab in read_split(root, task, "train800val200", check_files=False)]
    else:
        labels = [lab for s in ("train800", "val200") for _, lab in read_split(root, task, s, check_files=False)]
    k = max(labels) + 1
    for split in ("train800", "val200", "test"):
        if (tdir / f"{split}.txt").is_file():
            for path, lab in read_split(root, task, split, check_files=False):
                if lab >= k:
                    raise UserError(f"data: {tdir / (split + '.txt')}: label out of range: {lab} for image {path}; "
                                    f"train800val200 has {k} classes (0..{k - 1}), and every split's labels must "
                                    "be among them")
    return k


class VtabDataset(torch.utils.data.Dataset):
    """One split of a VTAB-1k-layout task. Items are ``(transform(RGB PIL image), label)``."""

    def __init__(self, root: str | os.PathLike, task: str, split: str, transform: Callable | None = None):
        self.root = Path(root)
        self.task = task
        self.split = split
        self.transform = transform
        self.samples = read_split(root, task, split)
        self.targets = [lab for _, lab in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> Image.Image:
        path = self.samples[index][0]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f"data: cannot read image {path}: {type(e).__name__}: {e}") from None

    def __getitem__(self, index: int):
        img = self.load_image(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.samples[index][1]


def build_transform(model, image_size: int = 0, interpolation: str = "bicubic"):
    """Evaluation transform: RGB resize to ``image_size x image_size``, ToTensor, Normalize(mean, std).

    ``model``: a timm model (or its data config dict); mean/std (and the default size when ``image_size`` is 0)
    come from ``timm.data.resolve_model_data_config``. ``interpolation``: 'bicubic' (VTAB practice) or 'model'
    to use the model's own."""
    import timm.data
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode
    cfg = dict(model) if isinstance(model, dict) else timm.data.resolve_model_data_config(model)
    if not isinstance(image_size, int) or image_size < 0:
        raise UserError(f"data.image_size: {image_size!r} is not a non-negative integer (0 = the model's size)")
    size = image_size or model_input_size(model, cfg)
    interp = cfg.get("interpolation", "bicubic") if interpolation == "model" else interpolation
    modes = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
             "nearest": InterpolationMode.NEAREST, "lanczos": InterpolationMode.LANCZOS}
    if interp not in modes:
        raise UserError(f"interpolation: {interp!r} is not one of {', '.join(modes)}")
    return transforms.Compose([
        transforms.Lambda(_to_rgb),
        transforms.Resize((size, size), interpolation=modes[interp]),
        transforms.ToTensor(),
        transforms.Normalize(mean=list(cfg["mean"]), std=list(cfg["std"])),
    ])


def model_input_size(model, cfg: dict | None = None) -> int:
    """Input resolution the model is built for: its patch embedding's ``img_size`` when it has one (timm's data
    config keeps the pretrained size even when ``img_size`` was overridden), else the data config's."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        return int(img_size[-1]) if isinstance(img_size, (tuple, list)) else int(img_size)
    if cfg is None:
        import timm.data
        cfg = dict(model) if isinstance(model, dict) else timm.data.resolve_model_data_config(model)
    return int(cfg.get("input_size", (3, 224, 224))[-1])


def _to_rgb(img):
    return img.convert("RGB") if isinstance(img, Image.Image) and img.mode != "RGB" else img


def loader_seed(seed: int, epoch: int) -> int:
    """Seed of the shuffle order for ``(seed, epoch)``: independent streams per epoch, same for a resumed run."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF]).generate_state(1,
                                                                                                       np.uint64)[0]
               & 0x7FFFFFFFFFFFFFFF)


def build_loader(dataset, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0, num_workers: int = 0,
                 drop_last: bool = False, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """DataLoader whose order is a deterministic function of ``(seed, epoch)``; build one per epoch."""
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise UserError(f"batch_size: {batch_size!r} is not a positive integer")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise UserError(f"data.num_workers: {num_workers!r} is not a non-negative integer")
    gen = torch.Generator()
    gen.manual_seed(loader_seed(seed, epoch))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=num_workers,
        drop_last=drop_last, pin_memory=pin_memory, persistent_workers=False)
