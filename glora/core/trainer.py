"""The training loop shared by supernet training and retraining: AdamW, warmup + cosine, resumable.

Data order is a function of ``(seed, epoch)`` and the global RNG is reseeded per epoch (dropout, drop path),
so a run killed at any moment and rerun resumes from its last epoch checkpoint and ends with exactly the
weights of an uninterrupted run (on the CPU). The per-epoch log line is written before the checkpoint, and a
resume drops log lines the checkpoint does not cover.

Under torchrun each rank computes its slice of every global batch (``InMemorySplit.batches``), scales its
summed loss by the global batch size and the gradients are summed over ranks: the step of one process, up to
float reduction order. Only rank 0 writes the log and the checkpoint; every rank resumes from that checkpoint.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dist
from .accel import resolve_precision
from .checkpoint import CHECKPOINT, checkpoint_info, load_checkpoint, save_checkpoint
from .clock import save_clocks
from .engine import InMemorySplit, autocast, lr_at
from .errors import UserError
from .io import append_jsonl, atomic_write_text, read_jsonl
from .progress import progress_bar

LOG = "log.jsonl"
POSTFIX_EVERY = 20  # steps between the progress bar's loss readings (each one waits for the device)


@dataclass
class FitSpec:
    """What to train and how (one stage's settings)."""
    epochs: int
    lr: float
    weight_decay: float
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    grad_clip: float = 0.0
    max_steps_per_epoch: int = 0
    batch_size: int = 32
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 | auto (bf16 on CUDA)
    head_lr_scale: float = 1.0  # the classifier head's lr is lr * head_lr_scale
    paths_per_step: int = 1  # forward/backward passes per optimizer step, their gradients averaged (``before_pass``)
    distill: bool = False  # pass 0 learns the labels, passes 1.. its predictions on the batch (in-place distillation)
    desc: str = "train"
    fingerprint: dict = field(default_factory=dict)  # must match on resume (model, layers, subnet, ...)


def optimizer_for(named_params: dict[str, nn.Parameter], lr: float, weight_decay: float,
                  head_names: set[str] = frozenset(), head_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """AdamW; matrices decay, vectors, scalars and biases do not; head parameters get ``lr * head_lr_scale``.
    Each group keeps its ``lr_scale`` so the schedule can set ``lr = schedule(step) * lr_scale``."""
    groups = []
    for is_head in (False, True):
        scale = head_lr_scale if is_head else 1.0
        for decay in (True, False):
            ps = [p for n, p in named_params.items() if (n in head_names) == is_head and (p.ndim >= 2) == decay]
            if ps:
                groups.append({"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": lr * scale,
                               "lr_scale": scale})
    return torch.optim.AdamW(groups, lr=lr)


def checkpoint_epoch(out_dir: str | Path) -> int:
    info = checkpoint_info(out_dir)
    return -1 if info is None else info["epoch"]


def fit(model: nn.Module, named_params: dict[str, nn.Parameter], train: InMemorySplit, spec: FitSpec,
        out_dir: str | Path, device: torch.device, before_step: Optional[Callable[[int], None]] = None,
        after_epoch: Optional[Callable[[int], dict]] = None, progress: bool = True,
        head_names: set[str] = frozenset(),
        before_pass: Optional[Callable[[int, int], None]] = None) -> list[dict]:
    """Train ``named_params`` of ``model`` on ``train``; checkpoint and log each epoch under ``out_dir``.
    ``head_names``: the keys of ``named_params`` that belong to the classifier head (see ``head_lr_scale``).
    ``before_step(step)`` runs before each optimizer step; with ``spec.paths_per_step = n`` each step runs ``n``
    forward/backward passes on the same batch, ``before_pass(step, k)`` before pass ``k``, and steps on the mean
    of their gradients (the logged loss and train top-1 are means over the passes too). With ``spec.distill``
    pass 0 is the teacher: it learns the labels, and every later pass learns the teacher's predicted
    distribution on the same batch (soft cross-entropy against its detached softmax), as in-place distillation
    does; train top-1 still counts hits on the labels."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = replace(spec, precision=resolve_precision(spec.precision, device))  # auto: as it runs here
    params = list(named_params.values())
    opt = optimizer_for(named_params, spec.lr, spec.weight_decay, set(head_names), spec.head_lr_scale)
    bs = spec.batch_size
    drop_last = len(train) > bs
    steps_per_epoch = train.num_batches(bs, drop_last=drop_last)
    if spec.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, spec.max_steps_per_epoch)
    total = steps_per_epoch * spec.epochs
    warmup = int(round(spec.warmup_epochs * steps_per_epoch))
    passes = spec.paths_per_step
    if passes < 1:
        raise ValueError(f"paths_per_step must be >= 1, got {passes}")
    if spec.distill and passes < 2:
        raise ValueError("distill needs paths_per_step >= 2 (a teacher pass and at least one student pass)")
    fingerprint = dict(spec.fingerprint, steps_per_epoch=steps_per_epoch, params=sorted(named_params),
                       spec={k: v for k, v in asdict(spec).items() if k not in ("desc", "fingerprint")
                             and (k, v) not in (("paths_per_step", 1), ("distill", False))})  # older runs resume

    start = 0
    ckpt = out_dir / CHECKPOINT
    state = load_checkpoint(out_dir)
    if state is not None:
        if state.get("fingerprint") != fingerprint:
            raise UserError(f"{ckpt} belongs to a run with other settings (model, layers, data, subnet, seed or "
                            f"training settings); use a new output_dir or delete {out_dir}")
        try:
            with torch.no_grad():
                for k, v in state["params"].items():
                    named_params[k].copy_(v)
            opt.load_state_dict(state["optimizer"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise UserError(f"{ckpt} is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            f"delete {out_dir} to train this stage again") from None
        start = state["epoch"]
    log_path = out_dir / LOG
    kept = [r for r in read_jsonl(log_path) if r.get("epoch", 0) <= start]
    if dist.is_main():
        atomic_write_text(log_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    world = dist.world_size()
    progress = progress and dist.is_main()

    model.train()
    lr = spec.lr
    for epoch in range(start, spec.epochs):
        # dropout / drop path masks: each rank its own stream (rank 0's is the one-process stream)
        torch.manual_seed(spec.seed * 1_000_003 + epoch + 7_919 * dist.rank() * (world > 1))
        bar = progress_bar(total=steps_per_epoch, desc=f"{spec.desc} {epoch + 1}/{spec.epochs}", enabled=progress)
        # summed on the device and read once an epoch (and every POSTFIX_EVERY steps for a shown bar): reading
        # them every step would stall the GPU twice a step. float64 sums of float32 losses, as Python floats were
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        for i, (x, y) in enumerate(train.batches(bs, shuffle=True, seed=spec.seed, epoch=epoch,
                                                 drop_last=drop_last)):
            if i >= steps_per_epoch:
                break
            step = epoch * steps_per_epoch + i
            lr = lr_at(step, total, warmup, spec.lr, spec.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            if before_step is not None:
                before_step(step)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            # this rank's share of the mean over the global batch (grads summed over ranks), over the passes
            global_n = min(bs, len(train) - i * bs) if world > 1 else len(y)
            for k in range(passes):
                if before_pass is not None:
                    before_pass(step, k)
                if len(y):
                    with autocast(device, spec.precision):
                        logits = model(x)
                    if spec.distill and k > 0:  # soft cross-entropy against the teacher pass's distribution
                        per = -(soft * F.log_softmax(logits.float(), dim=-1)).sum(-1)
                        loss = per.sum() / (global_n * passes) if world > 1 else per.mean() / passes
                    elif world > 1:
                        loss = F.cross_entropy(logits.float(), y, reduction="sum") / (global_n * passes)
                    else:
                        loss = F.cross_entropy(logits.float(), y) / passes
                    if spec.distill and k == 0:
                        soft = F.softmax(logits.detach().float(), dim=-1)
                    loss.backward()
                else:  # an empty shard (a global batch smaller than the world)
                    logits, loss = torch.zeros(0, 1, device=device), torch.zeros((), device=device)
                # the statistics: this shard's summed loss and hits, averaged over the passes
                loss_sum += loss.detach().double() * global_n
                correct += (logits.detach().argmax(-1) == y).sum()
            if world > 1:
                dist.all_reduce_grads(params)
            if spec.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
            opt.step()
            seen += len(y)
            if progress and ((i + 1) % POSTFIX_EVERY == 0 or i + 1 == steps_per_epoch):
                bar.set_postfix(loss=f"{float(loss_sum) / max(seen, 1):.3f}", lr=f"{lr:.1e}")
            bar.update(1)
        bar.close()
        loss_sum, correct = float(loss_sum), int(correct)
        if world > 1:
            loss_sum, seen, correct = dist.all_reduce_sum([loss_sum, seen, correct])
            seen, correct = int(seen), int(correct)
        record = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen * passes, 1),
                  "lr": lr}
        if after_epoch is not None:
            record.update(after_epoch(epoch))
            model.train()
        if not dist.is_main():  # rank 0 writes the log and the checkpoint
            continue
        append_jsonl(log_path, record)
        save_checkpoint(ckpt, {"epoch": epoch + 1, "fingerprint": fingerprint, "optimizer": opt.state_dict(),
                               "params": {k: v.detach().cpu().clone() for k, v in named_params.items()}})
        save_clocks()  # the time up to this checkpoint is kept work: a killed run counts it
    if spec.epochs == 0 and not ckpt.is_file() and dist.is_main():
        save_checkpoint(ckpt, {"epoch": 0, "fingerprint": fingerprint, "optimizer": opt.state_dict(),
                               "params": {k: v.detach().cpu().clone() for k, v in named_params.items()}})
    dist.barrier()  # the other ranks read the log (and the next stage the files) once rank 0 wrote them
    return read_jsonl(log_path)
