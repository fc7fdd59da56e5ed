"""The retrain stage: compact model of the searched subnet, fine-tune on train800val200, test, merge."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

from common import dist
from common.build import build_backbone, load_split, prepare_data, stage_dir, stream_batches
from common.config import Config
from common.engine import evaluate, resolve_device, set_threads
from common.errors import UserError
from common.io import atomic_save_safetensors, atomic_write_json
from common.trainer import FitSpec, fit
from supernet.inject import freeze_all_but, head_names, head_parameters
from supernet.space import SearchSpace, Subnet

from .build import adapter_parameters, apply_subnet, layer_specs, merge_and_unload

_logger = logging.getLogger(__name__)
MERGED = "model_merged.safetensors"
METRICS = "metrics.json"


def retrain_complete(cfg: Config) -> bool:
    return (Path(cfg.output_dir) / cfg.retrain.dir / METRICS).is_file()


def subnet_path(cfg: Config) -> Path:
    if cfg.retrain.subnet:
        return Path(cfg.retrain.subnet)
    p = Path(cfg.output_dir) / "search" / "subnet.yaml"
    if not p.is_file():
        raise UserError(f"no subnet to retrain: {p} does not exist; run --stage search first or give --subnet PATH")
    return p


def build_compact_model(cfg: Config, subnet: Subnet, num_classes: int,
                        device: torch.device) -> tuple[nn.Module, SearchSpace]:
    """The backbone with only the subnet's tensors, initialised per ``retrain.init``; and the layer space."""
    g = cfg.glora
    if cfg.retrain.init == "supernet":
        from search.stage import load_trained_supernet
        sn = load_trained_supernet(cfg, num_classes, device)
        space = sn.space
        space.check_subnet(subnet, max_rank=space.max_rank)
        model = sn.model
    else:
        torch.manual_seed(cfg.seed)
        model = build_backbone(cfg, num_classes).to(device)
        space = SearchSpace(layer_specs(model, list(g.target_modules)), ranks=list(g.ranks))
        space.check_subnet(subnet)
    torch.manual_seed(cfg.seed + 1)  # fresh adapters (init: scratch) start the same whatever loading drew
    apply_subnet(model, subnet)
    counted = space.params(subnet)
    actual = sum(p.numel() for p in adapter_parameters(model))
    if counted != actual:
        raise RuntimeError(f"compact model has {actual} adapter parameters, the subnet counts {counted}")
    return model, space


def reference_backbone(cfg: Config, num_classes: int) -> nn.Module:
    """The untouched timm model the merged weights must load into (no checkpoint: only keys and shapes)."""
    from data.backbones import create_backbone
    return create_backbone(cfg.model.name, num_classes=num_classes, kwargs=dict(cfg.model.kwargs),
                           num_blocks=cfg.model.num_blocks)


def check_merged_keys(merged_sd: dict, reference: nn.Module) -> None:
    ref = reference.state_dict()
    missing, extra = set(ref) - set(merged_sd), set(merged_sd) - set(ref)
    bad = [k for k in set(ref) & set(merged_sd) if tuple(ref[k].shape) != tuple(merged_sd[k].shape)]
    if missing or extra or bad:
        raise RuntimeError(f"merged state dict differs from the timm model: missing {sorted(missing)[:3]}, "
                           f"extra {sorted(extra)[:3]}, shape mismatch {sorted(bad)[:3]}")
    reference.load_state_dict(merged_sd, strict=True)


def _fit_spec(cfg: Config, desc: str, fingerprint: dict) -> FitSpec:
    r = cfg.retrain
    return FitSpec(epochs=r.epochs, lr=r.lr, weight_decay=r.weight_decay, warmup_epochs=r.warmup_epochs,
                   min_lr=r.min_lr, max_steps_per_epoch=r.max_steps_per_epoch, batch_size=cfg.data.batch_size,
                   seed=cfg.seed, precision=cfg.precision, desc=desc, fingerprint=fingerprint,
                   head_lr_scale=r.head_lr_scale)


def run_retrain(cfg: Config, progress: bool = True) -> dict:
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    out = stage_dir(cfg, cfg.retrain.dir)
    num_classes = prepare_data(cfg)
    spath = subnet_path(cfg)
    subnet = Subnet.from_yaml(spath)
    model, space = build_compact_model(cfg, subnet, num_classes, device)
    adapter_params = sum(p.numel() for p in adapter_parameters(model))
    head_params = sum(p.numel() for p in head_parameters(model))

    train = load_split(cfg, model, "train800val200", progress=progress)
    test_ds = load_split(cfg, model, "test", in_memory=False)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fingerprint = {"model": cfg.model.to_dict(), "subnet": [list(c) for c in subnet.layers],
                   "names": list(subnet.names), "init": cfg.retrain.init, "task": [cfg.data.root, cfg.data.task]}
    if (out / "checkpoint.pt").is_file() and (out / "subnet.yaml").is_file() and \
            Subnet.from_yaml(out / "subnet.yaml") != subnet:
        raise UserError(f"{out} holds the retrain of another subnet; keep it and retrain this one elsewhere "
                        f"with --set retrain.dir=retrain-2 (or delete {out})")
    if dist.is_main():
        subnet.to_yaml(out / "subnet.yaml", space.specs, model=cfg.model.name)
    fit(model, named, train, _fit_spec(cfg, "retrain", fingerprint), out, device, progress=progress,
        head_names=head_names(model))
    if dist.is_main():
        atomic_save_safetensors(out / "adapters.safetensors",
                                {n: p for n, p in model.named_parameters() if p.requires_grad})

    # merge, compare logits on a test batch, check keys against the untouched timm model
    model.eval()
    x = next(iter(stream_batches(cfg, test_ds, shard=False)))[0].to(device)  # the same batch on every rank
    with torch.no_grad():
        before = model(x).float()
    merged = merge_and_unload(copy.deepcopy(model))
    with torch.no_grad():
        after = merged(x).float()
    diff = float((before - after).abs().max())
    if not diff <= cfg.retrain.merge_atol:
        raise RuntimeError(f"merged model differs from the adapted model by {diff:.3g} in the logits "
                           f"(tolerance retrain.merge_atol={cfg.retrain.merge_atol})")
    merged_sd = {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}
    check_merged_keys(merged_sd, reference_backbone(cfg, num_classes))
    meta = {"model": cfg.model.name, "num_classes": str(num_classes), "kwargs": json.dumps(dict(cfg.model.kwargs)),
            "num_blocks": str(cfg.model.num_blocks)}
    if dist.is_main():
        atomic_save_safetensors(out / MERGED, merged_sd, metadata=meta)
    # the test split is scored once, on the merged model (what a user deploys); the adapted model computes the
    # same logits up to merge_max_abs_diff
    test_acc = evaluate(merged, stream_batches(cfg, test_ds), device, cfg.precision,
                        desc="test (merged)" if progress else "")

    head_only = None
    if cfg.retrain.head_only_baseline:
        head_only = head_only_baseline(cfg, num_classes, train, test_ds, device, progress)
    metrics = {"test_acc": test_acc, "num_classes": num_classes,
               "adapter_params": adapter_params, "head_params": head_params, "merge_max_abs_diff": diff,
               "subnet": str(spath), "init": cfg.retrain.init, "head_only_test_acc": head_only}
    if dist.is_main():
        atomic_write_json(out / METRICS, metrics)
    _logger.info("retrain: test top-1 %.4f (merged model), %d adapter + %d head params, merge diff %.2e",
                 test_acc, adapter_params, head_params, diff)
    return dict(metrics, merged_file=str(out / MERGED))


def head_only_baseline(cfg: Config, num_classes: int, train, test_ds, device, progress: bool) -> float:
    """The same fine-tuning with only the classifier head trained: what GLoRA has to beat."""
    torch.manual_seed(cfg.seed)
    model = build_backbone(cfg, num_classes).to(device)
    head = head_parameters(model)
    freeze_all_but(model, head)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = stage_dir(cfg, cfg.retrain.dir) / "head_only"
    fit(model, named, train, _fit_spec(cfg, "head only", {"model": cfg.model.to_dict(), "head_only": True}),
        out, device, progress=progress, head_names=head_names(model))
    acc = evaluate(model, stream_batches(cfg, test_ds), device, cfg.precision, desc="test (head only)" if progress else "")
    _logger.info("head-only baseline: test top-1 %.4f", acc)
    return acc
