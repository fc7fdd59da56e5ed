"""Controlled accuracy probes: train fixed subnets (train800 -> val200) on one backbone and task, same seeds.

    python bench/probe.py --task mnist --img 56 --epochs 4 --lrs 1e-3,3e-3 --subnets lora,glora_av
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from glora.core.build import build_backbone, load_split, prepare_data  # noqa: E402
from glora.core.config import load_config  # noqa: E402
from glora.core.engine import evaluate, set_threads  # noqa: E402
from glora.core.trainer import FitSpec, fit  # noqa: E402
from retrain.build import apply_subnet, adapter_parameters, layer_specs  # noqa: E402
from supernet.inject import freeze_all_but, head_names, head_parameters  # noqa: E402
from supernet.space import LayerChoice, SearchSpace  # noqa: E402

UNIFORM = {
    "lora": LayerChoice("none", "lora_4", "none", "none", "none"),
    "lora_a": LayerChoice("lora_4", "none", "none", "none", "none"),
    "glora_av": LayerChoice("lora_4", "vector", "vector", "vector", "vector"),
    "glora_vl": LayerChoice("vector", "lora_4", "vector", "vector", "vector"),
    "vectors": LayerChoice("vector", "vector", "vector", "vector", "vector"),
    # B = lora_2 with vectors for A, D, E: 271,872 params on ViT-S, under LoRA r=4's 294,912
    "l2_ade": LayerChoice("vector", "lora_2", "none", "vector", "vector"),
    "l2_acde": LayerChoice("vector", "lora_2", "vector", "vector", "vector"),
    "l2": LayerChoice("none", "lora_2", "none", "none", "none"),
    # rank 2 for A (W0 * (A_u A_d), elementwise: up to full rank) and rank 2 for B: LoRA r=4's 294,912 params
    "a2b2": LayerChoice("lora_2", "lora_2", "none", "none", "none"),
    "head": None,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="mnist")
    ap.add_argument("--img", type=int, default=56)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lrs", default="1e-3")
    ap.add_argument("--subnets", default="lora")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--vector-scale", type=float, default=1.0,
                    help="glora.vector_scale: the vector A/C/D/E's multiplier (under AdamW, their lr multiplier)")
    args = ap.parse_args()
    cfg = load_config("demo", [f"model.kwargs.img_size={args.img}", f"data.task={args.task}",
                               f"seed={args.seed}", f"glora.vector_scale={args.vector_scale}"] + args.set)
    set_threads(cfg.threads)
    nc = prepare_data(cfg)
    torch.manual_seed(cfg.seed)
    base = build_backbone(cfg, nc)
    train = load_split(cfg, base, "train800", progress=False)
    val = load_split(cfg, base, "val200", progress=False)
    specs = layer_specs(base, list(cfg.glora.target_modules))
    space = SearchSpace(specs, ranks=list(cfg.glora.ranks))
    for name in args.subnets.split(","):
        for lr in [float(v) for v in args.lrs.split(",")]:
            model = copy.deepcopy(base)
            torch.manual_seed(cfg.seed + 1)
            if UNIFORM[name] is None:
                freeze_all_but(model, head_parameters(model))
                n_ad = 0
            else:
                sub = space.uniform(UNIFORM[name])
                apply_subnet(model, sub, parametrisation=cfg.glora.parametrisation, a_lora_scale=cfg.glora.a_lora_scale,
                             vector_scale=cfg.glora.vector_scale)
                n_ad = sum(p.numel() for p in adapter_parameters(model))
            named = {n: p for n, p in model.named_parameters() if p.requires_grad}
            spec = FitSpec(epochs=args.epochs, lr=lr, weight_decay=1e-4, warmup_epochs=0.5, min_lr=1e-6,
                           batch_size=cfg.data.batch_size, seed=cfg.seed, desc=name,
                           head_lr_scale=cfg.retrain.head_lr_scale)
            t0 = time.time()
            with tempfile.TemporaryDirectory() as d:
                log = fit(model, named, train, spec, d, torch.device("cpu"), progress=False,
                          head_names=head_names(model))
            acc = evaluate(model, val.batches(100), torch.device("cpu"))
            extra = args.set + ([f"vector_scale={args.vector_scale}"] if args.vector_scale != 1.0 else [])
            print(json.dumps({"task": args.task, "seed": args.seed, "subnet": name, "lr": lr, "params": n_ad,
                              "val_acc": acc, "train_loss": log[-1]["loss"],
                              "losses": [round(r["loss"], 3) for r in log], "time_s": round(time.time() - t0, 1),
                              "extra": extra}), flush=True)


if __name__ == "__main__":
    main()
