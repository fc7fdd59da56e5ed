"""One-shot supernet training: a fresh random path at every step, resumable at epoch boundaries.

The path of step ``s`` is drawn from ``(seed, s)`` alone (``SearchSpace.path``), so data-parallel ranks agree
without communication, and a resumed run draws the same paths as an uninterrupted one. Data order is a
function of ``(seed, epoch)`` and dropout is reseeded per epoch, so on the CPU a run killed at any moment and
rerun ends with exactly the adapter weights of a run that was never interrupted.

Files under ``<output_dir>/supernet/``: ``checkpoint.pt`` (trainable state, optimizer, epoch; written
atomically each epoch), ``adapters.safetensors`` (adapter and head weights), ``log.jsonl`` (one line an epoch).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.build import build_supernet, load_split, prepare_data, stage_dir
from common.config import Config
from common.engine import autocast, evaluate, lr_at, resolve_device, set_threads
from common.io import append_jsonl, atomic_save_safetensors, atomic_torch_save, atomic_write_text, read_jsonl

_logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
ADAPTERS = "adapters.safetensors"
LOG = "log.jsonl"
PROBE_SEED_OFFSET = 7_919  # probe paths come from a seed apart from the training paths


def load_supernet_checkpoint(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def supernet_complete(cfg: Config) -> bool:
    ckpt = Path(cfg.output_dir) / "supernet" / CHECKPOINT
    if not ckpt.is_file():
        return False
    state = load_supernet_checkpoint(ckpt)
    return state.get("epoch", 0) >= cfg.supernet.epochs


def optimizer_for(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # vectors, scalars and biases: no weight decay
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def train_supernet(cfg: Config, progress: bool = True) -> dict:
    """Train (or resume) the supernet of ``cfg``; return a summary dict."""
    set_threads(cfg.threads)
    out = stage_dir(cfg, "supernet")
    device = resolve_device(cfg.device)
    scfg = cfg.supernet
    num_classes = prepare_data(cfg)
    sn = build_supernet(cfg, num_classes).to(device)
    train = load_split(cfg, sn.model, "train800")
    val = load_split(cfg, sn.model, "val200")

    params = sn.trainable_parameters()
    opt = optimizer_for(params, scfg.lr, scfg.weight_decay)
    bs = cfg.data.batch_size
    steps_per_epoch = train.num_batches(bs, drop_last=len(train) > bs)
    if scfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, scfg.max_steps_per_epoch)
    total_steps = steps_per_epoch * scfg.epochs
    warmup_steps = int(round(scfg.warmup_epochs * steps_per_epoch))

    start_epoch = 0
    ckpt_path = out / CHECKPOINT
    if ckpt_path.is_file():
        state = load_supernet_checkpoint(ckpt_path)
        if state.get("steps_per_epoch") != steps_per_epoch or state.get("layer_names") != list(sn.layer_names):
            from common.errors import UserError
            raise UserError(f"{ckpt_path} was written by a run with another model or data setting; "
                            "use a new output_dir or delete that folder")
        sn.load_trainable_state_dict(state["trainable"])
        opt.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"]
        _logger.info("supernet: resuming at epoch %d of %d", start_epoch, scfg.epochs)
    # the log keeps only epochs the checkpoint has (a kill between the two writes loses nothing)
    log_path = out / LOG
    kept = [r for r in read_jsonl(log_path) if r.get("epoch", 0) <= start_epoch]
    atomic_write_text(log_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    probes = [sn.space.path(cfg.seed + PROBE_SEED_OFFSET, k) for k in range(scfg.probe_paths)]
    sn.train()
    t0 = time.time()
    for epoch in range(start_epoch, scfg.epochs):
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)  # dropout / drop-path randomness of this epoch
        bar = tqdm(total=steps_per_epoch, desc=f"supernet {epoch + 1}/{scfg.epochs}", disable=not progress,
                   dynamic_ncols=True, leave=False)
        loss_sum, n_seen, correct = 0.0, 0, 0
        batches = train.batches(bs, shuffle=True, seed=cfg.seed, epoch=epoch, drop_last=len(train) > bs)
        for i, (x, y) in enumerate(batches):
            if i >= steps_per_epoch:
                break
            step = epoch * steps_per_epoch + i
            lr = lr_at(step, total_steps, warmup_steps, scfg.lr, scfg.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            sn.sample_path(cfg.seed, step)
            x, y = x.to(device), y.to(device)
            with autocast(device, cfg.precision):
                logits = sn(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if scfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, scfg.grad_clip)
            opt.step()
            loss_sum += float(loss.detach()) * len(y)
            n_seen += len(y)
            correct += int((logits.argmax(-1) == y).sum())
            bar.set_postfix(loss=f"{loss_sum / n_seen:.3f}", lr=f"{lr:.2e}")
            bar.update(1)
        bar.close()
        probe_acc = []
        for p in probes:
            sn.set_subnet(p, freeze=True)
            probe_acc.append(evaluate(sn, val.batches(cfg.data.eval_batch_size), device, cfg.precision))
        record = {"epoch": epoch + 1, "loss": loss_sum / max(n_seen, 1), "train_acc": correct / max(n_seen, 1),
                  "lr": lr, "probe_val_acc": probe_acc, "time_s": round(time.time() - t0, 2)}
        append_jsonl(log_path, record)  # before the checkpoint: a resume drops lines the checkpoint lacks
        trainable = sn.trainable_state_dict()
        atomic_torch_save(ckpt_path, {
            "epoch": epoch + 1, "steps_per_epoch": steps_per_epoch, "layer_names": list(sn.layer_names),
            "trainable": trainable, "optimizer": opt.state_dict(), "config": cfg.to_dict(),
            "num_classes": num_classes})
        atomic_save_safetensors(out / ADAPTERS, trainable, metadata={"epoch": str(epoch + 1)})
        msg = ", ".join(f"{a:.3f}" for a in probe_acc)
        _logger.info("supernet epoch %d/%d: loss %.4f, train top-1 %.3f, probe val top-1 [%s]", epoch + 1,
                     scfg.epochs, record["loss"], record["train_acc"], msg)
    if scfg.epochs == 0 or not (out / ADAPTERS).is_file():
        trainable = sn.trainable_state_dict()
        atomic_save_safetensors(out / ADAPTERS, trainable, metadata={"epoch": "0"})
        atomic_torch_save(ckpt_path, {"epoch": 0, "steps_per_epoch": steps_per_epoch,
                                      "layer_names": list(sn.layer_names), "trainable": trainable,
                                      "optimizer": opt.state_dict(), "config": cfg.to_dict(),
                                      "num_classes": num_classes})
    log = read_jsonl(log_path)
    return {"epochs": scfg.epochs, "adapter_file": str(out / ADAPTERS),
            "final_probe_val_acc": log[-1]["probe_val_acc"] if log else [],
            "adapter_elements": sum(p.numel() for p in sn.adapter_parameters())}
