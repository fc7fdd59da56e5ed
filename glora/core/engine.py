"""Training and evaluation helpers shared by the supernet, search and retrain stages."""
from __future__ import annotations

import contextlib
import math
import re
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from . import dist
from .accel import resolve_precision
from .errors import UserError


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU. Under torchrun a CUDA device is the rank's own GPU.
    A CUDA device that is not there (``cuda:7`` on a machine with fewer GPUs, ``cuda:x``) is a one-line error."""
    if name == "auto":
        return dist.rank_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if name.startswith("cuda"):
        m = re.fullmatch(r"cuda(?::(\d+))?", name)
        if m is None:
            raise UserError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r}: CUDA is not available here; use device: cpu or auto")
        count = torch.cuda.device_count()
        if m.group(1) is not None and int(m.group(1)) >= count:
            raise UserError(f"device {name!r}: this machine has {count} GPU{'s' if count != 1 else ''} "
                            f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}); use device: cuda or auto")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N") from None
    return dist.rank_device(device)


def autocast(device: torch.device, precision: str):
    """bf16 autocast for the forward pass, or nothing for fp32 (``auto``: bf16 on CUDA, fp32 elsewhere)."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """Linear warmup to ``base_lr`` then cosine decay to ``min_lr``; a pure function of the step."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class InMemorySplit:
    """A split decoded and transformed once and kept as tensors (VTAB-1k uses no augmentation, so every
    epoch would decode the same images to the same tensors). Batches in a seeded order per epoch.

    Under torchrun every rank holds the split and ``batches`` yields this rank's part of each global batch
    (the global order and batch count do not depend on the world size)."""

    ON_DEVICE_SHARE = 0.25  # data.on_device: auto keeps a split on the GPU when it takes at most this share of
    # the free GPU memory

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size() + self.labels.numel() * self.labels.element_size()

    def place(self, device: torch.device, on_device="auto") -> "InMemorySplit":
        """Where the split lives for a run on ``device``; returns ``self``.

        On CUDA: on the GPU (``on_device`` true, or ``auto`` when it takes at most ``ON_DEVICE_SHARE`` of the free
        memory), so batches are gathered there and nothing is copied per step or per search candidate; else in
        pinned host memory, so each batch is copied asynchronously (``non_blocking`` does nothing from pageable
        memory). On the CPU nothing changes."""
        if device.type != "cuda":
            return self
        if on_device == "auto":
            free, _ = torch.cuda.mem_get_info(device)
            on_device = self.nbytes <= self.ON_DEVICE_SHARE * free
        if on_device:
            self.images, self.labels = self.images.to(device), self.labels.to(device)
        elif not self.images.is_pinned():
            self.images, self.labels = self.images.pin_memory(), self.labels.pin_memory()
        return self

    @classmethod
    def from_dataset(cls, dataset, desc: str = "", batch_size: int = 64, num_workers: int = 0,
                     progress: bool = True) -> "InMemorySplit":
        from .progress import progress_bar
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        xs, ys = [], []
        for x, y in progress_bar(loader, desc=f"loading {desc}", enabled=progress):
            xs.append(x)
            ys.append(torch.as_tensor(y))
        return cls(torch.cat(xs), torch.cat(ys).long())

    def __len__(self) -> int:
        return len(self.labels)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last else math.ceil(n / batch_size)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                drop_last: bool = False, shard: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Global batches of ``batch_size``; with ``shard`` (under torchrun) this rank's slice of each one,
        possibly empty when a batch has fewer samples than there are ranks."""
        n = len(self)
        shard = shard and dist.world_size() > 1
        if shuffle:
            g = torch.Generator().manual_seed(int(seed) * 100003 + int(epoch))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.images.device.type != "cpu":
            order = order.to(self.images.device)
        for i in range(self.num_batches(batch_size, drop_last)):
            idx = order[i * batch_size:(i + 1) * batch_size]
            if shard:
                lo, hi = dist.shard_range(len(idx))
                idx = idx[lo:hi]
            if self.images.device.type != "cpu":  # ``order`` is on the device already: no copy a batch
                yield self.images[idx], self.labels[idx]
            elif self.images.is_pinned():  # gathered into pinned memory, so the copy to the GPU is asynchronous
                yield (torch.index_select(self.images, 0, idx, out=_pinned(self.images, len(idx))),
                       torch.index_select(self.labels, 0, idx, out=_pinned(self.labels, len(idx))))
            else:
                yield self.images[idx], self.labels[idx]


def _pinned(t: torch.Tensor, n: int) -> torch.Tensor:
    """A fresh pinned buffer for ``n`` rows of ``t`` (the caching host allocator reuses it once the copy that
    read it has finished)."""
    return torch.empty((n,) + tuple(t.shape[1:]), dtype=t.dtype, pin_memory=True)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
             precision: str = "fp32", max_batches: int = 0, desc: str = "") -> float:
    """Top-1 accuracy (fraction) over ``batches``; restores the model's train/eval mode.
    ``desc`` shows a progress bar with that label (for long splits).

    Under torchrun ``batches`` are this rank's shards (``InMemorySplit.batches``, ``build.stream_batches``)
    and the correct and total counts are summed over ranks: every rank returns the one-process score."""
    return _score(model, batches, device, precision, max_batches, desc, with_loss=False)[0]


def evaluate_with_loss(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       device: torch.device, precision: str = "fp32") -> tuple[float, float]:
    """(top-1 accuracy as a fraction, mean cross-entropy in nats per example) over ``batches``; summed over
    ranks under torchrun like :func:`evaluate`."""
    return _score(model, batches, device, precision, 0, "", with_loss=True)


@torch.no_grad()
def _score(model, batches, device, precision, max_batches, desc, with_loss):
    if desc:
        from .progress import progress_bar
        batches = progress_bar(batches, desc=desc, enabled=dist.is_main())
    was_training = model.training
    model.eval()
    correct, total = torch.zeros((), dtype=torch.int64, device=device), 0  # counted on the device: no sync a batch
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for i, (x, y) in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            if len(y) == 0:  # an empty shard
                continue
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(x)
            correct += (logits.argmax(dim=-1) == y).sum()
            if with_loss:
                loss_sum += torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum").double()
            total += int(y.numel())
    finally:
        model.train(was_training)
    correct, total = int(correct), total
    correct, total = dist.all_reduce_sum([correct, total], dtype=torch.int64)
    loss = dist.all_reduce_sum([float(loss_sum)], dtype=torch.float64)[0] if with_loss else 0.0
    return correct / max(total, 1), loss / max(total, 1)


def set_threads(n: int) -> None:
    if n and n > 0:
        torch.set_num_threads(n)


def count_trainable(params: Sequence[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)
