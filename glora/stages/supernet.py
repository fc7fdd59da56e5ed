"""One-shot supernet training: a fresh random path at every step, resumable at epoch boundaries.

The path of step ``s`` is drawn from ``(seed, s)`` alone (``SearchSpace.path``; with
``supernet.path_sampling: budget`` a path inside the search budget, drawn as the search draws its random
candidates, so training concentrates on the subnets the search will score; with ``fair`` the step trains
``n`` paths in which every tensor of every layer takes each of its options equally often, their gradients
averaged, so no option gets more updates than another; with ``sandwich`` the step trains the space's
largest path on the labels and ``supernet.sandwich_paths`` budget paths on the largest path's predictions,
in-place distillation as in BigNAS), so data-parallel ranks agree
without communication, and a resumed run draws the same paths as an uninterrupted one (see
``glora.core.trainer.fit`` for the rest of the resume guarantee).

Files under ``<output_dir>/supernet/``: ``settings.json`` (what the stage ran with), ``checkpoint.safetensors``
(trainable state and optimizer, written atomically each epoch; tensors and JSON, nothing that can run code),
``adapters.safetensors`` (adapter and head weights), ``log.jsonl`` (one line an epoch: loss, lr, val top-1 of a
few fixed probe paths).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from glora.core import accel, dist
from glora.core.build import build_backbone, load_split, prepare_data, stage_dir
from glora.core.config import Config
from glora.core.engine import evaluate, resolve_device, set_threads
from glora.core.errors import UserError
from glora.core.io import atomic_save_safetensors, load_safetensors
from glora.core.trainer import FitSpec, checkpoint_epoch, fit
from supernet.inject import head_names
from supernet.wrapper import GloraSupernet

_logger = logging.getLogger(__name__)

ADAPTERS = "adapters.safetensors"
PROBE_SEED_OFFSET = 7_919  # probe paths come from a seed apart from the training paths


def supernet_complete(cfg: Config) -> bool:
    out = Path(cfg.output_dir) / "supernet"
    return (out / ADAPTERS).is_file() and checkpoint_epoch(out) >= cfg.supernet.epochs


def _opt_list(v):
    return None if v is None else list(v)


def glora_options(glora) -> dict:
    """The ``GloraSupernet`` keyword arguments of a config's ``glora`` section (plain lists and values)."""
    return dict(target_modules=list(glora.target_modules), ranks=list(glora.ranks),
                choices_ab=list(glora.choices_ab), choices_c=list(glora.choices_c),
                choices_de=list(glora.choices_de), parametrisation=glora.parametrisation,
                choices_a=_opt_list(glora.choices_a), choices_b=_opt_list(glora.choices_b),
                choices_d=_opt_list(glora.choices_d), choices_e=_opt_list(glora.choices_e),
                a_lora_scale=glora.a_lora_scale, vector_scale=glora.vector_scale)


def build_supernet(cfg: Config, num_classes: int) -> GloraSupernet:
    """The backbone of ``cfg`` with GLoRA super-layers injected into ``glora.target_modules``."""
    torch.manual_seed(cfg.seed)  # head initialisation
    model = build_backbone(cfg, num_classes)
    torch.manual_seed(cfg.seed + 1)  # adapter initialisation, whatever loading the weights drew
    return GloraSupernet(model, **glora_options(cfg.glora))


def load_trained_supernet(cfg: Config, num_classes: int, device: torch.device):
    """The supernet of ``cfg`` with the adapters and head of its finished supernet stage, on ``device``.
    Raises UserError when the stage has not finished or its file does not fit the config."""
    path = Path(cfg.output_dir) / "supernet" / ADAPTERS
    if not path.is_file() or not supernet_complete(cfg):
        raise UserError(f"no trained supernet in {path.parent}: run --stage supernet first (same config)")
    sn = build_supernet(cfg, num_classes)
    try:
        sn.load_trainable_state_dict(load_safetensors(path, f"delete {path.parent} to train the supernet again"))
    except ValueError as e:
        raise UserError(f"{path} does not fit this config's model/search space: {e}") from None
    return sn.to(device)


def train_supernet(cfg: Config, progress: bool = True) -> dict:
    """Train (or resume) the supernet of ``cfg``; return a summary dict."""
    set_threads(cfg.threads)
    out = stage_dir(cfg, "supernet")
    device = resolve_device(cfg.device)
    accel.configure(cfg, device)  # TF32 / deterministic; never torch.compile: the path changes every step
    s = cfg.supernet
    num_classes = prepare_data(cfg)
    sn = build_supernet(cfg, num_classes).to(device)
    train = load_split(cfg, sn.model, "train800", progress=progress, device=device)
    val = load_split(cfg, sn.model, "val200", progress=progress, device=device)
    probes = [sn.space.path(cfg.seed + PROBE_SEED_OFFSET, k) for k in range(s.probe_paths)]

    def probe(epoch: int) -> dict:
        accs = []
        for p in probes:
            sn.set_subnet(p, freeze=True)
            accs.append(evaluate(sn, val.batches(cfg.data.eval_batch_size), device, cfg.precision))
        if accs:
            _logger.info("supernet epoch %d/%d: probe-path val top-1 %s", epoch + 1, s.epochs,
                         ", ".join(f"{a:.3f}" for a in accs))
        return {"probe_val_acc": accs}

    spec = FitSpec(epochs=s.epochs, lr=s.lr, weight_decay=s.weight_decay, warmup_epochs=s.warmup_epochs,
                   min_lr=s.min_lr, grad_clip=s.grad_clip, max_steps_per_epoch=s.max_steps_per_epoch,
                   batch_size=cfg.data.batch_size, seed=cfg.seed, precision=cfg.precision, desc="supernet",
                   head_lr_scale=s.head_lr_scale,
                   fingerprint={"model": cfg.model.to_dict(), "layers": list(sn.layer_names),
                                "space": {t: list(o) for t, o in sn.space.tensor_options.items()},
                                "task": [cfg.data.root, cfg.data.task], "num_classes": num_classes})
    named = {n: p for n, p in sn.model.named_parameters() if p.requires_grad}
    if s.path_sampling in ("budget", "sandwich"):
        spec.fingerprint["path_sampling"] = s.path_sampling
        lo, hi = int(round(cfg.search.min_params_m * 1e6)), int(round(cfg.search.max_params_m * 1e6))
        from search.operators import check_budget, sample_in_budget
        check_budget(sn.space, lo, hi)

        def in_budget(*key: int):
            sub = sample_in_budget(sn.space, np.random.default_rng([int(cfg.seed), *map(int, key)]), lo, hi)
            if sub is None:  # no draw landed in the band: a uniform path (each pass of a step its own)
                sub = sn.space.path(cfg.seed, key[0] if len(key) == 1 else key[0] * 1_000 + key[1])
            return sub

        if s.path_sampling == "budget":
            def set_path(step: int) -> None:
                sn.set_subnet(in_budget(step))
        else:  # the largest path on the labels, then sandwich_paths budget paths distilled from it
            spec.fingerprint["sandwich_paths"] = s.sandwich_paths
            spec.paths_per_step, spec.distill = 1 + s.sandwich_paths, True
            largest = sn.space.largest()
            step_paths = []

            def set_path(step: int) -> None:
                step_paths[:] = [largest] + [in_budget(step, k) for k in range(1, spec.paths_per_step)]
    elif s.path_sampling == "fair":
        spec.fingerprint["path_sampling"] = "fair"
        spec.paths_per_step = sn.space.fair_width
        step_paths: list = []

        def set_path(step: int) -> None:
            step_paths[:] = sn.space.fair_paths(np.random.default_rng([int(cfg.seed), int(step)]))
    else:
        def set_path(step: int) -> None:
            sn.sample_path(cfg.seed, step)

    def set_pass(step: int, k: int) -> None:
        if s.path_sampling in ("fair", "sandwich"):
            sn.set_subnet(step_paths[k])

    log = fit(sn, named, train, spec, out, device, before_step=set_path, before_pass=set_pass,
              after_epoch=probe, progress=progress, head_names=head_names(sn.model))
    if dist.is_main():
        atomic_save_safetensors(out / ADAPTERS, sn.trainable_state_dict(),
                                metadata={"epochs": str(s.epochs), "num_classes": str(num_classes)})
    return {"epochs": s.epochs, "adapter_file": str(out / ADAPTERS), "num_classes": num_classes,
            "final_probe_val_acc": log[-1].get("probe_val_acc", []) if log else [],
            "supernet_adapter_elements": sum(p.numel() for p in sn.adapter_parameters())}
